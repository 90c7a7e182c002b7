//! Which kernel family runs each shape: the shapes a model runs, and the
//! lookup from a launch to a measured choice. Plain data, no GPU: `autotune`
//! fills it in by measuring, `tuning_cache` keeps it on disk.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::family::KernelFamily;

/// Row counts the families are measured at. A launch takes the choice of the
/// nearest one on a log scale: one sentence, a batch of short ones, a batch
/// of long ones.
pub const ROW_BUCKETS: [usize; 3] = [16, 128, 512];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunedOp {
    /// `k` and `n` are the multiply's inner and output sizes.
    Matmul,
    /// `k` is the head size, `n` the number of heads.
    Attention,
    /// `k` is the row length; `n` is unused (0).
    LayerNorm,
    /// A sublayer's last projection (`k` in, `n` out) followed by the
    /// residual add and the norm: `matmul_norm.wgsl` in one dispatch against
    /// the separate matmul and norm of the families chosen for them.
    ProjectionNorm,
}

/// One measured shape of one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Shape {
    pub op: TunedOp,
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

/// How launches were timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimingSource {
    /// Timestamps written by the GPU at the start and end of the compute
    /// pass (`TIMESTAMP_QUERY`): the kernels' time alone.
    GpuTimestamps,
    /// The host's clock around a submission and the wait for it, with the
    /// launches repeated until they take about a millisecond so that the
    /// submission's latency does not decide.
    #[default]
    HostClock,
}

impl TimingSource {
    pub fn name(self) -> &'static str {
        match self {
            TimingSource::GpuTimestamps => "gpu_timestamps",
            TimingSource::HostClock => "host_clock",
        }
    }
}

/// What the measurement of one shape found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunedShape {
    #[serde(flatten)]
    pub shape: Shape,
    pub family: KernelFamily,
    /// Best time per family, in microseconds per launch. A family dropped
    /// after one clearly slower run keeps that run's time.
    pub timings_us: BTreeMap<KernelFamily, f64>,
    /// How the timings were taken.
    #[serde(default)]
    pub timing: TimingSource,
    /// For a `ProjectionNorm` shape: the fused kernel against the separate
    /// pair. `family` and `timings_us` then hold the separate matmul's
    /// family and the pair's time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<FusionTiming>,
}

/// The times of a projection and norm fused and kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FusionTiming {
    /// Microseconds per launch of the fused kernel.
    pub fused_us: f64,
    /// Microseconds per matmul and norm, each of the family chosen for it.
    pub separate_us: f64,
}

impl FusionTiming {
    /// Whether the fused kernel runs: the separate pair is the incumbent,
    /// which the fused kernel must beat by `INCUMBENT_MARGIN`.
    pub fn fuses(&self) -> bool {
        self.fused_us < self.separate_us * (1.0 - INCUMBENT_MARGIN)
    }
}

/// A challenger must beat the incumbent by more than this fraction of the
/// incumbent's time to take a shape from it: closer than that is within the
/// noise of a few timed runs, and the incumbent is the family shaped for the
/// adapter.
pub const INCUMBENT_MARGIN: f64 = 0.03;

/// The family that runs a shape, from the timings of the families measured:
/// the fastest, except that `incumbent` keeps the shape unless another is
/// faster by more than `INCUMBENT_MARGIN`. Ties among the others go to the
/// earlier family. `None` without timings.
pub fn choose_family(
    incumbent: KernelFamily,
    timings_us: &BTreeMap<KernelFamily, f64>,
) -> Option<KernelFamily> {
    let (&fastest, &best) = timings_us
        .iter()
        .min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(b.0)))?;
    match timings_us.get(&incumbent) {
        Some(&held) if best >= held * (1.0 - INCUMBENT_MARGIN) => Some(incumbent),
        _ => Some(fastest),
    }
}

impl TunedShape {
    /// The shape's choice among `timings_us` (see `choose_family`).
    pub fn from_timings(
        shape: Shape,
        incumbent: KernelFamily,
        timings_us: BTreeMap<KernelFamily, f64>,
        timing: TimingSource,
    ) -> Option<Self> {
        let family = choose_family(incumbent, &timings_us)?;
        Some(TunedShape {
            shape,
            family,
            timings_us,
            timing,
            fusion: None,
        })
    }
}

