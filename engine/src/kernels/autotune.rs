//! Measures the kernel families on the adapter at hand and keeps the fastest
//! per shape. The decisions (which shapes, which bucket a launch takes) are
//! in `selection`; this module only runs and times launches.
//!
//! Launches are repeated until they add up to `TARGET_FLOPS`, so that a small
//! shape is not timed as the cost of one submission. Each family first runs
//! once untimed at each row bucket of each op (software adapters compile a
//! pipeline on its first dispatch, and tile heights change with the rows).
//! The family that ran before measuring goes first; any other family whose
//! first launch alone takes longer than `DROP_FACTOR` times the best family's
//! whole run is dropped there, since it cannot win, which keeps a slow family
//! from costing seconds on a software adapter. The rest are timed `ROUNDS`
//! times, keeping their best.

use std::collections::BTreeMap;
use std::time::Instant;

use super::DispatchPlan;
use super::attention::Attention;
use super::family::KernelFamily;
use super::layernorm::{LayerNorm, LayerNormOperands};
use super::matmul::{Epilogue, Matmul, MatmulOperands};
use super::selection::{Shape, TunedOp, TunedShape, kernel_owner};
use crate::error::Result;
use crate::gpu::Gpu;

/// A family slower than the best by more than this after its first timed
/// run is not timed again.
const DROP_FACTOR: f64 = 1.5;
/// Timed runs of the families that stay.
const ROUNDS: usize = 3;
/// Work per timed submission, in floating-point operations.
const TARGET_FLOPS: f64 = 64e6;
const MAX_REPEATS: usize = 32;
/// Tokens per sequence of the attention measured at a row bucket.
const ATTENTION_SEQ: usize = 128;

/// The launchers the measured ops run on.
#[derive(Clone, Copy)]
pub struct Launchers<'a> {
    pub matmul: &'a Matmul,
    pub attention: &'a Attention,
    pub layernorm: &'a LayerNorm,
}

/// Buffers for one shape's launches, zero-filled: timing does not depend on
/// the values.
struct ShapeBuffers {
    input: wgpu::Buffer,
    weights: wgpu::Buffer,
    extra: wgpu::Buffer,
    out: wgpu::Buffer,
}

fn sequences_of(rows: usize) -> (usize, usize) {
    let seq = rows.clamp(1, ATTENTION_SEQ);
    (rows.div_ceil(seq), seq)
}

/// Floating-point operations of one launch, roughly for LayerNorm.
fn flops(shape: &Shape) -> f64 {
    let Shape { op, rows, k, n } = *shape;
    match op {
        TunedOp::Matmul => 2.0 * (rows * k * n) as f64,
        TunedOp::Attention => {
            let (sequences, seq) = sequences_of(rows);
            4.0 * (sequences * seq * seq * k * n) as f64
        }
        TunedOp::LayerNorm => 10.0 * (rows * k) as f64,
    }
}

fn buffers(gpu: &Gpu, launchers: &Launchers<'_>, shape: &Shape) -> ShapeBuffers {
    let Shape { op, rows, k, n } = *shape;
    let weight_bytes = launchers.matmul.dtype().size_bytes();
    let f32s = |count: usize| (count.max(4) * 4).next_multiple_of(16) as u64;
    let weights = |count: usize| (count.max(4) * weight_bytes).next_multiple_of(16) as u64;
    match op {
        TunedOp::Matmul => ShapeBuffers {
            input: gpu.storage_buffer("tune lhs", f32s(rows * k)),
            weights: gpu.storage_buffer("tune weights", weights(k * n + n)),
            extra: gpu.storage_buffer("tune unused", 16),
            out: gpu.storage_buffer("tune out", f32s(rows * n)),
        },
        TunedOp::Attention => {
            let (sequences, seq) = sequences_of(rows);
            let hidden = k * n;
            ShapeBuffers {
                input: gpu.storage_buffer("tune qkv", f32s(sequences * seq * 3 * hidden)),
                weights: gpu.storage_buffer("tune unused", 16),
                extra: gpu.storage_buffer("tune mask", f32s(sequences * seq)),
                out: gpu.storage_buffer("tune context", f32s(sequences * seq * hidden)),
            }
        }
        TunedOp::LayerNorm => ShapeBuffers {
            input: gpu.storage_buffer("tune rows", f32s(rows * k)),
            weights: gpu.storage_buffer("tune gamma beta", weights(2 * k)),
            extra: gpu.storage_buffer("tune residual", f32s(rows * k)),
            out: gpu.storage_buffer("tune out", f32s(rows * k)),
        },
    }
}

