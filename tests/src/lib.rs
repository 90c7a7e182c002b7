//! Shared helpers of the end-to-end tests in `tests/tests/`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod fuzz;
pub mod redis_server;

/// The workspace root.
/// The workspace root: where the tests were built, unless `SURF_REPO_ROOT`
/// names another copy (test executables carried to another machine).
pub fn root() -> PathBuf {
    if let Some(root) = std::env::var_os("SURF_REPO_ROOT").filter(|r| !r.is_empty()) {
        return PathBuf::from(root);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits inside the workspace")
        .to_path_buf()
}

/// The default model folder; fails with the command that fetches it.
pub fn minilm_dir() -> PathBuf {
    let dir = root().join("assets/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run `bash assets/fetch-model.sh` first",
        dir.display()
    );
    dir
}

/// all-mpnet-base-v2, which `bash assets/setup.sh` fetches; fails with the
/// command that fetches it.
pub fn mpnet_dir() -> PathBuf {
    let dir = root().join("assets/models/all-mpnet-base-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run `bash assets/fetch-model.sh all-mpnet-base-v2` first",
        dir.display()
    );
    dir
}

/// `shared/golden/`, beside the checkout.
pub fn golden_dir() -> PathBuf {
    let dir = std::env::var_os("SURF_GOLDEN_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| root().join("../shared/golden"), PathBuf::from);
    assert!(
        dir.join("dev-sentences.txt").is_file(),
        "{} is missing: the reference embeddings live in shared/golden beside the checkout",
        dir.display()
    );
    dir
}

/// `shared/fixtures/<name>`: a small random-weight model of another family
/// with sentence-transformers' outputs on `dev-sentences.txt`.
pub fn fixture_dir(name: &str) -> PathBuf {
    // The project's own fixtures (`tests/fixtures`, made by its
    // `make_fixtures.py`) first, then the shared ones.
    let own = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    if own.join("reference.json").is_file() {
        return own;
    }
    let dir = std::env::var_os("SURF_FIXTURES_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| golden_dir().join("../fixtures"), PathBuf::from)
        .join(name);
    assert!(
        dir.join("reference.json").is_file(),
        "{} is missing: the fixtures live in shared/fixtures beside the checkout",
        dir.display()
    );
    dir
}

#[derive(Debug, Deserialize)]
struct FixtureReference {
    items: Vec<GoldenItem>,
}

/// A fixture's `reference.json` (or another reference file in its folder),
/// as golden items; inputs were truncated at `max_len` tokens.
pub fn load_fixture_reference(name: &str, file: &str) -> Golden {
    let path = fixture_dir(name).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reference: FixtureReference =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Golden {
        max_len: 256,
        items: reference.items,
    }
}

/// Asserts each vector's length is within `tolerance` (relative) of its
/// reference's: cosine alone would miss a model that only scales wrongly.
pub fn assert_norms_match(golden: &Golden, vectors: &[Vec<f32>], tolerance: f64) {
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    for (i, (item, vector)) in golden.items.iter().zip(vectors).enumerate() {
        let (expected, actual) = (norm(&item.embedding), norm(vector));
        assert!(
            (actual - expected).abs() <= tolerance * expected,
            "line {}: norm {actual} against {expected}",
            i + 1
        );
    }
}

#[derive(Debug, Deserialize)]
pub struct GoldenItem {
    pub text: String,
    pub n_tokens: usize,
    pub ids: Vec<u32>,
    pub embedding: Vec<f32>,
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub max_len: usize,
    pub items: Vec<GoldenItem>,
}

pub fn load_golden(name: &str) -> Golden {
    let path = golden_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Lines of `dev-sentences.txt`, one input per line, empty lines kept.
pub fn dev_sentences() -> Vec<String> {
    let path = golden_dir().join("dev-sentences.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let body = text.strip_suffix('\n').unwrap_or(&text);
    body.split('\n').map(str::to_string).collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "vectors of different lengths");
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Asserts every embedding matches its golden item: same token ids, cosine at
/// least 0.9999. Returns the lowest cosine.
pub fn assert_matches_golden(golden: &Golden, token_ids: &[Vec<u32>], vectors: &[Vec<f32>]) -> f64 {
    assert_matches_golden_within(golden, token_ids, vectors, 0.9999)
}

/// Like [`assert_matches_golden`] with a cosine floor of `min_cosine` (0.9995
/// for f16 weights).
pub fn assert_matches_golden_within(
    golden: &Golden,
    token_ids: &[Vec<u32>],
    vectors: &[Vec<f32>],
    min_cosine: f64,
) -> f64 {
    assert_eq!(vectors.len(), golden.items.len(), "one embedding per input");
    let mut worst = 1.0f64;
    for (i, item) in golden.items.iter().enumerate() {
        assert_eq!(
            token_ids[i],
            item.ids,
            "token ids of line {} ({:?})",
            i + 1,
            item.text
        );
        assert_eq!(
            token_ids[i].len(),
            item.n_tokens,
            "token count of line {}",
            i + 1
        );
        let c = cosine(&vectors[i], &item.embedding);
        assert!(
            c >= min_cosine,
            "line {}: cosine {c} below {min_cosine} ({:?})",
            i + 1,
            item.text
        );
        worst = worst.min(c);
    }
    worst
}

/// One pair of `pairs-dev.txt` with the cross-encoder's outputs, as
/// sentence-transformers gave them.
#[derive(Debug, Clone, Deserialize)]
pub struct PairReference {
    pub query: String,
    pub passage: String,
    pub ids: Vec<u32>,
    /// The logit.
    pub raw_score: f32,
    /// Its sigmoid, what `CrossEncoder.predict` returns.
    pub score: f32,
}

#[derive(Debug, Deserialize)]
struct PairReferences {
    items: Vec<PairReference>,
}

/// `reference.json` of a reranker fixture.
pub fn pair_references(fixture: &str) -> Vec<PairReference> {
    let path = fixture_dir(fixture).join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let references: PairReferences =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    references.items
}
