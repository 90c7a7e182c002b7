//! WGSL sources of the engine's compute kernels, one file per kernel. The engine
//! owns the pipelines; this crate only carries the text.

/// Tiled matrix multiply with fused bias and activation.
pub const MATMUL: &str = concat!(
    include_str!("../activation.wgsl"),
    include_str!("../matmul.wgsl")
);
/// `matmul_subgroups.wgsl` expanded for one tile height, behind the activations.
macro_rules! matmul_subgroups {
    ($rows:literal) => {
        (
            $rows,
            concat!(
                include_str!("../activation.wgsl"),
                include_str!(concat!(
                    env!("OUT_DIR"),
                    "/matmul_subgroups_",
                    $rows,
                    ".wgsl"
                ))
            ),
        )
    };
}

/// The same multiply for vec4-aligned operands, sharing A through subgroup
/// broadcasts; needs subgroups of at least 8 invocations. One source per tile
/// height (rows of C per workgroup), shortest first: `build.rs` generates them
/// from the template `matmul_subgroups.wgsl`.
pub const MATMUL_SUBGROUPS: [(u32, &str); 4] = [
    matmul_subgroups!(16),
    matmul_subgroups!(32),
    matmul_subgroups!(64),
    matmul_subgroups!(128),
];
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

#[cfg(test)]
mod tests {
    use super::MATMUL_SUBGROUPS;

    #[test]
    fn every_matmul_tile_unrolls_all_its_rows_and_no_more() {
        for (rows, source) in MATMUL_SUBGROUPS {
            assert!(source.contains(&format!("const TILE_M: u32 = {rows}u;")));
            assert_eq!(
                source.matches("    store_row(row0 + ").count(),
                rows as usize
            );
            assert_eq!(source.matches("subgroupBroadcast(a").count(), rows as usize);
            assert!(source.contains(&format!("acc{}b", rows - 1)));
            assert!(!source.contains(&format!("acc{rows}a")));
            for placeholder in ["{row}", "{block}", "{lane}", "{block_row}", "{tile_m}"] {
                let code = source
                    .lines()
                    .map(|line| line.split("//").next().unwrap_or(""));
                assert!(
                    code.clone().all(|line| !line.contains(placeholder)),
                    "{rows}-row source keeps {placeholder}"
                );
            }
        }
    }
}
