//! Every WGSL kernel against a CPU reference computed in f64.
//!
//! Kernels that read weights run with f32 weights and with f16 weights packed
//! two to a word; the f16 reference is computed from the same f16-rounded
//! values, so the tolerance is the same: what is measured is the kernel's
//! arithmetic, not the rounding of the weights.
//!
//! Inputs are small because CI runs these on a software rasterizer. Errors are
//! measured as max |gpu - reference| / max |reference| over the compared
//! elements, which is the relative error of the result as a whole and does not
//! blow up on individual elements that happen to be near zero.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use surf_engine::gpu::{Gpu, gpu_for_tests};
use surf_engine::kernels::DispatchPlan;
use surf_engine::kernels::attention::{Attention, AttentionOptions, HeadLayout, MASKED, Window};
use surf_engine::kernels::embed::{Embed, EmbeddingTables};
use surf_engine::kernels::family::KernelFamily;
use surf_engine::kernels::gate::Gate;
use surf_engine::kernels::layernorm::{LayerNorm, LayerNormOperands, NormOptions};
use surf_engine::kernels::matmul::{Epilogue, Matmul, MatmulOperands, MatmulVariant};
use surf_engine::kernels::matmul_norm::{MatmulNorm, MatmulNormOperands};
use surf_engine::kernels::normalize::Normalize;
use surf_engine::kernels::pool::Pool;
use surf_engine::kernels::rotary::{HeadNorm, Rotary, RotaryFrequencies, RotaryTables};
use surf_engine::{Activation, Pooling, WeightDtype};

const TOLERANCE: f64 = 1e-4;

/// The f16 bar, for kernels that compute in f16: both operands are rounded
/// to f16 (2^-12 of each value at most) and four products are summed in f16
/// (2^-12 of a partial sum of about 2 per addition) before the f32
/// accumulator takes them. Over k of about 100 with random signs this comes
/// to a few 1e-3 of the largest result, or of 1 under tanh, which bounds it;
/// 1e-2 leaves a margin and stays several times below what one product
/// missing from a sum would cost at these sizes (about 0.3 of a largest
/// result of 2 to 5).
///
/// The half attention stands at the same bar: its queries, keys, values and
/// probabilities are rounded to f16 (2^-12 each) and each product once more
/// before f32 takes it: over heads of up to 256 with random signs the
/// results come within about 1e-3 of the largest (9e-4 at most in these
/// tests), while a key dropped from or added to a softmax over these
/// sequences moves a result by several 1e-2 of it.
const HALF_TOLERANCE: f64 = 1e-2;

/// The bar for `family`'s attention: the f16 bar for the half family, which
/// computes in f16, else the f32 one.
fn attention_tolerance(family: KernelFamily) -> f64 {
    if family == KernelFamily::Half {
        HALF_TOLERANCE
    } else {
        TOLERANCE
    }
}

/// Written around every output so that stray writes show up.
const SENTINEL: f32 = 12345.0;

fn random_vec(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn upload(gpu: &Gpu, label: &str, data: &[f32]) -> wgpu::Buffer {
    gpu.storage_buffer_with(label, bytemuck::cast_slice(data))
}

const DTYPES: [WeightDtype; 2] = [WeightDtype::F32, WeightDtype::F16];

/// `values` as a kernel built for `dtype` reads them: the buffer, and the
/// values the reference must use (rounded to f16 for f16 weights). f16
/// buffers are padded to whole vec4 groups, as the engine's packing does.
fn weights_for(gpu: &Gpu, dtype: WeightDtype, values: Vec<f32>) -> (Vec<f32>, wgpu::Buffer) {
    match dtype {
        WeightDtype::F32 => {
            let buffer = upload(gpu, "weights", &values);
            (values, buffer)
        }
        WeightDtype::F16 => {
            let mut words: Vec<half::f16> =
                values.iter().map(|&v| half::f16::from_f32(v)).collect();
            let rounded = words.iter().map(|w| w.to_f32()).collect();
            words.resize(words.len().next_multiple_of(4), half::f16::ZERO);
            let buffer = gpu.storage_buffer_with("weights", bytemuck::cast_slice(&words));
            (rounded, buffer)
        }
    }
}

fn upload_u32(gpu: &Gpu, label: &str, data: &[u32]) -> wgpu::Buffer {
    gpu.storage_buffer_with(label, bytemuck::cast_slice(data))
}

fn run_and_read(gpu: &Gpu, plan: DispatchPlan, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
    plan.submit(gpu);
    let bytes = gpu
        .read_buffer(buffer, (len * 4) as u64)
        .expect("reading back the output");
    gpu.check_errors().expect("the GPU reported an error");
    bytemuck::cast_slice(&bytes).to_vec()
}

fn read_back(gpu: &Gpu, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
    let bytes = gpu
        .read_buffer(buffer, (len * 4) as u64)
        .expect("reading back a buffer");
    bytemuck::cast_slice(&bytes).to_vec()
}

/// max |actual - expected| / max |expected|, failing on any non-finite value.
fn relative_error(actual: &[f32], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let scale = expected
        .iter()
        .fold(0.0f64, |m, e| m.max(e.abs()))
        .max(f64::MIN_POSITIVE);
    let mut worst = 0.0f64;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        assert!(a.is_finite(), "element {i} is {a}, expected {e}");
        worst = worst.max((f64::from(a) - e).abs());
    }
    worst / scale
}

fn assert_close(what: &str, actual: &[f32], expected: &[f64]) {
    assert_within(what, actual, expected, TOLERANCE);
}

fn assert_within(what: &str, actual: &[f32], expected: &[f64], tolerance: f64) {
    let error = relative_error(actual, expected);
    if std::env::var_os("SURF_SHOW_ERRORS").is_some() {
        eprintln!("{error:.2e} {what}");
    }
    assert!(
        error < tolerance,
        "{what}: relative error {error:e} exceeds {tolerance:e}"
    );
}

/// erf to about 1e-15: its Maclaurin series where it converges without
/// cancellation, the continued fraction of erfc beyond.
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let value = if z < 2.5 {
        let mut term = z;
        let mut sum = z;
        for n in 1..200 {
            term *= -z * z / n as f64;
            let next = term / (2 * n + 1) as f64;
            sum += next;
            if next.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(z) = exp(-z^2) / sqrt(pi) / (z + (1/2) / (z + 1 / (z + (3/2) / (z + ...))))
        let mut tail = z;
        for n in (1..80).rev() {
            tail = z + (n as f64 / 2.0) / tail;
        }
        1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / tail
    };
    value.copysign(x)
}

fn activate(activation: Option<Activation>, x: f64) -> f64 {
    match activation {
        None => x,
        Some(Activation::GeluErf) => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        Some(Activation::GeluTanh) => {
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + inner.tanh())
        }
        Some(Activation::Relu) => x.max(0.0),
        Some(Activation::Tanh) => x.tanh(),
        Some(Activation::Silu) => x / (1.0 + (-x).exp()),
        Some(Activation::Identity) => x,
    }
}

