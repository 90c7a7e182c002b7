//! Request and response bodies of the embedding routes, with the field names
//! TEI and OpenAI clients send and expect.

use serde::{Deserialize, Serialize};

/// One input: a text, or token ids used as they are.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum InputItem {
    Text(String),
    Ids(Vec<u32>),
}

/// `inputs` (TEI) or `input` (OpenAI): a text, token ids, or a list of either.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Ids(Vec<u32>),
    Batch(Vec<InputItem>),
}

impl Input {
    pub fn into_items(self) -> Vec<InputItem> {
        match self {
            Input::Text(text) => vec![InputItem::Text(text)],
            // An empty array is an empty batch, not one input of no tokens.
            Input::Ids(ids) if ids.is_empty() => Vec::new(),
            Input::Ids(ids) => vec![InputItem::Ids(ids)],
            Input::Batch(items) => items,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TruncationDirection {
    Left,
    #[default]
    Right,
}

fn yes() -> bool {
    true
}

/// `POST /embed`.
#[derive(Debug, Deserialize)]
pub struct EmbedRequest {
    pub inputs: Input,
    #[serde(default = "yes")]
    pub normalize: bool,
    /// Unset: the server's `--auto-truncate`.
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
    #[serde(default)]
    pub dimensions: Option<usize>,
    #[serde(default)]
    pub prompt_name: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct OpenAiRequest {
    pub input: Input,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    pub dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as OpenAI clients send it, and ignored
    pub user: Option<String>,
}

/// An embedding as OpenAI encodes it: floats, or base64 of little-endian f32s.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EncodedEmbedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct OpenAiEmbedding {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EncodedEmbedding,
}

#[derive(Debug, Serialize)]
pub struct OpenAiUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct OpenAiResponse {
    pub object: &'static str,
    pub data: Vec<OpenAiEmbedding>,
    pub model: String,
    pub usage: OpenAiUsage,
}

/// `POST /tokenize`.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub inputs: Input,
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
}

#[derive(Debug, Serialize)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub special: bool,
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

/// `GET /info`.
#[derive(Debug, Serialize)]
pub struct Info {
    pub model_id: String,
    pub model_sha: Option<String>,
    pub model_dtype: &'static str,
    pub model_type: &'static str,
    pub dimension: usize,
    pub pooling: String,
    pub normalize_default: bool,
    pub max_input_length: usize,
    pub max_concurrent_requests: usize,
    pub max_batch_tokens: usize,
    pub max_batch_requests: Option<usize>,
    pub max_client_batch_size: usize,
    pub auto_truncate: bool,
    pub vram_budget_bytes: Option<u64>,
    pub vram_layer_slots: usize,
    pub layers: usize,
    pub adapter: String,
    pub version: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(json: &str) -> Vec<InputItem> {
        serde_json::from_str::<Input>(json)
            .expect("valid input")
            .into_items()
    }

    #[test]
    fn every_input_shape_becomes_a_list_of_items() {
        assert_eq!(items(r#""a""#), vec![InputItem::Text("a".into())]);
        assert_eq!(items(r#"[""]"#), vec![InputItem::Text(String::new())]);
        assert_eq!(items("[101, 102]"), vec![InputItem::Ids(vec![101, 102])]);
        assert_eq!(
            items(r#"[[101, 102], "b"]"#),
            vec![InputItem::Ids(vec![101, 102]), InputItem::Text("b".into())]
        );
        assert!(items("[]").is_empty());
        assert!(serde_json::from_str::<Input>("[-1]").is_err());
        assert!(serde_json::from_str::<Input>("3").is_err());
    }
}
