//! Paging at scale: a BERT-large shaped model with random weights (24 layers,
//! hidden 1024, about 1.3 GB of f32), served over QUIC on loopback, run under
//! VRAM budgets far smaller than the model, with each eviction policy.
//! Reports throughput against the budget with the host cache warm, as a ratio
//! to the fully resident model timed in runs alternating with the budget's,
//! the bytes uploaded per pass next to the optimal policy's bound of
//! (N - k + d + 1) layers, and the time of a cold
//! pass that streams every layer from the server. Then the same model with
//! f16 weights under the same MiB budgets, which hold about twice the layers.
//!
//! Then models larger than the GPU (`paging/large.rs`): a Qwen3-Embedding-4B
//! shaped model in f16 (about 8 GB) streamed under a 1 GiB VRAM budget and a
//! 1 GiB host cache by a client in its own process, with its peak RSS next
//! to the bound the flags set; in full runs with the qwen3 family, the sweep
//! above runs the Qwen3-Embedding-0.6B shape (budgets of 1, 4, 8, 16 and 28
//! layers) instead of BERT-large.
//!
//! The models are written once under `target/synth/` and reused.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use surf_benches::loopback::{Loopback, Paging};
use surf_benches::{minilm_dir, quick, write_json};
use surf_engine::synth::{SynthPreset, SynthSpec, write_model};
use surf_engine::{Engine, Eviction, VramBudget, WeightDtype};

#[path = "paging/large.rs"]
mod large;

const TEXTS: [&str; 2] = [
    "Layers stream in from the weight server while earlier ones compute.",
    "A budget smaller than the model keeps only a few layers in memory.",
];