#[test]
fn reference_erf_matches_known_values() {
    // erf(0.5), erf(1), erf(2), erf(3) from Abramowitz & Stegun, table 7.1.
    let known = [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (3.0, 0.999_977_909_503_001_4),
    ];
    for (x, expected) in known {
        assert!((erf(x) - expected).abs() < 1e-14, "erf({x}) = {}", erf(x));
        assert!((erf(-x) + expected).abs() < 1e-14);
    }
}

/// How a matmul case is launched.
#[derive(Debug, Clone, Copy)]
enum Launch {
    Default,
    Variant(MatmulVariant),
    Family(KernelFamily),
}

struct MatmulCase {
    m: usize,
    k: usize,
    n: usize,
    a_offset: usize,
    b_offset: usize,
    bias_offset: usize,
    c_offset: usize,
    activation: Option<Activation>,
}

impl MatmulCase {
    fn epilogue(&self) -> Epilogue {
        match self.activation {
            None => Epilogue::Bias,
            Some(a) => Epilogue::BiasThen(a),
        }
    }

    /// Runs the case with `variant` (or the launcher's own choice) and checks
    /// C and the sentinels around it.
    fn check(&self, gpu: &Gpu, matmul: &Matmul, variant: Option<MatmulVariant>, rng: &mut StdRng) {
        let launch = match variant {
            Some(variant) => Launch::Variant(variant),
            None => Launch::Default,
        };
        self.run(gpu, matmul, launch, rng);
    }

    fn check_family(&self, gpu: &Gpu, matmul: &Matmul, family: KernelFamily, rng: &mut StdRng) {
        self.run(gpu, matmul, Launch::Family(family), rng);
    }

    fn run(&self, gpu: &Gpu, matmul: &Matmul, launch: Launch, rng: &mut StdRng) {
        let Self { m, k, n, .. } = *self;
        let lhs = random_vec(rng, self.a_offset + m * k);
        let weight_len = (self.b_offset + k * n).max(self.bias_offset + n);
        let (weights, weights_buffer) =
            weights_for(gpu, matmul.dtype(), random_vec(rng, weight_len));
        let out_len = self.c_offset + m * n + 8;

        let mut expected = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut sum = f64::from(weights[self.bias_offset + j]);
                for p in 0..k {
                    sum += f64::from(lhs[self.a_offset + i * k + p])
                        * f64::from(weights[self.b_offset + p * n + j]);
                }
                expected[i * n + j] = activate(self.activation, sum);
            }
        }

        let lhs_buffer = upload(gpu, "lhs", &lhs);
        let out_buffer = upload(gpu, "out", &vec![SENTINEL; out_len]);
        let operands = MatmulOperands {
            lhs: &lhs_buffer,
            a_offset: self.a_offset as u32,
            weights: &weights_buffer,
            b_offset: self.b_offset as u32,
            bias_offset: self.bias_offset as u32,
            out: &out_buffer,
            c_offset: self.c_offset as u32,
        };
        let mut plan = DispatchPlan::new(gpu);
        match launch {
            Launch::Variant(variant) => {
                matmul.push_variant(variant, &mut plan, m, n, k, self.epilogue(), operands)
            }
            Launch::Family(family) => {
                matmul.push_family(family, &mut plan, m, n, k, self.epilogue(), operands)
            }
            Launch::Default => matmul.push(&mut plan, m, n, k, self.epilogue(), operands),
        }
        let out = run_and_read(gpu, plan, &out_buffer, out_len);

        let what = format!(
            "matmul {launch:?} {} weights m={m} k={k} n={n} offsets a={} b={} bias={} c={} {:?}",
            matmul.dtype(),
            self.a_offset,
            self.b_offset,
            self.bias_offset,
            self.c_offset,
            self.activation
        );
        let c_end = self.c_offset + m * n;
        assert!(
            out[..self.c_offset]
                .iter()
                .chain(&out[c_end..])
                .all(|&v| v == SENTINEL),
            "{what}: wrote outside C"
        );
        let half = match launch {
            Launch::Variant(variant) => matches!(variant, MatmulVariant::Half { .. }),
            Launch::Family(family) => family == KernelFamily::Half,
            Launch::Default => false,
        };
        let tolerance = if half { HALF_TOLERANCE } else { TOLERANCE };
        assert_within(&what, &out[self.c_offset..c_end], &expected, tolerance);
    }
}

const ACTIVATIONS: [Option<Activation>; 6] = [
    None,
    Some(Activation::GeluErf),
    Some(Activation::GeluTanh),
    Some(Activation::Relu),
    Some(Activation::Tanh),
    Some(Activation::Silu),
];

#[test]
fn matmul_general_matches_reference_for_odd_shapes_and_offsets() {
    let Some(gpu) = gpu_for_tests() else { return };
    for dtype in DTYPES {
        matmul_general_cases(&gpu, &Matmul::new(&gpu, dtype));
    }
}

fn matmul_general_cases(gpu: &Gpu, matmul: &Matmul) {
    let mut rng = StdRng::seed_from_u64(1);
    let shapes = [
        (37, 53, 70, 4, 8, 4),
        (130, 385, 67, 12, 4, 0),
        (1, 1, 1, 0, 0, 0),
        (5, 3, 129, 8, 0, 4),
    ];
    for (i, &(m, k, n, a_offset, b_offset, c_offset)) in shapes.iter().enumerate() {
        let case = MatmulCase {
            m,
            k,
            n,
            a_offset,
            b_offset,
            bias_offset: b_offset + k * n + 4,
            c_offset,
            activation: ACTIVATIONS[i % ACTIVATIONS.len()],
        };
        case.check(gpu, matmul, Some(MatmulVariant::General), &mut rng);
    }
    // Every activation on one shape that leaves partial tiles in both directions.
    for activation in ACTIVATIONS {
        let case = MatmulCase {
            m: 37,
            k: 53,
            n: 70,
            a_offset: 0,
            b_offset: 4,
            bias_offset: 0,
            c_offset: 8,
            activation,
        };
        case.check(gpu, matmul, Some(MatmulVariant::General), &mut rng);
    }
}

/// Rows of C one workgroup of `variant` computes.
fn tile_rows(variant: MatmulVariant) -> usize {
    match variant {
        MatmulVariant::General => 128,
        MatmulVariant::Subgroups { rows } => rows as usize,
        MatmulVariant::Tiled => 64,
        MatmulVariant::Blocked { rows } | MatmulVariant::Half { rows } => rows as usize,
    }
}

#[test]
fn matmul_every_variant_matches_reference_for_aligned_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    for dtype in DTYPES {
        matmul_variant_cases(&gpu, &Matmul::new(&gpu, dtype));
    }
}

