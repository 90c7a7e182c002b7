//! Launcher for multi-head self-attention over a padded batch.
//!
//! Two pipelines compute the same thing. The generated `attention_subgroups`
//! kernels (heads of 32 and 64, subgroups of at least 8 invocations) share
//! keys and probabilities across a subgroup and are several times faster on
//! software rasterizers; `attention.wgsl` runs every other head size, and on
//! adapters without subgroups.

use super::{Access, DispatchPlan, Kernel, subgroup_kernels};
use crate::gpu::Gpu;

/// Largest head size the kernel's registers hold.
pub const MAX_HEAD_DIM: usize = 64;
const QUERIES_PER_GROUP: u32 = 64;
/// Queries per workgroup of the subgroup kernels, which are one 8-lane subgroup.
const SUBGROUP_QUERIES: u32 = 8;

/// Additive mask value for padding: exp of it underflows to exactly zero.
pub const MASKED: f32 = -3.0e38;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttentionParams {
    seq: u32,
    hidden: u32,
    head_dim: u32,
    _pad0: u32,
    scale: f32,
    _pad1: [u32; 3],
}

pub struct Attention {
    kernel: Kernel,
    /// `(head_dim, kernel)` of the subgroup kernels this adapter can run.
    subgroups: Vec<(usize, Kernel)>,
}

impl Attention {
    pub fn new(gpu: &Gpu) -> Self {
        let storage = [Access::Read, Access::Read, Access::ReadWrite];
        let subgroups = subgroup_kernels(
            gpu,
            "attention_subgroups",
            &surf_shaders::ATTENTION_SUBGROUPS,
            &storage,
        )
        .into_iter()
        .map(|(head_dim, kernel)| (head_dim as usize, kernel))
        .collect();
        Self {
            kernel: Kernel::new(gpu, "attention", surf_shaders::ATTENTION, &storage),
            subgroups,
        }
    }

    /// Whether `push` runs a subgroup kernel for heads of `head_dim`.
    pub fn uses_subgroups(&self, head_dim: usize) -> bool {
        self.subgroup_kernel(head_dim).is_some()
    }

    fn subgroup_kernel(&self, head_dim: usize) -> Option<&Kernel> {
        self.subgroups
            .iter()
            .find_map(|(dim, kernel)| (*dim == head_dim).then_some(kernel))
    }

    /// The kernel that runs heads of `head_dim`, and its workgroups.
    fn pick(&self, seq: usize, heads: usize, batch: usize, head_dim: usize) -> (&Kernel, [u32; 3]) {
        let (kernel, queries) = match self.subgroup_kernel(head_dim) {
            Some(kernel) => (kernel, SUBGROUP_QUERIES),
            None => (&self.kernel, QUERIES_PER_GROUP),
        };
        let groups = [(seq as u32).div_ceil(queries), heads as u32, batch as u32];
        (kernel, groups)
    }

    /// `qkv` is [batch * seq, 3 * hidden]; `mask` is [batch * seq]; `out` is
    /// [batch * seq, hidden].
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        plan: &mut DispatchPlan,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        qkv: &wgpu::Buffer,
        mask: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        let params = AttentionParams {
            seq: seq as u32,
            hidden: (heads * head_dim) as u32,
            head_dim: head_dim as u32,
            _pad0: 0,
            scale: 1.0 / (head_dim as f32).sqrt(),
            _pad1: [0; 3],
        };
        let (kernel, groups) = self.pick(seq, heads, batch, head_dim);
        plan.push(kernel, &params, &[qkv, mask, out], groups);
    }
}
