//! Matmul GFLOP/s at the shapes of a MiniLM-sized BERT layer, with f32 and
//! with f16 weights, next to the adapter's FMA peak measured in the same run; GFLOP/s of every matmul
//! variant from a few rows to a few tiles, which is what the launcher's tile
//! choice is tuned on; and end-to-end embeddings per second through the
//! `Engine`.
//!
//! Criterion reports the matmuls in Gelem/s, one element being one
//! floating-point operation, so its figure reads as GFLOP/s. A summary table
//! follows on stdout. `SURF_BENCH_QUICK=1` takes few, short samples.

use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use surf_benches::{Tally, minilm_dir, quick, time_launches, write_json};
use surf_engine::WeightDtype;
use surf_engine::gpu::Gpu;
use surf_engine::kernels::DispatchPlan;
use surf_engine::kernels::attention::Attention;
use surf_engine::kernels::autotune::{self, Launchers};
use surf_engine::kernels::family::{KernelFamily, KernelMode};
use surf_engine::kernels::fma_peak::FmaPeak;
use surf_engine::kernels::layernorm::{LayerNorm, LayerNormOperands};
use surf_engine::kernels::matmul::{
    Epilogue, Matmul, MatmulOperands, MatmulVariant, subgroup_rows,
};
use surf_engine::kernels::matmul_norm::MatmulNorm;
use surf_engine::kernels::selection::{
    ModelShapes, Selection, Shape, TimingSource, TunedOp, kernel_owner,
};

/// (m, k, n) of the layer's matmuls at 256 tokens: FFN up, FFN down, and the
/// attention output projection at 2048 tokens.
const SHAPES: [(usize, usize, usize); 3] = [(256, 384, 1536), (256, 1536, 384), (2048, 384, 384)];

/// Rows of A for the per-variant comparison: a short batch, a batch of a few
/// sentences, and one and two of the tallest tiles.
const VARIANT_ROWS: [usize; 4] = [16, 32, 128, 256];
/// (k, n) of the per-variant comparison: the FFN up-projection of MiniLM.
const VARIANT_KN: (usize, usize) = (384, 1536);

/// MiniLM's dimensions: the shapes every family is compared at.
const MODEL: ModelShapes = ModelShapes {
    hidden: 384,
    intermediate: 1536,
    heads: 12,
    head_dim: 32,
};

/// FMA-chain launch size: enough invocations to fill every core.
const PEAK_INVOCATIONS: u32 = 64 * 256;
const PEAK_ITERATIONS: u32 = 2048;

/// (sequences, tokens per sequence) of the attention bench: one long input,
/// and a batch of eight of them, at MiniLM's 12 heads of 32.
const ATTENTION_SHAPES: [(usize, usize); 2] = [(1, 128), (8, 128)];
const HEADS: usize = 12;
const HEAD_DIM: usize = 32;

const SENTENCES: [&str; 8] = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Weights stream to the GPU layer by layer.",
    "How fast can a software rasterizer multiply matrices?",
    "Embeddings map sentences to vectors.",
    "It rained all day in the city.",
    "The server caches hot layers in memory.",
    "Short sentences make small batches.",
];

fn configure(quick: bool) -> Criterion {
    let criterion = Criterion::default().configure_from_args();
    if quick {
        criterion
            .sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(500))
    } else {
        criterion
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5))
    }
}

fn fma_peak(criterion: &mut Criterion, gpu: &Gpu, peak: &FmaPeak) -> f64 {
    let flops = {
        let mut plan = DispatchPlan::new(gpu);
        peak.push(&mut plan, PEAK_ITERATIONS)
    };
    time_launches(gpu, 1, |plan| {
        peak.push(plan, PEAK_ITERATIONS);
    });
    let tally = Tally::default();
    let mut group = criterion.benchmark_group("fma_peak");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(flops));
    group.bench_function("fma_chains", |b| {
        b.iter_custom(|iterations| {
            let elapsed = time_launches(gpu, iterations, |plan| {
                peak.push(plan, PEAK_ITERATIONS);
            });
            tally.add(elapsed, iterations)
        })
    });
    group.finish();
    tally.rate(flops as f64) / 1e9
}

