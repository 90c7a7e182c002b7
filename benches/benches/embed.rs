//! End-to-end embeddings per second with all-MiniLM-L6-v2, short (~10 tokens)
//! and long (~150 tokens) inputs at batch sizes 1, 8 and 32, next to candle's
//! CPU BERT on the same inputs and the same checkpoint in the same run; then
//! all-mpnet-base-v2 (MPNet, which candle has no model of) on the same inputs,
//! where `bash assets/fetch-model.sh all-mpnet-base-v2` has fetched it.
//!
//! Both sides are timed from text to normalised vector: tokenization, the
//! forward pass, mean pooling and L2 normalisation. Before any timing the two
//! are checked to agree on every input, so that the ratio compares the same
//! computation. A table follows criterion's report on stdout, and the rows go
//! to `bench-out/embed.json`. Criterion samples each side unless one batch
//! takes over a second (long inputs on a software adapter); those are timed as
//! the median of three batches. `SURF_BENCH_QUICK=1` times one batch of each
//! at batch sizes 1 and 8 with shorter long inputs.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use criterion::{Criterion, SamplingMode, Throughput};
use surf_benches::{Tally, minilm_dir, quick};
use surf_engine::Engine;

/// Agreement that both sides must reach on every input before timing.
const MIN_COSINE: f32 = 0.9999;

const SUBJECTS: [&str; 8] = [
    "the old server",
    "a small model",
    "every layer",
    "the quiet river",
    "my neighbour",
    "this compiler",
    "a red balloon",
    "the morning train",
];
const VERBS: [&str; 8] = [
    "streams",
    "carries",
    "follows",
    "remembers",
    "sorts",
    "paints",
    "answers",
    "measures",
];
const OBJECTS: [&str; 8] = [
    "weights over the network",
    "letters to the harbour",
    "numbers in a long table",
    "songs about the winter",
    "questions from the crowd",
    "vectors of unit length",
    "stones along the path",
    "clouds above the hills",
];

/// The `i`-th of a fixed family of 512 sentences of about ten tokens each.
fn sentence(i: usize) -> String {
    // A multiplicative hash, so that consecutive indices differ in every slot.
    let h = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize;
    format!(
        "{} {} {}.",
        SUBJECTS[h % 8],
        VERBS[(h >> 3) % 8],
        OBJECTS[(h >> 6) % 8]
    )
}

