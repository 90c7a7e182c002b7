//! GPT-2 (`model_type: gpt2`) run as an embedder: learned token and
//! position tables, pre-norm layers with LayerNorms and biases, causal
//! attention, a plain feed-forward, and the final `ln_f`. Its linear layers
//! are `Conv1D`s, whose weights are stored `[in, out]`, the transpose of
//! everyone else's. The language model head is never read.

use std::path::Path;

use serde::Deserialize;

use super::blocks::{FeedForward, LearnedEmbeddings, Linear, Norm, PreNormLayer, SelfAttention};
use super::packing::{Element, PackedWeights, Packer, Zeros, for_dtype};
use super::{Architecture, Dims, ModelConfig, Recorder, hidden_activation};
use crate::config::Activation;
use crate::dtype::WeightDtype;
use crate::error::{Error, Result};
use crate::kernels::DispatchPlan;
use crate::kernels::attention::{HeadLayout, Window};
use crate::weights::TensorSource;

pub const TOKEN_EMBEDDINGS: &str = "wte.weight";
const POSITION_EMBEDDINGS: &str = "wpe.weight";
pub const LAYER_PREFIX: &str = "h";
const FINAL_NORM: &str = "ln_f";

/// Mirrors the fields of a GPT-2 `config.json` that the forward pass reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_layer: usize,
    pub n_positions: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(default)]
    pub pad_token_id: Option<usize>,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

impl Gpt2Config {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn dims(&self) -> Dims {
        Dims {
            hidden: self.n_embd,
            heads: self.n_head,
            head_dim: self.head_dim(),
            ffn: self.inner(),
            gated: false,
            layers: self.n_layer,
            vocab: self.vocab_size,
            type_vocab: 0,
            relative_buckets: 0,
            kv_heads: self.n_head,
            rotary_tables: 0,
        }
    }

    /// The score scale of layer `index`.
    fn scale(&self, index: usize) -> f32 {
        let mut scale = 1.0f32;
        if self.scale_attn_weights {
            scale /= (self.head_dim() as f32).sqrt();
        }
        if self.scale_attn_by_inverse_layer_idx {
            scale /= (index + 1) as f32;
        }
        scale
    }

    fn activation(&self) -> Activation {
        // Checked by `validate` before any model is built.
        hidden_activation(
            Path::new(""),
            "activation_function",
            &self.activation_function,
        )
        .unwrap_or(Activation::GeluTanh)
    }

