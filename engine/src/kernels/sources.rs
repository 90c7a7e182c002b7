//! Every WGSL source the engine can compile, whatever the adapter: each
//! family, tile height, head size and weight dtype, after template expansion
//! and specialization. The launchers build their pipelines from the same
//! functions, so a kernel added there is listed here by construction; the
//! translation test (`engine/tests/translate.rs`) runs each one through
//! naga's Metal, HLSL and SPIR-V writers without a GPU.
//!
//! Epilogues (bias, activation) and the pooling mode are parameters read at
//! launch, not compile-time variants, so one source covers all of them.

use super::{attention, layernorm, matmul, matmul_norm};
use crate::dtype::WeightDtype;

/// One source, named after its pipeline, with the adapter features it needs.
#[derive(Debug, Clone)]
pub struct KernelSource {
    /// The pipeline's label, then what distinguishes this variant.
    pub name: String,
    /// Features a device must have to compile it (`SUBGROUP` for the
    /// subgroup8 family, `SHADER_F16` for the half family).
    pub features: wgpu::Features,
    /// Downlevel capabilities it needs: `SHADER_F16_IN_F32` for the
    /// `unpack2x16float` that reads f16 weights (core WebGPU, but absent from
    /// Mesa's Vulkan drivers on devices without 16-bit floats).
    pub downlevel: wgpu::DownlevelFlags,
    pub text: String,
}

fn source(name: String, features: wgpu::Features, text: String) -> KernelSource {
    let downlevel = if text.contains("unpack2x16float") {
        wgpu::DownlevelFlags::SHADER_F16_IN_F32
    } else {
        wgpu::DownlevelFlags::empty()
    };
    KernelSource {
        name,
        features,
        downlevel,
        text,
    }
}

/// Every source the engine's launchers can compile, for every weight dtype.
pub fn every_source() -> Vec<KernelSource> {
    let plain = wgpu::Features::empty();
    let subgroup = wgpu::Features::SUBGROUP;
    let mut sources = Vec::new();
    for dtype in [WeightDtype::F32, WeightDtype::F16] {
        sources.push(source(
            format!("matmul {dtype}"),
            plain,
            matmul::general_source(dtype),
        ));
        for (rows, text) in matmul::subgroup_sources(dtype) {
            sources.push(source(
                format!("matmul_subgroups rows={rows} {dtype}"),
                subgroup,
                text,
            ));
        }
        sources.push(source(
            format!("matmul_tiled {dtype}"),
            plain,
            matmul::tiled_source(dtype),
        ));
        for (rows, text) in matmul::blocked_sources(dtype) {
            sources.push(source(
                format!("matmul_blocked rows={rows} {dtype}"),
                plain,
                text,
            ));
        }
        for (rows, text) in matmul::half_sources(dtype) {
            sources.push(source(
                format!("matmul_half rows={rows} {dtype}"),
                wgpu::Features::SHADER_F16,
                text,
            ));
        }
        for (rows_per_lane, column_blocks) in matmul_norm::variants() {
            sources.push(source(
                format!(
                    "matmul_norm rows_per_lane={rows_per_lane} columns={column_blocks} {dtype}"
                ),
                plain,
                matmul_norm::source(dtype, rows_per_lane, column_blocks),
            ));
        }
        sources.push(source(
            format!("layernorm {dtype}"),
            plain,
            layernorm::portable_source(dtype),
        ));
        sources.push(source(
            format!("layernorm_tiled {dtype}"),
            plain,
            layernorm::tiled_source(dtype),
        ));
        sources.push(source(
            format!("rotary {dtype}"),
            plain,
            surf_shaders::with_weights(surf_shaders::ROTARY, dtype.words()),
        ));
        sources.push(source(
            format!("embed {dtype}"),
            plain,
            surf_shaders::with_weights(surf_shaders::EMBED, dtype.words()),
        ));
    }
    for max_head_dim in attention::PORTABLE_MAX_HEAD_DIMS {
        sources.push(source(
            format!("attention head_dim<={max_head_dim}"),
            plain,
            attention::portable_source(max_head_dim),
        ));
    }
    for head_dim in attention::TILED_HEAD_DIMS {
        sources.push(source(
            format!("attention_tiled head_dim={head_dim}"),
            plain,
            attention::tiled_source(head_dim),
        ));
    }
    for head_dim in attention::TILED_HEAD_DIMS {
        sources.push(source(
            format!("attention_half head_dim={head_dim}"),
            wgpu::Features::SHADER_F16,
            attention::half_source(head_dim),
        ));
    }
    for (head_dim, text) in surf_shaders::ATTENTION_SUBGROUPS {
        sources.push(source(
            format!("attention_subgroups head_dim={head_dim}"),
            subgroup,
            text.into(),
        ));
    }
    for (name, text) in [
        ("pool", surf_shaders::POOL),
        ("normalize", surf_shaders::NORMALIZE),
        ("gate", surf_shaders::GATE),
        ("fma_peak", surf_shaders::FMA_PEAK),
    ] {
        sources.push(source(name.into(), plain, text.into()));
    }
    sources
}

#[cfg(test)]
mod tests {
    use super::every_source;

    #[test]
    fn every_family_dtype_and_head_size_is_listed_once() {
        let sources = every_source();
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        for name in [
            "matmul f32",
            "matmul_subgroups rows=128 f16",
            "matmul_tiled f16",
            "matmul_blocked rows=32 f32",
            "matmul_blocked rows=128 f16",
            "matmul_half rows=64 f32",
            "matmul_half rows=128 f16",
            "layernorm_tiled f32",
            "matmul_norm rows_per_lane=1 columns=3 f32",
            "matmul_norm rows_per_lane=2 columns=8 f16",
            "attention_tiled head_dim=64",
            "attention_subgroups head_dim=32",
            "attention_subgroups head_dim=256",
            "attention_tiled head_dim=256",
            "attention_half head_dim=32",
            "attention_half head_dim=256",
            "attention head_dim<=128",
            "embed f16",
            "gate",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        for s in &sources {
            let uses_subgroups = [
                "subgroupBroadcast(",
                "subgroupAdd(",
                "subgroup_invocation_id",
            ]
            .iter()
            .any(|op| s.text.contains(op));
            assert_eq!(
                s.features.contains(wgpu::Features::SUBGROUP),
                uses_subgroups,
                "{}",
                s.name
            );
            assert_eq!(
                s.features.contains(wgpu::Features::SHADER_F16),
                s.text.starts_with("enable f16;"),
                "{}",
                s.name
            );
        }
    }
}
