//! The blocks families share, each packing its tensors (host) and recording
//! its kernels (GPU): linear layers, norms, the embedding sum, self-attention,
//! the plain and gated feed-forward, the post-norm encoder layer of BERT,
//! RoBERTa and MPNet, and the relative position bias of MPNet and T5.

use crate::config::Activation;
use crate::error::Result;
use crate::kernels::DispatchPlan;
use crate::kernels::attention::{AttentionOptions, HeadLayout, Window};
use crate::kernels::embed::EmbeddingTables;
use crate::kernels::layernorm::{LayerNormOperands, NormOptions};
use crate::kernels::matmul::{Epilogue, MatmulOperands};
use crate::kernels::matmul_norm::MatmulNormOperands;
use crate::kernels::rotary::HeadNorm;
use crate::kernels::selection::TunedOp;

use super::Recorder;
use super::packing::{Element, Packer};

/// A linear layer: its weight packed transposed ([in, out], the matmul's B)
/// and its bias (zeros for layers without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linear {
    pub weight: u32,
    pub bias: u32,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Packs `{name}.weight` ([out, in]) and `{name}.bias`.
    pub fn pack<T: Element>(
        p: &mut Packer<'_, T>,
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        Self::pack_fused(p, &[name], in_features, out_features, bias)
    }

    /// Packs linear layers that read the same input as one whose output is
    /// theirs side by side: query, key and value; gate and up.
    pub fn pack_fused<T: Element>(
        p: &mut Packer<'_, T>,
        names: &[&str],
        in_features: usize,
        out_each: usize,
        bias: bool,
    ) -> Result<Self> {
        let parts: Vec<(&str, usize)> = names.iter().map(|name| (*name, out_each)).collect();
        Self::pack_concat(p, &parts, in_features, bias)
    }

    /// Like `pack_fused`, for layers of different widths `(name, out)`:
    /// grouped-query attention's queries and its fewer keys and values.
    pub fn pack_concat<T: Element>(
        p: &mut Packer<'_, T>,
        parts: &[(&str, usize)],
        in_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let out_features = parts.iter().map(|(_, out)| out).sum();
        let mut weight = Vec::with_capacity(out_features * in_features);
        for (name, out) in parts {
            weight.extend(p.read(&format!("{name}.weight"), &[*out, in_features])?);
        }
        let weight = p.put_transposed(&weight, out_features, in_features);
        let bias = if bias {
            let mut values = Vec::with_capacity(out_features);
            for (name, out) in parts {
                values.extend(p.read(&format!("{name}.bias"), &[*out])?);
            }
            p.put(&values)
        } else {
            p.put_zeros(out_features)
        };
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
        })
    }

    /// Packs GPT-2's `Conv1D` `{name}.weight`, stored `[in, out]` (already
    /// the matmul's layout), and `{name}.bias`.
    pub fn pack_conv1d<T: Element>(
        p: &mut Packer<'_, T>,
        name: &str,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self> {
        let weight = p.put_tensor(&format!("{name}.weight"), &[in_features, out_features])?;
        let bias = p.put_tensor(&format!("{name}.bias"), &[out_features])?;
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
        })
    }

    /// Records `out = activation(lhs · W + b)` over `rows` rows.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        rows: usize,
        activation: Activation,
        lhs: &wgpu::Buffer,
        weights: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        cx.kernels.matmul(
            plan,
            rows,
            self.out_features,
            self.in_features,
            Epilogue::BiasThen(activation),
            MatmulOperands {
                lhs,
                a_offset: 0,
                weights,
                b_offset: self.weight,
                bias_offset: self.bias,
                out,
                c_offset: 0,
            },
        );
    }

    /// Records `lhs · W + b` (no activation) into `to`: `batch.scratch`, or
    /// added to a residual and normalised, in one fused kernel where the
    /// selection measured that faster.
    pub fn record_into(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        rows: usize,
        lhs: &wgpu::Buffer,
        weights: &wgpu::Buffer,
        to: ProjectionOut<'_>,
    ) {
        let scratch = &cx.batch.scratch;
        let ProjectionOut::AddAndNorm {
            norm,
            residual,
            write_sum,
            out,
        } = to
        else {
            self.record(cx, plan, rows, Activation::Identity, lhs, weights, scratch);
            return;
        };
        let (n, k) = (self.out_features, self.in_features);
        let beta = norm.beta.unwrap_or(norm.gamma);
        let fused = norm.width == n
            && cx.kernels.selection.fuses_projection_norm(rows, k, n)
            && cx
                .kernels
                .matmul_norm
                .takes(n, k, &[self.weight, self.bias, norm.gamma, beta]);
        if fused {
            cx.kernels.matmul_norm.push(
                plan,
                rows,
                n,
                k,
                norm.eps,
                norm.options(write_sum),
                MatmulNormOperands {
                    lhs,
                    weights,
                    b_offset: self.weight,
                    bias_offset: self.bias,
                    gamma_offset: norm.gamma,
                    beta_offset: beta,
                    residual,
                    out,
                },
            );
        } else {
            self.record(cx, plan, rows, Activation::Identity, lhs, weights, scratch);
            norm.record(cx, plan, scratch, Some(residual), write_sum, weights, out);
        }
    }
}