/// Measures one matmul shape with `variant` as the criterion bench `name`;
/// returns GFLOP/s.
fn time_matmul(
    group: &mut BenchmarkGroup<'_, WallTime>,
    gpu: &Gpu,
    matmul: &Matmul,
    name: String,
    (m, k, n): (usize, usize, usize),
    variant: MatmulVariant,
) -> f64 {
    let flops = 2 * (m * k * n) as u64;
    let lhs = gpu.storage_buffer("lhs", (m * k * 4) as u64);
    let weights = gpu.storage_buffer(
        "weights",
        ((k * n + n) * matmul.dtype().size_bytes()).next_multiple_of(16) as u64,
    );
    let out = gpu.storage_buffer("out", (m * n * 4) as u64);
    let operands = || MatmulOperands {
        lhs: &lhs,
        a_offset: 0,
        weights: &weights,
        b_offset: 0,
        bias_offset: (k * n) as u32,
        out: &out,
        c_offset: 0,
    };
    let push = |plan: &mut DispatchPlan| {
        matmul.push_variant(variant, plan, m, n, k, Epilogue::Bias, operands());
    };
    time_kernel(group, gpu, name, (Throughput::Elements, flops), push) / 1e9
}

/// Times the launches `push` records as the criterion bench `name`, each
/// doing `work` units of `unit` (FLOPs as elements, or bytes); returns units
/// per second over every iteration.
fn time_kernel(
    group: &mut BenchmarkGroup<'_, WallTime>,
    gpu: &Gpu,
    name: String,
    (unit, work): (fn(u64) -> Throughput, u64),
    push: impl Fn(&mut DispatchPlan),
) -> f64 {
    // The first launch of a pipeline may include driver work the tally must
    // not average in.
    time_launches(gpu, 1, &push);
    let tally = Tally::default();
    group.throughput(unit(work));
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| tally.add(time_launches(gpu, iterations, &push), iterations))
    });
    tally.rate(work as f64)
}

/// GFLOP/s of self-attention per shape of `ATTENTION_SHAPES`, counting the
/// two products (scores and weighted values) and not the softmax.
fn attention(criterion: &mut Criterion, gpu: &Gpu) -> Vec<f64> {
    let attention = Attention::new(gpu);
    let hidden = HEADS * HEAD_DIM;
    let mut group = criterion.benchmark_group("attention");
    group.sampling_mode(SamplingMode::Flat);
    let rates = ATTENTION_SHAPES
        .iter()
        .map(|&(sequences, seq)| {
            let rows = sequences * seq;
            let qkv = gpu.storage_buffer("qkv", (rows * 3 * hidden * 4) as u64);
            let mask = gpu.storage_buffer("mask", (rows * 4) as u64);
            let out = gpu.storage_buffer("context", (rows * hidden * 4) as u64);
            let flops = (4 * sequences * HEADS * seq * seq * HEAD_DIM) as u64;
            let push = |plan: &mut DispatchPlan| {
                attention.push(plan, sequences, seq, HEADS, HEAD_DIM, &qkv, &mask, &out);
            };
            let name = format!("{sequences}x{seq}");
            time_kernel(&mut group, gpu, name, (Throughput::Elements, flops), push) / 1e9
        })
        .collect();
    group.finish();
    gpu.check_errors().expect("the GPU reported an error");
    rates
}

