// C = act(A * B + bias), row-major, A and C f32 and B and the bias read
// through `weight4` (f32 or f16 pairs), for k, n and every offset a multiple
// of 4. Any m, n and k otherwise: edges are zero-filled when loading and
// masked when storing.
//
// The shape of the fast GPU kernels: a workgroup of 16x16 invocations
// computes a tile of 16 * ROWS_PER_LANE rows by 64 columns of C, each
// invocation a block of ROWS_PER_LANE rows by one vec4 of columns (8x4 at the
// tallest tile, 128x64). Launchers specialize ROWS_PER_LANE: tall tiles reuse
// every B element over more rows, short ones give a short m more workgroups
// so that every compute unit gets some.
//
// Per step of 16 along k the workgroup stages the step's block of A (one
// vec4 per four k of a row, as A lies) and of B (one vec4 per four columns
// of a k, as B lies) in workgroup memory. The next step's block is loaded
// from the storage buffers into registers before the current one is
// computed, so those loads are in flight during the arithmetic, and stored to
// workgroup memory after it.
//
// Layouts without bank conflicts (32 banks of 4 bytes, vec4 accesses served a
// quarter of a 32-wide warp at a time, or half of it for 8-byte f16 vec4s):
// an invocation owns rows local.y, local.y + 16, ..., so the two row groups
// one warp reads are 16 floats apart (banks 0-3 and 16-19), where a block of
// consecutive rows would put them 128 floats apart on the same banks; B's
// 16 vec4 columns are read by consecutive lanes, and both blocks are stored
// by consecutive lanes to consecutive vec4s.
//
// Every store to workgroup memory writes one whole element, by one
// invocation: WGSL allows a write to one component of a vector to touch the
// whole vector, and Metal and D3D compile it as a read-modify-write.
//
// `Compute` is the type the products are computed in. The half-precision
// family replaces its line with f16 (and enables the extension): the blocks
// are staged as f16, each invocation sums four products in f16 and adds the
// sum to its f32 accumulators, so rounding never builds up over k.

// `params` (binding 0) is declared in activation.wgsl, which comes first.
@group(0) @binding(1) var<storage, read> lhs: array<vec4<f32>>;
// @weights(2, vec4)
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

alias Compute = f32;
// 1 where `Compute` is f16.
const HALF_ARITHMETIC: u32 = 0u;

// Rows of C per invocation; an even number up to 8.
const ROWS_PER_LANE: u32 = 8u;
const LANES_Y: u32 = 16u;
const TILE_M: u32 = LANES_Y * ROWS_PER_LANE;
// vec4 columns of the tile: 64 columns.
const TILE4: u32 = 16u;
const K_STEP: u32 = 16u;
const K_STEP4: u32 = 4u;
const INVOCATIONS: u32 = 256u;
// vec4s of A staged per step, and at most this many per invocation (the
// 32-row tile has half as many as there are invocations).
const A_VEC4S: u32 = TILE_M * K_STEP4;
const A_LOADS: u32 = (A_VEC4S + INVOCATIONS - 1u) / INVOCATIONS;

// tile_a[row * K_STEP4 + kq] holds k 4 kq .. 4 kq + 3 of the block's row `row`.
var<workgroup> tile_a: array<vec4<Compute>, TILE_M * K_STEP4>;
// tile_b[kk * TILE4 + c4] holds columns 4 c4 .. 4 c4 + 3 at step kk.
var<workgroup> tile_b: array<vec4<Compute>, K_STEP * TILE4>;

fn epilogue(acc: vec4<f32>, col4: u32) -> vec4<f32> {
    let v = acc + weight4(params.bias_offset / 4u + col4);
    if (params.activation == ACT_NONE) {
        return v;
    }
    return vec4<f32>(activate(v.x), activate(v.y), activate(v.z), activate(v.w));
}

