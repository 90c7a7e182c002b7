//! Launcher for `layernorm.wgsl`: LayerNorm with a fused residual add.

use super::family::{KernelFamily, TILED_LAYERNORM_THREADS};
use super::{Access, DispatchPlan, LazyKernel, grid_2d};
use crate::dtype::WeightDtype;
use crate::gpu::Gpu;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LayerNormParams {
    rows: u32,
    cols: u32,
    has_residual: u32,
    gamma_offset: u32,
    beta_offset: u32,
    groups_x: u32,
    eps: f32,
    flags: u32,
}

/// Which normalisation a row gets, and whether the residual sum is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NormOptions {
    /// RMS norm (T5 and the decoders): no mean subtracted, no beta.
    pub rms: bool,
    /// Writes `x + residual` back into `residual`, where pre-norm models keep
    /// their residual stream.
    pub write_sum: bool,
}

impl NormOptions {
    pub(crate) fn flags(self) -> u32 {
        self.rms as u32 | (self.write_sum as u32) << 1
    }
}

/// The operands of one LayerNorm: `out = LN(x + residual)`, gamma and beta at
/// element offsets inside `weights`, in the launcher's weight dtype.
pub struct LayerNormOperands<'a> {
    pub x: &'a wgpu::Buffer,
    pub residual: Option<&'a wgpu::Buffer>,
    pub weights: &'a wgpu::Buffer,
    pub gamma_offset: u32,
    pub beta_offset: u32,
    pub out: &'a wgpu::Buffer,
}

/// The 8-lane LayerNorm (portable and subgroup8 families) for weights stored
/// as `dtype`.
pub fn portable_source(dtype: WeightDtype) -> String {
    surf_shaders::with_weights(surf_shaders::LAYERNORM, dtype.words())
}

/// The tiled family's LayerNorm: the same kernel with wider workgroups.
pub fn tiled_source(dtype: WeightDtype) -> String {
    surf_shaders::specialize(
        &portable_source(dtype),
        &[("THREADS", TILED_LAYERNORM_THREADS)],
    )
}

/// One kernel of 8 lanes (the portable and subgroup8 families) and one of
/// `TILED_LAYERNORM_THREADS` (the tiled family).
pub struct LayerNorm {
    kernel: LazyKernel,
    tiled: Option<LazyKernel>,
    /// Bound as the residual of a norm without one: the kernel may write
    /// its residual binding, so `x` cannot stand in for it.
    no_residual: wgpu::Buffer,
}

impl LayerNorm {
    pub fn new(gpu: &Gpu, dtype: WeightDtype) -> Self {
        let storage = [
            Access::Read,
            Access::ReadWrite,
            Access::Read,
            Access::ReadWrite,
        ];
        let tiled = KernelFamily::Tiled
            .unsupported_reason(gpu)
            .is_none()
            .then(|| LazyKernel::new(gpu, "layernorm_tiled", &tiled_source(dtype), &storage));
        Self {
            kernel: LazyKernel::new(gpu, "layernorm", &portable_source(dtype), &storage),
            tiled,
            no_residual: gpu.storage_buffer("no residual", 16),
        }
    }

    /// Records the LayerNorm with the 8-lane kernel.
    pub fn push(
        &self,
        gpu: &Gpu,
        plan: &mut DispatchPlan,
        rows: usize,
        cols: usize,
        eps: f32,
        operands: LayerNormOperands<'_>,
    ) {
        self.push_family(KernelFamily::Portable, gpu, plan, rows, cols, eps, operands);
    }

    /// Records the LayerNorm with `family`'s kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn push_family(
        &self,
        family: KernelFamily,
        gpu: &Gpu,
        plan: &mut DispatchPlan,
        rows: usize,
        cols: usize,
        eps: f32,
        operands: LayerNormOperands<'_>,
    ) {
        let options = NormOptions::default();
        self.push_with(family, gpu, plan, rows, cols, eps, options, operands);
    }

    /// Records a LayerNorm or an RMS norm with `family`'s kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn push_with(
        &self,
        family: KernelFamily,
        gpu: &Gpu,
        plan: &mut DispatchPlan,
        rows: usize,
        cols: usize,
        eps: f32,
        options: NormOptions,
        operands: LayerNormOperands<'_>,
    ) {
        // The kernel reads vec4s; the engine's packing aligns every tensor to
        // 4 elements and the config check makes the hidden size a multiple of 4.
        debug_assert!(
            cols.is_multiple_of(4)
                && operands.gamma_offset.is_multiple_of(4)
                && operands.beta_offset.is_multiple_of(4),
            "layernorm needs cols and offsets that are multiples of 4"
        );
        let (grid, groups_x) = grid_2d(gpu, rows as u32);
        let params = LayerNormParams {
            rows: rows as u32,
            cols: cols as u32,
            has_residual: operands.residual.is_some() as u32,
            gamma_offset: operands.gamma_offset,
            beta_offset: operands.beta_offset,
            groups_x,
            eps,
            flags: options.flags(),
        };
        debug_assert!(
            !options.write_sum || operands.residual.is_some(),
            "a norm that keeps the residual sum needs a residual"
        );
        // Without a residual the kernel never touches binding 2.
        let residual = operands.residual.unwrap_or(&self.no_residual);
        let kernel = match (family, &self.tiled) {
            // The blocked and half families run the tiled LayerNorm.
            (KernelFamily::Tiled | KernelFamily::Blocked | KernelFamily::Half, Some(tiled)) => {
                tiled.get()
            }
            _ => self.kernel.get(),
        };
        plan.push(
            kernel,
            &params,
            &[operands.x, residual, operands.weights, operands.out],
            grid,
        );
    }
}
