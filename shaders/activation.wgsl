// The parameter block every matmul kernel takes, and the activations fused
// into their epilogues. Included ahead of each matmul kernel.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    activation: u32,
    a_offset: u32,
    b_offset: u32,
    bias_offset: u32,
    c_offset: u32,
}

@group(0) @binding(0) var<uniform> params: Params;

const ACT_NONE: u32 = 0u;
const ACT_GELU_ERF: u32 = 1u;
const ACT_GELU_TANH: u32 = 2u;
const ACT_RELU: u32 = 3u;
const ACT_TANH: u32 = 4u;
const ACT_SILU: u32 = 5u;

// erfc with relative error below 1.2e-7 everywhere (Chebyshev fit, Numerical
// Recipes 6.2), so that GELU keeps full f32 precision for negative inputs too.
fn erfc_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * exp(poly);
    return select(2.0 - r, r, x >= 0.0);
}

fn activate(x: f32) -> f32 {
    switch params.activation {
        case ACT_GELU_ERF: {
            return 0.5 * x * erfc_approx(-x * 0.70710678118654752);
        }
        case ACT_GELU_TANH: {
            let inner = 0.7978845608028654 * (x + 0.044715 * x * x * x);
            return 0.5 * x * (1.0 + tanh(clamp(inner, -15.0, 15.0)));
        }
        case ACT_RELU: {
            return max(x, 0.0);
        }
        case ACT_TANH: {
            return tanh(clamp(x, -15.0, 15.0));
        }
        case ACT_SILU: {
            return x / (1.0 + exp(-x));
        }
        default: {
            return x;
        }
    }
}