// acc + a.x * b0 + a.y * b1 + a.z * b2 + a.w * b3: four k steps of one row.
// In f32 the products chain into the accumulator. In f16 the four are
// summed in f16, then added to the accumulator in f32.
fn mac(
    acc: vec4<f32>,
    a: vec4<Compute>,
    b0: vec4<Compute>,
    b1: vec4<Compute>,
    b2: vec4<Compute>,
    b3: vec4<Compute>,
) -> vec4<f32> {
    if (HALF_ARITHMETIC == 1u) {
        let part = fma(vec4<Compute>(a.w), b3, fma(vec4<Compute>(a.z), b2,
            fma(vec4<Compute>(a.y), b1, vec4<Compute>(a.x) * b0)));
        return acc + vec4<f32>(part);
    }
    let a32 = vec4<f32>(a);
    return fma(vec4<f32>(a32.w), vec4<f32>(b3), fma(vec4<f32>(a32.z), vec4<f32>(b2),
        fma(vec4<f32>(a32.y), vec4<f32>(b1), fma(vec4<f32>(a32.x), vec4<f32>(b0), acc))));
}

// One step's A and B, from the storage buffers, for this invocation to stage.
struct Staged {
    a: array<vec4<f32>, A_LOADS>,
    b: vec4<f32>,
}

fn load_step(k0: u32, row0: u32, col4_0: u32, lane: u32) -> Staged {
    var staged: Staged;
    let k4 = params.k / 4u;
    let n4 = params.n / 4u;
    for (var j = 0u; j < A_LOADS; j++) {
        let index = lane + j * INVOCATIONS;
        let row = row0 + index / K_STEP4;
        let a_k4 = k0 / 4u + index % K_STEP4;
        var a = vec4<f32>(0.0);
        if (index < A_VEC4S && row < params.m && a_k4 < k4) {
            a = lhs[params.a_offset / 4u + row * k4 + a_k4];
        }
        staged.a[j] = a;
    }
    let b_k = k0 + lane / TILE4;
    let b_col4 = col4_0 + lane % TILE4;
    var b = vec4<f32>(0.0);
    if (b_k < params.k && b_col4 < n4) {
        b = weight4(params.b_offset / 4u + b_k * n4 + b_col4);
    }
    staged.b = b;
    return staged;
}

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let n4 = params.n / 4u;
    let row0 = group.y * TILE_M;
    let col4_0 = group.x * TILE4;

    var acc: array<vec4<f32>, ROWS_PER_LANE>;
    for (var i = 0u; i < ROWS_PER_LANE; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    var staged = load_step(0u, row0, col4_0, lane);
    for (var k0 = 0u; k0 < params.k; k0 += K_STEP) {
        // Whole vec4s, one per invocation each (see the top of the file).
        for (var j = 0u; j < A_LOADS; j++) {
            let index = lane + j * INVOCATIONS;
            if (index < A_VEC4S) {
                tile_a[index] = vec4<Compute>(staged.a[j]);
            }
        }
        tile_b[lane] = vec4<Compute>(staged.b);
        workgroupBarrier();

        // The next step's loads, in flight while this one computes.
        if (k0 + K_STEP < params.k) {
            staged = load_step(k0 + K_STEP, row0, col4_0, lane);
        }

        for (var kq = 0u; kq < K_STEP4; kq++) {
            let b_row = 4u * kq * TILE4 + local.x;
            let b0 = tile_b[b_row];
            let b1 = tile_b[b_row + TILE4];
            let b2 = tile_b[b_row + 2u * TILE4];
            let b3 = tile_b[b_row + 3u * TILE4];
            for (var i = 0u; i < ROWS_PER_LANE; i++) {
                let a = tile_a[(local.y + i * LANES_Y) * K_STEP4 + kq];
                acc[i] = mac(acc[i], a, b0, b1, b2, b3);
            }
        }
        workgroupBarrier();
    }

    let col4 = col4_0 + local.x;
    if (col4 < n4) {
        for (var i = 0u; i < ROWS_PER_LANE; i++) {
            let row = row0 + local.y + i * LANES_Y;
            if (row < params.m) {
                out[params.c_offset / 4u + row * n4 + col4] = epilogue(acc[i], col4);
            }
        }
    }
}
