// x[t] = word[t] + position[pos] + token_type[type], for every token t.
// `word` holds each token's row of the word table, gathered on the host: the
// table itself never has to fit a GPU binding (XLM-R's is 768 MB in f32).
// `tokens` holds three u32 per token: word id, position id, token type id.
// Families without learned positions or token types (T5) clear the flags.

struct Params {
    tokens: u32,
    hidden: u32,
    position_offset: u32,
    type_offset: u32,
    row_stride: u32,
    has_position: u32,
    has_type: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read> word: array<f32>;
// @weights(3, scalar)
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

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
    var value = word[index];
    if (params.has_position != 0u) {
        let position = tokens[3u * t + 1u];
        value += weight1(params.position_offset + position * params.hidden + h);
    }
    if (params.has_type != 0u) {
        let token_type = tokens[3u * t + 2u];
        value += weight1(params.type_offset + token_type * params.hidden + h);
    }
    out[index] = value;
}
