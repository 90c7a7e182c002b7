//! Launcher for multi-head self-attention over a padded batch.
//!
//! One kernel per family computes the same thing. The generated
//! `attention_subgroups` kernels (subgroup8; heads of 32 and 64, subgroups of
//! at least 8 invocations) share keys and probabilities across a subgroup and
//! are several times faster on software rasterizers. `attention.wgsl` is the
//! portable kernel for any head size, and, specialized to a fixed head size
//! with a larger key block, the tiled family's. Head sizes a family has no
//! kernel for run the portable one.

use super::family::KernelFamily;
use super::{Access, DispatchPlan, Kernel, LazyKernel, subgroup_kernels};
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
    has_position_bias: u32,
    scale: f32,
    _pad1: [u32; 3],
}

/// What a family adds to plain scaled dot-product attention.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOptions<'a> {
    /// Multiplies the queries: `1 / sqrt(head_dim)` for most families, 1 for T5.
    pub scale: f32,
    /// `[heads, 2 * seq - 1]` additive biases by relative position (key -
    /// query + seq - 1), shared by every layer of MPNet and T5.
    pub position_bias: Option<&'a wgpu::Buffer>,
}

impl AttentionOptions<'_> {
    pub fn scaled(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f32).sqrt(),
            position_bias: None,
        }
    }
}

/// Head sizes with a kernel of the tiled family.
pub const TILED_HEAD_DIMS: [usize; 2] = [32, 64];
/// Head sizes with a kernel of the subgroup8 family.
pub const SUBGROUP_HEAD_DIMS: [usize; 2] = [32, 64];

/// Keys per block of the tiled kernel: 4 KiB of keys and 4 KiB of values in
/// workgroup memory whatever the head size, within the 16 KiB every adapter
/// offers, and at most one key per query lane (the mask load needs it).
fn tiled_key_block(head_dim: usize) -> u32 {
    (1024 / head_dim as u32).min(QUERIES_PER_GROUP)
}

/// The tiled family's attention for heads of `head_dim`: the portable
/// kernel specialized to that head size.
pub fn tiled_source(head_dim: usize) -> String {
    let dim4 = head_dim as u32 / 4;
    surf_shaders::specialize(
        surf_shaders::ATTENTION,
        &[
            ("KEY_BLOCK", tiled_key_block(head_dim)),
            ("MAX_DIM4", dim4),
            ("HEAD_DIM4", dim4),
        ],
    )
}

pub struct Attention {
    kernel: LazyKernel,
    /// `(head_dim, kernel)` of the subgroup kernels this adapter can run.
    subgroups: Vec<(usize, LazyKernel)>,
    /// `(head_dim, kernel)` of the tiled family's kernels.
    tiled: Vec<(usize, LazyKernel)>,
}

impl Attention {
    pub fn new(gpu: &Gpu) -> Self {
        let storage = [Access::Read, Access::Read, Access::ReadWrite, Access::Read];
        let subgroups = subgroup_kernels(
            gpu,
            "attention_subgroups",
            &surf_shaders::ATTENTION_SUBGROUPS,
            &storage,
        )
        .into_iter()
        .map(|(head_dim, kernel)| (head_dim as usize, kernel))
        .collect();
        let tiled = TILED_HEAD_DIMS
            .into_iter()
            .filter(|_| KernelFamily::Tiled.unsupported_reason(gpu).is_none())
            .map(|head_dim| {
                let source = tiled_source(head_dim);
                let kernel = LazyKernel::new(gpu, "attention_tiled", &source, &storage);
                (head_dim, kernel)
            })
            .collect();
        Self {
            kernel: LazyKernel::new(gpu, "attention", surf_shaders::ATTENTION, &storage),
            subgroups,
            tiled,
        }
    }

    /// Whether `push` runs a subgroup kernel for heads of `head_dim`.
    pub fn uses_subgroups(&self, head_dim: usize) -> bool {
        self.subgroup_kernel(head_dim).is_some()
    }

    fn subgroup_kernel(&self, head_dim: usize) -> Option<&LazyKernel> {
        self.subgroups
            .iter()
            .find_map(|(dim, kernel)| (*dim == head_dim).then_some(kernel))
    }

    /// `family`'s kernel for heads of `head_dim`, or the portable one, and
    /// its workgroups.
    fn pick(
        &self,
        family: KernelFamily,
        seq: usize,
        heads: usize,
        batch: usize,
        head_dim: usize,
    ) -> (&Kernel, [u32; 3]) {
        fn of_head(kernels: &[(usize, LazyKernel)], head_dim: usize) -> Option<&Kernel> {
            kernels
                .iter()
                .find_map(|(dim, kernel)| (*dim == head_dim).then(|| kernel.get()))
        }
        let (kernel, queries) = match family {
            KernelFamily::Subgroup8 => match self.subgroup_kernel(head_dim) {
                Some(kernel) => (kernel.get(), SUBGROUP_QUERIES),
                None => (self.kernel.get(), QUERIES_PER_GROUP),
            },
            // The blocked and half families run the tiled attention.
            KernelFamily::Tiled | KernelFamily::Blocked | KernelFamily::Half => (
                of_head(&self.tiled, head_dim).unwrap_or(self.kernel.get()),
                QUERIES_PER_GROUP,
            ),
            KernelFamily::Portable => (self.kernel.get(), QUERIES_PER_GROUP),
        };
        let groups = [(seq as u32).div_ceil(queries), heads as u32, batch as u32];
        (kernel, groups)
    }

    /// `qkv` is [batch * seq, 3 * hidden]; `mask` is [batch * seq]; `out` is
    /// [batch * seq, hidden]. Runs the subgroup kernel where there is one,
    /// as every batch did before families were measured.
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
        self.push_family(
            KernelFamily::Subgroup8,
            plan,
            batch,
            seq,
            heads,
            head_dim,
            qkv,
            mask,
            out,
        );
    }

    /// Like `push`, with `family`'s kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn push_family(
        &self,
        family: KernelFamily,
        plan: &mut DispatchPlan,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        qkv: &wgpu::Buffer,
        mask: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        self.push_with(
            family,
            plan,
            batch,
            seq,
            heads,
            head_dim,
            AttentionOptions::scaled(head_dim),
            qkv,
            mask,
            out,
        );
    }

    /// Like `push_family`, with a family's scale and relative position bias.
    #[allow(clippy::too_many_arguments)]
    pub fn push_with(
        &self,
        family: KernelFamily,
        plan: &mut DispatchPlan,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        options: AttentionOptions<'_>,
        qkv: &wgpu::Buffer,
        mask: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        let params = AttentionParams {
            seq: seq as u32,
            hidden: (heads * head_dim) as u32,
            head_dim: head_dim as u32,
            has_position_bias: options.position_bias.is_some() as u32,
            scale: options.scale,
            _pad1: [0; 3],
        };
        let (kernel, groups) = self.pick(family, seq, heads, batch, head_dim);
        // Without a bias table the kernel never reads binding 4; the mask,
        // read-only like it, stands in.
        let position_bias = options.position_bias.unwrap_or(mask);
        plan.push(kernel, &params, &[qkv, mask, out, position_bias], groups);
    }
}
