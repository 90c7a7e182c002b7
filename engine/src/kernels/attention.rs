//! Launcher for multi-head self-attention over a padded batch.
//!
//! One kernel per family computes the same thing. The generated
//! `attention_subgroups` kernels (subgroup8; heads of 32 to 256, subgroups of
//! at least 8 invocations) share keys and probabilities across a subgroup and
//! are several times faster on software rasterizers. `attention.wgsl` is the
//! portable kernel for any head size, and, specialized to a fixed head size,
//! the tiled family's; made to hold and multiply keys, values and queries in
//! f16 (`surf_shaders::half_arithmetic`), with twice the keys per block, the
//! half family's. Head sizes a family has no kernel for run the portable one.

use super::family::KernelFamily;
use super::{Access, DispatchPlan, Kernel, LazyKernel, subgroup_kernels};
use crate::gpu::Gpu;

/// Largest head size the kernels take.
pub const MAX_HEAD_DIM: usize = 256;
const QUERIES_PER_GROUP: u32 = 64;
/// Queries per workgroup of the subgroup kernels, which are one 8-lane subgroup.
const SUBGROUP_QUERIES: u32 = 8;

/// Additive mask value for padding: exp of it underflows to exactly zero.
pub const MASKED: f32 = -3.0e38;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttentionParams {
    seq: u32,
    head_dim: u32,
    has_position_bias: u32,
    scale: f32,
    row_stride: u32,
    key_offset: u32,
    value_offset: u32,
    out_stride: u32,
    kv_group: u32,
    window_before: u32,
    window_after: u32,
    _pad: u32,
}

/// The keys a query sees: at most `before` positions before it and `after`
/// after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub before: u32,
    pub after: u32,
}

impl Window {
    /// Every key: encoders.
    pub const FULL: Window = Window {
        before: u32::MAX,
        after: u32::MAX,
    };
    /// The query and the keys before it: decoders.
    pub const CAUSAL: Window = Window {
        before: u32::MAX,
        after: 0,
    };

    /// A causal window of `size` keys ending at the query (Mistral's
    /// `sliding_window`: key j is seen from query i when i - j < size).
    pub fn causal_sliding(size: usize) -> Self {
        Window {
            before: (size.max(1) - 1).min(u32::MAX as usize) as u32,
            after: 0,
        }
    }

    /// A band of `radius` keys on each side (ModernBERT's local layers,
    /// `local_attention / 2`).
    pub fn band(radius: usize) -> Self {
        let radius = radius.min(u32::MAX as usize) as u32;
        Window {
            before: radius,
            after: radius,
        }
    }

    /// Whether `query` sees `key`.
    pub fn sees(&self, query: usize, key: usize) -> bool {
        if key < query {
            query - key <= self.before as usize
        } else {
            key - query <= self.after as usize
        }
    }
}

/// Where a batch's queries, keys and values are: each row of the qkv buffer
/// holds `heads` query heads, then `kv_heads` key heads, then `kv_heads`
/// value heads, each `head_dim` wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl HeadLayout {
    /// As many key/value heads as query heads.
    pub fn multi_head(heads: usize, head_dim: usize) -> Self {
        Self {
            heads,
            kv_heads: heads,
            head_dim,
        }
    }

    /// Elements of one qkv row.
    pub fn row_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Elements of one output row.
    pub fn query_width(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn key_offset(&self) -> usize {
        self.query_width()
    }

    pub fn value_offset(&self) -> usize {
        (self.heads + self.kv_heads) * self.head_dim
    }
}

/// What a family adds to plain scaled dot-product attention.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOptions<'a> {
    /// Multiplies the queries: `1 / sqrt(head_dim)` for most families, 1 for T5.
    pub scale: f32,
    /// `[heads, 2 * seq - 1]` additive biases by relative position (key -
    /// query + seq - 1), shared by every layer of MPNet and T5.
    pub position_bias: Option<&'a wgpu::Buffer>,
    pub window: Window,
}

impl AttentionOptions<'_> {
    pub fn scaled(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f32).sqrt(),
            position_bias: None,
            window: Window::FULL,
        }
    }
}

/// Head sizes with a kernel of the tiled family, and of the half family.
pub const TILED_HEAD_DIMS: [usize; 4] = [32, 64, 128, 256];
/// Head sizes with a kernel of the subgroup8 family.
pub const SUBGROUP_HEAD_DIMS: [usize; 4] = [32, 64, 128, 256];
/// The portable kernel's variants: each takes any head size up to its own.
pub const PORTABLE_MAX_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Keys per block for keys and values of `element_bytes` each: 4 KiB of
/// keys and 4 KiB of values in workgroup memory whatever the head size,
/// within the 16 KiB every adapter offers and leaving room for several
/// workgroups per compute unit, and at most one key per query lane (the
/// mask load needs it). f16 blocks hold twice the keys in the same memory,
/// which halves the barriers per query.
fn key_block(head_dim: usize, element_bytes: usize) -> u32 {
    (4096 / (head_dim * element_bytes) as u32).min(QUERIES_PER_GROUP)
}

/// The portable kernel for heads of up to `max_head_dim`, read from the
/// parameters.
pub fn portable_source(max_head_dim: usize) -> String {
    surf_shaders::specialize(
        surf_shaders::ATTENTION,
        &[
            ("KEY_BLOCK", key_block(max_head_dim, 4)),
            ("MAX_DIM4", max_head_dim as u32 / 4),
        ],
    )
}

/// The tiled family's attention for heads of `head_dim`: the portable
/// kernel specialized to that head size.
pub fn tiled_source(head_dim: usize) -> String {
    fixed_head_source(head_dim, 4)
}

