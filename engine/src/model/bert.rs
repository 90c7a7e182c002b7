//! BERT (`model_type: bert`): learned absolute positions and token types,
//! post-norm layers with biases everywhere. The RoBERTa family
//! (`roberta.rs`) runs these modules too, with positions counted past the
//! padding id.

use std::path::Path;

use serde::Deserialize;

use super::blocks::{
    AttentionNames, LearnedEmbeddings, PostNormLayer, PostNormNames, PostNormShape,
};
use super::packing::{Element, PackedWeights, Packer, Zeros, for_dtype};
use super::{Architecture, Dims, ModelConfig, Recorder, hidden_activation};
use crate::config::Activation;
use crate::dtype::WeightDtype;
use crate::error::{Error, Result};
use crate::kernels::DispatchPlan;
use crate::weights::TensorSource;

pub const WORD_EMBEDDINGS: &str = "embeddings.word_embeddings.weight";
pub const LAYER_PREFIX: &str = "encoder.layer";

/// Mirrors the fields of a BERT `config.json` that the forward pass reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}

impl BertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    pub fn dims(&self) -> Dims {
        Dims {
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            head_dim: self.head_dim(),
            ffn: self.intermediate_size,
            gated: false,
            layers: self.num_hidden_layers,
            vocab: self.vocab_size,
            type_vocab: self.type_vocab_size,
            relative_buckets: 0,
            kv_heads: self.num_attention_heads,
            rotary_tables: 0,
        }
    }

    pub(super) fn validate(&self, path: &Path) -> Result<()> {
        if self.position_embedding_type != "absolute" {
            return Err(Error::Unsupported {
                path: path.into(),
                field: "position_embedding_type",
                value: self.position_embedding_type.clone(),
                supported: "absolute",
            });
        }
        hidden_activation(path, "hidden_act", &self.hidden_act)?;
        if self.num_attention_heads == 0 || self.type_vocab_size == 0 {
            return Err(Error::bad_model(
                path,
                "`num_attention_heads` and `type_vocab_size` must be positive",
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::bad_model(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::bad_model(path, "`layer_norm_eps` must be positive"));
        }
        Ok(())
    }

    fn activation(&self) -> Activation {
        // Checked by `validate` before any model is built.
        hidden_activation(Path::new(""), "hidden_act", &self.hidden_act)
            .unwrap_or(Activation::GeluErf)
    }
}

/// `encoder.layer.{i}`: self-attention, its output projection and
/// LayerNorm, the intermediate and output projections and the second LayerNorm.
pub const LAYER_NAMES: PostNormNames<'static> = PostNormNames {
    attention: AttentionNames {
        query: "attention.self.query",
        key: "attention.self.key",
        value: "attention.self.value",
        output: "attention.output.dense",
    },
    attention_norm: "attention.output.LayerNorm",
    up: "intermediate.dense",
    down: "output.dense",
    output_norm: "output.LayerNorm",
};

/// A BERT or RoBERTa encoder.
pub struct Bert {
    config: ModelConfig,
    bert: BertConfig,
    embeddings: LearnedEmbeddings,
    layer: PostNormLayer,
    layer_len: usize,
}

impl Bert {
    pub fn new(config: ModelConfig, bert: &BertConfig) -> Self {
        let bert = bert.clone();
        // Packing zeros gives the layouts, which are the same for every
        // layer and dtype; it cannot fail.
        let (embeddings, _) = pack_embeddings::<half::f16>(&bert, &Zeros).unwrap_or_else(|_| {
            unreachable!("packing zeros cannot fail");
        });
        let (layer, packed) = pack_layer::<half::f16>(&bert, &Zeros, 0).unwrap_or_else(|_| {
            unreachable!("packing zeros cannot fail");
        });
        Self {
            config,
            bert,
            embeddings,
            layer,
            layer_len: packed.len(),
        }
    }
}

fn pack_embeddings<T: Element>(
    bert: &BertConfig,
    source: &dyn TensorSource,
) -> Result<(LearnedEmbeddings, PackedWeights)> {
    let mut p = Packer::<T>::new(source, 0);
    let embeddings = LearnedEmbeddings::pack(
        &mut p,
        bert.hidden_size,
        Some((
            "embeddings.position_embeddings.weight",
            bert.max_position_embeddings,
        )),
        Some((
            "embeddings.token_type_embeddings.weight",
            bert.type_vocab_size,
        )),
        Some(("embeddings.LayerNorm", bert.layer_norm_eps)),
    )?;
    Ok((embeddings, p.finish()))
}

fn pack_layer<T: Element>(
    bert: &BertConfig,
    source: &dyn TensorSource,
    index: usize,
) -> Result<(PostNormLayer, PackedWeights)> {
    let h = bert.hidden_size;
    let i = bert.intermediate_size;
    // One allocation for the whole layer: growing by doubling would copy
    // megabytes on every fetch.
    let mut p = Packer::<T>::new(source, 4 * h * h + 2 * h * i + 9 * h + i + 64);
    let layer = PostNormLayer::pack(
        &mut p,
        &format!("{LAYER_PREFIX}.{index}"),
        &LAYER_NAMES,
        &PostNormShape {
            hidden: h,
            heads: bert.num_attention_heads,
            ffn: i,
            eps: bert.layer_norm_eps,
            activation: bert.activation(),
        },
    )?;
    Ok((layer, p.finish()))
}

impl Architecture for Bert {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn pack_pinned(&self, source: &dyn TensorSource, dtype: WeightDtype) -> Result<PackedWeights> {
        let (_, packed) = for_dtype(
            dtype,
            || pack_embeddings::<f32>(&self.bert, source),
            || pack_embeddings::<half::f16>(&self.bert, source),
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
            || pack_layer::<f32>(&self.bert, source, index),
            || pack_layer::<half::f16>(&self.bert, source, index),
        )?;
        Ok(packed)
    }

    fn layer_len(&self) -> usize {
        self.layer_len
    }

    fn word_table(&self, _source: &dyn TensorSource) -> &'static str {
        WORD_EMBEDDINGS
    }

    fn record_embeddings(&self, cx: &Recorder<'_>, plan: &mut DispatchPlan, pinned: &wgpu::Buffer) {
        self.embeddings.record(cx, plan, pinned);
    }

    fn record_layer(
        &self,
        cx: &Recorder<'_>,
        plan: &mut DispatchPlan,
        _index: usize,
        weights: &wgpu::Buffer,
    ) {
        self.layer.record(cx, plan, weights, None);
    }

    fn record_final<'b>(
        &self,
        cx: &Recorder<'b>,
        _plan: &mut DispatchPlan,
        _pinned: &wgpu::Buffer,
    ) -> &'b wgpu::Buffer {
        &cx.batch.hidden
    }
}