/// GB/s of residual add + LayerNorm over `rows` x 384, counting the bytes
/// read and written once each.
fn layernorm(criterion: &mut Criterion, gpu: &Gpu, rows: usize) -> f64 {
    let layernorm = LayerNorm::new(gpu, WeightDtype::F32);
    let cols = HEADS * HEAD_DIM;
    let x = gpu.storage_buffer("x", (rows * cols * 4) as u64);
    let residual = gpu.storage_buffer("residual", (rows * cols * 4) as u64);
    let weights = gpu.storage_buffer("gamma_beta", (2 * cols * 4) as u64);
    let out = gpu.storage_buffer("out", (rows * cols * 4) as u64);
    let bytes = (3 * rows * cols * 4) as u64;
    let push = |plan: &mut DispatchPlan| {
        let operands = LayerNormOperands {
            x: &x,
            residual: Some(&residual),
            weights: &weights,
            gamma_offset: 0,
            beta_offset: cols as u32,
            out: &out,
        };
        layernorm.push(gpu, plan, rows, cols, 1e-12, operands);
    };
    let mut group = criterion.benchmark_group("layernorm");
    group.sampling_mode(SamplingMode::Flat);
    let name = format!("{rows}x{cols}");
    let rate = time_kernel(&mut group, gpu, name, (Throughput::Bytes, bytes), push);
    group.finish();
    gpu.check_errors().expect("the GPU reported an error");
    rate / 1e9
}

/// One headline matmul: the family the engine's selection runs at the
/// shape, its rate, and how the selection timed the shape.
struct Headline {
    gflops: f64,
    family: KernelFamily,
    /// `None` when a family was forced.
    timing: Option<TimingSource>,
}

/// The rate of each shape of `SHAPES` with the weight dtype `matmul` reads,
/// run with the family that `selection`, the engine's choice for that dtype,
/// takes at the shape.
fn matmuls(
    criterion: &mut Criterion,
    gpu: &Gpu,
    matmul: &Matmul,
    selection: &Selection,
) -> Vec<Headline> {
    let mut group = criterion.benchmark_group(match matmul.dtype() {
        WeightDtype::F32 => "matmul".to_string(),
        dtype => format!("matmul_{dtype}"),
    });
    group.sampling_mode(SamplingMode::Flat);
    let rates = SHAPES
        .iter()
        .map(|&(m, k, n)| {
            let family = selection.family(TunedOp::Matmul, m, k, n);
            let name = format!("{m}x{k}x{n}");
            let shape = Shape {
                op: TunedOp::Matmul,
                rows: m,
                k,
                n,
            };
            Headline {
                gflops: time_family_matmul(&mut group, gpu, matmul, name, shape, family),
                family,
                timing: selection
                    .measured(TunedOp::Matmul, m, k, n)
                    .map(|t| t.timing),
            }
        })
        .collect();
    group.finish();
    gpu.check_errors().expect("the GPU reported an error");
    rates
}

/// The engine's selection for weights stored as `matmul`'s dtype: the
/// family `SURF_KERNELS` forces, or every family the engine measures timed
/// at `MODEL`'s shapes afresh in this run rather than read from the cache
/// (an earlier measurement may have run on a busier machine).
fn engine_selection(gpu: &Gpu, matmul: &Matmul) -> Selection {
    match surf_engine::engine::kernel_mode_from_env().expect("SURF_KERNELS") {
        KernelMode::Forced(family) => Selection::Forced(family),
        KernelMode::Auto => {
            let attention = Attention::new(gpu);
            let layernorm = LayerNorm::new(gpu, matmul.dtype());
            let matmul_norm = MatmulNorm::new(gpu, matmul.dtype());
            let launchers = Launchers {
                matmul,
                attention: &attention,
                layernorm: &layernorm,
                matmul_norm: &matmul_norm,
            };
            let families = KernelFamily::incumbent_first(gpu, matmul.dtype());
            let shapes = autotune::measure(gpu, &launchers, &MODEL.shapes(), &families)
                .expect("measuring the kernel families");
            Selection::Tuned {
                shapes,
                fallback: KernelFamily::fixed_default(gpu),
            }
        }
    }
}

