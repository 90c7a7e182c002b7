//! Kernel families: sets of matmul, attention and LayerNorm kernels shaped for
//! one kind of adapter. Which family runs a given shape is decided by
//! measuring them on the adapter at hand (`autotune`), or forced with
//! `SURF_KERNELS`.

use crate::gpu::Gpu;

/// Environment variable that forces one family (`SURF_KERNELS=tiled`) or asks
/// for the measured choice per shape (`auto`, the default).
pub const KERNELS_ENV: &str = "SURF_KERNELS";

/// Invocations in a workgroup of the subgroup kernels (`matmul_subgroups`,
/// `attention_subgroups`): one SIMD vector of a software rasterizer.
pub const SUBGROUP_LANES: u32 = 8;

/// Invocations of a LayerNorm workgroup in the GPU family: enough lanes that
/// a BERT row (96 to 256 vec4s) is read in a few steps.
pub const TILED_LAYERNORM_THREADS: u32 = 64;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KernelFamily {
    /// Needs no optional feature and takes any shape: small workgroups with
    /// workgroup-memory tiles.
    Portable,
    /// One 8-lane subgroup per workgroup, sharing operands through subgroup
    /// broadcasts and no workgroup memory: a software rasterizer's SIMD vector.
    Subgroup8,
    /// Workgroups of 256 invocations staging 64x64 tiles in workgroup memory,
    /// 4x4 register blocks: the shape desktop GPUs want.
    Tiled,
}

impl KernelFamily {
    pub const ALL: [KernelFamily; 3] = [
        KernelFamily::Portable,
        KernelFamily::Subgroup8,
        KernelFamily::Tiled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelFamily::Portable => "portable",
            KernelFamily::Subgroup8 => "subgroup8",
            KernelFamily::Tiled => "tiled",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|family| family.name() == name)
    }

    /// Invocations per workgroup of the family's matmul.
    pub fn workgroup_size(self) -> u32 {
        match self {
            KernelFamily::Portable => 64,
            KernelFamily::Subgroup8 => SUBGROUP_LANES,
            KernelFamily::Tiled => 256,
        }
    }

    /// Whether the family's matmul stages its operands in workgroup memory.
    pub fn workgroup_memory(self) -> bool {
        match self {
            KernelFamily::Portable | KernelFamily::Tiled => true,
            KernelFamily::Subgroup8 => false,
        }
    }

    /// Why `gpu` cannot run this family, or `None` when it can.
    pub fn unsupported_reason(self, gpu: &Gpu) -> Option<String> {
        let limits = &gpu.limits;
        match self {
            KernelFamily::Portable => None,
            KernelFamily::Subgroup8 if !gpu.subgroups => {
                Some("the adapter has no subgroup operations".into())
            }
            // A workgroup must sit in one subgroup for the broadcasts and
            // reductions to see every lane.
            KernelFamily::Subgroup8 if gpu.info.subgroup_min_size < SUBGROUP_LANES => {
                Some(format!(
                    "the adapter's subgroups may hold as few as {} invocations, under {SUBGROUP_LANES}",
                    gpu.info.subgroup_min_size
                ))
            }
            KernelFamily::Subgroup8 => None,
            KernelFamily::Tiled if limits.max_compute_invocations_per_workgroup < 256 => {
                Some(format!(
                    "workgroups are limited to {} invocations, under 256",
                    limits.max_compute_invocations_per_workgroup
                ))
            }
            KernelFamily::Tiled if limits.max_compute_workgroup_storage_size < 8192 => {
                Some(format!(
                    "workgroup memory is limited to {} bytes, under 8192",
                    limits.max_compute_workgroup_storage_size
                ))
            }
            KernelFamily::Tiled => None,
        }
    }

    /// The families `gpu` can run, in `ALL` order.
    pub fn supported(gpu: &Gpu) -> Vec<KernelFamily> {
        Self::ALL
            .into_iter()
            .filter(|family| family.unsupported_reason(gpu).is_none())
            .collect()
    }

    /// The families `gpu` can run, the one to beat first: measuring drops a
    /// family whose first launch already loses to the incumbent's whole run.
    pub fn incumbent_first(gpu: &Gpu) -> Vec<KernelFamily> {
        let incumbent = Self::fixed_default(gpu);
        std::iter::once(incumbent)
            .chain(Self::supported(gpu).into_iter().filter(|f| *f != incumbent))
            .collect()
    }

    /// The family every shape ran before kernels were measured per adapter:
    /// the subgroup kernels where they run, else the portable ones.
    pub fn fixed_default(gpu: &Gpu) -> KernelFamily {
        if KernelFamily::Subgroup8.unsupported_reason(gpu).is_none() {
            KernelFamily::Subgroup8
        } else {
            KernelFamily::Portable
        }
    }
}

impl std::fmt::Display for KernelFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the engine picks its kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelMode {
    /// Measure the families on the adapter (or reuse measurements cached on
    /// disk) and run the fastest per shape.
    #[default]
    Auto,
    /// Run one family everywhere.
    Forced(KernelFamily),
}

impl KernelMode {
    /// Parses `auto` or a family name.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "auto" | "" => Some(KernelMode::Auto),
            name => KernelFamily::from_name(name).map(KernelMode::Forced),
        }
    }

    /// Every value `parse` accepts, for error messages.
    pub fn accepted() -> String {
        std::iter::once("auto")
            .chain(KernelFamily::ALL.iter().map(|family| family.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::{KernelFamily, KernelMode};

    #[test]
    fn every_family_name_parses_back() {
        for family in KernelFamily::ALL {
            assert_eq!(KernelFamily::from_name(family.name()), Some(family));
            assert_eq!(
                KernelMode::parse(family.name()),
                Some(KernelMode::Forced(family))
            );
        }
        assert_eq!(KernelMode::parse("auto"), Some(KernelMode::Auto));
        assert_eq!(KernelMode::parse("cuda"), None);
        assert!(KernelMode::accepted().contains("tiled"));
    }
}
