//! Several models on one GPU under one VRAM budget smaller than their sum:
//! all-MiniLM-L6-v2, all-mpnet-base-v2 and the XLM-R fixture served by one
//! service, each answering its golden vectors under concurrent clients that
//! mix them, with the VRAM gauge read during the run; `/v1/models`, the
//! unknown-model 404 and `/info`; and a model starved by a flood of requests
//! to another, answered within the wait bound.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use surf_engine::queue::BatchObserver;
use surf_engine::{BatchLimits, EmbedQueue, Engine, Engines, Fairness};
use surf_server::http::{EmbedService, HttpSettings, ServiceSettings};
use surf_tests::{
    Golden, cosine, dev_sentences, fixture_dir, load_fixture_reference, load_golden, minilm_dir,
    mpnet_dir,
};

const MINI: &str = "mini";
const MPNET: &str = "mpnet";
const XLMR: &str = "xlmr";

/// The three models on one device, under half their summed weights.
fn engines() -> Option<Arc<Engines>> {
    static ENGINES: OnceLock<Option<Arc<Engines>>> = OnceLock::new();
    ENGINES
        .get_or_init(|| {
            let gpu = surf_engine::gpu::gpu_for_tests()?;
            let model = |dir| {
                Engine::builder()
                    .model_dir(dir)
                    .normalize(false)
                    .batch_size(16)
            };
            let engines = Engines::builder()
                .gpu(gpu)
                .host_cache_bytes(64 << 20)
                .model(MINI, model(minilm_dir()))
                .model(MPNET, model(mpnet_dir()))
                .model(XLMR, model(fixture_dir("xlmr")))
                .build()
                .expect("the three models load");
            let budget = half_budget(&engines);
            engines
                .set_vram_budget(Some(budget))
                .expect("half the weights run every model");
            Some(Arc::new(engines))
        })
        .clone()
}

/// Half of the three models' weights: less than their sum, more than the
/// largest one's pinned tables, one layer and staging.
fn half_budget(engines: &Engines) -> u64 {
    let whole: u64 = engines
        .residency()
        .expect("residency")
        .iter()
        .map(|r| r.whole_bytes)
        .sum();
    whole / 2
}

fn golden(model: &str) -> Golden {
    match model {
        MINI => load_golden("minilm-dev.candle.json"),
        MPNET => load_golden("mpnet-dev.st.json"),
        _ => load_fixture_reference("xlmr", "reference.json"),
    }
}

struct TestServer {
    base: String,
    service: Arc<EmbedService>,
}

