//! Streamed inference: layers paged into GPU memory under a budget, from a
//! model folder or a weight server on loopback.

use std::path::Path;
use std::sync::Arc;

use surf_engine::synth::{SynthSpec, write_model};
use surf_engine::{Engine, Eviction, RemoteSource, VramBudget};
use surf_server::{ServerConfig, WeightServer};
use surf_tests::{assert_matches_golden, dev_sentences, load_golden, minilm_dir};
use surf_transport::{ClientConfig, WeightClient};

const TEXTS: [&str; 4] = [
    "paging layers through a small budget",
    "",
    "the same vectors whatever the budget",
    "a fourth and somewhat longer text, so that the batch has padding in it",
];

fn six_layer_model(dir: &Path) {
    let tokenizer = std::fs::read(minilm_dir().join("tokenizer.json")).expect("tokenizer");
    write_model(dir, &SynthSpec::sized(6, 32, 4, 64), &tokenizer).expect("model written");
}

fn engine(
    dir: &Path,
    gpu: &surf_engine::Gpu,
    budget: VramBudget,
    host_mb: u64,
    prefetch: usize,
) -> Engine {
    engine_with(dir, gpu, budget, host_mb, prefetch, Eviction::default())
}

fn engine_with(
    dir: &Path,
    gpu: &surf_engine::Gpu,
    budget: VramBudget,
    host_mb: u64,
    prefetch: usize,
    eviction: Eviction,
) -> Engine {
    Engine::builder()
        .model_dir(dir)
        .gpu(gpu.clone())
        .vram_budget(budget)
        .host_cache_bytes(host_mb << 20)
        .prefetch(prefetch)
        .eviction(eviction)
        .build()
        .expect("engine starts")
}

/// Upload staging that shares the budget on this adapter, at `prefetch`.
fn staging_in_budget(engine: &Engine) -> u64 {
    let info = engine.cache_info().expect("cache info");
    if info.staging_in_vram {
        info.staging_limit_bytes
    } else {
        0
    }
}

fn assert_within_budget(engine: &Engine) {
    let info = engine.cache_info().expect("cache info");
    if let Some(budget) = info.budget_bytes {
        assert!(
            info.memory_usage_bytes <= budget,
            "{} bytes held over a budget of {budget}",
            info.memory_usage_bytes
        );
    }
}

#[test]
fn every_budget_gives_the_vectors_of_the_fully_resident_model() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    let reference = engine(dir.path(), &gpu, VramBudget::Unbounded, 0, 0)
        .infer(&TEXTS)
        .expect("runs");
    for (budget, prefetch) in [
        (VramBudget::Layers(1), 0),
        (VramBudget::Layers(2), 0),
        (VramBudget::Layers(2), 2),
        (VramBudget::Layers(3), 4),
        (VramBudget::Layers(6), 1),
    ] {
        let paged = engine(dir.path(), &gpu, budget, 0, prefetch);
        for _ in 0..2 {
            let out = paged.infer(&TEXTS).expect("runs");
            assert_eq!(out, reference, "{budget:?} with prefetch {prefetch}");
            assert_within_budget(&paged);
        }
    }
}

#[test]
fn the_budget_is_never_exceeded() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    let probe = engine(dir.path(), &gpu, VramBudget::Layers(1), 0, 2);
    let pinned = probe.pinned_bytes();
    let layer = probe.layer_bytes();
    // On an adapter whose memory is the host's, the staging chunks count too.
    let staging = staging_in_budget(&probe);
    // Budgets in bytes that fall between whole layers, too.
    for budget in [
        pinned + staging + layer,
        pinned + staging + 2 * layer + layer / 2,
        pinned + staging + 4 * layer - 1,
        pinned + staging + 10 * layer,
    ] {
        let paged = engine(dir.path(), &gpu, VramBudget::Bytes(budget), 64, 2);
        for _ in 0..3 {
            paged.infer(&TEXTS).expect("runs");
            let info = paged.cache_info().expect("cache info");
            assert!(
                info.memory_usage_bytes <= budget,
                "{} > {budget}",
                info.memory_usage_bytes
            );
            assert_eq!(
                info.layer_slots as u64,
                ((budget - pinned - staging) / layer).min(6)
            );
            assert!(info.staging_bytes <= info.staging_limit_bytes);
        }
    }
}

