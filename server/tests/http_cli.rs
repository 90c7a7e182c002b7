//! `surf http` as a user runs it: a graceful stop that answers the requests
//! in flight, a service streaming its weights from `surf serve` under a
//! two-layer budget, a local model and one named on a two-model weight
//! server served side by side, and the official `openai` Python client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_dir() -> PathBuf {
    let dir = root().join("assets/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run `bash assets/fetch-model.sh` first",
        dir.display()
    );
    dir
}

fn has_gpu() -> bool {
    surf_engine::gpu::gpu_for_tests().is_some()
}

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}

/// Starts `surf <args>` and returns it with the address its first stdout
/// line announces after `prefix`.
fn start(args: &[&str], prefix: &str) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_surf"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("surf starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("a first line");
    let addr = line
        .trim_end()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Running(child), addr)
}

fn start_http(extra: &[&str]) -> (Running, String) {
    let mut args = vec!["http", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (child, addr) = start(&args, "listening on http://");
    (child, format!("http://{addr}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let response = client
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

fn vectors(body: &Value) -> Vec<Vec<f64>> {
    body.as_array()
        .expect("an array of vectors")
        .iter()
        .map(|v| {
            v.as_array()
                .expect("a vector")
                .iter()
                .map(|x| x.as_f64().expect("a number"))
                .collect()
        })
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `(text, embedding)` of each golden line.
fn golden() -> Vec<(String, Vec<f64>)> {
    reference(&root().join("../shared/golden/minilm-dev.candle.json"))
}

/// `(text, embedding)` of each item of a reference file.
fn reference(path: &Path) -> Vec<(String, Vec<f64>)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: Value = serde_json::from_str(&text).expect("golden JSON");
    value["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            let text = item["text"].as_str().expect("text").to_string();
            let embedding = item["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .map(|x| x.as_f64().expect("a number"))
                .collect();
            (text, embedding)
        })
        .collect()
}

/// Reads one unlabelled sample from a metrics exposition.
/// The value of `name`, summed over its label sets (one per model).
fn sample(metrics: &str, name: &str) -> f64 {
    let values: Vec<f64> = metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .collect();
    assert!(!values.is_empty(), "{name} missing from\n{metrics}");
    values.iter().sum()
}

#[test]
fn sigterm_answers_every_accepted_request_then_exits_0() {
    if !has_gpu() {
        return;
    }
    let model = model_dir();
    let (mut service, base) = start_http(&["--model", model.to_str().expect("a UTF-8 path")]);
    let runtime = runtime();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let text =
            "A sentence long enough to keep the engine busy for a while, repeated. ".repeat(3);
        let requests: Vec<_> = (0..8)
            .map(|_| {
                let client = client.clone();
                let url = format!("{base}/embed");
                let body = json!({ "inputs": vec![text.clone(); 32] });
                tokio::spawn(async move { post(&client, url, body).await })
            })
            .collect();
        // Stop only once requests are queued behind the running batch.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let metrics = client
                .get(format!("{base}/metrics"))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            if sample(&metrics, "surf_queue_size") > 0.0 {
                break;
            }
            assert!(Instant::now() < deadline, "no request was ever queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        service.terminate();
        for request in requests {
            let (status, body) = request.await.expect("the client task");
            assert_eq!(status, 200, "{body}");
            assert_eq!(vectors(&body).len(), 32);
        }
    });
    let exit = service.0.wait().expect("surf exits");
    assert!(exit.success(), "surf http exits 0 after SIGTERM: {exit:?}");
}

#[test]
fn a_service_streaming_from_a_weight_server_under_two_layers_gives_golden_vectors() {
    if !has_gpu() {
        return;
    }
    let scratch = tempfile::tempdir().expect("a temp dir");
    let cert = scratch.path().join("server.pem");
    let model = model_dir();
    let (_weights, weight_addr) = start(
        &[
            "serve",
            "--model",
            model.to_str().expect("a UTF-8 path"),
            "--listen",
            "127.0.0.1:0",
            "--cert-out",
            cert.to_str().expect("a UTF-8 path"),
        ],
        "listening on ",
    );
    let (_service, base) = start_http(&[
        "--server",
        &weight_addr,
        "--server-cert",
        cert.to_str().expect("a UTF-8 path"),
        "--cache-layers",
        "2",
        "--host-cache-mb",
        "0",
    ]);
    let golden = golden();
    runtime().block_on(async {
        let client = reqwest::Client::new();
        let info: Value = client
            .get(format!("{base}/info"))
            .send()
            .await
            .expect("info")
            .json()
            .await
            .expect("JSON");
        assert_eq!(info["vram_layer_slots"], 2, "{info}");
        assert!(
            info["model_sha"].is_string(),
            "the weight server's revision: {info}"
        );
        for (chunk_index, chunk) in golden.chunks(32).enumerate() {
            let texts: Vec<&str> = chunk.iter().map(|(text, _)| text.as_str()).collect();
            let (status, body) =
                post(&client, format!("{base}/embed"), json!({ "inputs": texts })).await;
            assert_eq!(status, 200, "{body}");
            for (i, (v, (_, expected))) in vectors(&body).iter().zip(chunk).enumerate() {
                let c = cosine(v, expected);
                assert!(c >= 0.9999, "line {}: cosine {c}", chunk_index * 32 + i + 1);
            }
        }
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(
            sample(&metrics, "surf_pager_evictions_total") > 0.0,
            "two slots for six layers evict: {metrics}"
        );
    });
}

/// A Python with the `openai` package: `SURF_OPENAI_PYTHON`, or the virtual
/// environment `assets/setup.sh` makes.
fn openai_python() -> Option<PathBuf> {
    let candidate = std::env::var_os("SURF_OPENAI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("assets/.venv/bin/python"));
    let works = |python: &Path| {
        Command::new(python)
            .args(["-c", "import openai, numpy"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&candidate) {
        return Some(candidate);
    }
    let message = format!(
        "no Python with openai and numpy at {} (bash assets/setup.sh makes one)",
        candidate.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {message}");
    }
    eprintln!("skipping the openai client test: {message}");
    None
}

const OPENAI_CLIENT: &str = r#"
import json, sys
import openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2])
texts = json.loads(sys.argv[3])
answer = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
one = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], dimensions=8)
try:
    client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], dimensions=4096)
    refused = None