/// `count` texts of `sentences` sentences each.
fn texts(count: usize, sentences: usize) -> Vec<String> {
    (0..count)
        .map(|t| {
            (0..sentences)
                .map(|s| sentence(t * sentences + s))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// One kind of input: its name and the texts a batch of `n` takes.
struct Input {
    name: &'static str,
    texts: Vec<String>,
}

impl Input {
    fn batch(&self, n: usize) -> Vec<&str> {
        self.texts[..n].iter().map(String::as_str).collect()
    }
}

/// candle's CPU BERT with the sentence-transformers head of all-MiniLM-L6-v2:
/// mean pooling over the attention mask, then L2 normalisation.
struct CandleBert {
    model: BertModel,
    device: Device,
}

impl CandleBert {
    fn load(dir: &Path) -> Self {
        let config_path = dir.join("config.json");
        let config: Config = serde_json::from_slice(
            &std::fs::read(&config_path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", config_path.display())),
        )
        .unwrap_or_else(|e| panic!("{} as candle's BERT config: {e}", config_path.display()));
        let weights_path = dir.join("model.safetensors");
        let weights = std::fs::read(&weights_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", weights_path.display()));
        let device = Device::Cpu;
        // The buffered loader rather than the mapped one: mapping is `unsafe`,
        // which the workspace denies, and the file is read once.
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)
            .expect("candle reads the checkpoint");
        let model = BertModel::load(vb, &config).expect("candle builds BERT from the checkpoint");
        Self { model, device }
    }

    /// Vectors for `texts`, tokenized by the engine's tokenizer so that both
    /// sides see the same ids (truncation at the model's sequence limit included).
    fn embed(&self, engine: &Engine, texts: &[&str]) -> Vec<Vec<f32>> {
        let tokens = engine.tokenize(texts).expect("tokenizing");
        let rows = tokens.len();
        let width = tokens.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; rows * width];
        let mut type_ids = vec![0u32; rows * width];
        let mut mask = vec![0f32; rows * width];
        for (row, t) in tokens.iter().enumerate() {
            let start = row * width;
            ids[start..start + t.ids.len()].copy_from_slice(&t.ids);
            type_ids[start..start + t.type_ids.len()].copy_from_slice(&t.type_ids);
            mask[start..start + t.ids.len()].fill(1.0);
        }
        self.forward(ids, type_ids, mask, (rows, width))
            .expect("candle's forward pass")
    }

    fn forward(
        &self,
        ids: Vec<u32>,
        type_ids: Vec<u32>,
        mask: Vec<f32>,
        shape: (usize, usize),
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let type_ids = Tensor::from_vec(type_ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
        let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let mean = summed.broadcast_div(&mask.sum_keepdim(1)?)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        mean.broadcast_div(&norm)?.to_vec2::<f32>()
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Panics unless candle and the engine give the same vector for every input,
/// in the padded batches the timed runs use.
fn check_agreement(engine: &Engine, candle: &CandleBert, input: &Input, batch: usize) {
    for chunk in input.texts.chunks(batch) {
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let ours = engine.infer(&texts).expect("embedding");
        let theirs = candle.embed(engine, &texts);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let c = cosine(a, b);
            assert!(
                a.len() == b.len() && c >= MIN_COSINE,
                "{} input {:?}: our vector ({} values) and candle's ({} values) have cosine {c}, \
                 below {MIN_COSINE}: the two do not compute the same thing, so their speeds \
                 cannot be compared",
                input.name,
                texts[i],
                a.len(),
                b.len()
            );
        }
    }
}

struct Row {
    model: &'static str,
    input: &'static str,
    tokens: f64,
    batch: usize,
    ours: f64,
    /// Where candle has the family.
    candle: Option<f64>,
}

/// A batch slower than this is timed as the median of `SLOW_BATCHES` batches
/// rather than by criterion, whose ten samples would take minutes each on a
/// software adapter.
const SLOW_BATCH: Duration = Duration::from_secs(1);
const SLOW_BATCHES: usize = 3;

fn time_once(run: &mut impl FnMut()) -> Duration {
    let start = Instant::now();
    run();
    start.elapsed()
}

/// Embeddings per second of `run` over batches of `batch` texts.
fn rate(
    criterion: &mut Criterion,
    quick: bool,
    group: &str,
    name: &str,
    batch: usize,
    mut run: impl FnMut(),
) -> f64 {
    // The first batch of a shape pays for allocations on both sides.
    run();
    let first = time_once(&mut run);
    if quick {
        return batch as f64 / first.as_secs_f64();
    }
    if first > SLOW_BATCH {
        let mut times = vec![first];
        times.extend((1..SLOW_BATCHES).map(|_| time_once(&mut run)));
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "{group}/{name}: median of {SLOW_BATCHES} batches {:.3} s (slower than {} s a \
             batch, so not sampled by criterion)",
            median.as_secs_f64(),
            SLOW_BATCH.as_secs()
        );
        return batch as f64 / median.as_secs_f64();
    }
    let tally = Tally::default();
    let mut group = criterion.benchmark_group(group);
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let start = Instant::now();
            for _ in 0..iterations {
                run();
            }
            tally.add(start.elapsed(), iterations)
        })
    });
    group.finish();
    tally.rate(batch as f64)
}

fn write_json(adapter: &str, quick: bool, rows: &[Row]) {
    let json = serde_json::json!({
        "adapter": adapter,
        "quick": quick,
        "rows": rows.iter().map(|r| serde_json::json!({
            "model": r.model,
            "input": r.input,
            "tokens": r.tokens,
            "batch": r.batch,
            "ours_per_s": r.ours,
            "candle_per_s": r.candle,
            "ratio": r.candle.map(|candle| r.ours / candle),
        })).collect::<Vec<_>>(),
    });
    let dir = surf_benches::out_dir();
    let path = dir.join("embed.json");
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json).unwrap_or_default() + "\n",
        )
    });
    match written {
        Ok(()) => println!("results written to {}", path.display()),
        Err(e) => println!("could not write {}: {e}", path.display()),
    }
}