/// GFLOP/s of every variant at each of `VARIANT_ROWS`, indexed [rows][variant]
/// in the order of `Matmul::variants`.
fn matmul_variants(criterion: &mut Criterion, gpu: &Gpu, matmul: &Matmul) -> Vec<Vec<f64>> {
    let (k, n) = VARIANT_KN;
    let mut group = criterion.benchmark_group("matmul_variants");
    group.sampling_mode(SamplingMode::Flat);
    let mut rates = Vec::new();
    for m in VARIANT_ROWS {
        let row = matmul
            .variants()
            .into_iter()
            .map(|variant| {
                let name = format!("{}/m{m}", variant_name(variant));
                time_matmul(&mut group, gpu, matmul, name, (m, k, n), variant)
            })
            .collect();
        rates.push(row);
    }
    group.finish();
    gpu.check_errors().expect("the GPU reported an error");
    rates
}

/// What `push` runs for an m x k by k x n multiply with vec4-aligned offsets.
fn aligned_choice(matmul: &Matmul, m: usize, n: usize, k: usize) -> MatmulVariant {
    let tiles: Vec<u32> = matmul
        .variants()
        .into_iter()
        .filter_map(|variant| match variant {
            MatmulVariant::Subgroups { rows } => Some(rows),
            _ => None,
        })
        .collect();
    if tiles.is_empty() || !n.is_multiple_of(4) || !k.is_multiple_of(4) {
        return MatmulVariant::General;
    }
    MatmulVariant::Subgroups {
        rows: subgroup_rows(m, &tiles),
    }
}

fn variant_name(variant: MatmulVariant) -> String {
    match variant {
        MatmulVariant::General => "general".to_string(),
        MatmulVariant::Subgroups { rows } => format!("subgroups{rows}"),
        MatmulVariant::Tiled => "tiled".to_string(),
        MatmulVariant::Blocked { rows } => format!("blocked{rows}"),
        MatmulVariant::Half { rows } => format!("half{rows}"),
    }
}

/// One model shape with every family's rate (GFLOP/s, or GB/s for
/// LayerNorm), the family that ran before measuring and the measured choice.
struct FamilyRow {
    shape: Shape,
    rates: Vec<(KernelFamily, f64)>,
    fixed: KernelFamily,
    autotuned: KernelFamily,
    /// How the engine's measuring timed this shape; `None` when a family
    /// was forced.
    timing: Option<TimingSource>,
}

impl FamilyRow {
    fn rate(&self, family: KernelFamily) -> f64 {
        self.rates
            .iter()
            .find_map(|&(f, rate)| (f == family).then_some(rate))
            .unwrap_or(f64::NAN)
    }
}

/// Every family the adapter runs at every shape of `MODEL`'s layer, timed
/// through the launchers' `push_family`, next to the choice the engine's
/// measuring made in `selection`.
fn families(
    criterion: &mut Criterion,
    gpu: &Gpu,
    matmul: &Matmul,
    selection: &Selection,
) -> Vec<FamilyRow> {
    let attention = Attention::new(gpu);
    let layernorm = LayerNorm::new(gpu, matmul.dtype());
    let fixed = KernelFamily::fixed_default(gpu);
    // The families the engine measures on this adapter: timing the 8-lane
    // subgroup kernels on a GPU takes minutes and could never pick them.
    let supported = KernelFamily::measured(gpu);
    let mut group = criterion.benchmark_group("families");
    group.sampling_mode(SamplingMode::Flat);
    let mut rows = Vec::new();
    for shape in MODEL.shapes() {
        let Shape { op, rows: m, k, n } = shape;
        // Not a per-family op: `fusions` reports the engine's measurement.
        if op == TunedOp::ProjectionNorm {
            continue;
        }
        // A family that shares another's kernel at this shape shares its
        // figure, so that the ratio compares kernels, not two runs of one.
        let mut timed: Vec<(KernelFamily, f64)> = Vec::new();
        let mut rates = Vec::new();
        for &family in &supported {
            let owner = kernel_owner(op, k, family);
            if let Some(&(_, rate)) = timed.iter().find(|(f, _)| *f == owner) {
                rates.push((family, rate));
                continue;
            }
            let rate = {
                let family = owner;
                let name = format!("{:?}/{family}/m{m}k{k}n{n}", op).to_lowercase();
                match op {
                    TunedOp::Matmul => {
                        time_family_matmul(&mut group, gpu, matmul, name, shape, family)
                    }
                    TunedOp::Attention => {
                        time_family_attention(&mut group, gpu, &attention, name, shape, family)
                    }
                    TunedOp::LayerNorm => {
                        time_family_layernorm(&mut group, gpu, &layernorm, name, shape, family)
                    }
                    TunedOp::ProjectionNorm => unreachable!("skipped above"),
                }
            };
            timed.push((owner, rate));
            rates.push((family, rate));
        }
        rows.push(FamilyRow {
            shape,
            rates,
            fixed,
            autotuned: selection.family(op, m, k, n),
            timing: selection
                .tuned()
                .iter()
                .find(|tuned| tuned.shape == shape)
                .map(|tuned| tuned.timing),
        });
    }
    group.finish();
    gpu.check_errors().expect("the GPU reported an error");
    if let Selection::Forced(family) = selection {
        println!("note: SURF_KERNELS forces {family}; the autotuned column shows it");
    }
    rows
}

