//! Launcher for `embed.wgsl`: word + position + token-type embedding gather.

use super::{Access, DispatchPlan, Kernel, grid_2d};
use crate::dtype::WeightDtype;
use crate::gpu::Gpu;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    tokens: u32,
    hidden: u32,
    word_offset: u32,
    position_offset: u32,
    type_offset: u32,
    row_stride: u32,
    _pad: [u32; 2],
}

/// Offsets (in elements) of the three tables inside one buffer.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddingTables {
    pub word_offset: u32,
    pub position_offset: u32,
    pub type_offset: u32,
}

pub struct Embed {
    kernel: Kernel,
}

const THREADS: u32 = 256;

impl Embed {
    /// The gather for tables stored as `dtype`.
    pub fn new(gpu: &Gpu, dtype: WeightDtype) -> Self {
        Self {
            kernel: Kernel::new(
                gpu,
                "embed",
                &surf_shaders::with_weights(surf_shaders::EMBED, dtype.words()),
                &[Access::Read, Access::Read, Access::ReadWrite],
            ),
        }
    }

    /// `tokens` holds (word id, position id, token type id) per token.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        gpu: &Gpu,
        plan: &mut DispatchPlan,
        token_count: usize,
        hidden: usize,
        tokens: &wgpu::Buffer,
        tables_buffer: &wgpu::Buffer,
        tables: EmbeddingTables,
        out: &wgpu::Buffer,
    ) {
        let total = (token_count * hidden) as u32;
        let (grid, groups_x) = grid_2d(gpu, total.div_ceil(THREADS));
        let params = EmbedParams {
            tokens: token_count as u32,
            hidden: hidden as u32,
            word_offset: tables.word_offset,
            position_offset: tables.position_offset,
            type_offset: tables.type_offset,
            row_stride: groups_x * THREADS,
            _pad: [0; 2],
        };
        plan.push(&self.kernel, &params, &[tokens, tables_buffer, out], grid);
    }
}