/// Records one launch of `shape` with `family`'s kernel.
fn push(
    gpu: &Gpu,
    launchers: &Launchers<'_>,
    plan: &mut DispatchPlan,
    family: KernelFamily,
    shape: &Shape,
    b: &ShapeBuffers,
) {
    let Shape { op, rows, k, n } = *shape;
    match op {
        TunedOp::Matmul => launchers.matmul.push_family(
            family,
            plan,
            rows,
            n,
            k,
            Epilogue::Bias,
            MatmulOperands {
                lhs: &b.input,
                a_offset: 0,
                weights: &b.weights,
                b_offset: 0,
                bias_offset: (k * n) as u32,
                out: &b.out,
                c_offset: 0,
            },
        ),
        TunedOp::Attention => {
            let (sequences, seq) = sequences_of(rows);
            launchers.attention.push_family(
                family, plan, sequences, seq, n, k, &b.input, &b.extra, &b.out,
            );
        }
        TunedOp::LayerNorm => launchers.layernorm.push_family(
            family,
            gpu,
            plan,
            rows,
            k,
            1e-12,
            LayerNormOperands {
                x: &b.input,
                residual: Some(&b.extra),
                weights: &b.weights,
                gamma_offset: 0,
                beta_offset: k as u32,
                out: &b.out,
            },
        ),
    }
}

/// Seconds to run `count` launches in one submission.
fn run_launches(
    gpu: &Gpu,
    launchers: &Launchers<'_>,
    family: KernelFamily,
    shape: &Shape,
    b: &ShapeBuffers,
    count: usize,
) -> Result<f64> {
    let mut plan = DispatchPlan::new(gpu);
    for _ in 0..count {
        push(gpu, launchers, &mut plan, family, shape, b);
    }
    let start = Instant::now();
    plan.submit(gpu);
    gpu.wait_idle()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Microseconds per launch over `repeats` launches, or `Err(first)` with the
/// first launch's microseconds when that launch alone took longer than
/// `give_up_after` seconds.
fn time_family(
    gpu: &Gpu,
    launchers: &Launchers<'_>,
    family: KernelFamily,
    shape: &Shape,
    b: &ShapeBuffers,
    repeats: usize,
    give_up_after: f64,
) -> Result<Result<f64, f64>> {
    let first = run_launches(gpu, launchers, family, shape, b, 1)?;
    if first > give_up_after {
        return Ok(Err(first * 1e6));
    }
    let rest = if repeats > 1 {
        run_launches(gpu, launchers, family, shape, b, repeats - 1)?
    } else {
        0.0
    };
    Ok(Ok((first + rest) * 1e6 / repeats as f64))
}

/// Times `families` on one shape, after an untimed run of each unless
/// `warm`, and returns what it found. `families` starts with the one to
/// beat.
pub fn measure_shape(
    gpu: &Gpu,
    launchers: &Launchers<'_>,
    shape: &Shape,
    families: &[KernelFamily],
    warm: bool,
) -> Result<Option<TunedShape>> {
    let b = buffers(gpu, launchers, shape);
    let repeats = ((TARGET_FLOPS / flops(shape).max(1.0)).ceil() as usize).clamp(1, MAX_REPEATS);
    let owners: Vec<KernelFamily> = families
        .iter()
        .map(|&family| kernel_owner(shape.op, shape.k, family))
        .collect();
    // Each kernel runs once, under its owner, in the incumbent-first order.
    let mut distinct: Vec<KernelFamily> = Vec::new();
    for &owner in &owners {
        if !distinct.contains(&owner) {
            distinct.push(owner);
        }
    }
    if !warm {
        for &family in &distinct {
            run_launches(gpu, launchers, family, shape, &b, 1)?;
        }
    }
    let mut best: BTreeMap<KernelFamily, f64> = BTreeMap::new();
    let mut staying = Vec::new();
    for &family in &distinct {
        let fastest_run = best.values().copied().fold(f64::INFINITY, f64::min) * repeats as f64;
        let give_up_after = fastest_run * DROP_FACTOR / 1e6;
        match time_family(gpu, launchers, family, shape, &b, repeats, give_up_after)? {
            Ok(time) => {
                best.insert(family, time);
                staying.push(family);
            }
            Err(first) => {
                best.insert(family, first);
            }
        }
    }
    for _ in 1..ROUNDS {
        for &family in &staying {
            if let Ok(time) =
                time_family(gpu, launchers, family, shape, &b, repeats, f64::INFINITY)?
            {
                let entry = best.entry(family).or_insert(time);
                *entry = entry.min(time);
            }
        }
    }
    gpu.check_errors()?;
    // A family that shares its kernel shares its time.
    for (&family, owner) in families.iter().zip(&owners) {
        if let Some(&time) = best.get(owner) {
            best.insert(family, time);
        }
    }
    Ok(TunedShape::from_timings(*shape, best))
}

/// Times `families` on every shape; `families` starts with the one to beat.
pub fn measure(
    gpu: &Gpu,
    launchers: &Launchers<'_>,
    shapes: &[Shape],
    families: &[KernelFamily],
) -> Result<Vec<TunedShape>> {
    let mut tuned = Vec::with_capacity(shapes.len());
    let mut warmed: Vec<(TunedOp, usize)> = Vec::new();
    for shape in shapes {
        let warm = warmed.contains(&(shape.op, shape.rows));
        if let Some(found) = measure_shape(gpu, launchers, shape, families, warm)? {
            tuned.push(found);
        }
        if !warm {
            warmed.push((shape.op, shape.rows));
        }
    }
    Ok(tuned)
}
