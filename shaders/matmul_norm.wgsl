// out = norm(A * B + bias + residual), the projection that ends a sublayer
// fused with the residual add and the norm that follow it. With
// FLAG_WRITE_SUM, residual = A * B + bias + residual too (the pre-norm
// layers' residual stream). FLAG_RMS makes the norm an RMS norm (no mean,
// no beta), as in layernorm.wgsl, whose two passes over the row this kernel
// repeats so that both paths round alike.
//
// A norm needs whole rows, so a workgroup owns ROWS_TILE rows of C across
// all n columns: 256 invocations, COL_LANES (32) along the columns by
// ROW_LANES (8) along the rows, each holding ROWS_PER_LANE rows by
// COLUMN_BLOCKS vec4 columns of accumulators. Column vec4 `lane + 32 j`
// belongs to lane `lane`, so the 32 lanes of a row read 32 neighbouring
// vec4s of B at once. A is staged in workgroup memory one K_STEP at a time
// (the whole tile's rows, shared by every column lane); B is read straight
// from the storage buffer: a tile of it spans every column, too large for
// workgroup memory, and the ROW_LANES lanes that read each B vec4 find it
// in cache. The launcher specializes COLUMN_BLOCKS to ceil(n / 128) and
// ROWS_PER_LANE to the tile height that keeps the GPU busy.
// k, n and every offset are multiples of 4; any m.
//
// Every store to workgroup memory writes one whole element, by one
// invocation (see matmul_tiled.wgsl for why).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
    a_offset: u32,
    b_offset: u32,
    bias_offset: u32,
    gamma_offset: u32,
    beta_offset: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

const FLAG_RMS: u32 = 1u;
const FLAG_WRITE_SUM: u32 = 2u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> lhs: array<vec4<f32>>;
// @weights(2, vec4)
@group(0) @binding(3) var<storage, read_write> residual: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;

const COL_LANES: u32 = 32u;
const ROW_LANES: u32 = 8u;
const ROWS_PER_LANE: u32 = 2u;
const COLUMN_BLOCKS: u32 = 3u;
const ROWS_TILE: u32 = ROW_LANES * ROWS_PER_LANE;
const K_STEP4: u32 = 4u;
const ACCUMULATORS: u32 = ROWS_PER_LANE * COLUMN_BLOCKS;

// tile_a[row * K_STEP4 + kq] holds k 4 kq .. 4 kq + 3 of the tile's row `row`.
var<workgroup> tile_a: array<vec4<f32>, ROWS_TILE * K_STEP4>;
// One partial sum per (tile row, column lane), reduced across the lanes.
var<workgroup> partial: array<f32, ROWS_TILE * COL_LANES>;

