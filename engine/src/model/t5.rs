//! T5 encoders (`model_type: t5`: `T5EncoderModel`, and the encoder of full
//! T5 checkpoints, whose decoder is never read): `shared.weight`
//! embeddings without positions, pre-norm blocks with T5's RMS norm, no
//! biases, no score scaling, a relative position bias from the first block
//! shared by all, a `relu` or gated (`gated-gelu`) feed-forward, and a final
//! norm.

use std::path::Path;

use serde::Deserialize;

use super::blocks::{
    AttentionNames, FeedForward, LearnedEmbeddings, Norm, PreNormLayer, RelativeBias, SelfAttention,
};
use super::packing::{Element, PackedWeights, Packer, Zeros, for_dtype};
use super::{Architecture, Dims, ModelConfig, Recorder, hidden_activation};
use crate::config::Activation;
use crate::dtype::WeightDtype;
use crate::error::{Error, Result};
use crate::kernels::DispatchPlan;
use crate::weights::TensorSource;

pub const SHARED_EMBEDDINGS: &str = "shared.weight";
/// The encoder's own name for the shared table, which some exports keep instead.
const ENCODER_EMBEDDINGS: &str = "encoder.embed_tokens.weight";
pub const LAYER_PREFIX: &str = "encoder.block";
const FINAL_NORM: &str = "encoder.final_layer_norm.weight";
const RELATIVE_BIAS: &str = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";

/// Mirrors the fields of a T5 `config.json` that the encoder reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_feed_forward")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub dense_act_fn: Option<String>,
    #[serde(default)]
    pub pad_token_id: usize,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_epsilon() -> f64 {
    1e-6
}
fn default_feed_forward() -> String {
    "relu".into()
}

impl T5Config {
    pub fn dims(&self) -> Dims {
        Dims {
            hidden: self.d_model,
            heads: self.num_heads,
            head_dim: self.d_kv,
            ffn: self.d_ff,
            gated: self.feed_forward_proj.starts_with("gated-"),
            layers: self.num_layers,
            vocab: self.vocab_size,
            type_vocab: 0,
            relative_buckets: self.relative_attention_num_buckets,
            kv_heads: self.num_heads,
            rotary_tables: 0,
        }
    }

    /// Whether the feed-forward is gated, and its activation, as
    /// transformers reads `feed_forward_proj` (`gated-gelu` means gelu_new).
    fn feed_forward(&self, path: &Path) -> Result<(bool, Activation)> {
        let (gated, name) = match self.feed_forward_proj.split_once('-') {
            Some(("gated", name)) => (true, name),
            None => (false, self.feed_forward_proj.as_str()),
            Some(_) => {
                return Err(Error::Unsupported {
                    path: path.into(),
                    field: "feed_forward_proj",
                    value: self.feed_forward_proj.clone(),
                    supported: "relu, gelu, gated-gelu, gated-relu, gated-silu",
                });
            }
        };
        let name = match (&self.dense_act_fn, name) {
            (Some(act), _) => act.as_str(),
            (None, "gelu") if gated => "gelu_new",
            (None, name) => name,
        };
        Ok((gated, hidden_activation(path, "feed_forward_proj", name)?))
    }