#[test]
fn a_budget_too_small_for_one_layer_names_the_smallest_that_works() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    // The builder's default prefetch depth, as the refused engine below has.
    let probe = engine(dir.path(), &gpu, VramBudget::Layers(1), 0, 2);
    let smallest_mb =
        (probe.pinned_bytes() + probe.layer_bytes() + staging_in_budget(&probe)).div_ceil(1 << 20);
    let error = Engine::builder()
        .model_dir(dir.path())
        .gpu(gpu.clone())
        .vram_budget(VramBudget::Bytes(probe.pinned_bytes()))
        .build()
        .err()
        .expect("a budget without room for a layer is refused");
    assert!(error.is_bad_input());
    assert!(
        error
            .to_string()
            .contains(&format!("smallest budget that works is {smallest_mb} MB")),
        "{error}"
    );
    assert!(probe.set_cache_size(0).is_err());
}

#[test]
fn sequential_passes_evict_as_lru_predicts() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    let paged = engine_with(
        dir.path(),
        &gpu,
        VramBudget::Layers(2),
        64,
        0,
        Eviction::Lru,
    );
    paged.infer(&TEXTS).expect("runs");
    let first = paged.inference_stats().expect("stats");
    // Six loads into two slots: four evictions; every layer crosses from the source once.
    assert_eq!((first.evictions, first.fetches), (4, 6));
    paged.infer(&TEXTS).expect("runs");
    let second = paged.inference_stats().expect("stats");
    // A cyclic pass larger than an LRU cache misses every layer again, but the
    // host cache serves them: no new fetch.
    assert_eq!((second.evictions, second.fetches), (10, 6));
    assert_eq!(second.cache_hit_rate, 0.0);
    assert!(
        (second.host_cache_hit_rate - 0.5).abs() < 1e-12,
        "{}",
        second.host_cache_hit_rate
    );
    assert_eq!(second.total_inferences, 2);
    assert_eq!(second.last_pass_uploads, 6);
}

#[test]
fn sequential_passes_keep_layers_resident_under_optimal_eviction() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    let paged = engine(dir.path(), &gpu, VramBudget::Layers(3), 64, 0);
    for _ in 0..4 {
        paged.infer(&TEXTS).expect("runs");
    }
    let stats = paged.inference_stats().expect("stats");
    // Three slots and no prefetch: at most 6 - 3 + 0 + 1 uploads a pass,
    // where LRU uploads all six.
    assert!(stats.last_pass_uploads <= 4, "{stats:?}");
    assert!(stats.cache_hit_rate > 0.3, "{stats:?}");
    assert_eq!(stats.passes, 4);
    assert_eq!(
        stats.last_pass_bytes_uploaded,
        stats.last_pass_uploads * paged.layer_bytes()
    );
    assert_eq!(stats.fetches, 6, "the host cache serves every later upload");
}

#[test]
fn a_budget_for_the_whole_model_fetches_each_layer_once() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    let resident = engine(dir.path(), &gpu, VramBudget::Layers(6), 0, 2);
    for _ in 0..3 {
        resident.infer(&TEXTS).expect("runs");
    }
    let stats = resident.inference_stats().expect("stats");
    assert_eq!(stats.fetches, 6);
    assert_eq!(stats.evictions, 0);
    assert_eq!(
        stats.bytes_uploaded,
        resident.pinned_bytes() + 6 * resident.layer_bytes()
    );
    assert!(
        (stats.cache_hit_rate - 12.0 / 18.0).abs() < 1e-12,
        "{}",
        stats.cache_hit_rate
    );
}

