//! Four models on one GPU under one VRAM budget: all-MiniLM-L6-v2 takes 70%
//! of the requests and three random-weight BERTs of other sizes 10% each,
//! sent by 32 concurrent clients through one queue. Under budgets of 100%,
//! 50% and 25% of the four models' summed weights, it reports embeddings/s,
//! p50 and p99 latency per model and the bytes uploaded per 1,000 requests,
//! each budget's run next to a run of the same mix with every model
//! resident, made just before it (a ratio of runs side by side holds on a
//! machine whose speed drifts). Both runs follow a warm-up run of the same
//! mix, so that the steady state is measured rather than the first loads.
//! `SURF_BENCH_QUICK=1` runs tiny models and a few requests.
//!
//! The synthetic models are written once under `target/synth/` and reused.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surf_benches::{device, minilm_dir, quick, write_json};
use surf_engine::synth::{SynthSpec, write_model};
use surf_engine::{BatchLimits, EmbedQueue, Engine, Engines, Fairness};

const TEXTS: [&str; 4] = [
    "Weights surf in over QUIC.",
    "Four models share one GPU whose memory holds only some of them.",
    "The hot model keeps its layers; the others page in when asked.",
    "Embeddings come out in the order the texts went in.",
];

/// A synthetic BERT written on first use.
fn synthetic(name: &str, spec: &SynthSpec) -> PathBuf {
    let dir = surf_benches::repo_root().join(format!("target/synth/{name}"));
    if dir.join("model.safetensors").is_file() && dir.join("config.json").is_file() {
        return dir;
    }
    let tokenizer = std::fs::read(minilm_dir().join("tokenizer.json"))
        .expect("the MiniLM tokenizer (bash assets/fetch-model.sh)");
    write_model(&dir, spec, &tokenizer).expect("the synthetic model is written");
    dir
}

/// The four models: (name, folder), the hot one first.
fn models() -> Vec<(String, PathBuf)> {
    let spec = |layers, hidden, heads, seed| SynthSpec {
        seed,
        ..SynthSpec::sized(layers, hidden, heads, 4 * hidden)
    };
    if quick() {
        // Short position tables, so that a quarter of the weights still
        // holds the largest model's pinned part, staging and one layer.
        let small = |layers, hidden, heads, seed| SynthSpec {
            max_position_embeddings: 128,
            ..spec(layers, hidden, heads, seed)
        };
        return vec![
            (
                "hot".into(),
                synthetic("mm-quick2-hot", &small(6, 128, 2, 11)),
            ),
            ("a".into(), synthetic("mm-quick2-a", &small(6, 64, 1, 12))),
            ("b".into(), synthetic("mm-quick2-b", &small(8, 128, 2, 13))),
            ("c".into(), synthetic("mm-quick2-c", &small(4, 192, 3, 14))),
        ];
    }
    vec![
        ("minilm".into(), minilm_dir()),
        (
            "bert-4x512".into(),
            synthetic("mm-bert-4x512", &spec(4, 512, 8, 21)),
        ),
        (
            "bert-6x384".into(),
            synthetic("mm-bert-6x384", &spec(6, 384, 6, 22)),
        ),
        (
            "bert-8x256".into(),
            synthetic("mm-bert-8x256", &spec(8, 256, 4, 23)),
        ),
    ]
}

/// Which model request `i` goes to: the first 70% of the time, each other
/// 10%, spread evenly over the run.
fn model_of(i: usize) -> usize {
    match (i * 7) % 10 {
        0..=6 => 0,
        7 => 1,
        8 => 2,
        _ => 3,
    }
}

/// What one run of the mix measured.
struct Run {
    embeddings_per_s: f64,
    /// (p50, p99) latency per model, in ms.
    latency_ms: Vec<(f64, f64)>,
    uploaded_per_1000: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank].as_secs_f64() * 1e3
}

fn uploaded(engines: &Engines) -> u64 {
    (0..engines.len())
        .map(|m| {
            engines
                .engine(m)
                .inference_stats()
                .map_or(0, |s| s.bytes_uploaded)
        })
        .sum()
}

