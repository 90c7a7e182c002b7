//! The model's tokenizer, with its built-in padding turned off and truncation set
//! from the sentence-transformers sequence limit.

use std::path::{Path, PathBuf};

use tokenizers::{
    Encoding, PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};

/// What to do with a text longer than the model's sequence limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Keep the first tokens (the engine's default, as sentence-transformers does).
    #[default]
    Right,
    /// Keep the last tokens.
    Left,
    /// Keep every token; the caller refuses what is too long.
    None,
}

/// The tokenizer three times over, one per [`Truncation`]: `tokenizers` keeps
/// truncation in the tokenizer itself, and switching it per call would need a
/// lock around one shared instance.
pub struct TextTokenizer {
    keep_first: Tokenizer,
    keep_last: Tokenizer,
    untruncated: Tokenizer,
    max_len: usize,
    /// Whether token type ids reach the model; zeros otherwise.
    token_types: bool,
    path: PathBuf,
}

/// The tokenizer's own settings, read by transformers beside `tokenizer.json`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Classes that transformers 5 loads as its generic `tokenizer.json`
/// backend, whose inputs to the model leave token type ids out.
const GENERIC_TOKENIZER_CLASSES: [&str; 2] = ["PreTrainedTokenizerFast", "TokenizersBackend"];

/// Whether transformers hands the model the token type ids of the
/// tokenizer's template (1 on a BERT pair's second text), from
/// `tokenizer_config.json`: what its `model_input_names` lists, else whether
/// the class is a model's own tokenizer (`BertTokenizer`, as real BERT
/// cross-encoders name) rather than the generic one, which gives the model
/// none, so that it sees zeros. Without the file, the template's types.
pub fn returns_token_types(tokenizer_config_json: Option<&[u8]>) -> bool {
    let Some(config) = tokenizer_config_json
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(json).ok())
    else {
        return true;
    };
    if let Some(names) = config["model_input_names"].as_array() {
        return names.iter().any(|name| name == "token_type_ids");
    }
    match config["tokenizer_class"].as_str() {
        Some(class) => !GENERIC_TOKENIZER_CLASSES.contains(&class),
        None => true,
    }
}

