// C = act(A * B + bias), row-major, A and C f32; B and the bias are read
// through `weight1`, so they may be f32 or f16 pairs (see `with_weights`).
// A: [m, k] in `lhs` at `a_offset`; B: [k, n] and bias: [n] in `weights`.
// Each workgroup of 8x8 invocations computes a 128x64 tile of C; each invocation
// a 16x8 register block. Big register blocks pay off on software rasterizers,
// where every memory access is a separate lane load, and are no worse on GPUs.

// `params` (binding 0) is declared in activation.wgsl, which comes first.
@group(0) @binding(1) var<storage, read> lhs: array<f32>;
// @weights(2, scalar)
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

fn store_row(row: u32, col: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if (row >= params.m) {
        return;
    }
    let base = params.c_offset + row * params.n;
    for (var j = 0u; j < 8u; j++) {
        let c = col + j;
        if (c < params.n) {
            var v: f32;
            if (j < 4u) { v = lo[j]; } else { v = hi[j - 4u]; }
            out[base + c] = activate(v + weight1(params.bias_offset + c));
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

    var acc0a = vec4<f32>(0.0);
    var acc0b = vec4<f32>(0.0);
    var acc1a = vec4<f32>(0.0);
    var acc1b = vec4<f32>(0.0);
    var acc2a = vec4<f32>(0.0);
    var acc2b = vec4<f32>(0.0);
    var acc3a = vec4<f32>(0.0);
    var acc3b = vec4<f32>(0.0);
    var acc4a = vec4<f32>(0.0);
    var acc4b = vec4<f32>(0.0);
    var acc5a = vec4<f32>(0.0);
    var acc5b = vec4<f32>(0.0);
    var acc6a = vec4<f32>(0.0);
    var acc6b = vec4<f32>(0.0);
    var acc7a = vec4<f32>(0.0);
    var acc7b = vec4<f32>(0.0);
    var acc8a = vec4<f32>(0.0);
    var acc8b = vec4<f32>(0.0);
    var acc9a = vec4<f32>(0.0);
    var acc9b = vec4<f32>(0.0);
    var acc10a = vec4<f32>(0.0);
    var acc10b = vec4<f32>(0.0);
    var acc11a = vec4<f32>(0.0);
    var acc11b = vec4<f32>(0.0);
    var acc12a = vec4<f32>(0.0);
    var acc12b = vec4<f32>(0.0);
    var acc13a = vec4<f32>(0.0);
    var acc13b = vec4<f32>(0.0);
    var acc14a = vec4<f32>(0.0);
    var acc14b = vec4<f32>(0.0);
    var acc15a = vec4<f32>(0.0);
    var acc15b = vec4<f32>(0.0);

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
                    v = vec4<f32>(weight1(base), weight1(base + 1u), weight1(base + 2u), weight1(base + 3u));
                } else {
                    if (gc < n) { v.x = weight1(base); }
                    if (gc + 1u < n) { v.y = weight1(base + 1u); }
                    if (gc + 2u < n) { v.z = weight1(base + 2u); }
                }
            }
            tile_b[kk * 16u + c4] = v;
        }
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            let b0 = tile_b[kk * 16u + local.x * 2u];
            let b1 = tile_b[kk * 16u + local.x * 2u + 1u];
            let a_base = kk * BM + local.y * TM;
            let a0 = vec4<f32>(tile_a[a_base + 0u], tile_a[a_base + 1u], tile_a[a_base + 2u], tile_a[a_base + 3u]);
            let a1 = vec4<f32>(tile_a[a_base + 4u], tile_a[a_base + 5u], tile_a[a_base + 6u], tile_a[a_base + 7u]);
            let a2 = vec4<f32>(tile_a[a_base + 8u], tile_a[a_base + 9u], tile_a[a_base + 10u], tile_a[a_base + 11u]);
            let a3 = vec4<f32>(tile_a[a_base + 12u], tile_a[a_base + 13u], tile_a[a_base + 14u], tile_a[a_base + 15u]);
            acc0a = fma(vec4<f32>(a0.x), b0, acc0a);
            acc0b = fma(vec4<f32>(a0.x), b1, acc0b);
            acc1a = fma(vec4<f32>(a0.y), b0, acc1a);
            acc1b = fma(vec4<f32>(a0.y), b1, acc1b);
            acc2a = fma(vec4<f32>(a0.z), b0, acc2a);
            acc2b = fma(vec4<f32>(a0.z), b1, acc2b);
            acc3a = fma(vec4<f32>(a0.w), b0, acc3a);
            acc3b = fma(vec4<f32>(a0.w), b1, acc3b);
            acc4a = fma(vec4<f32>(a1.x), b0, acc4a);
            acc4b = fma(vec4<f32>(a1.x), b1, acc4b);
            acc5a = fma(vec4<f32>(a1.y), b0, acc5a);
            acc5b = fma(vec4<f32>(a1.y), b1, acc5b);
            acc6a = fma(vec4<f32>(a1.z), b0, acc6a);
            acc6b = fma(vec4<f32>(a1.z), b1, acc6b);
            acc7a = fma(vec4<f32>(a1.w), b0, acc7a);
            acc7b = fma(vec4<f32>(a1.w), b1, acc7b);
            acc8a = fma(vec4<f32>(a2.x), b0, acc8a);
            acc8b = fma(vec4<f32>(a2.x), b1, acc8b);
            acc9a = fma(vec4<f32>(a2.y), b0, acc9a);
            acc9b = fma(vec4<f32>(a2.y), b1, acc9b);
            acc10a = fma(vec4<f32>(a2.z), b0, acc10a);
            acc10b = fma(vec4<f32>(a2.z), b1, acc10b);
            acc11a = fma(vec4<f32>(a2.w), b0, acc11a);
            acc11b = fma(vec4<f32>(a2.w), b1, acc11b);
            acc12a = fma(vec4<f32>(a3.x), b0, acc12a);
            acc12b = fma(vec4<f32>(a3.x), b1, acc12b);
            acc13a = fma(vec4<f32>(a3.y), b0, acc13a);
            acc13b = fma(vec4<f32>(a3.y), b1, acc13b);
            acc14a = fma(vec4<f32>(a3.z), b0, acc14a);
            acc14b = fma(vec4<f32>(a3.z), b1, acc14b);
            acc15a = fma(vec4<f32>(a3.w), b0, acc15a);
            acc15b = fma(vec4<f32>(a3.w), b1, acc15b);
        }
        workgroupBarrier();
    }

    let col = col0 + local.x * TN;
    let row_base = row0 + local.y * TM;
    store_row(row_base + 0u, col, acc0a, acc0b);
    store_row(row_base + 1u, col, acc1a, acc1b);
    store_row(row_base + 2u, col, acc2a, acc2b);
    store_row(row_base + 3u, col, acc3a, acc3b);
    store_row(row_base + 4u, col, acc4a, acc4b);
    store_row(row_base + 5u, col, acc5a, acc5b);
    store_row(row_base + 6u, col, acc6a, acc6b);
    store_row(row_base + 7u, col, acc7a, acc7b);
    store_row(row_base + 8u, col, acc8a, acc8b);
    store_row(row_base + 9u, col, acc9a, acc9b);
    store_row(row_base + 10u, col, acc10a, acc10b);
    store_row(row_base + 11u, col, acc11a, acc11b);
    store_row(row_base + 12u, col, acc12a, acc12b);
    store_row(row_base + 13u, col, acc13a, acc13b);
    store_row(row_base + 14u, col, acc14a, acc14b);
    store_row(row_base + 15u, col, acc15a, acc15b);
}
