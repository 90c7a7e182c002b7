//! The HTTP embedding service under load: embeddings per second and p50/p99
//! latency of `POST /embed`, one short text (about ten tokens) a request, at
//! 1, 8, 32 and 64 concurrent clients, next to `Engine::infer` in the same
//! process on the same inputs and the same engine.
//!
//! The service runs in this process on loopback, axum on a tokio runtime of
//! two workers with the engine's queue behind it; the clients share one
//! `reqwest::Client` on a runtime of their own. Each client is a closed loop:
//! it sends its next request once it has parsed the answer to the last, so a
//! latency is what a caller sees, JSON both ways included. Criterion samples
//! the in-process side (one text a call, and 32 texts a call). Its model, one
//! routine timed on its own, does not fit clients that share one queue and
//! shape each other's batches, so each HTTP level is a plain timed run of a
//! fixed number of requests, sized from the level's warm-up to last about
//! six seconds.
//!
//! Before any timing, the vectors the service answers are checked against the
//! engine's own (cosine >= 0.9999), so that both sides compute the same thing.
//! Two ratios are printed and written, never asserted: HTTP throughput at
//! concurrency 32 over `Engine::infer` on 32 texts at once (how much of a
//! batch the caller formed itself the queue recovers from separate requests),
//! and HTTP p50 at concurrency 1 over `Engine::infer` on one text (what HTTP,
//! JSON and the queue add to a lone request). The mean inputs per batch of
//! each level, from the service's `/metrics`, shows the queue merging
//! requests. A table follows on stdout and the figures go to
//! `bench-out/http.json`. `SURF_BENCH_QUICK=1` skips criterion and sends a
//! few requests per level.
//!
//! Reranking follows: a BERT cross-encoder of MiniLM's shape (random weights,
//! one label) scores 20 passages a call through `Engine::rerank` and 20 a
//! request through `POST /rerank` at concurrency 1 and 32, in pairs per
//! second, after the two are checked to rank alike.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use serde_json::json;
use surf_benches::{minilm_dir, quick, write_json};
use surf_engine::Engine;
use surf_server::http::{EmbedService, HttpSettings, ServiceSettings};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

/// Agreement the service's vectors must reach with the engine's before timing.
const MIN_COSINE: f32 = 0.9999;
const CONCURRENCY: [usize; 4] = [1, 8, 32, 64];
/// The in-process batch that the HTTP throughput at concurrency 32 is held to.
const BATCH: usize = 32;
/// Length of a full run's timed part of each HTTP level.
const LEVEL_SECONDS: f64 = 6.0;
/// Samples criterion takes of each in-process routine.
const SAMPLES: usize = 10;
/// Calls timed by hand when criterion does not run.
const PLAIN_CALLS: usize = 5;

const WHO: [&str; 8] = [
    "the sleepy cat",
    "a tall engineer",
    "our last guest",
    "the blue kettle",
    "a quiet student",
    "the night bus",
    "one brave goat",
    "the new printer",
];
const DOES: [&str; 8] = [
    "waits", "sings", "sleeps", "turns", "hums", "stops", "reads", "wanders",
];
const WHERE: [&str; 8] = [
    "near the station",
    "under the bridge",
    "behind the bakery",
    "inside the museum",
    "beside the lake",
    "on the roof",
    "at the market",
    "by the window",
];
const FAMILY: usize = WHO.len() * DOES.len() * WHERE.len();

/// The `i`-th of a fixed family of 512 sentences of eight words.
fn sentence(i: usize) -> String {
    // An odd multiplier permutes 0..512: every sentence comes once before any
    // repeats, and neighbours differ in subject and place, so that requests
    // in flight together are not copies of one another.
    let j = i.wrapping_mul(197) % FAMILY;
    format!(
        "{} {} {}.",
        WHO[j % 8],
        DOES[(j / 8) % 8],
        WHERE[(j / 64) % 8]
    )
}

fn time(run: &mut impl FnMut()) -> Duration {
    let start = Instant::now();
    run();
    start.elapsed()
}

