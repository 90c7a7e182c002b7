//! The model folder's JSON files, mirrored as serde structs.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

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

/// The largest value `validate` accepts per dimension: several times the
/// largest BERT-family checkpoints, small enough that nothing sized from them
/// overflows.
const DIMENSION_LIMITS: [(&str, usize); 7] = [
    ("vocab_size", 1 << 20),
    ("hidden_size", 8192),
    ("num_hidden_layers", 256),
    ("num_attention_heads", 256),
    ("intermediate_size", 65536),
    ("max_position_embeddings", 65536),
    ("type_vocab_size", 1024),
];

/// The activation of the intermediate (feed-forward) layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `0.5 x (1 + erf(x / sqrt 2))`, as `hidden_act: "gelu"` asks.
    GeluErf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

impl BertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks what the kernels rely on, naming `path` in the error.
    pub fn validate(&self, path: &Path) -> Result<Activation> {
        if !matches!(self.model_type.as_str(), "bert") {
            return Err(Error::Unsupported {
                path: path.into(),
                field: "model_type",
                value: self.model_type.clone(),
                supported: "bert",
            });
        }
        if self.position_embedding_type != "absolute" {
            return Err(Error::Unsupported {
                path: path.into(),
                field: "position_embedding_type",
                value: self.position_embedding_type.clone(),
                supported: "absolute",
            });
        }
        let activation = match self.hidden_act.as_str() {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::Unsupported {
                    path: path.into(),
                    field: "hidden_act",
                    value: other.into(),
                    supported: "gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu",
                });
            }
        };
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::bad_model(path, format!("`{name}` must be positive")));
            }
            // Buffers are sized from these before any adapter limit is known,
            // so a config from a file or a server is bounded first.
            if let Some(&(_, largest)) = DIMENSION_LIMITS.iter().find(|(n, _)| *n == name)
                && value > largest
            {
                return Err(Error::bad_model(
                    path,
                    format!("`{name}` is {value}, more than the largest supported, {largest}"),
                ));
            }
        }
        // Kernels address a layer and the embedding tables with 32-bit
        // element offsets.
        let h = self.hidden_size;
        let layer_elements = h
            .checked_mul(4 * h + 2 * self.intermediate_size + 9)
            .and_then(|n| n.checked_add(self.intermediate_size));
        let table_elements =
            (self.vocab_size + self.max_position_embeddings + self.type_vocab_size).checked_mul(h);
        for (what, elements) in [
            ("one layer", layer_elements),
            ("the embedding tables", table_elements),
        ] {
            if elements.is_none_or(|n| n > u32::MAX as usize) {
                return Err(Error::bad_model(
                    path,
                    format!("{what} would hold more than 2^32 elements"),
                ));
            }
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
        if !self.head_dim().is_multiple_of(4) {
            return Err(Error::bad_model(
                path,
                format!("head size {} is not a multiple of 4", self.head_dim()),
            ));
        }
        if self.head_dim() > crate::kernels::attention::MAX_HEAD_DIM {
            return Err(Error::bad_model(
                path,
                format!(
                    "head size {} is larger than the attention kernel's {}",
                    self.head_dim(),
                    crate::kernels::attention::MAX_HEAD_DIM
                ),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::bad_model(path, "`layer_norm_eps` must be positive"));
        }
        Ok(activation)
    }
}

/// `1_Pooling/config.json` of a sentence-transformers folder.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct PoolingConfig {
    #[serde(default)]
    pub pooling_mode_cls_token: bool,
    #[serde(default)]
    pub pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pub pooling_mode_max_tokens: bool,
    #[serde(default)]
    pub pooling_mode_mean_sqrt_len_tokens: bool,
}

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

impl Pooling {
    pub(crate) fn code(self) -> u32 {
        match self {
            Pooling::Mean => 0,
            Pooling::Cls => 1,
            Pooling::Max => 2,
            Pooling::MeanSqrtLen => 3,
        }
    }
}

/// `sentence_bert_config.json`.
#[derive(Debug, Clone, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// One entry of `modules.json`.
#[derive(Debug, Clone, Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

/// Everything about a model except its weights: architecture, tokenizer,
/// sequence limit and the sentence-transformers head (pooling, normalisation).
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub origin: PathBuf,
    pub config: BertConfig,
    pub activation: Activation,
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_seq_length: usize,
    pub tokenizer_json: Vec<u8>,
}

pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const SENTENCE_BERT_CONFIG_FILE: &str = "sentence_bert_config.json";
pub const MODULES_FILE: &str = "modules.json";
pub const DEFAULT_POOLING_FILE: &str = "1_Pooling/config.json";