/// Where a sublayer's last projection goes.
#[derive(Clone, Copy)]
pub enum ProjectionOut<'a> {
    /// Into `batch.scratch`, for a later kernel to add.
    Scratch,
    /// `out = norm(projection + residual)`; with `write_sum`, `residual`
    /// becomes the sum too (the pre-norm layers' stream).
    AddAndNorm {
        norm: &'a Norm,
        residual: &'a wgpu::Buffer,
        write_sum: bool,
        out: &'a wgpu::Buffer,
    },
}

/// A LayerNorm (gamma and beta) or an RMS norm (gamma only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    gamma: u32,
    beta: Option<u32>,
    eps: f32,
    width: usize,
}

impl Norm {
    /// Packs the LayerNorm `{name}.weight`, `{name}.bias`.
    pub fn pack_layer_norm<T: Element>(
        p: &mut Packer<'_, T>,
        name: &str,
        width: usize,
        eps: f64,
    ) -> Result<Self> {
        let gamma = p.put_tensor(&format!("{name}.weight"), &[width])?;
        let beta = p.put_tensor(&format!("{name}.bias"), &[width])?;
        Ok(Self {
            gamma,
            beta: Some(beta),
            eps: eps as f32,
            width,
        })
    }

    /// Packs a LayerNorm without a bias (`norm_bias: false`): `{name}.weight`,
    /// and zeros for the bias.
    pub fn pack_layer_norm_without_bias<T: Element>(
        p: &mut Packer<'_, T>,
        name: &str,
        width: usize,
        eps: f64,
    ) -> Result<Self> {
        let gamma = p.put_tensor(&format!("{name}.weight"), &[width])?;
        let beta = p.put_zeros(width);
        Ok(Self {
            gamma,
            beta: Some(beta),
            eps: eps as f32,
            width,
        })
    }

    /// Packs the RMS norm whose gain is the tensor `weight_name`.
    pub fn pack_rms<T: Element>(
        p: &mut Packer<'_, T>,
        weight_name: &str,
        width: usize,
        eps: f64,
    ) -> Result<Self> {
        let gamma = p.put_tensor(weight_name, &[width])?;
        Ok(Self {
            gamma,
            beta: None,
            eps: eps as f32,
            width,
        })
    }

    fn options(&self, write_sum: bool) -> NormOptions {
        NormOptions {
            rms: self.beta.is_none(),
            write_sum,
        }
    }

    /// Records `out = norm(x + residual)`; with `write_sum`, `residual`
    /// becomes `x + residual` too.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        x: &wgpu::Buffer,
        residual: Option<&wgpu::Buffer>,
        write_sum: bool,
        weights: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        let options = self.options(write_sum);
        cx.kernels.norm(
            cx.gpu,
            plan,
            cx.batch.rows,
            self.width,
            self.eps,
            options,
            LayerNormOperands {
                x,
                residual,
                weights,
                gamma_offset: self.gamma,
                beta_offset: self.beta.unwrap_or(self.gamma),
                out,
            },
        );
    }
}

/// The embedding sum: each token's word row (gathered on the host) plus
/// its learned position and token-type rows where the family has them,
/// then a LayerNorm where it has one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnedEmbeddings {
    tables: (Option<u32>, Option<u32>),
    norm: Option<Norm>,
    hidden: usize,
}

