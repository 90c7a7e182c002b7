// Scales each row to unit L2 length, dividing by max(norm, 1e-12) as
// torch.nn.functional.normalize does. One workgroup per row.

struct Params {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

const THREADS: u32 = 128u;
var<workgroup> partial: array<f32, THREADS>;

@compute @workgroup_size(128, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let row = group.x;
    let base = row * params.cols;
    var squares = 0.0;
    for (var c = lane; c < params.cols; c += THREADS) {
        let v = x[base + c];
        squares += v * v;
    }
    partial[lane] = squares;
    workgroupBarrier();
    for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / max(sqrt(partial[0]), 1e-12);
    for (var c = lane; c < params.cols; c += THREADS) {
        x[base + c] *= scale;
    }
}
