//! Streamed inference: compute-only, fetch-only and cold streamed time in one
//! run (the overlap ratio), and throughput against the VRAM budget with a warm
//! host cache, from a weight server on loopback. Then the cold streamed time
//! and the paged throughput again with f16 weights, served and held as f16.

use std::time::{Duration, Instant};

use criterion::Criterion;
use surf_benches::loopback::{Loopback, Paging};
use surf_benches::{minilm_dir, quick, write_json};
use surf_engine::{Engine, Eviction, VramBudget, WeightDtype};

const SENTENCES: [&str; 8] = [
    "Weights stream from the server while the GPU computes.",
    "A layer is fetched, checked and uploaded into a slot.",
    "The budget decides how many layers stay resident.",
    "Short texts make batches with little padding.",
    "Embeddings are normalised to unit length.",
    "The host cache keeps layers that the GPU evicted.",
    "Prefetching hides the network behind the kernels.",
    "Every byte is checked against its blake3 hash.",
];

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn measure(repeats: usize, mut run: impl FnMut() -> Duration) -> Duration {
    median((0..repeats).map(|_| run()).collect())
}

/// Bytes one cold run of `engine` fetches from the server.
fn fetched_per_cold_run(engine: &Engine, texts: &[&str]) -> u64 {
    engine.clear_cache().expect("cleared");
    let before = engine.inference_stats().expect("stats").bytes_fetched;
    engine.infer(texts).expect("runs");
    engine.inference_stats().expect("stats").bytes_fetched - before
}