/// `requests` single-text requests from `clients` threads through one queue.
fn run_mix(engines: &Arc<Engines>, requests: usize, clients: usize) -> Run {
    let queue = Arc::new(
        EmbedQueue::start_models(
            Arc::clone(engines),
            BatchLimits::default(),
            Fairness::default(),
            None,
        )
        .expect("the queue starts"),
    );
    let tokens: Vec<Vec<_>> = (0..engines.len())
        .map(|m| engines.engine(m).tokenize(&TEXTS).expect("tokens"))
        .collect();
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(vec![Vec::new(); engines.len()]));
    let before = uploaded(engines);
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (queue, tokens, next, latencies) = (
                Arc::clone(&queue),
                Arc::clone(&tokens),
                Arc::clone(&next),
                Arc::clone(&latencies),
            );
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return;
                    }
                    let model = model_of(i);
                    let input = vec![tokens[model][i % TEXTS.len()].clone()];
                    let sent = Instant::now();
                    queue
                        .submit_to(model, input)
                        .expect("queued")
                        .wait_blocking()
                        .expect("answered");
                    latencies.lock().expect("latencies")[model].push(sent.elapsed());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a client finished");
    }
    let elapsed = started.elapsed();
    queue.shutdown();
    let moved = uploaded(engines) - before;
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("latencies"));
    let latency_ms = latencies
        .iter_mut()
        .map(|samples| {
            samples.sort();
            (percentile(samples, 0.5), percentile(samples, 0.99))
        })
        .collect();
    Run {
        embeddings_per_s: requests as f64 / elapsed.as_secs_f64(),
        latency_ms,
        uploaded_per_1000: moved as f64 * 1000.0 / requests as f64,
    }
}

fn main() {
    let Some(gpu) = device("multimodel") else {
        return;
    };
    let models = models();
    let mut builder = Engines::builder().gpu(gpu);
    for (name, dir) in &models {
        builder = builder.model(
            name.clone(),
            Engine::builder().model_dir(dir).batch_size(32),
        );
    }
    let engines = builder.build().expect("the four models load");
    let whole: u64 = engines
        .residency()
        .expect("residency")
        .iter()
        .map(|r| r.whole_bytes)
        .sum();
    // Rebuilt with the host cache holding every layer, so that what the
    // budget costs is uploads, not refetches from disk.
    drop(engines);
    let Some(gpu) = device("multimodel") else {
        return;
    };
    let mut builder = Engines::builder().gpu(gpu).host_cache_bytes(whole);
    for (name, dir) in &models {
        builder = builder.model(
            name.clone(),
            Engine::builder().model_dir(dir).batch_size(32),
        );
    }
    let engines = Arc::new(builder.build().expect("the four models load"));
    let (requests, clients) = if quick() { (40, 8) } else { (800, 32) };
    println!(
        "{} models, {:.1} MB of weights together; {requests} requests (70/10/10/10) from {clients} clients",
        models.len(),
        whole as f64 / 1e6
    );
    println!(
        "{:>7} {:>9} {:>9} {:>6} {:>16} p50/p99 ms per model",
        "budget", "emb/s", "resident", "ratio", "MB up/1000 req"
    );
    let mut rows = Vec::new();
    for share in [1.0, 0.5, 0.25] {
        engines.set_vram_budget(Some(whole)).expect("all resident");
        run_mix(&engines, requests.min(64), clients); // warm: every model resident
        let resident = run_mix(&engines, requests, clients);
        let budget = (whole as f64 * share) as u64;
        if let Err(error) = engines.set_vram_budget(Some(budget)) {
            println!("{:>6.0}% skipped: {error}", share * 100.0);
            continue;
        }
        run_mix(&engines, requests.min(64), clients); // warm: the steady state is measured
        let shared = run_mix(&engines, requests, clients);
        let ratio = shared.embeddings_per_s / resident.embeddings_per_s;
        let latency = shared
            .latency_ms
            .iter()
            .map(|(p50, p99)| format!("{p50:.0}/{p99:.0}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{:>6.0}% {:>9.1} {:>9.1} {:>6.2} {:>16.1} {latency}",
            share * 100.0,
            shared.embeddings_per_s,
            resident.embeddings_per_s,
            ratio,
            shared.uploaded_per_1000 / 1e6,
        );
        rows.push(serde_json::json!({
            "budget_share": share,
            "budget_bytes": budget,
            "embeddings_per_s": shared.embeddings_per_s,
            "resident_embeddings_per_s": resident.embeddings_per_s,
            "ratio": ratio,
            "uploaded_bytes_per_1000_requests": shared.uploaded_per_1000,
            "resident_uploaded_bytes_per_1000_requests": resident.uploaded_per_1000,
            "latency_ms": models.iter().zip(&shared.latency_ms).map(|((name, _), (p50, p99))| {
                serde_json::json!({ "model": name, "p50": p50, "p99": p99 })
            }).collect::<Vec<_>>(),
        }));
    }
    write_json(
        "multimodel",
        &serde_json::json!({
            "quick": quick(),
            "models": models.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            "weights_bytes": whole,
            "requests": requests,
            "clients": clients,
            "rows": rows,
        }),
    );
}
