//! Launcher for `attention.wgsl`: multi-head self-attention over a padded batch.

use super::{Access, DispatchPlan, Kernel};
use crate::gpu::Gpu;

/// Largest head size the kernel's registers hold.
pub const MAX_HEAD_DIM: usize = 64;
const QUERIES_PER_GROUP: u32 = 64;

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
}

impl Attention {
    pub fn new(gpu: &Gpu) -> Self {
        Self {
            kernel: Kernel::new(
                gpu,
                "attention",
                surf_shaders::ATTENTION,
                &[Access::Read, Access::Read, Access::ReadWrite],
            ),
        }
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
        let groups = [
            (seq as u32).div_ceil(QUERIES_PER_GROUP),
            heads as u32,
            batch as u32,
        ];
        plan.push(&self.kernel, &params, &[qkv, mask, out], groups);
    }
}
