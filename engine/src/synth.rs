//! Writes model folders of every supported family with random weights:
//! scale models for paging benches (the shapes of real models included:
//! TinyLlama-1.1B, Qwen3-Embedding 0.6B, 4B and 8B) and small, malformed or
//! re-typed checkpoints for tests. The tensors written are the ones the
//! family's model code asks for, so a folder always loads. The weights file
//! is written tensor by tensor in blocks ([`crate::tensor_writer`]), so a
//! model of 16 GB is written holding one block of it.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::model::{ModelConfig, model_tensors};

/// The families `surf synth` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SynthFamily {
    #[default]
    Bert,
    XlmRoberta,
    MPNet,
    T5,
    /// LLaMA's decoder: RMS norms, rotary positions, grouped-query
    /// attention, SwiGLU; read as an embedder with last-token pooling.
    Llama,
    /// Qwen3: LLaMA's layout with per-head query and key norms.
    Qwen3,
}

/// The shapes of real models, as their `config.json` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthPreset {
    /// TinyLlama-1.1B: 22 layers, hidden 2048, 32 heads on 4 key/value
    /// heads, feed-forward 5632, 32,000 tokens.
    TinyLlama,
    /// Qwen3-Embedding-0.6B: 28 layers, hidden 1024, 16 heads of 128 on 8
    /// key/value heads, feed-forward 3072, 151,669 tokens.
    Qwen3_0_6B,
    /// Qwen3-Embedding-4B: 36 layers, hidden 2560, 32 heads of 128 on 8,
    /// feed-forward 9728, 151,665 tokens.
    Qwen3_4B,
    /// Qwen3-Embedding-8B: 36 layers, hidden 4096, 32 heads of 128 on 8,
    /// feed-forward 12288, 151,665 tokens.
    Qwen3_8B,
}

/// The shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub family: SynthFamily,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// The longest input sentence-transformers feeds the model.
    pub max_seq_length: usize,
    /// Key and value heads of the decoder families' grouped-query attention.
    pub kv_heads: usize,
    /// Size of one attention head, where the family states it apart from
    /// hidden / heads (the decoders).
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    /// Storage type of the weights: F32, F16 or BF16.
    pub dtype: Dtype,
    pub seed: u64,
    /// A sequence classifier with this many labels instead of an embedder.
    pub labels: Option<usize>,
}

impl SynthSpec {
    /// BERT-base: 12 layers, hidden 768, 12 heads, intermediate 3072.
    pub fn bert_base() -> Self {
        Self::sized(12, 768, 12, 3072)
    }

    /// BERT-large: 24 layers, hidden 1024, 16 heads, intermediate 4096.
    pub fn bert_large() -> Self {
        Self::sized(24, 1024, 16, 4096)
    }

    pub fn sized(layers: usize, hidden: usize, heads: usize, intermediate: usize) -> Self {
        Self {
            family: SynthFamily::Bert,
            layers,
            hidden,
            heads,
            intermediate,
            vocab_size: 30522,
            max_position_embeddings: 512,
            max_seq_length: 512,
            kv_heads: heads,
            head_dim: None,
            hidden_act: "gelu".into(),
            dtype: Dtype::F32,
            seed: 1,
            labels: None,
        }
    }

