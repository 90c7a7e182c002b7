//! The paging policies on the GPU: MiniLM under every budget smaller than
//! the model, with either eviction policy, gives the golden vectors; optimal
//! eviction keeps layers resident on repeated passes, in GPU memory and in a
//! host cache smaller than the model; what the pager holds stays within its
//! stated bounds.

use std::path::Path;
use std::sync::Arc;

use surf_engine::synth::{SynthSpec, write_model};
use surf_engine::{Engine, Eviction, Gpu, RemoteSource, VramBudget};
use surf_server::{ServerConfig, WeightServer};
use surf_tests::{assert_matches_golden, dev_sentences, load_golden, minilm_dir};
use surf_transport::{ClientConfig, WeightClient};

fn paged_minilm(gpu: &Gpu, layers: usize, prefetch: usize, eviction: Eviction) -> Engine {
    Engine::builder()
        .model_dir(minilm_dir())
        .gpu(gpu.clone())
        // Two batches a call, so each call runs two passes.
        .batch_size(8)
        .vram_budget(VramBudget::Layers(layers))
        .host_cache_bytes(256 << 20)
        .prefetch(prefetch)
        .eviction(eviction)
        .build()
        .expect("MiniLM loads")
}

#[test]
fn minilm_under_every_budget_below_the_model_matches_the_golden_vectors_with_both_policies() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let golden = load_golden("minilm-dev.candle.json");
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    for eviction in [Eviction::Optimal, Eviction::Lru] {
        for layers in 1..=5 {
            let prefetch = (layers - 1).min(2);
            let engine = paged_minilm(&gpu, layers, prefetch, eviction);
            for run in 0..2 {
                let out = engine.embed(&texts).expect("paged inference");
                let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
                let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
                let worst = assert_matches_golden(&golden, &ids, &vectors);
                eprintln!("{eviction}, {layers} of 6 layers, run {run}: lowest cosine {worst:.9}");
            }
            let stats = engine.inference_stats().expect("stats");
            let bound = (6 - layers + prefetch + 1) as u64;
            match eviction {
                Eviction::Optimal => assert!(
                    stats.last_pass_uploads <= bound,
                    "{layers} layers: {} uploads in the last pass, over {bound}",
                    stats.last_pass_uploads
                ),
                Eviction::Lru => assert_eq!(stats.last_pass_uploads, 6),
            }
            let info = engine.cache_info().expect("info");
            assert_eq!(info.eviction, eviction.to_string());
            if let Some(budget) = info.budget_bytes {
                assert!(info.memory_usage_bytes <= budget, "{info:?}");
            }
        }
    }
}

/// MiniLM from a weight server on loopback, no host cache, 4 of its 6
/// layers in GPU memory and prefetch 1: two layers stay resident pass after
/// pass, so at least 0.3 of layer uses need no upload.
#[test]
fn streamed_minilm_with_four_of_six_layers_keeps_a_hit_rate_over_twelve_passes() {
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
    let open = |eviction: Eviction| {
        let config = ClientConfig::new(
            vec![server.local_addr()],
            vec![server.certificate_der().clone()],
        );
        let client = runtime
            .block_on(WeightClient::connect(config))
            .expect("client connects");
        Engine::builder()
            .source(Arc::new(RemoteSource::new(
                client,
                runtime.handle().clone(),
            )))
            .gpu(gpu.clone())
            .vram_budget(VramBudget::Layers(4))
            .host_cache_bytes(0)
            .prefetch(1)
            .eviction(eviction)
            .build()
            .expect("engine starts from the server")
    };
    let golden = load_golden("minilm-dev.candle.json");
    let item = &golden.items[0];
    for (eviction, least, most) in [(Eviction::Optimal, 0.3, 1.0), (Eviction::Lru, 0.0, 0.0)] {
        let engine = open(eviction);
        for _ in 0..12 {
            let out = engine.embed(&[item.text.as_str()]).expect("streamed run");
            let cos = surf_tests::cosine(&out[0].vector, &item.embedding);
            assert!(cos >= 0.9999, "{eviction}: cosine {cos}");
        }
        let stats = engine.inference_stats().expect("stats");
        assert_eq!(stats.passes, 12);
        eprintln!(
            "{eviction}: hit rate {:.3} over 12 passes, {} uploads and {} fetches in all, {} uploads in the last",
            stats.cache_hit_rate, stats.vram_misses, stats.fetches, stats.last_pass_uploads
        );
        assert!(
            stats.cache_hit_rate >= least && stats.cache_hit_rate <= most,
            "{eviction}: hit rate {}",
            stats.cache_hit_rate
        );
        // Without a host cache every upload is a fetch from the server.
        assert_eq!(stats.fetches, stats.vram_misses);
    }
    runtime.block_on(server.shutdown());
}

fn six_layer_model(dir: &Path) {
    let tokenizer = std::fs::read(minilm_dir().join("tokenizer.json")).expect("tokenizer");
    write_model(dir, &SynthSpec::sized(6, 32, 4, 64), &tokenizer).expect("model written");
}

const TEXTS: [&str; 2] = [
    "the host cache keeps what the GPU gives up",
    "a second text",
];

