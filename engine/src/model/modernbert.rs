//! ModernBERT (`model_type: modernbert`): a bidirectional encoder with
//! normalised token embeddings and no position table, pre-norm layers with
//! LayerNorms and projections that carry no biases by default, rotary
//! positions with one theta for the global layers and another for the local
//! ones, local layers that see a band of `local_attention / 2` keys on each
//! side (every layer but each `global_attn_every_n_layers`-th), a GeGLU
//! feed-forward, and a final norm. The first layer reads the normalised
//! embeddings without a norm of its own.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::blocks::{
    FeedForward, LearnedEmbeddings, Linear, Norm, PreNormLayer, RotaryUse, SelfAttention,
};
use super::packing::{Element, PackedWeights, Packer, Zeros, for_dtype};
use super::rope::RopeFields;
use super::{Architecture, Dims, ModelConfig, Recorder, hidden_activation};
use crate::config::Activation;
use crate::dtype::WeightDtype;
use crate::error::{Error, Result};
use crate::kernels::DispatchPlan;
use crate::kernels::attention::{HeadLayout, Window};
use crate::kernels::rotary::{RotaryFrequencies, RotaryTables};
use crate::weights::TensorSource;

pub const TOKEN_EMBEDDINGS: &str = "embeddings.tok_embeddings.weight";
const EMBEDDING_NORM: &str = "embeddings.norm";
pub const LAYER_PREFIX: &str = "layers";
const FINAL_NORM: &str = "final_norm";

/// Rotary tables: the global layers' theta, then the local layers'.
const GLOBAL_TABLE: usize = 0;
const LOCAL_TABLE: usize = 1;

/// Mirrors the fields of a ModernBERT `config.json` that the forward pass reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_activation")]
    pub hidden_activation: String,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_global_every")]
    pub global_attn_every_n_layers: usize,
    #[serde(default = "default_local_attention")]
    pub local_attention: usize,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub pad_token_id: usize,
}

fn default_activation() -> String {
    "gelu".into()
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_global_every() -> usize {
    3
}
fn default_local_attention() -> usize {
    128
}
fn default_max_positions() -> usize {
    8192
}

impl ModernBertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    pub fn dims(&self) -> Dims {
        Dims {
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            head_dim: self.head_dim(),
            ffn: self.intermediate_size,
            gated: true,
            layers: self.num_hidden_layers,
            vocab: self.vocab_size,
            type_vocab: 0,
            relative_buckets: 0,
            kv_heads: self.num_attention_heads,
            rotary_tables: 2,
        }
    }

    /// Whether layer `index` is local (sliding-window) rather than global.
    fn is_local(&self, index: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(index).is_some_and(|t| t == "sliding_attention"),
            None => !index.is_multiple_of(self.global_attn_every_n_layers.max(1)),
        }
    }

    fn window(&self, index: usize) -> Window {
        if self.is_local(index) {
            Window::band(self.local_attention / 2)
        } else {
            Window::FULL
        }
    }

    fn theta(&self, path: &Path, local: bool) -> Result<f64> {
        let (layer_type, legacy, default) = if local {
            ("sliding_attention", self.local_rope_theta, 10000.0)
        } else {
            ("full_attention", self.global_rope_theta, 160000.0)
        };
        RopeFields {
            parameters: self.rope_parameters.as_ref(),
            scaling: None,
            legacy_theta: legacy,
            default_theta: default,
        }
        .theta(path, layer_type)
    }

    fn activation(&self) -> Activation {
        // Checked by `validate` before any model is built.
        hidden_activation(Path::new(""), "hidden_activation", &self.hidden_activation)
            .unwrap_or(Activation::GeluErf)
    }

    pub(super) fn validate(&self, path: &Path) -> Result<()> {
        hidden_activation(path, "hidden_activation", &self.hidden_activation)?;
        self.theta(path, false)?;
        self.theta(path, true)?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::bad_model(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        super::validate_layer_types(path, self.layer_types.as_deref(), self.num_hidden_layers)?;
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::bad_model(path, "`norm_eps` must be positive"));
        }
        Ok(())
    }
}

/// The pinned tensors: the token table, its norm and the final norm.
pub fn is_pinned(name: &str) -> bool {
    name.starts_with("embeddings.") || name.starts_with("final_norm.")
}

pub struct ModernBert {
    config: ModelConfig,
    modern: ModernBertConfig,
    embeddings: LearnedEmbeddings,
    final_norm: Norm,
    /// `layers.{i}`: the layout every layer shares (the first one's missing
    /// norm packed as zeros); windows and rotary tables differ by layer.
    layer: PreNormLayer,
    layer_len: usize,
}