/// The time of each call of `run`: those of criterion's measured samples, or
/// a few plain calls in a quick run (or when criterion's filter skips it).
fn call_times(
    criterion: Option<&mut Criterion>,
    name: &str,
    inputs: usize,
    mut run: impl FnMut(),
) -> Vec<Duration> {
    // The first call of a shape pays for its buffers.
    run();
    let mut times = Vec::new();
    if let Some(criterion) = criterion {
        // One list per call of the routine. Criterion calls it while warming
        // up, then exactly SAMPLES times to measure: only those last count.
        let samples = RefCell::new(Vec::<Vec<Duration>>::new());
        let mut group = criterion.benchmark_group("http/in_process");
        group
            .sampling_mode(SamplingMode::Flat)
            .throughput(Throughput::Elements(inputs as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let each: Vec<Duration> = (0..iterations).map(|_| time(&mut run)).collect();
                let total = each.iter().sum();
                samples.borrow_mut().push(each);
                total
            })
        });
        group.finish();
        let samples = samples.into_inner();
        let warm_up = samples.len().saturating_sub(SAMPLES);
        times = samples.into_iter().skip(warm_up).flatten().collect();
    }
    if times.is_empty() {
        times = (0..PLAIN_CALLS).map(|_| time(&mut run)).collect();
    }
    times.sort();
    times
}

/// Nearest-rank percentile `p` (0 to 1) of sorted `times`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// The service on a loopback port, served from a thread of its own.
struct Server {
    base: String,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

fn serve(service: Arc<EmbedService>) -> Server {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let base = format!(
        "http://{}",
        listener.local_addr().expect("the listener's address")
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the server's runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            let shutdown = async move {
                // A dropped sender stops the server as well.
                let _ = stopped.await;
            };
            surf_server::http::serve(listener, service, &HttpSettings::default(), shutdown)
                .await
                .expect("the HTTP service runs");
        });
    });
    Server { base, stop, thread }
}

/// What `POST /embed` answers for one text.
async fn embed(client: &reqwest::Client, url: &str, text: &str) -> Vec<Vec<f32>> {
    let response = client
        .post(url)
        .json(&json!({ "inputs": text }))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    response
        .json()
        .await
        .unwrap_or_else(|e| panic!("POST {url} answered no list of vectors: {e}"))
}

/// `surf_batch_size_sum` and `surf_batch_size_count` from `/metrics`:
/// inputs and batches the engine has run so far.
async fn batch_totals(client: &reqwest::Client, base: &str) -> (f64, f64) {
    let url = format!("{base}/metrics");
    let text = match client.get(&url).send().await {
        Ok(response) => response.text().await,
        Err(e) => Err(e),
    }
    .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    // Summed over the label sets, one per model.
    let value = |name: &str| {
        let values: Vec<f64> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let series = fields.next()?;
                let bare = series.split_once('{').map_or(series, |(bare, _)| bare);
                (bare == name).then(|| fields.next()?.parse::<f64>().ok())?
            })
            .collect();
        assert!(!values.is_empty(), "/metrics has no value for {name}");
        values.iter().sum::<f64>()
    };
    (value("surf_batch_size_sum"), value("surf_batch_size_count"))
}

/// `concurrency` closed-loop clients sending `requests` requests between
/// them, request `i` being `send(i)`: the wall time and each request's
/// latency.
async fn clients<F, R>(concurrency: usize, requests: usize, send: F) -> (Duration, Vec<Duration>)
where
    F: Fn(usize) -> R + Send + Sync + 'static,
    R: std::future::Future<Output = ()> + Send,
{
    // Requests are handed out one at a time rather than split in advance, so
    // that no client idles while another still has a share to send.
    let next = Arc::new(AtomicUsize::new(0));
    let send = Arc::new(send);
    let started = Instant::now();
    let handles: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, send) = (Arc::clone(&next), Arc::clone(&send));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break latencies;
                    }
                    let sent = Instant::now();
                    send(i).await;
                    latencies.push(sent.elapsed());
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    for handle in handles {
        latencies.extend(handle.await.expect("a client task failed"));
    }
    (started.elapsed(), latencies)
}

