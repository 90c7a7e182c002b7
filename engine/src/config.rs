//! The model folder's JSON files besides `config.json` (which the model
//! layer reads as its family's config, `model::ModelConfig`): the
//! sentence-transformers pipeline of `modules.json` (Transformer, Pooling,
//! Dense, Normalize), the sequence limit, and a classifier's labels.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
pub use crate::model::ModelConfig;

/// An activation a matmul (or the gated feed-forward) applies to its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `0.5 x (1 + erf(x / sqrt 2))`, as `hidden_act: "gelu"` asks.
    GeluErf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    Tanh,
    /// `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    /// The kernels' code for it (`activation.wgsl`).
    pub fn code(self) -> u32 {
        match self {
            Activation::Identity => 0,
            Activation::GeluErf => 1,
            Activation::GeluTanh => 2,
            Activation::Relu => 3,
            Activation::Tanh => 4,
            Activation::Silu => 5,
        }
    }

    /// A sentence-transformers Dense module's `activation_function`, a
    /// torch class path.
    fn from_torch(name: &str) -> Option<Self> {
        Some(match name.rsplit('.').next()? {
            "Identity" => Activation::Identity,
            "Tanh" => Activation::Tanh,
            "ReLU" => Activation::Relu,
            "GELU" => Activation::GeluErf,
            "SiLU" => Activation::Silu,
            _ => return None,
        })
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
    #[serde(default)]
    pub pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pub pooling_mode_lasttoken: bool,
}

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
    /// Token t weighs t + 1.
    WeightedMean,
    /// The last real token.
    LastToken,
}

impl Pooling {
    pub(crate) fn code(self) -> u32 {
        match self {
            Pooling::Mean => 0,
            Pooling::Cls => 1,
            Pooling::Max => 2,
            Pooling::MeanSqrtLen => 3,
            Pooling::WeightedMean => 4,
            Pooling::LastToken => 5,
        }
    }
}

/// A sentence-transformers `Dense` module: a linear layer (and activation)
/// after pooling, with its weights in its own folder.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseModule {
    /// The module's folder, for messages.
    pub folder: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    pub activation: Activation,
    /// `model.safetensors` of the folder: `linear.weight` ([out, in]) and
    /// `linear.bias`.
    pub weights: std::sync::Arc<Vec<u8>>,
}

/// `{folder}/config.json` of a Dense module.
#[derive(Debug, Clone, Deserialize)]
struct DenseConfig {
    in_features: usize,
    out_features: usize,
    #[serde(default = "default_true")]
    bias: bool,
    #[serde(default = "default_identity")]
    activation_function: String,
}

fn default_true() -> bool {
    true
}
fn default_identity() -> String {
    "torch.nn.modules.linear.Identity".into()
}

/// The fields of `config.json` that make a model a classifier.
#[derive(Debug, Clone, Deserialize, Default)]
struct ClassifierProbe {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    id2label: std::collections::BTreeMap<String, String>,
    num_labels: Option<usize>,
}

/// The modules a sentence-transformers pipeline may hold, by the last part
/// of their type name.
pub const SUPPORTED_MODULES: &str = "Transformer, Pooling, Dense, Normalize";

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
/// sequence limit and the sentence-transformers head (pooling, Dense
/// projections, normalisation), or a classifier's labels.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub origin: PathBuf,
    pub config: ModelConfig,
    pub pooling: Pooling,
    pub dense: Vec<DenseModule>,
    pub normalize: bool,
    pub max_seq_length: usize,
    pub tokenizer_json: Vec<u8>,
    /// A sequence classifier's labels in id order (rerankers have one);
    /// `None` for embedding models.
    pub labels: Option<Vec<String>>,
    /// Whether the tokenizer hands token type ids to the model, from
    /// `tokenizer_config.json` (see [`crate::tokenize::returns_token_types`]).
    pub token_types: bool,
    /// Prompts by name from `config_sentence_transformers.json`, put before
    /// each text (Qwen3-Embedding's `query` instruction).
    pub prompts: std::collections::BTreeMap<String, String>,
    /// The prompt used when a request names none.
    pub default_prompt_name: Option<String>,
}

