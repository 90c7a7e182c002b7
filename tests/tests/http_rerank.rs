//! Cross-encoders over real HTTP on loopback: TEI's `/rerank` and
//! `/predict`, the Cohere/Jina-style `/v1/rerank`, `/info`, the wrong-route
//! errors in each API's shape, per-route metrics, and concurrent clients
//! whose pairs share batches yet each get their own scores.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use reqwest::StatusCode;
use serde_json::{Value, json};
use surf_engine::synth::{SynthFamily, SynthSpec, write_model};
use surf_engine::{ClassifierInput, Engine, ScoreOptions};
use surf_server::http::{EmbedService, HttpSettings, ServiceSettings};
use surf_tests::{PairReference, fixture_dir, minilm_dir, pair_references};

const TOLERANCE: f64 = 1e-3;

/// A service on its own loopback port, served from a thread of its own so
/// that it outlives any one test's runtime.
struct TestServer {
    base: String,
    engine: Arc<Engine>,
}

fn spawn(engine: Engine) -> TestServer {
    let engine = Arc::new(engine);
    let service = Arc::new(
        EmbedService::start(Arc::clone(&engine), ServiceSettings::default())
            .expect("the service starts"),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.set_nonblocking(true).expect("non-blocking");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let http = HttpSettings::default();
            surf_server::http::serve(listener, service, &http, std::future::pending())
                .await
                .expect("the server runs");
        });
    });
    TestServer { base, engine }
}

fn load(dir: PathBuf) -> Option<Engine> {
    let gpu = surf_engine::gpu::gpu_for_tests()?;
    Some(
        Engine::builder()
            .model_dir(&dir)
            .gpu(gpu)
            .build()
            .unwrap_or_else(|e| panic!("{} loads: {e}", dir.display())),
    )
}

fn reranker() -> Option<&'static TestServer> {
    static SERVER: OnceLock<Option<TestServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| load(fixture_dir("bert-reranker")).map(spawn))
        .as_ref()
}

fn embedder() -> Option<&'static TestServer> {
    static SERVER: OnceLock<Option<TestServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| load(minilm_dir()).map(spawn))
        .as_ref()
}

/// A BERT sequence classifier with three labels and random weights.
fn classifier() -> Option<&'static TestServer> {
    static SERVER: OnceLock<Option<TestServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir").keep();
            let mut spec = SynthSpec::sized(2, 32, 4, 64);
            spec.family = SynthFamily::Bert;
            spec.labels = Some(3);
            let tokenizer = std::fs::read(minilm_dir().join("tokenizer.json")).expect("tokenizer");
            write_model(&dir, &spec, &tokenizer).expect("the classifier is written");
            load(dir).map(spawn)
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

async fn get(base: &str, path: &str) -> String {
    reqwest::get(format!("{base}{path}"))
        .await
        .expect("the service answers")
        .text()
        .await
        .expect("a body")
}

fn number(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("a number: {value}"))
}

/// The reference pairs grouped by query, in file order.
fn groups(references: &[PairReference]) -> Vec<(String, Vec<&PairReference>)> {
    let mut groups: Vec<(String, Vec<&PairReference>)> = Vec::new();
    for reference in references {
        match groups
            .iter_mut()
            .find(|(query, _)| *query == reference.query)
        {
            Some((_, members)) => members.push(reference),
            None => groups.push((reference.query.clone(), vec![reference])),
        }
    }
    groups
}