impl LearnedEmbeddings {
    /// `position` and `token_type` are `(tensor, rows)`; `norm` is the
    /// LayerNorm's name and epsilon.
    pub fn pack<T: Element>(
        p: &mut Packer<'_, T>,
        hidden: usize,
        position: Option<(&str, usize)>,
        token_type: Option<(&str, usize)>,
        norm: Option<(&str, f64)>,
    ) -> Result<Self> {
        let mut table = |spec: Option<(&str, usize)>| -> Result<Option<u32>> {
            spec.map(|(name, rows)| p.put_tensor(name, &[rows, hidden]))
                .transpose()
        };
        let position = table(position)?;
        let token_type = table(token_type)?;
        let norm = norm
            .map(|(name, eps)| Norm::pack_layer_norm(p, name, hidden, eps))
            .transpose()?;
        Ok(Self {
            tables: (position, token_type),
            norm,
            hidden,
        })
    }

    /// The word rows, normalised by `norm` (ModernBERT).
    pub fn normalised_words(hidden: usize, norm: Norm) -> Self {
        Self {
            tables: (None, None),
            norm: Some(norm),
            hidden,
        }
    }

    /// The word rows alone: no position or type table, no norm (T5, the
    /// decoders).
    pub fn words_only(hidden: usize) -> Self {
        Self {
            tables: (None, None),
            norm: None,
            hidden,
        }
    }

    /// Records the sum (and norm) into `batch.hidden`.
    pub fn record(&self, cx: &Recorder<'_>, plan: &mut DispatchPlan, pinned: &wgpu::Buffer) {
        let batch = cx.batch;
        let sum = if self.norm.is_some() {
            &batch.scratch
        } else {
            &batch.hidden
        };
        cx.kernels.embed.push(
            cx.gpu,
            plan,
            batch.rows,
            self.hidden,
            &batch.tokens,
            &batch.word_rows,
            pinned,
            EmbeddingTables {
                position_offset: self.tables.0,
                type_offset: self.tables.1,
            },
            sum,
        );
        if let Some(norm) = &self.norm {
            norm.record(cx, plan, sum, None, false, pinned, &batch.hidden);
        }
    }
}

/// The checkpoint names of an attention's projections.
pub struct AttentionNames<'a> {
    pub query: &'a str,
    pub key: &'a str,
    pub value: &'a str,
    pub output: &'a str,
}

/// The rotary embedding a layer applies to its queries and keys: which of
/// the model's tables, and the per-head norm before it where there is one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RotaryUse {
    pub table: usize,
    pub norm: Option<HeadNorm>,
}

/// Multi-head self-attention: the fused query-key-value projection, the
/// rotary embedding where the family has one, the attention itself and the
/// output projection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelfAttention {
    qkv: Linear,
    output: Linear,
    layout: HeadLayout,
    scale: f32,
    window: Window,
    rotary: Option<RotaryUse>,
}

impl SelfAttention {
    /// Packs separate query, key and value layers of `heads` heads each.
    #[allow(clippy::too_many_arguments)]
    pub fn pack<T: Element>(
        p: &mut Packer<'_, T>,
        names: &AttentionNames<'_>,
        hidden: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
        scale: f32,
    ) -> Result<Self> {
        let width = heads * head_dim;
        let qkv = Linear::pack_fused(
            p,
            &[names.query, names.key, names.value],
            hidden,
            width,
            bias,
        )?;
        let output = Linear::pack(p, names.output, width, hidden, bias)?;
        Ok(Self::new(
            qkv,
            output,
            HeadLayout::multi_head(heads, head_dim),
            scale,
        ))
    }

    /// An attention over projections packed by the family: `qkv` writes
    /// rows laid out as `layout` says.
    pub fn new(qkv: Linear, output: Linear, layout: HeadLayout, scale: f32) -> Self {
        Self {
            qkv,
            output,
            layout,
            scale,
            window: Window::FULL,
            rotary: None,
        }
    }

    pub fn with_scale(self, scale: f32) -> Self {
        Self { scale, ..self }
    }

    pub fn with_window(self, window: Window) -> Self {
        Self { window, ..self }
    }

    pub fn with_rotary(self, rotary: RotaryUse) -> Self {
        Self {
            rotary: Some(rotary),
            ..self
        }
    }