    /// A decoder of `family` with these sizes: SiLU, head size 128 unless
    /// `head_dim` says otherwise, inputs up to 512 tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn decoder(
        family: SynthFamily,
        layers: usize,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        intermediate: usize,
        vocab_size: usize,
        max_position_embeddings: usize,
    ) -> Self {
        Self {
            family,
            kv_heads,
            head_dim: Some(head_dim),
            vocab_size,
            max_position_embeddings,
            hidden_act: "silu".into(),
            ..Self::sized(layers, hidden, heads, intermediate)
        }
    }

    /// The shape of a real model, with its family.
    pub fn preset(preset: SynthPreset) -> Self {
        use SynthFamily::{Llama, Qwen3};
        match preset {
            SynthPreset::TinyLlama => Self::decoder(Llama, 22, 2048, 32, 4, 64, 5632, 32000, 2048),
            SynthPreset::Qwen3_0_6B => {
                Self::decoder(Qwen3, 28, 1024, 16, 8, 128, 3072, 151_669, 32768)
            }
            SynthPreset::Qwen3_4B => {
                Self::decoder(Qwen3, 36, 2560, 32, 8, 128, 9728, 151_665, 40960)
            }
            SynthPreset::Qwen3_8B => {
                Self::decoder(Qwen3, 36, 4096, 32, 8, 128, 12288, 151_665, 40960)
            }
        }
    }

    /// Whether the family is a decoder read with last-token pooling.
    pub fn is_decoder(&self) -> bool {
        matches!(self.family, SynthFamily::Llama | SynthFamily::Qwen3)
    }

    /// `config.json` of a decoder family, with the fields its real models
    /// carry (rotary base, norm epsilon, tied embeddings for Qwen3).
    fn decoder_config_json(&self) -> serde_json::Value {
        let (model_type, architecture, rope_theta, eps) = match self.family {
            SynthFamily::Qwen3 => ("qwen3", "Qwen3Model", 1_000_000.0, 1e-6),
            _ => ("llama", "LlamaModel", 10_000.0, 1e-5),
        };
        serde_json::json!({
            "model_type": model_type,
            "architectures": [architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim.unwrap_or(self.hidden / self.heads.max(1)),
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": eps,
            "rope_theta": rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "tie_word_embeddings": self.family == SynthFamily::Qwen3,
            "bos_token_id": 0,
            "eos_token_id": 0,
        })
    }

    /// `config.json` of the model, as its family writes it.
    pub fn config_json(&self) -> serde_json::Value {
        if self.is_decoder() {
            return self.decoder_config_json();
        }
        let pad = match self.family {
            SynthFamily::Bert | SynthFamily::T5 => 0,
            _ => 1,
        };
        let architecture = match (self.family, self.labels) {
            (SynthFamily::Bert, None) => "BertModel",
            (SynthFamily::Bert, Some(_)) => "BertForSequenceClassification",
            (SynthFamily::XlmRoberta, None) => "XLMRobertaModel",
            (SynthFamily::XlmRoberta, Some(_)) => "XLMRobertaForSequenceClassification",
            (SynthFamily::MPNet, _) => "MPNetModel",
            (SynthFamily::T5, _) => "T5EncoderModel",
            (SynthFamily::Llama | SynthFamily::Qwen3, _) => unreachable!("decoders return above"),
        };
        let mut json = match self.family {
            SynthFamily::T5 => serde_json::json!({
                "model_type": "t5",
                "vocab_size": self.vocab_size,
                "d_model": self.hidden,
                "d_kv": self.hidden / self.heads.max(1),
                "d_ff": self.intermediate,
                "num_layers": self.layers,
                "num_heads": self.heads,
                "feed_forward_proj": "gated-gelu",
                "relative_attention_num_buckets": 32,
                "relative_attention_max_distance": 128,
                "layer_norm_epsilon": 1e-6,
                "pad_token_id": pad,
            }),
            family => {
                let mut json = serde_json::json!({
                    "model_type": match family {
                        SynthFamily::XlmRoberta => "xlm-roberta",
                        SynthFamily::MPNet => "mpnet",
                        _ => "bert",
                    },
                    "vocab_size": self.vocab_size,
                    "hidden_size": self.hidden,
                    "num_hidden_layers": self.layers,
                    "num_attention_heads": self.heads,
                    "intermediate_size": self.intermediate,
                    "hidden_act": self.hidden_act,
                    // RoBERTa and MPNet spend pad + 1 rows before the first position.
                    "max_position_embeddings": self.max_position_embeddings + 2 * pad,
                    "layer_norm_eps": 1e-12,
                    "pad_token_id": pad,
                });
                match family {
                    SynthFamily::MPNet => json["relative_attention_num_buckets"] = 32.into(),
                    SynthFamily::XlmRoberta => json["type_vocab_size"] = 1.into(),
                    _ => json["type_vocab_size"] = 2.into(),
                }
                json
            }
        };
        json["architectures"] = serde_json::json!([architecture]);
        if let Some(labels) = self.labels {
            let id2label: BTreeMap<String, String> = (0..labels)
                .map(|id| (id.to_string(), format!("LABEL_{id}")))
                .collect();
            json["id2label"] = serde_json::json!(id2label);
        }
        json
    }

    /// The model's config, checked as the engine checks it.
    pub fn model_config(&self, path: &Path) -> Result<ModelConfig> {
        ModelConfig::from_json(path, self.config_json().to_string().as_bytes())
    }

    /// Every tensor the model has: what its family reads, and a
    /// classifier's head.
    pub fn tensors(&self) -> Result<Vec<(String, Vec<usize>)>> {
        // The family names its tensors by packing zeros, a layer's worth of
        // memory and work per layer; every layer after the first has the
        // tensors of the second, so a two-layer model is asked and its second
        // layer's tensors are named for each later layer.
        let asked = SynthSpec {
            layers: self.layers.min(2),
            ..self.clone()
        };
        let config = asked.model_config(Path::new("config.json"))?;
        let second_prefix = format!("{}.1.", config.layer_prefix());
        let mut tensors = Vec::new();
        let mut second = Vec::new();
        for (name, shape) in model_tensors(config.architecture().as_ref())? {
            match name.strip_prefix(&second_prefix) {
                Some(rest) => second.push((rest.to_string(), shape)),
                None => tensors.push((name, shape)),
            }
        }
        for layer in 1..self.layers {
            for (rest, shape) in &second {
                tensors.push((
                    format!("{}.{layer}.{rest}", config.layer_prefix()),
                    shape.clone(),
                ));
            }
        }
        if let Some(labels) = self.labels {
            let h = self.hidden;
            let (dense, out) = match self.family {
                SynthFamily::XlmRoberta => ("classifier.dense", "classifier.out_proj"),
                _ => ("pooler.dense", "classifier"),
            };
            tensors.push((format!("{dense}.weight"), vec![h, h]));
            tensors.push((format!("{dense}.bias"), vec![h]));
            tensors.push((format!("{out}.weight"), vec![labels, h]));
            tensors.push((format!("{out}.bias"), vec![labels]));
        }
        Ok(tensors)
    }
}

