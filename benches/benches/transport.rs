//! Weight transfer over loopback QUIC: one client and eight clients fetching
//! the whole MiniLM model (hash-checked), next to a plain quinn stream of the
//! same number of bytes with the same transport settings. Then one client
//! through a regional server (no model of its own, no cache of its own, so
//! every fetch goes to the shared tier) with Redis warm and with Redis
//! emptied before each round, next to the origin directly, in the same run.
//! The regional rows need `redis-server` (installed by `assets/setup.sh`).
//!
//! `SURF_BENCH_QUICK=1` fetches two small components instead of the model.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use surf_server::redis_tier::RedisConfig;
use surf_server::{RunningServer, ServerConfig, UpstreamConfig, WeightServer};
use surf_tests::redis_server::RedisServer;
use surf_transport::{ClientConfig, PrivateKeyDer, WeightClient, tls};
use tokio::runtime::Runtime;

const PLAIN_SLICE: usize = 256 * 1024;

fn quick() -> bool {
    std::env::var("SURF_BENCH_QUICK").is_ok_and(|value| value == "1")
}

fn model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the MiniLM model is missing at {}: run `bash assets/fetch-model.sh` first",
        dir.display()
    );
    dir
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The components each client fetches in one iteration.
fn components_to_fetch(client: &WeightClient) -> Vec<String> {
    let names = client.manifest().components.iter().map(|c| c.name.clone());
    if quick() {
        names
            .filter(|name| name == "pooler" || name == "encoder.layer.0")
            .collect()
    } else {
        names.collect()
    }
}

