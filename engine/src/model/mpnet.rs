//! MPNet (`model_type: mpnet`, all-mpnet-base-v2): BERT-shaped post-norm
//! layers under other tensor names, no token types, positions counted past
//! the padding id as RoBERTa's, and a relative position bias (32 buckets,
//! the table in `encoder.relative_attention_bias`) that every layer adds to
//! its attention scores.

use std::path::Path;

use serde::Deserialize;

use super::blocks::{
    AttentionNames, LearnedEmbeddings, PostNormLayer, PostNormNames, PostNormShape, RelativeBias,
};
use super::packing::{Element, PackedWeights, Packer, Zeros, for_dtype};
use super::{Architecture, Dims, ModelConfig, Recorder, hidden_activation};
use crate::config::Activation;
use crate::dtype::WeightDtype;
use crate::error::{Error, Result};
use crate::kernels::DispatchPlan;
use crate::weights::TensorSource;

const RELATIVE_BIAS: &str = "encoder.relative_attention_bias.weight";
/// MPNet's bucketing fixes the longest distance it tells apart.
const MAX_DISTANCE: usize = 128;
const LAYER_PREFIX: &str = super::bert::LAYER_PREFIX;

/// Mirrors the fields of an MPNet `config.json` that the forward pass reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MPNetConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_pad_token_id() -> usize {
    1
}
fn default_buckets() -> usize {
    32
}

impl MPNetConfig {
    pub fn dims(&self) -> Dims {
        Dims {
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            head_dim: self.hidden_size / self.num_attention_heads.max(1),
            ffn: self.intermediate_size,
            gated: false,
            layers: self.num_hidden_layers,
            vocab: self.vocab_size,
            type_vocab: 0,
            relative_buckets: self.relative_attention_num_buckets,
            kv_heads: self.num_attention_heads,
            rotary_tables: 0,
        }
    }

    pub(super) fn validate(&self, path: &Path) -> Result<()> {
        hidden_activation(path, "hidden_act", &self.hidden_act)?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::bad_model(
                path,
                "hidden_size must be a positive multiple of num_attention_heads",
            ));
        }
        if !(2..=1024).contains(&self.relative_attention_num_buckets) {
            return Err(Error::bad_model(
                path,
                "relative_attention_num_buckets must be between 2 and 1024",
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::bad_model(path, "`layer_norm_eps` must be positive"));
        }
        Ok(())
    }

    fn activation(&self) -> Activation {
        hidden_activation(Path::new(""), "hidden_act", &self.hidden_act)
            .unwrap_or(Activation::GeluErf)
    }
}

/// As RoBERTa's: `padding_idx + 1 + p`.
pub fn position_id(config: &MPNetConfig, p: usize) -> u32 {
    (config.pad_token_id + 1 + p) as u32
}

pub fn max_positions(config: &MPNetConfig) -> usize {
    config
        .max_position_embeddings
        .saturating_sub(config.pad_token_id + 1)
}

/// The pinned tensors: the embeddings and the shared relative position table.
pub fn is_pinned(name: &str) -> bool {
    name.starts_with("embeddings.") || name == RELATIVE_BIAS
}

/// `encoder.layer.{i}`: `attention.attn.{q,k,v,o}`, `attention.LayerNorm`,
/// then BERT's feed-forward names.
const LAYER_NAMES: PostNormNames<'static> = PostNormNames {
    attention: AttentionNames {
        query: "attention.attn.q",
        key: "attention.attn.k",
        value: "attention.attn.v",
        output: "attention.attn.o",
    },
    attention_norm: "attention.LayerNorm",
    up: "intermediate.dense",
    down: "output.dense",
    output_norm: "output.LayerNorm",
};

pub struct MPNet {
    config: ModelConfig,
    mpnet: MPNetConfig,
    embeddings: LearnedEmbeddings,
    layer: PostNormLayer,
    layer_len: usize,
}

impl MPNet {
    pub fn new(config: ModelConfig, mpnet: &MPNetConfig) -> Self {
        let mpnet = mpnet.clone();
        let (embeddings, _) = pack_embeddings::<half::f16>(&mpnet, &Zeros)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        let (layer, packed) = pack_layer::<half::f16>(&mpnet, &Zeros, 0)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        Self {
            config,
            mpnet,
            embeddings,
            layer,
            layer_len: packed.len(),
        }
    }
}

fn pack_embeddings<T: Element>(
    mpnet: &MPNetConfig,
    source: &dyn TensorSource,
) -> Result<(LearnedEmbeddings, PackedWeights)> {
    let mut p = Packer::<T>::new(source, 0);
    let embeddings = LearnedEmbeddings::pack(
        &mut p,
        mpnet.hidden_size,
        Some((
            "embeddings.position_embeddings.weight",
            mpnet.max_position_embeddings,
        )),
        None,
        Some(("embeddings.LayerNorm", mpnet.layer_norm_eps)),
    )?;
    Ok((embeddings, p.finish()))
}

fn pack_layer<T: Element>(
    mpnet: &MPNetConfig,
    source: &dyn TensorSource,
    index: usize,
) -> Result<(PostNormLayer, PackedWeights)> {
    let h = mpnet.hidden_size;
    let i = mpnet.intermediate_size;
    let mut p = Packer::<T>::new(source, 4 * h * h + 2 * h * i + 9 * h + i + 64);
    let layer = PostNormLayer::pack(
        &mut p,
        &format!("{LAYER_PREFIX}.{index}"),
        &LAYER_NAMES,
        &PostNormShape {
            hidden: h,
            heads: mpnet.num_attention_heads,
            ffn: i,
            eps: mpnet.layer_norm_eps,
            activation: mpnet.activation(),
        },
    )?;
    Ok((layer, p.finish()))
}

impl Architecture for MPNet {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn pack_pinned(&self, source: &dyn TensorSource, dtype: WeightDtype) -> Result<PackedWeights> {
        let (_, packed) = for_dtype(
            dtype,
            || pack_embeddings::<f32>(&self.mpnet, source),
            || pack_embeddings::<half::f16>(&self.mpnet, source),
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
            || pack_layer::<f32>(&self.mpnet, source, index),
            || pack_layer::<half::f16>(&self.mpnet, source, index),
        )?;
        Ok(packed)
    }

    fn layer_len(&self) -> usize {
        self.layer_len
    }

    fn word_table(&self, _source: &dyn TensorSource) -> &'static str {
        super::bert::WORD_EMBEDDINGS
    }

    fn relative_bias(&self, source: &dyn TensorSource) -> Result<Option<RelativeBias>> {
        let heads = self.mpnet.num_attention_heads;
        let buckets = self.mpnet.relative_attention_num_buckets;
        let table = source.tensor(RELATIVE_BIAS, &[buckets, heads])?;
        Ok(Some(RelativeBias::new(table, heads, buckets, MAX_DISTANCE)))
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
        self.layer
            .record(cx, plan, weights, cx.batch.position_bias.as_ref());
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
