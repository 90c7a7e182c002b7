//! RoBERTa, XLM-RoBERTa and CamemBERT (`model_type: roberta`,
//! `xlm-roberta`, `camembert`): BERT's config, tensor names and layers
//! (`bert.rs`), one token type, and positions that start at
//! `pad_token_id + 1`, because the position table's first rows belong to
//! padding. Their BPE and SentencePiece tokenizers come in `tokenizer.json`.

use super::BertConfig;

/// The position id of token `p` of an unpadded input: `padding_idx + 1 + p`,
/// what transformers' `create_position_ids_from_input_ids` gives real tokens.
pub fn position_id(config: &BertConfig, p: usize) -> u32 {
    (config.pad_token_id + 1 + p) as u32
}

/// The longest input the position table holds (512 of XLM-R's 514 rows).
pub fn max_positions(config: &BertConfig) -> usize {
    config
        .max_position_embeddings
        .saturating_sub(config.pad_token_id + 1)
}