/// `concurrency` clients sending `requests` one-text `/embed` requests
/// between them (texts from `offset` on).
async fn closed_loop(
    client: &reqwest::Client,
    url: &Arc<str>,
    texts: &Arc<Vec<String>>,
    concurrency: usize,
    requests: usize,
    offset: usize,
) -> (Duration, Vec<Duration>) {
    let (client, url, texts) = (client.clone(), Arc::clone(url), Arc::clone(texts));
    clients(concurrency, requests, move |i| {
        let (client, url, texts) = (client.clone(), Arc::clone(&url), Arc::clone(&texts));
        async move {
            let vectors = embed(&client, &url, &texts[(offset + i) % texts.len()]).await;
            assert_eq!(vectors.len(), 1, "one text, one vector");
        }
    })
    .await
}

struct Level {
    concurrency: usize,
    requests: usize,
    per_s: f64,
    p50: Duration,
    p99: Duration,
    inputs_per_batch: f64,
}

fn run_level(
    runtime: &Runtime,
    client: &reqwest::Client,
    base: &str,
    texts: &Arc<Vec<String>>,
    concurrency: usize,
    quick: bool,
) -> Level {
    let url: Arc<str> = format!("{base}/embed").into();
    runtime.block_on(async {
        // The warm-up brings the queue to the level's steady state and sizes
        // the timed run, which goes on with the texts after the warm-up's.
        let warm_up = if quick {
            concurrency
        } else {
            (2 * concurrency).max(16)
        };
        let (warm_wall, _) = closed_loop(client, &url, texts, concurrency, warm_up, 0).await;
        let requests = if quick {
            (2 * concurrency).max(8)
        } else {
            let rate = warm_up as f64 / warm_wall.as_secs_f64();
            // At least eight requests a client keeps the ramp-down, when
            // fewer than `concurrency` are left in flight, a small part of it.
            ((rate * LEVEL_SECONDS) as usize).clamp((8 * concurrency).max(64), 50_000)
        };
        let (inputs_before, batches_before) = batch_totals(client, base).await;
        let (wall, mut latencies) =
            closed_loop(client, &url, texts, concurrency, requests, warm_up).await;
        let (inputs_after, batches_after) = batch_totals(client, base).await;
        latencies.sort();
        Level {
            concurrency,
            requests,
            per_s: requests as f64 / wall.as_secs_f64(),
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            inputs_per_batch: (inputs_after - inputs_before)
                / (batches_after - batches_before).max(1.0),
        }
    })
}

/// Panics unless the service answers, for each of `texts` sent at once, the
/// engine's own vector normalised (the route normalises, this engine does not).
fn check_agreement(
    runtime: &Runtime,
    client: &reqwest::Client,
    base: &str,
    engine: &Engine,
    texts: &[String],
) {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ours = engine.infer(&refs).expect("embedding in process");
    let url = format!("{base}/embed");
    let answered: Vec<Vec<Vec<f32>>> = runtime.block_on(async {
        let pending: Vec<_> = texts
            .iter()
            .map(|text| {
                let (client, url, text) = (client.clone(), url.clone(), text.clone());
                tokio::spawn(async move { embed(&client, &url, &text).await })
            })
            .collect();
        let mut answered = Vec::with_capacity(pending.len());
        for handle in pending {
            answered.push(handle.await.expect("a checking request failed"));
        }
        answered
    });
    for ((text, mine), theirs) in texts.iter().zip(ours).zip(answered) {
        let mine = normalised(mine);
        let [theirs] = theirs.as_slice() else {
            panic!(
                "{text:?}: the service answered {} vectors for one text",
                theirs.len()
            );
        };
        let c = cosine(&mine, theirs);
        assert!(
            mine.len() == theirs.len() && c >= MIN_COSINE,
            "{text:?}: the service's vector ({} values) and the engine's ({} values) have \
             cosine {c}, below {MIN_COSINE}: the two do not compute the same thing, so their \
             speeds cannot be compared",
            theirs.len(),
            mine.len()
        );
    }
}