impl ModernBert {
    pub fn new(config: ModelConfig, modern: &ModernBertConfig) -> Self {
        let modern = modern.clone();
        let ((embeddings, final_norm), _) = pack_pinned::<half::f16>(&modern, &Zeros)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        let (layer, packed) = pack_layer::<half::f16>(&modern, &Zeros, 1)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        Self {
            config,
            modern,
            embeddings,
            final_norm,
            layer,
            layer_len: packed.len(),
        }
    }
}

/// A LayerNorm with or without its bias, as `norm_bias` says.
fn pack_norm<T: Element>(
    p: &mut Packer<'_, T>,
    modern: &ModernBertConfig,
    name: &str,
) -> Result<Norm> {
    let h = modern.hidden_size;
    if modern.norm_bias {
        Norm::pack_layer_norm(p, name, h, modern.norm_eps)
    } else {
        Norm::pack_layer_norm_without_bias(p, name, h, modern.norm_eps)
    }
}

fn pack_pinned<T: Element>(
    modern: &ModernBertConfig,
    source: &dyn TensorSource,
) -> Result<((LearnedEmbeddings, Norm), PackedWeights)> {
    let h = modern.hidden_size;
    let mut p = Packer::<T>::new(source, 4 * h + 8);
    let embedding_norm = pack_norm(&mut p, modern, EMBEDDING_NORM)?;
    let final_norm = pack_norm(&mut p, modern, FINAL_NORM)?;
    let embeddings = LearnedEmbeddings::normalised_words(h, embedding_norm);
    Ok(((embeddings, final_norm), p.finish()))
}

fn pack_layer<T: Element>(
    modern: &ModernBertConfig,
    source: &dyn TensorSource,
    index: usize,
) -> Result<(PreNormLayer, PackedWeights)> {
    let h = modern.hidden_size;
    let i = modern.intermediate_size;
    let mut p = Packer::<T>::new(source, h * (4 * h + 3 * i) + 6 * h + 2 * i + 64);
    let name = |short: &str| format!("{LAYER_PREFIX}.{index}.{short}");
    // The first layer has no attention norm; zeros in its place keep one
    // layout for every layer.
    let attention_norm = if index == 0 {
        p.put_zeros(2 * h);
        None
    } else {
        Some(pack_norm(&mut p, modern, &name("attn_norm"))?)
    };
    let layout = HeadLayout::multi_head(modern.num_attention_heads, modern.head_dim());
    let qkv = Linear::pack(&mut p, &name("attn.Wqkv"), h, 3 * h, modern.attention_bias)?;
    let output = Linear::pack(&mut p, &name("attn.Wo"), h, h, modern.attention_bias)?;
    let scale = 1.0 / (layout.head_dim as f32).sqrt();
    let attention = SelfAttention::new(qkv, output, layout, scale).with_rotary(RotaryUse {
        table: GLOBAL_TABLE,
        norm: None,
    });
    let ffn_norm = pack_norm(&mut p, modern, &name("mlp_norm"))?;
    // `Wi` writes the activated half, then the gate: GeGLU.
    let up = Linear::pack(&mut p, &name("mlp.Wi"), h, 2 * i, modern.mlp_bias)?;
    let down = Linear::pack(&mut p, &name("mlp.Wo"), i, h, modern.mlp_bias)?;
    let layer = PreNormLayer {
        attention_norm,
        attention,
        ffn_norm,
        ffn: FeedForward::new(up, down, modern.activation(), true),
    };
    Ok((layer, p.finish()))
}

impl Architecture for ModernBert {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn pack_pinned(&self, source: &dyn TensorSource, dtype: WeightDtype) -> Result<PackedWeights> {
        let (_, packed) = for_dtype(
            dtype,
            || pack_pinned::<f32>(&self.modern, source),
            || pack_pinned::<half::f16>(&self.modern, source),
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
            || pack_layer::<f32>(&self.modern, source, index),
            || pack_layer::<half::f16>(&self.modern, source, index),
        )?;
        Ok(packed)
    }

    fn layer_len(&self) -> usize {
        self.layer_len
    }

    fn word_table(&self, _source: &dyn TensorSource) -> &'static str {
        TOKEN_EMBEDDINGS
    }

    fn rotary(&self) -> Option<RotaryTables> {
        // Both thetas are checked by `validate` before any model is built.
        let head_dim = self.modern.head_dim();
        let theta = |local| self.modern.theta(Path::new(""), local).unwrap_or(10000.0);
        Some(RotaryTables {
            frequencies: vec![
                RotaryFrequencies::new(theta(false), head_dim),
                RotaryFrequencies::new(theta(true), head_dim),
            ],
        })
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
        let table = if self.modern.is_local(index) {
            LOCAL_TABLE
        } else {
            GLOBAL_TABLE
        };
        let attention = self
            .layer
            .attention
            .with_window(self.modern.window(index))
            .with_rotary(RotaryUse { table, norm: None });
        let layer = PreNormLayer {
            attention_norm: if index == 0 {
                None
            } else {
                self.layer.attention_norm
            },
            attention,
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
