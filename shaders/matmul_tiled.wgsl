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
// buffers is reused 64 times from on-chip memory. A is staged k-major so that
// one vec4 read gives an invocation its four rows at one k, and B row-major
// so that one vec4 read gives it its four columns; the 16 invocations that
// share a row block read the same A vec4, which the hardware broadcasts.

// `params` (binding 0) is declared in activation.wgsl, which comes first.
@group(0) @binding(1) var<storage, read> lhs: array<vec4<f32>>;
// @weights(2, vec4)
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

const TILE: u32 = 64u;
const TILE4: u32 = 16u;
const K_STEP: u32 = 16u;

// tile_a[kk * TILE4 + r4] holds rows 4 r4 .. 4 r4 + 3 of the block at step kk.
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
        // Transposed on the way in: element j of the vec4 is k = 4 load_k4 + j.
        let r4 = load_row / 4u;
        let ri = load_row % 4u;
        tile_a[(4u * load_k4 + 0u) * TILE4 + r4][ri] = a.x;
        tile_a[(4u * load_k4 + 1u) * TILE4 + r4][ri] = a.y;
        tile_a[(4u * load_k4 + 2u) * TILE4 + r4][ri] = a.z;
        tile_a[(4u * load_k4 + 3u) * TILE4 + r4][ri] = a.w;

        let b_k = k0 + load_kk;
        var b = vec4<f32>(0.0);
        if (b_k < params.k && b_col4 < n4) {
            b = weight4(params.b_offset / 4u + b_k * n4 + b_col4);
        }
        tile_b[load_kk * TILE4 + load_c4] = b;
        workgroupBarrier();

        for (var kk = 0u; kk < K_STEP; kk++) {
            let rows = tile_a[kk * TILE4 + local.y];
            let cols = tile_b[kk * TILE4 + local.x];
            acc0 = fma(vec4<f32>(rows.x), cols, acc0);
            acc1 = fma(vec4<f32>(rows.y), cols, acc1);
            acc2 = fma(vec4<f32>(rows.z), cols, acc2);
            acc3 = fma(vec4<f32>(rows.w), cols, acc3);
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
