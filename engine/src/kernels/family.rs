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

    /// The subgroup sizes the family's kernels are correct for, or `None`
    /// for a family that uses no subgroup operations. `matmul_subgroups` and
    /// `attention_subgroups` run one workgroup of 8 invocations that
    /// broadcasts from lanes 0 to 7 and reduces over the subgroup, so the
    /// workgroup must be one subgroup: every size the adapter may use must
    /// be at least 8 (a wider subgroup leaves lanes past the eighth
    /// inactive, which broadcasts and reductions skip).
    pub fn subgroup_sizes(self) -> Option<SubgroupSizes> {
        match self {
            KernelFamily::Subgroup8 => Some(SubgroupSizes {
                min: SUBGROUP_LANES,
                max: wgpu::MAXIMUM_SUBGROUP_MAX_SIZE,
            }),
            KernelFamily::Portable | KernelFamily::Tiled => None,
        }
    }

    /// Why `gpu` cannot run this family, or `None` when it can.
    pub fn unsupported_reason(self, gpu: &Gpu) -> Option<String> {
        self.unsupported_on(&AdapterFacts::of(gpu))
    }

    /// Why an adapter with these facts cannot run this family, or `None`
    /// when it can.
    pub fn unsupported_on(self, facts: &AdapterFacts) -> Option<String> {
        if let Some(sizes) = self.subgroup_sizes() {
            if !facts.subgroups {
                return Some("the adapter has no subgroup operations".into());
            }
            if facts.subgroup_min_size < sizes.min || facts.subgroup_max_size > sizes.max {
                return Some(format!(
                    "the adapter's subgroups hold {} to {} invocations; its kernels are correct for {} to {}",
                    facts.subgroup_min_size, facts.subgroup_max_size, sizes.min, sizes.max
                ));
            }
        }
        match self {
            KernelFamily::Tiled if facts.max_invocations_per_workgroup < 256 => Some(format!(
                "workgroups are limited to {} invocations, under 256",
                facts.max_invocations_per_workgroup
            )),
            KernelFamily::Tiled if facts.max_workgroup_storage < 8192 => Some(format!(
                "workgroup memory is limited to {} bytes, under 8192",
                facts.max_workgroup_storage
            )),
            _ => None,
        }
    }

    /// The families `gpu` can run, in `ALL` order.
    pub fn supported(gpu: &Gpu) -> Vec<KernelFamily> {
        Self::supported_on(&AdapterFacts::of(gpu))
    }

    /// The families an adapter with these facts can run, in `ALL` order.
    pub fn supported_on(facts: &AdapterFacts) -> Vec<KernelFamily> {
        Self::ALL
            .into_iter()
            .filter(|family| family.unsupported_on(facts).is_none())
            .collect()
    }

    /// The families `gpu` can run, the one to beat first: measuring drops a
    /// family whose first launch already loses to the incumbent's whole run.
    pub fn incumbent_first(gpu: &Gpu) -> Vec<KernelFamily> {
        Self::incumbent_first_on(&AdapterFacts::of(gpu))
    }

    /// `incumbent_first` for an adapter with these facts.
    pub fn incumbent_first_on(facts: &AdapterFacts) -> Vec<KernelFamily> {
        let incumbent = Self::default_on(facts);
        std::iter::once(incumbent)
            .chain(
                Self::supported_on(facts)
                    .into_iter()
                    .filter(|f| *f != incumbent),
            )
            .collect()
    }

    /// The family a shape runs before (or without) measuring, and the
    /// incumbent that measuring starts from.
    pub fn fixed_default(gpu: &Gpu) -> KernelFamily {
        Self::default_on(&AdapterFacts::of(gpu))
    }

    /// `fixed_default` for an adapter with these facts. On a CPU adapter
    /// the 8-lane subgroup kernels match the rasterizer's SIMD vector. On
    /// any other adapter they are never the default: 8-lane workgroups fill
    /// a quarter of a 32-wide warp, and their per-lane accumulators (256 to
    /// 1,024 floats) spill registers, so the tiled family is the default
    /// there. Where the preferred family cannot run, the portable one.
    pub fn default_on(facts: &AdapterFacts) -> KernelFamily {
        let runs = |family: KernelFamily| family.unsupported_on(facts).is_none();
        let preferred = if facts.device_type == wgpu::DeviceType::Cpu {
            KernelFamily::Subgroup8
        } else {
            KernelFamily::Tiled
        };
        if runs(preferred) {
            preferred
        } else {
            KernelFamily::Portable
        }
    }
}

/// A range of subgroup sizes, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubgroupSizes {
    pub min: u32,
    pub max: u32,
}

