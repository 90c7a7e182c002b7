//! Launcher for the matmul kernels: C = act(A B + bias).
//!
//! Three kinds of pipeline compute the same thing, one per kernel family.
//! `matmul.wgsl` (portable) takes any shape and offset and needs no optional
//! feature. `matmul_subgroups.wgsl` (subgroup8) needs subgroups of at least 8
//! invocations, and `matmul_tiled.wgsl` (tiled) workgroups of 256; both need
//! vec4-aligned operands (k, n and every offset multiples of 4), which every
//! BERT layer satisfies, and fall back to the portable kernel otherwise.

use super::family::{KernelFamily, SUBGROUP_LANES};
use super::{Access, DispatchPlan, LazyKernel, subgroup_kernels};
use crate::config::Activation;
use crate::dtype::WeightDtype;
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
            Epilogue::BiasThen(activation) => activation.code(),
        }
    }
}

/// Where the operands of one matmul live: `lhs` holds A, `weights` holds B
/// ([k, n], row-major) and the bias in the launcher's weight dtype; offsets
/// are in elements.
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
    /// vec4 loads and subgroup broadcasts, `rows` rows of C per workgroup:
    /// `matmul_subgroups.wgsl` expanded for that tile height.
    Subgroups { rows: u32 },
    /// 64x64 tiles in workgroup memory, 256 invocations: `matmul_tiled.wgsl`.
    Tiled,
    /// `rows` x 64 tiles, register blocks of rows / 16 by 4, f32 arithmetic:
    /// `matmul_blocked.wgsl` specialized for that height.
    Blocked { rows: u32 },
    /// The blocked kernel computing in f16 with f32 accumulators.
    Half { rows: u32 },
}

impl MatmulVariant {
    /// Rows and columns of C that one workgroup computes.
    fn tile(self) -> (u32, u32) {
        match self {
            MatmulVariant::General => (128, 64),
            MatmulVariant::Subgroups { rows } => (rows, 64),
            MatmulVariant::Tiled => (64, 64),
            MatmulVariant::Blocked { rows } | MatmulVariant::Half { rows } => (rows, 64),
        }
    }
}

/// Time to compute one row of C with a `rows`-row subgroup tile, in units of
/// the part that does not depend on the height. Per k step a lane loads one
/// vec4 of A per 8 rows but 8 vec4s of B whatever the height, so a short tile
/// spreads the B loads over fewer rows. The weight of those loads is fitted to
/// the kernels bench on llvmpipe, where the 16-, 32- and 64-row tiles computed
/// a full tile's rows at about 0.5, 0.7 and 0.85 times the 128-row tile's
/// GFLOP/s.
fn row_cost(rows: u32) -> f64 {
    const B_LOADS: f64 = 2.5;
    1.0 + B_LOADS * f64::from(SUBGROUP_LANES) / f64::from(rows)
}

/// The tile height among `tiles` that computes m rows at the least estimated
/// cost: rows padded to whole tiles, times the cost of a row at that height.
/// Ties go to the taller tile, which launches fewer workgroups.
pub fn subgroup_rows(m: usize, tiles: &[u32]) -> u32 {
    let cost = |rows: u32| padded_cost(m, rows);
    tiles
        .iter()
        .copied()
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)).then(b.cmp(&a)))
        .expect("at least one tile")
}

/// The estimated cost of m rows computed by `rows`-row tiles, padded to whole
/// tiles.
fn padded_cost(m: usize, rows: u32) -> f64 {
    let padded = m.max(1).div_ceil(rows as usize) * rows as usize;
    padded as f64 * row_cost(rows)
}

/// The estimated cost of one more dispatch, in rows of a 128-row tile: a
/// software rasterizer wakes its threads and waits for them once per dispatch.
const DISPATCH_COST: f64 = 4.0;

