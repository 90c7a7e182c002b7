//! f16 weights end to end: converted once by the weight server or by the
//! engine from a local checkpoint, held in GPU memory two to a word, computed
//! in f32. The vectors stay within cosine 0.9995 of the references, and every
//! byte count that weights drive is half of f32's.

use std::sync::Arc;

use surf_engine::{Embedding, Engine, RemoteSource, VramBudget, WeightDtype};
use surf_server::{RunningServer, ServerConfig, WeightServer};
use surf_tests::{assert_matches_golden_within, dev_sentences, load_golden, minilm_dir};
use surf_transport::{ClientConfig, WeightClient};

const F16_COSINE: f64 = 0.9995;

/// Checks one batch of every dev sentence, then each sentence alone, against
/// both references.
fn assert_golden_in_one_batch_and_one_at_a_time(engine: &Engine, what: &str) {
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let batch = engine.embed(&texts).expect("inference succeeds");
    let alone: Vec<Embedding> = texts
        .iter()
        .map(|text| {
            engine
                .embed(&[*text])
                .expect("inference succeeds")
                .remove(0)
        })
        .collect();
    for (mode, out) in [("one batch", batch), ("one at a time", alone)] {
        let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
        let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
        for reference in ["minilm-dev.candle.json", "minilm-dev.numpy.json"] {
            let golden = load_golden(reference);
            let worst = assert_matches_golden_within(&golden, &ids, &vectors, F16_COSINE);
            eprintln!("{what}, {mode}, vs {reference}: lowest cosine {worst:.7}");
        }
    }
}

#[test]
fn f16_weights_from_a_local_checkpoint_match_the_references() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let engine = Engine::builder()
        .model_dir(minilm_dir())
        .gpu(gpu)
        .weight_dtype(WeightDtype::F16)
        .build()
        .expect("the default model loads as f16");
    assert_eq!(engine.weight_dtype(), WeightDtype::F16);
    assert_golden_in_one_batch_and_one_at_a_time(&engine, "local f16");
}

struct Served {
    runtime: tokio::runtime::Runtime,
    server: Option<RunningServer>,
}

impl Served {
    fn start(dtype: WeightDtype) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime
            .block_on(WeightServer::bind(ServerConfig {
                weight_dtype: dtype.wire(),
                ..ServerConfig::new(minilm_dir(), ([127, 0, 0, 1], 0).into())
            }))
            .expect("server starts");
        Self {
            runtime,
            server: Some(server),
        }
    }

    /// An engine streaming `dtype` weights with room for 2 of the 6 layers
    /// and no host cache, so that every pass fetches again.
    fn engine(&self, gpu: &surf_engine::Gpu, dtype: WeightDtype, budget: VramBudget) -> Engine {
        let server = self.server.as_ref().expect("running");
        let config = ClientConfig {
            weight_dtype: dtype.wire(),
            ..ClientConfig::new(
                vec![server.local_addr()],
                vec![server.certificate_der().clone()],
            )
        };
        let client = self
            .runtime
            .block_on(WeightClient::connect(config))
            .expect("client connects");
        Engine::builder()
            .source(Arc::new(RemoteSource::new(
                client,
                self.runtime.handle().clone(),
            )))
            .gpu(gpu.clone())
            .vram_budget(budget)
            .host_cache_bytes(0)
            .prefetch(2)
            .weight_dtype(dtype)
            .build()
            .expect("engine starts from the server")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}

#[test]
fn f16_weights_streamed_match_the_references_with_half_the_bytes() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let f32_server = Served::start(WeightDtype::F32);
    let f16_server = Served::start(WeightDtype::F16);
    let f32_engine = f32_server.engine(&gpu, WeightDtype::F32, VramBudget::Layers(2));
    let f16_engine = f16_server.engine(&gpu, WeightDtype::F16, VramBudget::Layers(2));

    // One cold run each, on the same texts: start-up (the pinned embeddings)
    // and one pass through all six layers.
    let texts = ["half the bytes", "the same vectors, nearly"];
    for engine in [&f32_engine, &f16_engine] {
        engine.clear_cache().expect("cleared");
        engine.embed(&texts).expect("a cold run");
    }
    let f32_stats = f32_engine.inference_stats().expect("stats");
    let f16_stats = f16_engine.inference_stats().expect("stats");
    assert!(f32_stats.bytes_fetched > 0 && f32_stats.bytes_uploaded > 0);
    assert_eq!(
        2 * f16_stats.bytes_fetched,
        f32_stats.bytes_fetched,
        "f16 fetches half of f32's bytes"
    );
    assert_eq!(
        2 * f16_stats.bytes_uploaded,
        f32_stats.bytes_uploaded,
        "f16 uploads half of f32's bytes"
    );
    let f32_info = f32_engine.cache_info().expect("cache info");
    let f16_info = f16_engine.cache_info().expect("cache info");
    assert_eq!(f16_info.weight_dtype, "f16");
    assert_eq!(2 * f16_info.layer_bytes, f32_info.layer_bytes);
    assert_eq!(2 * f16_info.pinned_bytes, f32_info.pinned_bytes);
    eprintln!(
        "cold run: f32 fetched {} uploaded {}, f16 fetched {} uploaded {}; layer {} vs {} bytes",
        f32_stats.bytes_fetched,
        f32_stats.bytes_uploaded,
        f16_stats.bytes_fetched,
        f16_stats.bytes_uploaded,
        f32_info.layer_bytes,
        f16_info.layer_bytes
    );
    drop(f32_engine);

    assert_golden_in_one_batch_and_one_at_a_time(&f16_engine, "streamed f16, 2-layer budget");
}

#[test]
fn the_same_mib_budget_holds_twice_the_f16_layers() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let open = |dtype, budget| {
        Engine::builder()
            .model_dir(minilm_dir())
            .gpu(gpu.clone())
            .weight_dtype(dtype)
            .vram_budget(budget)
            .prefetch(1)
            .build()
    };
    let probe = open(WeightDtype::F32, VramBudget::Layers(1)).expect("engine starts");
    let info = probe.cache_info().expect("cache info");
    let staging = if info.staging_in_vram {
        info.staging_limit_bytes
    } else {
        0
    };
    let budget = info.pinned_bytes + staging + 2 * info.layer_bytes;
    drop(probe);

    let f32_slots = open(WeightDtype::F32, VramBudget::Bytes(budget))
        .expect("engine starts")
        .cache_info()
        .expect("cache info")
        .layer_slots;
    let f16_slots = open(WeightDtype::F16, VramBudget::Bytes(budget))
        .expect("engine starts")
        .cache_info()
        .expect("cache info")
        .layer_slots;
    assert_eq!(f32_slots, 2);
    assert!(
        f16_slots >= 2 * f32_slots,
        "{} MiB hold {f32_slots} f32 layers but only {f16_slots} f16 ones",
        budget >> 20
    );

    // Too small even for f16: the message gives the dtype's sizes.
    let error = match open(WeightDtype::F16, VramBudget::Bytes(1 << 20)) {
        Ok(_) => panic!("a 1 MiB budget cannot hold the model's pinned weights"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("f16 weights, half of f32's"), "{error}");
    assert!(
        error.contains("the smallest budget that works is"),
        "{error}"
    );
}