/// A tensor's name, shape and values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// A small deterministic generator; weights need no statistical quality.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 24 random bits in [-1, 1).
        ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    crate::tensor_writer::encode_into(values, dtype, &mut out);
    out
}

/// Whether a tensor is a norm's gain, which sits near 1.
fn is_gain(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with("norm.weight")
}

/// The random values of `spec`'s weights, tensor after tensor, drawn from
/// one seeded stream in the order of [`SynthSpec::tensors`].
struct RandomWeights(SplitMix64);

impl RandomWeights {
    fn new(seed: u64) -> Self {
        Self(SplitMix64(seed))
    }

    /// Fills `block` with the next values of tensor `name`.
    fn fill(&mut self, name: &str, block: &mut [f32]) {
        let gain = is_gain(name);
        for value in block {
            let r = self.0.next_unit();
            *value = if gain { 1.0 + 0.1 * r } else { 0.05 * r };
        }
    }
}

/// Random tensors for every weight of `spec`, as f32 values. Norm gains sit
/// near 1 and everything else is small, as in a trained model, so activations
/// stay in a realistic range through many layers. Holds the whole model:
/// for the small checkpoints of tests; [`write_model`] streams instead.
pub fn random_tensors(spec: &SynthSpec) -> Result<Vec<NamedTensor>> {
    let mut weights = RandomWeights::new(spec.seed);
    Ok(spec
        .tensors()?
        .into_iter()
        .map(|(name, shape)| {
            let mut values = vec![0f32; shape.iter().product()];
            weights.fill(&name, &mut values);
            (name, shape, values)
        })
        .collect())
}

/// Writes `model.safetensors` holding `tensors` in `dtype`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: Dtype,
) -> Result<()> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| (name.clone(), shape.clone(), encode(values, dtype)))
        .collect();
    let mut views = BTreeMap::new();
    for (name, shape, bytes) in &encoded {
        let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
            .map_err(|e| Error::bad_model(path, format!("tensor {name}: {e}")))?;
        views.insert(name.clone(), view);
    }
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| Error::bad_model(path, format!("writing failed: {e}")))
}

