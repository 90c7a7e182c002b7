//! Kernel families: sets of matmul, attention and LayerNorm kernels shaped for
//! one kind of adapter. Which family runs a given shape is decided by
//! measuring them on the adapter at hand (`autotune`), or forced with
//! `SURF_KERNELS`.

use crate::dtype::WeightDtype;
use crate::gpu::Gpu;

/// Environment variable that forces one family (`SURF_KERNELS=tiled`) or asks
/// for the measured choice per shape (`auto`, the default).
pub const KERNELS_ENV: &str = "SURF_KERNELS";

/// Invocations in a workgroup of the subgroup kernels (`matmul_subgroups`,
/// `attention_subgroups`): one SIMD vector of a software rasterizer.
pub const SUBGROUP_LANES: u32 = 8;

/// Workgroup memory of the tiled matmul: two 64x16 blocks of f32.
const TILED_WORKGROUP_BYTES: u32 = 8192;
/// Workgroup memory of the blocked matmul at its tallest tile: a 128x16
/// block of A and a 16x64 block of B in f32 (the half family's are f16).
const BLOCKED_WORKGROUP_BYTES: u32 = 12288;

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
    /// The tiled family with a matmul of larger tiles (up to 128x64, 8x4
    /// register blocks, the next K step prefetched into registers, shorter
    /// tiles when m is short); its attention and LayerNorm are the tiled ones.
    Blocked,
    /// The blocked matmul and the tiled attention computing in f16 with f32
    /// accumulators, on adapters with `SHADER_F16`: operands staged in
    /// workgroup memory as f16 (the attention's key blocks hold twice the
    /// keys), products rounded to f16, sums, softmax and outputs in f32. Its
    /// LayerNorm is the tiled one. Measured only for engines whose weights
    /// are f16, whose vectors already stand at the f16 bar.
    Half,
}