fn time_family_matmul(
    group: &mut BenchmarkGroup<'_, WallTime>,
    gpu: &Gpu,
    matmul: &Matmul,
    name: String,
    Shape { rows: m, k, n, .. }: Shape,
    family: KernelFamily,
) -> f64 {
    let lhs = gpu.storage_buffer("lhs", (m * k * 4) as u64);
    let weights = gpu.storage_buffer("weights", ((k * n + n) * 4) as u64);
    let out = gpu.storage_buffer("out", (m * n * 4) as u64);
    let push = |plan: &mut DispatchPlan| {
        let operands = MatmulOperands {
            lhs: &lhs,
            a_offset: 0,
            weights: &weights,
            b_offset: 0,
            bias_offset: (k * n) as u32,
            out: &out,
            c_offset: 0,
        };
        matmul.push_family(family, plan, m, n, k, Epilogue::Bias, operands);
    };
    let flops = 2 * (m * k * n) as u64;
    time_kernel(group, gpu, name, (Throughput::Elements, flops), push) / 1e9
}

/// The attention of `shape.rows` tokens as sequences of at most 128.
fn time_family_attention(
    group: &mut BenchmarkGroup<'_, WallTime>,
    gpu: &Gpu,
    attention: &Attention,
    name: String,
    Shape {
        rows,
        k: head_dim,
        n: heads,
        ..
    }: Shape,
    family: KernelFamily,
) -> f64 {
    let seq = rows.min(128);
    let sequences = rows.div_ceil(seq);
    let hidden = heads * head_dim;
    let qkv = gpu.storage_buffer("qkv", (sequences * seq * 3 * hidden * 4) as u64);
    let mask = gpu.storage_buffer("mask", (sequences * seq * 4) as u64);
    let out = gpu.storage_buffer("context", (sequences * seq * hidden * 4) as u64);
    let push = |plan: &mut DispatchPlan| {
        attention.push_family(
            family, plan, sequences, seq, heads, head_dim, &qkv, &mask, &out,
        );
    };
    let flops = (4 * sequences * heads * seq * seq * head_dim) as u64;
    time_kernel(group, gpu, name, (Throughput::Elements, flops), push) / 1e9
}

fn time_family_layernorm(
    group: &mut BenchmarkGroup<'_, WallTime>,
    gpu: &Gpu,
    layernorm: &LayerNorm,
    name: String,
    Shape { rows, k: cols, .. }: Shape,
    family: KernelFamily,
) -> f64 {
    let x = gpu.storage_buffer("x", (rows * cols * 4) as u64);
    let residual = gpu.storage_buffer("residual", (rows * cols * 4) as u64);
    let weights = gpu.storage_buffer("gamma_beta", (2 * cols * 4) as u64);
    let out = gpu.storage_buffer("out", (rows * cols * 4) as u64);
    let push = |plan: &mut DispatchPlan| {
        let operands = LayerNormOperands {
            x: &x,
            residual: Some(&residual),
            weights: &weights,
            gamma_offset: 0,
            beta_offset: cols as u32,
            out: &out,
        };
        layernorm.push_family(family, gpu, plan, rows, cols, 1e-12, operands);
    };
    let bytes = (3 * rows * cols * 4) as u64;
    time_kernel(group, gpu, name, (Throughput::Bytes, bytes), push) / 1e9
}

