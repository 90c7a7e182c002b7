// C = act(A * B + bias), all row-major f32.
// A: [m, k] in `lhs` at `a_offset`; B: [k, n] and bias: [n] in `weights`.
// Each workgroup of 8x8 invocations computes a 128x64 tile of C; each invocation
// a 16x8 register block. Big register blocks pay off on software rasterizers,
// where every memory access is a separate lane load, and are no worse on GPUs.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    activation: u32,
    a_offset: u32,
    b_offset: u32,
    bias_offset: u32,
    c_offset: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> lhs: array<f32>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 8u;
const TM: u32 = 16u;
const TN: u32 = 8u;
const BM: u32 = 128u;
const BN: u32 = 64u;
const BK: u32 = 16u;

// A tile stored k-major so that one k step reads a column of A contiguously.
var<workgroup> tile_a: array<f32, 2048>;
var<workgroup> tile_b: array<vec4<f32>, 256>;

const ACT_NONE: u32 = 0u;
const ACT_GELU_ERF: u32 = 1u;
const ACT_GELU_TANH: u32 = 2u;
const ACT_RELU: u32 = 3u;

// erfc with relative error below 1.2e-7 everywhere (Chebyshev fit, Numerical
// Recipes 6.2), so that GELU keeps full f32 precision for negative inputs too.
fn erfc_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * exp(poly);
    return select(2.0 - r, r, x >= 0.0);
}

fn activate(x: f32) -> f32 {
    switch params.activation {
        case ACT_GELU_ERF: {
            return 0.5 * x * erfc_approx(-x * 0.70710678118654752);
        }
        case ACT_GELU_TANH: {
            let inner = 0.7978845608028654 * (x + 0.044715 * x * x * x);
            return 0.5 * x * (1.0 + tanh(clamp(inner, -15.0, 15.0)));
        }
        case ACT_RELU: {
            return max(x, 0.0);
        }
        default: {
            return x;
        }
    }
}

@compute @workgroup_size(8, 8, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let m = params.m;
    let n = params.n;
    let k = params.k;
    let row0 = group.y * BM;
    let col0 = group.x * BN;

    var acc: array<vec4<f32>, 32>;
    for (var i = 0u; i < 32u; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    for (var k0 = 0u; k0 < k; k0 += BK) {
        // 128x16 elements of A, 32 per invocation, consecutive lanes along k.
        for (var t = 0u; t < 32u; t++) {
            let e = lane + 64u * t;
            let r = e / BK;
            let kk = e % BK;
            let gr = row0 + r;
            let gk = k0 + kk;
            var v = 0.0;
            if (gr < m && gk < k) {
                v = lhs[params.a_offset + gr * k + gk];
            }
            tile_a[kk * BM + r] = v;
        }
        // 16x64 elements of B, 16 per invocation, consecutive lanes along n.
        for (var t = 0u; t < 4u; t++) {
            let e = lane + 64u * t;
            let kk = e / 16u;
            let c4 = e % 16u;
            let gk = k0 + kk;
            let gc = col0 + c4 * 4u;
            var v = vec4<f32>(0.0);
            if (gk < k) {
                let base = params.b_offset + gk * n + gc;
                if (gc + 3u < n) {
                    v = vec4<f32>(weights[base], weights[base + 1u], weights[base + 2u], weights[base + 3u]);
                } else {
                    if (gc < n) { v.x = weights[base]; }
                    if (gc + 1u < n) { v.y = weights[base + 1u]; }
                    if (gc + 2u < n) { v.z = weights[base + 2u]; }
                }
            }
            tile_b[kk * 16u + c4] = v;
        }
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            let b0 = tile_b[kk * 16u + local.x * 2u];
            let b1 = tile_b[kk * 16u + local.x * 2u + 1u];
            let a_base = kk * BM + local.y * TM;
            for (var i = 0u; i < TM; i++) {
                let a = vec4<f32>(tile_a[a_base + i]);
                acc[2u * i] = fma(a, b0, acc[2u * i]);
                acc[2u * i + 1u] = fma(a, b1, acc[2u * i + 1u]);
            }
        }
        workgroupBarrier();
    }

    let col = col0 + local.x * TN;
    for (var i = 0u; i < TM; i++) {
        let row = row0 + local.y * TM + i;
        if (row >= m) {
            break;
        }
        for (var j = 0u; j < TN; j++) {
            let c = col + j;
            if (c < n) {
                let v = acc[2u * i + j / 4u][j % 4u] + weights[params.bias_offset + c];
                out[params.c_offset + row * n + c] = activate(v);
            }
        }
    }
}