async fn fetch_all(client: &WeightClient, names: &[String]) -> u64 {
    let tasks: Vec<_> = names
        .iter()
        .map(|name| {
            let (client, name) = (client.clone(), name.clone());
            tokio::spawn(async move { client.fetch_component(&name).await })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        let bytes = task.await.expect("fetch task").expect("fetch");
        total += bytes.len() as u64;
    }
    total
}

struct SurfSetup {
    server: RunningServer,
    clients: Vec<WeightClient>,
    names: Vec<String>,
    bytes_per_client: u64,
}

async fn surf_setup(clients: usize) -> SurfSetup {
    let server = WeightServer::bind(ServerConfig::new(model_dir(), loopback()))
        .await
        .expect("server starts");
    let mut connected = Vec::new();
    for _ in 0..clients {
        let config = ClientConfig::new(
            vec![server.local_addr()],
            vec![server.certificate_der().clone()],
        );
        connected.push(
            WeightClient::connect(config)
                .await
                .expect("client connects"),
        );
    }
    let names = components_to_fetch(&connected[0]);
    let bytes_per_client = names
        .iter()
        .filter_map(|name| connected[0].manifest().component(name))
        .map(|component| component.byte_len)
        .sum();
    SurfSetup {
        server,
        clients: connected,
        names,
        bytes_per_client,
    }
}

async fn surf_round(setup: &SurfSetup) -> u64 {
    let tasks: Vec<_> = setup
        .clients
        .iter()
        .map(|client| {
            let (client, names) = (client.clone(), setup.names.clone());
            tokio::spawn(async move { fetch_all(&client, &names).await })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("client task");
    }
    total
}

/// A bare quinn server that answers every stream with `payload`.
struct PlainSetup {
    _server: quinn::Endpoint,
    client: quinn::Endpoint,
    connection: quinn::Connection,
}

async fn plain_setup(payload: Bytes) -> PlainSetup {
    let certified = certificate_and_key();
    let server_config =
        tls::server_config(vec![certified.0.clone()], certified.1).expect("server TLS");
    let server = quinn::Endpoint::server(server_config, loopback()).expect("binds");
    let addr = server.local_addr().expect("address");
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            let payload = payload.clone();
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    let payload = payload.clone();
                    tokio::spawn(async move {
                        let _ = recv.read_to_end(64).await;
                        let mut rest = payload;
                        while !rest.is_empty() {
                            let slice = rest.split_to(rest.len().min(PLAIN_SLICE));
                            if send.write_chunk(slice).await.is_err() {
                                return;
                            }
                        }
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    let mut client = quinn::Endpoint::client(loopback()).expect("client socket");
    client.set_default_client_config(tls::client_config(&[certified.0]).expect("client TLS"));
    let connection = client
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    PlainSetup {
        _server: server,
        client,
        connection,
    }
}

/// A self-signed certificate made the way `surf serve` makes one, so that the
/// plain endpoint runs the same TLS as the weight server.
fn certificate_and_key() -> (
    surf_transport::CertificateDer<'static>,
    PrivateKeyDer<'static>,
) {
    surf_server::self_signed_certificate(loopback()).expect("a certificate")
}

async fn plain_round(setup: &PlainSetup) -> u64 {
    let (mut send, mut recv) = setup.connection.open_bi().await.expect("stream");
    send.write_all(b"go").await.expect("request");
    send.finish().expect("finish");
    let mut total = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read") {
        total += chunk.bytes.len() as u64;
    }
    total
}

/// One client of a regional server that pulls from `origin` through
/// `redis`, with no component cache of its own.
async fn region_setup(origin: &RunningServer, redis: &RedisServer) -> SurfSetup {
    let upstream = UpstreamConfig::new(
        vec![origin.local_addr()],
        vec![origin.certificate_der().clone()],
    );
    let mut config = ServerConfig::regional(upstream, loopback());
    config.cache_bytes = 0;
    config.redis = Some(RedisConfig::new(redis.url()));
    let server = WeightServer::bind(config).await.expect("region starts");
    let client = WeightClient::connect(ClientConfig::new(
        vec![server.local_addr()],
        vec![server.certificate_der().clone()],
    ))
    .await
    .expect("client connects");
    let names = components_to_fetch(&client);
    let bytes_per_client = names
        .iter()
        .filter_map(|name| client.manifest().component(name))
        .map(|component| component.byte_len)
        .sum();
    SurfSetup {
        server,
        clients: vec![client],
        names,
        bytes_per_client,
    }
}

/// Waits until the region's writes to Redis have landed, so that a round
/// neither pays for the last one's nor finds Redis half filled.
async fn settle(region: &RunningServer) {
    let started = Instant::now();
    while region.stats().redis_writes_pending > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "writes to Redis never land"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Times one round through the region, Redis emptied first (cold) or
/// filled by earlier rounds (warm).
async fn region_round(region: &SurfSetup, redis: &RedisServer, cold: bool) -> (u64, Duration) {
    settle(&region.server).await;
    if cold {
        assert_eq!(redis.command(&[b"FLUSHALL"]), "+OK");
    }
    let start = Instant::now();
    let bytes = surf_round(region).await;
    (bytes, start.elapsed())
}

/// The regional rows: one client through a region with Redis warm and cold,
/// next to the origin directly, each timed the same way in the same run.
/// `None` when `redis-server` is missing.
fn regional(
    criterion: &mut Criterion,
    runtime: &Runtime,
    origin: &SurfSetup,
) -> Option<serde_json::Value> {
    let redis = RedisServer::start()?;
    let region = runtime.block_on(region_setup(&origin.server, &redis));
    // Fill Redis once, so that the warm rows start warm.
    runtime.block_on(region_round(&region, &redis, false));

    let mut group = criterion.benchmark_group("transport_regional");
    group.throughput(Throughput::Bytes(region.bytes_per_client));
    group.bench_function("origin_direct", |bench| {
        bench.iter(|| runtime.block_on(surf_round(origin)))
    });
    for (name, cold) in [("region_warm_redis", false), ("region_cold_redis", true)] {
        group.bench_function(name, |bench| {
            bench.iter_custom(|iterations| {
                (0..iterations)
                    .map(|_| runtime.block_on(region_round(&region, &redis, cold)).1)
                    .sum()
            })
        });
    }
    group.finish();

    let rounds = if quick() { 1 } else { 3 };
    let best = |cold: bool| {
        (0..rounds)
            .map(|_| {
                let (bytes, elapsed) = runtime.block_on(region_round(&region, &redis, cold));
                mb_per_s(bytes, elapsed)
            })
            .fold(0.0, f64::max)
    };
    let origin_rate = best_rate(rounds, || runtime.block_on(surf_round(origin)));
    let warm_rate = best(false);
    let cold_rate = best(true);
    let stats = region.server.stats();
    println!(
        "regional summary (one client): origin directly {origin_rate:.0} MB/s, \
         region with Redis warm {warm_rate:.0} MB/s ({:.2} of origin), \
         region with Redis cold {cold_rate:.0} MB/s ({:.2} of origin); \
         region counted {} Redis hits, {} misses, {} upstream fetches",
        warm_rate / origin_rate,
        cold_rate / origin_rate,
        stats.redis_hits,
        stats.redis_misses,
        stats.upstream_fetches,
    );
    runtime.block_on(async {
        settle(&region.server).await;
        for client in &region.clients {
            client.close().await;
        }
    });
    runtime.block_on(region.server.shutdown());
    Some(serde_json::json!({
        "origin_direct_mb_s": origin_rate,
        "region_warm_redis_mb_s": warm_rate,
        "region_cold_redis_mb_s": cold_rate,
        "warm_ratio_to_origin": warm_rate / origin_rate,
        "cold_ratio_to_origin": cold_rate / origin_rate,
    }))
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

/// Best of a few timed rounds, for the summary line.
fn best_rate<F: FnMut() -> u64>(rounds: usize, mut round: F) -> f64 {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            let bytes = round();
            mb_per_s(bytes, start.elapsed())
        })
        .fold(0.0, f64::max)
}

fn transport(criterion: &mut Criterion) {
    let runtime = Runtime::new().expect("runtime");
    let one = runtime.block_on(surf_setup(1));
    let eight = runtime.block_on(surf_setup(8));
    let payload = Bytes::from(vec![0x5a; one.bytes_per_client as usize]);
    let plain = runtime.block_on(plain_setup(payload));

    let mut group = criterion.benchmark_group("transport");
    group.throughput(Throughput::Bytes(one.bytes_per_client));
    group.bench_function("plain_quinn_stream", |bench| {
        bench.iter(|| runtime.block_on(plain_round(&plain)))
    });
    group.bench_function("surf_1_client", |bench| {
        bench.iter(|| runtime.block_on(surf_round(&one)))
    });
    group.throughput(Throughput::Bytes(8 * eight.bytes_per_client));
    group.bench_function("surf_8_clients", |bench| {
        bench.iter(|| runtime.block_on(surf_round(&eight)))
    });
    group.finish();

    let rounds = if quick() { 1 } else { 3 };
    let plain_rate = best_rate(rounds, || runtime.block_on(plain_round(&plain)));
    let one_rate = best_rate(rounds, || runtime.block_on(surf_round(&one)));
    let eight_rate = best_rate(rounds, || runtime.block_on(surf_round(&eight)));
    println!(
        "transport summary ({} MB per client): plain quinn stream {plain_rate:.0} MB/s, \
         surf 1 client {one_rate:.0} MB/s ({:.0}% of plain), \
         surf 8 clients {eight_rate:.0} MB/s aggregate ({:.0}% of plain)",
        one.bytes_per_client / 1_000_000,
        100.0 * one_rate / plain_rate,
        100.0 * eight_rate / plain_rate,
    );
    let regional = regional(criterion, &runtime, &one);
    let mut figures = serde_json::json!({
        "quick": quick(),
        "mb_per_client": one.bytes_per_client as f64 / 1e6,
        "rounds": rounds,
        "plain_quinn_mb_s": plain_rate,
        "surf_1_client_mb_s": one_rate,
        "surf_8_clients_mb_s": eight_rate,
    });
    if let (Some(figures), Some(serde_json::Value::Object(regional))) =
        (figures.as_object_mut(), regional)
    {
        figures.extend(regional);
    }
    surf_benches::write_json("transport", &figures);

    runtime.block_on(async {
        for client in one.clients.iter().chain(&eight.clients) {
            client.close().await;
        }
        plain.connection.close(0u32.into(), b"done");
        plain.client.wait_idle().await;
        one.server.shutdown().await;
        eight.server.shutdown().await;
    });
}

fn config() -> Criterion {
    let criterion = Criterion::default().sample_size(10);
    if quick() {
        criterion
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(500))
    } else {
        criterion
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5))
    }
}

fn main() {
    let mut criterion = config().configure_from_args();
    transport(&mut criterion);
    criterion.final_summary();
}
