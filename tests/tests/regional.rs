//! Regional weight servers: servers that pull from an origin upstream and
//! share what they pulled through one Redis, and clients that spread their
//! fetches over several servers. Each test starts its own `redis-server` on
//! a free loopback port.

mod transport_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use surf_engine::{Engine, RemoteSource, VramBudget};
use surf_server::redis_tier::RedisConfig;
use surf_server::{RunningServer, ServerConfig, UpstreamConfig, WeightServer};
use surf_tests::redis_server::RedisServer;
use surf_tests::{assert_matches_golden, dev_sentences, load_golden};
use surf_transport::{ClientConfig, WeightClient};
use transport_support::{connect, file_tensors, loopback, model_dir, start_model_server};

/// How long background writes to Redis may take to land in these tests.
const SETTLE: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A server with no model of its own, pulling from `origin`, sharing `redis`
/// under `prefix`, with a component cache of `cache_bytes` (0 sends every
/// fetch on to Redis or the origin).
async fn start_region(
    origin: &RunningServer,
    redis: &RedisServer,
    prefix: &str,
    cache_bytes: u64,
) -> RunningServer {
    let upstream = UpstreamConfig::new(
        vec![origin.local_addr()],
        vec![origin.certificate_der().clone()],
    );
    let mut config = ServerConfig::regional(upstream, loopback());
    config.cache_bytes = cache_bytes;
    config.redis = Some(RedisConfig {
        prefix: prefix.to_owned(),
        ..RedisConfig::new(redis.url())
    });
    WeightServer::bind(config).await.expect("the region starts")
}

