//! Launcher for `rotary.wgsl`: rotary position embedding of the query and
//! key heads, in place, after an optional per-head RMS norm; and the host
//! side of it, the (cos, sin) table of a batch's positions.

use super::attention::HeadLayout;
use super::{Access, DispatchPlan, Kernel, grid_2d};
use crate::dtype::WeightDtype;
use crate::gpu::Gpu;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RotaryParams {
    rows: u32,
    seq: u32,
    head_dim: u32,
    heads: u32,
    kv_heads: u32,
    row_stride: u32,
    key_offset: u32,
    table_offset: u32,
    flags: u32,
    query_gain: u32,
    key_gain: u32,
    eps: f32,
    groups_x: u32,
    _pad: [u32; 3],
}

const FLAG_NORM: u32 = 1;

/// The per-head RMS norm some families apply to queries and keys before
/// rotating them: gains at element offsets of the layer's weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadNorm {
    pub query_gain: u32,
    pub key_gain: u32,
    pub eps: f32,
}

/// The frequencies of one rotary embedding: `theta^(-2i / head_dim)` for
/// `i < head_dim / 2`, computed as transformers does, in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryFrequencies {
    inverse: Vec<f32>,
}

impl RotaryFrequencies {
    pub fn new(theta: f64, head_dim: usize) -> Self {
        let inverse = (0..head_dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / head_dim as f32;
                1.0 / (theta.powf(exponent as f64) as f32)
            })
            .collect();
        Self { inverse }
    }

    /// Pairs per head.
    pub fn half(&self) -> usize {
        self.inverse.len()
    }

    /// Appends `(cos, sin)` of every position below `seq` and frequency,
    /// position-major: the angle is the f32 product `position * frequency`,
    /// as the reference computes it, and its cosine and sine are exact.
    pub fn append_table(&self, seq: usize, out: &mut Vec<f32>) {
        out.reserve(seq * self.inverse.len() * 2);
        for position in 0..seq {
            for &frequency in &self.inverse {
                let angle = (position as f32 * frequency) as f64;
                out.push(angle.cos() as f32);
                out.push(angle.sin() as f32);
            }
        }
    }
}

/// The rotary tables of a model's layers: one set of frequencies per
/// distinct theta (ModernBERT's global and local layers differ).
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryTables {
    pub frequencies: Vec<RotaryFrequencies>,
}

impl RotaryTables {
    /// Every table for positions below `seq`, one after another: table `t`
    /// starts at pair `t * seq * half`.
    pub fn for_length(&self, seq: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for table in &self.frequencies {
            table.append_table(seq, &mut out);
        }
        out
    }

    /// Bytes of the tables for `seq` positions.
    pub fn bytes_for(&self, seq: usize) -> u64 {
        self.frequencies
            .iter()
            .map(|t| (seq * t.half() * 2 * 4) as u64)
            .sum()
    }
}

pub struct Rotary {
    kernel: Kernel,
}

impl Rotary {
    pub fn new(gpu: &Gpu, dtype: WeightDtype) -> Self {
        let source = surf_shaders::with_weights(surf_shaders::ROTARY, dtype.words());
        Self {
            kernel: Kernel::new(
                gpu,
                "rotary",
                &source,
                &[Access::ReadWrite, Access::Read, Access::Read],
            ),
        }
    }

    /// Rotates the query and key heads of `rows` rows of `qkv` (`seq` rows
    /// per sequence) by table `table_index` of `tables`, normalising each
    /// head first when `norm` is given (its gains in `weights`).
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        gpu: &Gpu,
        plan: &mut DispatchPlan,
        rows: usize,
        seq: usize,
        layout: HeadLayout,
        table_index: usize,
        norm: Option<HeadNorm>,
        qkv: &wgpu::Buffer,
        tables: &wgpu::Buffer,
        weights: &wgpu::Buffer,
    ) {
        let heads_per_row = layout.heads + layout.kv_heads;
        let (grid, groups_x) = grid_2d(gpu, (rows * heads_per_row) as u32);
        let half = layout.head_dim / 2;
        let params = RotaryParams {
            rows: rows as u32,
            seq: seq as u32,
            head_dim: layout.head_dim as u32,
            heads: layout.heads as u32,
            kv_heads: layout.kv_heads as u32,
            row_stride: layout.row_width() as u32,
            key_offset: layout.key_offset() as u32,
            table_offset: (table_index * seq * half) as u32,
            flags: if norm.is_some() { FLAG_NORM } else { 0 },
            query_gain: norm.map_or(0, |n| n.query_gain),
            key_gain: norm.map_or(0, |n| n.key_gain),
            eps: norm.map_or(0.0, |n| n.eps),
            groups_x,
            _pad: [0; 3],
        };
        plan.push(&self.kernel, &params, &[qkv, tables, weights], grid);
    }
}

#[cfg(test)]
mod tests {
    use super::RotaryFrequencies;

    #[test]
    fn frequencies_and_angles_follow_the_reference_formula() {
        let rotary = RotaryFrequencies::new(10000.0, 8);
        assert_eq!(rotary.half(), 4);
        let mut table = Vec::new();
        rotary.append_table(3, &mut table);
        assert_eq!(table.len(), 3 * 4 * 2);
        // Position 0: every angle is 0.
        assert_eq!(&table[..8], &[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        // Position 2, frequency 1: 10000^(-1/4) = 0.1.
        let angle = 2.0f64 * 0.1;
        assert!((table[2 * 8 + 2] as f64 - angle.cos()).abs() < 1e-6);
        assert!((table[2 * 8 + 3] as f64 - angle.sin()).abs() < 1e-6);
    }
}