fn main() {
    let dir = minilm_dir();
    if !dir.join("model.safetensors").is_file() {
        println!("http bench skipped: run `bash assets/fetch-model.sh` first");
        return;
    }
    let Some(gpu) = surf_benches::device("http") else {
        return;
    };
    let quick = quick();
    // Raw pooled vectors, as `surf serve` builds its engine: the route
    // normalises per request.
    let engine = Arc::new(
        Engine::builder()
            .model_dir(&dir)
            .normalize(false)
            .gpu(gpu.clone())
            .build()
            .expect("loading all-MiniLM-L6-v2"),
    );
    let texts: Arc<Vec<String>> = Arc::new((0..FAMILY).map(sentence).collect());
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokens = engine.tokenize(&refs).expect("tokenizing");
    let mean_tokens = tokens.iter().map(|t| t.ids.len()).sum::<usize>() as f64 / FAMILY as f64;

    let service = Arc::new(
        EmbedService::start(Arc::clone(&engine), ServiceSettings::default())
            .expect("the embedding service starts"),
    );
    let server = serve(Arc::clone(&service));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the clients' runtime");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("an HTTP client");
    check_agreement(
        &runtime,
        &client,
        &server.base,
        &engine,
        &texts[..if quick { 8 } else { BATCH }],
    );

    let mut criterion = (!quick).then(|| {
        Criterion::default()
            .sample_size(SAMPLES)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
            .configure_from_args()
    });
    let mut next = 0;
    let single = call_times(criterion.as_mut(), "single", 1, || {
        let text = refs[next % FAMILY];
        next += 1;
        std::hint::black_box(engine.infer(&[text]).expect("embedding one text"));
    });
    let mut next = 0;
    let batch = call_times(criterion.as_mut(), "batch_32", BATCH, || {
        // FAMILY is a multiple of BATCH: every batch is a full one.
        let start = (next * BATCH) % FAMILY;
        next += 1;
        std::hint::black_box(
            engine
                .infer(&refs[start..start + BATCH])
                .expect("embedding"),
        );
    });
    if let Some(criterion) = criterion.as_mut() {
        criterion.final_summary();
    }
    let single_p50 = percentile(&single, 0.5);
    let batch_p50 = percentile(&batch, 0.5);
    let batch_per_s = BATCH as f64 / batch_p50.as_secs_f64();

    let levels: Vec<Level> = CONCURRENCY
        .iter()
        .map(|&c| run_level(&runtime, &client, &server.base, &texts, c, quick))
        .collect();

    let _ = server.stop.send(());
    server.thread.join().expect("the server thread panicked");
    service.shutdown();
    drop(service);

    let (reranking, reranking_rows) = rerank_rows(&gpu, &runtime, &client, &texts, quick);

    let at = |c: usize| levels.iter().find(|l| l.concurrency == c);
    let throughput_ratio = at(32).map(|l| l.per_s / batch_per_s);
    let latency_ratio = at(1).map(|l| l.p50.as_secs_f64() / single_p50.as_secs_f64());

    let adapter = gpu.adapter_name().to_owned();
    println!();
    println!(
        "adapter: {adapter} ({:?}){}",
        gpu.info.backend,
        if quick { ", quick run" } else { "" }
    );
    println!(
        "all-MiniLM-L6-v2, {mean_tokens:.1} tokens an input; HTTP vectors agree with the \
         engine's to cosine >= {MIN_COSINE}"
    );
    println!(
        "{:<11} {:>5} {:>6} {:>9} {:>11} {:>9} {:>9} {:>12}",
        "path", "conc", "batch", "requests", "emb/s", "p50 ms", "p99 ms", "inputs/batch"
    );
    println!(
        "{:<11} {:>5} {:>6} {:>9} {:>11.1} {:>9.2} {:>9.2} {:>12}",
        "in-process",
        "-",
        1,
        single.len(),
        1.0 / single_p50.as_secs_f64(),
        ms(single_p50),
        ms(percentile(&single, 0.99)),
        1
    );
    println!(
        "{:<11} {:>5} {:>6} {:>9} {:>11.1} {:>9.2} {:>9.2} {:>12}",
        "in-process",
        "-",
        BATCH,
        batch.len(),
        batch_per_s,
        ms(batch_p50),
        ms(percentile(&batch, 0.99)),
        BATCH
    );
    for l in &levels {
        println!(
            "{:<11} {:>5} {:>6} {:>9} {:>11.1} {:>9.2} {:>9.2} {:>12.1}",
            "http",
            l.concurrency,
            1,
            l.requests,
            l.per_s,
            ms(l.p50),
            ms(l.p99),
            l.inputs_per_batch
        );
    }
    if let Some(r) = throughput_ratio {
        println!("HTTP emb/s at concurrency 32 over in-process emb/s at batch {BATCH}: {r:.3}");
    }
    if let Some(r) = latency_ratio {
        println!("HTTP p50 at concurrency 1 over in-process p50 of one text: {r:.3}");
    }

    write_json(
        "http",
        &json!({
            "adapter": adapter,
            "quick": quick,
            "model": "all-MiniLM-L6-v2",
            "tokens_per_input": mean_tokens,
            "http_c32_per_s_over_in_process_batch32": throughput_ratio,
            "http_c1_p50_over_in_process_single_p50": latency_ratio,
            "in_process": {
                "single_p50_ms": ms(single_p50),
                "single_per_s": 1.0 / single_p50.as_secs_f64(),
                "single_calls": single.len(),
                "batch32_p50_ms": ms(batch_p50),
                "batch32_per_s": batch_per_s,
                "batch32_calls": batch.len(),
            },
            "http": levels.iter().map(|l| json!({
                "concurrency": l.concurrency,
                "requests": l.requests,
                "per_s": l.per_s,
                "p50_ms": ms(l.p50),
                "p99_ms": ms(l.p99),
                "inputs_per_batch": l.inputs_per_batch,
            })).collect::<Vec<_>>(),
            "rerank": reranking,
            "rerank_http": reranking_rows,
        }),
    );
}

