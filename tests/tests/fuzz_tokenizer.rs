//! Property tests of the tokenizer on arbitrary text: any Unicode, control
//! characters, long runs, lone combining marks. Never a panic, always ids
//! inside the vocabulary, `[CLS]` first and `[SEP]` last, and never more tokens
//! than the model's positions, truncating from either end.

use proptest::prelude::*;
use surf_engine::tokenize::TextTokenizer;
use surf_engine::{ModelSpec, Truncation};
use surf_tests::fuzz::{DEFAULT_CASES, check, stress_cases};
use surf_tests::minilm_dir;

fn tokenizer() -> (TextTokenizer, usize) {
    let dir = minilm_dir();
    let spec = ModelSpec::from_dir(&dir).expect("the model's spec");
    let tokenizer = TextTokenizer::from_json(
        &dir.join("tokenizer.json"),
        &spec.tokenizer_json,
        spec.max_seq_length,
        spec.config.vocab_size(),
    )
    .expect("the tokenizer loads");
    (tokenizer, spec.config.vocab_size())
}

fn texts() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,40}",
        // Runs long enough to be truncated, in scripts the vocabulary lacks.
        proptest::collection::vec(any::<char>(), 400..1200).prop_map(|c| c.into_iter().collect()),
        "[\u{0300}-\u{036f}\u{200b}\u{feff}\u{0000}-\u{001f} ]{0,64}",
    ]
}

fn tokenizes_within_bounds(cases: u32) {
    let (tokenizer, vocab_size) = tokenizer();
    let empty = tokenizer.encode(&[""]).expect("an empty text");
    let (cls, sep) = (empty[0].ids[0], empty[0].ids[1]);
    check(cases, (texts(), any::<bool>()), |(text, from_left)| {
        let truncation = if from_left {
            Truncation::Left
        } else {
            Truncation::Right
        };
        let tokens = tokenizer
            .encode_with(&[text.as_str()], truncation)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let ids = &tokens[0].ids;
        prop_assert!(ids.len() >= 2 && ids.len() <= tokenizer.max_len());
        prop_assert!(ids.iter().all(|&id| (id as usize) < vocab_size));
        prop_assert_eq!(ids[0], cls);
        prop_assert_eq!(ids[ids.len() - 1], sep);
        Ok(())
    });
}

#[test]
fn arbitrary_text_tokenizes_within_the_vocabulary_and_the_positions() {
    tokenizes_within_bounds(DEFAULT_CASES);
}

#[test]
#[ignore = "stress: run with --ignored, SURF_FUZZ_CASES sets the count"]
fn stress_arbitrary_text_tokenizes_within_the_vocabulary_and_the_positions() {
    tokenizes_within_bounds(stress_cases());
}