/// How `push` covers m rows with subgroup tiles: `(tile rows, first row, row
/// count)` per dispatch, in row order. The tallest tile for the rows it fills
/// and a shorter one for the rest often cost less than padding every row to a
/// single height: 132 rows (one long sentence) take a 128-row and a 16-row
/// dispatch instead of three 64-row tiles.
pub fn subgroup_parts(m: usize, tiles: &[u32]) -> Vec<(u32, usize, usize)> {
    /// The cheapest cover of m rows, as (cost, [(tile rows, row count)]).
    fn cover(m: usize, tiles: &[u32]) -> (f64, Vec<(u32, usize)>) {
        let single = subgroup_rows(m, tiles);
        let mut best = (padded_cost(m, single), vec![(single, m)]);
        for &tile in tiles {
            let full = m / tile as usize * tile as usize;
            if full == 0 || full == m {
                continue;
            }
            let (rest_cost, rest) = cover(m - full, tiles);
            let cost = full as f64 * row_cost(tile) + DISPATCH_COST + rest_cost;
            if cost < best.0 {
                best = (cost, std::iter::once((tile, full)).chain(rest).collect());
            }
        }
        best
    }
    let mut first = 0;
    cover(m, tiles)
        .1
        .into_iter()
        .map(|(tile, count)| {
            let part = (tile, first, count);
            first += count;
            part
        })
        .collect()
}

/// Tile heights of the blocked kernels, shortest first: 2, 4 and 8 rows per
/// invocation.
pub const BLOCKED_ROWS: [u32; 3] = [32, 64, 128];

/// Workgroups a blocked multiply should launch so that every compute unit of
/// a desktop GPU gets work; taller tiles, which reuse each element of B over
/// more rows, are taken only while they still launch this many.
pub const FILL_WORKGROUPS: usize = 64;

/// The blocked tile height for an m x n product: the tallest of `tiles` that
/// launches at least `FILL_WORKGROUPS` workgroups, else the shortest.
pub fn blocked_rows(m: usize, n: usize, tiles: &[u32]) -> u32 {
    let columns = n.div_ceil(64).max(1);
    let launched = |rows: u32| m.max(1).div_ceil(rows as usize) * columns;
    tiles
        .iter()
        .copied()
        .filter(|&rows| launched(rows) >= FILL_WORKGROUPS)
        .max()
        .or_else(|| tiles.iter().copied().min())
        .expect("at least one tile")
}

/// Row counts whose `push` dispatches, together, run every subgroup tile:
/// software adapters compile a pipeline on its first dispatch, so an engine
/// runs one probe of each length at start-up.
pub const PRIMING_ROWS: [usize; 4] = [1, 17, 33, 128];

/// The portable matmul for weights stored as `dtype`. The epilogue is chosen
/// by a parameter at launch, so one source serves every activation.
pub fn general_source(dtype: WeightDtype) -> String {
    surf_shaders::with_weights(surf_shaders::MATMUL, dtype.words())
}

/// The subgroup matmul for weights stored as `dtype`, one source per tile
/// height, shortest first.
pub fn subgroup_sources(dtype: WeightDtype) -> Vec<(u32, String)> {
    surf_shaders::MATMUL_SUBGROUPS
        .iter()
        .map(|&(rows, source)| (rows, surf_shaders::with_weights(source, dtype.words())))
        .collect()
}

/// The tiled matmul for weights stored as `dtype`.
pub fn tiled_source(dtype: WeightDtype) -> String {
    surf_shaders::with_weights(surf_shaders::MATMUL_TILED, dtype.words())
}

/// The blocked matmul for weights stored as `dtype`, one source per tile
/// height of `BLOCKED_ROWS`.
pub fn blocked_sources(dtype: WeightDtype) -> Vec<(u32, String)> {
    BLOCKED_ROWS
        .iter()
        .map(|&rows| {
            let source = surf_shaders::specialize(
                surf_shaders::MATMUL_BLOCKED,
                &[("ROWS_PER_LANE", rows / 16)],
            );
            (rows, surf_shaders::with_weights(&source, dtype.words()))
        })
        .collect()
}

/// The blocked matmul computing in f16, for weights stored as `dtype`, one
/// source per tile height of `BLOCKED_ROWS`.
pub fn half_sources(dtype: WeightDtype) -> Vec<(u32, String)> {
    blocked_sources(dtype)
        .into_iter()
        .map(|(rows, source)| (rows, surf_shaders::half_arithmetic(&source)))
        .collect()
}