fn matmul_variant_cases(gpu: &Gpu, matmul: &Matmul) {
    if !matmul.variants().contains(&MatmulVariant::Tiled) {
        eprintln!("note: this adapter has no workgroups of 256; the tiled matmul is not tested");
    }
    if !matmul
        .variants()
        .iter()
        .any(|v| matches!(v, MatmulVariant::Subgroups { .. }))
    {
        eprintln!(
            "note: this adapter has no subgroups of 8 or more; the subgroup matmul is not tested"
        );
    }
    let mut rng = StdRng::seed_from_u64(2);
    // Partial tiles in m and n (subgroup tiles are 16 to 128 rows by 64
    // columns), k not a multiple of the general kernel's K step, nonzero
    // vec4-aligned offsets, a single row.
    let shapes = [
        (37, 52, 72, 4, 8, 12),
        (130, 388, 68, 8, 4, 4),
        (3, 4, 4, 0, 0, 0),
        (129, 20, 132, 0, 4, 0),
        (1, 24, 68, 4, 4, 8),
        // Three 128-row tiles: every tile must start at its own boundary.
        (300, 36, 20, 0, 0, 8),
    ];
    for variant in matmul.variants() {
        // Shapes relative to this variant's tile: one row short of a tile,
        // a tile and a row, and three tiles but for a partial last one.
        let rows = tile_rows(variant);
        let relative = [
            (rows - 1, 40, 68, 4, 12, 8),
            (rows + 1, 16, 8, 8, 4, 4),
            (3 * rows - 5, 28, 136, 12, 8, 4),
        ];
        for (i, &(m, k, n, a_offset, b_offset, c_offset)) in
            shapes.iter().chain(&relative).enumerate()
        {
            for activation in [ACTIVATIONS[i % 4], ACTIVATIONS[(i + 1) % 4]] {
                let case = MatmulCase {
                    m,
                    k,
                    n,
                    a_offset,
                    b_offset,
                    bias_offset: b_offset + k * n,
                    c_offset,
                    activation,
                };
                case.check(gpu, matmul, Some(variant), &mut rng);
            }
        }
    }
}

#[test]
fn matmul_push_picks_a_variant_that_handles_the_operands() {
    let Some(gpu) = gpu_for_tests() else { return };
    for dtype in DTYPES {
        matmul_push_cases(&gpu, &Matmul::new(&gpu, dtype));
    }
}

fn matmul_push_cases(gpu: &Gpu, matmul: &Matmul) {
    let mut rng = StdRng::seed_from_u64(3);
    // Aligned at row counts that pick different tile heights, then each
    // alignment requirement broken in turn.
    let cases = [
        (1, 36, 44, 4, 8, 4, 12),
        (28, 36, 44, 4, 8, 4, 12),
        (100, 36, 44, 4, 8, 4, 12),
        (600, 36, 44, 4, 8, 4, 12),
        // Row counts that push covers with a tall and a short tile.
        (132, 36, 44, 4, 8, 4, 12),
        (148, 36, 44, 4, 8, 4, 12),
        (1064, 8, 12, 4, 8, 4, 12),
        (40, 36, 44, 4, 8, 4, 12),
        (40, 37, 44, 4, 8, 4, 12),
        (40, 36, 45, 4, 8, 4, 12),
        (40, 36, 44, 1, 8, 4, 12),
        (40, 36, 44, 4, 2, 4, 12),
        (40, 36, 44, 4, 8, 3, 12),
        (40, 36, 44, 4, 8, 4, 5),
    ];
    for (m, k, n, a_offset, b_offset, bias_extra, c_offset) in cases {
        let case = MatmulCase {
            m,
            k,
            n,
            a_offset,
            b_offset,
            bias_offset: b_offset + k * n + bias_extra,
            c_offset,
            activation: Some(Activation::GeluErf),
        };
        case.check(gpu, matmul, None, &mut rng);
    }
}

/// Every family the adapter runs, through `push_family`: aligned shapes that
/// leave partial tiles, and unaligned ones that the vec4 families hand to the
/// portable kernel.
#[test]
fn matmul_every_family_matches_reference_aligned_or_not() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    for dtype in DTYPES {
        let matmul = Matmul::new(&gpu, dtype);
        for family in KernelFamily::supported(&gpu) {
            for (m, k, n, a_offset, c_offset) in
                [(65, 20, 132, 4, 8), (17, 388, 68, 0, 4), (40, 37, 45, 1, 3)]
            {
                let b_offset = 4;
                let case = MatmulCase {
                    m,
                    k,
                    n,
                    a_offset,
                    b_offset,
                    bias_offset: b_offset + k * n,
                    c_offset,
                    activation: Some(Activation::GeluErf),
                };
                case.check_family(&gpu, &matmul, family, &mut rng);
            }
        }
    }
}

/// The blocked and half matmuls at every tile height, with every epilogue,
/// on shapes that are multiples of none of their tile sizes (rows, the 64
/// columns, the K step of 16), for f32 and f16 weights.
#[test]
fn matmul_blocked_and_half_match_reference_with_every_epilogue() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    let mut ran = Vec::new();
    for dtype in DTYPES {
        let matmul = Matmul::new(&gpu, dtype);
        let variants: Vec<MatmulVariant> = matmul
            .variants()
            .into_iter()
            .filter(|v| {
                matches!(
                    v,
                    MatmulVariant::Blocked { .. } | MatmulVariant::Half { .. }
                )
            })
            .collect();
        for variant in variants {
            let rows = tile_rows(variant);
            for (i, activation) in ACTIVATIONS.into_iter().enumerate() {
                // A partial row tile, partial column tiles, a partial K step.
                let (m, k, n) = [(rows + 3, 52, 72), (2 * rows - 1, 100, 196)][i % 2];
                let case = MatmulCase {
                    m,
                    k,
                    n,
                    a_offset: 4 * i,
                    b_offset: 8,
                    bias_offset: 8 + k * n + 4,
                    c_offset: 4 * (i + 1),
                    activation,
                };
                case.check(&gpu, &matmul, Some(variant), &mut rng);
            }
            ran.push(format!("{variant:?} {dtype}"));
        }
    }
    if !ran.iter().any(|name| name.starts_with("Half")) {
        eprintln!("note: this adapter has no SHADER_F16; the half matmul is not tested");
    }
    if ran.is_empty() {
        eprintln!("note: this adapter cannot run the blocked matmul; it is not tested");
    }
}

#[test]
fn embed_sums_word_rows_with_the_tables_a_family_has() {
    let Some(gpu) = gpu_for_tests() else { return };
    for dtype in DTYPES {
        for (positions, types) in [(true, true), (true, false), (false, false)] {
            embed_case(&gpu, dtype, positions, types);
        }
    }
}

