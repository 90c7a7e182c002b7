//! Launcher for `matmul.wgsl`: C = act(A B + bias).

use super::{Access, DispatchPlan, Kernel};
use crate::config::Activation;
use crate::gpu::Gpu;

pub const TILE_M: u32 = 128;
pub const TILE_N: u32 = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub activation: u32,
    pub a_offset: u32,
    pub b_offset: u32,
    pub bias_offset: u32,
    pub c_offset: u32,
}

/// Fused epilogue of a matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    Bias,
    BiasThen(Activation),
}

impl Epilogue {
    fn code(self) -> u32 {
        match self {
            Epilogue::Bias => 0,
            Epilogue::BiasThen(Activation::GeluErf) => 1,
            Epilogue::BiasThen(Activation::GeluTanh) => 2,
            Epilogue::BiasThen(Activation::Relu) => 3,
        }
    }
}

/// Where the operands of one matmul live: `lhs` holds A, `weights` holds B
/// ([k, n], row-major) and the bias; offsets are in f32 elements.
pub struct MatmulOperands<'a> {
    pub lhs: &'a wgpu::Buffer,
    pub a_offset: u32,
    pub weights: &'a wgpu::Buffer,
    pub b_offset: u32,
    pub bias_offset: u32,
    pub out: &'a wgpu::Buffer,
    pub c_offset: u32,
}

pub struct Matmul {
    kernel: Kernel,
}

impl Matmul {
    pub fn new(gpu: &Gpu) -> Self {
        Self {
            kernel: Kernel::new(
                gpu,
                "matmul",
                surf_shaders::MATMUL,
                &[Access::Read, Access::Read, Access::ReadWrite],
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        plan: &mut DispatchPlan,
        m: usize,
        n: usize,
        k: usize,
        epilogue: Epilogue,
        operands: MatmulOperands<'_>,
    ) {
        let params = MatmulParams {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            activation: epilogue.code(),
            a_offset: operands.a_offset,
            b_offset: operands.b_offset,
            bias_offset: operands.bias_offset,
            c_offset: operands.c_offset,
        };
        let groups = [
            (n as u32).div_ceil(TILE_N),
            (m as u32).div_ceil(TILE_M),
            1,
        ];
        plan.push(
            &self.kernel,
            &params,
            &[operands.lhs, operands.weights, operands.out],
            groups,
        );
    }
}