pub struct Matmul {
    dtype: WeightDtype,
    general: LazyKernel,
    /// (rows, pipeline) per subgroup tile height, shortest first.
    subgroups: Vec<(u32, LazyKernel)>,
    /// None where the adapter cannot run workgroups of 256.
    tiled: Option<LazyKernel>,
    /// (rows, pipeline) per blocked tile height, shortest first; empty where
    /// the adapter cannot run the blocked family.
    blocked: Vec<(u32, LazyKernel)>,
    /// The same in f16 arithmetic; empty without `SHADER_F16`.
    half: Vec<(u32, LazyKernel)>,
}

impl Matmul {
    /// The pipelines for weights stored as `dtype`.
    pub fn new(gpu: &Gpu, dtype: WeightDtype) -> Self {
        let storage = [Access::Read, Access::Read, Access::ReadWrite];
        let sources = subgroup_sources(dtype);
        let sources: Vec<(u32, &str)> = sources
            .iter()
            .map(|(rows, source)| (*rows, source.as_str()))
            .collect();
        let subgroups = subgroup_kernels(gpu, "matmul_subgroups", &sources, &storage);
        let tiled = KernelFamily::Tiled
            .unsupported_reason(gpu)
            .is_none()
            .then(|| LazyKernel::new(gpu, "matmul_tiled", &tiled_source(dtype), &storage));
        let family_kernels = |family: KernelFamily, label, sources: Vec<(u32, String)>| {
            if family.unsupported_reason(gpu).is_some() {
                return Vec::new();
            }
            sources
                .iter()
                .map(|(rows, source)| (*rows, LazyKernel::new(gpu, label, source, &storage)))
                .collect()
        };
        Self {
            dtype,
            general: LazyKernel::new(gpu, "matmul", &general_source(dtype), &storage),
            subgroups,
            tiled,
            blocked: family_kernels(
                KernelFamily::Blocked,
                "matmul_blocked",
                blocked_sources(dtype),
            ),
            half: family_kernels(KernelFamily::Half, "matmul_half", half_sources(dtype)),
        }
    }

    /// The weight dtype these pipelines read.
    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    /// The variants this device can run.
    pub fn variants(&self) -> Vec<MatmulVariant> {
        let mut variants = vec![MatmulVariant::General];
        variants.extend(
            self.subgroups
                .iter()
                .map(|&(rows, _)| MatmulVariant::Subgroups { rows }),
        );
        if self.tiled.is_some() {
            variants.push(MatmulVariant::Tiled);
        }
        variants.extend(
            self.blocked
                .iter()
                .map(|&(rows, _)| MatmulVariant::Blocked { rows }),
        );
        variants.extend(
            self.half
                .iter()
                .map(|&(rows, _)| MatmulVariant::Half { rows }),
        );
        variants
    }

    /// Whether the vec4 kernels can read these operands.
    fn aligned(n: usize, k: usize, operands: &MatmulOperands<'_>) -> bool {
        let offsets = [
            operands.a_offset,
            operands.b_offset,
            operands.bias_offset,
            operands.c_offset,
        ];
        n.is_multiple_of(4)
            && k.is_multiple_of(4)
            && offsets.iter().all(|offset| offset.is_multiple_of(4))
    }

    /// Heights of the subgroup tiles this adapter runs, shortest first.
    fn tile_heights(&self) -> Vec<u32> {
        self.subgroups.iter().map(|&(rows, _)| rows).collect()
    }

    /// The fastest variant that can run this multiply.
    pub fn choose(
        &self,
        m: usize,
        n: usize,
        k: usize,
        operands: &MatmulOperands<'_>,
    ) -> MatmulVariant {
        if Self::aligned(n, k, operands) && !self.subgroups.is_empty() {
            MatmulVariant::Subgroups {
                rows: subgroup_rows(m, &self.tile_heights()),
            }
        } else {
            MatmulVariant::General
        }
    }

    /// Records the multiply with the kernel that ran every shape before
    /// families were measured: the subgroup tiles where they run.
    pub fn push(
        &self,
        plan: &mut DispatchPlan,
        m: usize,
        n: usize,
        k: usize,
        epilogue: Epilogue,
        operands: MatmulOperands<'_>,
    ) {
        let variant = self.choose(m, n, k, &operands);
        self.push_chosen(variant, plan, m, n, k, epilogue, operands);
    }

