//! Two engines on one GPU device, one of them failing: the other's vectors
//! stay golden, before, during and after the failure, and the failing one
//! reports its own error.

use std::sync::Arc;
use std::time::Duration;

use surf_engine::{Engine, ErrorKind, RemoteSource, VramBudget};
use surf_server::{ServerConfig, WeightServer};
use surf_tests::{assert_matches_golden, dev_sentences, load_golden, minilm_dir};
use surf_transport::{ClientConfig, RetryPolicy, Timeouts, WeightClient};

#[test]
fn an_engine_failing_beside_another_on_one_device_leaves_its_vectors_golden() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let golden = load_golden("minilm-dev.candle.json");
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();

    let steady = Engine::builder()
        .model_dir(minilm_dir())
        .gpu(gpu.clone())
        .batch_size(16)
        .build()
        .expect("the local engine starts");

    // The other engine streams every layer on every pass from a server that
    // is stopped once it has started.
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
    let mut config = ClientConfig::new(
        vec![server.local_addr()],
        vec![server.certificate_der().clone()],
    );
    config.timeouts = Timeouts {
        connect: Duration::from_secs(2),
        response: Duration::from_secs(2),
        fetch: Duration::from_secs(5),
    };
    config.retry = RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    };
    let client = runtime
        .block_on(WeightClient::connect(config))
        .expect("client connects");
    let streaming = Engine::builder()
        .source(Arc::new(RemoteSource::new(
            client,
            runtime.handle().clone(),
        )))
        .gpu(gpu.clone())
        .vram_budget(VramBudget::Layers(1))
        .host_cache_bytes(0)
        .build()
        .expect("the streaming engine starts");
    streaming
        .embed(&texts[..4])
        .expect("the streaming engine works while its server does");
    runtime.block_on(server.abort());

    let check = |out: Vec<surf_engine::Embedding>| {
        let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
        let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
        assert_matches_golden(&golden, &ids, &vectors);
    };
    std::thread::scope(|scope| {
        let failing = scope.spawn(|| streaming.embed(&texts));
        // The steady engine runs batches the whole time the other fails.
        while !failing.is_finished() {
            check(
                steady
                    .embed(&texts)
                    .expect("the steady engine is unaffected"),
            );
        }
        let error = failing
            .join()
            .expect("no panic")
            .expect_err("its server is gone");
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    });
    check(
        steady
            .embed(&texts)
            .expect("the steady engine is unaffected"),
    );
}
