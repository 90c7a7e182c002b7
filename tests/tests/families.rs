//! Every family against sentence-transformers' outputs: the fixtures of
//! `shared/fixtures` (XLM-RoBERTa, MPNet, a T5 encoder with a Dense module,
//! ModernBERT, the decoders Qwen3 and LLaMA with grouped-query heads of 64
//! and 128, GPT-2), the project's own `tests/fixtures` (Mistral with heads
//! of 256 and a sliding window, Qwen2 with query/key/value biases) and
//! all-mpnet-base-v2's real weights: token ids equal,
//! cosine >= 0.9999 (0.9995 with f16 weights), norms within 0.1%, in one
//! padded batch and one text at a time, local and streamed from a weight
//! server under a budget of one or two layers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use surf_engine::{Engine, Prompt, RemoteSource, VramBudget, WeightDtype};
use surf_server::{RunningServer, ServerConfig, WeightServer};
use surf_tests::{
    Golden, assert_matches_golden_within, assert_norms_match, dev_sentences, fixture_dir,
    load_fixture_reference, load_golden, mpnet_dir,
};
use surf_transport::{ClientConfig, Dtype, WeightClient};

const FIXTURES: [&str; 9] = [
    "xlmr",
    "mpnet",
    "t5enc",
    "qwen3",
    "llama-wide",
    "modernbert",
    "gpt2",
    "mistral-256",
    "qwen2",
];

fn engine(
    name: &str,
    batch_size: usize,
    dtype: WeightDtype,
    layers: Option<usize>,
) -> Option<Engine> {
    let gpu = surf_engine::gpu::gpu_for_tests()?;
    Some(
        Engine::builder()
            .model_dir(fixture_dir(name))
            .batch_size(batch_size)
            .weight_dtype(dtype)
            .vram_budget(layers.map_or(VramBudget::Unbounded, VramBudget::Layers))
            .gpu(gpu)
            .build()
            .unwrap_or_else(|e| panic!("the {name} fixture loads: {e}")),
    )
}

/// Embeds the dev sentences in batches of `batch_size` and checks them.
fn check(name: &str, batch_size: usize, dtype: WeightDtype, layers: Option<usize>) {
    let Some(engine) = engine(name, batch_size, dtype, layers) else {
        return;
    };
    let golden = load_fixture_reference(name, "reference.json");
    check_engine(
        &engine,
        &golden,
        dtype,
        &format!("{name} batch {batch_size} layers {layers:?}"),
    );
}

/// A weight server on loopback for `model_dir` serving `dtype`, and a
/// streaming source connected to it.
fn streamed_source(
    runtime: &tokio::runtime::Runtime,
    model_dir: PathBuf,
    dtype: Dtype,
) -> (RunningServer, RemoteSource) {
    let mut config = ServerConfig::new(model_dir, ([127, 0, 0, 1], 0).into());
    config.weight_dtype = dtype;
    let server = runtime
        .block_on(WeightServer::bind(config))
        .expect("server starts");
    let mut client_config = ClientConfig::new(
        vec![server.local_addr()],
        vec![server.certificate_der().clone()],
    );
    client_config.weight_dtype = dtype;
    let client = runtime
        .block_on(WeightClient::connect(client_config))
        .expect("client connects");
    (server, RemoteSource::new(client, runtime.handle().clone()))
}

