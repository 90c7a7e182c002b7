//! The embedding service over real HTTP on loopback: golden vectors through
//! both APIs, request options, every error with its JSON shape, the API key,
//! admission, concurrent clients merged into batches, and a failing weight
//! source that fails its batch alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use surf_engine::source::FetchedComponent;
use surf_engine::{Engine, LocalSource, ModelSpec, VramBudget, WeightSource};
use surf_server::http::{EmbedService, HttpSettings, ServiceSettings};
use surf_tests::{cosine, dev_sentences, load_golden, minilm_dir};

/// One engine for the whole file: services with different settings share it.
fn engine() -> Option<Arc<Engine>> {
    static ENGINE: OnceLock<Option<Arc<Engine>>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let gpu = surf_engine::gpu::gpu_for_tests()?;
            let engine = Engine::builder()
                .model_dir(minilm_dir())
                .normalize(false)
                .gpu(gpu)
                .build()
                .expect("the default model loads");
            Some(Arc::new(engine))
        })
        .clone()
}

/// A service on its own loopback port, served from a thread of its own so
/// that it outlives any one test's runtime.
struct TestServer {
    base: String,
    service: Arc<EmbedService>,
}

fn spawn_server(engine: Arc<Engine>, settings: ServiceSettings, http: HttpSettings) -> TestServer {
    let service = Arc::new(EmbedService::start(engine, settings).expect("the service starts"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.set_nonblocking(true).expect("non-blocking");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let served = Arc::clone(&service);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            surf_server::http::serve(listener, served, &http, std::future::pending())
                .await
                .expect("the server runs");
        });
    });
    TestServer { base, service }
}

/// The service with default settings, shared by the tests that need nothing else.
fn default_server() -> Option<&'static TestServer> {
    static SERVER: OnceLock<Option<TestServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            Some(spawn_server(
                engine()?,
                ServiceSettings::default(),
                HttpSettings::default(),
            ))
        })
        .as_ref()
}

async fn post(base: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .expect("the service answers");
    let status = response.status();
    let text = response.text().await.expect("a body");
    let value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
    (status, value)
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

fn matrix(value: &Value) -> Vec<Vec<f32>> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(floats)
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

/// Asserts a TEI error body of `error_type` with a message.
fn assert_tei_error(body: &Value, error_type: &str) {
    assert_eq!(body["error_type"], error_type, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Asserts an OpenAI error body: `message`, `type`, `param`, `code` all present.
fn assert_openai_error(body: &Value) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].as_str().is_some(), "{body}");
    let fields = error.as_object().expect("an object");
    assert!(
        fields.contains_key("param") && fields.contains_key("code"),
        "{body}"
    );
}