fn main() {
    let dir = minilm_dir();
    if !dir.join("model.safetensors").is_file() {
        println!("embed bench skipped: run `bash assets/fetch-model.sh` first");
        return;
    }
    let Some(gpu) = surf_benches::device("embed") else {
        return;
    };
    let quick = quick();
    let batches: &[usize] = if quick { &[1, 8] } else { &[1, 8, 32] };
    let largest = batches.iter().copied().max().unwrap_or(1);
    let inputs = [
        Input {
            name: "short",
            texts: texts(largest, 1),
        },
        Input {
            name: "long",
            texts: texts(largest, if quick { 3 } else { 15 }),
        },
    ];
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let candle = CandleBert::load(&dir);
    let mut rows = Vec::new();
    for &batch in batches {
        let engine = Engine::builder()
            .model_dir(&dir)
            .gpu(gpu.clone())
            .batch_size(batch)
            .build()
            .expect("loading all-MiniLM-L6-v2");
        for input in &inputs {
            check_agreement(&engine, &candle, input, batch);
            let texts = input.batch(batch);
            let tokens = engine.tokenize(&texts).expect("tokenizing");
            let mean_tokens =
                tokens.iter().map(|t| t.ids.len()).sum::<usize>() as f64 / tokens.len() as f64;
            let group = format!("embed/{}_{batch}", input.name);
            let ours = rate(&mut criterion, quick, &group, "ours", batch, || {
                std::hint::black_box(engine.infer(&texts).expect("embedding"));
            });
            let theirs = rate(&mut criterion, quick, &group, "candle_cpu", batch, || {
                std::hint::black_box(candle.embed(&engine, &texts));
            });
            rows.push(Row {
                model: "all-MiniLM-L6-v2",
                input: input.name,
                tokens: mean_tokens,
                batch,
                ours,
                candle: Some(theirs),
            });
        }
    }
    let mpnet = surf_benches::repo_root().join("assets/models/all-mpnet-base-v2");
    if mpnet.join("model.safetensors").is_file() {
        for &batch in batches {
            let engine = Engine::builder()
                .model_dir(&mpnet)
                .gpu(gpu.clone())
                .batch_size(batch)
                .build()
                .expect("loading all-mpnet-base-v2");
            for input in &inputs {
                let texts = input.batch(batch);
                let tokens = engine.tokenize(&texts).expect("tokenizing");
                let mean_tokens =
                    tokens.iter().map(|t| t.ids.len()).sum::<usize>() as f64 / tokens.len() as f64;
                let group = format!("embed_mpnet/{}_{batch}", input.name);
                let ours = rate(&mut criterion, quick, &group, "ours", batch, || {
                    std::hint::black_box(engine.infer(&texts).expect("embedding"));
                });
                rows.push(Row {
                    model: "all-mpnet-base-v2",
                    input: input.name,
                    tokens: mean_tokens,
                    batch,
                    ours,
                    candle: None,
                });
            }
        }
    } else {
        println!(
            "all-mpnet-base-v2 rows skipped: run `bash assets/fetch-model.sh all-mpnet-base-v2`"
        );
    }
    criterion.final_summary();

    let adapter = gpu.adapter_name().to_owned();
    println!();
    println!(
        "adapter: {adapter} ({:?}){}",
        gpu.info.backend,
        if quick { ", quick run" } else { "" }
    );
    if adapter.to_lowercase().contains("llvmpipe") {
        println!(
            "note: llvmpipe runs the GPU kernels on the same CPU cores that candle uses, so the \
             ratio compares two CPU implementations"
        );
    }
    println!(
        "embeddings/s; candle on the CPU with {} threads (BERT only; it has no MPNet); where \
         both run, vectors agree to cosine >= {MIN_COSINE}",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<18} {:<6} {:>7} {:>6} {:>12} {:>12} {:>13}",
        "model", "input", "tokens", "batch", "ours/s", "candle/s", "ours/candle"
    );
    for r in &rows {
        let (candle, ratio) = match r.candle {
            Some(candle) => (format!("{candle:.1}"), format!("{:.2}", r.ours / candle)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<18} {:<6} {:>7.1} {:>6} {:>12.1} {:>12} {:>13}",
            r.model, r.input, r.tokens, r.batch, r.ours, candle, ratio
        );
    }
    write_json(&adapter, quick, &rows);
}
