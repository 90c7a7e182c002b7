// C = act(A * B + bias), row-major, A and C f32 and B and the bias read
// through `weight4` (f32 or f16 pairs), for k, n and every offset a multiple
// of 4. Any m, n and k otherwise: edges are zero-filled when loading and
// masked when storing.
//
// The shape GPUs want: a workgroup of 16x16 invocations computes a 64x64
// tile of C, each invocation a 4x4 register block of four consecutive rows
// and four consecutive columns. Per step of 16 along k the workgroup stages
// a 64x16 block of A and a 16x64 block of B in workgroup memory, one vec4
// load of each per invocation, so every element fetched from the storage
// buffers is reused 64 times from on-chip memory. Both blocks are staged as
// they lie in memory: A row-major (a vec4 holds four k of one row) and B
// row-major (a vec4 holds four columns of one k). Per four k an invocation
// reads the A vec4s of its four rows and the four B vec4s of its columns; the
// 16 invocations that share a row block read the same A vec4s, which the
// hardware broadcasts.
//
// Every store to workgroup memory writes one whole element, by one
// invocation. WGSL allows a write to one component of a vector to touch the
// whole vector, and Metal (and D3D) compile it as a read-modify-write of
// it: four invocations each writing one component of a shared vec4, as an
// earlier version transposing A on the way in did, race and lose values.

// `params` (binding 0) is declared in activation.wgsl, which comes first.
@group(0) @binding(1) var<storage, read> lhs: array<vec4<f32>>;
// @weights(2, vec4)
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

const TILE: u32 = 64u;
const TILE4: u32 = 16u;
const K_STEP: u32 = 16u;
const K_STEP4: u32 = 4u;

// tile_a[row * K_STEP4 + kq] holds k 4 kq .. 4 kq + 3 of the block's row `row`.
var<workgroup> tile_a: array<vec4<f32>, 256>;
// tile_b[kk * TILE4 + c4] holds columns 4 c4 .. 4 c4 + 3 at step kk.
var<workgroup> tile_b: array<vec4<f32>, 256>;

fn epilogue(acc: vec4<f32>, col4: u32) -> vec4<f32> {
    let v = acc + weight4(params.bias_offset / 4u + col4);
    if (params.activation == ACT_NONE) {
        return v;
    }
    return vec4<f32>(activate(v.x), activate(v.y), activate(v.z), activate(v.w));
}

// acc += a.x * b0 + a.y * b1 + a.z * b2 + a.w * b3: four k steps of one row.
fn mac(acc: vec4<f32>, a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(a.w), b3, fma(vec4<f32>(a.z), b2, fma(vec4<f32>(a.y), b1, fma(vec4<f32>(a.x), b0, acc))));
}

fn store(row: u32, col4: u32, acc: vec4<f32>) {
    let n4 = params.n / 4u;
    if (row < params.m && col4 < n4) {
        out[params.c_offset / 4u + row * n4 + col4] = epilogue(acc, col4);
    }
}

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let m = params.m;
    let n4 = params.n / 4u;
    let k4 = params.k / 4u;
    let row0 = group.y * TILE;
    let col4_0 = group.x * TILE4;

    // What this invocation stages: A row `load_row`, k vec4 `load_k4` of the
    // step; B step row `load_kk`, column vec4 `load_c4`.
    let load_row = lane / 4u;
    let load_k4 = lane % 4u;
    let load_kk = lane / TILE4;
    let load_c4 = lane % TILE4;
    let a_row = row0 + load_row;
    let a_base = params.a_offset / 4u + a_row * k4;
    let b_col4 = col4_0 + load_c4;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < params.k; k0 += K_STEP) {
        let a_k4 = k0 / 4u + load_k4;
        var a = vec4<f32>(0.0);
        if (a_row < m && a_k4 < k4) {
            a = lhs[a_base + a_k4];
        }
        // One whole vec4 per invocation (see the top of the file).
        tile_a[load_row * K_STEP4 + load_k4] = a;

        let b_k = k0 + load_kk;
        var b = vec4<f32>(0.0);
        if (b_k < params.k && b_col4 < n4) {
            b = weight4(params.b_offset / 4u + b_k * n4 + b_col4);
        }
        tile_b[load_kk * TILE4 + load_c4] = b;
        workgroupBarrier();

        let own_rows = 4u * local.y * K_STEP4;
        for (var kq = 0u; kq < K_STEP4; kq++) {
            let a0 = tile_a[own_rows + kq];
            let a1 = tile_a[own_rows + K_STEP4 + kq];
            let a2 = tile_a[own_rows + 2u * K_STEP4 + kq];
            let a3 = tile_a[own_rows + 3u * K_STEP4 + kq];
            let b_row = 4u * kq * TILE4 + local.x;
            let b0 = tile_b[b_row];
            let b1 = tile_b[b_row + TILE4];
            let b2 = tile_b[b_row + 2u * TILE4];
            let b3 = tile_b[b_row + 3u * TILE4];
            acc0 = mac(acc0, a0, b0, b1, b2, b3);
            acc1 = mac(acc1, a1, b0, b1, b2, b3);
            acc2 = mac(acc2, a2, b0, b1, b2, b3);
            acc3 = mac(acc3, a3, b0, b1, b2, b3);
        }
        workgroupBarrier();
    }

    let row = row0 + 4u * local.y;
    let col4 = col4_0 + local.x;
    store(row, col4, acc0);
    store(row + 1u, col4, acc1);
    store(row + 2u, col4, acc2);
    store(row + 3u, col4, acc3);
}