fn embed_case(gpu: &Gpu, dtype: WeightDtype, with_positions: bool, with_types: bool) {
    let gpu = gpu.clone();
    let embed = Embed::new(&gpu, dtype);
    let mut rng = StdRng::seed_from_u64(4);
    let (positions, types, hidden) = (20, 2, 37);
    let position_offset = 3;
    let type_offset = position_offset + positions * hidden + 1;
    let tables = EmbeddingTables {
        position_offset: with_positions.then_some(position_offset as u32),
        type_offset: with_types.then_some(type_offset as u32),
    };
    // An odd hidden size and offsets, so that f16 elements straddle words.
    let (table, table_buffer) = weights_for(
        &gpu,
        dtype,
        random_vec(&mut rng, type_offset + types * hidden),
    );
    let token_count = 29;
    let tokens: Vec<u32> = (0..token_count)
        .flat_map(|t| [0, (t % positions) as u32, rng.random_range(0..types as u32)])
        .collect();
    let words = random_vec(&mut rng, token_count * hidden);

    let tokens_buffer = upload_u32(&gpu, "tokens", &tokens);
    let words_buffer = upload(&gpu, "words", &words);
    let out_buffer = gpu.storage_buffer("out", (token_count * hidden * 4) as u64);
    let mut plan = DispatchPlan::new(&gpu);
    embed.push(
        &gpu,
        &mut plan,
        token_count,
        hidden,
        &tokens_buffer,
        &words_buffer,
        &table_buffer,
        tables,
        &out_buffer,
    );
    let out = run_and_read(&gpu, plan, &out_buffer, token_count * hidden);

    let mut expected = Vec::with_capacity(token_count * hidden);
    for (t, ids) in tokens.chunks(3).enumerate() {
        for h in 0..hidden {
            let at = |offset: usize, id: u32| f64::from(table[offset + id as usize * hidden + h]);
            let mut value = f64::from(words[t * hidden + h]);
            if with_positions {
                value += at(position_offset, ids[1]);
            }
            if with_types {
                value += at(type_offset, ids[2]);
            }
            expected.push(value);
        }
    }
    assert_close(
        &format!("embed {dtype} positions={with_positions} types={with_types}"),
        &out,
        &expected,
    );
}

fn layernorm_reference(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> Vec<f64> {
    let cols = gamma.len();
    let mut out = Vec::with_capacity(x.len());
    for (r, row) in x.chunks(cols).enumerate() {
        let values: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(c, &v)| f64::from(v) + residual.map_or(0.0, |res| f64::from(res[r * cols + c])))
            .collect();
        let mean = values.iter().sum::<f64>() / cols as f64;
        let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / cols as f64;
        let inv_std = 1.0 / (variance + eps).sqrt();
        out.extend(
            values
                .iter()
                .enumerate()
                .map(|(c, v)| (v - mean) * inv_std * f64::from(gamma[c]) + f64::from(beta[c])),
        );
    }
    out
}

#[test]
fn layernorm_matches_reference_with_and_without_residual() {
    let Some(gpu) = gpu_for_tests() else { return };
    for dtype in DTYPES {
        layernorm_cases(&gpu, dtype);
    }
}

fn layernorm_cases(gpu: &Gpu, dtype: WeightDtype) {
    let gpu = gpu.clone();
    let layernorm = LayerNorm::new(&gpu, dtype);
    let mut rng = StdRng::seed_from_u64(5);
    let eps = 1e-12f32;
    for cols in [36, 200, 384] {
        let rows = 7;
        let mut x = random_vec(&mut rng, rows * cols);
        // A constant row has zero variance: the output must be beta, not NaN.
        x[2 * cols..3 * cols].fill(0.75);
        let residual = random_vec(&mut rng, rows * cols);
        let gamma_offset = 4;
        let beta_offset = gamma_offset + cols + 4;
        let (weights, weights_buffer) =
            weights_for(&gpu, dtype, random_vec(&mut rng, beta_offset + cols));
        let gamma = &weights[gamma_offset..gamma_offset + cols];
        let beta = &weights[beta_offset..beta_offset + cols];

        let x_buffer = upload(&gpu, "x", &x);
        let residual_buffer = upload(&gpu, "residual", &residual);
        let launches = KernelFamily::supported(&gpu)
            .into_iter()
            .flat_map(|family| [(family, false), (family, true)]);
        for (family, with_residual) in launches {
            let out_buffer = gpu.storage_buffer("out", (rows * cols * 4) as u64);
            let mut plan = DispatchPlan::new(&gpu);
            layernorm.push_family(
                family,
                &gpu,
                &mut plan,
                rows,
                cols,
                eps,
                LayerNormOperands {
                    x: &x_buffer,
                    residual: with_residual.then_some(&residual_buffer),
                    weights: &weights_buffer,
                    gamma_offset: gamma_offset as u32,
                    beta_offset: beta_offset as u32,
                    out: &out_buffer,
                },
            );
            let out = run_and_read(&gpu, plan, &out_buffer, rows * cols);
            let expected = layernorm_reference(
                &x,
                with_residual.then_some(&residual[..]),
                gamma,
                beta,
                f64::from(eps),
            );
            assert_close(
                &format!("layernorm {family} {dtype} weights cols={cols} residual={with_residual}"),
                &out,
                &expected,
            );
            if !with_residual {
                // The residual would make the constant row vary again.
                let constant_row = &out[2 * cols..3 * cols];
                assert!(
                    constant_row
                        .iter()
                        .zip(beta)
                        .all(|(o, b)| (o - b).abs() <= 1e-6),
                    "a zero-variance row must come out as beta"
                );
            }
        }
    }
}

/// The sizes of one attention launch: `lengths` real tokens of each
/// sequence padded to `seq`.
struct AttentionShape<'a> {
    heads: usize,
    head_dim: usize,
    seq: usize,
    lengths: &'a [usize],
    /// Key/value heads, fewer than `heads` in grouped-query attention.
    kv_heads: usize,
    window: Window,
}