    /// Records the multiply with `family`'s kernel, or the portable one where
    /// the family cannot run these operands (unaligned ones) or this adapter
    /// lacks it.
    #[allow(clippy::too_many_arguments)]
    pub fn push_family(
        &self,
        family: KernelFamily,
        plan: &mut DispatchPlan,
        m: usize,
        n: usize,
        k: usize,
        epilogue: Epilogue,
        operands: MatmulOperands<'_>,
    ) {
        let aligned = Self::aligned(n, k, &operands);
        let variant = match family {
            KernelFamily::Subgroup8 if aligned && !self.subgroups.is_empty() => {
                MatmulVariant::Subgroups {
                    rows: subgroup_rows(m, &self.tile_heights()),
                }
            }
            KernelFamily::Tiled if aligned && self.tiled.is_some() => MatmulVariant::Tiled,
            KernelFamily::Blocked if aligned && !self.blocked.is_empty() => {
                MatmulVariant::Blocked {
                    rows: blocked_rows(m, n, &heights(&self.blocked)),
                }
            }
            KernelFamily::Half if aligned && !self.half.is_empty() => MatmulVariant::Half {
                rows: blocked_rows(m, n, &heights(&self.half)),
            },
            _ => MatmulVariant::General,
        };
        self.push_chosen(variant, plan, m, n, k, epilogue, operands);
    }