impl KernelFamily {
    pub const ALL: [KernelFamily; 5] = [
        KernelFamily::Portable,
        KernelFamily::Subgroup8,
        KernelFamily::Tiled,
        KernelFamily::Blocked,
        KernelFamily::Half,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelFamily::Portable => "portable",
            KernelFamily::Subgroup8 => "subgroup8",
            KernelFamily::Tiled => "tiled",
            KernelFamily::Blocked => "blocked",
            KernelFamily::Half => "half",
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
            KernelFamily::Tiled | KernelFamily::Blocked | KernelFamily::Half => 256,
        }
    }

    /// Whether the family is one of those shaped for GPUs (workgroups of
    /// 256 staging tiles in workgroup memory), whose kernels include the
    /// projection fused with the residual add and norm.
    pub fn shaped_for_gpus(self) -> bool {
        matches!(
            self,
            KernelFamily::Tiled | KernelFamily::Blocked | KernelFamily::Half
        )
    }

    /// Whether the family's matmul stages its operands in workgroup memory.
    pub fn workgroup_memory(self) -> bool {
        match self {
            KernelFamily::Portable
            | KernelFamily::Tiled
            | KernelFamily::Blocked
            | KernelFamily::Half => true,
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
            KernelFamily::Portable
            | KernelFamily::Tiled
            | KernelFamily::Blocked
            | KernelFamily::Half => None,
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
        if self == KernelFamily::Half && !facts.shader_f16 {
            return Some("the adapter has no f16 arithmetic (SHADER_F16)".into());
        }
        // The blocked and half families run the tiled LayerNorm (and the
        // blocked family the tiled attention; the half family's attention
        // takes the tiled one's workgroup memory), so they need what the
        // tiled family needs too.
        let workgroup_bytes = match self {
            KernelFamily::Portable | KernelFamily::Subgroup8 => return None,
            KernelFamily::Tiled | KernelFamily::Half => TILED_WORKGROUP_BYTES,
            KernelFamily::Blocked => BLOCKED_WORKGROUP_BYTES,
        };
        if facts.max_invocations_per_workgroup < 256 {
            return Some(format!(
                "workgroups are limited to {} invocations, under 256",
                facts.max_invocations_per_workgroup
            ));
        }
        if facts.max_workgroup_storage < workgroup_bytes {
            return Some(format!(
                "workgroup memory is limited to {} bytes, under {workgroup_bytes}",
                facts.max_workgroup_storage
            ));
        }
        None
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

    /// The families an adapter with these facts runs that are worth timing
    /// on it: every one it supports, except the 8-lane subgroup kernels off
    /// CPU adapters. Those are shaped for a software rasterizer's SIMD
    /// vector; on an NVIDIA H200 (Vulkan) MiniLM did not finish 512 texts
    /// in 25 s with them against 0.17 s with the tiled family, so timing
    /// them at every start cost over a minute and could never pick them.
    /// `SURF_KERNELS=subgroup8` still forces them where they are correct.
    pub fn measured_on(facts: &AdapterFacts) -> Vec<KernelFamily> {
        Self::supported_on(facts)
            .into_iter()
            .filter(|&family| {
                family != KernelFamily::Subgroup8 || facts.device_type == wgpu::DeviceType::Cpu
            })
            .collect()
    }

    /// [`KernelFamily::measured_on`] for `gpu`.
    pub fn measured(gpu: &Gpu) -> Vec<KernelFamily> {
        Self::measured_on(&AdapterFacts::of(gpu))
    }

    /// The families measured on `gpu` for weights stored as `dtype`, the one
    /// to beat first: measuring drops a family whose first launch already
    /// loses to the incumbent's whole run.
    pub fn incumbent_first(gpu: &Gpu, dtype: WeightDtype) -> Vec<KernelFamily> {
        Self::incumbent_first_on(&AdapterFacts::of(gpu), dtype)
    }

    /// `incumbent_first` for an adapter with these facts. The half family
    /// is measured only for f16 weights: f32 weights ask for f32 precision,
    /// which f16 arithmetic would give up whenever it measured faster. The
    /// subgroup8 family is measured only on CPU adapters (see
    /// [`KernelFamily::measured_on`]).
    pub fn incumbent_first_on(facts: &AdapterFacts, dtype: WeightDtype) -> Vec<KernelFamily> {
        let incumbent = Self::default_on(facts);
        std::iter::once(incumbent)
            .chain(Self::measured_on(facts).into_iter().filter(|&family| {
                family != incumbent && (family != KernelFamily::Half || dtype == WeightDtype::F16)
            }))
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
    /// Whether the device was created with f16 arithmetic (`SHADER_F16`).
    pub shader_f16: bool,
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
            shader_f16: gpu.shader_f16,
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
    use crate::dtype::WeightDtype;

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
            shader_f16: true,
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
    fn the_subgroup_family_is_never_the_default_incumbent_or_measured_off_cpus() {
        use wgpu::DeviceType::{Cpu, DiscreteGpu, IntegratedGpu, Other, VirtualGpu};
        for device_type in [DiscreteGpu, IntegratedGpu, VirtualGpu, Other] {
            for (min, max) in [(4, 4), (8, 8), (8, 32), (32, 32), (32, 64), (64, 64)] {
                let facts = adapter(device_type, min, max);
                assert_eq!(KernelFamily::default_on(&facts), KernelFamily::Tiled);
                for dtype in [WeightDtype::F32, WeightDtype::F16] {
                    let order = KernelFamily::incumbent_first_on(&facts, dtype);
                    assert_eq!(order[0], KernelFamily::Tiled, "{facts:?}");
                    assert!(!order[1..].contains(&KernelFamily::Tiled));
                    assert!(!order.contains(&KernelFamily::Subgroup8), "{facts:?}");
                }
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
    fn the_larger_and_half_families_are_challengers_where_the_adapter_allows() {
        use KernelFamily::{Blocked, Half, Portable, Subgroup8, Tiled};
        use wgpu::DeviceType::{Cpu, DiscreteGpu};
        let gpu = adapter(DiscreteGpu, 32, 32);
        // f16 arithmetic only for f16 weights, and never the incumbent.
        assert_eq!(
            KernelFamily::incumbent_first_on(&gpu, WeightDtype::F16),
            [Tiled, Portable, Blocked, Half]
        );
        assert_eq!(
            KernelFamily::incumbent_first_on(&gpu, WeightDtype::F32),
            [Tiled, Portable, Blocked]
        );
        // Supported there all the same, for a forced choice.
        assert!(KernelFamily::supported_on(&gpu).contains(&Subgroup8));
        // llvmpipe at 256-bit vectors: the subgroup kernels first.
        assert_eq!(
            KernelFamily::incumbent_first_on(&adapter(Cpu, 8, 8), WeightDtype::F16)[0],
            Subgroup8
        );
        // Without SHADER_F16 there is no half family.
        let no_f16 = AdapterFacts {
            shader_f16: false,
            ..gpu.clone()
        };
        let reason = Half.unsupported_on(&no_f16).expect("refused");
        assert!(reason.contains("SHADER_F16"), "{reason}");
        assert!(Blocked.unsupported_on(&no_f16).is_none());
        // The blocked tiles need 12 KiB of workgroup memory; wgpu's default
        // 16 KiB holds them, 8 KiB holds only the tiled ones.
        let small = AdapterFacts {
            max_workgroup_storage: 8192,
            ..gpu.clone()
        };
        assert!(Tiled.unsupported_on(&small).is_none());
        assert!(Half.unsupported_on(&small).is_none());
        let reason = Blocked.unsupported_on(&small).expect("refused");
        assert!(reason.contains("under 12288"), "{reason}");
        let narrow = AdapterFacts {
            max_invocations_per_workgroup: 128,
            ..gpu
        };
        for family in [Tiled, Blocked, Half] {
            assert!(family.unsupported_on(&narrow).is_some(), "{family}");
        }
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
