// x[t] = word[token] + position[pos] + token_type[type], for every token t.
// `tokens` holds three u32 per token: word id, position id, token type id.

struct Params {
    tokens: u32,
    hidden: u32,
    word_offset: u32,
    position_offset: u32,
    type_offset: u32,
    row_stride: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
// @weights(2, scalar)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    // Two-dimensional dispatch: one row of the grid per `row_stride` elements.
    let index = id.x + id.y * params.row_stride;
    let total = params.tokens * params.hidden;
    if (index >= total) {
        return;
    }
    let t = index / params.hidden;
    let h = index % params.hidden;
    let word = tokens[3u * t];
    let position = tokens[3u * t + 1u];
    let token_type = tokens[3u * t + 2u];
    out[index] = weight1(params.word_offset + word * params.hidden + h)
        + weight1(params.position_offset + position * params.hidden + h)
        + weight1(params.type_offset + token_type * params.hidden + h);
}