    /// Records the attention of `input`, its output projection going `to`.
    pub fn record(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        input: &wgpu::Buffer,
        weights: &wgpu::Buffer,
        position_bias: Option<&wgpu::Buffer>,
        to: ProjectionOut<'_>,
    ) {
        let batch = cx.batch;
        let rows = batch.rows;
        self.qkv.record(
            cx,
            plan,
            rows,
            Activation::Identity,
            input,
            weights,
            &batch.qkv,
        );
        if let (Some(rotary), Some(tables)) = (&self.rotary, &batch.rotary) {
            cx.kernels.rotary.push(
                cx.gpu,
                plan,
                rows,
                batch.seq_len,
                self.layout,
                rotary.table,
                rotary.norm,
                &batch.qkv,
                tables,
                weights,
            );
        }
        let family = cx.kernels.selection.family(
            TunedOp::Attention,
            batch.sequences * batch.seq_len,
            self.layout.head_dim,
            self.layout.heads,
        );
        cx.kernels.attention.push_with(
            family,
            plan,
            batch.sequences,
            batch.seq_len,
            self.layout,
            AttentionOptions {
                scale: self.scale,
                position_bias,
                window: self.window,
            },
            &batch.qkv,
            &batch.mask,
            &batch.context,
        );
        self.output
            .record_into(cx, plan, rows, &batch.context, weights, to);
    }
}

/// The feed-forward: `down(act(up(x)))`, or gated, `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedForward {
    /// Up, or gate and up fused side by side.
    up: Linear,
    down: Linear,
    activation: Activation,
    gated: bool,
}