/// An engine streaming `model_dir` from a weight server in `dtype`, with
/// `layers` layers of GPU memory.
fn streamed(
    runtime: &tokio::runtime::Runtime,
    model_dir: &Path,
    dtype: WeightDtype,
    layers: usize,
) -> Option<(RunningServer, Engine)> {
    let gpu = surf_engine::gpu::gpu_for_tests()?;
    let served = match dtype {
        WeightDtype::F32 => Dtype::F32,
        WeightDtype::F16 => Dtype::F16,
    };
    let (server, source) = streamed_source(runtime, model_dir.to_path_buf(), served);
    let engine = Engine::builder()
        .source(Arc::new(source))
        .gpu(gpu)
        .weight_dtype(dtype)
        .vram_budget(VramBudget::Layers(layers))
        .host_cache_bytes(0)
        .prefetch(1)
        .batch_size(16)
        .build()
        .expect("the streamed engine starts");
    Some((server, engine))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn check_engine(engine: &Engine, golden: &Golden, dtype: WeightDtype, what: &str) {
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let out = engine.embed(&texts).expect("inference succeeds");
    let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
    let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
    let floor = match dtype {
        WeightDtype::F32 => 0.9999,
        WeightDtype::F16 => 0.9995,
    };
    let worst = assert_matches_golden_within(golden, &ids, &vectors, floor);
    let norm_tolerance = match dtype {
        WeightDtype::F32 => 1e-3,
        WeightDtype::F16 => 5e-3,
    };
    assert_norms_match(golden, &vectors, norm_tolerance);
    eprintln!("{what} {dtype}: lowest cosine {worst:.9}");
}

#[test]
fn every_family_matches_its_reference_in_one_padded_batch() {
    for name in FIXTURES {
        check(name, 64, WeightDtype::F32, None);
    }
}

#[test]
fn every_family_matches_its_reference_one_text_at_a_time() {
    for name in FIXTURES {
        check(name, 1, WeightDtype::F32, None);
    }
}

#[test]
fn every_family_matches_its_reference_with_f16_weights_paged_one_layer_at_a_time() {
    for name in FIXTURES {
        check(name, 8, WeightDtype::F16, Some(1));
    }
}

#[test]
fn the_t5_fixture_projects_through_its_dense_module() {
    let Some(engine) = engine("t5enc", 4, WeightDtype::F32, None) else {
        return;
    };
    // 96 hidden, projected to 64 by 2_Dense, then normalised.
    assert_eq!(engine.spec().config.hidden_size(), 96);
    assert_eq!(engine.dimension(), 64);
    let vector = engine.infer(&["a short text"]).expect("inference succeeds");
    assert_eq!(vector[0].len(), 64);
}

fn check_streamed(dtype: WeightDtype) {
    let runtime = runtime();
    for name in FIXTURES {
        let Some((_server, engine)) = streamed(&runtime, &fixture_dir(name), dtype, 1) else {
            return;
        };
        let golden = load_fixture_reference(name, "reference.json");
        check_engine(&engine, &golden, dtype, &format!("{name} streamed"));
        let info = engine.cache_info().expect("cache info");
        assert_eq!(info.layer_slots, 1);
    }
}

#[test]
fn every_fixture_streams_from_a_weight_server_one_layer_at_a_time() {
    check_streamed(WeightDtype::F32);
}

#[test]
fn every_fixture_streams_f16_weights_from_a_weight_server_one_layer_at_a_time() {
    check_streamed(WeightDtype::F16);
}

#[test]
fn the_qwen3_query_prompt_goes_before_each_text_as_sentence_transformers_puts_it() {
    let Some(engine) = engine("qwen3", 8, WeightDtype::F32, None) else {
        return;
    };
    assert_eq!(engine.spec().prompt_names(), "document, query");
    let golden = load_fixture_reference("qwen3", "reference-prompt-query.json");
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let out = engine
        .embed_with_prompt(&texts, Prompt::Named("query"))
        .expect("inference succeeds");
    let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
    let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
    let worst = assert_matches_golden_within(&golden, &ids, &vectors, 0.9999);
    assert_norms_match(&golden, &vectors, 1e-3);
    eprintln!("qwen3 with the query prompt: lowest cosine {worst:.9}");
    // The prompt as text is the same thing.
    let text = engine.spec().prompts["query"].clone();
    let literal = engine
        .embed_with_prompt(&texts[..2], Prompt::Text(&text))
        .expect("inference succeeds");
    assert_eq!(literal[0].token_ids, ids[0]);
    // An unknown name is refused, naming the model's prompts.
    let error = engine
        .embed_with_prompt(&texts[..1], Prompt::Named("passage"))
        .expect_err("refused");
    let message = error.to_string();
    assert!(
        message.contains("passage") && message.contains("document, query"),
        "{message}"
    );
    assert!(error.is_bad_input());
}

#[test]
fn all_mpnet_base_v2_matches_sentence_transformers_locally() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let engine = Engine::builder()
        .model_dir(mpnet_dir())
        .gpu(gpu)
        .batch_size(16)
        .build()
        .expect("all-mpnet-base-v2 loads");
    assert_eq!(engine.spec().max_seq_length, 384);
    assert_eq!(engine.dimension(), 768);
    let golden = load_golden("mpnet-dev.st.json");
    check_engine(
        &engine,
        &golden,
        WeightDtype::F32,
        "all-mpnet-base-v2 local",
    );
}

#[test]
fn all_mpnet_base_v2_streams_from_a_weight_server_under_a_two_layer_budget() {
    let runtime = runtime();
    let Some((_server, engine)) = streamed(&runtime, &mpnet_dir(), WeightDtype::F32, 2) else {
        return;
    };
    let golden = load_golden("mpnet-dev.st.json");
    check_engine(
        &engine,
        &golden,
        WeightDtype::F32,
        "all-mpnet-base-v2 streamed",
    );
    let stats = engine.inference_stats().expect("stats");
    assert!(stats.evictions > 0, "12 layers through 2 slots evict");
}

#[test]
fn all_mpnet_base_v2_with_f16_weights_streamed_stays_within_the_f16_bar() {
    let runtime = runtime();
    let Some((_server, engine)) = streamed(&runtime, &mpnet_dir(), WeightDtype::F16, 2) else {
        return;
    };
    let golden = load_golden("mpnet-dev.st.json");
    check_engine(
        &engine,
        &golden,
        WeightDtype::F16,
        "all-mpnet-base-v2 streamed f16",
    );
}