/// Passages of one `/rerank` request.
const PASSAGES: usize = 20;
const RERANK_CONCURRENCY: [usize; 2] = [1, 32];

/// The `PASSAGES` passages of request `i`.
fn passages(texts: &[String], i: usize) -> Vec<String> {
    (0..PASSAGES)
        .map(|k| texts[(i * PASSAGES + k) % texts.len()].clone())
        .collect()
}

/// What `POST /rerank` answers: (index, score), highest first.
async fn rerank(
    client: &reqwest::Client,
    url: &str,
    query: &str,
    texts: &[String],
) -> Vec<(usize, f32)> {
    let response = client
        .post(url)
        .json(&json!({ "query": query, "texts": texts }))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let ranks: Vec<serde_json::Value> = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("POST {url} answered no list: {e}"));
    ranks
        .iter()
        .map(
            |rank| match (rank["index"].as_u64(), rank["score"].as_f64()) {
                (Some(index), Some(score)) => (index as usize, score as f32),
                _ => panic!("POST {url} answered {rank} for a rank"),
            },
        )
        .collect()
}

/// `concurrency` clients sending `requests` rerank requests of `PASSAGES`
/// passages between them: the wall time.
async fn rerank_loop(
    client: &reqwest::Client,
    url: &Arc<str>,
    texts: &Arc<Vec<String>>,
    concurrency: usize,
    requests: usize,
) -> Duration {
    let (client, url, texts) = (client.clone(), Arc::clone(url), Arc::clone(texts));
    let (wall, _) = clients(concurrency, requests, move |i| {
        let (client, url, texts) = (client.clone(), Arc::clone(&url), Arc::clone(&texts));
        async move {
            let ranks = rerank(&client, &url, RERANK_QUERY, &passages(&texts, i)).await;
            assert_eq!(ranks.len(), PASSAGES, "one score a passage");
        }
    })
    .await;
    wall
}

const RERANK_QUERY: &str = "where does the sleepy cat wait";