    pub(super) fn validate(&self, path: &Path) -> Result<()> {
        hidden_activation(path, "activation_function", &self.activation_function)?;
        if self.add_cross_attention {
            return Err(Error::Unsupported {
                path: path.into(),
                field: "add_cross_attention",
                value: "true".into(),
                supported: "false",
            });
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::bad_model(
                path,
                format!(
                    "n_embd {} is not a multiple of n_head {}",
                    self.n_embd, self.n_head
                ),
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(Error::bad_model(
                path,
                "`layer_norm_epsilon` must be positive",
            ));
        }
        Ok(())
    }
}

/// The pinned tensors: the token and position tables and `ln_f`.
pub fn is_pinned(name: &str) -> bool {
    name == TOKEN_EMBEDDINGS || name == POSITION_EMBEDDINGS || name.starts_with("ln_f.")
}

pub struct Gpt2 {
    config: ModelConfig,
    gpt2: Gpt2Config,
    embeddings: LearnedEmbeddings,
    final_norm: Norm,
    /// `h.{i}`: the layout every layer shares; scales may differ by layer.
    layer: PreNormLayer,
    layer_len: usize,
}

impl Gpt2 {
    pub fn new(config: ModelConfig, gpt2: &Gpt2Config) -> Self {
        let gpt2 = gpt2.clone();
        let ((embeddings, final_norm), _) = pack_pinned::<half::f16>(&gpt2, &Zeros)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        let (layer, packed) = pack_layer::<half::f16>(&gpt2, &Zeros, 0)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        Self {
            config,
            gpt2,
            embeddings,
            final_norm,
            layer,
            layer_len: packed.len(),
        }
    }
}

fn pack_pinned<T: Element>(
    gpt2: &Gpt2Config,
    source: &dyn TensorSource,
) -> Result<((LearnedEmbeddings, Norm), PackedWeights)> {
    let h = gpt2.n_embd;
    let mut p = Packer::<T>::new(source, (gpt2.n_positions + 2) * h + 8);
    let embeddings = LearnedEmbeddings::pack(
        &mut p,
        h,
        Some((POSITION_EMBEDDINGS, gpt2.n_positions)),
        None,
        None,
    )?;
    let final_norm = Norm::pack_layer_norm(&mut p, FINAL_NORM, h, gpt2.layer_norm_epsilon)?;
    Ok(((embeddings, final_norm), p.finish()))
}

fn pack_layer<T: Element>(
    gpt2: &Gpt2Config,
    source: &dyn TensorSource,
    index: usize,
) -> Result<(PreNormLayer, PackedWeights)> {
    let h = gpt2.n_embd;
    let inner = gpt2.inner();
    let eps = gpt2.layer_norm_epsilon;
    let mut p = Packer::<T>::new(source, h * (4 * h + 2 * inner) + 9 * h + inner + 64);
    let name = |short: &str| format!("{LAYER_PREFIX}.{index}.{short}");
    let attention_norm = Norm::pack_layer_norm(&mut p, &name("ln_1"), h, eps)?;
    let qkv = Linear::pack_conv1d(&mut p, &name("attn.c_attn"), h, 3 * h)?;
    let output = Linear::pack_conv1d(&mut p, &name("attn.c_proj"), h, h)?;
    let layout = HeadLayout::multi_head(gpt2.n_head, gpt2.head_dim());
    let attention =
        SelfAttention::new(qkv, output, layout, gpt2.scale(index)).with_window(Window::CAUSAL);
    let ffn_norm = Norm::pack_layer_norm(&mut p, &name("ln_2"), h, eps)?;
    let up = Linear::pack_conv1d(&mut p, &name("mlp.c_fc"), h, inner)?;
    let down = Linear::pack_conv1d(&mut p, &name("mlp.c_proj"), inner, h)?;
    let layer = PreNormLayer {
        attention_norm: Some(attention_norm),
        attention,
        ffn_norm,
        ffn: FeedForward::new(up, down, gpt2.activation(), false),
    };
    Ok((layer, p.finish()))
}

impl Architecture for Gpt2 {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn pack_pinned(&self, source: &dyn TensorSource, dtype: WeightDtype) -> Result<PackedWeights> {
        let (_, packed) = for_dtype(
            dtype,
            || pack_pinned::<f32>(&self.gpt2, source),
            || pack_pinned::<half::f16>(&self.gpt2, source),
        )?;
        Ok(packed)
    }

    fn pack_layer(
        &self,
        source: &dyn TensorSource,
        index: usize,
        dtype: WeightDtype,
    ) -> Result<PackedWeights> {
        let (_, packed) = for_dtype(
            dtype,
            || pack_layer::<f32>(&self.gpt2, source, index),
            || pack_layer::<half::f16>(&self.gpt2, source, index),
        )?;
        Ok(packed)
    }

    fn layer_len(&self) -> usize {
        self.layer_len
    }

    fn word_table(&self, _source: &dyn TensorSource) -> &'static str {
        TOKEN_EMBEDDINGS
    }

    fn record_embeddings(&self, cx: &Recorder<'_>, plan: &mut DispatchPlan, pinned: &wgpu::Buffer) {
        self.embeddings.record(cx, plan, pinned);
    }

    fn record_layer(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        index: usize,
        weights: &wgpu::Buffer,
    ) {
        let layer = PreNormLayer {
            attention: self.layer.attention.with_scale(self.gpt2.scale(index)),
            ..self.layer
        };
        layer.record(cx, plan, index == 0, weights, None);
    }

    fn record_final<'b>(
        &self,
        cx: &Recorder<'b>,
        plan: &mut DispatchPlan,
        pinned: &wgpu::Buffer,
    ) -> &'b wgpu::Buffer {
        PreNormLayer::record_final(&self.final_norm, cx, plan, pinned)
    }
}
