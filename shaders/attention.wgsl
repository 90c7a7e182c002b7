// Multi-head self-attention over a padded batch.
// qkv: [batch * seq, row_stride] rows holding the queries of every head side
//   by side, then at `key_offset` the keys and at `value_offset` the values
//   of the key/value heads. Grouped-query models have fewer key/value heads
//   than query heads: query head h reads key/value head h / kv_group.
// mask: [batch * seq] additive bias, 0 for real tokens, very negative for padding.
// position_bias: [heads, 2 * seq - 1] additive bias by relative position
//   (key - query + seq - 1), for models whose layers share a relative
//   position table (MPNet, T5); read only when `has_position_bias` is set.
// out:  [batch * seq, out_stride] context vectors, heads side by side.
// A query sees the keys at most `window_before` positions before it and
// `window_after` after it: all of them for encoders, none after it for
// causal decoders, a band for sliding-window layers.
// One workgroup per (QUERIES queries, head, sequence), one query per
// invocation. Keys and values stream through workgroup memory in blocks of
// KEY_BLOCK, over the keys some query of the workgroup can see; each query
// keeps a running maximum and sum, so the softmax is exact without storing
// the score matrix.
//
// The constants below are specialized per kernel family by the launcher
// (`surf_shaders::specialize`): the portable kernel takes any head size up to
// 4 * MAX_DIM4 from the parameters (one kernel per MAX_DIM4, with a key block
// that keeps both blocks within 16 KiB of workgroup memory); the GPU family
// fixes HEAD_DIM4, which turns the loops over the head into constant-bound
// loops that a GPU compiler unrolls, keeping the query and accumulator arrays
// in registers.
//
// `Compute` is the type the keys, values and query are held and multiplied
// in. The half family's kernel (`surf_shaders::half_arithmetic`) makes it
// f16: the key and value blocks take half the workgroup memory, so a block
// holds twice the keys, and the products are rounded to f16 before they are
// summed in f32. The running maximum and sum, the scores and the output
// accumulators stay f32, so the softmax is as exact as the f32 kernel's.

struct Params {
    seq: u32,
    head_dim: u32,
    has_position_bias: u32,
    scale: f32,
    row_stride: u32,
    key_offset: u32,
    value_offset: u32,
    out_stride: u32,
    kv_group: u32,
    window_before: u32,
    window_after: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> mask: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> position_bias: array<f32>;

const QUERIES: u32 = 64u;
const KEY_BLOCK: u32 = 16u;
// Head size up to 4 * MAX_DIM4.
const MAX_DIM4: u32 = 16u;
// The head size / 4 when fixed at compile time, 0 when read from the parameters.
const HEAD_DIM4: u32 = 0u;
alias Compute = f32;
// 1 where `Compute` is f16.
const HALF_ARITHMETIC: u32 = 0u;

var<workgroup> keys: array<vec4<Compute>, KEY_BLOCK * MAX_DIM4>;
var<workgroup> values: array<vec4<Compute>, KEY_BLOCK * MAX_DIM4>;
var<workgroup> bias: array<f32, KEY_BLOCK>;

// `acc` plus the products of four query and key elements. Both branches
// type-check for either `Compute`; the constant condition leaves one.
fn add_products(q: vec4<Compute>, k: vec4<Compute>, acc: vec4<f32>) -> vec4<f32> {
    if (HALF_ARITHMETIC == 1u) {
        return acc + vec4<f32>(q * k);
    }
    return fma(vec4<f32>(q), vec4<f32>(k), acc);
}

// `acc` plus four value elements weighted by the probability `p`.
fn add_weighted(p: f32, v: vec4<Compute>, acc: vec4<f32>) -> vec4<f32> {
    if (HALF_ARITHMETIC == 1u) {
        return acc + vec4<f32>(vec4<Compute>(vec4<f32>(p)) * v);
    }
    return fma(vec4<f32>(p), vec4<f32>(v), acc);
}

// Whether `query` sees `key` under the layer's window.
fn visible(query: u32, key: u32) -> bool {
    if (key < query) {
        return query - key <= params.window_before;
    }
    return key - query <= params.window_after;
}

@compute @workgroup_size(QUERIES, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let seq = params.seq;
    let dim4 = select(params.head_dim / 4u, HEAD_DIM4, HEAD_DIM4 != 0u);
    let head = group.y;
    let sequence = group.z;
    let first_query = group.x * QUERIES;
    let query = first_query + lane;
    let row_stride4 = params.row_stride / 4u;
    let head4 = head * dim4;
    let kv_head4 = (head / params.kv_group) * dim4;
    let key4 = params.key_offset / 4u + kv_head4;
    let value4 = params.value_offset / 4u + kv_head4;
    let first_row = sequence * seq;
    let in_range = query < seq;
    // Row of this query's relative position biases: key j reads entry j.
    let bias_row = head * (2u * seq - 1u) + seq - 1u - min(query, seq - 1u);
    let has_position_bias = params.has_position_bias != 0u;
    // The keys some query of this workgroup sees.
    let last_query = min(first_query + QUERIES, seq) - 1u;
    let keys_begin = first_query - min(first_query, params.window_before);
    let keys_end = min(seq, last_query + min(params.window_after, seq) + 1u);

    var q: array<vec4<Compute>, MAX_DIM4>;
    var acc: array<vec4<f32>, MAX_DIM4>;
    if (in_range) {
        let base = (first_row + query) * row_stride4 + head4;
        for (var d = 0u; d < dim4; d++) {
            q[d] = vec4<Compute>(qkv[base + d] * params.scale);
            acc[d] = vec4<f32>(0.0);
        }
    }
    var running_max = -3.0e38;
    var running_sum = 0.0;

    for (var k0 = keys_begin; k0 < keys_end; k0 += KEY_BLOCK) {
        let block = min(KEY_BLOCK, keys_end - k0);
        for (var e = lane; e < block * dim4; e += QUERIES) {
            let j = e / dim4;
            let d = e % dim4;
            let row = (first_row + k0 + j) * row_stride4;
            keys[j * MAX_DIM4 + d] = vec4<Compute>(qkv[row + key4 + d]);
            values[j * MAX_DIM4 + d] = vec4<Compute>(qkv[row + value4 + d]);
        }
        if (lane < block) {
            bias[lane] = mask[first_row + k0 + lane];
        }
        workgroupBarrier();

        if (in_range) {
            for (var j = 0u; j < block; j++) {
                if (!visible(query, k0 + j)) {
                    continue;
                }
                var dot4 = vec4<f32>(0.0);
                for (var d = 0u; d < dim4; d++) {
                    dot4 = add_products(q[d], keys[j * MAX_DIM4 + d], dot4);
                }
                var score = dot4.x + dot4.y + dot4.z + dot4.w + bias[j];
                if (has_position_bias) {
                    score += position_bias[bias_row + k0 + j];
                }
                if (score > running_max) {
                    let correction = exp(running_max - score);
                    running_sum *= correction;
                    for (var d = 0u; d < dim4; d++) {
                        acc[d] *= correction;
                    }
                    running_max = score;
                }
                let p = exp(score - running_max);
                running_sum += p;
                for (var d = 0u; d < dim4; d++) {
                    acc[d] = add_weighted(p, values[j * MAX_DIM4 + d], acc[d]);
                }
            }
        }
        workgroupBarrier();
    }

    if (in_range) {
        let base = (first_row + query) * (params.out_stride / 4u) + head4;
        let inv = 1.0 / running_sum;
        for (var d = 0u; d < dim4; d++) {
            out[base + d] = acc[d] * inv;
        }
    }
}