    pub(super) fn validate(&self, path: &Path) -> Result<()> {
        self.feed_forward(path)?;
        if !(2..=1024).contains(&self.relative_attention_num_buckets)
            || self.relative_attention_max_distance < self.relative_attention_num_buckets / 4
        {
            return Err(Error::bad_model(
                path,
                "relative_attention_num_buckets must be between 2 and 1024, and \
                 relative_attention_max_distance at least a quarter of them",
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

/// The pinned tensors: the shared table and the final norm (the relative
/// table is pinned by `ModelConfig::component_of`, from inside block 0).
pub fn is_pinned(name: &str) -> bool {
    matches!(name, SHARED_EMBEDDINGS | ENCODER_EMBEDDINGS | FINAL_NORM)
}

pub struct T5 {
    config: ModelConfig,
    t5: T5Config,
    /// No positions, no token types, no norm: the word rows as they are.
    embeddings: LearnedEmbeddings,
    final_norm: Norm,
    /// `encoder.block.{i}`: `layer.0` (norm, self-attention), `layer.1`
    /// (norm, feed-forward).
    block: PreNormLayer,
    block_len: usize,
}

impl T5 {
    pub fn new(config: ModelConfig, t5: &T5Config) -> Self {
        let t5 = t5.clone();
        let (final_norm, _) = pack_final::<half::f16>(&t5, &Zeros)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        let (block, packed) = pack_block::<half::f16>(&t5, &Zeros, 0)
            .unwrap_or_else(|_| unreachable!("packing zeros cannot fail"));
        Self {
            embeddings: LearnedEmbeddings::words_only(t5.d_model),
            config,
            t5,
            final_norm,
            block,
            block_len: packed.len(),
        }
    }
}

fn pack_final<T: Element>(
    t5: &T5Config,
    source: &dyn TensorSource,
) -> Result<(Norm, PackedWeights)> {
    let mut p = Packer::<T>::new(source, t5.d_model + 4);
    let norm = Norm::pack_rms(&mut p, FINAL_NORM, t5.d_model, t5.layer_norm_epsilon)?;
    Ok((norm, p.finish()))
}

fn pack_block<T: Element>(
    t5: &T5Config,
    source: &dyn TensorSource,
    index: usize,
) -> Result<(PreNormLayer, PackedWeights)> {
    let (gated, activation) = t5.feed_forward(Path::new(""))?;
    let h = t5.d_model;
    let width = t5.num_heads * t5.d_kv;
    let branches = if gated { 2 } else { 1 };
    let mut p = Packer::<T>::new(source, 4 * h * width + (branches + 1) * h * t5.d_ff + 64);
    let prefix = format!("{LAYER_PREFIX}.{index}");
    let name = |short: &str| format!("{prefix}.{short}");
    let eps = t5.layer_norm_epsilon;
    let attention_norm = Norm::pack_rms(&mut p, &name("layer.0.layer_norm.weight"), h, eps)?;
    let (q, k, v, o) = (
        name("layer.0.SelfAttention.q"),
        name("layer.0.SelfAttention.k"),
        name("layer.0.SelfAttention.v"),
        name("layer.0.SelfAttention.o"),
    );
    let attention = SelfAttention::pack(
        &mut p,
        &AttentionNames {
            query: &q,
            key: &k,
            value: &v,
            output: &o,
        },
        h,
        t5.num_heads,
        t5.d_kv,
        false,
        // T5 folds the score scaling into its initialisation.
        1.0,
    )?;
    let ffn_norm = Norm::pack_rms(&mut p, &name("layer.1.layer_norm.weight"), h, eps)?;
    let ffn = if gated {
        FeedForward::pack_gated(
            &mut p,
            &name("layer.1.DenseReluDense.wi_0"),
            &name("layer.1.DenseReluDense.wi_1"),
            &name("layer.1.DenseReluDense.wo"),
            h,
            t5.d_ff,
            false,
            activation,
        )?
    } else {
        FeedForward::pack_plain(
            &mut p,
            &name("layer.1.DenseReluDense.wi"),
            &name("layer.1.DenseReluDense.wo"),
            h,
            t5.d_ff,
            false,
            activation,
        )?
    };
    let block = PreNormLayer {
        attention_norm: Some(attention_norm),
        attention,
        ffn_norm,
        ffn,
    };
    Ok((block, p.finish()))
}

impl Architecture for T5 {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn pack_pinned(&self, source: &dyn TensorSource, dtype: WeightDtype) -> Result<PackedWeights> {
        let (_, packed) = for_dtype(
            dtype,
            || pack_final::<f32>(&self.t5, source),
            || pack_final::<half::f16>(&self.t5, source),
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
            || pack_block::<f32>(&self.t5, source, index),
            || pack_block::<half::f16>(&self.t5, source, index),
        )?;
        Ok(packed)
    }

    fn layer_len(&self) -> usize {
        self.block_len
    }

    fn word_table(&self, source: &dyn TensorSource) -> &'static str {
        if !source.contains(SHARED_EMBEDDINGS) && source.contains(ENCODER_EMBEDDINGS) {
            ENCODER_EMBEDDINGS
        } else {
            SHARED_EMBEDDINGS
        }
    }

    fn relative_bias(&self, source: &dyn TensorSource) -> Result<Option<RelativeBias>> {
        let heads = self.t5.num_heads;
        let buckets = self.t5.relative_attention_num_buckets;
        let table = source.tensor(RELATIVE_BIAS, &[buckets, heads])?;
        Ok(Some(RelativeBias::new(
            table,
            heads,
            buckets,
            self.t5.relative_attention_max_distance,
        )))
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
        self.block.record(
            cx,
            plan,
            index == 0,
            weights,
            cx.batch.position_bias.as_ref(),
        );
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