/// The kernel's outputs on the real query rows, and the f64 reference for
/// them: softmax(q k^T * scale + bias) v, where `bias` is `[heads, 2 seq -
/// 1]` by key - query + seq - 1.
fn attention_reference(
    shape: &AttentionShape<'_>,
    qkv: &[f32],
    out: &[f32],
    scale: f64,
    bias: Option<&[f32]>,
) -> (Vec<f32>, Vec<f64>) {
    let AttentionShape {
        heads,
        head_dim,
        seq,
        lengths,
        kv_heads,
        window,
    } = *shape;
    let hidden = heads * head_dim;
    let row_width = (heads + 2 * kv_heads) * head_dim;
    let span = 2 * seq - 1;
    // Part 0 is the query of `head`; parts 1 and 2 the key and value of its
    // key/value head.
    let at = |row: usize, part: usize, head: usize, d: usize| {
        let offset = match part {
            0 => head * head_dim,
            _ => {
                let kv_head = head / (heads / kv_heads);
                hidden + (part - 1) * kv_heads * head_dim + kv_head * head_dim
            }
        };
        f64::from(qkv[row * row_width + offset + d])
    };
    let mut actual = Vec::new();
    let mut expected = Vec::new();
    for (b, &len) in lengths.iter().enumerate() {
        for i in 0..len {
            let query_row = b * seq + i;
            for head in 0..heads {
                // Padding keys and keys outside the window get probability
                // exactly zero, so only the keys the query sees count.
                let keys: Vec<usize> = (0..len).filter(|&j| window.sees(i, j)).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let dot: f64 = (0..head_dim)
                            .map(|d| at(query_row, 0, head, d) * at(b * seq + j, 1, head, d))
                            .sum();
                        let position =
                            bias.map_or(0.0, |bias| f64::from(bias[head * span + j + seq - 1 - i]));
                        dot * scale + position
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..head_dim {
                    let context = keys
                        .iter()
                        .zip(&weights)
                        .map(|(&j, w)| w * at(b * seq + j, 2, head, d))
                        .sum::<f64>()
                        / total;
                    expected.push(context);
                    actual.push(out[query_row * hidden + head * head_dim + d]);
                }
            }
        }
    }
    (actual, expected)
}

#[test]
fn attention_matches_reference_on_real_query_rows() {
    let Some(gpu) = gpu_for_tests() else { return };
    let attention = Attention::new(&gpu);
    let mut rng = StdRng::seed_from_u64(6);
    // seq is a multiple of none of the key blocks (8, 16, 32) nor the query
    // groups (8, 64). Heads of 32 and 64 have kernels of their own in the
    // subgroup8 and tiled families; 48 always runs the portable kernel, here
    // with a sequence of one real token.
    assert!(!attention.uses_subgroups(48));
    let shapes = [
        (3, 32, 21, [21, 13]),
        (2, 64, 70, [70, 9]),
        (2, 48, 19, [19, 1]),
        (1, 32, 75, [75, 40]),
    ];
    let launches = KernelFamily::supported(&gpu)
        .into_iter()
        .flat_map(|family| shapes.map(|shape| (family, shape)));
    for (family, (heads, head_dim, seq, lengths)) in launches {
        let batch = lengths.len();
        let hidden = heads * head_dim;
        let rows = batch * seq;
        // Scaled so that softmax weights are far from uniform.
        let qkv: Vec<f32> = random_vec(&mut rng, rows * 3 * hidden)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let mask: Vec<f32> = (0..rows)
            .map(|r| {
                if r % seq < lengths[r / seq] {
                    0.0
                } else {
                    MASKED
                }
            })
            .collect();

        let qkv_buffer = upload(&gpu, "qkv", &qkv);
        let mask_buffer = upload(&gpu, "mask", &mask);
        let out_buffer = gpu.storage_buffer("out", (rows * hidden * 4) as u64);
        let mut plan = DispatchPlan::new(&gpu);
        attention.push_family(
            family,
            &mut plan,
            batch,
            seq,
            heads,
            head_dim,
            &qkv_buffer,
            &mask_buffer,
            &out_buffer,
        );
        let out = run_and_read(&gpu, plan, &out_buffer, rows * hidden);

        let scale = 1.0 / (head_dim as f64).sqrt();
        let shape = AttentionShape {
            heads,
            head_dim,
            seq,
            lengths: &lengths,
            kv_heads: heads,
            window: Window::FULL,
        };
        let (actual, expected) = attention_reference(&shape, &qkv, &out, scale, None);
        assert_within(
            &format!("attention {family} heads={heads} head_dim={head_dim} seq={seq}"),
            &actual,
            &expected,
            attention_tolerance(family),
        );
    }
}

#[test]
fn pool_matches_reference_in_every_mode() {
    let Some(gpu) = gpu_for_tests() else { return };
    let pool = Pool::new(&gpu);
    let mut rng = StdRng::seed_from_u64(7);
    let (seq, hidden) = (11, 150);
    let lengths = [11u32, 4, 1];
    let batch = lengths.len();
    let x = random_vec(&mut rng, batch * seq * hidden);
    let x_buffer = upload(&gpu, "x", &x);
    let lengths_buffer = upload_u32(&gpu, "lengths", &lengths);
    for mode in [
        Pooling::Mean,
        Pooling::Cls,
        Pooling::Max,
        Pooling::MeanSqrtLen,
        Pooling::WeightedMean,
        Pooling::LastToken,
    ] {
        let run = |normalized: bool| {
            let out_buffer = gpu.storage_buffer("out", (batch * hidden * 4) as u64);
            let mut plan = DispatchPlan::new(&gpu);
            let push = if normalized {
                Pool::push_normalized
            } else {
                Pool::push
            };
            push(
                &pool,
                &mut plan,
                batch,
                seq,
                hidden,
                mode,
                &x_buffer,
                &lengths_buffer,
                &out_buffer,
            );
            run_and_read(&gpu, plan, &out_buffer, batch * hidden)
        };
        let out = run(false);

        let mut expected = Vec::new();
        for (b, &len) in lengths.iter().enumerate() {
            let len = len as usize;
            for h in 0..hidden {
                let tokens = (0..len).map(|t| f64::from(x[(b * seq + t) * hidden + h]));
                expected.push(match mode {
                    Pooling::Mean => tokens.sum::<f64>() / len as f64,
                    Pooling::Cls => f64::from(x[b * seq * hidden + h]),
                    Pooling::Max => tokens.fold(f64::NEG_INFINITY, f64::max),
                    Pooling::MeanSqrtLen => tokens.sum::<f64>() / (len as f64).sqrt(),
                    Pooling::WeightedMean => {
                        let weighted: f64 =
                            tokens.enumerate().map(|(t, v)| (t + 1) as f64 * v).sum();
                        weighted / (len * (len + 1) / 2) as f64
                    }
                    Pooling::LastToken => f64::from(x[(b * seq + len - 1) * hidden + h]),
                });
            }
        }
        assert_close(&format!("pool {mode:?}"), &out, &expected);

        // Pooling and normalisation in one launch: each row over its L2 norm.
        let normalized: Vec<f64> = expected
            .chunks_exact(hidden)
            .flat_map(|row| {
                let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
                row.iter().map(move |v| v / norm)
            })
            .collect();
        let what = format!("pool {mode:?} normalized");
        assert_close(&what, &run(true), &normalized);
    }
}