/// The family whose kernel `family` runs for `op` at inner size `k`:
/// families share a kernel where one has none of its own (the 8-lane
/// LayerNorm serves the portable and subgroup8 families; head sizes without
/// a kernel of their own run the portable attention). Measuring a kernel
/// once, under its owner, keeps noise from choosing between two runs of the
/// same code.
pub fn kernel_owner(op: TunedOp, k: usize, family: KernelFamily) -> KernelFamily {
    use super::attention::{SUBGROUP_HEAD_DIMS, TILED_HEAD_DIMS};
    // The blocked family has a matmul of its own and runs the tiled
    // family's other kernels; the half family has a matmul and an attention
    // of its own and runs the tiled LayerNorm.
    let family = match (op, family) {
        (TunedOp::Attention | TunedOp::LayerNorm, KernelFamily::Blocked)
        | (TunedOp::LayerNorm, KernelFamily::Half) => KernelFamily::Tiled,
        _ => family,
    };
    match (op, family) {
        (TunedOp::LayerNorm, KernelFamily::Subgroup8) => KernelFamily::Portable,
        (TunedOp::Attention, KernelFamily::Subgroup8) if !SUBGROUP_HEAD_DIMS.contains(&k) => {
            KernelFamily::Portable
        }
        (TunedOp::Attention, KernelFamily::Tiled | KernelFamily::Half)
            if !TILED_HEAD_DIMS.contains(&k) =>
        {
            KernelFamily::Portable
        }
        _ => family,
    }
}

/// The model dimensions that decide which shapes it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShapes {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl ModelShapes {
    /// Every shape a forward pass launches, at every row bucket: the four
    /// matmuls of a layer, its attention and its LayerNorm.
    pub fn shapes(&self) -> Vec<Shape> {
        let h = self.hidden;
        let inter = self.intermediate;
        let mut shapes = Vec::new();
        for rows in ROW_BUCKETS {
            for (k, n) in [(h, 3 * h), (h, h), (h, inter), (inter, h)] {
                let shape = Shape {
                    op: TunedOp::Matmul,
                    rows,
                    k,
                    n,
                };
                if !shapes.contains(&shape) {
                    shapes.push(shape);
                }
            }
            shapes.push(Shape {
                op: TunedOp::Attention,
                rows,
                k: self.head_dim,
                n: self.heads,
            });
            shapes.push(Shape {
                op: TunedOp::LayerNorm,
                rows,
                k: h,
                n: 0,
            });
            // After the matmuls and the norm of the same rows, whose choices
            // the separate pair runs.
            for k in [h, inter] {
                shapes.push(Shape {
                    op: TunedOp::ProjectionNorm,
                    rows,
                    k,
                    n: h,
                });
            }
        }
        shapes
    }
}

/// The family per launch.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// One family everywhere (`SURF_KERNELS=<family>`).
    Forced(KernelFamily),
    /// The measured choice of the nearest row bucket of the same op, k and
    /// n; `fallback` for shapes that were not measured.
    Tuned {
        shapes: Vec<TunedShape>,
        fallback: KernelFamily,
    },
}

impl Selection {
    pub fn family(&self, op: TunedOp, rows: usize, k: usize, n: usize) -> KernelFamily {
        match self {
            Selection::Forced(family) => *family,
            Selection::Tuned { fallback, .. } => self
                .measured(op, rows, k, n)
                .map_or(*fallback, |t| t.family),
        }
    }

    /// Whether a projection of `k` to `n` over `rows` rows whose output goes
    /// into a residual add and a norm runs fused (`matmul_norm.wgsl`): where
    /// measured faster, or where a family shaped for GPUs is forced, whose
    /// kernels it belongs with.
    pub fn fuses_projection_norm(&self, rows: usize, k: usize, n: usize) -> bool {
        match self {
            Selection::Forced(family) => family.shaped_for_gpus(),
            Selection::Tuned { .. } => self
                .measured(TunedOp::ProjectionNorm, rows, k, n)
                .and_then(|t| t.fusion)
                .is_some_and(|fusion| fusion.fuses()),
        }
    }

    /// The measured shape a launch takes its family from: the nearest row
    /// bucket of the same op, k and n. `None` when a family is forced or the
    /// shape was not measured.
    pub fn measured(&self, op: TunedOp, rows: usize, k: usize, n: usize) -> Option<&TunedShape> {
        let distance = |bucket: usize| {
            let ratio = rows.max(1) as f64 / bucket.max(1) as f64;
            ratio.ln().abs()
        };
        self.tuned()
            .iter()
            .filter(|t| t.shape.op == op && t.shape.k == k && t.shape.n == n)
            .min_by(|a, b| distance(a.shape.rows).total_cmp(&distance(b.shape.rows)))
    }

