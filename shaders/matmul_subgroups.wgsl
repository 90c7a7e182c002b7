// Naga 30 rejects `enable subgroups;` as not yet implemented and accepts the
// subgroup builtins whenever the device has wgpu::Features::SUBGROUP.

// C = act(A * B + bias), row-major, A and C f32 and B and the bias read
// through `weight4` (f32 or f16 pairs), for k, n and every offset a
// multiple of 4, on adapters whose subgroups hold at least 8 invocations.
//
// One workgroup is a single subgroup of 8 lanes computing a TILE_M x 64 tile
// of C: every lane owns two 4-column groups of all TILE_M rows. Software
// rasterizers such as llvmpipe run a subgroup as one SIMD vector and load
// memory one lane at a time, so the cost of a kernel is its number of load
// instructions. Here each lane loads one vec4 of A (4 k values of one row) per
// 8 rows and shares it through subgroupBroadcast, which is a register shuffle,
// and loads B as vec4s straight from the storage buffer: there is no workgroup
// memory to fill and no barrier. Rows and columns past the edges are clamped
// for loading and masked when storing, so the inner loop has no branches.
//
// Tall tiles load B once for many rows; short ones waste fewer rows when m is
// small, so the launcher picks the height per multiply and this file is a
// template that surf-shaders' build.rs expands once per TILE_M. The lane index
// of subgroupBroadcast must be a constant expression and the accumulators must
// stay in registers, so a row cannot be a loop index: the rows are unrolled in
// the text.
//
// Template markers, expanded in code and never in comments:
// - a line ending in `// @block` is written once per 8-row block of the tile,
//   `{block}` being the block's index and `{block_row}` its first row;
// - a run of lines ending in `// @row` is written once per row of the tile,
//   `{row}` being the row's index, `{block}` its block and `{lane}` the lane
//   that loaded it;
// - `{tile_m}` is the tile height on any line.

// `params` (binding 0) is declared in activation.wgsl, which comes first.
@group(0) @binding(1) var<storage, read> lhs: array<vec4<f32>>;
// @weights(2, vec4)
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

const LANES: u32 = 8u;
const TILE_M: u32 = {tile_m}u;
// Columns of the tile, in vec4 groups: two per lane.
const TILE_N4: u32 = 16u;

fn epilogue(acc: vec4<f32>, col4: u32) -> vec4<f32> {
    let v = acc + weight4(params.bias_offset / 4u + col4);
    if (params.activation == ACT_NONE) {
        return v;
    }
    return vec4<f32>(activate(v.x), activate(v.y), activate(v.z), activate(v.w));
}

fn store_row(row: u32, lo: vec4<f32>, hi: vec4<f32>, col_a: u32, col_b: u32) {
    if (row >= params.m) {
        return;
    }
    let n4 = params.n / 4u;
    let base = params.c_offset / 4u + row * n4;
    if (col_a < n4) {
        out[base + col_a] = epilogue(lo, col_a);
    }
    if (col_b < n4) {
        out[base + col_b] = epilogue(hi, col_b);
    }
}

// acc += a.x * b0 + a.y * b1 + a.z * b2 + a.w * b3: four k steps of one row.
fn mac(acc: vec4<f32>, a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(a.w), b3, fma(vec4<f32>(a.z), b2, fma(vec4<f32>(a.y), b1, fma(vec4<f32>(a.x), b0, acc))));
}

@compute @workgroup_size(8, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let m = params.m;
    let n4 = params.n / 4u;
    let k4 = params.k / 4u;
    let row0 = group.y * TILE_M;
    let col_a = group.x * TILE_N4 + lane;
    let col_b = col_a + LANES;

    // Lane i loads rows row0 + i, row0 + 8 + i, ... of A.
    let a{block}_base = params.a_offset / 4u + min(row0 + {block_row}u + lane, m - 1u) * k4; // @block
    let b_col_a = params.b_offset / 4u + min(col_a, n4 - 1u);
    let b_col_b = params.b_offset / 4u + min(col_b, n4 - 1u);

    var acc{row}a = vec4<f32>(0.0); // @row
    var acc{row}b = vec4<f32>(0.0); // @row

    var b_row = 0u;
    for (var kc = 0u; kc < k4; kc++) {
        let a{block} = lhs[a{block}_base + kc]; // @block
        let b0a = weight4(b_col_a + b_row);
        let b0b = weight4(b_col_b + b_row);
        let b1a = weight4(b_col_a + b_row + n4);
        let b1b = weight4(b_col_b + b_row + n4);
        let b2a = weight4(b_col_a + b_row + 2u * n4);
        let b2b = weight4(b_col_b + b_row + 2u * n4);
        let b3a = weight4(b_col_a + b_row + 3u * n4);
        let b3b = weight4(b_col_b + b_row + 3u * n4);
        b_row += 4u * n4;

        var a: vec4<f32>;
        a = subgroupBroadcast(a{block}, {lane}u); // @row
        acc{row}a = mac(acc{row}a, a, b0a, b1a, b2a, b3a); // @row
        acc{row}b = mac(acc{row}b, a, b0b, b1b, b2b, b3b); // @row
    }

    store_row(row0 + {row}u, acc{row}a, acc{row}b, col_a, col_b); // @row
}
