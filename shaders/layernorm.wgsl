// out = LayerNorm(x + residual) * gamma + beta, one workgroup per row, read
// as vec4s: rows, gamma and beta start at multiples of 4 elements, which the
// engine's packing guarantees.
// Two passes over the row (mean, then squared deviations) keep the variance
// exact where the one-pass E[x^2] - E[x]^2 form cancels; it is clamped at zero
// because eps can be as small as 1e-12.
// With `rms` set it is T5's (and the decoders') RMS norm instead:
// out = (x + residual) / sqrt(mean((x + residual)^2) + eps) * gamma, no mean
// subtracted and no beta. With `write_sum` set, x + residual is also written
// back to `residual`: pre-norm models keep their residual stream there and
// add each sublayer's output to it in the same pass as the next norm.
// THREADS is specialized per kernel family by the launcher: 8 is one SIMD
// vector of a software rasterizer, where a barrier then costs next to nothing
// and each vec4 load counts once per lane; GPUs take a wider workgroup so that
// a row is read by many lanes at once.

struct Params {
    rows: u32,
    cols: u32,
    has_residual: u32,
    gamma_offset: u32,
    beta_offset: u32,
    groups_x: u32,
    eps: f32,
    flags: u32,
}

const FLAG_RMS: u32 = 1u;
const FLAG_WRITE_SUM: u32 = 2u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> residual: array<vec4<f32>>;
// @weights(3, vec4)
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;

const THREADS: u32 = 8u;
var<workgroup> partial: array<f32, THREADS>;

fn value(base: u32, c: u32) -> vec4<f32> {
    var v = x[base + c];
    if (params.has_residual != 0u) {
        v += residual[base + c];
    }
    return v;
}

fn reduce_sum(lane: u32, v: f32) -> f32 {
    partial[lane] = v;
    workgroupBarrier();
    for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(THREADS, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let row = group.x + group.y * params.groups_x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (row >= params.rows) {
        return;
    }
    let cols4 = params.cols / 4u;
    let base = row * cols4;
    let gamma = params.gamma_offset / 4u;
    let beta = params.beta_offset / 4u;

    let rms = (params.flags & FLAG_RMS) != 0u;
    // Uniform too: every lane takes the same branch, barriers included.
    var mean = 0.0;
    if (!rms) {
        var sum = vec4<f32>(0.0);
        for (var c = lane; c < cols4; c += THREADS) {
            sum += value(base, c);
        }
        mean = reduce_sum(lane, sum.x + sum.y + sum.z + sum.w) / f32(params.cols);
    }

    var squares = vec4<f32>(0.0);
    for (var c = lane; c < cols4; c += THREADS) {
        let d = value(base, c) - mean;
        squares = fma(d, d, squares);
    }
    let variance = max(reduce_sum(lane, squares.x + squares.y + squares.z + squares.w) / f32(params.cols), 0.0);
    let inv_std = 1.0 / sqrt(variance + params.eps);

    let write_sum = (params.flags & FLAG_WRITE_SUM) != 0u;
    for (var c = lane; c < cols4; c += THREADS) {
        // Each lane rewrites only the elements it read, after its last read.
        let v = value(base, c);
        let normed = (v - mean) * inv_std;
        if (rms) {
            out[base + c] = normed * weight4(gamma + c);
        } else {
            out[base + c] = fma(normed, weight4(gamma + c), weight4(beta + c));
        }
        if (write_sum) {
            residual[base + c] = v;
        }
    }
}