/// `config_sentence_transformers.json`: the prompts a model was trained with.
#[derive(Debug, Default, Deserialize)]
struct SentenceTransformersConfig {
    #[serde(default)]
    prompts: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
}

/// The weights file of a Dense module's folder.
pub const MODULE_WEIGHTS_FILE: &str = "model.safetensors";

pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const SENTENCE_BERT_CONFIG_FILE: &str = "sentence_bert_config.json";
pub const MODULES_FILE: &str = "modules.json";
pub const DEFAULT_POOLING_FILE: &str = "1_Pooling/config.json";
pub const SENTENCE_TRANSFORMERS_CONFIG_FILE: &str = "config_sentence_transformers.json";

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
        let config_json = required(CONFIG_FILE)?;
        let config = ModelConfig::from_json(&config_path, &config_json)?;
        let labels = classifier_labels(&config_path, &config_json)?;

        let tokenizer_json = required(TOKENIZER_FILE)?;
        let token_types = crate::tokenize::returns_token_types(
            read(crate::tokenize::TOKENIZER_CONFIG_FILE)?.as_deref(),
        );

        // T5 has no position table to bound the input; 512 is what its
        // sentence-transformers models use.
        let positions = config.max_positions();
        let mut max_seq_length = positions.unwrap_or(512);
        if let Some(bytes) = read(SENTENCE_BERT_CONFIG_FILE)? {
            let path = origin.join(SENTENCE_BERT_CONFIG_FILE);
            let st: SentenceBertConfig = parse_json(&path, &bytes)?;
            if let Some(len) = st.max_seq_length {
                if len < 2 {
                    return Err(Error::bad_model(path, "max_seq_length must be at least 2"));
                }
                max_seq_length = positions.map_or(len, |limit| len.min(limit));
            }
        }

        // Without modules.json a folder is a plain transformer checkpoint: mean
        // pooling and unit length, the sentence-transformers defaults for BERT.
        // A classifier takes its `[CLS]` (`<s>`) state through its own head.
        let mut pooling_file = DEFAULT_POOLING_FILE.to_string();
        let mut normalize = labels.is_none();
        let mut dense = Vec::new();
        if let Some(bytes) = read(MODULES_FILE)?
            && labels.is_none()
        {
            let path = origin.join(MODULES_FILE);
            let modules: Vec<ModuleEntry> = parse_json(&path, &bytes)?;
            normalize = false;
            let mut width = config.hidden_size();
            for module in &modules {
                let kind = module.kind.rsplit('.').next().unwrap_or_default();
                let folder = module.path.trim_end_matches('/');
                match kind {
                    "Transformer" => {}
                    "Pooling" => pooling_file = format!("{folder}/config.json"),
                    "Normalize" => normalize = true,
                    "Dense" => {
                        let module = read_dense(origin, folder, width, &read)?;
                        width = module.out_features;
                        dense.push(module);
                    }
                    _ => {
                        return Err(Error::Unsupported {
                            path,
                            field: "module",
                            value: module.kind.clone(),
                            supported: SUPPORTED_MODULES,
                        });
                    }
                }
            }
        }
        let pooling = match read(&pooling_file)? {
            None if labels.is_some() => Pooling::Cls,
            None => Pooling::Mean,
            Some(bytes) => {
                let path = origin.join(&pooling_file);
                let p: PoolingConfig = parse_json(&path, &bytes)?;
                let modes = [
                    (p.pooling_mode_mean_tokens, Pooling::Mean),
                    (p.pooling_mode_cls_token, Pooling::Cls),
                    (p.pooling_mode_max_tokens, Pooling::Max),
                    (p.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
                    (p.pooling_mode_weightedmean_tokens, Pooling::WeightedMean),
                    (p.pooling_mode_lasttoken, Pooling::LastToken),
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

        let st_config = match read(SENTENCE_TRANSFORMERS_CONFIG_FILE)? {
            Some(bytes) => {
                let path = origin.join(SENTENCE_TRANSFORMERS_CONFIG_FILE);
                let st: SentenceTransformersConfig = parse_json(&path, &bytes)?;
                if let Some(name) = &st.default_prompt_name
                    && !st.prompts.contains_key(name)
                {
                    return Err(Error::bad_model(
                        path,
                        format!("default_prompt_name `{name}` is not one of its prompts"),
                    ));
                }
                st
            }
            None => SentenceTransformersConfig::default(),
        };

        Ok(ModelSpec {
            origin: origin.into(),
            config,
            pooling,
            dense,
            normalize,
            max_seq_length,
            tokenizer_json,
            labels,
            token_types,
            prompts: st_config.prompts,
            default_prompt_name: st_config.default_prompt_name,
        })
    }

    /// The text put before each input: the prompt called `name`, or the
    /// model's default one when `name` is `None`; an unknown name is an error
    /// listing the names the model has.
    pub fn prompt(&self, name: Option<&str>) -> Result<Option<&str>> {
        let Some(name) = name.or(self.default_prompt_name.as_deref()) else {
            return Ok(None);
        };
        match self.prompts.get(name) {
            Some(text) => Ok(Some(text.as_str())),
            None => Err(Error::UnknownPrompt {
                name: name.into(),
                available: self.prompt_names(),
            }),
        }
    }

    /// The model's prompt names, comma-separated, or `none`.
    pub fn prompt_names(&self) -> String {
        if self.prompts.is_empty() {
            return "none".into();
        }
        self.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Length of each output: the embedding, or a classifier's logits.
    pub fn output_dimension(&self) -> usize {
        match (&self.labels, self.dense.last()) {
            (Some(labels), _) => labels.len(),
            (None, Some(dense)) => dense.out_features,
            (None, None) => self.config.hidden_size(),
        }
    }
}

/// Reads the Dense module in `folder`, whose input is `width` wide.
fn read_dense(
    origin: &Path,
    folder: &str,
    width: usize,
    read: &impl Fn(&str) -> Result<Option<Vec<u8>>>,
) -> Result<DenseModule> {
    let config_name = format!("{folder}/config.json");
    let config_path = origin.join(&config_name);
    let bytes =
        read(&config_name)?.ok_or_else(|| Error::bad_model(&config_path, "file is missing"))?;
    let config: DenseConfig = parse_json(&config_path, &bytes)?;
    let activation =
        Activation::from_torch(&config.activation_function).ok_or_else(|| Error::Unsupported {
            path: config_path.clone(),
            field: "activation_function",
            value: config.activation_function.clone(),
            supported: "Identity, Tanh, ReLU, GELU, SiLU",
        })?;
    if config.in_features != width {
        return Err(Error::bad_model(
            &config_path,
            format!(
                "the Dense module takes {} features, but the vector before it has {width}",
                config.in_features
            ),
        ));
    }
    if config.out_features == 0 || config.out_features > 65536 {
        return Err(Error::bad_model(
            &config_path,
            format!("out_features {} is out of range", config.out_features),
        ));
    }
    let weights_name = format!("{folder}/{MODULE_WEIGHTS_FILE}");
    let weights = read(&weights_name)?.ok_or_else(|| {
        Error::bad_model(
            origin.join(&weights_name),
            "file is missing (Dense weights are read from safetensors only)",
        )
    })?;
    Ok(DenseModule {
        folder: folder.to_string(),
        in_features: config.in_features,
        out_features: config.out_features,
        bias: config.bias,
        activation,
        weights: std::sync::Arc::new(weights),
    })
}

/// A `*ForSequenceClassification` checkpoint's labels in id order.
fn classifier_labels(path: &Path, config_json: &[u8]) -> Result<Option<Vec<String>>> {
    let probe: ClassifierProbe = parse_json(path, config_json)?;
    if !probe
        .architectures
        .iter()
        .any(|a| a.ends_with("ForSequenceClassification"))
    {
        return Ok(None);
    }
    let count = probe.num_labels.unwrap_or(probe.id2label.len()).max(1);
    if count > 4096 {
        return Err(Error::bad_model(
            path,
            format!("{count} labels is too many"),
        ));
    }
    let labels = (0..count)
        .map(|id| {
            probe
                .id2label
                .get(&id.to_string())
                .cloned()
                .unwrap_or_else(|| format!("LABEL_{id}"))
        })
        .collect();
    Ok(Some(labels))
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })
}