/// Writes a complete model folder: config, weights, the given tokenizer and,
/// for an embedder, the sentence-transformers files for mean pooling with
/// normalisation. Returns the files written, relative to `dir`.
pub fn write_model(dir: &Path, spec: &SynthSpec, tokenizer_json: &[u8]) -> Result<Vec<String>> {
    let io = |path: &Path, e: std::io::Error| Error::io(path, e);
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let config_json = spec.config_json();
    let mut files: Vec<(&str, String)> = vec![
        (
            "config.json",
            serde_json::to_string_pretty(&config_json).unwrap_or_default(),
        ),
        (
            "modules.json",
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
 {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
 {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#
                .into(),
        ),
        (
            "sentence_bert_config.json",
            format!(
                r#"{{"max_seq_length": {}, "do_lower_case": false}}"#,
                spec.max_seq_length.min(spec.max_position_embeddings)
            ),
        ),
        (
            "1_Pooling/config.json",
            format!(
                r#"{{"word_embedding_dimension": {}, "{}": true}}"#,
                spec.hidden,
                if spec.is_decoder() {
                    "pooling_mode_lasttoken"
                } else {
                    "pooling_mode_mean_tokens"
                }
            ),
        ),
        ("tokenizer.json", String::new()),
    ];
    if spec.labels.is_some() {
        files.retain(|(name, _)| matches!(*name, "config.json" | "tokenizer.json"));
    } else {
        std::fs::create_dir_all(dir.join("1_Pooling")).map_err(|e| io(dir, e))?;
    }
    for (name, text) in &files {
        let path = dir.join(name);
        let bytes: &[u8] = if *name == "tokenizer.json" {
            tokenizer_json
        } else {
            text.as_bytes()
        };
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
    let tensors = spec.tensors()?;
    let mut weights = RandomWeights::new(spec.seed);
    crate::tensor_writer::write_streaming(
        &dir.join("model.safetensors"),
        &tensors,
        spec.dtype,
        |_, name, block| weights.fill(name, block),
    )?;
    let mut written: Vec<String> = files.iter().map(|(name, _)| (*name).to_string()).collect();
    written.push("model.safetensors".into());
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters of a preset: what `surf synth` writes.
    fn parameters(spec: &SynthSpec) -> u64 {
        spec.tensors()
            .expect("the family's tensors")
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>() as u64)
            .sum()
    }

    #[test]
    fn the_tensors_named_from_two_layers_are_those_of_every_layer() {
        let families = [
            SynthFamily::Bert,
            SynthFamily::XlmRoberta,
            SynthFamily::MPNet,
            SynthFamily::T5,
            SynthFamily::Llama,
            SynthFamily::Qwen3,
        ];
        for family in families {
            let spec = if matches!(family, SynthFamily::Llama | SynthFamily::Qwen3) {
                SynthSpec::decoder(family, 5, 64, 2, 1, 32, 128, 100, 64)
            } else {
                SynthSpec {
                    family,
                    ..SynthSpec::sized(5, 64, 2, 128)
                }
            };
            let config = spec
                .model_config(Path::new("config.json"))
                .expect("a valid config");
            let every_layer =
                model_tensors(config.architecture().as_ref()).expect("the family's tensors");
            assert_eq!(
                spec.tensors().expect("named from two layers"),
                every_layer,
                "{family:?}"
            );
        }
    }

    #[test]
    fn presets_have_the_shapes_and_sizes_of_the_real_models() {
        // (preset, layers, hidden, heads, key/value heads, head size, vocabulary,
        // the published size without a language-model head, in millions)
        let cases = [
            (SynthPreset::TinyLlama, 22, 2048, 32, 4, 64, 32000, 1034),
            (SynthPreset::Qwen3_0_6B, 28, 1024, 16, 8, 128, 151_669, 596),
            (SynthPreset::Qwen3_4B, 36, 2560, 32, 8, 128, 151_665, 4022),
            (SynthPreset::Qwen3_8B, 36, 4096, 32, 8, 128, 151_665, 7568),
        ];
        for (preset, layers, hidden, heads, kv_heads, head_dim, vocab, millions) in cases {
            let spec = SynthSpec::preset(preset);
            let config = spec
                .model_config(Path::new("config.json"))
                .expect("the engine reads the preset's config");
            let dims = config.dims();
            assert_eq!(
                (
                    dims.layers,
                    dims.hidden,
                    dims.heads,
                    dims.head_dim,
                    dims.vocab
                ),
                (layers, hidden, heads, head_dim, vocab),
                "{preset:?}"
            );
            assert_eq!(spec.config_json()["num_key_value_heads"], kv_heads);
            let found = parameters(&spec) as f64 / 1e6;
            assert!(
                (found - millions as f64).abs() < 0.005 * millions as f64,
                "{preset:?}: {found:.1} M parameters, published {millions} M"
            );
        }
    }
}
