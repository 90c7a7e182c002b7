// out = LayerNorm(x + residual) * gamma + beta, one workgroup per row.
// Two passes over the row (mean, then squared deviations) keep the variance
// exact where the one-pass E[x^2] - E[x]^2 form cancels; it is clamped at zero
// because eps can be as small as 1e-12.

struct Params {
    rows: u32,
    cols: u32,
    has_residual: u32,
    gamma_offset: u32,
    beta_offset: u32,
    groups_x: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> residual: array<f32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const THREADS: u32 = 128u;
var<workgroup> partial: array<f32, THREADS>;

fn value(base: u32, c: u32) -> f32 {
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

@compute @workgroup_size(128, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let row = group.x + group.y * params.groups_x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (row >= params.rows) {
        return;
    }
    let cols = params.cols;
    let base = row * cols;

    var sum = 0.0;
    for (var c = lane; c < cols; c += THREADS) {
        sum += value(base, c);
    }
    let mean = reduce_sum(lane, sum) / f32(cols);

    var squares = 0.0;
    for (var c = lane; c < cols; c += THREADS) {
        let d = value(base, c) - mean;
        squares += d * d;
    }
    let variance = max(reduce_sum(lane, squares) / f32(cols), 0.0);
    let inv_std = 1.0 / sqrt(variance + params.eps);

    for (var c = lane; c < cols; c += THREADS) {
        let normed = (value(base, c) - mean) * inv_std;
        out[base + c] = normed * weights[params.gamma_offset + c] + weights[params.beta_offset + c];
    }
}
