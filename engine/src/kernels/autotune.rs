//! Measures the kernel families on the adapter at hand and keeps the fastest
//! per shape. The decisions (which shapes, which bucket a launch takes, which
//! family wins on which timings) are in `selection` and `family`; this module
//! only runs and times launches.
//!
//! Where the device has timestamp queries, a submission is timed by the
//! GPU's own clock at the start and end of its compute pass; elsewhere by
//! the host's clock around the submission and the wait. Either way the
//! launches of a shape are repeated until they take about `TARGET_SECONDS`,
//! judged by one timed launch of the incumbent: on a desktop GPU a launch
//! takes microseconds, and one launch per submission would time the
//! submission's latency instead of the kernel. Each family first runs once
//! untimed at each row bucket of each op (software adapters compile a
//! pipeline on its first dispatch, and tile heights change with the rows).
//! The incumbent (`KernelFamily::incumbent_first`) goes first; any other
//! family whose first launch alone takes longer than `DROP_FACTOR` times the
//! best family's whole run is dropped there, since it cannot win, which
//! keeps a slow family from costing seconds on a software adapter. The rest
//! are timed `ROUNDS` times, keeping their best.

use std::collections::BTreeMap;
use std::time::Instant;

use super::DispatchPlan;
use super::attention::Attention;
use super::family::KernelFamily;
use super::layernorm::NormOptions;
use super::layernorm::{LayerNorm, LayerNormOperands};
use super::matmul::{Epilogue, Matmul, MatmulOperands};
use super::matmul_norm::{MatmulNorm, MatmulNormOperands};
use super::selection::{FusionTiming, Shape, TimingSource, TunedOp, TunedShape, kernel_owner};
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// A family slower than the best by more than this after its first timed
/// run is not timed again.
const DROP_FACTOR: f64 = 1.5;
/// Timed runs of the families that stay.
const ROUNDS: usize = 3;
/// GPU time per timed submission.
const TARGET_SECONDS: f64 = 1e-3;
const MAX_REPEATS: usize = 256;
/// Tokens per sequence of the attention measured at a row bucket.
const ATTENTION_SEQ: usize = 128;

/// Launches per timed submission: enough that one launch of `probe_seconds`
/// repeated adds up to `TARGET_SECONDS`.
fn repeats_for(probe_seconds: f64) -> usize {
    ((TARGET_SECONDS / probe_seconds.max(1e-9)).ceil() as usize).clamp(1, MAX_REPEATS)
}

/// Times submissions by the GPU's timestamps where the device has them,
/// else by the host's clock.
pub struct Clock {
    source: TimingSource,
    /// Queries for the start and end of a pass, and the buffer they are
    /// resolved into.
    queries: Option<(wgpu::QuerySet, wgpu::Buffer)>,
}

impl Clock {
    pub fn new(gpu: &Gpu) -> Self {
        let queries = gpu.timestamps.then(|| {
            let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("tune timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolved = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tune timestamps"),
                size: 2 * wgpu::QUERY_SIZE as u64,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            (set, resolved)
        });
        let source = match queries {
            Some(_) => TimingSource::GpuTimestamps,
            None => TimingSource::HostClock,
        };
        Self { source, queries }
    }

    pub fn source(&self) -> TimingSource {
        self.source
    }

    /// Seconds that `plan` takes: its compute pass by the GPU's clock, or
    /// its submission until the device is idle by the host's.
    pub fn time(&self, gpu: &Gpu, plan: DispatchPlan) -> Result<f64> {
        let Some((set, resolved)) = &self.queries else {
            let start = Instant::now();
            plan.submit(gpu);
            gpu.wait_idle()?;
            return Ok(start.elapsed().as_secs_f64());
        };
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("tune"),
            });
        plan.record_timed(gpu, &mut encoder, set);
        encoder.resolve_query_set(set, 0..2, resolved, 0);
        gpu.queue.submit([encoder.finish()]);
        let bytes = gpu.read_buffer(resolved, 2 * wgpu::QUERY_SIZE as u64)?;
        let ticks: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|word| u64::from_le_bytes(word.try_into().unwrap_or_default()))
            .collect();
        let (start, end) = (ticks[0], ticks[1]);
        if end < start {
            return Err(Error::Gpu(format!(
                "the GPU's timestamps ran backwards ({start} then {end})"
            )));
        }
        let period_ns = f64::from(gpu.queue.get_timestamp_period());
        Ok((end - start) as f64 * period_ns * 1e-9)
    }
}

/// The launchers the measured ops run on.
#[derive(Clone, Copy)]
pub struct Launchers<'a> {
    pub matmul: &'a Matmul,
    pub attention: &'a Attention,
    pub layernorm: &'a LayerNorm,
    pub matmul_norm: &'a MatmulNorm,
}