// Sums `partial` over the column lanes of every tile row at once; every
// invocation calls it, so its barriers stay in uniform control flow.
fn reduce_rows(col_lane: u32, row_lane: u32) {
    workgroupBarrier();
    for (var stride = COL_LANES / 2u; stride > 0u; stride /= 2u) {
        if (col_lane < stride) {
            for (var r = 0u; r < ROWS_PER_LANE; r++) {
                let slot = (row_lane + r * ROW_LANES) * COL_LANES + col_lane;
                partial[slot] += partial[slot + stride];
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let m = params.m;
    let n4 = params.n / 4u;
    let k4 = params.k / 4u;
    let row0 = group.x * ROWS_TILE;
    let col_lane = lane % COL_LANES;
    let row_lane = lane / COL_LANES;

    var acc: array<vec4<f32>, ACCUMULATORS>;
    for (var i = 0u; i < ACCUMULATORS; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    // What this invocation stages: A row `load_row` of the tile, k vec4
    // `load_k4` of the step; the first ROWS_TILE * K_STEP4 invocations load.
    let load_row = lane / K_STEP4;
    let load_k4 = lane % K_STEP4;
    let a_row = row0 + load_row;
    let loads = lane < ROWS_TILE * K_STEP4;

    for (var k0 = 0u; k0 < k4; k0 += K_STEP4) {
        if (loads) {
            var a = vec4<f32>(0.0);
            if (a_row < m && k0 + load_k4 < k4) {
                a = lhs[params.a_offset / 4u + a_row * k4 + k0 + load_k4];
            }
            tile_a[load_row * K_STEP4 + load_k4] = a;
        }
        workgroupBarrier();
        let steps = min(K_STEP4, k4 - k0);
        for (var kq = 0u; kq < steps; kq++) {
            let b_row = params.b_offset / 4u + (k0 + kq) * 4u * n4;
            for (var j = 0u; j < COLUMN_BLOCKS; j++) {
                let col4 = col_lane + j * COL_LANES;
                if (col4 < n4) {
                    let b0 = weight4(b_row + col4);
                    let b1 = weight4(b_row + n4 + col4);
                    let b2 = weight4(b_row + 2u * n4 + col4);
                    let b3 = weight4(b_row + 3u * n4 + col4);
                    for (var r = 0u; r < ROWS_PER_LANE; r++) {
                        let a = tile_a[(row_lane + r * ROW_LANES) * K_STEP4 + kq];
                        let i = r * COLUMN_BLOCKS + j;
                        acc[i] = fma(vec4<f32>(a.w), b3, fma(vec4<f32>(a.z), b2,
                            fma(vec4<f32>(a.y), b1, fma(vec4<f32>(a.x), b0, acc[i]))));
                    }
                }
            }
        }
        workgroupBarrier();
    }

    // The sums: projection, bias and residual.
    let write_sum = (params.flags & FLAG_WRITE_SUM) != 0u;
    for (var r = 0u; r < ROWS_PER_LANE; r++) {
        let row = row0 + row_lane + r * ROW_LANES;
        var total = 0.0;
        for (var j = 0u; j < COLUMN_BLOCKS; j++) {
            let col4 = col_lane + j * COL_LANES;
            let i = r * COLUMN_BLOCKS + j;
            if (row < m && col4 < n4) {
                let at = row * n4 + col4;
                let v = acc[i] + weight4(params.bias_offset / 4u + col4) + residual[at];
                if (write_sum) {
                    residual[at] = v;
                }
                acc[i] = v;
                total += v.x + v.y + v.z + v.w;
            } else {
                acc[i] = vec4<f32>(0.0);
            }
        }
        partial[(row_lane + r * ROW_LANES) * COL_LANES + col_lane] = total;
    }

    let rms = (params.flags & FLAG_RMS) != 0u;
    let width = f32(params.n);
    var mean: array<f32, ROWS_PER_LANE>;
    for (var r = 0u; r < ROWS_PER_LANE; r++) {
        mean[r] = 0.0;
    }
    // Uniform: every invocation takes the same branch, barriers included.
    if (!rms) {
        reduce_rows(col_lane, row_lane);
        for (var r = 0u; r < ROWS_PER_LANE; r++) {
            mean[r] = partial[(row_lane + r * ROW_LANES) * COL_LANES] / width;
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < ROWS_PER_LANE; r++) {
        let row = row0 + row_lane + r * ROW_LANES;
        var squares = 0.0;
        for (var j = 0u; j < COLUMN_BLOCKS; j++) {
            let col4 = col_lane + j * COL_LANES;
            if (row < m && col4 < n4) {
                let d = acc[r * COLUMN_BLOCKS + j] - vec4<f32>(mean[r]);
                squares += dot(d, d);
            }
        }
        partial[(row_lane + r * ROW_LANES) * COL_LANES + col_lane] = squares;
    }
    reduce_rows(col_lane, row_lane);

    let gamma = params.gamma_offset / 4u;
    let beta = params.beta_offset / 4u;
    for (var r = 0u; r < ROWS_PER_LANE; r++) {
        let row = row0 + row_lane + r * ROW_LANES;
        let variance = max(partial[(row_lane + r * ROW_LANES) * COL_LANES] / width, 0.0);
        let inv_std = 1.0 / sqrt(variance + params.eps);
        for (var j = 0u; j < COLUMN_BLOCKS; j++) {
            let col4 = col_lane + j * COL_LANES;
            if (row < m && col4 < n4) {
                let normed = (acc[r * COLUMN_BLOCKS + j] - vec4<f32>(mean[r])) * inv_std;
                if (rms) {
                    out[row * n4 + col4] = normed * weight4(gamma + col4);
                } else {
                    out[row * n4 + col4] = fma(normed, weight4(gamma + col4), weight4(beta + col4));
                }
            }
        }
    }
}