fn assert_golden(vectors: &[Vec<f32>], from: usize) {
    for name in ["minilm-dev.candle.json", "minilm-dev.numpy.json"] {
        let golden = load_golden(name);
        for (i, vector) in vectors.iter().enumerate() {
            let item = &golden.items[from + i];
            let c = cosine(vector, &item.embedding);
            assert!(c >= 0.9999, "{name} line {}: cosine {c}", from + i + 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_vectors_through_embed_and_openai_routes() {
    let Some(server) = default_server() else {
        return;
    };
    let sentences = dev_sentences();
    for (chunk_index, chunk) in sentences.chunks(32).enumerate() {
        let from = chunk_index * 32;
        let (status, body) = post(&server.base, "/embed", json!({ "inputs": chunk })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let tei = matrix(&body);
        assert_eq!(tei.len(), chunk.len());
        for v in &tei {
            assert!((norm(v) - 1.0).abs() < 1e-4, "normalised by default");
        }
        assert_golden(&tei, from);

        let (status, body) = post(
            &server.base,
            "/v1/embeddings",
            json!({ "input": chunk, "model": "all-MiniLM-L6-v2" }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["object"], "list");
        let data = body["data"].as_array().expect("data");
        assert_eq!(data.len(), chunk.len());
        let openai: Vec<Vec<f32>> = data
            .iter()
            .enumerate()
            .map(|(i, d)| {
                assert_eq!(d["object"], "embedding");
                assert_eq!(d["index"], i);
                floats(&d["embedding"])
            })
            .collect();
        assert_golden(&openai, from);

        // base64: the little-endian bytes of exactly the same floats.
        let (status, body) = post(
            &server.base,
            "/v1/embeddings",
            json!({ "input": chunk, "encoding_format": "base64" }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for (d, expected) in body["data"].as_array().expect("data").iter().zip(&openai) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(d["embedding"].as_str().expect("a base64 string"))
                .expect("valid base64");
            let decoded: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(&decoded, expected);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_tokens_and_the_openai_route_has_two_paths() {
    let Some(server) = default_server() else {
        return;
    };
    let golden = load_golden("minilm-dev.candle.json");
    let texts: Vec<&str> = golden.items[..5].iter().map(|i| i.text.as_str()).collect();
    let expected: usize = golden.items[..5].iter().map(|i| i.ids.len()).sum();
    for path in ["/v1/embeddings", "/embeddings"] {
        let (status, body) = post(&server.base, path, json!({ "input": texts })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["usage"]["prompt_tokens"], expected);
        assert_eq!(body["usage"]["total_tokens"], expected);
        assert_eq!(body["model"], "all-MiniLM-L6-v2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimensions_cut_and_renormalise_and_normalize_false_gives_raw_vectors() {
    let Some(server) = default_server() else {
        return;
    };
    let text = "Dimensions are cut before normalising.";
    let (_, body) = post(
        &server.base,
        "/embed",
        json!({ "inputs": text, "normalize": false }),
    )
    .await;
    let raw = matrix(&body).remove(0);
    assert_eq!(raw.len(), 384);
    assert!(
        (norm(&raw) - 1.0).abs() > 1e-3,
        "mean pooling alone is not unit length"
    );

    let (_, body) = post(
        &server.base,
        "/embed",
        json!({ "inputs": text, "dimensions": 16 }),
    )
    .await;
    let cut = matrix(&body).remove(0);
    assert_eq!(cut.len(), 16);
    assert!((norm(&cut) - 1.0).abs() < 1e-5);
    let prefix_norm = norm(&raw[..16]);
    for (c, r) in cut.iter().zip(&raw[..16]) {
        assert!((f64::from(*c) - f64::from(*r) / prefix_norm).abs() < 1e-5);
    }

    let (_, body) = post(
        &server.base,
        "/v1/embeddings",
        json!({ "input": text, "dimensions": 16 }),
    )
    .await;
    assert_eq!(floats(&body["data"][0]["embedding"]), cut);

    for (path, field) in [("/embed", "inputs"), ("/v1/embeddings", "input")] {
        let (status, body) = post(
            &server.base,
            path,
            json!({ field: text, "dimensions": 385 }),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        if path == "/embed" {
            assert_tei_error(&body, "Validation");
        } else {
            assert_openai_error(&body);
            assert_eq!(body["error"]["param"], "dimensions");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_ids_embed_like_their_text_and_an_empty_string_is_valid() {
    let Some(server) = default_server() else {
        return;
    };
    let golden = load_golden("minilm-dev.candle.json");
    let item = &golden.items[3];
    let (status, body) = post(&server.base, "/tokenize", json!({ "inputs": item.text })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<u64> = body[0]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["id"].as_u64().expect("an id"))
        .collect();
    assert_eq!(
        ids,
        item.ids.iter().map(|&i| u64::from(i)).collect::<Vec<_>>()
    );
    assert_eq!(body[0][0]["special"], true);
    assert!(body[0][0]["start"].is_null());

    let (_, body) = post(
        &server.base,
        "/v1/embeddings",
        json!({ "input": [ids.clone()] }),
    )
    .await;
    let from_ids = floats(&body["data"][0]["embedding"]);
    assert!(cosine(&from_ids, &item.embedding) >= 0.9999);
    assert_eq!(body["usage"]["prompt_tokens"], ids.len());
    let (_, body) = post(&server.base, "/embed", json!({ "inputs": ids })).await;
    assert!(cosine(&matrix(&body)[0], &item.embedding) >= 0.9999);

    // An id outside the vocabulary is the caller's error.
    let (status, body) = post(
        &server.base,
        "/embed",
        json!({ "inputs": [[101, 999_999, 102]] }),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_tei_error(&body, "Validation");

    let empty = golden
        .items
        .iter()
        .find(|i| i.text.is_empty())
        .expect("the golden file has an empty line");
    for (path, field) in [("/embed", "inputs"), ("/v1/embeddings", "input")] {
        let (status, body) = post(&server.base, path, json!({ field: "" })).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let vector = if path == "/embed" {
            matrix(&body).remove(0)
        } else {
            floats(&body["data"][0]["embedding"])
        };
        assert!(cosine(&vector, &empty.embedding) >= 0.9999);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_json_shape() {
    let Some(server) = default_server() else {
        return;
    };
    let base = &server.base;
    // Empty list: 400 Empty, on both routes.
    let (status, body) = post(base, "/embed", json!({ "inputs": [] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_tei_error(&body, "Empty");
    let (status, body) = post(base, "/v1/embeddings", json!({ "input": [] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_openai_error(&body);

    // Wrong types and unknown options: 422.
    for (path, body) in [
        ("/embed", json!({ "inputs": 5 })),
        ("/embed", json!({ "inputs": "x", "normalize": "yes" })),
        (
            "/embed",
            json!({ "inputs": "x", "truncation_direction": "Up" }),
        ),
        ("/embed", json!({ "text": "no inputs field" })),
        (
            "/v1/embeddings",
            json!({ "input": "x", "encoding_format": "hex" }),
        ),
        ("/v1/embeddings", json!({ "input": [[-1]] })),
    ] {
        let (status, answer) = post(base, path, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} {body}: {answer}"
        );
        if path == "/embed" {
            assert_tei_error(&answer, "Validation");
        } else {
            assert_openai_error(&answer);
        }
    }

    // Malformed JSON: 400.
    let client = reqwest::Client::new();
    for path in ["/embed", "/v1/embeddings"] {
        let response = client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body("{\"inputs\": [\"unterminated")
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: Value = response.json().await.expect("a JSON error");
        if path == "/embed" {
            assert_tei_error(&body, "Validation");
        } else {
            assert_openai_error(&body);
        }
    }

    // More inputs than --max-client-batch-size (32).
    let many = vec!["a"; 33];
    let (status, body) = post(base, "/embed", json!({ "inputs": many })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_tei_error(&body, "Validation");

    // Too long with truncate false: 422; with truncate (or the default) it is cut.
    let long = "word ".repeat(400);
    let (status, body) = post(base, "/embed", json!({ "inputs": long, "truncate": false })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_tei_error(&body, "Validation");
    let (status, right) = post(base, "/embed", json!({ "inputs": long })).await;
    assert_eq!(status, StatusCode::OK, "{right}");
    let (status, left) = post(
        base,
        "/embed",
        json!({ "inputs": format!("first {long}"), "truncation_direction": "Left" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{left}");
    assert_eq!(matrix(&right)[0].len(), 384);

    // Over the payload limit (2 MB): 413.
    let huge = "x".repeat(2_100_000);
    let (status, body) = post(base, "/embed", json!({ "inputs": huge })).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_tei_error(&body, "Validation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_health_and_metrics_describe_the_service() {
    let Some(server) = default_server() else {
        return;
    };
    let client = reqwest::Client::new();
    let info: Value = client
        .get(format!("{}/info", server.base))
        .send()
        .await
        .expect("info")
        .json()
        .await
        .expect("JSON");
    assert_eq!(info["model_id"], "all-MiniLM-L6-v2");
    assert_eq!(info["dimension"], 384);
    assert_eq!(info["max_input_length"], 256);
    assert_eq!(info["pooling"], "mean");
    assert_eq!(info["max_batch_tokens"], 16384);
    assert_eq!(info["max_client_batch_size"], 32);
    assert!(info["adapter"].as_str().is_some_and(|a| !a.is_empty()));
    let health = client
        .get(format!("{}/health", server.base))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), StatusCode::OK);
    let metrics = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "surf_http_requests_total",
        "surf_http_request_duration_seconds",
        "surf_queue_size",
        "surf_queue_duration_seconds",
        "surf_inference_duration_seconds",
        "surf_batch_size",
        "surf_batch_tokens",
        "surf_pager_vram_hits_total",
        "surf_pager_evictions_total",
        "surf_pager_fetched_bytes_total",
        "surf_pager_uploaded_bytes_total",
    ] {
        assert!(
            metrics.contains(&format!("\n{name}")),
            "{name} missing from:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_every_route_but_health_and_metrics() {
    let Some(engine) = engine() else { return };
    let server = spawn_server(
        engine,
        ServiceSettings::default(),
        HttpSettings {
            api_key: Some("s3cret".into()),
            ..HttpSettings::default()
        },
    );
    let client = reqwest::Client::new();
    let body = json!({ "inputs": "guarded" });
    for key in [None, Some("wrong")] {
        let mut request = client.post(format!("{}/embed", server.base)).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("answer");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_tei_error(&response.json().await.expect("JSON"), "Unauthorized");
    }
    let response = client
        .post(format!("{}/v1/embeddings", server.base))
        .json(&json!({ "input": "guarded" }))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_openai_error(&response.json().await.expect("JSON"));
    let response = client
        .post(format!("{}/embed", server.base))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    for open in ["/health", "/metrics"] {
        let response = client
            .get(format!("{}{open}", server.base))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::OK, "{open}");
    }
    let response = client
        .get(format!("{}/info", server.base))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_limit_are_refused_at_once() {
    let Some(engine) = engine() else { return };
    let server = spawn_server(
        engine,
        ServiceSettings {
            max_concurrent_requests: 2,
            ..ServiceSettings::default()
        },
        HttpSettings::default(),
    );
    // Two requests in flight, held here.
    let held = [
        server.service.admit().expect("first"),
        server.service.admit().expect("second"),
    ];
    let (status, body) = post(&server.base, "/embed", json!({ "inputs": "one too many" })).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_tei_error(&body, "Overloaded");
    let (status, body) = post(
        &server.base,
        "/v1/embeddings",
        json!({ "input": "one too many" }),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_openai_error(&body);
    drop(held);
    let (status, _) = post(&server.base, "/embed", json!({ "inputs": "room again" })).await;
    assert_eq!(status, StatusCode::OK);
}

/// Reads `name_sum` and `name_count` from a metrics exposition, summed
/// over every label set (one per model).
fn histogram_mean(metrics: &str, name: &str) -> f64 {
    let value = |suffix: &str| -> f64 {
        let series = format!("{name}_{suffix}");
        let values: Vec<f64> = metrics
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&series)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                value.trim().parse::<f64>().ok()
            })
            .collect();
        assert!(!values.is_empty(), "{series} missing");
        values.iter().sum()
    };
    value("sum") / value("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_clients_get_their_own_vectors_in_shared_batches() {
    let Some(engine) = engine() else { return };
    let server = spawn_server(engine, ServiceSettings::default(), HttpSettings::default());
    let golden = Arc::new(load_golden("minilm-dev.candle.json"));
    let clients: Vec<_> = (0..32)
        .map(|client| {
            let base = server.base.clone();
            let golden = Arc::clone(&golden);
            tokio::spawn(async move {
                // Mixed lengths: each client sends 1 to 4 lines from its own place.
                let from = (client * 7) % (golden.items.len() - 4);
                let count = 1 + client % 4;
                let texts: Vec<&str> = golden.items[from..from + count]
                    .iter()
                    .map(|i| i.text.as_str())
                    .collect();
                let (status, body) = post(&base, "/embed", json!({ "inputs": texts })).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                let vectors = matrix(&body);
                assert_eq!(vectors.len(), count);
                for (i, v) in vectors.iter().enumerate() {
                    let c = cosine(v, &golden.items[from + i].embedding);
                    assert!(c >= 0.9999, "client {client} input {i}: cosine {c}");
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("the client finished");
    }
    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let mean = histogram_mean(&metrics, "surf_batch_size");
    eprintln!("mean inputs per batch: {mean:.2}");
    assert!(
        mean > 1.0,
        "batches were not merged: mean {mean}\n{metrics}"
    );
}

/// A model folder whose layer fetches fail while `failing` is set.
struct FlakySource {
    inner: LocalSource,
    failing: AtomicBool,
}

impl WeightSource for FlakySource {
    fn origin(&self) -> String {
        self.inner.origin()
    }
    fn spec(&self) -> surf_engine::Result<ModelSpec> {
        self.inner.spec()
    }
    fn model_id(&self) -> String {
        self.inner.model_id()
    }
    fn fetch(&self, component: &str) -> surf_engine::Result<FetchedComponent> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(surf_engine::Error::WeightSource(format!(
                "{component}: the source is down (injected)"
            )));
        }
        self.inner.fetch(component)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_weight_source_fails_its_batch_alone_and_the_service_recovers() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let source = Arc::new(FlakySource {
        inner: LocalSource::open(&minilm_dir()).expect("the model opens"),
        failing: AtomicBool::new(false),
    });
    // One layer slot and no host cache: every pass fetches every layer.
    let engine = Engine::builder()
        .source(Arc::clone(&source) as Arc<dyn WeightSource>)
        .vram_budget(VramBudget::Layers(1))
        .host_cache_bytes(0)
        .normalize(false)
        .gpu(gpu)
        .build()
        .expect("the engine builds");
    let server = spawn_server(
        Arc::new(engine),
        ServiceSettings::default(),
        HttpSettings::default(),
    );
    let golden = load_golden("minilm-dev.candle.json");
    let first = &golden.items[1];
    let (status, _) = post(&server.base, "/embed", json!({ "inputs": first.text })).await;
    assert_eq!(status, StatusCode::OK);

    source.failing.store(true, Ordering::SeqCst);
    let (status, body) = post(
        &server.base,
        "/embed",
        json!({ "inputs": golden.items[2].text }),
    )
    .await;
    assert_eq!(status, StatusCode::FAILED_DEPENDENCY, "{body}");
    assert_tei_error(&body, "Backend");
    let (status, body) = post(
        &server.base,
        "/v1/embeddings",
        json!({ "input": golden.items[2].text }),
    )
    .await;
    assert_eq!(status, StatusCode::FAILED_DEPENDENCY, "{body}");
    assert_openai_error(&body);
    let health = reqwest::get(format!("{}/health", server.base))
        .await
        .expect("health");
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_tei_error(&health.json().await.expect("JSON"), "Unhealthy");

    source.failing.store(false, Ordering::SeqCst);
    let health = reqwest::get(format!("{}/health", server.base))
        .await
        .expect("health");
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "a probe batch finds the source back"
    );
    // The next answers are this request's vectors, not a previous batch's.
    for item in &golden.items[4..7] {
        let (status, body) = post(&server.base, "/embed", json!({ "inputs": item.text })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let c = cosine(&matrix(&body)[0], &item.embedding);
        assert!(c >= 0.9999, "after recovery: cosine {c}");
    }
}