/// Buffers for one shape's launches, zero-filled: timing does not depend on
/// the values.
struct ShapeBuffers {
    input: wgpu::Buffer,
    weights: wgpu::Buffer,
    extra: wgpu::Buffer,
    out: wgpu::Buffer,
    /// The norm's output after a separate matmul (`ProjectionNorm`).
    normed: Option<wgpu::Buffer>,
}

fn sequences_of(rows: usize) -> (usize, usize) {
    let seq = rows.clamp(1, ATTENTION_SEQ);
    (rows.div_ceil(seq), seq)
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
            normed: None,
        },
        TunedOp::Attention => {
            let (sequences, seq) = sequences_of(rows);
            let hidden = k * n;
            ShapeBuffers {
                input: gpu.storage_buffer("tune qkv", f32s(sequences * seq * 3 * hidden)),
                weights: gpu.storage_buffer("tune unused", 16),
                extra: gpu.storage_buffer("tune mask", f32s(sequences * seq)),
                out: gpu.storage_buffer("tune context", f32s(sequences * seq * hidden)),
                normed: None,
            }
        }
        TunedOp::LayerNorm => ShapeBuffers {
            input: gpu.storage_buffer("tune rows", f32s(rows * k)),
            weights: gpu.storage_buffer("tune gamma beta", weights(2 * k)),
            extra: gpu.storage_buffer("tune residual", f32s(rows * k)),
            out: gpu.storage_buffer("tune out", f32s(rows * k)),
            normed: None,
        },
        // The projection's weights, bias, gamma and beta; the residual; the
        // output of the fused kernel or the separate matmul's.
        TunedOp::ProjectionNorm => ShapeBuffers {
            input: gpu.storage_buffer("tune lhs", f32s(rows * k)),
            weights: gpu.storage_buffer("tune weights", weights(k * n + 3 * n)),
            extra: gpu.storage_buffer("tune residual", f32s(rows * n)),
            out: gpu.storage_buffer("tune out", f32s(rows * n)),
            normed: Some(gpu.storage_buffer("tune normed", f32s(rows * n))),
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
        TunedOp::ProjectionNorm => push_projection_norm(
            gpu,
            launchers,
            plan,
            Pairing::Separate(family, family),
            shape,
            b,
        ),
    }
}

/// How a projection and its norm run: fused, or as a matmul of one family
/// and a norm of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pairing {
    Fused,
    Separate(KernelFamily, KernelFamily),
}

/// Records one projection and norm of `shape` (`ProjectionNorm`).
fn push_projection_norm(
    gpu: &Gpu,
    launchers: &Launchers<'_>,
    plan: &mut DispatchPlan,
    pairing: Pairing,
    shape: &Shape,
    b: &ShapeBuffers,
) {
    let Shape { rows, k, n, .. } = *shape;
    let (bias, gamma, beta) = ((k * n) as u32, (k * n + n) as u32, (k * n + 2 * n) as u32);
    match pairing {
        Pairing::Fused => launchers.matmul_norm.push(
            plan,
            rows,
            n,
            k,
            1e-12,
            NormOptions::default(),
            MatmulNormOperands {
                lhs: &b.input,
                weights: &b.weights,
                b_offset: 0,
                bias_offset: bias,
                gamma_offset: gamma,
                beta_offset: beta,
                residual: &b.extra,
                out: &b.out,
            },
        ),
        Pairing::Separate(matmul_family, norm_family) => {
            launchers.matmul.push_family(
                matmul_family,
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
                    bias_offset: bias,
                    out: &b.out,
                    c_offset: 0,
                },
            );
            let normed = b.normed.as_ref().expect("a projection's buffers");
            launchers.layernorm.push_family(
                norm_family,
                gpu,
                plan,
                rows,
                n,
                1e-12,
                LayerNormOperands {
                    x: &b.out,
                    residual: Some(&b.extra),
                    weights: &b.weights,
                    gamma_offset: gamma,
                    beta_offset: beta,
                    out: normed,
                },
            );
        }
    }
}

/// Times the fused projection and norm of `shape` against the separate
/// matmul (of `matmul_family`) and norm (of `norm_family`); `None` where
/// the fused kernel cannot take the shape on this adapter.
pub fn measure_fusion(
    gpu: &Gpu,
    launchers: &Launchers<'_>,
    shape: &Shape,
    matmul_family: KernelFamily,
    norm_family: KernelFamily,
) -> Result<Option<TunedShape>> {
    if !launchers.matmul_norm.takes(shape.n, shape.k, &[0]) {
        return Ok(None);
    }
    let b = buffers(gpu, launchers, shape);
    let clock = Clock::new(gpu);
    let separate = Pairing::Separate(matmul_family, norm_family);
    let run = |pairing: Pairing, count: usize| {
        let mut plan = DispatchPlan::new(gpu);
        for _ in 0..count {
            push_projection_norm(gpu, launchers, &mut plan, pairing, shape, &b);
        }
        clock.time(gpu, plan)
    };
    // Untimed first runs compile and warm both.
    run(separate, 1)?;
    run(Pairing::Fused, 1)?;
    let repeats = repeats_for(run(separate, 1)?);
    let mut best = [f64::INFINITY; 2];
    for _ in 0..ROUNDS {
        for (slot, pairing) in [separate, Pairing::Fused].into_iter().enumerate() {
            let us = run(pairing, repeats)? * 1e6 / repeats as f64;
            best[slot] = best[slot].min(us);
        }
    }
    gpu.check_errors()?;
    let [separate_us, fused_us] = best;
    Ok(Some(TunedShape {
        shape: *shape,
        family: matmul_family,
        timings_us: BTreeMap::from([(matmul_family, separate_us)]),
        timing: clock.source(),
        fusion: Some(FusionTiming {
            fused_us,
            separate_us,
        }),
    }))
}