/// Checks a `/rerank` answer: every passage once, highest score first, each
/// score its reference's.
fn assert_ranks(ranks: &Value, members: &[&PairReference], raw: bool) {
    let ranks = ranks.as_array().expect("a list of ranks");
    assert_eq!(ranks.len(), members.len());
    let mut seen = vec![false; members.len()];
    let mut previous = f64::INFINITY;
    for rank in ranks {
        let index = rank["index"].as_u64().expect("an index") as usize;
        assert!(!seen[index], "index {index} twice");
        seen[index] = true;
        let score = number(&rank["score"]);
        assert!(score <= previous, "sorted: {ranks:?}");
        previous = score;
        let reference = members[index];
        let expected = f64::from(if raw {
            reference.raw_score
        } else {
            reference.score
        });
        assert!(
            (score - expected).abs() <= TOLERANCE,
            "{score} vs {expected} for {reference:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_scores_match_sentence_transformers_batched_and_one_at_a_time() {
    let Some(server) = reranker() else { return };
    let references = pair_references("bert-reranker");
    for (query, members) in groups(&references) {
        let texts: Vec<&str> = members.iter().map(|r| r.passage.as_str()).collect();
        let (status, body) = post(
            &server.base,
            "/rerank",
            json!({ "query": query, "texts": texts, "return_text": true }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_ranks(&body, &members, false);
        for rank in body.as_array().expect("ranks") {
            let index = rank["index"].as_u64().expect("index") as usize;
            assert_eq!(
                rank["text"], texts[index],
                "return_text gives the text back"
            );
        }
    }
    for reference in &references {
        let (status, body) = post(
            &server.base,
            "/rerank",
            json!({ "query": reference.query, "texts": [reference.passage], "raw_scores": true }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_ranks(&body, &[reference], true);
        assert!(
            body[0].get("text").is_none(),
            "no text unless asked: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohere_rerank_answers_the_top_n_with_their_documents() {
    let Some(server) = reranker() else { return };
    let references = pair_references("bert-reranker");
    let (query, members) = groups(&references)
        .into_iter()
        .max_by_key(|(_, members)| members.len())
        .expect("groups");
    assert!(members.len() >= 3);
    // Documents as strings and as objects, as Cohere and Jina clients send them.
    let documents: Vec<Value> = members
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if i % 2 == 0 {
                json!(r.passage)
            } else {
                json!({ "text": r.passage })
            }
        })
        .collect();
    let (status, body) = post(
        &server.base,
        "/v1/rerank",
        json!({ "model": "any", "query": query, "documents": documents,
                "top_n": 2, "return_documents": true }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "top_n: {body}");
    let mut best: Vec<(usize, f32)> = members.iter().map(|r| r.score).enumerate().collect();
    best.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (result, (index, score)) in results.iter().zip(&best) {
        assert_eq!(result["index"], *index, "{body}");
        assert!((number(&result["relevance_score"]) - f64::from(*score)).abs() <= TOLERANCE);
        assert_eq!(result["document"]["text"], members[*index].passage);
    }
    assert!(
        body["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|t| t > 0),
        "{body}"
    );
    assert!(body["model"].is_string(), "{body}");

    let (status, body) = post(
        &server.base,
        "/v1/rerank",
        json!({ "query": query, "documents": [members[0].passage] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["results"][0].get("document").is_none(), "{body}");

    let (status, body) = post(
        &server.base,
        "/v1/rerank",
        json!({ "query": query, "documents": ["a"], "top_n": 0 }),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["param"], "top_n", "{body}");
}

/// The softmax of `logits`, in f64.
fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

fn by_label(predictions: &Value) -> BTreeMap<String, f64> {
    let predictions = predictions.as_array().expect("predictions");
    let scores: Vec<f64> = predictions.iter().map(|p| number(&p["score"])).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "sorted: {predictions:?}"
    );
    predictions
        .iter()
        .map(|p| {
            (
                p["label"].as_str().expect("label").to_string(),
                number(&p["score"]),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_gives_a_classifier_softmax_over_its_labels() {
    let Some(server) = classifier() else { return };
    let inputs = json!(["a text to classify", ["a first text", "and its pair"]]);
    let (status, body) = post(&server.base, "/predict", json!({ "inputs": inputs })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, raw) = post(
        &server.base,
        "/predict",
        json!({ "inputs": inputs, "raw_scores": true }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{raw}");
    let library = server
        .engine
        .predict(
            &[
                ClassifierInput::Text("a text to classify"),
                ClassifierInput::Pair("a first text", "and its pair"),
            ],
            ScoreOptions {
                raw_scores: true,
                ..ScoreOptions::default()
            },
        )
        .expect("predict");
    let labels = ["LABEL_0", "LABEL_1", "LABEL_2"];
    for ((scores, raw), logits) in body
        .as_array()
        .expect("a batch")
        .iter()
        .zip(raw.as_array().expect("a batch"))
        .zip(&library)
    {
        let scores = by_label(scores);
        let raw = by_label(raw);
        assert_eq!(
            scores.keys().collect::<Vec<_>>(),
            labels,
            "every label once"
        );
        let logits: BTreeMap<&str, f64> = logits
            .iter()
            .map(|p| (p.label.as_str(), f64::from(p.score)))
            .collect();
        let ordered: Vec<f64> = labels.iter().map(|l| raw[*l]).collect();
        for (label, expected) in labels.iter().zip(softmax(&ordered)) {
            assert!(
                (scores[*label] - expected).abs() < 1e-5,
                "{scores:?} {raw:?}"
            );
            assert!(
                (raw[*label] - logits[label]).abs() < 1e-4,
                "{raw:?} {logits:?}"
            );
        }
        let total: f64 = scores.values().sum();
        assert!((total - 1.0).abs() < 1e-5, "{scores:?}");
    }

    // One text alone answers one list, not a batch.
    let (status, body) = post(&server.base, "/predict", json!({ "inputs": "alone" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(by_label(&body).len(), 3, "{body}");

    let info: Value = serde_json::from_str(&get(&server.base, "/info").await).expect("JSON");
    assert_eq!(info["model_type"], "classifier", "{info}");
    assert_eq!(info["labels"], json!(labels), "{info}");
    assert_eq!(info["dimension"], 3, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_on_a_reranker_scores_a_pair_with_its_sigmoid() {
    let Some(server) = reranker() else { return };
    let reference = &pair_references("bert-reranker")[0];
    let (status, body) = post(
        &server.base,
        "/predict",
        json!({ "inputs": [reference.query, reference.passage] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["label"], "LABEL_0", "{body}");
    assert!((number(&body[0]["score"]) - f64::from(reference.score)).abs() <= TOLERANCE);
    let info: Value = serde_json::from_str(&get(&server.base, "/info").await).expect("JSON");
    assert_eq!(info["model_type"], "reranker", "{info}");
    assert_eq!(info["labels"], json!(["LABEL_0"]), "{info}");
}

fn assert_tei_error(status: StatusCode, body: &Value, expected: StatusCode, error_type: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error_type"], error_type, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn assert_openai_error(status: StatusCode, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["type"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_refuses_a_model_it_cannot_serve_in_its_apis_shape() {
    let (Some(reranker), Some(embedder), Some(classifier)) = (reranker(), embedder(), classifier())
    else {
        return;
    };
    let dependency = StatusCode::FAILED_DEPENDENCY;
    let rerank = json!({ "query": "q", "texts": ["p"] });
    let cohere = json!({ "query": "q", "documents": ["p"] });
    let (status, body) = post(&reranker.base, "/embed", json!({ "inputs": "t" })).await;
    assert_tei_error(status, &body, dependency, "Backend");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("embedding")),
        "{body}"
    );
    let (status, body) = post(&reranker.base, "/v1/embeddings", json!({ "input": "t" })).await;
    assert_openai_error(status, &body, dependency);
    let (status, body) = post(&embedder.base, "/rerank", rerank.clone()).await;
    assert_tei_error(status, &body, dependency, "Backend");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("re-ranker")),
        "{body}"
    );
    let (status, body) = post(&embedder.base, "/predict", json!({ "inputs": "t" })).await;
    assert_tei_error(status, &body, dependency, "Backend");
    let (status, body) = post(&embedder.base, "/v1/rerank", cohere).await;
    assert_openai_error(status, &body, dependency);
    // A classifier with several labels ranks nothing.
    let (status, body) = post(&classifier.base, "/rerank", rerank).await;
    assert_tei_error(status, &body, dependency, "Backend");
    let info: Value = serde_json::from_str(&get(&embedder.base, "/info").await).expect("JSON");
    assert_eq!(info["model_type"], "embedding", "{info}");
    assert!(info.get("labels").is_none(), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rerank_requests_get_teis_errors() {
    let Some(server) = reranker() else { return };
    let (status, body) = post(
        &server.base,
        "/rerank",
        json!({ "query": "q", "texts": [] }),
    )
    .await;
    assert_tei_error(status, &body, StatusCode::BAD_REQUEST, "Empty");
    let texts = vec!["p"; ServiceSettings::default().max_client_batch_size + 1];
    let (status, body) = post(
        &server.base,
        "/rerank",
        json!({ "query": "q", "texts": texts }),
    )
    .await;
    assert_tei_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Validation",
    );
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("max-client-batch-size"))
    );
    let (status, body) = post(&server.base, "/rerank", json!({ "texts": ["p"] })).await;
    assert_tei_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Validation",
    );
    let long = "word ".repeat(2000);
    let (status, body) = post(
        &server.base,
        "/rerank",
        json!({ "query": "q", "texts": [long], "truncate": false }),
    )
    .await;
    assert_tei_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Validation",
    );
    // Truncated, the same pair is scored.
    let (status, body) = post(
        &server.base,
        "/rerank",
        json!({ "query": "q", "texts": [long], "truncate": true, "truncation_direction": "Left" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&server.base, "/predict", json!({ "inputs": [] })).await;
    assert_tei_error(status, &body, StatusCode::BAD_REQUEST, "Empty");
    let metrics = get(&server.base, "/metrics").await;
    for route in ["/rerank", "/predict"] {
        assert!(
            metrics.contains(&format!("route=\"{route}\"")),
            "{route} counted in the metrics"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_clients_each_get_their_own_scores() {
    let Some(server) = reranker() else { return };
    let references = pair_references("bert-reranker");
    let groups = groups(&references);
    let mut clients = Vec::new();
    for client in 0..16 {
        let (query, members) = groups[client % groups.len()].clone();
        // Each client sends its passages in an order of its own.
        let mut members: Vec<PairReference> = members.into_iter().cloned().collect();
        let shift = client % members.len();
        members.rotate_left(shift);
        let base = server.base.clone();
        clients.push(tokio::spawn(async move {
            let texts: Vec<&str> = members.iter().map(|r| r.passage.as_str()).collect();
            let (status, body) =
                post(&base, "/rerank", json!({ "query": query, "texts": texts })).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let members: Vec<&PairReference> = members.iter().collect();
            assert_ranks(&body, &members, false);
        }));
    }
    for client in clients {
        client.await.expect("the client succeeds");
    }
}