#[test]
fn the_budget_changes_at_run_time_and_clear_cache_empties_it() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    let paged = engine(dir.path(), &gpu, VramBudget::Layers(2), 64, 0);
    let reference = paged.infer(&TEXTS).expect("runs");
    let pinned = paged.pinned_bytes();
    let layer = paged.layer_bytes();
    // Staging shares the budget where the adapter's memory is the host's.
    let staging_held = || {
        let info = paged.cache_info().expect("info");
        if info.staging_in_vram {
            info.staging_bytes
        } else {
            0
        }
    };

    paged.set_cache_size(6).expect("grows");
    paged.infer(&TEXTS).expect("runs");
    let evictions = paged.inference_stats().expect("stats").evictions;
    assert_eq!(paged.infer(&TEXTS).expect("runs"), reference);
    assert_eq!(
        paged.inference_stats().expect("stats").evictions,
        evictions,
        "a full budget evicts nothing"
    );
    assert_eq!(
        paged.cache_info().expect("info").memory_usage_bytes,
        pinned + 6 * layer + staging_held()
    );

    paged.set_cache_size(1).expect("shrinks");
    let info = paged.cache_info().expect("info");
    assert!(
        info.memory_usage_bytes <= pinned + layer + staging_held(),
        "shrinking frees slots"
    );
    assert_eq!(info.cached_components.len(), 2, "the kept layer stays");
    assert_eq!(paged.infer(&TEXTS).expect("runs"), reference);

    paged
        .set_vram_budget((pinned + 4 * layer).div_ceil(1 << 20) + 1)
        .expect("budget in MiB");
    assert_eq!(paged.infer(&TEXTS).expect("runs"), reference);
    assert_within_budget(&paged);

    paged.clear_cache().expect("cleared");
    let info = paged.cache_info().expect("info");
    assert_eq!(info.cached_components, vec!["embeddings".to_string()]);
    assert_eq!(info.memory_usage_bytes, pinned);
    assert_eq!(info.host_cache_bytes, 0);
    let fetches = paged.inference_stats().expect("stats").fetches;
    assert_eq!(paged.infer(&TEXTS).expect("runs"), reference);
    assert_eq!(
        paged.inference_stats().expect("stats").fetches,
        fetches + 6,
        "cleared layers are fetched again"
    );
}

#[test]
fn warmup_loads_layers_before_the_first_request() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    let paged = engine(dir.path(), &gpu, VramBudget::Layers(3), 0, 0);
    paged.warmup(&[0, 1, 2]).expect("warms up");
    let info = paged.cache_info().expect("info");
    assert_eq!(
        info.cached_components,
        [
            "embeddings",
            "encoder.layer.0",
            "encoder.layer.1",
            "encoder.layer.2"
        ]
    );
    assert_eq!(paged.inference_stats().expect("stats").fetches, 3);
    assert!(
        paged.warmup(&[6]).is_err(),
        "a layer past the model is refused"
    );
}

/// The acceptance test of streaming: MiniLM from a weight server on loopback,
/// with room for 2 of its 6 layers, reproduces the reference vectors on the
/// first run and on repeated ones.
#[test]
fn minilm_streamed_through_a_two_layer_budget_matches_the_references() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime
        .block_on(WeightServer::bind(ServerConfig::new(
            minilm_dir(),
            ([127, 0, 0, 1], 0).into(),
        )))
        .expect("server starts");
    let config = ClientConfig::new(
        vec![server.local_addr()],
        vec![server.certificate_der().clone()],
    );
    let client = runtime
        .block_on(WeightClient::connect(config))
        .expect("client connects");
    let source = RemoteSource::new(client, runtime.handle().clone());
    let engine = Engine::builder()
        .source(Arc::new(source))
        .gpu(gpu)
        .vram_budget(VramBudget::Layers(2))
        .host_cache_bytes(0)
        .prefetch(2)
        .build()
        .expect("engine starts from the server");

    let golden = load_golden("minilm-dev.candle.json");
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    for run in 0..2 {
        let out = engine.embed(&texts).expect("streamed inference");
        let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
        let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
        let worst = assert_matches_golden(&golden, &ids, &vectors);
        eprintln!("run {run}: lowest cosine {worst:.9}");
        assert_within_budget(&engine);
    }
    let stats = engine.inference_stats().expect("stats");
    assert!(stats.evictions > 0, "the budget forced evictions");
    assert!(
        stats.fetches >= 12,
        "without a host cache every pass fetches again"
    );
    runtime.block_on(server.shutdown());
}