/// Seconds to run `count` launches in one submission.
fn run_launches(
    gpu: &Gpu,
    clock: &Clock,
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
    clock.time(gpu, plan)
}

/// Microseconds per launch over `repeats` launches, or `Err(first)` with the
/// first launch's microseconds when that launch alone took longer than
/// `give_up_after` seconds.
#[allow(clippy::too_many_arguments)]
fn time_family(
    gpu: &Gpu,
    clock: &Clock,
    launchers: &Launchers<'_>,
    family: KernelFamily,
    shape: &Shape,
    b: &ShapeBuffers,
    repeats: usize,
    give_up_after: f64,
) -> Result<Result<f64, f64>> {
    let first = run_launches(gpu, clock, launchers, family, shape, b, 1)?;
    if first > give_up_after {
        return Ok(Err(first * 1e6));
    }
    let rest = if repeats > 1 {
        run_launches(gpu, clock, launchers, family, shape, b, repeats - 1)?
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
    if shape.op == TunedOp::ProjectionNorm {
        let Some(&incumbent) = families.first() else {
            return Ok(None);
        };
        return measure_fusion(gpu, launchers, shape, incumbent, incumbent);
    }
    let b = buffers(gpu, launchers, shape);
    let clock = Clock::new(gpu);
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
            run_launches(gpu, &clock, launchers, family, shape, &b, 1)?;
        }
    }
    let Some(&incumbent) = families.first() else {
        return Ok(None);
    };
    let probe = run_launches(gpu, &clock, launchers, owners[0], shape, &b, 1)?;
    let repeats = repeats_for(probe);
    let time = |family, give_up_after| {
        time_family(
            gpu,
            &clock,
            launchers,
            family,
            shape,
            &b,
            repeats,
            give_up_after,
        )
    };
    let mut best: BTreeMap<KernelFamily, f64> = BTreeMap::new();
    let mut staying = Vec::new();
    for &family in &distinct {
        let fastest_run = best.values().copied().fold(f64::INFINITY, f64::min) * repeats as f64;
        let give_up_after = fastest_run * DROP_FACTOR / 1e6;
        match time(family, give_up_after)? {
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
            if let Ok(us) = time(family, f64::INFINITY)? {
                let entry = best.entry(family).or_insert(us);
                *entry = entry.min(us);
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
    Ok(TunedShape::from_timings(
        *shape,
        incumbent,
        best,
        clock.source(),
    ))
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
        if shape.op == TunedOp::ProjectionNorm {
            // Against the matmul and norm as the selection runs them: the
            // families measured for them, else the incumbent.
            let incumbent = families.first().copied().unwrap_or(KernelFamily::Portable);
            let chosen = |op: TunedOp, k: usize, n: usize| {
                tuned
                    .iter()
                    .find(|t: &&TunedShape| {
                        t.shape.op == op
                            && t.shape.rows == shape.rows
                            && t.shape.k == k
                            && t.shape.n == n
                    })
                    .map_or(incumbent, |t| t.family)
            };
            let matmul_family = chosen(TunedOp::Matmul, shape.k, shape.n);
            let norm_family = chosen(TunedOp::LayerNorm, shape.n, 0);
            if let Some(found) = measure_fusion(gpu, launchers, shape, matmul_family, norm_family)?
            {
                tuned.push(found);
            }
            continue;
        }
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

#[cfg(test)]
mod tests {
    use super::{MAX_REPEATS, repeats_for};

    #[test]
    fn launches_repeat_until_about_a_millisecond() {
        // A desktop GPU's 10-microsecond launch: 100 to a submission.
        assert_eq!(repeats_for(10e-6), 100);
        // A software adapter's 5-millisecond launch: one is enough.
        assert_eq!(repeats_for(5e-3), 1);
        // Bounded both ways, even for a clock that reads zero.
        assert_eq!(repeats_for(0.0), MAX_REPEATS);
        assert_eq!(repeats_for(1e-7), MAX_REPEATS);
    }
}