fn spawn_server(service: Arc<EmbedService>) -> TestServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.set_nonblocking(true).expect("non-blocking");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let served = Arc::clone(&service);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            surf_server::http::serve(
                listener,
                served,
                &HttpSettings::default(),
                std::future::pending(),
            )
            .await
            .expect("the server runs");
        });
    });
    TestServer { base, service }
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("the service answers");
    let status = response.status();
    let text = response.text().await.expect("a body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// The value of the metric line `series` (name and labels, exactly) in an
/// OpenMetrics text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

fn vector(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_models_under_half_their_weights_answer_golden_vectors_to_mixed_clients() {
    let Some(engines) = engines() else { return };
    let budget = engines.vram_budget().expect("a shared budget");
    assert_eq!(budget, half_budget(&engines));
    let service = Arc::new(
        EmbedService::start_models(Arc::clone(&engines), ServiceSettings::default())
            .expect("the service starts"),
    );
    let server = spawn_server(service);
    let texts = dev_sentences();
    let goldens: Vec<(&str, Golden)> = [MINI, MPNET, XLMR]
        .into_iter()
        .map(|m| (m, golden(m)))
        .collect();
    let goldens = Arc::new(goldens);

    // The VRAM gauge, read while the clients run.
    let running = Arc::new(AtomicBool::new(true));
    let highest = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (running, highest, reads) = (
            Arc::clone(&running),
            Arc::clone(&highest),
            Arc::clone(&reads),
        );
        let base = server.base.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while running.load(Ordering::Relaxed) {
                let text = client
                    .get(format!("{base}/metrics"))
                    .send()
                    .await
                    .expect("metrics")
                    .text()
                    .await
                    .expect("text");
                let used = metric(&text, r#"surf_vram_used_bytes{model=""}"#)
                    .expect("the total VRAM gauge");
                let limit = metric(&text, r#"surf_vram_budget_bytes{model=""}"#)
                    .expect("the VRAM budget gauge");
                assert_eq!(limit as u64, budget);
                highest.fetch_max(used as u64, Ordering::Relaxed);
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // 24 clients, each sending 3 requests that cycle through the models
    // (both APIs), 2 texts each; every vector checked against its golden.
    let mut clients = Vec::new();
    for client in 0..24usize {
        let (base, goldens, texts) = (server.base.clone(), Arc::clone(&goldens), texts.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for round in 0..3 {
                let (model, golden) = &goldens[(client + round) % 3];
                let first = (client * 5 + round * 3) % texts.len();
                let picked = [first, (first + 7) % texts.len()];
                let inputs: Vec<&str> = picked.iter().map(|&i| texts[i].as_str()).collect();
                let (status, body) = if (client + round) % 2 == 0 {
                    send(
                        http.post(format!("{base}/v1/embeddings"))
                            .json(&json!({ "model": model, "input": inputs })),
                    )
                    .await
                } else {
                    send(
                        http.post(format!("{base}/embed"))
                            .json(&json!({ "model": model, "inputs": inputs })),
                    )
                    .await
                };
                assert_eq!(status, StatusCode::OK, "{model}: {body}");
                let vectors: Vec<Vec<f32>> = match body.get("data") {
                    Some(data) => {
                        assert_eq!(body["model"], *model);
                        data.as_array()
                            .expect("data")
                            .iter()
                            .map(|d| vector(&d["embedding"]))
                            .collect()
                    }
                    None => body
                        .as_array()
                        .expect("vectors")
                        .iter()
                        .map(vector)
                        .collect(),
                };
                for (&line, vector) in picked.iter().zip(&vectors) {
                    let c = cosine(vector, &golden.items[line].embedding);
                    assert!(c >= 0.9999, "{model} line {}: cosine {c}", line + 1);
                }
            }
        }));
    }
    for client in clients {
        client.await.expect("a client finished");
    }
    running.store(false, Ordering::Relaxed);
    watcher.await.expect("the watcher finished");
    assert!(reads.load(Ordering::Relaxed) > 0, "the gauge was read");
    let highest = highest.load(Ordering::Relaxed);
    assert!(highest > 0 && highest <= budget, "{highest} over {budget}");

    // Every model ran, and sharing half the memory evicted across models.
    let residency = engines.residency().expect("residency");
    let held: u64 = residency.iter().map(|r| r.vram_bytes).sum();
    assert!(held <= budget, "{held} held over {budget}");
    for model in 0..engines.len() {
        let stats = engines.engine(model).inference_stats().expect("stats");
        assert!(stats.passes > 0, "{} never ran", engines.name(model));
    }
    let (_, metrics) = send(reqwest::Client::new().get(format!("{}/metrics", server.base))).await;
    let metrics = metrics.as_str().expect("text").to_string();
    for model in [MINI, MPNET, XLMR] {
        let series = format!("surf_model_requests_total{{model=\"{model}\"}}");
        assert!(
            metric(&metrics, &series).is_some_and(|n| n >= 24.0),
            "{series} in {metrics}"
        );
    }
    server.service.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_and_an_unknown_one_is_404_in_each_apis_shape() {
    let Some(engines) = engines() else { return };
    let service = Arc::new(
        EmbedService::start_models(Arc::clone(&engines), ServiceSettings::default())
            .expect("the service starts"),
    );
    let server = spawn_server(service);
    let http = reqwest::Client::new();

    let (status, list) = send(http.get(format!("{}/v1/models", server.base))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model");
            assert!(m["created"].as_u64().is_some_and(|t| t > 0), "{m}");
            m["id"].as_str().expect("an id")
        })
        .collect();
    assert_eq!(ids, [MINI, MPNET, XLMR]);

    let (status, body) = send(
        http.post(format!("{}/v1/embeddings", server.base))
            .json(&json!({ "model": "gpt-nothing", "input": "hello" })),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "model");
    let message = body["error"]["message"].as_str().expect("a message");
    for name in [MINI, MPNET, XLMR] {
        assert!(message.contains(name), "{message}");
    }

    let (status, body) = send(
        http.post(format!("{}/embed", server.base))
            .json(&json!({ "model": "gpt-nothing", "inputs": "hello" })),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error_type"], "NotFound", "{body}");

    // No model named: the default (the first), whose dimension is 384.
    let (status, body) = send(
        http.post(format!("{}/embed", server.base))
            .json(&json!({ "inputs": "hello" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0].as_array().map(Vec::len), Some(384));

    let (status, info) = send(http.get(format!("{}/info", server.base))).await;
    assert_eq!(status, StatusCode::OK);
    let models = info["models"].as_array().expect("models");
    assert_eq!(models.len(), 3);
    let families: Vec<&str> = models
        .iter()
        .map(|m| m["family"].as_str().expect("a family"))
        .collect();
    assert_eq!(families, ["bert", "mpnet", "roberta"]);
    let dimensions: Vec<u64> = models
        .iter()
        .map(|m| m["dimension"].as_u64().expect("a dimension"))
        .collect();
    assert_eq!(dimensions[..2], [384, 768]);
    assert_eq!(models[0]["default"], true);
    for model in models {
        assert_eq!(model["dtype"], "f32");
        assert!(
            model["vram_whole_bytes"].as_u64().is_some_and(|b| b > 0),
            "{model}"
        );
    }
    server.service.shutdown();
}

/// The queue alone: MiniLM's inputs flood in from 16 threads, a backlog of
/// many batches of at most 16 inputs, while one request to the XLM-R
/// fixture waits; it runs within the bound plus the batch in progress, not
/// behind the backlog.
#[test]
fn a_model_starved_by_a_flood_to_another_is_answered_within_the_wait_bound() {
    let Some(engines) = engines() else { return };
    let max_wait = Duration::from_millis(300);
    let longest_batch = Arc::new(Mutex::new(Duration::ZERO));
    let observer: BatchObserver = {
        let longest = Arc::clone(&longest_batch);
        Arc::new(move |report| {
            let mut longest = longest.lock().expect("lock");
            *longest = (*longest).max(report.elapsed);
        })
    };
    let queue = Arc::new(
        EmbedQueue::start_models(
            Arc::clone(&engines),
            BatchLimits {
                max_batch_tokens: 16384,
                max_batch_requests: Some(16),
            },
            Fairness::with_max_wait(max_wait),
            Some(observer),
        )
        .expect("the queue starts"),
    );
    let mini = engines.index(MINI).expect("mini");
    let xlmr = engines.index(XLMR).expect("xlmr");
    let texts = dev_sentences();
    let flood_tokens = engines
        .engine(mini)
        .tokenize(&texts.iter().map(String::as_str).collect::<Vec<_>>())
        .expect("tokens");
    // Warm both models up, so that the measured wait is the queue's.
    for model in [mini, xlmr] {
        let tokens = engines.engine(model).tokenize(&["warm"]).expect("tokens");
        queue
            .submit_to(model, tokens)
            .expect("queued")
            .wait_blocking()
            .expect("warm-up");
    }
    let flooding = Arc::new(AtomicBool::new(true));
    let flooders: Vec<_> = (0..16)
        .map(|_| {
            let (queue, flooding, tokens) = (
                Arc::clone(&queue),
                Arc::clone(&flooding),
                flood_tokens.clone(),
            );
            std::thread::spawn(move || {
                while flooding.load(Ordering::Relaxed) {
                    queue
                        .submit_to(mini, tokens.clone())
                        .expect("queued")
                        .wait_blocking()
                        .expect("flood answered");
                }
            })
        })
        .collect();
    // Let the flood build a backlog first.
    std::thread::sleep(Duration::from_millis(500));
    let starved = engines
        .engine(xlmr)
        .tokenize(&["a lonely request"])
        .expect("tokens");
    let answer = queue
        .submit_to(xlmr, starved)
        .expect("queued")
        .wait_blocking()
        .expect("answered");
    flooding.store(false, Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().expect("a flooder finished");
    }
    let longest = *longest_batch.lock().expect("lock");
    assert!(
        answer.queue_time <= max_wait + longest,
        "waited {:?}, bound {max_wait:?}, longest batch {longest:?}",
        answer.queue_time
    );
    assert_eq!(answer.vectors.len(), 1);
    assert_eq!(answer.vectors[0].len(), engines.engine(xlmr).dimension());
    queue.shutdown();
}
