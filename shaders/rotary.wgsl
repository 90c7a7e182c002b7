// Rotary position embedding, applied in place to the query and key heads of
// a qkv buffer (see attention.wgsl for its layout), in the rotate-half form
// of the LLaMA lineage, Qwen and ModernBERT: for i < head_dim / 2,
//   x[i]            <- x[i] cos(p f_i) - x[i + half] sin(p f_i)
//   x[i + half]     <- x[i + half] cos(p f_i) + x[i] sin(p f_i)
// where p is the row's position (row % seq: sequences are padded at the end,
// so real tokens sit at 0, 1, ...). `table` holds (cos, sin) per position and
// frequency, computed on the host in f32 as the reference implementations
// do, because GPU sin and cos lose accuracy on the large angles of late
// positions.
// With FLAG_NORM set, each head is first RMS-normalised over head_dim with
// its gain (Qwen3's q_norm and k_norm), in the same pass.
// One workgroup per (row, head), for the query heads then the key heads;
// values are left alone.

struct Params {
    rows: u32,
    seq: u32,
    head_dim: u32,
    heads: u32,
    kv_heads: u32,
    row_stride: u32,
    key_offset: u32,
    table_offset: u32,
    flags: u32,
    query_gain: u32,
    key_gain: u32,
    eps: f32,
    groups_x: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

const FLAG_NORM: u32 = 1u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<vec2<f32>>;
// @weights(3, scalar)

const THREADS: u32 = 32u;
var<workgroup> partial: array<f32, THREADS>;

@compute @workgroup_size(THREADS, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let heads_per_row = params.heads + params.kv_heads;
    let index = group.x + group.y * params.groups_x;
    // Uniform per workgroup: every lane leaves together, before any barrier.
    if (index >= params.rows * heads_per_row) {
        return;
    }
    let row = index / heads_per_row;
    let head = index % heads_per_row;
    let is_key = head >= params.heads;
    var base = row * params.row_stride + head * params.head_dim;
    var gain = params.query_gain;
    if (is_key) {
        base = row * params.row_stride + params.key_offset + (head - params.heads) * params.head_dim;
        gain = params.key_gain;
    }
    let half = params.head_dim / 2u;

    var scale = 1.0;
    let norm = (params.flags & FLAG_NORM) != 0u;
    if (norm) {
        var squares = 0.0;
        for (var d = lane; d < params.head_dim; d += THREADS) {
            let v = qkv[base + d];
            squares = fma(v, v, squares);
        }
        partial[lane] = squares;
        workgroupBarrier();
        for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
            if (lane < stride) {
                partial[lane] += partial[lane + stride];
            }
            workgroupBarrier();
        }
        scale = inverseSqrt(partial[0] / f32(params.head_dim) + params.eps);
    }

    let position = row % params.seq;
    let angles = params.table_offset + position * half;
    for (var i = lane; i < half; i += THREADS) {
        var x1 = qkv[base + i];
        var x2 = qkv[base + half + i];
        if (norm) {
            x1 = x1 * scale * weight1(gain + i);
            x2 = x2 * scale * weight1(gain + half + i);
        }
        let cs = table[angles + i];
        qkv[base + i] = x1 * cs.x - x2 * cs.y;
        qkv[base + half + i] = x2 * cs.x + x1 * cs.y;
    }
}
