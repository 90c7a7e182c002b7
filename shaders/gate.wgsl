// Gated feed-forward: out[r, c] = activate(x[r, c]) * x[r, n + c], where x
// holds both projections of a row side by side ([m, 2 * n]), as the one fused
// matmul of the gate and up weights writes them. T5's gated-gelu (gelu_new),
// and the GeGLU and SwiGLU of later models, differ only in the activation.
// It is the second half of a matmul epilogue, so it takes the matmul's
// parameter block and activations (prepended from activation.wgsl): m rows,
// n columns, and `a_offset` as the row stride of its two-dimensional grid.

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let index = id.x + id.y * params.a_offset;
    if (index >= params.m * params.n) {
        return;
    }
    let r = index / params.n;
    let c = index % params.n;
    let base = r * 2u * params.n;
    out[index] = activate(x[base + c]) * x[base + params.n + c];
}
