//! `surf synth` as a user runs it: the folder it writes loads in `surf embed`,
//! and shapes the engine cannot run are refused with exit status 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tokenizer() -> PathBuf {
    let path = root().join("assets/models/all-MiniLM-L6-v2/tokenizer.json");
    assert!(
        path.is_file(),
        "{} is missing: run `bash assets/fetch-model.sh` first",
        path.display()
    );
    path
}

fn surf_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surf"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("surf runs")
}

fn surf(args: &[&str]) -> Output {
    surf_in(&root(), args)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A synth run with the repository's tokenizer and `extra` flags.
fn synth(out: &Path, extra: &[&str]) -> Output {
    let tokenizer = tokenizer();
    let mut args = vec!["synth", "--out", utf8(out), "--tokenizer", utf8(&tokenizer)];
    args.extend_from_slice(extra);
    surf(&args)
}

fn assert_bad_input(output: &Output, needle: &str) {
    let message = stderr(output);
    assert_eq!(output.status.code(), Some(2), "stderr: {message}");
    assert!(
        message.contains(needle),
        "expected {needle:?} in: {message}"
    );
    assert!(!message.contains("panicked"), "{message}");
}

/// The `(dtype, shape)` of every tensor in a safetensors header.
fn safetensors_header(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(path).expect("model.safetensors");
    let length = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + length]).expect("header JSON");
    let mut tensors = header.as_object().expect("header object").clone();
    tensors.remove("__metadata__");
    tensors
}

fn folder_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, total: &mut u64) {
        for entry in std::fs::read_dir(dir).expect("readable") {
            let entry = entry.expect("entry");
            let metadata = entry.metadata().expect("metadata");
            if metadata.is_dir() {
                walk(&entry.path(), total);
            } else {
                *total += metadata.len();
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total);
    total
}

#[test]
fn a_synthetic_model_embeds_with_its_hidden_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    let output = synth(&model, &["--layers", "2", "--hidden", "128"]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));

    let summary = String::from_utf8(output.stdout).expect("utf-8 output");
    let written = folder_bytes(&model);
    assert!(
        summary.contains(&format!(" {written} bytes")),
        "the summary should report the {written} bytes of the folder: {summary}"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).expect("config.json"))
            .expect("config JSON");
    assert_eq!(config["num_hidden_layers"], 2);
    assert_eq!(config["hidden_size"], 128);
    // The defaults: one head per 64 dimensions, a feed-forward 4 times as wide.
    assert_eq!(config["num_attention_heads"], 2);
    assert_eq!(config["intermediate_size"], 512);
    assert_eq!(
        std::fs::read(model.join("tokenizer.json")).expect("tokenizer copied"),
        std::fs::read(tokenizer()).expect("tokenizer")
    );

    if surf_engine::gpu::gpu_for_tests().is_none() {
        return;
    }
    let output = surf(&[
        "embed",
        "--model",
        utf8(&model),
        "a short text",
        "a second, somewhat longer text to embed",
    ]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        let embedding: Vec<f64> = line["embedding"]
            .as_array()
            .expect("embedding array")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        assert_eq!(embedding.len(), 128);
        let norm = embedding.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    assert_ne!(lines[0]["embedding"], lines[1]["embedding"]);
}

#[test]
fn dtype_heads_and_intermediate_reach_the_checkpoint_and_the_tokenizer_defaults_to_minilm() {
    tokenizer();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    // No --tokenizer: the default is relative to the repository root.
    let output = surf(&[
        "synth",
        "--out",
        utf8(&model),
        "--layers",
        "1",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--intermediate",
        "96",
        "--dtype",
        "bf16",
        "--seed",
        "7",
    ]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).expect("config.json"))
            .expect("config JSON");
    assert_eq!(config["num_attention_heads"], 4);
    assert_eq!(config["intermediate_size"], 96);
    let tensors = safetensors_header(&model.join("model.safetensors"));
    assert!(tensors.contains_key("encoder.layer.0.intermediate.dense.weight"));
    assert!(!tensors.contains_key("encoder.layer.1.intermediate.dense.weight"));
    assert_eq!(
        tensors["encoder.layer.0.intermediate.dense.weight"]["shape"],
        serde_json::json!([96, 64])
    );
    for (name, tensor) in &tensors {
        assert_eq!(tensor["dtype"], "BF16", "{name}");
    }
}