fn main() {
    if !minilm_dir().join("model.safetensors").is_file() {
        println!("streaming bench skipped: run `bash assets/fetch-model.sh` first");
        return;
    }
    let Some(gpu) = surf_benches::device("streaming") else {
        return;
    };
    let texts: Vec<&str> = if quick() {
        SENTENCES[..2].to_vec()
    } else {
        SENTENCES.repeat(4)
    };
    let repeats = if quick() { 1 } else { 9 };
    let loopback = Loopback::serve(&minilm_dir());
    let layers: Vec<usize> = (0..6).collect();

    // Compute only: every layer resident.
    let resident = loopback.engine(
        &gpu,
        Paging {
            budget: VramBudget::Unbounded,
            host_cache_bytes: 0,
            prefetch: 2,
            eviction: Eviction::default(),
        },
    );
    // Fetch only: every layer fetched from the server and uploaded, no compute.
    let fetching = loopback.engine(
        &gpu,
        Paging {
            budget: VramBudget::Unbounded,
            host_cache_bytes: 0,
            prefetch: 0,
            eviction: Eviction::default(),
        },
    );
    // Cold streamed: nothing resident, no host cache; prefetch overlaps
    // fetches with compute.
    let cold = loopback.engine(
        &gpu,
        Paging {
            budget: VramBudget::Unbounded,
            host_cache_bytes: 0,
            prefetch: 2,
            eviction: Eviction::default(),
        },
    );
    // One unmeasured run of each, so that the measured runs differ from each
    // other by the weights alone.
    resident.infer(&texts).expect("warm-up run");
    cold.infer(&texts).expect("warm-up run");
    fetching.warmup(&layers).expect("fetched and uploaded");

    // The three are measured in turn, round after round, so that a slow spell
    // of the machine lands on all of them rather than on whichever phase ran
    // during it; each figure is the median of its rounds.
    let mut compute_runs = Vec::new();
    let mut fetch_runs = Vec::new();
    let mut cold_runs = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        resident.infer(&texts).expect("runs");
        compute_runs.push(start.elapsed());

        fetching.clear_cache().expect("cleared");
        let start = Instant::now();
        fetching.warmup(&layers).expect("fetched and uploaded");
        fetch_runs.push(start.elapsed());

        cold.clear_cache().expect("cleared");
        let start = Instant::now();
        cold.infer(&texts).expect("runs");
        cold_runs.push(start.elapsed());
    }
    let compute = median(compute_runs);
    let fetch = median(fetch_runs);
    let streamed = median(cold_runs);
    let ratio = streamed.as_secs_f64() / compute.max(fetch).as_secs_f64();
    // The share of the shorter phase that ran hidden behind the longer one:
    // 1 is perfect overlap, 0 is one after the other.
    let hidden =
        (compute + fetch).saturating_sub(streamed).as_secs_f64() / compute.min(fetch).as_secs_f64();
    println!("adapter: {}", gpu.adapter_name());
    println!(
        "streaming, {} texts, all-MiniLM-L6-v2 over QUIC on loopback:",
        texts.len()
    );
    println!(
        "  compute only (all layers resident): {:>9.1} ms",
        compute.as_secs_f64() * 1e3
    );
    println!(
        "  fetch only (fetch + upload, 6 layers): {:>6.1} ms",
        fetch.as_secs_f64() * 1e3
    );
    println!(
        "  cold streamed:                      {:>9.1} ms",
        streamed.as_secs_f64() * 1e3
    );
    println!(
        "  compute + fetch, one after the other:  {:>6.1} ms",
        (compute + fetch).as_secs_f64() * 1e3
    );
    println!("  overlap ratio: cold / max(compute, fetch) = {ratio:.3} (target <= 1.15)");
    println!(
        "  hidden: {:.0}% of the shorter phase ran under the longer one",
        hidden * 100.0
    );
    if gpu.is_software() {
        println!(
            "  note: this adapter computes on the same {} CPU cores that receive, \
             check and pack the weights, so compute and fetch take turns rather than overlap",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }

    // Throughput against the budget, host cache warm.
    // The budgets run back to back, so the resident rate they are compared
    // with is measured back to back too, not taken from the rounds above.
    let resident_back_to_back = measure(repeats, || {
        let start = Instant::now();
        resident.infer(&texts).expect("runs");
        start.elapsed()
    });
    let resident_rate = texts.len() as f64 / resident_back_to_back.as_secs_f64();
    println!("throughput against the VRAM budget (host cache warm), ratio to fully resident:");
    let mut budget_rows = Vec::new();
    let mut paged_engines = Vec::new();
    for budget_layers in [1usize, 2, 3, 6] {
        let paged = loopback.engine(
            &gpu,
            Paging {
                budget: VramBudget::Layers(budget_layers),
                host_cache_bytes: 512 << 20,
                prefetch: 2,
                eviction: Eviction::default(),
            },
        );
        paged.infer(&texts).expect("fills the host cache");
        let time = measure(repeats, || {
            let start = Instant::now();
            paged.infer(&texts).expect("runs");
            start.elapsed()
        });
        let rate = texts.len() as f64 / time.as_secs_f64();
        println!(
            "  {budget_layers} of 6 layers: {rate:>8.1} embeddings/s  ({:.3} of resident)",
            rate / resident_rate
        );
        budget_rows.push(serde_json::json!({
            "budget_layers": budget_layers,
            "per_s": rate,
            "ratio_to_resident": rate / resident_rate,
        }));
        paged_engines.push((budget_layers, paged));
    }
    let cold_fetched = fetched_per_cold_run(&cold, &texts);

    // f16 weights: the same runs against a server that sends f16.
    let loopback_f16 = Loopback::serve_as(&minilm_dir(), WeightDtype::F16);
    let paging = |budget, host_cache_bytes| Paging {
        budget,
        host_cache_bytes,
        prefetch: 2,
        eviction: Eviction::default(),
    };
    let resident_f16 = loopback_f16.engine(&gpu, paging(VramBudget::Unbounded, 0));
    let cold_f16 = loopback_f16.engine(&gpu, paging(VramBudget::Unbounded, 0));
    resident_f16.infer(&texts).expect("warm-up run");
    cold_f16.infer(&texts).expect("warm-up run");
    let mut resident_f16_runs = Vec::new();
    let mut cold_f16_runs = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        resident_f16.infer(&texts).expect("runs");
        resident_f16_runs.push(start.elapsed());
        cold_f16.clear_cache().expect("cleared");
        let start = Instant::now();
        cold_f16.infer(&texts).expect("runs");
        cold_f16_runs.push(start.elapsed());
    }
    let compute_f16 = median(resident_f16_runs);
    let streamed_f16 = median(cold_f16_runs);
    let cold_fetched_f16 = fetched_per_cold_run(&cold_f16, &texts);
    let resident_f16_rate = texts.len() as f64 / compute_f16.as_secs_f64();
    println!("f16 weights over the same loopback:");
    println!(
        "  compute only {:.1} ms, cold streamed {:.1} ms (f32: {:.1} ms); \
         fetched per cold run {:.1} MB (f32: {:.1} MB, ratio {:.3})",
        compute_f16.as_secs_f64() * 1e3,
        streamed_f16.as_secs_f64() * 1e3,
        streamed.as_secs_f64() * 1e3,
        cold_fetched_f16 as f64 / 1e6,
        cold_fetched as f64 / 1e6,
        cold_fetched_f16 as f64 / cold_fetched as f64
    );
    let mut budget_rows_f16 = Vec::new();
    for budget_layers in [1usize, 2, 3, 6] {
        let paged = loopback_f16.engine(&gpu, paging(VramBudget::Layers(budget_layers), 512 << 20));
        paged.infer(&texts).expect("fills the host cache");
        let time = measure(repeats, || {
            let start = Instant::now();
            paged.infer(&texts).expect("runs");
            start.elapsed()
        });
        let rate = texts.len() as f64 / time.as_secs_f64();
        println!(
            "  f16, {budget_layers} of 6 layers: {rate:>8.1} embeddings/s  ({:.3} of f32 resident, {:.3} of f16 resident)",
            rate / resident_rate,
            rate / resident_f16_rate
        );
        budget_rows_f16.push(serde_json::json!({
            "budget_layers": budget_layers,
            "per_s": rate,
            "ratio_to_resident": rate / resident_rate,
            "ratio_to_f16_resident": rate / resident_f16_rate,
        }));
    }
    drop((resident_f16, cold_f16));
    drop(loopback_f16);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    write_json(
        "streaming",
        &serde_json::json!({
            "adapter": gpu.adapter_name(),
            "software_adapter": gpu.is_software(),
            "cpu_cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "quick": quick(),
            "texts": texts.len(),
            "compute_ms": ms(compute),
            "fetch_ms": ms(fetch),
            "cold_ms": ms(streamed),
            "overlap_ratio": ratio,
            "hidden_share": hidden,
            "budgets": budget_rows,
            "cold_fetched_mb": cold_fetched as f64 / 1e6,
            "f16": {
                "compute_ms": ms(compute_f16),
                "cold_ms": ms(streamed_f16),
                "cold_fetched_mb": cold_fetched_f16 as f64 / 1e6,
                "fetched_ratio_to_f32": cold_fetched_f16 as f64 / cold_fetched as f64,
            },
            "budgets_f16": budget_rows_f16,
        }),
    );

    // The same measurements under criterion, for its statistics.
    let mut criterion = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(if quick() { 1 } else { 5 }))
        .warm_up_time(Duration::from_millis(if quick() { 100 } else { 500 }))
        .configure_from_args();
    criterion.bench_function("streaming/resident", |b| {
        b.iter(|| resident.infer(&texts).expect("runs"))
    });
    criterion.bench_function("streaming/cold", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                cold.clear_cache().expect("cleared");
                let start = Instant::now();
                cold.infer(&texts).expect("runs");
                total += start.elapsed();
            }
            total
        })
    });
    for (budget_layers, paged) in &paged_engines {
        criterion.bench_function(
            &format!("streaming/paged_{budget_layers}_of_6_layers"),
            |b| b.iter(|| paged.infer(&texts).expect("runs")),
        );
    }
    criterion.final_summary();
}