#[test]
fn normalize_scales_rows_to_unit_length() {
    let Some(gpu) = gpu_for_tests() else { return };
    let normalize = Normalize::new(&gpu);
    let mut rng = StdRng::seed_from_u64(8);
    let (rows, cols) = (5, 300);
    let mut x = random_vec(&mut rng, rows * cols);
    // An all-zero row must stay zero rather than become NaN.
    x[3 * cols..4 * cols].fill(0.0);
    let buffer = upload(&gpu, "x", &x);
    let mut plan = DispatchPlan::new(&gpu);
    normalize.push(&mut plan, rows, cols, &buffer);
    let out = run_and_read(&gpu, plan, &buffer, rows * cols);

    let mut expected = Vec::new();
    for row in x.chunks(cols) {
        let norm = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        expected.extend(row.iter().map(|&v| f64::from(v) / norm));
    }
    assert_close("normalize", &out, &expected);
    assert!(out[3 * cols..4 * cols].iter().all(|&v| v == 0.0));
}

#[test]
fn rms_norm_matches_reference_and_keeps_the_residual_sum() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    let (rows, cols, eps) = (5, 96, 1e-6f32);
    let x = random_vec(&mut rng, rows * cols);
    let residual = random_vec(&mut rng, rows * cols);
    for dtype in DTYPES {
        let layernorm = LayerNorm::new(&gpu, dtype);
        let (weights, weights_buffer) = weights_for(&gpu, dtype, random_vec(&mut rng, 4 + cols));
        let gamma = &weights[4..4 + cols];
        for family in KernelFamily::supported(&gpu) {
            let x_buffer = upload(&gpu, "x", &x);
            let residual_buffer = upload(&gpu, "residual", &residual);
            let out_buffer = gpu.storage_buffer("out", (rows * cols * 4) as u64);
            let mut plan = DispatchPlan::new(&gpu);
            layernorm.push_with(
                family,
                &gpu,
                &mut plan,
                rows,
                cols,
                eps,
                NormOptions {
                    rms: true,
                    write_sum: true,
                },
                LayerNormOperands {
                    x: &x_buffer,
                    residual: Some(&residual_buffer),
                    weights: &weights_buffer,
                    gamma_offset: 4,
                    beta_offset: 4,
                    out: &out_buffer,
                },
            );
            let out = run_and_read(&gpu, plan, &out_buffer, rows * cols);
            let sum = read_back(&gpu, &residual_buffer, rows * cols);
            let mut expected = Vec::new();
            let mut expected_sum = Vec::new();
            for r in 0..rows {
                let values: Vec<f64> = (0..cols)
                    .map(|c| f64::from(x[r * cols + c]) + f64::from(residual[r * cols + c]))
                    .collect();
                let mean_square = values.iter().map(|v| v * v).sum::<f64>() / cols as f64;
                let inv = 1.0 / (mean_square + f64::from(eps)).sqrt();
                expected.extend(
                    values
                        .iter()
                        .zip(gamma)
                        .map(|(v, g)| v * inv * f64::from(*g)),
                );
                expected_sum.extend(values);
            }
            assert_close(&format!("rms norm {family} {dtype}"), &out, &expected);
            assert_close(
                &format!("residual sum {family} {dtype}"),
                &sum,
                &expected_sum,
            );
        }
    }
}

#[test]
fn gate_multiplies_the_activated_gate_by_the_up_projection() {
    let Some(gpu) = gpu_for_tests() else { return };
    let gate = Gate::new(&gpu);
    let mut rng = StdRng::seed_from_u64(12);
    let (rows, width) = (7, 45);
    let x: Vec<f32> = random_vec(&mut rng, rows * 2 * width)
        .iter()
        .map(|v| 3.0 * v)
        .collect();
    let x_buffer = upload(&gpu, "x", &x);
    for activation in [
        Activation::GeluTanh,
        Activation::GeluErf,
        Activation::Relu,
        Activation::Silu,
    ] {
        let out_buffer = gpu.storage_buffer("out", (rows * width * 4) as u64);
        let mut plan = DispatchPlan::new(&gpu);
        gate.push(
            &gpu,
            &mut plan,
            rows,
            width,
            activation,
            &x_buffer,
            &out_buffer,
        );
        let out = run_and_read(&gpu, plan, &out_buffer, rows * width);
        let expected: Vec<f64> = (0..rows * width)
            .map(|i| {
                let (r, c) = (i / width, i % width);
                let gate = f64::from(x[r * 2 * width + c]);
                let up = f64::from(x[r * 2 * width + width + c]);
                activate(Some(activation), gate) * up
            })
            .collect();
        assert_close(&format!("gate {activation:?}"), &out, &expected);
    }
}

#[test]
fn attention_adds_a_relative_position_bias_at_the_family_scale() {
    let Some(gpu) = gpu_for_tests() else { return };
    let attention = Attention::new(&gpu);
    let mut rng = StdRng::seed_from_u64(13);
    // A head of 24 (T5-like, portable kernel), and heads of 32 and 64, which
    // the subgroup8 and tiled families run with kernels of their own.
    let shapes = [
        (4, 24, 13, [13, 6]),
        (2, 32, 21, [21, 9]),
        (2, 64, 19, [19, 4]),
    ];
    let launches = KernelFamily::supported(&gpu)
        .into_iter()
        .flat_map(|family| shapes.map(|shape| (family, shape)));
    for (family, (heads, head_dim, seq, lengths)) in launches {
        let batch = lengths.len();
        let hidden = heads * head_dim;
        let rows = batch * seq;
        let qkv = random_vec(&mut rng, rows * 3 * hidden);
        let mask: Vec<f32> = (0..rows)
            .map(|r| {
                if r % seq < lengths[r / seq] {
                    0.0
                } else {
                    MASKED
                }
            })
            .collect();
        let span = 2 * seq - 1;
        let bias: Vec<f32> = random_vec(&mut rng, heads * span)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let scale = 1.0f32;
        let qkv_buffer = upload(&gpu, "qkv", &qkv);
        let mask_buffer = upload(&gpu, "mask", &mask);
        let bias_buffer = upload(&gpu, "bias", &bias);
        let out_buffer = gpu.storage_buffer("out", (rows * hidden * 4) as u64);
        let mut plan = DispatchPlan::new(&gpu);
        attention.push_with(
            family,
            &mut plan,
            batch,
            seq,
            HeadLayout::multi_head(heads, head_dim),
            AttentionOptions {
                scale,
                position_bias: Some(&bias_buffer),
                window: Window::FULL,
            },
            &qkv_buffer,
            &mask_buffer,
            &out_buffer,
        );
        let out = run_and_read(&gpu, plan, &out_buffer, rows * hidden);
        let shape = AttentionShape {
            heads,
            head_dim,
            seq,
            lengths: &lengths,
            kv_heads: heads,
            window: Window::FULL,
        };
        let (actual, expected) =
            attention_reference(&shape, &qkv, &out, f64::from(scale), Some(&bias));
        assert_within(
            &format!("biased attention {family} heads={heads} head_dim={head_dim}"),
            &actual,
            &expected,
            attention_tolerance(family),
        );
    }
}