except openai.UnprocessableEntityError as error:
    refused = error.status_code
print(json.dumps({
    "vectors": [list(map(float, d.embedding)) for d in answer.data],
    "indices": [d.index for d in answer.data],
    "prompt_tokens": answer.usage.prompt_tokens,
    "model": answer.model,
    "short": list(map(float, one.data[0].embedding)),
    "refused": refused,
}))
"#;

#[test]
fn the_official_openai_python_client_works_unchanged() {
    let Some(python) = openai_python() else {
        return;
    };
    if !has_gpu() {
        return;
    }
    let model = model_dir();
    let (_service, base) = start_http(&[
        "--model",
        model.to_str().expect("a UTF-8 path"),
        "--api-key",
        "sk-local",
    ]);
    let texts = ["The quick brown fox.", "", "Vectors travel as base64."];
    let output = Command::new(&python)
        .args(["-c", OPENAI_CLIENT, &base, "sk-local"])
        .arg(serde_json::to_string(&texts).expect("JSON"))
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "the client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).expect("the script prints JSON");
    assert_eq!(answer["indices"], json!([0, 1, 2]));
    assert_eq!(answer["model"], "all-MiniLM-L6-v2");
    assert_eq!(answer["refused"], 422);
    assert_eq!(answer["short"].as_array().map(Vec::len), Some(8));
    let from_client = vectors(&answer["vectors"]);

    let expected = runtime().block_on(async {
        let response = reqwest::Client::new()
            .post(format!("{base}/embed"))
            .bearer_auth("sk-local")
            .json(&json!({ "inputs": texts }))
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), 200);
        vectors(&response.json().await.expect("JSON"))
    });
    assert_eq!(from_client.len(), 3);
    let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    for (got, want) in from_client.iter().zip(&expected) {
        // The client decoded base64: the same f32 values, bit for bit.
        assert_eq!(as_f32(got), as_f32(want));
    }
    let tokens = answer["prompt_tokens"].as_u64().expect("usage");
    assert!(
        tokens >= 3 * 2,
        "at least [CLS] and [SEP] per input: {tokens}"
    );
}