/// Embeddings per second for a batch of 32 short sentences, or `None` when
/// the model has not been fetched.
fn embeddings(criterion: &mut Criterion, gpu: &Gpu, quick: bool) -> Option<f64> {
    let dir = minilm_dir();
    if !dir.join("model.safetensors").is_file() {
        println!(
            "skipping the embedding bench: no model at {}; run `bash assets/fetch-model.sh`",
            dir.display()
        );
        return None;
    }
    let engine = surf_engine::Engine::builder()
        .model_dir(&dir)
        .gpu(gpu.clone())
        .build()
        .expect("loading all-MiniLM-L6-v2");
    let texts: Vec<&str> = SENTENCES.iter().cycle().take(32).copied().collect();
    // The first batch pays for uploads and pipeline warm-up.
    engine.embed(&texts).expect("embedding a warm-up batch");
    if quick {
        // Criterion's ten samples of a multi-second batch would blow the
        // quick run's budget; one timed batch shows the figure.
        let start = Instant::now();
        std::hint::black_box(engine.embed(&texts).expect("embedding"));
        return Some(texts.len() as f64 / start.elapsed().as_secs_f64());
    }
    let tally = Tally::default();
    let mut group = criterion.benchmark_group("engine");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(texts.len() as u64));
    group.bench_function("embed_32_short_sentences", |b| {
        b.iter_custom(|iterations| {
            let start = Instant::now();
            for _ in 0..iterations {
                std::hint::black_box(engine.embed(&texts).expect("embedding"));
            }
            tally.add(start.elapsed(), iterations)
        })
    });
    group.finish();
    Some(tally.rate(texts.len() as f64))
}

/// One row of the per-family table as JSON: the shape, a column per family,
/// the fixed and the autotuned choice and the ratio of their rates.
fn family_json(row: &FamilyRow, peak_gflops: f64) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert(
        "op".into(),
        format!("{:?}", row.shape.op).to_lowercase().into(),
    );
    map.insert("rows".into(), row.shape.rows.into());
    map.insert("k".into(), row.shape.k.into());
    map.insert("n".into(), row.shape.n.into());
    let unit = if row.shape.op == TunedOp::LayerNorm {
        "GB/s"
    } else {
        "GFLOP/s"
    };
    map.insert("unit".into(), unit.into());
    for (family, rate) in &row.rates {
        map.insert(family.name().into(), (*rate).into());
    }
    map.insert("fixed".into(), row.fixed.name().into());
    map.insert("autotuned".into(), row.autotuned.name().into());
    map.insert(
        "autotuned_over_fixed".into(),
        (row.rate(row.autotuned) / row.rate(row.fixed)).into(),
    );
    if row.shape.op != TunedOp::LayerNorm {
        map.insert(
            "autotuned_share_of_peak".into(),
            (row.rate(row.autotuned) / peak_gflops).into(),
        );
    }
    map.insert(
        "timing".into(),
        row.timing.map_or("forced", TimingSource::name).into(),
    );
    serde_json::Value::Object(map)
}