/// What the choice of kernels depends on about an adapter, as plain data so
/// that the choice is a function of it, testable without a GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFacts {
    pub device_type: wgpu::DeviceType,
    /// Whether the device was created with subgroup operations.
    pub subgroups: bool,
    /// The smallest and largest subgroups the adapter may run.
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// Device limits.
    pub max_invocations_per_workgroup: u32,
    pub max_workgroup_storage: u32,
    /// Whether the device was created with timestamp queries.
    pub timestamps: bool,
}

impl AdapterFacts {
    pub fn of(gpu: &Gpu) -> Self {
        Self {
            device_type: gpu.info.device_type,
            subgroups: gpu.subgroups,
            subgroup_min_size: gpu.info.subgroup_min_size,
            subgroup_max_size: gpu.info.subgroup_max_size,
            max_invocations_per_workgroup: gpu.limits.max_compute_invocations_per_workgroup,
            max_workgroup_storage: gpu.limits.max_compute_workgroup_storage_size,
            timestamps: gpu.timestamps,
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
    use super::{AdapterFacts, KernelFamily, KernelMode};

    /// An adapter of `device_type` whose subgroups hold `min` to `max`
    /// invocations, with wgpu's default limits.
    fn adapter(device_type: wgpu::DeviceType, min: u32, max: u32) -> AdapterFacts {
        AdapterFacts {
            device_type,
            subgroups: true,
            subgroup_min_size: min,
            subgroup_max_size: max,
            max_invocations_per_workgroup: 256,
            max_workgroup_storage: 16384,
            timestamps: true,
        }
    }

    #[test]
    fn subgroup_kernels_run_only_where_every_subgroup_holds_eight_lanes() {
        use wgpu::DeviceType::{Cpu, DiscreteGpu, IntegratedGpu};
        let runs = |facts: AdapterFacts| {
            KernelFamily::supported_on(&facts).contains(&KernelFamily::Subgroup8)
        };
        // llvmpipe at 256-bit vectors (8 lanes) and at 128-bit (4 lanes).
        assert!(runs(adapter(Cpu, 8, 8)));
        assert!(!runs(adapter(Cpu, 4, 4)));
        // NVIDIA, AMD RDNA and GCN, Intel: 8 lanes and more.
        assert!(runs(adapter(DiscreteGpu, 32, 32)));
        assert!(runs(adapter(DiscreteGpu, 32, 64)));
        assert!(runs(adapter(IntegratedGpu, 8, 32)));
        // Apple (wgpu reports 4 to 32) and WARP (4): a workgroup of 8 may
        // span two subgroups.
        assert!(!runs(adapter(IntegratedGpu, 4, 32)));
        let reason = KernelFamily::Subgroup8
            .unsupported_on(&adapter(IntegratedGpu, 4, 32))
            .expect("refused");
        assert!(reason.contains("4 to 32"), "{reason}");
        let without = AdapterFacts {
            subgroups: false,
            ..adapter(DiscreteGpu, 32, 32)
        };
        assert!(!runs(without));
        // Families without subgroup operations do not care.
        for facts in [adapter(Cpu, 4, 4), adapter(IntegratedGpu, 4, 32)] {
            assert!(KernelFamily::supported_on(&facts).contains(&KernelFamily::Tiled));
            assert!(KernelFamily::supported_on(&facts).contains(&KernelFamily::Portable));
        }
    }

    #[test]
    fn the_subgroup_family_is_never_the_default_or_incumbent_off_cpus() {
        use wgpu::DeviceType::{Cpu, DiscreteGpu, IntegratedGpu, Other, VirtualGpu};
        for device_type in [DiscreteGpu, IntegratedGpu, VirtualGpu, Other] {
            for (min, max) in [(4, 4), (8, 8), (8, 32), (32, 32), (32, 64), (64, 64)] {
                let facts = adapter(device_type, min, max);
                assert_eq!(KernelFamily::default_on(&facts), KernelFamily::Tiled);
                let order = KernelFamily::incumbent_first_on(&facts);
                assert_eq!(order[0], KernelFamily::Tiled, "{facts:?}");
            }
            // Without the tiled family's limits the portable one stands in.
            let small = AdapterFacts {
                max_workgroup_storage: 4096,
                ..adapter(device_type, 32, 32)
            };
            assert_eq!(KernelFamily::default_on(&small), KernelFamily::Portable);
        }
        // On a CPU the 8-lane kernels are the default where they are correct.
        assert_eq!(
            KernelFamily::default_on(&adapter(Cpu, 8, 8)),
            KernelFamily::Subgroup8
        );
        assert_eq!(
            KernelFamily::default_on(&adapter(Cpu, 4, 4)),
            KernelFamily::Portable
        );
    }

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
