//! Launcher for `gate.wgsl`: the gated feed-forward's `act(gate) * up`.

use super::{Access, DispatchPlan, Kernel, grid_2d};
use crate::config::Activation;
use crate::gpu::Gpu;

/// The matmul's parameter block, which the kernel shares with it.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GateParams {
    rows: u32,
    width: u32,
    _k: u32,
    activation: u32,
    row_stride: u32,
    _pad: [u32; 3],
}

pub struct Gate {
    kernel: Kernel,
}

const THREADS: u32 = 256;

impl Gate {
    pub fn new(gpu: &Gpu) -> Self {
        Self {
            kernel: Kernel::new(
                gpu,
                "gate",
                surf_shaders::GATE,
                &[Access::Read, Access::ReadWrite],
            ),
        }
    }

    /// `x` is [rows, 2 * width] (gate projection, then up projection);
    /// `out` is [rows, width].
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        gpu: &Gpu,
        plan: &mut DispatchPlan,
        rows: usize,
        width: usize,
        activation: Activation,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        let total = (rows * width) as u32;
        let (grid, groups_x) = grid_2d(gpu, total.div_ceil(THREADS));
        let params = GateParams {
            rows: rows as u32,
            width: width as u32,
            _k: 0,
            activation: activation.code(),
            row_stride: groups_x * THREADS,
            _pad: [0; 3],
        };
        plan.push(&self.kernel, &params, &[x, out], grid);
    }
}