/// The per-family table: every family's rate per shape, the fixed and the
/// autotuned choice, and the autotuned choice's rate over the fixed one's.
fn print_families(rows: &[FamilyRow], peak_gflops: f64) {
    let Some(first) = rows.first() else {
        return;
    };
    let timing = first
        .timing
        .map_or("none (a family is forced)", TimingSource::name);
    println!(
        "kernel families at MiniLM's shapes (GFLOP/s; LayerNorm in GB/s; FMA peak {peak_gflops:.1} GFLOP/s; the choice timed by {timing}):"
    );
    print!("  {:<10} {:>5} {:>5} {:>5}", "op", "rows", "k", "n");
    for (family, _) in &first.rates {
        print!(" {:>10}", family.name());
    }
    println!(
        " {:>10} {:>10} {:>8} {:>8}",
        "fixed", "autotuned", "ratio", "of peak"
    );
    for row in rows {
        let Shape { op, rows: m, k, n } = row.shape;
        print!(
            "  {:<10} {m:>5} {k:>5} {n:>5}",
            format!("{op:?}").to_lowercase()
        );
        for (_, rate) in &row.rates {
            print!(" {rate:>10.2}");
        }
        let share = if op == TunedOp::LayerNorm {
            String::from("-")
        } else {
            format!("{:.1}%", 100.0 * row.rate(row.autotuned) / peak_gflops)
        };
        println!(
            " {:>10} {:>10} {:>8.3} {share:>8}",
            row.fixed.name(),
            row.autotuned.name(),
            row.rate(row.autotuned) / row.rate(row.fixed)
        );
    }
}

