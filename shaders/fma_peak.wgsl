// Measures the adapter's arithmetic peak: independent chains of vec4 FMAs
// whose result is stored so that the compiler cannot drop them.

struct Params {
    iterations: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let seed = f32(id.x) * 1e-7;
    var a = vec4<f32>(seed, seed + 1e-3, seed + 2e-3, seed + 3e-3);
    var b = a + vec4<f32>(0.5);
    var c = a + vec4<f32>(0.25);
    var d = a + vec4<f32>(0.125);
    let mul = vec4<f32>(0.9999);
    let add = vec4<f32>(1e-4);
    for (var i = 0u; i < params.iterations; i++) {
        a = fma(a, mul, add);
        b = fma(b, mul, add);
        c = fma(c, mul, add);
        d = fma(d, mul, add);
        a = fma(a, mul, add);
        b = fma(b, mul, add);
        c = fma(c, mul, add);
        d = fma(d, mul, add);
    }
    out[id.x] = a + b + c + d;
}
