//! WGSL sources of the engine's compute kernels, one file per kernel. The engine
//! owns the pipelines; this crate only carries the text.

/// Tiled matrix multiply with fused bias and activation.
pub const MATMUL: &str = concat!(
    include_str!("../activation.wgsl"),
    include_str!("../matmul.wgsl")
);
/// The same multiply for vec4-aligned operands, sharing A through subgroup
/// broadcasts; needs subgroups of at least 8 invocations.
pub const MATMUL_SUBGROUPS: &str = concat!(
    include_str!("../activation.wgsl"),
    include_str!("../matmul_subgroups.wgsl")
);
/// Word + position + token-type embedding gather.
pub const EMBED: &str = include_str!("../embed.wgsl");
/// LayerNorm with a fused residual add.
pub const LAYERNORM: &str = include_str!("../layernorm.wgsl");
/// Multi-head self-attention with an additive mask and a streaming softmax.
pub const ATTENTION: &str = include_str!("../attention.wgsl");
/// Mean, CLS, max and mean/sqrt(len) pooling.
pub const POOL: &str = include_str!("../pool.wgsl");
/// Row-wise L2 normalisation.
pub const NORMALIZE: &str = include_str!("../normalize.wgsl");
/// FMA chains that measure the adapter's arithmetic peak.
pub const FMA_PEAK: &str = include_str!("../fma_peak.wgsl");