/// The half family's attention for heads of `head_dim`: the tiled kernel
/// holding and multiplying keys, values and queries in f16, with f32
/// scores, softmax and accumulators. Needs `SHADER_F16`.
pub fn half_source(head_dim: usize) -> String {
    surf_shaders::half_arithmetic(&fixed_head_source(head_dim, 2))
}

/// `attention.wgsl` specialized to heads of `head_dim`, with a key block
/// for keys and values of `element_bytes` each.
fn fixed_head_source(head_dim: usize, element_bytes: usize) -> String {
    let dim4 = head_dim as u32 / 4;
    surf_shaders::specialize(
        surf_shaders::ATTENTION,
        &[
            ("KEY_BLOCK", key_block(head_dim, element_bytes)),
            ("MAX_DIM4", dim4),
            ("HEAD_DIM4", dim4),
        ],
    )
}

pub struct Attention {
    /// `(max_head_dim, kernel)` of the portable kernels, smallest first.
    portable: Vec<(usize, LazyKernel)>,
    /// `(head_dim, kernel)` of the subgroup kernels this adapter can run.
    subgroups: Vec<(usize, LazyKernel)>,
    /// `(head_dim, kernel)` of the tiled family's kernels.
    tiled: Vec<(usize, LazyKernel)>,
    /// `(head_dim, kernel)` of the half family's kernels, where the adapter
    /// has f16 arithmetic.
    half: Vec<(usize, LazyKernel)>,
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
        let fixed_head =
            |family: KernelFamily, label: &'static str, source: fn(usize) -> String| {
                TILED_HEAD_DIMS
                    .into_iter()
                    .filter(|_| family.unsupported_reason(gpu).is_none())
                    .map(|head_dim| {
                        let kernel = LazyKernel::new(gpu, label, &source(head_dim), &storage);
                        (head_dim, kernel)
                    })
                    .collect::<Vec<_>>()
            };
        let tiled = fixed_head(KernelFamily::Tiled, "attention_tiled", tiled_source);
        let half = fixed_head(KernelFamily::Half, "attention_half", half_source);
        let portable = PORTABLE_MAX_HEAD_DIMS
            .into_iter()
            .map(|max| {
                let source = portable_source(max);
                (max, LazyKernel::new(gpu, "attention", &source, &storage))
            })
            .collect();
        Self {
            portable,
            subgroups,
            tiled,
            half,
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
        let portable = self
            .portable
            .iter()
            .find_map(|(max, kernel)| (*max >= head_dim).then(|| kernel.get()))
            .unwrap_or_else(|| unreachable!("model configs refuse heads over {MAX_HEAD_DIM}"));
        let (kernel, queries) = match family {
            KernelFamily::Subgroup8 => match self.subgroup_kernel(head_dim) {
                Some(kernel) => (kernel.get(), SUBGROUP_QUERIES),
                None => (portable, QUERIES_PER_GROUP),
            },
            // The blocked family runs the tiled attention.
            KernelFamily::Tiled | KernelFamily::Blocked => (
                of_head(&self.tiled, head_dim).unwrap_or(portable),
                QUERIES_PER_GROUP,
            ),
            KernelFamily::Half => (
                of_head(&self.half, head_dim).unwrap_or(portable),
                QUERIES_PER_GROUP,
            ),
            KernelFamily::Portable => (portable, QUERIES_PER_GROUP),
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
            HeadLayout::multi_head(heads, head_dim),
            AttentionOptions::scaled(head_dim),
            qkv,
            mask,
            out,
        );
    }

    /// Like `push_family`, for heads laid out as `layout` (grouped-query
    /// models share key/value heads), with a family's scale, relative
    /// position bias and window.
    #[allow(clippy::too_many_arguments)]
    pub fn push_with(
        &self,
        family: KernelFamily,
        plan: &mut DispatchPlan,
        batch: usize,
        seq: usize,
        layout: HeadLayout,
        options: AttentionOptions<'_>,
        qkv: &wgpu::Buffer,
        mask: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        let params = AttentionParams {
            seq: seq as u32,
            head_dim: layout.head_dim as u32,
            has_position_bias: options.position_bias.is_some() as u32,
            scale: options.scale,
            row_stride: layout.row_width() as u32,
            key_offset: layout.key_offset() as u32,
            value_offset: layout.value_offset() as u32,
            out_stride: layout.query_width() as u32,
            kv_group: (layout.heads / layout.kv_heads.max(1)).max(1) as u32,
            window_before: options.window.before,
            window_after: options.window.after,
            _pad: 0,
        };
        let (kernel, groups) = self.pick(family, seq, layout.heads, batch, layout.head_dim);
        // Without a bias table the kernel never reads binding 4; the mask,
        // read-only like it, stands in.
        let position_bias = options.position_bias.unwrap_or(mask);
        plan.push(kernel, &params, &[qkv, mask, out, position_bias], groups);
    }
}

#[cfg(test)]
mod tests {
    use super::Window;

    #[test]
    fn windows_follow_each_family_definition() {
        // Mistral: key j is seen from query i when 0 <= i - j < size.
        let sliding = Window::causal_sliding(4);
        let seen: Vec<usize> = (0..10).filter(|&key| sliding.sees(6, key)).collect();
        assert_eq!(seen, [3, 4, 5, 6]);
        // ModernBERT: |i - j| <= local_attention / 2.
        let band = Window::band(2);
        let seen: Vec<usize> = (0..10).filter(|&key| band.sees(6, key)).collect();
        assert_eq!(seen, [4, 5, 6, 7, 8]);
        let seen: Vec<usize> = (0..10).filter(|&key| Window::CAUSAL.sees(3, key)).collect();
        assert_eq!(seen, [0, 1, 2, 3]);
        assert!((0..10).all(|key| Window::FULL.sees(3, key)));
    }
}