    /// Records `variant`, split into several tile heights for subgroup tiles.
    #[allow(clippy::too_many_arguments)]
    fn push_chosen(
        &self,
        variant: MatmulVariant,
        plan: &mut DispatchPlan,
        m: usize,
        n: usize,
        k: usize,
        epilogue: Epilogue,
        operands: MatmulOperands<'_>,
    ) {
        if !matches!(variant, MatmulVariant::Subgroups { .. }) {
            self.push_variant(variant, plan, m, n, k, epilogue, operands);
            return;
        }
        for (rows, first, count) in subgroup_parts(m, &self.tile_heights()) {
            // k and n are multiples of 4 here, so the shifted offsets stay
            // vec4-aligned.
            let part = MatmulOperands {
                a_offset: operands.a_offset + (first * k) as u32,
                c_offset: operands.c_offset + (first * n) as u32,
                ..operands
            };
            self.push_variant(
                MatmulVariant::Subgroups { rows },
                plan,
                count,
                n,
                k,
                epilogue,
                part,
            );
        }
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
            MatmulVariant::General => self.general.get(),
            MatmulVariant::Subgroups { rows } => {
                assert!(
                    matches!(
                        self.choose(m, n, k, &operands),
                        MatmulVariant::Subgroups { .. }
                    ),
                    "the subgroup matmul needs subgroups and vec4-aligned operands"
                );
                self.subgroups
                    .iter()
                    .find_map(|(tile, kernel)| (*tile == rows).then_some(kernel))
                    .unwrap_or_else(|| panic!("no {rows}-row subgroup matmul"))
                    .get()
            }
            MatmulVariant::Tiled => {
                assert!(
                    Self::aligned(n, k, &operands),
                    "the tiled matmul needs vec4-aligned operands"
                );
                self.tiled
                    .as_ref()
                    .expect("the adapter runs workgroups of 256 for the tiled matmul")
                    .get()
            }
            MatmulVariant::Blocked { rows } | MatmulVariant::Half { rows } => {
                assert!(
                    Self::aligned(n, k, &operands),
                    "the blocked matmuls need vec4-aligned operands"
                );
                let kernels = match variant {
                    MatmulVariant::Half { .. } => &self.half,
                    _ => &self.blocked,
                };
                kernels
                    .iter()
                    .find_map(|(tile, kernel)| (*tile == rows).then_some(kernel))
                    .unwrap_or_else(|| panic!("no {variant:?} matmul on this adapter"))
                    .get()
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

/// The tile heights of `kernels`.
fn heights(kernels: &[(u32, LazyKernel)]) -> Vec<u32> {
    kernels.iter().map(|&(rows, _)| rows).collect()
}

#[cfg(test)]
mod tests {
    use super::{BLOCKED_ROWS, FILL_WORKGROUPS, blocked_rows, subgroup_parts, subgroup_rows};

    #[test]
    fn short_products_get_short_blocked_tiles_so_every_unit_gets_work() {
        // MiniLM at one sentence: nothing fills the GPU, so the shortest tile.
        assert_eq!(blocked_rows(16, 384, &BLOCKED_ROWS), 32);
        // A batch of 32 short sentences (512 rows): the 384-wide products
        // need 32-row tiles to launch 96 workgroups, the FFN's 1536 columns
        // fill it with the tallest.
        assert_eq!(blocked_rows(512, 384, &BLOCKED_ROWS), 32);
        assert_eq!(blocked_rows(512, 1152, &BLOCKED_ROWS), 128);
        assert_eq!(blocked_rows(512, 1536, &BLOCKED_ROWS), 128);
        // In between, the tallest that still fills.
        assert_eq!(blocked_rows(1024, 384, &BLOCKED_ROWS), 64);
        assert_eq!(blocked_rows(4096, 384, &BLOCKED_ROWS), 128);
        for m in [0, 1, 100, 5000] {
            for n in [4, 384, 4096] {
                let rows = blocked_rows(m, n, &BLOCKED_ROWS);
                let launched = m.max(1).div_ceil(rows as usize) * n.div_ceil(64);
                // The tallest tile that fills, or nothing fills.
                assert!(launched >= FILL_WORKGROUPS || rows == 32, "m={m} n={n}");
                if let Some(taller) = BLOCKED_ROWS.iter().find(|&&t| t > rows) {
                    let taller_launched = m.max(1).div_ceil(*taller as usize) * n.div_ceil(64);
                    assert!(taller_launched < FILL_WORKGROUPS, "m={m} n={n}");
                }
            }
        }
    }

    #[test]
    fn parts_cover_every_row_once_in_order() {
        for m in [1, 16, 28, 100, 132, 148, 352, 1064, 5000] {
            let parts = subgroup_parts(m, &TILES);
            let mut next = 0;
            for &(tile, first, count) in &parts {
                assert!(TILES.contains(&tile));
                assert_eq!(first, next, "m={m}: {parts:?}");
                assert!(count > 0);
                next = first + count;
            }
            assert_eq!(next, m, "m={m}: {parts:?}");
        }
    }

    #[test]
    fn the_priming_lengths_reach_every_tile() {
        let mut reached: Vec<u32> = super::PRIMING_ROWS
            .iter()
            .flat_map(|&m| subgroup_parts(m, &TILES))
            .map(|(tile, _, _)| tile)
            .collect();
        reached.sort_unstable();
        reached.dedup();
        assert_eq!(reached, TILES);
    }

    #[test]
    fn one_long_sentence_splits_into_a_tall_and_a_short_tile() {
        assert_eq!(
            subgroup_parts(132, &TILES),
            vec![(128, 0, 128), (16, 128, 4)]
        );
        // Rows that fit tiles, or a short batch, stay one dispatch.
        assert_eq!(subgroup_parts(256, &TILES), vec![(128, 0, 256)]);
        assert_eq!(subgroup_parts(11, &TILES), vec![(16, 0, 11)]);
    }

    const TILES: [u32; 4] = [16, 32, 64, 128];

    #[test]
    fn short_batches_get_short_tiles_and_long_ones_the_tallest() {
        // One sentence of a few tokens: a 16-row tile wastes the least.
        assert_eq!(subgroup_rows(1, &TILES), 16);
        // Two short sentences padded to 14 tokens.
        assert_eq!(subgroup_rows(28, &TILES), 32);
        // 128 rows cost less than two 64-row tiles' worth despite the padding.
        assert_eq!(subgroup_rows(100, &TILES), 128);
        assert_eq!(subgroup_rows(600, &TILES), 128);
        // Exact fits use the tile they fit.
        assert_eq!(subgroup_rows(16, &TILES), 16);
        assert_eq!(subgroup_rows(64, &TILES), 64);
    }

    #[test]
    fn a_single_tile_is_always_chosen() {
        for m in [0, 1, 127, 129, 5000] {
            assert_eq!(subgroup_rows(m, &[128]), 128);
        }
    }
}
