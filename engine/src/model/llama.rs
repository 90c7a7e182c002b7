//! The LLaMA lineage of decoders, run as embedders (`model_type: llama`,
//! `mistral`, `qwen2`, `qwen3`): token embeddings without positions, pre-norm
//! layers with RMS norms, rotary positions, grouped-query causal attention
//! (sliding-window where the config says so), a SwiGLU feed-forward, and a
//! final norm. The four differ in little: Qwen2 has biases on its query, key
//! and value projections, Qwen3 normalises each query and key head before
//! rotating it, Mistral slides its window over every layer. The language
//! model head is never read.

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
use crate::kernels::rotary::{HeadNorm, RotaryFrequencies, RotaryTables};
use crate::weights::TensorSource;

pub const EMBED_TOKENS: &str = "embed_tokens.weight";
pub const LAYER_PREFIX: &str = "layers";
const FINAL_NORM: &str = "norm.weight";

/// The `model_type`s this file runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Variant {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" => Variant::Llama,
            "mistral" => Variant::Mistral,
            "qwen2" => Variant::Qwen2,
            "qwen3" => Variant::Qwen3,
            _ => return None,
        })
    }
}

/// Mirrors the fields of these families' `config.json` that the forward
/// pass reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
}

fn default_hidden_act() -> String {
    "silu".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    pub fn variant(&self) -> Variant {
        Variant::from_model_type(&self.model_type).unwrap_or(Variant::Llama)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
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
            kv_heads: self.kv_heads(),
            rotary_tables: 1,
        }
    }

    /// Biases of the query/key/value projections and of the output one.
    fn attention_biases(&self) -> (bool, bool) {
        match self.variant() {
            Variant::Qwen2 => (true, false),
            Variant::Mistral => (false, false),
            Variant::Llama | Variant::Qwen3 => {
                let bias = self.attention_bias.unwrap_or(false);
                (bias, bias)
            }
        }
    }

    /// The window of layer `index`: causal, or causal over the last
    /// `sliding_window` keys where the config slides it.
    fn window(&self, index: usize) -> Window {
        let sliding = match (&self.layer_types, self.variant()) {
            (Some(types), _) => types.get(index).is_some_and(|t| t == "sliding_attention"),
            (None, Variant::Mistral) => true,
            (None, Variant::Qwen2 | Variant::Qwen3) => {
                self.use_sliding_window.unwrap_or(false)
                    && index >= self.max_window_layers.unwrap_or(0)
            }
            (None, Variant::Llama) => false,
        };
        match self.sliding_window {
            Some(size) if sliding => Window::causal_sliding(size),
            _ => Window::CAUSAL,
        }
    }

    fn rope(&self) -> RopeFields<'_> {
        RopeFields {
            parameters: self.rope_parameters.as_ref(),
            scaling: self.rope_scaling.as_ref(),
            legacy_theta: self.rope_theta,
            default_theta: 10000.0,
        }
    }

    fn activation(&self) -> Activation {
        // Checked by `validate` before any model is built.
        hidden_activation(Path::new(""), "hidden_act", &self.hidden_act).unwrap_or(Activation::Silu)
    }

    pub(super) fn validate(&self, path: &Path) -> Result<()> {
        hidden_activation(path, "hidden_act", &self.hidden_act)?;
        self.rope().theta(path, "full_attention")?;
        if let Some(factor) = self.partial_rotary_factor
            && factor != 1.0
        {
            return Err(Error::Unsupported {
                path: path.into(),
                field: "partial_rotary_factor",
                value: factor.to_string(),
                supported: "1.0",
            });
        }
        super::validate_layer_types(path, self.layer_types.as_deref(), self.num_hidden_layers)?;
        if self.num_attention_heads == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(Error::bad_model(
                path,
                "`num_attention_heads` must be positive and the head size even",
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::bad_model(path, "`rms_norm_eps` must be positive"));
        }
        Ok(())
    }
}

/// The pinned tensors: the token table and the final norm.
pub fn is_pinned(name: &str) -> bool {
    matches!(name, EMBED_TOKENS | FINAL_NORM)
}

pub struct Llama {
    config: ModelConfig,
    llama: LlamaConfig,
    final_norm: Norm,
    /// `layers.{i}`: the layout every layer shares; windows differ by layer.
    layer: PreNormLayer,
    layer_len: usize,
}

impl Llama {
    pub fn new(config: ModelConfig, llama: &LlamaConfig) -> Self {
        let llama = llama.clone();
        let (final_norm, _) = pack_final::<half::f16>(&llama, &Zeros)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        let (layer, packed) = pack_layer::<half::f16>(&llama, &Zeros, 0)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        Self {
            config,
            llama,
            final_norm,
            layer,
            layer_len: packed.len(),
        }
    }
}