/// Pairs per second of a MiniLM-sized BERT cross-encoder (random weights,
/// one label): `Engine::rerank` on 20 passages a call in process, and
/// `POST /rerank` with 20 passages a request at concurrency 1 and 32.
fn rerank_rows(
    gpu: &surf_engine::Gpu,
    runtime: &Runtime,
    client: &reqwest::Client,
    texts: &Arc<Vec<String>>,
    quick: bool,
) -> (serde_json::Value, Vec<serde_json::Value>) {
    let dir = std::env::temp_dir().join(format!("surf-bench-reranker-{}", std::process::id()));
    let mut spec = surf_engine::synth::SynthSpec::sized(6, 384, 12, 1536);
    spec.labels = Some(1);
    let tokenizer = std::fs::read(minilm_dir().join("tokenizer.json")).expect("the tokenizer");
    surf_engine::synth::write_model(&dir, &spec, &tokenizer).expect("the reranker is written");
    let engine = Arc::new(
        Engine::builder()
            .model_dir(&dir)
            .gpu(gpu.clone())
            .build()
            .expect("loading the reranker"),
    );
    let service = Arc::new(
        EmbedService::start(Arc::clone(&engine), ServiceSettings::default())
            .expect("the reranking service starts"),
    );
    let server = serve(Arc::clone(&service));
    let url: Arc<str> = format!("{}/rerank", server.base).into();

    // Both sides must rank alike before their speeds are compared.
    let first = passages(texts, 0);
    let refs: Vec<&str> = first.iter().map(String::as_str).collect();
    let ours = engine
        .rerank(RERANK_QUERY, &refs)
        .expect("reranking in process");
    let theirs = runtime.block_on(rerank(client, &url, RERANK_QUERY, &first));
    for ((i, mine), (j, answered)) in ours.iter().zip(&theirs) {
        assert!(
            i == j && (mine - answered).abs() < 1e-4,
            "the service ranks ({j}, {answered}) where the engine ranks ({i}, {mine})"
        );
    }

    let calls = if quick { 2 } else { 3 * PLAIN_CALLS };
    let mut times: Vec<Duration> = (0..calls)
        .map(|i| {
            let batch = passages(texts, i + 1);
            let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
            time(&mut || {
                std::hint::black_box(engine.rerank(RERANK_QUERY, &refs).expect("reranking"));
            })
        })
        .collect();
    times.sort();
    let in_process = PASSAGES as f64 / percentile(&times, 0.5).as_secs_f64();

    let levels: Vec<(usize, usize, f64)> = RERANK_CONCURRENCY
        .iter()
        .map(|&concurrency| {
            runtime.block_on(async {
                let warm_up = if quick {
                    concurrency
                } else {
                    (2 * concurrency).max(8)
                };
                let warm = rerank_loop(client, &url, texts, concurrency, warm_up).await;
                let requests = if quick {
                    concurrency.max(2)
                } else {
                    let rate = warm_up as f64 / warm.as_secs_f64();
                    ((rate * LEVEL_SECONDS) as usize).clamp((4 * concurrency).max(16), 20_000)
                };
                let wall = rerank_loop(client, &url, texts, concurrency, requests).await;
                let pairs_per_s = (requests * PASSAGES) as f64 / wall.as_secs_f64();
                (concurrency, requests, pairs_per_s)
            })
        })
        .collect();
    let _ = server.stop.send(());
    server.thread.join().expect("the server thread panicked");
    service.shutdown();
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);

    let ratio = levels.iter().find(|l| l.0 == 32).map(|l| l.2 / in_process);
    println!();
    println!(
        "reranking: BERT cross-encoder of MiniLM's shape (6 layers, hidden 384), {PASSAGES} \
         passages a call or request"
    );
    println!(
        "{:<11} {:>5} {:>9} {:>11}",
        "path", "conc", "requests", "pairs/s"
    );
    println!(
        "{:<11} {:>5} {:>9} {:>11.1}",
        "in-process",
        "-",
        times.len(),
        in_process
    );
    for (concurrency, requests, pairs_per_s) in &levels {
        println!(
            "{:<11} {concurrency:>5} {requests:>9} {pairs_per_s:>11.1}",
            "http"
        );
    }
    if let Some(r) = ratio {
        println!("HTTP pairs/s at concurrency 32 over in-process Engine::rerank: {r:.3}");
    }
    let figures = json!({
        "passages_per_request": PASSAGES,
        "in_process_calls": times.len(),
        "in_process_pairs_per_s": in_process,
        "http_c32_pairs_per_s_over_in_process": ratio,
    });
    let rows = levels
        .iter()
        .map(|(concurrency, requests, pairs_per_s)| {
            json!({
                "concurrency": concurrency,
                "requests": requests,
                "pairs_per_s": pairs_per_s,
            })
        })
        .collect();
    (figures, rows)
}
