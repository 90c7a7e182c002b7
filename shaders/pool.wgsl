// Sentence vectors from token vectors: mean, CLS, max, mean/sqrt(len),
// position-weighted mean (token t weighs t + 1) or the last token, over the
// real tokens of each sequence (padding is at the end). One workgroup per
// sequence. With `normalize` set, the same workgroup then scales the vector
// to unit L2 length as normalize.wgsl does, saving that launch and its
// second pass over the vectors: each invocation rescales the elements it
// wrote itself, so only the sum of squares crosses invocations.

struct Params {
    seq: u32,
    hidden: u32,
    mode: u32,
    normalize: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> lengths: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const MODE_MEAN: u32 = 0u;
const MODE_CLS: u32 = 1u;
const MODE_MAX: u32 = 2u;
const MODE_MEAN_SQRT_LEN: u32 = 3u;
const MODE_WEIGHTED_MEAN: u32 = 4u;
const MODE_LAST_TOKEN: u32 = 5u;

const THREADS: u32 = 128u;
var<workgroup> partial: array<f32, THREADS>;

@compute @workgroup_size(THREADS, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let sequence = group.x;
    let len = lengths[sequence];
    let hidden = params.hidden;
    let first = sequence * params.seq * hidden;
    var squares = 0.0;
    for (var h = lane; h < hidden; h += THREADS) {
        var result = 0.0;
        switch params.mode {
            case MODE_CLS: {
                result = x[first + h];
            }
            case MODE_LAST_TOKEN: {
                result = x[first + (max(len, 1u) - 1u) * hidden + h];
            }
            case MODE_WEIGHTED_MEAN: {
                var sum = 0.0;
                for (var t = 0u; t < len; t++) {
                    sum += f32(t + 1u) * x[first + t * hidden + h];
                }
                let weight = f32(len) * f32(len + 1u) * 0.5;
                result = sum / max(weight, 1.0);
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
        squares += result * result;
    }
    if (params.normalize == 0u) {
        return;
    }
    partial[lane] = squares;
    workgroupBarrier();
    for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    // torch.nn.functional.normalize's floor on the norm.
    let scale = 1.0 / max(sqrt(partial[0]), 1e-12);
    for (var h = lane; h < hidden; h += THREADS) {
        out[sequence * hidden + h] *= scale;
    }
}