#[test]
fn presets_refuse_explicit_dimensions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = synth(
        &dir.path().join("model"),
        &["--preset", "large", "--layers", "2"],
    );
    assert_bad_input(&output, "--layers");
}

#[test]
fn no_shape_at_all_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = synth(&dir.path().join("model"), &[]);
    assert_bad_input(&output, "--layers");
}

#[test]
fn a_hidden_size_that_the_heads_do_not_divide_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    let output = synth(
        &model,
        &["--layers", "2", "--hidden", "130", "--heads", "4"],
    );
    assert_bad_input(&output, "not a multiple of --heads 4");
    assert!(!model.exists(), "nothing is written for a refused shape");
}

#[test]
fn a_head_size_beyond_the_attention_kernel_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = synth(
        &dir.path().join("model"),
        &["--layers", "2", "--hidden", "1024", "--heads", "2"],
    );
    assert_bad_input(&output, "head size 512");
    assert!(stderr(&output).contains("--heads 4"), "{}", stderr(&output));
}

#[test]
fn zero_layers_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = synth(
        &dir.path().join("model"),
        &["--layers", "0", "--hidden", "128"],
    );
    assert_bad_input(&output, "--layers must be at least 1");
}

#[test]
fn a_missing_tokenizer_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = surf(&[
        "synth",
        "--out",
        utf8(&dir.path().join("model")),
        "--layers",
        "1",
        "--hidden",
        "64",
        "--tokenizer",
        "/nonexistent/tokenizer.json",
    ]);
    assert_bad_input(&output, "/nonexistent/tokenizer.json");
}

#[test]
fn a_non_empty_folder_is_kept_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keep = dir.path().join("notes.txt");
    std::fs::write(&keep, "not a model").expect("written");
    let shape = ["--layers", "1", "--hidden", "64"];
    let output = synth(dir.path(), &shape);
    assert_bad_input(&output, "--force");
    assert!(!dir.path().join("model.safetensors").exists());

    let mut forced = shape.to_vec();
    forced.push("--force");
    let output = synth(dir.path(), &forced);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert!(dir.path().join("model.safetensors").is_file());
    assert!(
        keep.is_file(),
        "--force writes the model's files, no others"
    );
}

/// The vector `surf embed` prints for `text` from the model in `model`,
/// with `env` set.
fn embed_one(model: &Path, text: &str, env: &[(&str, &str)]) -> Vec<f64> {
    let output = Command::new(env!("CARGO_BIN_EXE_surf"))
        .args(["embed", "--model", utf8(model), text])
        .envs(env.iter().copied())
        .current_dir(root())
        .output()
        .expect("surf runs");
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    line["embedding"]
        .as_array()
        .expect("an embedding")
        .iter()
        .map(|v| v.as_f64().expect("a number"))
        .collect()
}

#[test]
fn every_family_synthesises_a_folder_that_embeds() {
    for (family, config_key) in [
        ("xlm-roberta", "xlm-roberta"),
        ("mpnet", "mpnet"),
        ("t5", "t5"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("model");
        let output = synth(
            &model,
            &[
                "--family", family, "--layers", "2", "--hidden", "64", "--heads", "4",
            ],
        );
        assert!(output.status.success(), "{family}: {}", stderr(&output));
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model.join("config.json")).expect("config"))
                .expect("config JSON");
        assert_eq!(config["model_type"], config_key);
        if surf_engine::gpu::gpu_for_tests().is_none() {
            continue;
        }
        let vector = embed_one(&model, "a short text", &[]);
        assert_eq!(vector.len(), 64, "{family}");
        let norm: f64 = vector.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{family}: norm {norm}");
    }
}

