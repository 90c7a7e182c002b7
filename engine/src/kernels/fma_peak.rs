//! Launcher for `fma_peak.wgsl`, which measures the adapter's FMA throughput.

use super::{Access, DispatchPlan, Kernel};
use crate::gpu::Gpu;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct FmaParams {
    iterations: u32,
    _pad: [u32; 3],
}

pub struct FmaPeak {
    kernel: Kernel,
    out: wgpu::Buffer,
    invocations: u32,
}

/// Each loop iteration does 8 vec4 FMAs: 64 floating-point operations.
const FLOPS_PER_ITERATION: u64 = 8 * 4 * 2;

impl FmaPeak {
    pub fn new(gpu: &Gpu, invocations: u32) -> Self {
        let invocations = invocations.next_multiple_of(64);
        Self {
            kernel: Kernel::new(
                gpu,
                "fma_peak",
                surf_shaders::FMA_PEAK,
                &[Access::ReadWrite],
            ),
            out: gpu.storage_buffer("fma_peak", u64::from(invocations) * 16),
            invocations,
        }
    }

    /// Records one launch and returns how many floating-point operations it does.
    pub fn push(&self, plan: &mut DispatchPlan, iterations: u32) -> u64 {
        let params = FmaParams {
            iterations,
            _pad: [0; 3],
        };
        plan.push(
            &self.kernel,
            &params,
            &[&self.out],
            [self.invocations / 64, 1, 1],
        );
        u64::from(self.invocations) * u64::from(iterations) * FLOPS_PER_ITERATION
    }
}
