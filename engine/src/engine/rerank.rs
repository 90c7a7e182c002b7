//! Cross-encoders and sequence classifiers: (query, passage) pairs or texts
//! in, scores out, as sentence-transformers' `CrossEncoder.predict` gives
//! them (the sigmoid of a single logit, a softmax over several), or the raw
//! logits when asked.

use super::Engine;
use crate::error::{Error, Result};
use crate::tokenize::{Tokens, Truncation};

/// What a model computes, as the services tell models apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Sentence embeddings.
    Embedding,
    /// A sequence classifier with one label: its score ranks passages.
    Reranker,
    /// A sequence classifier with several labels.
    Classifier,
}

impl ModelKind {
    /// The name `/info` gives the kind.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Embedding => "embedding",
            ModelKind::Reranker => "reranker",
            ModelKind::Classifier => "classifier",
        }
    }
}

/// How inputs are scored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScoreOptions {
    /// The logits as the model gives them, without sigmoid or softmax.
    pub raw_scores: bool,
    /// Which end of a too-long passage (then query) is cut.
    pub truncation: Truncation,
}

/// One input of a classifier: a text, or a pair joined by the tokenizer's
/// pair template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifierInput<'a> {
    Text(&'a str),
    Pair(&'a str, &'a str),
}

/// One label's score.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub score: f32,
}

impl Engine {
    /// Whether the model embeds, reranks or classifies.
    pub fn model_kind(&self) -> ModelKind {
        match self.classifier_labels() {
            None => ModelKind::Embedding,
            Some([_]) => ModelKind::Reranker,
            Some(_) => ModelKind::Classifier,
        }
    }

    /// Scores every passage against `query` and returns (passage index,
    /// score) pairs, highest score first.
    pub fn rerank(&self, query: &str, passages: &[&str]) -> Result<Vec<(usize, f32)>> {
        self.rerank_with(query, passages, ScoreOptions::default())
    }

    pub fn rerank_with(
        &self,
        query: &str,
        passages: &[&str],
        options: ScoreOptions,
    ) -> Result<Vec<(usize, f32)>> {
        self.require_kind(ModelKind::Reranker, "rerank")?;
        if passages.is_empty() {
            return Ok(Vec::new());
        }
        let pairs: Vec<(&str, &str)> = passages.iter().map(|passage| (query, *passage)).collect();
        let tokens = self.tokenizer.encode_pairs(&pairs, options.truncation)?;
        let scores = self
            .embed_tokens(&tokens)?
            .into_iter()
            .map(|logits| single_score(logits, options.raw_scores))
            .collect::<Result<Vec<f32>>>()?;
        Ok(rank(&scores))
    }