/// The token ids of one text, `[CLS]` and `[SEP]` included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl Tokens {
    /// Token ids given by a caller, used as they are (no special tokens added).
    pub fn from_ids(ids: Vec<u32>) -> Self {
        let type_ids = vec![0; ids.len()];
        Self { ids, type_ids }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl TextTokenizer {
    pub fn from_json(path: &Path, json: &[u8], max_len: usize, vocab_size: usize) -> Result<Self> {
        let fail = |message: String| Error::Tokenizer {
            path: path.into(),
            message,
        };
        let mut untruncated = Tokenizer::from_bytes(json).map_err(|e| fail(e.to_string()))?;
        // tokenizer.json files often carry padding and truncation of their own
        // (128 for MiniLM), which would cut long inputs silently.
        untruncated.with_padding(None);
        untruncated
            .with_truncation(None)
            .map_err(|e| fail(e.to_string()))?;
        let vocab = untruncated.get_vocab_size(true);
        if vocab > vocab_size {
            return Err(fail(format!(
                "the tokenizer has {vocab} tokens but the model's vocab_size is {vocab_size}"
            )));
        }
        let truncating = |direction| {
            let mut tokenizer = untruncated.clone();
            tokenizer
                .with_truncation(Some(TruncationParams {
                    max_length: max_len,
                    strategy: TruncationStrategy::LongestFirst,
                    stride: 0,
                    direction,
                }))
                .map(|_| ())
                .map_err(|e| fail(e.to_string()))?;
            Ok::<_, Error>(tokenizer)
        };
        Ok(Self {
            keep_first: truncating(TruncationDirection::Right)?,
            keep_last: truncating(TruncationDirection::Left)?,
            untruncated,
            max_len,
            token_types: true,
            path: path.into(),
        })
    }

    /// Feeds the model token type ids (the default), or zeros in their place.
    pub fn set_token_types(&mut self, token_types: bool) {
        self.token_types = token_types;
    }

    /// The most tokens one input may have, `[CLS]` and `[SEP]` included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenizes `texts`, cutting them at the model's limit from the right.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        self.encode_with(texts, Truncation::Right)
    }

    pub fn encode_with(&self, texts: &[&str], truncation: Truncation) -> Result<Vec<Tokens>> {
        let tokenizer = self.tokenizer_for(truncation);
        let encodings =
            tokenizer
                .encode_batch(texts.to_vec(), true)
                .map_err(|e| Error::Tokenizer {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?;
        Ok(encodings
            .into_iter()
            .map(|e| Tokens {
                ids: e.get_ids().to_vec(),
                type_ids: e.get_type_ids().to_vec(),
            })
            .collect())
    }

    /// Tokenizes (query, passage) pairs with the tokenizer's own pair
    /// template (`[CLS] q [SEP] p [SEP]` with token types 0 then 1 for BERT,
    /// `<s> q </s></s> p </s>` for XLM-RoBERTa). A pair longer than the
    /// model's limit loses passage tokens first, from the side `truncation`
    /// names, and query tokens only when the query alone is too long. An
    /// empty passage still takes the pair template, as the model saw it in
    /// sentence-transformers.
    pub fn encode_pairs(
        &self,
        pairs: &[(&str, &str)],
        truncation: Truncation,
    ) -> Result<Vec<Tokens>> {
        let fail = |e: tokenizers::Error| Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let tokenizer = &self.untruncated;
        let queries: Vec<&str> = pairs.iter().map(|(query, _)| *query).collect();
        let passages: Vec<&str> = pairs.iter().map(|(_, passage)| *passage).collect();
        let queries = tokenizer.encode_batch(queries, false).map_err(fail)?;
        let passages = tokenizer.encode_batch(passages, false).map_err(fail)?;
        let special = tokenizer
            .get_post_processor()
            .map_or(0, |processor| processor.added_tokens(true));
        let room = self.max_len.saturating_sub(special);
        queries
            .into_iter()
            .zip(passages)
            .map(|(mut query, mut passage)| {
                if let Some(direction) = truncation.direction() {
                    let (keep_query, keep_passage) = pair_lengths(query.len(), passage.len(), room);
                    cut(&mut query, keep_query, direction);
                    cut(&mut passage, keep_passage, direction);
                }
                let joined = tokenizer
                    .post_process(query, Some(passage), true)
                    .map_err(fail)?;
                let ids = joined.get_ids().to_vec();
                let type_ids = if self.token_types {
                    joined.get_type_ids().to_vec()
                } else {
                    vec![0; ids.len()]
                };
                Ok(Tokens { ids, type_ids })
            })
            .collect()
    }

    fn tokenizer_for(&self, truncation: Truncation) -> &Tokenizer {
        match truncation {
            Truncation::Right => &self.keep_first,
            Truncation::Left => &self.keep_last,
            Truncation::None => &self.untruncated,
        }
    }

    /// Each token of `text` with its id, piece and byte span; special tokens
    /// carry no span.
    pub fn pieces(
        &self,
        text: &str,
        truncation: Truncation,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenPiece>> {
        let tokenizer = self.tokenizer_for(truncation);
        let encoding =
            tokenizer
                .encode(text, add_special_tokens)
                .map_err(|e| Error::Tokenizer {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_offsets())
            .zip(encoding.get_special_tokens_mask())
            .map(|(((&id, piece), &(start, stop)), &special)| TokenPiece {
                id,
                text: piece.clone(),
                special: special == 1,
                start,
                stop,
            })
            .collect())
    }
}

impl Truncation {
    /// The side tokens are cut from; `None` when nothing is cut.
    fn direction(self) -> Option<TruncationDirection> {
        match self {
            Truncation::Right => Some(TruncationDirection::Right),
            Truncation::Left => Some(TruncationDirection::Left),
            Truncation::None => None,
        }
    }
}

/// How many tokens of a query and of a passage fit in `room` tokens: the
/// passage gives way first, then the query.
pub fn pair_lengths(query: usize, passage: usize, room: usize) -> (usize, usize) {
    if query + passage <= room {
        (query, passage)
    } else if query <= room {
        (query, room - query)
    } else {
        (room, 0)
    }
}

fn cut(encoding: &mut Encoding, keep: usize, direction: TruncationDirection) {
    if encoding.len() > keep {
        encoding.truncate(keep, 0, direction);
        // The cut-off parts would otherwise go through the template too.
        drop(encoding.take_overflowing());
    }
}

/// One token of a tokenized text, for `/tokenize`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPiece {
    pub id: u32,
    pub text: String,
    pub special: bool,
    /// Byte offsets into the text.
    pub start: usize,
    pub stop: usize,
}

#[cfg(test)]
mod tests {
    use super::pair_lengths;

    #[test]
    fn token_types_follow_what_transformers_hands_the_model() {
        use super::returns_token_types;
        assert!(returns_token_types(None));
        assert!(returns_token_types(Some(
            br#"{"tokenizer_class": "BertTokenizer"}"#
        )));
        assert!(returns_token_types(Some(b"{}")));
        assert!(!returns_token_types(Some(
            br#"{"tokenizer_class": "PreTrainedTokenizerFast"}"#
        )));
        assert!(returns_token_types(Some(
            br#"{"tokenizer_class": "PreTrainedTokenizerFast",
                 "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}"#
        )));
        assert!(!returns_token_types(Some(
            br#"{"tokenizer_class": "BertTokenizer", "model_input_names": ["input_ids"]}"#
        )));
    }

    #[test]
    fn the_passage_gives_way_before_the_query() {
        assert_eq!(pair_lengths(3, 4, 10), (3, 4));
        assert_eq!(pair_lengths(3, 9, 10), (3, 7));
        assert_eq!(pair_lengths(10, 9, 10), (10, 0));
        assert_eq!(pair_lengths(12, 9, 10), (10, 0));
        assert_eq!(pair_lengths(0, 0, 0), (0, 0));
    }
}
