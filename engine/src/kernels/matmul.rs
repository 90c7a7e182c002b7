//! Launcher for the matmul kernels: C = act(A B + bias).
//!
//! Two pipelines compute the same thing. `matmul_subgroups.wgsl` is the fast
//! one: it needs subgroups of at least 8 invocations and vec4-aligned operands
//! (k, n and every offset multiples of 4), which every BERT layer satisfies.
//! `matmul.wgsl` takes any shape and offset and needs no optional feature.

use super::{Access, DispatchPlan, Kernel};
use crate::config::Activation;
use crate::gpu::Gpu;

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

/// One of the matmul pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulVariant {
    /// Any shape and offsets, no optional feature: `matmul.wgsl`.
    General,
    /// vec4 loads and subgroup broadcasts: `matmul_subgroups.wgsl`.
    Subgroups,
}

impl MatmulVariant {
    /// Rows and columns of C that one workgroup computes.
    fn tile(self) -> (u32, u32) {
        match self {
            MatmulVariant::General => (128, 64),
            MatmulVariant::Subgroups => (128, 64),
        }
    }
}

/// The subgroup kernel runs one workgroup as one subgroup of this many lanes.
const SUBGROUP_LANES: u32 = 8;

pub struct Matmul {
    general: Kernel,
    subgroups: Option<Kernel>,
}

impl Matmul {
    pub fn new(gpu: &Gpu) -> Self {
        let storage = [Access::Read, Access::Read, Access::ReadWrite];
        // A workgroup of 8 must sit in one subgroup for the broadcasts to see
        // every lane, so smaller subgroups rule the fast kernel out.
        let subgroups =
            (gpu.subgroups && gpu.info.subgroup_min_size >= SUBGROUP_LANES).then(|| {
                Kernel::new(
                    gpu,
                    "matmul_subgroups",
                    surf_shaders::MATMUL_SUBGROUPS,
                    &storage,
                )
            });
        Self {
            general: Kernel::new(gpu, "matmul", surf_shaders::MATMUL, &storage),
            subgroups,
        }
    }

    /// The variants this device can run.
    pub fn variants(&self) -> Vec<MatmulVariant> {
        let mut variants = vec![MatmulVariant::General];
        if self.subgroups.is_some() {
            variants.push(MatmulVariant::Subgroups);
        }
        variants
    }

    /// The fastest variant that can run this multiply.
    pub fn choose(&self, n: usize, k: usize, operands: &MatmulOperands<'_>) -> MatmulVariant {
        let offsets = [
            operands.a_offset,
            operands.b_offset,
            operands.bias_offset,
            operands.c_offset,
        ];
        let aligned = n.is_multiple_of(4)
            && k.is_multiple_of(4)
            && offsets.iter().all(|offset| offset.is_multiple_of(4));
        if aligned && self.subgroups.is_some() {
            MatmulVariant::Subgroups
        } else {
            MatmulVariant::General
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
        let variant = self.choose(n, k, &operands);
        self.push_variant(variant, plan, m, n, k, epilogue, operands);
    }

    /// Like `push` with a chosen variant, for tests and benches that compare
    /// them. Panics if the device or the operands do not allow `variant`.
    #[allow(clippy::too_many_arguments)]
    pub fn push_variant(
        &self,
        variant: MatmulVariant,
        plan: &mut DispatchPlan,
        m: usize,
        n: usize,
        k: usize,
        epilogue: Epilogue,
        operands: MatmulOperands<'_>,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let kernel = match variant {
            MatmulVariant::General => &self.general,
            MatmulVariant::Subgroups => {
                assert_eq!(
                    self.choose(n, k, &operands),
                    MatmulVariant::Subgroups,
                    "the subgroup matmul needs subgroups and vec4-aligned operands"
                );
                self.subgroups.as_ref().expect("checked by choose")
            }
        };
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
        let (tile_m, tile_n) = variant.tile();
        let groups = [(n as u32).div_ceil(tile_n), (m as u32).div_ceil(tile_m), 1];
        plan.push(
            kernel,
            &params,
            &[operands.lhs, operands.weights, operands.out],
            groups,
        );
    }
}