impl FeedForward {
    /// A feed-forward over projections packed by the family; a gated one's
    /// `up` writes the activated half first.
    pub fn new(up: Linear, down: Linear, activation: Activation, gated: bool) -> Self {
        Self {
            up,
            down,
            activation,
            gated,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn pack_plain<T: Element>(
        p: &mut Packer<'_, T>,
        up: &str,
        down: &str,
        hidden: usize,
        ffn: usize,
        bias: bool,
        activation: Activation,
    ) -> Result<Self> {
        Ok(Self {
            up: Linear::pack(p, up, hidden, ffn, bias)?,
            down: Linear::pack(p, down, ffn, hidden, bias)?,
            activation,
            gated: false,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn pack_gated<T: Element>(
        p: &mut Packer<'_, T>,
        gate: &str,
        up: &str,
        down: &str,
        hidden: usize,
        ffn: usize,
        bias: bool,
        activation: Activation,
    ) -> Result<Self> {
        Ok(Self {
            up: Linear::pack_fused(p, &[gate, up], hidden, ffn, bias)?,
            down: Linear::pack(p, down, ffn, hidden, bias)?,
            activation,
            gated: true,
        })
    }

    /// Records the feed-forward of `input`, its down projection going `to`.
    pub fn record(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        input: &wgpu::Buffer,
        weights: &wgpu::Buffer,
        to: ProjectionOut<'_>,
    ) {
        let batch = cx.batch;
        let rows = batch.rows;
        let inner = match (&batch.gated, self.gated) {
            (Some(gated), true) => {
                self.up.record(
                    cx,
                    plan,
                    rows,
                    Activation::Identity,
                    input,
                    weights,
                    &batch.intermediate,
                );
                let width = self.down.in_features;
                cx.kernels.gate.push(
                    cx.gpu,
                    plan,
                    rows,
                    width,
                    self.activation,
                    &batch.intermediate,
                    gated,
                );
                gated
            }
            _ => {
                self.up.record(
                    cx,
                    plan,
                    rows,
                    self.activation,
                    input,
                    weights,
                    &batch.intermediate,
                );
                &batch.intermediate
            }
        };
        self.down.record_into(cx, plan, rows, inner, weights, to);
    }
}

/// The checkpoint names (under the layer's prefix) of a post-norm layer.
pub struct PostNormNames<'a> {
    pub attention: AttentionNames<'a>,
    pub attention_norm: &'a str,
    pub up: &'a str,
    pub down: &'a str,
    pub output_norm: &'a str,
}

/// The encoder layer of BERT, RoBERTa and MPNet: attention, residual and
/// LayerNorm, feed-forward, residual and LayerNorm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostNormLayer {
    attention: SelfAttention,
    attention_norm: Norm,
    ffn: FeedForward,
    output_norm: Norm,
}

/// The sizes a post-norm layer is packed with.
pub struct PostNormShape {
    pub hidden: usize,
    pub heads: usize,
    pub ffn: usize,
    pub eps: f64,
    pub activation: Activation,
}

impl PostNormLayer {
    pub fn pack<T: Element>(
        p: &mut Packer<'_, T>,
        prefix: &str,
        names: &PostNormNames<'_>,
        shape: &PostNormShape,
    ) -> Result<Self> {
        let name = |short: &str| format!("{prefix}.{short}");
        let (query, key, value, output) = (
            name(names.attention.query),
            name(names.attention.key),
            name(names.attention.value),
            name(names.attention.output),
        );
        let h = shape.hidden;
        let head_dim = h / shape.heads;
        let attention = SelfAttention::pack(
            p,
            &AttentionNames {
                query: &query,
                key: &key,
                value: &value,
                output: &output,
            },
            h,
            shape.heads,
            head_dim,
            true,
            1.0 / (head_dim as f32).sqrt(),
        )?;
        let attention_norm = Norm::pack_layer_norm(p, &name(names.attention_norm), h, shape.eps)?;
        let ffn = FeedForward::pack_plain(
            p,
            &name(names.up),
            &name(names.down),
            h,
            shape.ffn,
            true,
            shape.activation,
        )?;
        let output_norm = Norm::pack_layer_norm(p, &name(names.output_norm), h, shape.eps)?;
        Ok(Self {
            attention,
            attention_norm,
            ffn,
            output_norm,
        })
    }

    /// Records the layer: `batch.hidden` in, `batch.hidden` out.
    pub fn record(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        weights: &wgpu::Buffer,
        position_bias: Option<&wgpu::Buffer>,
    ) {
        let batch = cx.batch;
        self.attention.record(
            cx,
            plan,
            &batch.hidden,
            weights,
            position_bias,
            ProjectionOut::AddAndNorm {
                norm: &self.attention_norm,
                residual: &batch.hidden,
                write_sum: false,
                out: &batch.attention_output,
            },
        );
        self.ffn.record(
            cx,
            plan,
            &batch.attention_output,
            weights,
            ProjectionOut::AddAndNorm {
                norm: &self.output_norm,
                residual: &batch.attention_output,
                write_sum: false,
                out: &batch.hidden,
            },
        );
    }
}

/// The pre-norm layer of T5, the decoders, GPT-2 and ModernBERT: norm,
/// attention, residual; norm, feed-forward, residual. The residual stream
/// stays in `batch.hidden`; each sublayer's output (left in `batch.scratch`)
/// is added to it by the norm that follows, the next sublayer's or the
/// model's final one, in the same kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreNormLayer {
    /// `None` where the layer reads the stream as it is (ModernBERT's
    /// first layer, whose input is already normalised).
    pub attention_norm: Option<Norm>,
    pub attention: SelfAttention,
    pub ffn_norm: Norm,
    pub ffn: FeedForward,
}

impl PreNormLayer {
    /// Records the layer; `first` is the model's first layer, which finds the
    /// embeddings in `batch.hidden` and no sublayer output to add.
    pub fn record(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        first: bool,
        weights: &wgpu::Buffer,
        position_bias: Option<&wgpu::Buffer>,
    ) {
        let batch = cx.batch;
        let input = match (&self.attention_norm, first) {
            (Some(norm), true) => {
                norm.record(
                    cx,
                    plan,
                    &batch.hidden,
                    None,
                    false,
                    weights,
                    &batch.attention_output,
                );
                &batch.attention_output
            }
            (Some(norm), false) => {
                norm.record(
                    cx,
                    plan,
                    &batch.scratch,
                    Some(&batch.hidden),
                    true,
                    weights,
                    &batch.attention_output,
                );
                &batch.attention_output
            }
            (None, first) => {
                debug_assert!(first, "only a first layer reads the stream unnormalised");
                &batch.hidden
            }
        };
        self.attention.record(
            cx,
            plan,
            input,
            weights,
            position_bias,
            ProjectionOut::AddAndNorm {
                norm: &self.ffn_norm,
                residual: &batch.hidden,
                write_sum: true,
                out: &batch.attention_output,
            },
        );
        // The next layer's norm, or the model's final one, adds this.
        self.ffn.record(
            cx,
            plan,
            &batch.attention_output,
            weights,
            ProjectionOut::Scratch,
        );
    }

    /// Records the model's final norm (gains in `weights`) over the stream
    /// plus the last layer's output; returns the buffer it writes.
    pub fn record_final<'b>(
        norm: &Norm,
        cx: &Recorder<'b>,
        plan: &mut DispatchPlan,
        weights: &wgpu::Buffer,
    ) -> &'b wgpu::Buffer {
        let batch = cx.batch;
        norm.record(
            cx,
            plan,
            &batch.scratch,
            Some(&batch.hidden),
            true,
            weights,
            &batch.attention_output,
        );
        &batch.attention_output
    }
}

