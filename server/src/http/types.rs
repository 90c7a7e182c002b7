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
    /// The model to run; the default one when unset.
    #[serde(default)]
    pub model: Option<String>,
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
    /// The model to run; the default one when unset.
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub special: bool,
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

/// `POST /rerank`.
#[derive(Debug, Deserialize)]
pub struct RerankRequest {
    pub query: String,
    pub texts: Vec<String>,
    #[serde(default)]
    pub raw_scores: bool,
    #[serde(default)]
    pub return_text: bool,
    /// Unset: the server's `--auto-truncate`.
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
    /// The model to run; the default one when unset.
    #[serde(default)]
    pub model: Option<String>,
}

/// One passage of a `/rerank` answer.
#[derive(Debug, Serialize)]
pub struct Rank {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub score: f32,
}

/// One input of `/predict`: a text, or a pair of texts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Sequence {
    Single(String),
    Pair(String, String),
}

/// `inputs` of `/predict`: one sequence or a list of them. Two strings in a
/// list are one pair, as TEI reads them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PredictInput {
    Single(Sequence),
    Batch(Vec<Sequence>),
}

/// `POST /predict`.
#[derive(Debug, Deserialize)]
pub struct PredictRequest {
    pub inputs: PredictInput,
    #[serde(default)]
    pub raw_scores: bool,
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
    /// The model to run; the default one when unset.
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LabelScore {
    pub score: f32,
    pub label: String,
}

/// Labels of one input, highest score first; a list of those for a batch.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum PredictResponse {
    Single(Vec<LabelScore>),
    Batch(Vec<Vec<LabelScore>>),
}

/// A document of `/v1/rerank`: a string, or an object with its text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    pub fn into_text(self) -> String {
        match self {
            Document::Text(text) | Document::Object { text } => text,
        }
    }
}

/// `POST /v1/rerank`, as Cohere and Jina take it.
#[derive(Debug, Deserialize)]
pub struct CohereRerankRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<Document>,
    #[serde(default)]
    pub top_n: Option<usize>,
    #[serde(default)]
    pub return_documents: bool,
}

#[derive(Debug, Serialize)]
pub struct DocumentText {
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct CohereRerankResult {
    pub index: usize,
    pub relevance_score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<DocumentText>,
}

#[derive(Debug, Serialize)]
pub struct CohereUsage {
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct CohereRerankResponse {
    pub results: Vec<CohereRerankResult>,
    pub model: String,
    pub usage: CohereUsage,
}

/// `GET /info`.
#[derive(Debug, Serialize)]
pub struct Info {
    pub model_id: String,
    pub model_sha: Option<String>,
    pub model_dtype: &'static str,
    /// `embedding`, `reranker` (one label) or `classifier`.
    pub model_type: &'static str,
    /// A classifier's or reranker's labels, in id order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
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
    /// Every model served, in the order of `--model`.
    pub models: Vec<ModelInfo>,
    /// GPU bytes held for every model's weights now.
    pub vram_used_bytes: u64,
}

/// One served model in `/info`.
#[derive(Debug, Serialize)]
pub struct ModelInfo {
    pub id: String,
    /// Whether requests that name no model go to it.
    pub default: bool,
    /// `bert`, `roberta`, `mpnet`, `t5`, ...
    pub family: &'static str,
    /// `embedding`, `reranker` or `classifier`.
    pub model_type: &'static str,
    pub dimension: usize,
    pub dtype: &'static str,
    pub max_input_length: usize,
    pub layers: usize,
    /// What the model holds in GPU memory now.
    pub resident_layers: usize,
    pub pinned_resident: bool,
    pub vram_used_bytes: u64,
    /// Bytes of its weights with every layer resident.
    pub vram_whole_bytes: u64,
}

/// `GET /v1/models`, in OpenAI's shape.
#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    /// Unix seconds when the service started.
    pub created: u64,
    pub owned_by: &'static str,
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

    fn predict(json: &str) -> PredictInput {
        serde_json::from_str(json).expect("valid predict input")
    }

    #[test]
    fn predict_inputs_read_as_tei_reads_them() {
        let single = |s: &str| Sequence::Single(s.into());
        let pair = |a: &str, b: &str| Sequence::Pair(a.into(), b.into());
        assert_eq!(predict(r#""a""#), PredictInput::Single(single("a")));
        assert_eq!(
            predict(r#"["a", "b"]"#),
            PredictInput::Single(pair("a", "b"))
        );
        assert_eq!(predict(r#"["a"]"#), PredictInput::Batch(vec![single("a")]));
        assert_eq!(
            predict(r#"[["a", "b"], "c", ["d", "e"]]"#),
            PredictInput::Batch(vec![pair("a", "b"), single("c"), pair("d", "e")])
        );
        assert_eq!(predict("[]"), PredictInput::Batch(Vec::new()));
        assert!(serde_json::from_str::<PredictInput>(r#"[["a", "b", "c"]]"#).is_err());
        assert!(serde_json::from_str::<PredictInput>("7").is_err());
    }

    #[test]
    fn documents_are_strings_or_objects_with_text() {
        let documents: Vec<Document> =
            serde_json::from_str(r#"["a", {"text": "b"}, {"text": "c", "title": "t"}]"#)
                .expect("valid documents");
        let texts: Vec<String> = documents.into_iter().map(Document::into_text).collect();
        assert_eq!(texts, ["a", "b", "c"]);
        assert!(serde_json::from_str::<Vec<Document>>(r#"[{"title": "t"}]"#).is_err());
    }
}
