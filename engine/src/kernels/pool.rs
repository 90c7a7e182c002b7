//! Launcher for `pool.wgsl`: token vectors to one vector per sequence.

use super::{Access, DispatchPlan, Kernel};
use crate::config::Pooling;
use crate::gpu::Gpu;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PoolParams {
    seq: u32,
    hidden: u32,
    mode: u32,
    normalize: u32,
}

pub struct Pool {
    kernel: Kernel,
}

impl Pool {
    pub fn new(gpu: &Gpu) -> Self {
        Self {
            kernel: Kernel::new(
                gpu,
                "pool",
                surf_shaders::POOL,
                &[Access::Read, Access::Read, Access::ReadWrite],
            ),
        }
    }

    /// `x` is [batch * seq, hidden]; `lengths` holds each sequence's real token
    /// count; `out` is [batch, hidden].
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        plan: &mut DispatchPlan,
        batch: usize,
        seq: usize,
        hidden: usize,
        pooling: Pooling,
        x: &wgpu::Buffer,
        lengths: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        self.push_with(plan, batch, seq, hidden, pooling, false, x, lengths, out);
    }

    /// Like `push`, then scaling each vector to unit L2 length in the same
    /// launch (what `Normalize` does in a launch of its own).
    #[allow(clippy::too_many_arguments)]
    pub fn push_normalized(
        &self,
        plan: &mut DispatchPlan,
        batch: usize,
        seq: usize,
        hidden: usize,
        pooling: Pooling,
        x: &wgpu::Buffer,
        lengths: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        self.push_with(plan, batch, seq, hidden, pooling, true, x, lengths, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn push_with(
        &self,
        plan: &mut DispatchPlan,
        batch: usize,
        seq: usize,
        hidden: usize,
        pooling: Pooling,
        normalize: bool,
        x: &wgpu::Buffer,
        lengths: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        let params = PoolParams {
            seq: seq as u32,
            hidden: hidden as u32,
            mode: pooling.code(),
            normalize: normalize as u32,
        };
        plan.push(
            &self.kernel,
            &params,
            &[x, lengths, out],
            [batch as u32, 1, 1],
        );
    }
}
