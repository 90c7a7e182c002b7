//! One weight server for two models in both dtypes: a client of each model
//! gets that model's manifest and golden vectors, an f32 and an f16 client
//! of the same model are each served their dtype, converted once, and a
//! client naming a model the server does not serve is refused with the
//! names it serves.

use std::sync::Arc;

use surf_engine::{Engine, RemoteSource, WeightDtype};
use surf_server::{OriginConfig, RunningServer, ServerConfig, WeightServer};
use surf_tests::{
    Golden, assert_matches_golden_within, dev_sentences, fixture_dir, load_fixture_reference,
    load_golden, minilm_dir,
};
use surf_transport::wire::Refusal;
use surf_transport::{ClientConfig, Dtype, Error, WeightClient};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// MiniLM as `mini` (the first model) and the XLM-R fixture as `xlmr`, each
/// in f32 and f16.
fn two_model_server(runtime: &tokio::runtime::Runtime) -> RunningServer {
    let config = ServerConfig {
        model_name: Some("mini".into()),
        extra_models: vec![("xlmr".into(), OriginConfig::Model(fixture_dir("xlmr")))],
        weight_dtype: Dtype::F32,
        extra_dtypes: vec![Dtype::F16],
        ..ServerConfig::new(minilm_dir(), ([127, 0, 0, 1], 0).into())
    };
    runtime
        .block_on(WeightServer::bind(config))
        .expect("the server starts")
}

fn client_config(server: &RunningServer, model: Option<&str>, dtype: Dtype) -> ClientConfig {
    let mut config = ClientConfig::new(
        vec![server.local_addr()],
        vec![server.certificate_der().clone()],
    );
    config.model = model.map(str::to_string);
    config.weight_dtype = dtype;
    config
}

/// An engine streaming `model` in `dtype` from `server`, checked against
/// `golden` on the dev sentences.
fn check_streamed(
    runtime: &tokio::runtime::Runtime,
    server: &RunningServer,
    model: Option<&str>,
    dtype: WeightDtype,
    golden: &Golden,
) {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let client = runtime
        .block_on(WeightClient::connect(client_config(
            server,
            model,
            dtype.wire(),
        )))
        .expect("the client connects");
    assert_eq!(client.manifest().weight_dtype, dtype.wire());
    let source = RemoteSource::new(client, runtime.handle().clone());
    let engine = Engine::builder()
        .source(Arc::new(source))
        .gpu(gpu)
        .weight_dtype(dtype)
        .build()
        .expect("the streamed engine starts");
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let out = engine.embed(&texts).expect("inference succeeds");
    let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
    let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
    let floor = match dtype {
        WeightDtype::F32 => 0.9999,
        WeightDtype::F16 => 0.9995,
    };
    assert_matches_golden_within(golden, &ids, &vectors, floor);
}

#[test]
fn a_client_of_each_model_gets_its_model() {
    let runtime = runtime();
    let server = two_model_server(&runtime);
    let names: Vec<(String, Dtype)> = server
        .manifests()
        .iter()
        .map(|(name, manifest)| (name.clone(), manifest.weight_dtype))
        .collect();
    assert_eq!(
        names,
        [
            ("mini".to_string(), Dtype::F32),
            ("mini".to_string(), Dtype::F16),
            ("xlmr".to_string(), Dtype::F32),
            ("xlmr".to_string(), Dtype::F16),
        ]
    );
    let mini = runtime
        .block_on(WeightClient::connect(client_config(
            &server,
            None,
            Dtype::F32,
        )))
        .expect("a client naming no model");
    let xlmr = runtime
        .block_on(WeightClient::connect(client_config(
            &server,
            Some("xlmr"),
            Dtype::F32,
        )))
        .expect("a client of xlmr");
    assert_ne!(mini.manifest().revision, xlmr.manifest().revision);
    assert_ne!(mini.manifest().components, xlmr.manifest().components);
    check_streamed(
        &runtime,
        &server,
        Some("mini"),
        WeightDtype::F32,
        &load_golden("minilm-dev.candle.json"),
    );
    check_streamed(
        &runtime,
        &server,
        Some("xlmr"),
        WeightDtype::F32,
        &load_fixture_reference("xlmr", "reference.json"),
    );
}

#[test]
fn an_f32_and_an_f16_client_of_one_server_each_get_their_dtype() {
    let runtime = runtime();
    let server = two_model_server(&runtime);
    let golden = load_golden("minilm-dev.candle.json");
    check_streamed(&runtime, &server, Some("mini"), WeightDtype::F32, &golden);
    check_streamed(&runtime, &server, Some("mini"), WeightDtype::F16, &golden);
    let f32_bytes = server.manifests()[0].1.total_bytes();
    let f16_bytes = server.manifests()[1].1.total_bytes();
    // Every float tensor halves; the layers dominate the total.
    assert!(f16_bytes * 10 < f32_bytes * 6, "{f16_bytes} of {f32_bytes}");
}

#[test]
fn a_model_the_server_does_not_serve_is_refused_with_the_names_it_does() {
    let runtime = runtime();
    let server = two_model_server(&runtime);
    let error = runtime
        .block_on(WeightClient::connect(client_config(
            &server,
            Some("gpt-nothing"),
            Dtype::F32,
        )))
        .err()
        .expect("refused");
    let text = error.to_string();
    assert!(
        text.contains("gpt-nothing") && text.contains("mini") && text.contains("xlmr"),
        "{text}"
    );
    assert!(error.is_bad_input(), "{error:?}");
    let refused = match &error {
        Error::Refused(refusal) => Some(refusal.clone()),
        Error::NoServerReachable { failures } => {
            failures.iter().find_map(|f| match f.error.as_ref() {
                Error::Refused(refusal) => Some(refusal.clone()),
                _ => None,
            })
        }
        _ => None,
    };
    assert!(
        matches!(refused, Some(Refusal::UnknownModel { ref served, .. }) if served == &["mini", "xlmr"]),
        "{error:?}"
    );
}
