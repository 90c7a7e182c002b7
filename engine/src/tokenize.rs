//! The model's tokenizer, with its built-in padding turned off and truncation set
//! from the sentence-transformers sequence limit.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
}

/// The token ids of one text, `[CLS]` and `[SEP]` included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl TextTokenizer {
    pub fn from_json(path: &Path, json: &[u8], max_len: usize, vocab_size: usize) -> Result<Self> {
        let fail = |message: String| Error::Tokenizer {
            path: path.into(),
            message,
        };
        let mut inner = Tokenizer::from_bytes(json).map_err(|e| fail(e.to_string()))?;
        // tokenizer.json files often carry padding and truncation of their own
        // (128 for MiniLM), which would cut long inputs silently.
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| fail(e.to_string()))?;
        let vocab = inner.get_vocab_size(true);
        if vocab > vocab_size {
            return Err(fail(format!(
                "the tokenizer has {vocab} tokens but the model's vocab_size is {vocab_size}"
            )));
        }
        Ok(Self {
            inner,
            path: path.into(),
        })
    }

    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        let encodings =
            self.inner
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
}