/// Waits until `server` has no write to Redis in flight and has made at
/// least `writes` of them.
async fn settle(server: &RunningServer, writes: u64) {
    let started = Instant::now();
    loop {
        let stats = server.stats();
        if stats.redis_writes_pending == 0 && stats.redis_writes >= writes {
            return;
        }
        assert!(
            started.elapsed() < SETTLE,
            "writes to Redis did not land: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An engine streaming MiniLM from `servers` with room for 2 layers and no
/// host cache, so that every pass fetches every layer.
fn streaming_engine(
    runtime: &tokio::runtime::Runtime,
    gpu: &surf_engine::Gpu,
    servers: &[&RunningServer],
) -> Engine {
    let config = ClientConfig::new(
        servers.iter().map(|server| server.local_addr()).collect(),
        servers
            .iter()
            .map(|server| server.certificate_der().clone())
            .collect(),
    );
    let client = runtime
        .block_on(WeightClient::connect(config))
        .expect("the client connects");
    Engine::builder()
        .source(Arc::new(RemoteSource::new(
            client,
            runtime.handle().clone(),
        )))
        .gpu(gpu.clone())
        .vram_budget(VramBudget::Layers(2))
        .host_cache_bytes(0)
        .prefetch(2)
        .build()
        .expect("the engine starts")
}

/// Runs `dev-sentences.txt` and checks every vector against the references.
fn run_golden(engine: &Engine) {
    let golden = load_golden("minilm-dev.candle.json");
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let out = engine.embed(&texts).expect("the run completes");
    let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
    let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
    assert_matches_golden(&golden, &ids, &vectors);
}

#[test]
fn a_second_region_serves_a_whole_run_from_redis_without_the_origin() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let runtime = runtime();
    let origin = runtime.block_on(start_model_server());
    let region_b = runtime.block_on(start_region(&origin, &redis, "regions", 256 << 20));
    let region_c = runtime.block_on(start_region(&origin, &redis, "regions", 256 << 20));

    let engine_b = streaming_engine(&runtime, &gpu, &[&region_b]);
    run_golden(&engine_b);
    drop(engine_b);
    let pulled = region_b.stats();
    assert!(pulled.upstream_fetches > 0, "{pulled:?}");
    assert!(pulled.upstream_bytes > 0, "{pulled:?}");
    runtime.block_on(settle(&region_b, pulled.upstream_fetches));

    let before = origin.stats();
    let engine_c = streaming_engine(&runtime, &gpu, &[&region_c]);
    run_golden(&engine_c);
    drop(engine_c);
    let shared = region_c.stats();
    assert!(shared.redis_hits > 0, "{shared:?}");
    assert_eq!(
        shared.redis_hits, shared.cache_misses,
        "every miss of c's own cache was a Redis hit: {shared:?}"
    );
    assert_eq!(shared.upstream_fetches, 0, "{shared:?}");
    assert_eq!(shared.upstream_bytes, 0, "{shared:?}");
    assert_eq!(shared.redis_errors, 0, "{shared:?}");
    // Word-table rows are asked for by the set a batch uses, not shared
    // through Redis: a region passes them on from the origin.
    let after = origin.stats();
    assert_eq!(
        after.bytes_served - before.bytes_served,
        after.row_bytes_served - before.row_bytes_served,
        "the origin sent nothing but word-table rows for region c's run"
    );
}

#[test]
fn a_region_keeps_serving_through_a_redis_outage_and_uses_it_again_when_it_returns() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let runtime = runtime();
    runtime.block_on(async {
        let file = file_tensors(&model_dir());
        let origin = start_model_server().await;
        let region = start_region(&origin, &redis, "outage", 0).await;
        let client = connect(&[&region]).await;
        let names: Vec<String> = client
            .manifest()
            .components
            .iter()
            .map(|component| component.name.clone())
            .collect();
        let fetch_all = |names: Vec<String>| {
            let client = client.clone();
            let file = &file;
            async move {
                for name in names {
                    let bytes = client
                        .fetch_component(&name)
                        .await
                        .unwrap_or_else(|error| panic!("{name}: {error}"));
                    transport_support::assert_component_matches_file(
                        client.manifest(),
                        &name,
                        &bytes,
                        file,
                    );
                }
            }
        };

        // Half the model, twice: the second time from Redis.
        let (first_half, second_half) = names.split_at(names.len() / 2);
        fetch_all(first_half.to_vec()).await;
        settle(&region, first_half.len() as u64).await;
        fetch_all(first_half.to_vec()).await;
        let before_outage = region.stats();
        assert_eq!(
            before_outage.redis_hits,
            first_half.len() as u64,
            "{before_outage:?}"
        );

        // Redis dies in the middle of the run: the rest of the run, and the
        // first half again, come from the origin.
        let port = redis.port();
        redis.kill();
        fetch_all(second_half.to_vec()).await;
        fetch_all(first_half.to_vec()).await;
        let during = region.stats();
        assert!(during.redis_errors > 0, "the outage is counted: {during:?}");
        assert_eq!(during.redis_hits, before_outage.redis_hits, "{during:?}");
        assert!(
            during.upstream_fetches >= before_outage.upstream_fetches + names.len() as u64,
            "{during:?}"
        );

        // Redis comes back empty on the same address: the region fills it
        // and hits again, without a restart.
        let redis = RedisServer::start_on(port);
        let started = Instant::now();
        let layer = vec![names[1].clone()];
        loop {
            fetch_all(layer.clone()).await;
            if region.stats().redis_hits > during.redis_hits {
                break;
            }
            assert!(
                started.elapsed() < SETTLE,
                "no Redis hit after it returned: {:?}",
                region.stats()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_ne!(
            redis.command(&[b"DBSIZE"]),
            ":0",
            "the region wrote to the new Redis"
        );
        client.close().await;
        region.shutdown().await;
        origin.shutdown().await;
    });
}

#[test]
fn a_value_tampered_with_in_redis_is_caught_and_replaced_from_the_origin() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let runtime = runtime();
    runtime.block_on(async {
        let file = file_tensors(&model_dir());
        let origin = start_model_server().await;
        let region = start_region(&origin, &redis, "tamper", 0).await;
        let client = connect(&[&region]).await;
        let name = "encoder.layer.3";
        client.fetch_component(name).await.expect("first fetch");
        settle(&region, 1).await;

        let manifest = client.manifest();
        let component = manifest.component(name).expect("the layer is listed");
        let key = format!(
            "tamper:{}:{}:{}:0",
            manifest.revision, manifest.weight_dtype, component.hash
        );
        assert_eq!(redis.command(&[b"EXISTS", key.as_bytes()]), ":1", "{key}");
        let written = redis.command(&[b"SETRANGE", key.as_bytes(), b"1000", b"not a weight"]);
        assert!(written.starts_with(':'), "{written}");

        let before = region.stats();
        let bytes = client.fetch_component(name).await.expect("second fetch");
        transport_support::assert_component_matches_file(manifest, name, &bytes, &file);
        let caught = region.stats();
        assert_eq!(caught.redis_hits, before.redis_hits, "{caught:?}");
        assert!(caught.redis_errors > before.redis_errors, "{caught:?}");
        assert_eq!(
            caught.upstream_fetches,
            before.upstream_fetches + 1,
            "{caught:?}"
        );

        settle(&region, before.redis_writes + 1).await;
        let bytes = client.fetch_component(name).await.expect("third fetch");
        transport_support::assert_component_matches_file(manifest, name, &bytes, &file);
        let replaced = region.stats();
        assert_eq!(
            replaced.redis_hits,
            caught.redis_hits + 1,
            "the replaced value is good: {replaced:?}"
        );
        assert_eq!(
            replaced.upstream_fetches, caught.upstream_fetches,
            "{replaced:?}"
        );
        client.close().await;
        region.shutdown().await;
        origin.shutdown().await;
    });
}

#[test]
fn a_client_spreads_over_two_servers_and_finishes_when_one_is_killed_mid_run() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let runtime = runtime();
    let first = runtime.block_on(start_model_server());
    let second = runtime.block_on(start_model_server());
    let engine = streaming_engine(&runtime, &gpu, &[&first, &second]);

    run_golden(&engine);
    let (first_bytes, second_bytes) = (first.stats().bytes_served, second.stats().bytes_served);
    assert!(
        first_bytes > 0 && second_bytes > 0,
        "both servers took fetches: {first_bytes} and {second_bytes} bytes"
    );

    // The next run starts; once the first server has sent some of it, the
    // server dies, and the run finishes from the second.
    std::thread::scope(|scope| {
        let run = scope.spawn(|| run_golden(&engine));
        let started = Instant::now();
        while first.stats().bytes_served == first_bytes {
            assert!(
                started.elapsed() < SETTLE,
                "the run never reached the first server"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        runtime.block_on(first.abort());
        run.join().expect("the run completes with golden vectors");
    });
    let later = second.stats().bytes_served;
    assert!(later > second_bytes, "the second server finished the run");
    run_golden(&engine);
}