/// Random query, key and value rows (doubled, so that scores spread) for
/// `lengths.len()` sequences padded to `seq`, and the mask of the padding.
fn attention_inputs(
    rng: &mut StdRng,
    layout: HeadLayout,
    seq: usize,
    lengths: &[usize],
) -> (Vec<f32>, Vec<f32>) {
    let rows = lengths.len() * seq;
    let qkv = random_vec(rng, rows * layout.row_width())
        .iter()
        .map(|v| 2.0 * v)
        .collect();
    let mask = (0..rows)
        .map(|r| {
            if r % seq < lengths[r / seq] {
                0.0
            } else {
                MASKED
            }
        })
        .collect();
    (qkv, mask)
}

/// `family`'s attention over `(sequences, seq, layout)`, read back.
fn run_attention(
    gpu: &Gpu,
    attention: &Attention,
    family: KernelFamily,
    (sequences, seq, layout): (usize, usize, HeadLayout),
    options: AttentionOptions<'_>,
    qkv: &wgpu::Buffer,
    mask: &wgpu::Buffer,
) -> Vec<f32> {
    let out_len = sequences * seq * layout.query_width();
    let out = gpu.storage_buffer("out", (out_len * 4) as u64);
    let mut plan = DispatchPlan::new(gpu);
    attention.push_with(
        family, &mut plan, sequences, seq, layout, options, qkv, mask, &out,
    );
    run_and_read(gpu, plan, &out, out_len)
}

#[test]
fn attention_sees_only_its_window_and_shares_key_heads_at_every_head_size() {
    let Some(gpu) = gpu_for_tests() else { return };
    let attention = Attention::new(&gpu);
    let mut rng = StdRng::seed_from_u64(29);
    // (heads, kv_heads, head_dim, seq, lengths): grouped-query layouts at the
    // decoders' head sizes, sequences that are multiples of no key block.
    let shapes = [
        (4, 2, 64, 19, [19, 7]),
        (2, 1, 128, 13, [13, 5]),
        (2, 2, 256, 11, [11, 3]),
    ];
    let windows = [
        Window::FULL,
        Window::CAUSAL,
        Window::causal_sliding(4),
        Window::band(3),
    ];
    for family in KernelFamily::supported(&gpu) {
        for (heads, kv_heads, head_dim, seq, lengths) in shapes {
            for window in windows {
                let layout = HeadLayout {
                    heads,
                    kv_heads,
                    head_dim,
                };
                let (qkv, mask) = attention_inputs(&mut rng, layout, seq, &lengths);
                let qkv_buffer = upload(&gpu, "qkv", &qkv);
                let mask_buffer = upload(&gpu, "mask", &mask);
                let scale = 1.0 / (head_dim as f32).sqrt();
                let options = AttentionOptions {
                    scale,
                    position_bias: None,
                    window,
                };
                let out = run_attention(
                    &gpu,
                    &attention,
                    family,
                    (lengths.len(), seq, layout),
                    options,
                    &qkv_buffer,
                    &mask_buffer,
                );
                let shape = AttentionShape {
                    heads,
                    head_dim,
                    seq,
                    lengths: &lengths,
                    kv_heads,
                    window,
                };
                let (actual, expected) =
                    attention_reference(&shape, &qkv, &out, f64::from(scale), None);
                assert_within(
                    &format!(
                        "attention {family} heads={heads}/{kv_heads} head_dim={head_dim} {window:?}"
                    ),
                    &actual,
                    &expected,
                    attention_tolerance(family),
                );
            }
        }
    }
}

/// The half family's attention at every head size it has a kernel for, on
/// a sequence of 37 (a multiple of none of its key blocks of 8 to 64, and
/// longer than all but the largest), with grouped key/value heads, every
/// kind of window and a relative position bias, within the f16 bar of the
/// f64 reference. Its error must exceed the f32 tiled kernel's on the same
/// inputs: a launch that ran f32 arithmetic would not be the half kernel.
#[test]
fn attention_half_matches_reference_across_key_blocks_windows_and_head_sizes() {
    let Some(gpu) = gpu_for_tests() else { return };
    if let Some(reason) = KernelFamily::Half.unsupported_reason(&gpu) {
        eprintln!("note: the half attention is not tested: {reason}");
        return;
    }
    let attention = Attention::new(&gpu);
    let mut rng = StdRng::seed_from_u64(37);
    let (heads, kv_heads, seq, lengths) = (4, 2, 37, [37, 22]);
    let windows = [
        Window::FULL,
        Window::CAUSAL,
        Window::causal_sliding(5),
        Window::band(6),
    ];
    for head_dim in [32, 64, 128, 256] {
        for (w, window) in windows.into_iter().enumerate() {
            let with_bias = w % 2 == 0;
            let layout = HeadLayout {
                heads,
                kv_heads,
                head_dim,
            };
            let (qkv, mask) = attention_inputs(&mut rng, layout, seq, &lengths);
            let bias = random_vec(&mut rng, heads * (2 * seq - 1));
            let qkv_buffer = upload(&gpu, "qkv", &qkv);
            let mask_buffer = upload(&gpu, "mask", &mask);
            let bias_buffer = upload(&gpu, "bias", &bias);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let shape = AttentionShape {
                heads,
                head_dim,
                seq,
                lengths: &lengths,
                kv_heads,
                window,
            };
            let mut errors = Vec::new();
            for family in [KernelFamily::Half, KernelFamily::Tiled] {
                let options = AttentionOptions {
                    scale,
                    position_bias: with_bias.then_some(&bias_buffer),
                    window,
                };
                let out = run_attention(
                    &gpu,
                    &attention,
                    family,
                    (lengths.len(), seq, layout),
                    options,
                    &qkv_buffer,
                    &mask_buffer,
                );
                let (actual, expected) = attention_reference(
                    &shape,
                    &qkv,
                    &out,
                    f64::from(scale),
                    with_bias.then_some(bias.as_slice()),
                );
                let what = format!(
                    "attention {family} head_dim={head_dim} seq={seq} {window:?} bias={with_bias}"
                );
                assert_within(&what, &actual, &expected, attention_tolerance(family));
                errors.push(relative_error(&actual, &expected));
            }
            assert!(
                errors[0] > errors[1],
                "head_dim={head_dim} {window:?}: the half kernel's error {:e} is not above the f32 kernel's {:e}",
                errors[0],
                errors[1]
            );
        }
    }
}

