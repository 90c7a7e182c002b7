//! `surf rerank` and `surf predict` as a user runs them: JSON Lines sorted
//! by score, the reference scores of the reranker fixture (raw and sigmoid,
//! whole and under a one-layer budget), `--top-n`, a three-label classifier
//! written by `surf synth`, and the exit status of the mistakes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("SURF_FIXTURES_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| root().join("../shared/fixtures"), PathBuf::from)
        .join(name);
    assert!(
        dir.join("reference.json").is_file(),
        "{} is missing: the fixtures live in shared/fixtures beside the checkout",
        dir.display()
    );
    dir
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

fn surf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surf"))
        .args(args)
        .output()
        .expect("surf runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn lines(output: &Output) -> Vec<Value> {
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(output));
    String::from_utf8(output.stdout.clone())
        .expect("UTF-8 output")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

fn has_gpu() -> bool {
    surf_engine::gpu::gpu_for_tests().is_some()
}

/// The query of `pairs-dev.txt` with the most passages, its passages and
/// their reference (raw, sigmoid) scores.
fn largest_group() -> (String, Vec<String>, Vec<(f64, f64)>) {
    let path = fixture("bert-reranker").join("reference.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("reference.json"))
            .expect("JSON");
    let items = reference["items"].as_array().expect("items");
    let query = items
        .iter()
        .map(|item| item["query"].as_str().expect("query"))
        .max_by_key(|query| {
            items
                .iter()
                .filter(|item| item["query"].as_str() == Some(query))
                .count()
        })
        .expect("items")
        .to_string();
    let group: Vec<&Value> = items
        .iter()
        .filter(|item| item["query"].as_str() == Some(&query))
        .collect();
    let passages = group
        .iter()
        .map(|item| item["passage"].as_str().expect("passage").to_string())
        .collect();
    let scores = group
        .iter()
        .map(|item| {
            (
                item["raw_score"].as_f64().expect("raw"),
                item["score"].as_f64().expect("score"),
            )
        })
        .collect();
    (query, passages, scores)
}

fn assert_ranked(lines: &[Value], expected: &[f64]) {
    let mut previous = f64::INFINITY;
    for line in lines {
        let index = line["index"].as_u64().expect("index") as usize;
        let score = line["score"].as_f64().expect("score");
        assert!(score <= previous, "sorted: {lines:?}");
        previous = score;
        assert!(
            (score - expected[index]).abs() <= 1e-3,
            "passage {index}: {score} vs {}",
            expected[index]
        );
    }
}

#[test]
fn surf_rerank_prints_the_reference_scores_highest_first() {
    if !has_gpu() {
        return;
    }
    let (query, passages, scores) = largest_group();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("passages.txt");
    std::fs::write(&input, passages.join("\n") + "\n").expect("written");
    let model = fixture("bert-reranker");
    let base = [
        "rerank",
        "--model",
        utf8(&model),
        "--query",
        &query,
        "--input",
        utf8(&input),
    ];
    let sigmoid: Vec<f64> = scores.iter().map(|s| s.1).collect();
    let raw: Vec<f64> = scores.iter().map(|s| s.0).collect();

    let all = lines(&surf(&base));
    assert_eq!(all.len(), passages.len());
    assert_ranked(&all, &sigmoid);

    let logits = lines(&surf(&[&base[..], &["--raw-scores"]].concat()));
    assert_ranked(&logits, &raw);

    let paged = lines(&surf(&[&base[..], &["--cache-layers", "1"]].concat()));
    assert_ranked(&paged, &sigmoid);

    let best = lines(&surf(&[&base[..], &["--top-n", "1"]].concat()));
    assert_eq!(best.len(), 1);
    assert_eq!(best[0]["index"], all[0]["index"]);
}

#[test]
fn surf_predict_prints_a_classifiers_labels_for_each_input() {
    if !has_gpu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("classifier");
    let tokenizer = root().join("assets/models/all-MiniLM-L6-v2/tokenizer.json");
    let written = surf(&[
        "synth",
        "--out",
        utf8(&model),
        "--tokenizer",
        utf8(&tokenizer),
        "--family",
        "bert",
        "--labels",
        "3",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "4",
        "--intermediate",
        "64",
    ]);
    assert_eq!(written.status.code(), Some(0), "{}", stderr(&written));
    let input = dir.path().join("inputs.txt");
    std::fs::write(&input, "a first text\nthe second one\tits pair\n").expect("written");
    for pairs in [false, true] {
        let mut args = vec!["predict", "--model", utf8(&model), "--input", utf8(&input)];
        if pairs {
            args.push("--pairs");
        }
        let predictions = lines(&surf(&args));
        assert_eq!(predictions.len(), 2);
        for (index, line) in predictions.iter().enumerate() {
            assert_eq!(line["index"], index);
            let labels = line["predictions"].as_array().expect("predictions");
            assert_eq!(labels.len(), 3);
            let scores: Vec<f64> = labels
                .iter()
                .map(|l| l["score"].as_f64().expect("score"))
                .collect();
            assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted: {line}");
            assert!(
                (scores.iter().sum::<f64>() - 1.0).abs() < 1e-5,
                "softmax: {line}"
            );
        }
    }
}

#[test]
fn mistakes_exit_with_2_and_say_what_is_wrong() {
    if !has_gpu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("passages.txt");
    std::fs::write(&input, "a passage\n").expect("written");
    let minilm = root().join("assets/models/all-MiniLM-L6-v2");
    let output = surf(&[
        "rerank",
        "--model",
        utf8(&minilm),
        "--query",
        "q",
        "--input",
        utf8(&input),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("embedding"), "{}", stderr(&output));
    assert!(output.stdout.is_empty());

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").expect("written");
    let model = fixture("bert-reranker");
    let output = surf(&[
        "rerank",
        "--model",
        utf8(&model),
        "--query",
        "q",
        "--input",
        utf8(&empty),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("empty"), "{}", stderr(&output));

    let output = surf(&[
        "rerank",
        "--model",
        utf8(&model),
        "--query",
        "q",
        "--input",
        utf8(&input),
        "--top-n",
        "0",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}