/// The synthetic model of this run, written on first use.
fn model(spec: &SynthSpec, name: &str) -> PathBuf {
    let dir = surf_benches::repo_root().join(format!("target/synth/{name}"));
    if dir.join("model.safetensors").is_file() && dir.join("config.json").is_file() {
        return dir;
    }
    let tokenizer = std::fs::read(minilm_dir().join("tokenizer.json"))
        .expect("the MiniLM tokenizer (bash assets/fetch-model.sh)");
    println!("writing the {name} model to {} once", dir.display());
    let started = Instant::now();
    write_model(&dir, spec, &tokenizer).expect("the synthetic model is written");
    println!("  written in {:.1} s", started.elapsed().as_secs_f64());
    dir
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// What a steady run costs: bytes moved per run and per pass, from the
/// engine's counters.
struct PerRun {
    time: Duration,
    uploaded: u64,
    fetched: u64,
    uploaded_per_pass: f64,
    uploads_per_pass: f64,
}

fn timed_run(engine: &Engine, texts: &[&str]) -> Duration {
    let start = Instant::now();
    engine.infer(texts).expect("runs");
    start.elapsed()
}

/// Median time of `repeats` runs of `texts`, after one run that fills
/// caches, with the bytes the timed runs moved.
fn time_runs(engine: &Engine, texts: &[&str], repeats: usize) -> PerRun {
    time_runs_beside(engine, None, texts, repeats).0
}

/// Like [`time_runs`], each run alternating with one of `reference` (the
/// fully resident engine), whose median comes back beside: on a shared
/// machine whose speed drifts, a ratio of runs made side by side holds where
/// a ratio to a rate measured minutes earlier does not.
fn time_runs_beside(
    engine: &Engine,
    reference: Option<&Engine>,
    texts: &[&str],
    repeats: usize,
) -> (PerRun, Option<Duration>) {
    engine.infer(texts).expect("fills the caches");
    let before = engine.inference_stats().expect("stats");
    let mut reference_times = Vec::new();
    let mut times = Vec::new();
    for _ in 0..repeats {
        if let Some(reference) = reference {
            reference_times.push(timed_run(reference, texts));
        }
        times.push(timed_run(engine, texts));
    }
    let time = median(times);
    let after = engine.inference_stats().expect("stats");
    let passes = (after.passes - before.passes).max(1) as f64;
    let uploaded = after.bytes_uploaded - before.bytes_uploaded;
    let per_run = PerRun {
        time,
        uploaded: uploaded / repeats as u64,
        fetched: (after.bytes_fetched - before.bytes_fetched) / repeats as u64,
        uploaded_per_pass: uploaded as f64 / passes,
        uploads_per_pass: (after.vram_misses - before.vram_misses) as f64 / passes,
    };
    let reference_time = (!reference_times.is_empty()).then(|| median(reference_times));
    (per_run, reference_time)
}

/// Whether this build runs `spec`'s family (the decoder families arrive
/// with their model code).
fn runs_family(spec: &SynthSpec) -> bool {
    spec.model_config(std::path::Path::new("config.json"))
        .is_ok()
}

fn main() {
    if let Ok(run) = std::env::var(large::CLIENT_ENV) {
        large::client_main(&run);
        return;
    }
    if !minilm_dir().join("tokenizer.json").is_file() {
        println!("paging bench skipped: run `bash assets/fetch-model.sh` first");
        return;
    }
    let Some(gpu) = surf_benches::device("paging") else {
        return;
    };
    let (spec, name, budgets, repeats): (SynthSpec, &str, &[usize], usize) = if quick() {
        (
            SynthSpec::sized(4, 128, 2, 512),
            "tiny-4x128",
            &[1, 2, 4],
            1,
        )
    } else if runs_family(&SynthSpec::preset(SynthPreset::Qwen3_0_6B)) {
        (
            SynthSpec::preset(SynthPreset::Qwen3_0_6B),
            "qwen3-0.6b",
            &[1, 4, 8, 14, 16, 28],
            3,
        )
    } else {
        println!("this build has no qwen3 family: the sweep runs BERT-large");
        (
            SynthSpec::bert_large(),
            "bert-large",
            &[1, 2, 4, 8, 12, 16, 24],
            5,
        )
    };
    let dir = model(&spec, name);
    // First, as it is the row a run cut short by a time limit should keep.
    let larger_than_the_gpu = streamed_larger_than_the_flags(&gpu, &dir, &spec);
    write_json("paging-large", &larger_than_the_gpu);
    let texts: Vec<&str> = if quick() {
        TEXTS[..1].to_vec()
    } else {
        TEXTS.to_vec()
    };
    let loopback = Loopback::serve(&dir);
    let layers = spec.layers;

    // Everything resident: the reference rate.
    let resident = loopback.engine(
        &gpu,
        Paging {
            budget: VramBudget::Unbounded,
            host_cache_bytes: 0,
            prefetch: 2,
            eviction: Eviction::default(),
        },
    );
    let layer_bytes = resident.layer_bytes();
    let pinned_bytes = resident.pinned_bytes();
    let model_bytes = pinned_bytes + layers as u64 * layer_bytes;
    let resident_time = time_runs(&resident, &texts, repeats).time;
    let resident_rate = texts.len() as f64 / resident_time.as_secs_f64();
    let mb = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;

    println!("adapter: {}", gpu.adapter_name());
    println!(
        "paging, {name} ({layers} layers, hidden {}, {:.0} MB of weights), {} texts, over QUIC on loopback:",
        spec.hidden,
        mb(model_bytes),
        texts.len()
    );
    println!(
        "  fully resident: {resident_rate:>8.3} embeddings/s ({:.0} ms per run)",
        resident_time.as_secs_f64() * 1e3
    );
    println!(
        "  policy    budget (layers, MB)   embeddings/s   of resident   MB uploaded per pass   bound (N-k+d+1 layers)"
    );
    let prefetch = 2;
    let mut rows = Vec::new();
    // Staging that the f32 engines held beside their slots in the adapter's
    // memory, which the f16 budgets below include.
    let mut staging_f32 = 0;
    for eviction in [Eviction::Optimal, Eviction::Lru] {
        for &budget_layers in budgets.iter().filter(|&&b| b <= layers) {
            let engine = loopback.engine(
                &gpu,
                Paging {
                    budget: VramBudget::Layers(budget_layers),
                    // The host cache holds the whole model: the GPU budget alone limits.
                    host_cache_bytes: model_bytes,
                    prefetch,
                    eviction,
                },
            );
            let (steady, beside) = time_runs_beside(&engine, Some(&resident), &texts, repeats);
            let resident_beside =
                texts.len() as f64 / beside.unwrap_or(resident_time).as_secs_f64();
            let info = engine.cache_info().expect("cache info");
            drop(engine);
            if info.staging_in_vram {
                staging_f32 = info.staging_limit_bytes;
            }
            let budget_bytes = pinned_bytes + budget_layers as u64 * layer_bytes;
            let rate = texts.len() as f64 / steady.time.as_secs_f64();
            // What optimal eviction promises: N - k + d + 1 layers a pass, none
            // when the whole model fits.
            let bound_layers = if budget_layers >= layers {
                0
            } else {
                (layers - budget_layers + prefetch.min(budget_layers - 1) + 1).min(layers)
            };
            let bound_mb = mb(bound_layers as u64 * layer_bytes);
            println!(
                "  {:<8}  {budget_layers:>3} {:>10.0}        {rate:>8.3}        {:>6.3}       {:>8.0} ({:>4.1} layers)   {bound_mb:>6.0}",
                eviction.name(),
                mb(budget_bytes),
                rate / resident_beside,
                mb(steady.uploaded_per_pass as u64),
                steady.uploads_per_pass,
            );
            rows.push(serde_json::json!({
                "eviction": eviction.name(),
                "dtype": "f32",
                "budget_layers": budget_layers,
                "budget_mb": mb(budget_bytes),
                "per_s": rate,
                "resident_beside_per_s": resident_beside,
                "ratio_to_resident": rate / resident_beside,
                "uploads_per_pass": steady.uploads_per_pass,
                "uploaded_mb_per_pass": mb(steady.uploaded_per_pass as u64),
                "bound_mb_per_pass": bound_mb,
                "uploaded_mb_per_run": mb(steady.uploaded),
                "staging_mb": mb(info.staging_bytes),
            }));
        }
    }

    // f16 weights under the same MiB as each f32 budget (its staging
    // included where staging shares the adapter's memory): half the bytes a
    // layer, so about twice the layers fit.
    let loopback_f16 = Loopback::serve_as(&dir, WeightDtype::F16);
    let resident_f16 = loopback_f16.engine(
        &gpu,
        Paging {
            budget: VramBudget::Unbounded,
            host_cache_bytes: 0,
            prefetch: 2,
            eviction: Eviction::default(),
        },
    );
    let layer_bytes_f16 = resident_f16.layer_bytes();
    let model_bytes_f16 = resident_f16.pinned_bytes() + layers as u64 * layer_bytes_f16;
    let resident_f16_rate =
        texts.len() as f64 / time_runs(&resident_f16, &texts, repeats).time.as_secs_f64();
    drop(resident_f16);
    println!(
        "  f16 weights ({:.0} MB), fully resident: {resident_f16_rate:>8.3} embeddings/s",
        mb(model_bytes_f16)
    );
    for (eviction, &budget_layers) in
        [Eviction::Optimal, Eviction::Lru]
            .into_iter()
            .flat_map(|eviction| {
                budgets
                    .iter()
                    .filter(|&&b| b < layers)
                    .map(move |b| (eviction, b))
            })
    {
        let budget_bytes = pinned_bytes + budget_layers as u64 * layer_bytes;
        let engine = loopback_f16.engine(
            &gpu,
            Paging {
                budget: VramBudget::Bytes(budget_bytes + staging_f32),
                host_cache_bytes: model_bytes_f16,
                prefetch,
                eviction,
            },
        );
        let (steady, beside) = time_runs_beside(&engine, Some(&resident), &texts, repeats);
        let resident_beside = texts.len() as f64 / beside.unwrap_or(resident_time).as_secs_f64();
        let info = engine.cache_info().expect("cache info");
        drop(engine);
        let rate = texts.len() as f64 / steady.time.as_secs_f64();
        let slots = info.layer_slots;
        let bound_layers = if slots >= layers {
            0
        } else {
            (layers - slots + prefetch.min(slots.saturating_sub(1)) + 1).min(layers)
        };
        println!(
            "  f16 {:<6}{slots:>3} {:>10.0}        {rate:>8.3}        {:>6.3}       {:>8.0} ({:>4.1} layers)   {:>6.0}",
            eviction.name(),
            mb(budget_bytes),
            rate / resident_beside,
            mb(steady.uploaded_per_pass as u64),
            steady.uploads_per_pass,
            mb(bound_layers as u64 * layer_bytes_f16),
        );
        rows.push(serde_json::json!({
            "eviction": eviction.name(),
            "dtype": "f16",
            "budget_layers": slots,
            "budget_mb": mb(budget_bytes),
            "per_s": rate,
            "resident_beside_per_s": resident_beside,
            "ratio_to_resident": rate / resident_beside,
            "ratio_to_f16_resident": rate / resident_f16_rate,
            "uploads_per_pass": steady.uploads_per_pass,
            "uploaded_mb_per_pass": mb(steady.uploaded_per_pass as u64),
            "bound_mb_per_pass": mb(bound_layers as u64 * layer_bytes_f16),
            "uploaded_mb_per_run": mb(steady.uploaded),
            "staging_mb": mb(info.staging_bytes),
        }));
    }
    drop(loopback_f16);
    drop(resident);

    // Cold: a small budget and no host cache, so every layer crosses the
    // network on every pass, with prefetch running ahead of compute.
    let cold_layers = 2.min(layers);
    let cold = loopback.engine(
        &gpu,
        Paging {
            budget: VramBudget::Layers(cold_layers),
            host_cache_bytes: 0,
            prefetch: 2,
            eviction: Eviction::default(),
        },
    );
    let cold_run = time_runs(&cold, &texts, repeats);
    let cold_time = cold_run.time;
    println!(
        "  streamed from the server on every pass ({cold_layers}-layer budget, no host cache): \
         {:.0} ms per run, {:.0} MB fetched per run",
        cold_time.as_secs_f64() * 1e3,
        mb(cold_run.fetched)
    );

    drop(cold);
    drop(loopback);

    write_json(
        "paging",
        &serde_json::json!({
            "larger_than_the_gpu": larger_than_the_gpu,
            "adapter": gpu.adapter_name(),
            "software_adapter": gpu.is_software(),
            "quick": quick(),
            "model": {
                "name": name,
                "layers": layers,
                "hidden": spec.hidden,
                "weights_mb": mb(model_bytes),
                "layer_mb": mb(layer_bytes),
                "pinned_mb": mb(pinned_bytes),
            },
            "texts": texts.len(),
            "resident_per_s": resident_rate,
            "resident_f16_per_s": resident_f16_rate,
            "layer_mb_f16": mb(layer_bytes_f16),
            "budgets": rows,
            "streamed_every_pass": {
                "budget_layers": cold_layers,
                "ms_per_run": cold_time.as_secs_f64() * 1e3,
                "fetched_mb_per_run": mb(cold_run.fetched),
            },
        }),
    );
}

/// Bytes of one decoder layer of `spec` in f16: the query, key, value and
/// output projections, the gated feed-forward and the two norms.
fn f16_layer_bytes(spec: &SynthSpec) -> u64 {
    let head_dim = spec.head_dim.unwrap_or(spec.hidden / spec.heads);
    let (hidden, queries) = (spec.hidden, spec.heads * head_dim);
    let keys = spec.kv_heads * head_dim;
    let params = hidden * (queries + 2 * keys)
        + queries * hidden
        + 3 * hidden * spec.intermediate
        + 2 * hidden;
    2 * params as u64
}

/// A model several times larger than the VRAM budget and the host cache,
/// streamed by a client in its own process: texts/s, bytes fetched and
/// uploaded a pass, and peak RSS next to the bound. Quick runs stream the
/// tiny model of this run under budgets smaller than it; full runs the
/// Qwen3-Embedding-4B shape in f16 (about 8 GB) under 1 GiB of each, or,
/// where one of its layers is over the adapter's binding limit (wgpu's
/// default 128 MiB, llvmpipe's), TinyLlama-1.1B in f16 (2.2 GB) under 512 MiB
/// of each.
fn streamed_larger_than_the_flags(
    gpu: &surf_engine::gpu::Gpu,
    tiny: &std::path::Path,
    tiny_spec: &SynthSpec,
) -> serde_json::Value {
    let mut spec = SynthSpec::preset(SynthPreset::Qwen3_4B);
    spec.dtype = safetensors::Dtype::F16;
    let binding = gpu.limits.max_storage_buffer_binding_size;
    let (dir, name, vram_budget_mb, host_cache_mb, passes) = if quick() {
        spec = tiny_spec.clone();
        (tiny.to_path_buf(), "tiny-4x128", 2, 1, 2)
    } else if f16_layer_bytes(&spec) > binding {
        // A layer of the 4B shape (202 MB in f16) is one binding, over the
        // 128 MiB that wgpu's default limits and software adapters allow:
        // TinyLlama-1.1B's (88 MB) stands in, under budgets a quarter of
        // its 2.2 GB.
        println!(
            "  larger than the GPU: a Qwen3-4B layer of {} MB is over this adapter's {} MB \
             binding; TinyLlama-1.1B in f16 instead",
            f16_layer_bytes(&spec) >> 20,
            binding >> 20
        );
        spec = SynthSpec::preset(SynthPreset::TinyLlama);
        spec.dtype = safetensors::Dtype::F16;
        (model(&spec, "tinyllama-f16"), "tinyllama-f16", 512, 512, 3)
    } else if runs_family(&spec) {
        (model(&spec, "qwen3-4b-f16"), "qwen3-4b-f16", 1024, 1024, 3)
    } else {
        println!("  larger than the GPU: skipped, this build has no qwen3 family");
        return serde_json::Value::Null;
    };
    let run = large::ClientRun {
        server: ([127, 0, 0, 1], 0).into(),
        certificate: String::new(),
        dtype: "f16".into(),
        vram_budget_mb,
        host_cache_mb,
        prefetch: 2,
        passes,
        texts: TEXTS.iter().map(|t| (*t).to_string()).collect(),
    };
    let (prefetch, texts) = (run.prefetch, run.texts.len());
    let bound_run = large::ClientRun {
        server: run.server,
        certificate: String::new(),
        dtype: run.dtype.clone(),
        texts: Vec::new(),
        ..run
    };
    large::warm_kernel_choices(gpu, &spec, WeightDtype::F16);
    let out = large::streamed_in_child(&dir, WeightDtype::F16, run);
    let number = |key: &str| out[key].as_f64().unwrap_or(0.0);
    let layer_bytes = number("layer_bytes") as u64;
    let vram_on_host = out["staging_in_vram"] == true;
    let bound = large::rss_bound(&bound_run, layer_bytes, vram_on_host);
    let model_bytes = std::fs::metadata(dir.join("model.safetensors")).map_or(0, |m| m.len());
    let mb = |bytes: f64| bytes / (1u64 << 20) as f64;
    let peak = number("peak_rss_bytes");
    println!(
        "  larger than the GPU: {name} ({:.0} MB on disk, f16) streamed under --vram-budget-mb \
         {vram_budget_mb} --host-cache-mb {host_cache_mb} --prefetch {prefetch}, {texts} texts:",
        mb(model_bytes as f64)
    );
    println!(
        "    {:.3} texts/s, first run {:.1} s, {:.0} MB fetched and {:.0} MB uploaded a pass, \
         peak RSS {:.0} MB, bound {:.0} MB{}",
        number("texts_per_s"),
        number("first_run_s"),
        mb(number("fetched_per_pass")),
        mb(number("uploaded_per_pass")),
        mb(peak),
        mb(bound as f64),
        if vram_on_host {
            " (the VRAM budget included: this adapter's memory is the host's)"
        } else {
            ""
        }
    );
    serde_json::json!({
        "model": name,
        "model_mb": mb(model_bytes as f64),
        "vram_budget_mb": vram_budget_mb,
        "host_cache_mb": host_cache_mb,
        "prefetch": prefetch,
        "texts": texts,
        "texts_per_s": number("texts_per_s"),
        "first_run_s": number("first_run_s"),
        "fetched_mb_per_pass": mb(number("fetched_per_pass")),
        "uploaded_mb_per_pass": mb(number("uploaded_per_pass")),
        "peak_rss_mb": mb(peak),
        "rss_bound_mb": mb(bound as f64),
        "vram_on_host": vram_on_host,
        "layer_slots": out["layer_slots"],
    })
}