#[test]
fn the_xlm_roberta_fixture_through_the_service_matches_sentence_transformers() {
    if !has_gpu() {
        return;
    }
    let model = root().join("../shared/fixtures/xlmr");
    let (_service, base) = start_http(&["--model", model.to_str().expect("a UTF-8 path")]);
    let expected = reference(&model.join("reference.json"));
    runtime().block_on(async {
        let client = reqwest::Client::new();
        let texts: Vec<&str> = expected.iter().map(|(text, _)| text.as_str()).collect();
        let (status, body) =
            post(&client, format!("{base}/embed"), json!({ "inputs": texts })).await;
        assert_eq!(status, 200, "{body}");
        for (i, (v, (_, reference))) in vectors(&body).iter().zip(&expected).enumerate() {
            let c = cosine(v, reference);
            assert!(c >= 0.9999, "line {}: cosine {c}", i + 1);
        }
        // The OpenAI route, one text.
        let (status, body) = post(
            &client,
            format!("{base}/v1/embeddings"),
            json!({ "input": expected[1].0, "model": "xlmr" }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let vector: Vec<f64> = body["data"][0]["embedding"]
            .as_array()
            .expect("an embedding")
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect();
        assert!(cosine(&vector, &expected[1].1) >= 0.9999);
    });
}

/// `surf serve` with two models and `surf http` serving one of them by name
/// beside a local folder, under one VRAM budget: the models are listed,
/// each answers by its name, and a name not served is 404.
#[test]
fn a_service_of_a_local_model_and_one_named_on_a_two_model_weight_server() {
    if !has_gpu() {
        return;
    }
    let scratch = tempfile::tempdir().expect("a temp dir");
    let cert = scratch.path().join("server.pem");
    let mini = format!("mini={}", model_dir().display());
    let xlmr = format!("xlmr={}", surf_tests::fixture_dir("xlmr").display());
    let (_weights, weight_addr) = start(
        &[
            "serve",
            "--model",
            &mini,
            "--model",
            &xlmr,
            "--listen",
            "127.0.0.1:0",
            "--cert-out",
            cert.to_str().expect("a UTF-8 path"),
        ],
        "listening on ",
    );
    let local = format!("local={}", model_dir().display());
    let (_service, base) = start_http(&[
        "--model",
        &local,
        "--server",
        &weight_addr,
        "--server-cert",
        cert.to_str().expect("a UTF-8 path"),
        "--serve-model",
        "xlmr",
        "--dtype",
        "f16",
        "--vram-budget-mb",
        "64",
        "--host-cache-mb",
        "16",
    ]);
    runtime().block_on(async {
        let client = reqwest::Client::new();
        let models: Value = client
            .get(format!("{base}/v1/models"))
            .send()
            .await
            .expect("models")
            .json()
            .await
            .expect("JSON");
        let ids: Vec<&str> = models["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert_eq!(ids, ["local", "xlmr"], "{models}");
        for (model, dimension) in [("local", 384), ("xlmr", 96)] {
            let (status, body) = post(
                &client,
                format!("{base}/v1/embeddings"),
                json!({ "model": model, "input": ["Weights surf in over QUIC."] }),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["model"], model);
            let vector = body["data"][0]["embedding"].as_array().expect("a vector");
            assert_eq!(vector.len(), dimension, "{model}");
        }
        let (status, body) = post(
            &client,
            format!("{base}/v1/embeddings"),
            json!({ "model": "mini", "input": "served by the weight server, not here" }),
        )
        .await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "model_not_found");
    });
}

#[test]
fn prompts_by_name_on_embed_and_by_default_on_the_openai_route() {
    if !has_gpu() {
        return;
    }
    let model = root().join("../shared/fixtures/qwen3");
    let (_service, base) = start_http(&[
        "--model",
        model.to_str().expect("a UTF-8 path"),
        "--default-prompt-name",
        "query",
    ]);
    let plain = reference(&model.join("reference.json"));
    let prompted = reference(&model.join("reference-prompt-query.json"));
    runtime().block_on(async {
        let client = reqwest::Client::new();
        let texts: Vec<&str> = plain
            .iter()
            .take(4)
            .map(|(text, _)| text.as_str())
            .collect();
        // The server's default prompt, then the empty `document` prompt by name.
        for (body, expected) in [
            (json!({ "inputs": texts }), &prompted),
            (
                json!({ "inputs": texts, "prompt_name": "document" }),
                &plain,
            ),
        ] {
            let (status, answer) = post(&client, format!("{base}/embed"), body).await;
            assert_eq!(status, 200, "{answer}");
            for (i, v) in vectors(&answer).iter().enumerate() {
                let c = cosine(v, &expected[i].1);
                assert!(c >= 0.9999, "line {}: cosine {c}", i + 1);
            }
        }
        let (status, answer) = post(
            &client,
            format!("{base}/v1/embeddings"),
            json!({ "input": texts[1], "model": "qwen3" }),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let vector: Vec<f64> = answer["data"][0]["embedding"]
            .as_array()
            .expect("an embedding")
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect();
        assert!(cosine(&vector, &prompted[1].1) >= 0.9999);
        // An unknown name is the client's error, naming the model's prompts.
        let (status, answer) = post(
            &client,
            format!("{base}/embed"),
            json!({ "inputs": texts, "prompt_name": "passage" }),
        )
        .await;
        assert_eq!(status, 422, "{answer}");
        let message = answer["error"].as_str().expect("an error message");
        assert!(
            message.contains("passage") && message.contains("document, query"),
            "{message}"
        );
    });
}
