// Sentence vectors from token vectors: mean, CLS, max or mean/sqrt(len) over the
// real tokens of each sequence. One workgroup per sequence.

struct Params {
    seq: u32,
    hidden: u32,
    mode: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> lengths: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const MODE_MEAN: u32 = 0u;
const MODE_CLS: u32 = 1u;
const MODE_MAX: u32 = 2u;
const MODE_MEAN_SQRT_LEN: u32 = 3u;

@compute @workgroup_size(128, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let sequence = group.x;
    let len = lengths[sequence];
    let hidden = params.hidden;
    let first = sequence * params.seq * hidden;
    for (var h = lane; h < hidden; h += 128u) {
        var result = 0.0;
        switch params.mode {
            case MODE_CLS: {
                result = x[first + h];
            }
            case MODE_MAX: {
                result = -3.0e38;
                for (var t = 0u; t < len; t++) {
                    result = max(result, x[first + t * hidden + h]);
                }
            }
            default: {
                var sum = 0.0;
                for (var t = 0u; t < len; t++) {
                    sum += x[first + t * hidden + h];
                }
                let count = f32(max(len, 1u));
                if (params.mode == MODE_MEAN_SQRT_LEN) {
                    result = sum / sqrt(count);
                } else {
                    result = sum / count;
                }
            }
        }
        out[sequence * hidden + h] = result;
    }
}