#[test]
fn a_classifier_is_synthesised_with_its_labels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    let output = synth(
        &model,
        &["--layers", "1", "--hidden", "64", "--labels", "3"],
    );
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).expect("config"))
            .expect("config JSON");
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["id2label"]["2"], "LABEL_2");
    let tensors = safetensors_header(&model.join("model.safetensors"));
    assert_eq!(
        tensors["classifier.weight"]["shape"],
        serde_json::json!([3, 64])
    );
    assert!(tensors.contains_key("pooler.dense.weight"));
    assert_bad_input(
        &synth(
            &dir.path().join("t5"),
            &[
                "--family", "t5", "--layers", "1", "--hidden", "64", "--labels", "2",
            ],
        ),
        "--labels",
    );
}

/// XLM-R's 250,002 rows at hidden 384 are 192 MB even in f16: more than the
/// 128 MiB storage binding wgpu promises on every adapter. The word table
/// stays on the host and a batch uploads the rows it uses, so the model runs
/// on a device asked for wgpu's default limits and nothing more, and gives
/// the vectors it gives with the adapter's own limits.
#[test]
fn a_vocabulary_of_250002_rows_runs_under_the_default_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    let output = synth(
        &model,
        &[
            "--family",
            "xlm-roberta",
            "--vocab",
            "250002",
            "--layers",
            "1",
            "--hidden",
            "384",
            "--heads",
            "6",
            "--intermediate",
            "384",
            "--dtype",
            "f16",
        ],
    );
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let tensors = safetensors_header(&model.join("model.safetensors"));
    assert_eq!(
        tensors["embeddings.word_embeddings.weight"]["shape"],
        serde_json::json!([250002, 384])
    );
    if surf_engine::gpu::gpu_for_tests().is_none() {
        return;
    }
    let info = Command::new(env!("CARGO_BIN_EXE_surf"))
        .args(["info", "--json"])
        .env("SURF_LIMITS", "default")
        .current_dir(root())
        .output()
        .expect("surf runs");
    assert!(info.status.success(), "stderr: {}", stderr(&info));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
    assert_eq!(info["limits"]["requested"], "default", "{info}");
    let binding = info["limits"]["max_storage_buffer_binding_size"]
        .as_u64()
        .expect("the binding limit is reported");
    assert_eq!(
        binding,
        128 << 20,
        "SURF_LIMITS=default asks for wgpu's defaults"
    );
    assert!(
        250002 * 384 * 2 > binding,
        "the table is larger than one binding"
    );

    let limited = embed_one(
        &model,
        "the word table stays on the host",
        &[("SURF_LIMITS", "default")],
    );
    let unlimited = embed_one(&model, "the word table stays on the host", &[]);
    assert_eq!(limited.len(), 384);
    let cosine: f64 = limited.iter().zip(&unlimited).map(|(a, b)| a * b).sum();
    assert!(cosine > 0.99999, "cosine {cosine}");
}

#[test]
fn a_real_models_preset_sets_its_own_family() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = synth(
        &dir.path().join("m"),
        &["--preset", "qwen3-0.6b", "--family", "t5"],
    );
    assert_bad_input(&output, "--family");
}

#[test]
fn a_small_qwen3_decoder_embeds_with_last_token_pooling() {
    if surf_engine::gpu::gpu_for_tests().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("qwen3");
    let output = synth(
        &out,
        &[
            "--family", "qwen3", "--layers", "2", "--hidden", "128", "--heads", "2",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config.json"))
            .expect("JSON");
    assert_eq!(config["model_type"], "qwen3");
    assert_eq!(config["head_dim"], 64);
    let pooling = std::fs::read_to_string(out.join("1_Pooling/config.json")).expect("pooling");
    assert!(pooling.contains("pooling_mode_lasttoken"), "{pooling}");
    // Every tensor the family reads is in the file, norms included.
    let header = safetensors_header(&out.join("model.safetensors"));
    assert!(
        header.contains_key("layers.1.self_attn.k_norm.weight"),
        "{header:?}"
    );
    let embedded = surf(&["embed", "--model", utf8(&out), "a decoder"]);
    assert!(embedded.status.success(), "{}", stderr(&embedded));
    let line: serde_json::Value = serde_json::from_slice(&embedded.stdout).expect("one JSON line");
    assert_eq!(line["embedding"].as_array().map(Vec::len), Some(128));
}