    /// The measured shapes, empty when a family is forced.
    pub fn tuned(&self) -> &[TunedShape] {
        match self {
            Selection::Forced(_) => &[],
            Selection::Tuned { shapes, .. } => shapes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuned(op: TunedOp, rows: usize, k: usize, n: usize, family: KernelFamily) -> TunedShape {
        TunedShape {
            shape: Shape { op, rows, k, n },
            family,
            timings_us: BTreeMap::from([(family, 1.0)]),
            timing: TimingSource::HostClock,
            fusion: None,
        }
    }

    #[test]
    fn a_launch_takes_the_choice_of_the_nearest_bucket_of_its_own_shape() {
        let selection = Selection::Tuned {
            shapes: vec![
                tuned(TunedOp::Matmul, 16, 384, 1536, KernelFamily::Subgroup8),
                tuned(TunedOp::Matmul, 128, 384, 1536, KernelFamily::Tiled),
                tuned(TunedOp::Matmul, 512, 384, 1536, KernelFamily::Portable),
                tuned(TunedOp::LayerNorm, 16, 384, 0, KernelFamily::Tiled),
            ],
            fallback: KernelFamily::Subgroup8,
        };
        let matmul = |rows| selection.family(TunedOp::Matmul, rows, 384, 1536);
        assert_eq!(matmul(1), KernelFamily::Subgroup8);
        assert_eq!(matmul(40), KernelFamily::Subgroup8);
        assert_eq!(matmul(50), KernelFamily::Tiled);
        assert_eq!(matmul(255), KernelFamily::Tiled);
        assert_eq!(matmul(300), KernelFamily::Portable);
        assert_eq!(matmul(100_000), KernelFamily::Portable);
        let taken = selection.measured(TunedOp::Matmul, 300, 384, 1536);
        assert_eq!(taken.map(|t| t.shape.rows), Some(512));
        assert!(selection.measured(TunedOp::Matmul, 16, 1536, 384).is_none());
        // Another (k, n), or another op, is not measured: the fallback.
        assert_eq!(
            selection.family(TunedOp::Matmul, 16, 1536, 384),
            KernelFamily::Subgroup8
        );
        assert_eq!(
            selection.family(TunedOp::LayerNorm, 600, 384, 0),
            KernelFamily::Tiled
        );
        assert_eq!(
            selection.family(TunedOp::Attention, 16, 32, 12),
            KernelFamily::Subgroup8
        );
    }

    #[test]
    fn families_without_a_kernel_of_their_own_share_their_owners() {
        use KernelFamily::{Blocked, Half, Portable, Subgroup8, Tiled};
        assert_eq!(kernel_owner(TunedOp::LayerNorm, 384, Subgroup8), Portable);
        assert_eq!(kernel_owner(TunedOp::LayerNorm, 384, Tiled), Tiled);
        assert_eq!(kernel_owner(TunedOp::Attention, 32, Subgroup8), Subgroup8);
        assert_eq!(kernel_owner(TunedOp::Attention, 48, Subgroup8), Portable);
        assert_eq!(kernel_owner(TunedOp::Attention, 48, Tiled), Portable);
        assert_eq!(kernel_owner(TunedOp::Matmul, 384, Tiled), Tiled);
        for family in [Blocked, Half] {
            assert_eq!(kernel_owner(TunedOp::Matmul, 384, family), family);
            assert_eq!(kernel_owner(TunedOp::LayerNorm, 384, family), Tiled);
            assert_eq!(kernel_owner(TunedOp::Attention, 48, family), Portable);
        }
        // The blocked family runs the tiled attention; the half family has
        // its own, timed under its own name.
        assert_eq!(kernel_owner(TunedOp::Attention, 64, Blocked), Tiled);
        for head_dim in [32, 64, 128, 256] {
            assert_eq!(kernel_owner(TunedOp::Attention, head_dim, Half), Half);
        }
    }

    #[test]
    fn a_forced_family_runs_everywhere() {
        let selection = Selection::Forced(KernelFamily::Tiled);
        assert_eq!(
            selection.family(TunedOp::Attention, 7, 64, 16),
            KernelFamily::Tiled
        );
        assert!(selection.tuned().is_empty());
    }

    #[test]
    fn the_fastest_family_wins_and_ties_go_to_the_earlier_one() {
        let shape = Shape {
            op: TunedOp::Matmul,
            rows: 16,
            k: 4,
            n: 4,
        };
        let timings = BTreeMap::from([
            (KernelFamily::Portable, 30.0),
            (KernelFamily::Subgroup8, 10.0),
            (KernelFamily::Tiled, 10.0),
        ]);
        let best = TunedShape::from_timings(
            shape,
            KernelFamily::Portable,
            timings,
            TimingSource::HostClock,
        )
        .expect("timings");
        assert_eq!(best.family, KernelFamily::Subgroup8);
        assert!(
            TunedShape::from_timings(
                shape,
                KernelFamily::Portable,
                BTreeMap::new(),
                TimingSource::HostClock
            )
            .is_none()
        );
    }

    #[test]
    fn the_incumbent_keeps_a_shape_unless_clearly_beaten() {
        use super::super::family::{AdapterFacts, KernelFamily::*};
        let gpu = AdapterFacts {
            device_type: wgpu::DeviceType::DiscreteGpu,
            subgroups: true,
            subgroup_min_size: 32,
            subgroup_max_size: 32,
            max_invocations_per_workgroup: 1024,
            max_workgroup_storage: 49152,
            timestamps: true,
            shader_f16: true,
        };
        let incumbent = KernelFamily::default_on(&gpu);
        assert_eq!(incumbent, Tiled);
        // Within the margin, even a faster subgroup kernel leaves it alone.
        let close = BTreeMap::from([(Tiled, 100.0), (Subgroup8, 98.0), (Portable, 150.0)]);
        assert_eq!(choose_family(incumbent, &close), Some(Tiled));
        // Clearly faster by measurement, another family takes the shape.
        let clear = BTreeMap::from([(Tiled, 100.0), (Subgroup8, 120.0), (Portable, 80.0)]);
        assert_eq!(choose_family(incumbent, &clear), Some(Portable));
        // An incumbent that was not timed (dropped) has no say.
        let without = BTreeMap::from([(Subgroup8, 120.0), (Portable, 80.0)]);
        assert_eq!(choose_family(incumbent, &without), Some(Portable));
        assert_eq!(choose_family(incumbent, &BTreeMap::new()), None);
    }

    #[test]
    fn old_cached_choices_read_as_host_clock_timings() {
        let json =
            r#"{"op":"matmul","rows":16,"k":4,"n":4,"family":"tiled","timings_us":{"tiled":1.0}}"#;
        let shape: TunedShape = serde_json::from_str(json).expect("parses");
        assert_eq!(shape.timing, TimingSource::HostClock);
        let json = serde_json::to_string(&TunedShape {
            timing: TimingSource::GpuTimestamps,
            ..shape
        })
        .expect("serializes");
        assert!(json.contains(r#""timing":"gpu_timestamps""#), "{json}");
    }

    #[test]
    fn a_model_runs_each_matmul_attention_norm_and_fusion_at_every_bucket() {
        let minilm = ModelShapes {
            hidden: 384,
            intermediate: 1536,
            heads: 12,
            head_dim: 32,
        };
        let shapes = minilm.shapes();
        assert_eq!(shapes.len(), ROW_BUCKETS.len() * 8);
        for rows in ROW_BUCKETS {
            for (k, n) in [(384, 1152), (384, 384), (384, 1536), (1536, 384)] {
                assert!(shapes.contains(&Shape {
                    op: TunedOp::Matmul,
                    rows,
                    k,
                    n
                }));
            }
            // Each fusion comes after the matmul and norm it is timed against.
            let at = |shape: Shape| shapes.iter().position(|s| *s == shape).expect("listed");
            for k in [384, 1536] {
                let fusion = at(Shape {
                    op: TunedOp::ProjectionNorm,
                    rows,
                    k,
                    n: 384,
                });
                let matmul = at(Shape {
                    op: TunedOp::Matmul,
                    rows,
                    k,
                    n: 384,
                });
                let norm = at(Shape {
                    op: TunedOp::LayerNorm,
                    rows,
                    k: 384,
                    n: 0,
                });
                assert!(matmul < fusion && norm < fusion);
            }
        }
    }

    #[test]
    fn a_projection_fuses_where_measured_faster_or_a_gpu_family_is_forced() {
        let fusion = |rows, fused_us, separate_us| TunedShape {
            shape: Shape {
                op: TunedOp::ProjectionNorm,
                rows,
                k: 384,
                n: 384,
            },
            family: KernelFamily::Tiled,
            timings_us: BTreeMap::from([(KernelFamily::Tiled, separate_us)]),
            timing: TimingSource::GpuTimestamps,
            fusion: Some(FusionTiming {
                fused_us,
                separate_us,
            }),
        };
        let selection = Selection::Tuned {
            // Faster at 16 rows; within the margin at 128; slower at 512.
            shapes: vec![
                fusion(16, 10.0, 14.0),
                fusion(128, 19.8, 20.0),
                fusion(512, 60.0, 50.0),
            ],
            fallback: KernelFamily::Tiled,
        };
        assert!(selection.fuses_projection_norm(20, 384, 384));
        assert!(!selection.fuses_projection_norm(128, 384, 384));
        assert!(!selection.fuses_projection_norm(600, 384, 384));
        // A shape never measured (the fused kernel cannot take it) stays apart.
        assert!(!selection.fuses_projection_norm(16, 384, 2048));
        assert!(Selection::Forced(KernelFamily::Blocked).fuses_projection_norm(16, 384, 384));
        assert!(!Selection::Forced(KernelFamily::Subgroup8).fuses_projection_norm(16, 384, 384));
    }
}
