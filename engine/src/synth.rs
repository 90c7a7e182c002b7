//! Writes BERT model folders with random weights: scale models for paging
//! benches and small, malformed or re-typed checkpoints for tests.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::model::model_tensors;

/// The shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    /// Storage type of the weights: F32, F16 or BF16.
    pub dtype: Dtype,
    pub seed: u64,
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
            layers,
            hidden,
            heads,
            intermediate,
            vocab_size: 30522,
            max_position_embeddings: 512,
            hidden_act: "gelu".into(),
            dtype: Dtype::F32,
            seed: 1,
        }
    }

    pub fn config(&self) -> BertConfig {
        BertConfig {
            model_type: "bert".into(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            intermediate_size: self.intermediate,
            hidden_act: self.hidden_act.clone(),
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: "absolute".into(),
        }
    }
}

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
    match dtype {
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Random tensors for every weight of `spec`, as f32 values. LayerNorm gains sit
/// near 1 and everything else is small, as in a trained model, so activations
/// stay in a realistic range through many layers.
pub fn random_tensors(spec: &SynthSpec) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix64(spec.seed);
    model_tensors(&spec.config())
        .into_iter()
        .map(|(name, shape)| {
            let count: usize = shape.iter().product();
            let gain = name.ends_with("LayerNorm.weight");
            let values = (0..count)
                .map(|_| {
                    let r = rng.next_unit();
                    if gain { 1.0 + 0.1 * r } else { 0.05 * r }
                })
                .collect();
            (name, shape, values)
        })
        .collect()
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

/// Writes a complete model folder: config, weights, the given tokenizer and the
/// sentence-transformers files for mean pooling with normalisation.
pub fn write_model(dir: &Path, spec: &SynthSpec, tokenizer_json: &[u8]) -> Result<()> {
    let io = |path: &Path, e: std::io::Error| Error::io(path, e);
    std::fs::create_dir_all(dir.join("1_Pooling")).map_err(|e| io(dir, e))?;
    let config = spec.config();
    let config_json = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": config.position_embedding_type,
    });
    let files: [(&str, String); 5] = [
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
                spec.max_position_embeddings
            ),
        ),
        (
            "1_Pooling/config.json",
            format!(
                r#"{{"word_embedding_dimension": {}, "pooling_mode_mean_tokens": true}}"#,
                spec.hidden
            ),
        ),
        ("tokenizer.json", String::new()),
    ];
    for (name, text) in &files {
        let path = dir.join(name);
        let bytes: &[u8] = if *name == "tokenizer.json" {
            tokenizer_json
        } else {
            text.as_bytes()
        };
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
    write_safetensors(
        &dir.join("model.safetensors"),
        &random_tensors(spec),
        spec.dtype,
    )
}