impl ModelSpec {
    /// Reads the spec from a model folder on disk.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::bad_model(dir, "model folder does not exist"));
        }
        Self::from_files(dir, |name| {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(path, e)),
            }
        })
    }

    /// Builds the spec from named files, wherever they come from (a folder, a
    /// weight server's manifest). `read` returns `None` for an absent file.
    pub fn from_files(
        origin: &Path,
        read: impl Fn(&str) -> Result<Option<Vec<u8>>>,
    ) -> Result<Self> {
        let required = |name: &str| -> Result<Vec<u8>> {
            read(name)?.ok_or_else(|| Error::bad_model(origin.join(name), "file is missing"))
        };
        let config_path = origin.join(CONFIG_FILE);
        let config: BertConfig = parse_json(&config_path, &required(CONFIG_FILE)?)?;
        let activation = config.validate(&config_path)?;

        let tokenizer_json = required(TOKENIZER_FILE)?;

        let mut max_seq_length = config.max_position_embeddings;
        if let Some(bytes) = read(SENTENCE_BERT_CONFIG_FILE)? {
            let path = origin.join(SENTENCE_BERT_CONFIG_FILE);
            let st: SentenceBertConfig = parse_json(&path, &bytes)?;
            if let Some(len) = st.max_seq_length {
                if len < 2 {
                    return Err(Error::bad_model(path, "max_seq_length must be at least 2"));
                }
                max_seq_length = len.min(config.max_position_embeddings);
            }
        }

        // Without modules.json a folder is a plain transformer checkpoint: mean
        // pooling and unit length, the sentence-transformers defaults for BERT.
        let mut pooling_file = DEFAULT_POOLING_FILE.to_string();
        let mut normalize = true;
        if let Some(bytes) = read(MODULES_FILE)? {
            let path = origin.join(MODULES_FILE);
            let modules: Vec<ModuleEntry> = parse_json(&path, &bytes)?;
            normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
            if let Some(p) = modules.iter().find(|m| m.kind.ends_with(".Pooling")) {
                pooling_file = format!("{}/config.json", p.path.trim_end_matches('/'));
            }
        }
        let pooling = match read(&pooling_file)? {
            None => Pooling::Mean,
            Some(bytes) => {
                let path = origin.join(&pooling_file);
                let p: PoolingConfig = parse_json(&path, &bytes)?;
                let modes = [
                    (p.pooling_mode_mean_tokens, Pooling::Mean),
                    (p.pooling_mode_cls_token, Pooling::Cls),
                    (p.pooling_mode_max_tokens, Pooling::Max),
                    (p.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
                ];
                let chosen: Vec<Pooling> = modes.iter().filter(|m| m.0).map(|m| m.1).collect();
                match chosen.as_slice() {
                    [one] => *one,
                    [] => return Err(Error::bad_model(path, "no pooling mode is enabled")),
                    _ => {
                        return Err(Error::Unsupported {
                            path,
                            field: "pooling",
                            value: format!("{chosen:?}"),
                            supported: "exactly one pooling mode",
                        });
                    }
                }
            }
        };

        Ok(ModelSpec {
            origin: origin.into(),
            config,
            activation,
            pooling,
            normalize,
            max_seq_length,
            tokenizer_json,
        })
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::BertConfig;

    fn minilm_with(field: &str, value: u64) -> BertConfig {
        let mut json = serde_json::json!({
            "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512, "type_vocab_size": 2,
        });
        json[field] = value.into();
        serde_json::from_value(json).expect("a config")
    }

    #[test]
    fn absurd_dimensions_are_refused_before_anything_is_sized_from_them() {
        let path = Path::new("config.json");
        assert!(minilm_with("hidden_size", 384).validate(path).is_ok());
        for (field, value) in [
            ("hidden_size", 1 << 40),
            ("num_hidden_layers", 1 << 20),
            ("intermediate_size", u64::MAX / 2),
            ("vocab_size", 1 << 33),
            ("max_position_embeddings", 1 << 31),
            ("num_attention_heads", 1 << 20),
            ("type_vocab_size", 1 << 30),
        ] {
            let error = minilm_with(field, value)
                .validate(path)
                .expect_err("refused");
            assert!(error.to_string().contains(field), "{field}: {error}");
            assert!(error.is_bad_input());
        }
    }

    #[test]
    fn dimensions_within_bounds_whose_tables_overflow_32_bit_offsets_are_refused() {
        // 1M tokens of 8192: 2^33 elements in the word table.
        let mut config = minilm_with("vocab_size", 1 << 20);
        config.hidden_size = 8192;
        config.num_attention_heads = 128;
        let error = config
            .validate(Path::new("config.json"))
            .expect_err("refused");
        assert!(error.to_string().contains("2^32"), "{error}");
    }
}
