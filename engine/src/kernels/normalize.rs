//! Launcher for `normalize.wgsl`: rows scaled to unit L2 length, in place.

use super::{Access, DispatchPlan, Kernel};
use crate::gpu::Gpu;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormalizeParams {
    rows: u32,
    cols: u32,
    _pad: [u32; 2],
}

pub struct Normalize {
    kernel: Kernel,
}

impl Normalize {
    pub fn new(gpu: &Gpu) -> Self {
        Self {
            kernel: Kernel::new(
                gpu,
                "normalize",
                surf_shaders::NORMALIZE,
                &[Access::ReadWrite],
            ),
        }
    }

    pub fn push(&self, plan: &mut DispatchPlan, rows: usize, cols: usize, x: &wgpu::Buffer) {
        let params = NormalizeParams {
            rows: rows as u32,
            cols: cols as u32,
            _pad: [0; 2],
        };
        plan.push(&self.kernel, &params, &[x], [rows as u32, 1, 1]);
    }
}