fn pack_final<T: Element>(
    llama: &LlamaConfig,
    source: &dyn TensorSource,
) -> Result<(Norm, PackedWeights)> {
    let h = llama.hidden_size;
    let mut p = Packer::<T>::new(source, h + 4);
    let norm = Norm::pack_rms(&mut p, FINAL_NORM, h, llama.rms_norm_eps)?;
    Ok((norm, p.finish()))
}

fn pack_layer<T: Element>(
    llama: &LlamaConfig,
    source: &dyn TensorSource,
    index: usize,
) -> Result<(PreNormLayer, PackedWeights)> {
    let h = llama.hidden_size;
    let layout = HeadLayout {
        heads: llama.num_attention_heads,
        kv_heads: llama.kv_heads(),
        head_dim: llama.head_dim(),
    };
    let i = llama.intermediate_size;
    let eps = llama.rms_norm_eps;
    let mut p = Packer::<T>::new(
        source,
        h * (layout.row_width() + layout.query_width() + 3 * i) + 4 * h + 4 * i + 64,
    );
    let name = |short: &str| format!("{LAYER_PREFIX}.{index}.{short}");
    let attention_norm = Norm::pack_rms(&mut p, &name("input_layernorm.weight"), h, eps)?;
    let (qkv_bias, output_bias) = llama.attention_biases();
    let (q, k, v, o) = (
        name("self_attn.q_proj"),
        name("self_attn.k_proj"),
        name("self_attn.v_proj"),
        name("self_attn.o_proj"),
    );
    let kv_width = layout.kv_heads * layout.head_dim;
    let qkv = Linear::pack_concat(
        &mut p,
        &[(&q, layout.query_width()), (&k, kv_width), (&v, kv_width)],
        h,
        qkv_bias,
    )?;
    let output = Linear::pack(&mut p, &o, layout.query_width(), h, output_bias)?;
    let head_norm = match llama.variant() {
        Variant::Qwen3 => {
            let query = p.put_tensor(&name("self_attn.q_norm.weight"), &[layout.head_dim])?;
            let key = p.put_tensor(&name("self_attn.k_norm.weight"), &[layout.head_dim])?;
            Some(HeadNorm {
                query_gain: query,
                key_gain: key,
                eps: eps as f32,
            })
        }
        _ => None,
    };
    let scale = 1.0 / (layout.head_dim as f32).sqrt();
    let attention = SelfAttention::new(qkv, output, layout, scale)
        .with_window(llama.window(index))
        .with_rotary(RotaryUse {
            table: 0,
            norm: head_norm,
        });
    let ffn_norm = Norm::pack_rms(&mut p, &name("post_attention_layernorm.weight"), h, eps)?;
    let up = Linear::pack_fused(
        &mut p,
        &[&name("mlp.gate_proj"), &name("mlp.up_proj")],
        h,
        i,
        llama.mlp_bias,
    )?;
    let down = Linear::pack(&mut p, &name("mlp.down_proj"), i, h, llama.mlp_bias)?;
    let layer = PreNormLayer {
        attention_norm: Some(attention_norm),
        attention,
        ffn_norm,
        ffn: FeedForward::new(up, down, llama.activation(), true),
    };
    Ok((layer, p.finish()))
}

impl Architecture for Llama {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn pack_pinned(&self, source: &dyn TensorSource, dtype: WeightDtype) -> Result<PackedWeights> {
        let (_, packed) = for_dtype(
            dtype,
            || pack_final::<f32>(&self.llama, source),
            || pack_final::<half::f16>(&self.llama, source),
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
            || pack_layer::<f32>(&self.llama, source, index),
            || pack_layer::<half::f16>(&self.llama, source, index),
        )?;
        Ok(packed)
    }

    fn layer_len(&self) -> usize {
        self.layer_len
    }

    fn word_table(&self, _source: &dyn TensorSource) -> &'static str {
        EMBED_TOKENS
    }

    fn rotary(&self) -> Option<RotaryTables> {
        // Checked by `validate` before any model is built.
        let theta = self
            .llama
            .rope()
            .theta(Path::new(""), "full_attention")
            .unwrap_or(10000.0);
        Some(RotaryTables {
            frequencies: vec![RotaryFrequencies::new(theta, self.llama.head_dim())],
        })
    }

    fn record_embeddings(&self, cx: &Recorder<'_>, plan: &mut DispatchPlan, pinned: &wgpu::Buffer) {
        LearnedEmbeddings::words_only(self.llama.hidden_size).record(cx, plan, pinned);
    }

    fn record_layer(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        index: usize,
        weights: &wgpu::Buffer,
    ) {
        let layer = PreNormLayer {
            attention: self.layer.attention.with_window(self.llama.window(index)),
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