#[test]
fn rotary_rotates_query_and_key_heads_after_their_norm_and_leaves_values() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut rng = StdRng::seed_from_u64(31);
    // 2 sequences of 7 positions, 4 query heads on 2 key/value heads of 8;
    // two tables (ModernBERT's global and local thetas), the second used.
    let layout = HeadLayout {
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let (seq, rows, half) = (7, 14, 4);
    let tables = RotaryTables {
        frequencies: vec![
            RotaryFrequencies::new(160000.0, layout.head_dim),
            RotaryFrequencies::new(10000.0, layout.head_dim),
        ],
    };
    let table = tables.for_length(seq);
    let eps = 1e-6f32;
    for dtype in DTYPES {
        let rotary = Rotary::new(&gpu, dtype);
        for with_norm in [false, true] {
            let qkv = random_vec(&mut rng, rows * layout.row_width());
            // Gains: the query's at 0, the key's at head_dim.
            let (gains, weights) =
                weights_for(&gpu, dtype, random_vec(&mut rng, 2 * layout.head_dim));
            let qkv_buffer = upload(&gpu, "qkv", &qkv);
            let table_buffer = upload(&gpu, "tables", &table);
            let norm = with_norm.then_some(HeadNorm {
                query_gain: 0,
                key_gain: layout.head_dim as u32,
                eps,
            });
            let mut plan = DispatchPlan::new(&gpu);
            rotary.push(
                &gpu,
                &mut plan,
                rows,
                seq,
                layout,
                1,
                norm,
                &qkv_buffer,
                &table_buffer,
                &weights,
            );
            let out = run_and_read(&gpu, plan, &qkv_buffer, qkv.len());
            let theta = 10000.0f64;
            let mut expected: Vec<f64> = qkv.iter().map(|&v| f64::from(v)).collect();
            for row in 0..rows {
                let position = (row % seq) as f64;
                for head in 0..layout.heads + layout.kv_heads {
                    let is_key = head >= layout.heads;
                    let start = row * layout.row_width()
                        + if is_key {
                            layout.key_offset() + (head - layout.heads) * layout.head_dim
                        } else {
                            head * layout.head_dim
                        };
                    let x: Vec<f64> = (0..layout.head_dim)
                        .map(|d| f64::from(qkv[start + d]))
                        .collect();
                    let x: Vec<f64> = if with_norm {
                        let mean = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
                        let scale = 1.0 / (mean + f64::from(eps)).sqrt();
                        let gain = if is_key { layout.head_dim } else { 0 };
                        x.iter()
                            .enumerate()
                            .map(|(d, v)| v * scale * f64::from(gains[gain + d]))
                            .collect()
                    } else {
                        x
                    };
                    for i in 0..half {
                        let frequency = theta.powf(-((2 * i) as f64) / layout.head_dim as f64);
                        let (sin, cos) = (position * frequency).sin_cos();
                        expected[start + i] = x[i] * cos - x[i + half] * sin;
                        expected[start + i + half] = x[i + half] * cos + x[i] * sin;
                    }
                }
            }
            assert_close(&format!("rotary {dtype} norm={with_norm}"), &out, &expected);
        }
    }
}

#[test]
fn projection_fused_with_residual_and_norm_matches_reference() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut rng = StdRng::seed_from_u64(17);
    for dtype in DTYPES {
        let fused = MatmulNorm::new(&gpu, dtype);
        if !fused.takes(4, 4, &[0]) {
            eprintln!("the fused projection and norm needs workgroups of 256: not on this adapter");
            return;
        }
        // Widths that fill no column block and widths that fill every one;
        // k off the kernel's 16-step; rows off both tile heights, and enough
        // rows for the 16-row tiles.
        for (m, k, n) in [(37, 36, 388), (5, 20, 4), (9, 64, 1024), (1031, 12, 132)] {
            for (rms, write_sum) in [(false, false), (true, true), (false, true)] {
                projection_norm_case(&gpu, &fused, dtype, &mut rng, (m, k, n), rms, write_sum);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn projection_norm_case(
    gpu: &Gpu,
    fused: &MatmulNorm,
    dtype: WeightDtype,
    rng: &mut StdRng,
    (m, k, n): (usize, usize, usize),
    rms: bool,
    write_sum: bool,
) {
    let eps = 1e-6f32;
    let lhs = random_vec(rng, m * k);
    let residual: Vec<f32> = random_vec(rng, m * n).iter().map(|v| 3.0 * v).collect();
    // Weights, bias, gamma and beta behind an offset, as packed models hold them.
    let (b_offset, bias_offset) = (8, 8 + k * n);
    let (gamma_offset, beta_offset) = (bias_offset + n, bias_offset + 2 * n);
    let (weights, weights_buffer) = weights_for(gpu, dtype, random_vec(rng, beta_offset + n));
    let lhs_buffer = upload(gpu, "lhs", &lhs);
    let residual_buffer = upload(gpu, "residual", &residual);
    let mut sentinel = vec![SENTINEL; m * n + 4];
    sentinel[..m * n].fill(0.0);
    let out_buffer = upload(gpu, "out", &sentinel);
    let mut plan = DispatchPlan::new(gpu);
    fused.push(
        &mut plan,
        m,
        n,
        k,
        eps,
        NormOptions { rms, write_sum },
        MatmulNormOperands {
            lhs: &lhs_buffer,
            weights: &weights_buffer,
            b_offset: b_offset as u32,
            bias_offset: bias_offset as u32,
            gamma_offset: gamma_offset as u32,
            beta_offset: beta_offset as u32,
            residual: &residual_buffer,
            out: &out_buffer,
        },
    );
    let out = run_and_read(gpu, plan, &out_buffer, m * n + 4);
    let sum = read_back(gpu, &residual_buffer, m * n);

    let mut expected = Vec::with_capacity(m * n);
    let mut expected_sum = Vec::with_capacity(m * n);
    for r in 0..m {
        let values: Vec<f64> = (0..n)
            .map(|c| {
                let dot: f64 = (0..k)
                    .map(|i| f64::from(lhs[r * k + i]) * f64::from(weights[b_offset + i * n + c]))
                    .sum();
                dot + f64::from(weights[bias_offset + c]) + f64::from(residual[r * n + c])
            })
            .collect();
        let mean = if rms {
            0.0
        } else {
            values.iter().sum::<f64>() / n as f64
        };
        let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        let inv_std = 1.0 / (variance + f64::from(eps)).sqrt();
        for (c, v) in values.iter().enumerate() {
            let gamma = f64::from(weights[gamma_offset + c]);
            let beta = if rms {
                0.0
            } else {
                f64::from(weights[beta_offset + c])
            };
            expected.push((v - mean) * inv_std * gamma + beta);
        }
        expected_sum.extend(values);
    }
    let what = format!("fused projection and norm m={m} k={k} n={n} rms={rms} {dtype}");
    assert_close(&what, &out[..m * n], &expected);
    assert!(
        out[m * n..].iter().all(|&v| v == SENTINEL),
        "{what}: wrote past its rows"
    );
    if write_sum {
        assert_close(&format!("{what}, the residual sum"), &sum, &expected_sum);
    } else {
        assert_eq!(sum, residual, "{what}: the residual was written");
    }
}
