//! Launcher for `matmul_norm.wgsl`: a sublayer's last projection with the
//! residual add and the norm after it in its epilogue, one dispatch and one
//! pass over the rows instead of a matmul writing them out and a norm reading
//! them back. Its workgroups own whole rows, so it takes rows up to
//! `MAX_WIDTH` wide; the autotuner decides per shape whether it beats the
//! separate matmul and norm of the families chosen for them.

use super::family::KernelFamily;
use super::layernorm::NormOptions;
use super::matmul::FILL_WORKGROUPS;
use super::{Access, DispatchPlan, LazyKernel};
use crate::dtype::WeightDtype;
use crate::gpu::Gpu;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulNormParams {
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
    a_offset: u32,
    b_offset: u32,
    bias_offset: u32,
    gamma_offset: u32,
    beta_offset: u32,
    eps: f32,
    _pad: [u32; 2],
}

/// Lanes along a row: each owns every 32nd vec4 column.
const COL_LANES: usize = 32;
/// Rows a workgroup owns per row per lane: 8 lanes down the rows.
const ROW_LANES: usize = 8;
/// The most vec4 columns a lane holds: rows up to 1,024 wide (BERT-large).
const MAX_COLUMN_BLOCKS: usize = 8;
/// The widest row the kernel takes.
pub const MAX_WIDTH: usize = 4 * COL_LANES * MAX_COLUMN_BLOCKS;
/// Rows per lane of the kernels built: tiles of 8 and 16 rows.
const ROWS_PER_LANE: [usize; 2] = [1, 2];

/// The operands of `out = norm(lhs · W + bias + residual)`: W ([k, n]), the
/// bias and the norm's gains at element offsets inside `weights`.
pub struct MatmulNormOperands<'a> {
    pub lhs: &'a wgpu::Buffer,
    pub weights: &'a wgpu::Buffer,
    pub b_offset: u32,
    pub bias_offset: u32,
    pub gamma_offset: u32,
    /// Ignored by an RMS norm.
    pub beta_offset: u32,
    pub residual: &'a wgpu::Buffer,
    pub out: &'a wgpu::Buffer,
}

/// The kernel's source for weights stored as `dtype`, `rows_per_lane` rows
/// per lane and `column_blocks` vec4 columns per lane.
pub fn source(dtype: WeightDtype, rows_per_lane: usize, column_blocks: usize) -> String {
    let source = surf_shaders::specialize(
        surf_shaders::MATMUL_NORM,
        &[
            ("ROWS_PER_LANE", rows_per_lane as u32),
            ("COLUMN_BLOCKS", column_blocks as u32),
        ],
    );
    surf_shaders::with_weights(&source, dtype.words())
}

/// Every `(rows_per_lane, column_blocks)` the launcher builds.
pub fn variants() -> impl Iterator<Item = (usize, usize)> {
    ROWS_PER_LANE
        .into_iter()
        .flat_map(|rows| (1..=MAX_COLUMN_BLOCKS).map(move |blocks| (rows, blocks)))
}

/// Rows per lane for m rows: two (16-row tiles, each B vector feeding two
/// rows) while that still launches `FILL_WORKGROUPS` workgroups, else one.
fn rows_per_lane(m: usize) -> usize {
    let tile = |rows: usize| rows * ROW_LANES;
    ROWS_PER_LANE
        .into_iter()
        .filter(|&rows| m.max(1).div_ceil(tile(rows)) >= FILL_WORKGROUPS)
        .max()
        .unwrap_or(ROWS_PER_LANE[0])
}

/// The fused kernels, one per variant, or none where the adapter cannot run
/// workgroups of 256 (the tiled family's requirement, which this shares).
pub struct MatmulNorm {
    kernels: Vec<((usize, usize), LazyKernel)>,
}

impl MatmulNorm {
    pub fn new(gpu: &Gpu, dtype: WeightDtype) -> Self {
        let storage = [
            Access::Read,
            Access::Read,
            Access::ReadWrite,
            Access::ReadWrite,
        ];
        let kernels = if KernelFamily::Tiled.unsupported_reason(gpu).is_none() {
            variants()
                .map(|variant| {
                    let text = source(dtype, variant.0, variant.1);
                    (
                        variant,
                        LazyKernel::new(gpu, "matmul_norm", &text, &storage),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        Self { kernels }
    }

    /// Whether this adapter runs the kernel and it takes an m x n x k
    /// product with these offsets.
    pub fn takes(&self, n: usize, k: usize, offsets: &[u32]) -> bool {
        !self.kernels.is_empty()
            && n > 0
            && n <= MAX_WIDTH
            && n.is_multiple_of(4)
            && k.is_multiple_of(4)
            && offsets.iter().all(|offset| offset.is_multiple_of(4))
    }

    /// Records `out = norm(lhs · W + bias + residual)` over m rows of n;
    /// with `options.write_sum`, `residual` gets the sum too. Panics where
    /// [`MatmulNorm::takes`] is false, a bug in the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        plan: &mut DispatchPlan,
        m: usize,
        n: usize,
        k: usize,
        eps: f32,
        options: NormOptions,
        operands: MatmulNormOperands<'_>,
    ) {
        let offsets = [
            operands.b_offset,
            operands.bias_offset,
            operands.gamma_offset,
            operands.beta_offset,
        ];
        assert!(
            self.takes(n, k, &offsets),
            "the fused projection and norm cannot take n={n} k={k} on this adapter"
        );
        if m == 0 {
            return;
        }
        let rows = rows_per_lane(m);
        let blocks = n.div_ceil(4 * COL_LANES);
        let kernel = self
            .kernels
            .iter()
            .find_map(|(variant, kernel)| (*variant == (rows, blocks)).then_some(kernel))
            .expect("every variant is built")
            .get();
        let params = MatmulNormParams {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            flags: options.flags(),
            a_offset: 0,
            b_offset: operands.b_offset,
            bias_offset: operands.bias_offset,
            gamma_offset: operands.gamma_offset,
            beta_offset: operands.beta_offset,
            eps,
            _pad: [0; 2],
        };
        let groups = (m as u32).div_ceil((rows * ROW_LANES) as u32);
        plan.push(
            kernel,
            &params,
            &[
                operands.lhs,
                operands.weights,
                operands.residual,
                operands.out,
            ],
            [groups, 1, 1],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_shrink_when_rows_are_few_so_every_unit_gets_work() {
        // One sentence, or a batch of 32 short ones: 8-row tiles.
        assert_eq!(rows_per_lane(16), 1);
        assert_eq!(rows_per_lane(512), 1);
        // Long batches fill the GPU with 16-row tiles.
        assert_eq!(rows_per_lane(16 * FILL_WORKGROUPS), 2);
        assert_eq!(rows_per_lane(8192), 2);
    }

    #[test]
    fn every_width_up_to_the_largest_has_a_variant() {
        for n in (4..=MAX_WIDTH).step_by(4) {
            let blocks = n.div_ceil(4 * COL_LANES);
            for rows in ROWS_PER_LANE {
                assert!(variants().any(|v| v == (rows, blocks)), "n={n}");
            }
        }
    }
}