#[test]
fn a_host_cache_smaller_than_the_model_serves_passes_under_optimal_eviction() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    let probe = Engine::builder()
        .model_dir(dir.path())
        .gpu(gpu.clone())
        .build()
        .expect("probe");
    let reference = probe.infer(&TEXTS).expect("runs");
    let layer = probe.layer_bytes();
    let mut fetches_per_pass = Vec::new();
    for eviction in [Eviction::Optimal, Eviction::Lru] {
        let engine = Engine::builder()
            .model_dir(dir.path())
            .gpu(gpu.clone())
            .vram_budget(VramBudget::Layers(1))
            .host_cache_bytes(3 * layer)
            .prefetch(0)
            .eviction(eviction)
            .build()
            .expect("engine");
        engine.infer(&TEXTS).expect("cold pass");
        let before = engine.inference_stats().expect("stats").fetches;
        for _ in 0..4 {
            assert_eq!(engine.infer(&TEXTS).expect("runs"), reference);
            let info = engine.cache_info().expect("info");
            assert!(info.host_cache_bytes <= 3 * layer, "{info:?}");
        }
        let after = engine.inference_stats().expect("stats").fetches;
        fetches_per_pass.push((after - before) as f64 / 4.0);
    }
    // Three of six layers held: optimal fetches at most 6 - 3 + 1 a pass,
    // LRU all six.
    assert!(fetches_per_pass[0] <= 4.0, "{fetches_per_pass:?}");
    assert_eq!(fetches_per_pass[1], 6.0, "{fetches_per_pass:?}");
}

#[test]
fn shrinking_the_budget_keeps_resident_layers_in_the_surviving_slots() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    let engine = Engine::builder()
        .model_dir(dir.path())
        .gpu(gpu.clone())
        .vram_budget(VramBudget::Layers(6))
        .host_cache_bytes(0)
        .prefetch(0)
        .build()
        .expect("engine");
    let reference = engine.infer(&TEXTS).expect("runs");
    let fetches = engine.inference_stats().expect("stats").fetches;
    engine.set_cache_size(3).expect("shrinks");
    let info = engine.cache_info().expect("info");
    // After a pass the next uses are layers 0, 1, 2: those are kept, whatever
    // slots they sat in.
    assert_eq!(
        info.cached_components,
        [
            "embeddings",
            "encoder.layer.0",
            "encoder.layer.1",
            "encoder.layer.2"
        ]
    );
    assert_eq!(engine.infer(&TEXTS).expect("runs"), reference);
    let stats = engine.inference_stats().expect("stats");
    // No host cache: layers 3 to 5 come from the source again, 0 to 2 do not.
    assert_eq!(stats.fetches, fetches + 3);

    // After that pass the slots hold 0, 1, 5 (slot 2 took 3, then 4, then
    // 5). Growing fills slots 3 to 5 with layers 2 to 4. From layer 2 the
    // nearest uses are 3 and 4, which sit in slots 4 and 5: shrinking to two
    // slots copies them into slots 0 and 1.
    engine.set_cache_size(6).expect("grows");
    engine.infer(&TEXTS).expect("fills every slot");
    engine.warmup(&[2]).expect("moves the cursor to layer 2");
    let fetches = engine.inference_stats().expect("stats").fetches;
    engine.set_cache_size(2).expect("shrinks");
    let info = engine.cache_info().expect("info");
    assert_eq!(
        info.cached_components,
        ["embeddings", "encoder.layer.3", "encoder.layer.4"]
    );
    // The moved bytes are the layers': the vectors do not change. Layer 3
    // is used from its new slot; layer 4 is given up for layer 0, whose use
    // comes first, so the pass fetches five layers, not six.
    assert_eq!(engine.infer(&TEXTS).expect("runs"), reference);
    assert_eq!(
        engine.inference_stats().expect("stats").fetches,
        fetches + 5
    );
}

#[test]
fn host_memory_outside_the_cache_and_staging_stay_within_their_bounds() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    six_layer_model(dir.path());
    for prefetch in [0, 1, 3] {
        let engine = Engine::builder()
            .model_dir(dir.path())
            .gpu(gpu.clone())
            .vram_budget(VramBudget::Layers(prefetch + 1))
            .host_cache_bytes(0)
            .prefetch(prefetch)
            .build()
            .expect("engine");
        let layer = engine.layer_bytes();
        for _ in 0..3 {
            engine.infer(&TEXTS).expect("runs");
            let info = engine.cache_info().expect("info");
            assert_eq!(info.host_cache_bytes, 0);
            assert!(
                info.host_window_bytes <= (prefetch as u64 + 1) * layer,
                "prefetch {prefetch}: {info:?}"
            );
            assert!(info.staging_bytes <= info.staging_limit_bytes, "{info:?}");
            assert_eq!(
                info.staging_limit_bytes,
                prefetch.max(1) as u64 * layer,
                "{info:?}"
            );
            if let Some(budget) = info.budget_bytes {
                assert!(info.memory_usage_bytes <= budget, "{info:?}");
            }
        }
    }
}