    /// Every label's score for each input, highest first, inputs in order.
    pub fn predict(
        &self,
        inputs: &[ClassifierInput<'_>],
        options: ScoreOptions,
    ) -> Result<Vec<Vec<Prediction>>> {
        let labels = self.labels_for("predict")?;
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let tokens = self.tokenize_classifier_inputs(inputs, options.truncation)?;
        Ok(self
            .embed_tokens(&tokens)?
            .into_iter()
            .map(|logits| label_scores(activate(logits, options.raw_scores), labels))
            .collect())
    }

    /// Token ids of texts and pairs as a classifier sees them, in input order.
    pub fn tokenize_classifier_inputs(
        &self,
        inputs: &[ClassifierInput<'_>],
        truncation: Truncation,
    ) -> Result<Vec<Tokens>> {
        let mut texts = Vec::new();
        let mut pairs = Vec::new();
        for input in inputs {
            match *input {
                ClassifierInput::Text(text) => texts.push(text),
                ClassifierInput::Pair(first, second) => pairs.push((first, second)),
            }
        }
        let mut texts = self.tokenizer.encode_with(&texts, truncation)?.into_iter();
        let mut pairs = self.tokenizer.encode_pairs(&pairs, truncation)?.into_iter();
        inputs
            .iter()
            .map(|input| {
                let next = match input {
                    ClassifierInput::Text(_) => texts.next(),
                    ClassifierInput::Pair(..) => pairs.next(),
                };
                next.ok_or_else(|| Error::InvalidInput("the tokenizer lost an input".into()))
            })
            .collect()
    }

    /// The labels of a classifier or reranker; an error naming `task` for
    /// an embedding model.
    fn labels_for(&self, task: &str) -> Result<&[String]> {
        self.classifier_labels().ok_or_else(|| {
            Error::InvalidInput(format!(
                "{task} needs a sequence-classification model (a cross-encoder); \
                 {} is an embedding model",
                self.model_id
            ))
        })
    }

    fn require_kind(&self, wanted: ModelKind, task: &str) -> Result<()> {
        let kind = self.model_kind();
        if kind == wanted {
            return Ok(());
        }
        Err(Error::InvalidInput(format!(
            "{task} needs a {} model; {} is a {} model{}",
            wanted.name(),
            self.model_id,
            kind.name(),
            match kind {
                ModelKind::Classifier => " with several labels (use predict)",
                _ => "",
            }
        )))
    }
}

/// The score of a one-label model's logits.
fn single_score(logits: Vec<f32>, raw: bool) -> Result<f32> {
    match activate(logits, raw).as_slice() {
        [score] => Ok(*score),
        other => Err(Error::Gpu(format!(
            "a reranker gave {} logits for one pair instead of 1",
            other.len()
        ))),
    }
}

/// Scores from logits as `CrossEncoder.predict` gives them: the sigmoid of a
/// single logit, a softmax over several; the logits themselves when `raw`.
pub fn activate(mut logits: Vec<f32>, raw: bool) -> Vec<f32> {
    if raw {
        return logits;
    }
    if let [logit] = logits.as_mut_slice() {
        *logit = (1.0 / (1.0 + (-f64::from(*logit)).exp())) as f32;
        return logits;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits
        .iter()
        .map(|&x| (f64::from(x) - f64::from(max)).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    for (score, e) in logits.iter_mut().zip(exps) {
        *score = (e / sum) as f32;
    }
    logits
}

/// (index, score) pairs, highest score first; equal scores keep input order.
pub fn rank(scores: &[f32]) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> = scores.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
}

/// Each label with its score, highest first.
pub fn label_scores(scores: Vec<f32>, labels: &[String]) -> Vec<Prediction> {
    rank(&scores)
        .into_iter()
        .map(|(id, score)| Prediction {
            label: labels
                .get(id)
                .cloned()
                .unwrap_or_else(|| format!("LABEL_{id}")),
            score,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn one_logit_becomes_its_sigmoid() {
        assert!(close(&activate(vec![0.0], false), &[0.5]));
        // sigmoid(-0.08148611) as sentence-transformers gives it
        assert!(close(
            &activate(vec![-0.081_486_11], false),
            &[0.479_639_77]
        ));
        assert!(close(
            &activate(vec![-0.081_486_11], true),
            &[-0.081_486_11]
        ));
        // far out, no overflow into NaN
        assert!(close(&activate(vec![-1000.0], false), &[0.0]));
        assert!(close(&activate(vec![1000.0], false), &[1.0]));
    }

    #[test]
    fn several_logits_become_a_softmax() {
        let scores = activate(vec![1.0, 2.0, 3.0], false);
        let total: f32 = scores.iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        // e^k / (e + e^2 + e^3)
        assert!(close(&scores, &[0.090_030_57, 0.244_728_48, 0.665_240_94]));
        // large logits stay finite
        let big = activate(vec![1000.0, 1000.0], false);
        assert!(close(&big, &[0.5, 0.5]));
        assert!(close(&activate(vec![1.0, 2.0], true), &[1.0, 2.0]));
    }

    #[test]
    fn ranking_is_highest_first_and_stable() {
        assert_eq!(
            rank(&[0.2, 0.9, 0.2, -1.0, 0.5]),
            vec![(1, 0.9), (4, 0.5), (0, 0.2), (2, 0.2), (3, -1.0)]
        );
        assert!(rank(&[]).is_empty());
    }

    #[test]
    fn labels_follow_their_scores() {
        let labels = vec!["neg".to_string(), "neutral".into(), "pos".into()];
        let predictions = label_scores(vec![0.1, 0.3, 0.6], &labels);
        let names: Vec<&str> = predictions.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(names, ["pos", "neutral", "neg"]);
        assert_eq!(predictions[0].score, 0.6);
        // a label the config does not name gets transformers' default name
        assert_eq!(
            label_scores(vec![0.0, 1.0], &labels[..1])[0].label,
            "LABEL_1"
        );
    }

    #[test]
    fn a_one_label_model_must_give_one_logit() {
        assert!(single_score(vec![0.0, 1.0], false).is_err());
        assert_eq!(single_score(vec![2.0], true).ok(), Some(2.0));
    }
}