/// A relative position bias shared by every layer (MPNet, T5): a learned
/// value per head for each bucket of key - query distances.
#[derive(Debug, Clone, PartialEq)]
pub struct RelativeBias {
    /// `[buckets, heads]`, as checkpoints store it.
    table: Vec<f32>,
    heads: usize,
    buckets: usize,
    max_distance: usize,
}

impl RelativeBias {
    pub fn new(table: Vec<f32>, heads: usize, buckets: usize, max_distance: usize) -> Self {
        Self {
            table,
            heads,
            buckets,
            max_distance,
        }
    }

    /// `[heads, 2 * seq - 1]`: the bias of key - query = d at `d + seq - 1`,
    /// the layout the attention kernels read.
    pub fn for_length(&self, seq: usize) -> Vec<f32> {
        let span = 2 * seq - 1;
        let mut out = vec![0.0; self.heads * span];
        for i in 0..span {
            let relative = i as i64 - (seq as i64 - 1);
            let bucket = relative_position_bucket(relative, self.buckets, self.max_distance);
            for head in 0..self.heads {
                out[head * span + i] = self.table[bucket * self.heads + head];
            }
        }
        out
    }
}

/// T5's bidirectional bucket of `relative` = key - query (MPNet uses the
/// same): half the buckets for keys after the query; exact distances below
/// a quarter of the buckets, logarithmic ones up to `max_distance` after.
/// Computed in f32 and truncated, as the reference implementation does, so
/// that distances on a bucket boundary land where they land there.
pub fn relative_position_bucket(relative: i64, buckets: usize, max_distance: usize) -> usize {
    let half = buckets / 2;
    let offset = if relative > 0 { half } else { 0 };
    let distance = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    if distance < max_exact {
        return offset + distance;
    }
    let log_ratio = (distance as f32 / max_exact as f32).ln()
        / (max_distance as f32 / max_exact as f32).ln()
        * (half - max_exact) as f32;
    let large = max_exact + log_ratio as usize;
    offset + large.min(half - 1)
}

#[cfg(test)]
mod tests {
    use super::{RelativeBias, relative_position_bucket};

    #[test]
    fn buckets_match_the_reference_values() {
        // transformers' T5 `_relative_position_bucket(bidirectional=True,
        // num_buckets=32, max_distance=128)` for these distances.
        let expected = [
            (-200, 15),
            (-128, 15),
            (-100, 15),
            (-64, 14),
            (-20, 10),
            (-8, 8),
            (-7, 7),
            (-1, 1),
            (0, 0),
            (1, 17),
            (7, 23),
            (8, 24),
            (20, 26),
            (64, 30),
            (127, 31),
            (500, 31),
        ];
        for (relative, bucket) in expected {
            assert_eq!(
                relative_position_bucket(relative, 32, 128),
                bucket,
                "distance {relative}"
            );
        }
    }

    #[test]
    fn the_bias_of_a_length_is_laid_out_by_head_then_distance() {
        // Two heads, 32 buckets: bucket b of head h holds 100 h + b.
        let table: Vec<f32> = (0..32)
            .flat_map(|b| (0..2).map(move |h| (100 * h + b) as f32))
            .collect();
        let bias = RelativeBias::new(table, 2, 32, 128);
        let seq = 5;
        let laid = bias.for_length(seq);
        assert_eq!(laid.len(), 2 * 9);
        for head in 0..2 {
            for i in 0..9 {
                let relative = i as i64 - 4;
                let bucket = relative_position_bucket(relative, 32, 128);
                assert_eq!(laid[head * 9 + i], (100 * head + bucket) as f32);
            }
        }
    }
}