fn main() {
    let Some(gpu) = surf_benches::device("kernels") else {
        return;
    };
    let quick = quick();
    let mut criterion = configure(quick);
    let peak = FmaPeak::new(&gpu, PEAK_INVOCATIONS);
    let matmul = Matmul::new(&gpu, WeightDtype::F32);
    let matmul_f16 = Matmul::new(&gpu, WeightDtype::F16);

    // The peak is measured on both sides of the matmuls because other load on
    // the machine moves it; the matmuls are compared with the mean.
    // The engine's choices, measured the way an engine measures them at
    // its first start on this adapter, one selection per weight dtype.
    let selection = engine_selection(&gpu, &matmul);
    let selection_f16 = engine_selection(&gpu, &matmul_f16);
    let peak_before = fma_peak(&mut criterion, &gpu, &peak);
    let rates = matmuls(&mut criterion, &gpu, &matmul, &selection);
    let rates_f16 = matmuls(&mut criterion, &gpu, &matmul_f16, &selection_f16);
    let variant_rates = matmul_variants(&mut criterion, &gpu, &matmul);
    let family_rows = families(&mut criterion, &gpu, &matmul, &selection);
    let attention_rates = attention(&mut criterion, &gpu);
    let layernorm_rows = 1024;
    let layernorm_rate = layernorm(&mut criterion, &gpu, layernorm_rows);
    let peak_after = fma_peak(&mut criterion, &gpu, &peak);
    let peak_gflops = (peak_before + peak_after) / 2.0;
    let per_second = embeddings(&mut criterion, &gpu, quick);
    criterion.final_summary();

    println!();
    println!(
        "adapter: {} ({:?}, subgroups: {}){}",
        gpu.adapter_name(),
        gpu.info.backend,
        gpu.subgroups,
        if quick { ", quick run" } else { "" }
    );
    println!(
        "FMA-chain peak: {peak_gflops:.2} GFLOP/s (before the matmuls {peak_before:.2}, after {peak_after:.2})"
    );
    for (dtype, rates) in [("f32", &rates), ("f16", &rates_f16)] {
        for ((m, k, n), row) in SHAPES.iter().zip(rates) {
            println!(
                "matmul {dtype} weights m={m:<5} k={k:<5} n={n:<5} {:8.2} GFLOP/s  {:5.1}% of peak  (the engine's {} family, {})",
                row.gflops,
                100.0 * row.gflops / peak_gflops,
                row.family,
                row.timing
                    .map_or("forced by SURF_KERNELS", TimingSource::name)
            );
        }
    }
    let (k, n) = VARIANT_KN;
    let variants = matmul.variants();
    println!("matmul GFLOP/s per variant at k={k} n={n} (* marks the launcher's choice):");
    print!("  m    ");
    for &variant in &variants {
        print!(" {:>12}", variant_name(variant));
    }
    println!();
    for (m, row) in VARIANT_ROWS.iter().zip(&variant_rates) {
        let chosen = aligned_choice(&matmul, *m, n, k);
        print!("  {m:<5}");
        for (&variant, gflops) in variants.iter().zip(row) {
            let mark = if variant == chosen { "*" } else { " " };
            print!(" {gflops:>11.2}{mark}");
        }
        println!();
    }
    print_families(&family_rows, peak_gflops);
    let fusions = fusions(&selection);
    for (row, _) in &fusions {
        println!("{row}");
    }
    for ((sequences, seq), gflops) in ATTENTION_SHAPES.iter().zip(&attention_rates) {
        println!(
            "attention {sequences} x {seq} tokens, {HEADS} heads of {HEAD_DIM}: {gflops:8.2} GFLOP/s  {:5.1}% of peak",
            100.0 * gflops / peak_gflops
        );
    }
    println!(
        "layernorm + residual {layernorm_rows} x {}: {layernorm_rate:.2} GB/s",
        HEADS * HEAD_DIM
    );
    if let Some(per_second) = per_second {
        println!("engine: {per_second:.1} embeddings/s (batches of 32 short sentences)");
    }

    let share = |gflops: f64| gflops / peak_gflops;
    let mut kernels: Vec<serde_json::Value> = [("f32", &rates), ("f16", &rates_f16)]
        .into_iter()
        .flat_map(|(dtype, rates)| {
            SHAPES.iter().zip(rates).map(move |(&(m, k, n), row)| {
                serde_json::json!({
                    "kernel": format!("matmul ({})", row.family),
                    "family": row.family.name(),
                    "timing": row.timing.map_or("forced", TimingSource::name),
                    "weights": dtype,
                    "shape": format!("m={m} k={k} n={n}"),
                    "gflop_s": row.gflops,
                    "share_of_peak": share(row.gflops),
                })
            })
        })
        .collect();
    kernels.extend(ATTENTION_SHAPES.iter().zip(&attention_rates).map(
        |(&(sequences, seq), &gflops)| {
            serde_json::json!({
                "kernel": "attention",
                "weights": "none",
                "shape": format!("{sequences} x {seq} tokens, {HEADS} heads of {HEAD_DIM}"),
                "gflop_s": gflops,
                "share_of_peak": share(gflops),
            })
        },
    ));
    write_json(
        "kernels",
        &serde_json::json!({
            "adapter": gpu.adapter_name(),
            "quick": quick,
            "fma_peak_gflop_s": peak_gflops,
            "layernorm_gb_s": layernorm_rate,
            "layernorm_shape": format!("{layernorm_rows} x {}", HEADS * HEAD_DIM),
            "engine_per_s_32_short": per_second,
            "kernels": kernels,
            "families": family_rows
                .iter()
                .map(|row| family_json(row, peak_gflops))
                .collect::<Vec<_>>(),
            "fusions": fusions.into_iter().map(|(_, json)| json).collect::<Vec<_>>(),
        }),
    );
}

/// The engine's measurement of each projection fused with its residual add
/// and norm against the separate matmul and norm: a line to print and its
/// JSON, per shape. Empty when a family is forced.
fn fusions(selection: &Selection) -> Vec<(String, serde_json::Value)> {
    selection
        .tuned()
        .iter()
        .filter_map(|tuned| Some((tuned.shape, tuned.fusion?, tuned.timing)))
        .map(|(Shape { rows, k, n, .. }, fusion, timing)| {
            let line = format!(
                "projection + residual + norm, rows {rows} k {k} n {n}: fused {:.1} us, separate {:.1} us ({:.2} x){}",
                fusion.fused_us,
                fusion.separate_us,
                fusion.separate_us / fusion.fused_us,
                if fusion.fuses() { ", fused" } else { "" }
            );
            let json = serde_json::json!({
                "rows": rows,
                "k": k,
                "n": n,
                "fused_us": fusion.fused_us,
                "separate_us": fusion.separate_us,
                "fused": fusion.fuses(),
                "timing": timing.name(),
            });
            (line, json)
        })
        .collect()
}
