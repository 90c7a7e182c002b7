//! Launcher for `embed.wgsl`: each token's word row (gathered on the host)
//! plus its learned position and token-type rows.

use super::{Access, DispatchPlan, Kernel, grid_2d};
use crate::dtype::WeightDtype;
use crate::gpu::Gpu;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    tokens: u32,
    hidden: u32,
    position_offset: u32,
    type_offset: u32,
    row_stride: u32,
    has_position: u32,
    has_type: u32,
    _pad: u32,
}

/// Offsets (in elements) of the tables kept in GPU memory, where the family
/// has them: learned positions (not T5's) and token types (BERT, RoBERTa).
#[derive(Debug, Clone, Copy, Default)]
pub struct EmbeddingTables {
    pub position_offset: Option<u32>,
    pub type_offset: Option<u32>,
}

pub struct Embed {
    kernel: Kernel,
}

const THREADS: u32 = 256;

impl Embed {
    /// The sum for tables stored as `dtype`.
    pub fn new(gpu: &Gpu, dtype: WeightDtype) -> Self {
        Self {
            kernel: Kernel::new(
                gpu,
                "embed",
                &surf_shaders::with_weights(surf_shaders::EMBED, dtype.words()),
                &[Access::Read, Access::Read, Access::Read, Access::ReadWrite],
            ),
        }
    }

    /// `tokens` holds (word id, position id, token type id) per token and
    /// `word_rows` each token's f32 row of the word table.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        gpu: &Gpu,
        plan: &mut DispatchPlan,
        token_count: usize,
        hidden: usize,
        tokens: &wgpu::Buffer,
        word_rows: &wgpu::Buffer,
        tables_buffer: &wgpu::Buffer,
        tables: EmbeddingTables,
        out: &wgpu::Buffer,
    ) {
        let total = (token_count * hidden) as u32;
        let (grid, groups_x) = grid_2d(gpu, total.div_ceil(THREADS));
        let params = EmbedParams {
            tokens: token_count as u32,
            hidden: hidden as u32,
            position_offset: tables.position_offset.unwrap_or(0),
            type_offset: tables.type_offset.unwrap_or(0),
            row_stride: groups_x * THREADS,
            has_position: tables.position_offset.is_some() as u32,
            has_type: tables.type_offset.is_some() as u32,
            _pad: 0,
        };
        plan.push(
            &self.kernel,
            &params,
            &[tokens, word_rows, tables_buffer, out],
            grid,
        );
    }
}
