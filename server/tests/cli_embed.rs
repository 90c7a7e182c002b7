//! `surf embed` as a user runs it: output format, exit codes, error messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use surf_engine::kernels::family::KernelFamily;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_dir() -> PathBuf {
    let dir = root().join("assets/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run `bash assets/fetch-model.sh` first",
        dir.display()
    );
    dir
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

fn has_gpu() -> bool {
    surf_engine::gpu::gpu_for_tests().is_some()
}

#[test]
fn a_missing_model_folder_exits_with_2_and_names_it() {
    let output = surf(&["embed", "--model", "/nonexistent/model-folder", "hello"]);
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    assert!(
        stderr(&output).contains("/nonexistent/model-folder"),
        "{}",
        stderr(&output)
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn invalid_utf8_in_the_input_file_exits_with_2_and_names_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("texts.txt");
    std::fs::write(&input, b"fine line\nbad \xff\xfe line\n").expect("written");
    let model = model_dir();
    let output = surf(&[
        "embed",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--input",
        input.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("texts.txt") && message.contains("line 2"),
        "{message}"
    );
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn a_missing_input_file_exits_with_2() {
    let model = model_dir();
    let output = surf(&[
        "embed",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--input",
        "/nonexistent/texts.txt",
    ]);
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    assert!(stderr(&output).contains("/nonexistent/texts.txt"));
}

#[test]
fn a_zero_batch_size_exits_with_2() {
    let model = model_dir();
    let output = surf(&[
        "embed",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--batch-size",
        "0",
        "x",
    ]);
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    assert!(
        stderr(&output).contains("batch size"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn embed_writes_one_json_line_per_input_in_order() {
    if !has_gpu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("texts.txt");
    // An empty line is an empty text, and CRLF endings are stripped.
    std::fs::write(
        &input,
        "first text\r\n\nthe third text is the longest of the three\n",
    )
    .expect("written");
    let model = model_dir();
    let output = surf(&[
        "embed",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--input",
        input.to_str().expect("utf-8 path"),
    ]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3);
    let tokens: Vec<u64> = lines
        .iter()
        .map(|l| l["tokens"].as_u64().expect("tokens"))
        .collect();
    // [CLS] first text [SEP]; [CLS] [SEP]; the third is longer than both.
    assert_eq!(tokens[..2], [4, 2]);
    assert!(tokens[2] > 4);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"].as_u64(), Some(i as u64));
        let embedding = line["embedding"].as_array().expect("embedding array");
        assert_eq!(embedding.len(), 384);
        let norm: f64 = embedding
            .iter()
            .map(|v| v.as_f64().expect("number").powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "line {i} has norm {norm}");
    }
}

/// `surf embed` of the golden file, with `SURF_KERNELS` set to `kernels`
/// (or unset), reproduces the reference vectors.
fn check_golden_embed(kernels: Option<&str>) {
    let golden_dir = root().join("../shared/golden");
    let input = golden_dir.join("dev-sentences.txt");
    let model = model_dir();
    let mut command = Command::new(env!("CARGO_BIN_EXE_surf"));
    command.args([
        "embed",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--input",
        input.to_str().expect("utf-8 path"),
    ]);
    match kernels {
        Some(kernels) => command.env("SURF_KERNELS", kernels),
        None => command.env_remove("SURF_KERNELS"),
    };
    let output = command.output().expect("surf runs");
    assert!(
        output.status.success(),
        "SURF_KERNELS={kernels:?} stderr: {}",
        stderr(&output)
    );
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(golden_dir.join("minilm-dev.candle.json")).expect("golden file"),
    )
    .expect("golden JSON");
    let items = golden["items"].as_array().expect("items");
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), items.len());
    for (i, (line, item)) in lines.iter().zip(items).enumerate() {
        let ours: Vec<f64> = line["embedding"]
            .as_array()
            .expect("array")
            .iter()
            .map(|v| v.as_f64().expect("f64"))
            .collect();
        let theirs: Vec<f64> = item["embedding"]
            .as_array()
            .expect("array")
            .iter()
            .map(|v| v.as_f64().expect("f64"))
            .collect();
        let dot: f64 = ours.iter().zip(&theirs).map(|(a, b)| a * b).sum();
        let norms = ours.iter().map(|a| a * a).sum::<f64>().sqrt()
            * theirs.iter().map(|b| b * b).sum::<f64>().sqrt();
        let cosine = dot / norms;
        assert!(
            cosine >= 0.9999,
            "SURF_KERNELS={kernels:?} line {}: cosine {cosine}",
            i + 1
        );
        assert_eq!(
            line["tokens"],
            item["n_tokens"],
            "token count of line {}",
            i + 1
        );
    }
}

#[test]
fn embed_of_the_golden_file_reproduces_the_reference_vectors() {
    if !has_gpu() {
        return;
    }
    check_golden_embed(None);
}

#[test]
fn every_kernel_family_forced_reproduces_the_reference_vectors() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    for family in KernelFamily::supported(&gpu) {
        check_golden_embed(Some(family.name()));
    }
}

#[test]
fn an_unknown_kernel_family_exits_with_2_and_lists_the_accepted_ones() {
    let model = model_dir();
    let output = Command::new(env!("CARGO_BIN_EXE_surf"))
        .args([
            "embed",
            "--model",
            model.to_str().expect("utf-8 path"),
            "hi",
        ])
        .env("SURF_KERNELS", "cuda")
        .output()
        .expect("surf runs");
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("`cuda`"), "{err}");
    assert!(err.contains("auto, portable, subgroup8, tiled"), "{err}");
}

#[test]
fn a_second_start_reuses_the_measured_kernel_choices() {
    if !has_gpu() {
        return;
    }
    let cache = tempfile::tempdir().expect("temp dir");
    let model = model_dir();
    let start = || {
        let output = Command::new(env!("CARGO_BIN_EXE_surf"))
            .args([
                "embed",
                "--model",
                model.to_str().expect("utf-8 path"),
                "hi",
            ])
            .env("SURF_CACHE_DIR", cache.path())
            .env("SURF_LOG", "info")
            .env_remove("SURF_KERNELS")
            .output()
            .expect("surf runs");
        assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
        stderr(&output)
    };
    let first = start();
    assert!(first.contains("measured the kernel families"), "{first}");
    assert!(!first.contains("reusing cached kernel choices"), "{first}");
    assert!(cache.path().join("kernel-choices.json").is_file());
    let second = start();
    assert!(second.contains("reusing cached kernel choices"), "{second}");
    assert!(!second.contains("measured the kernel families"), "{second}");
}

#[test]
fn stderr_in_a_pipe_has_no_colour_codes_and_no_window_system_noise() {
    if !has_gpu() {
        return;
    }
    let model = model_dir();
    let output = Command::new(env!("CARGO_BIN_EXE_surf"))
        .args([
            "embed",
            "--model",
            model.to_str().expect("utf-8 path"),
            "hello",
        ])
        .env("SURF_LOG", "info")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("surf runs");
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("INFO"), "the info log reaches stderr: {err}");
    assert!(!err.contains('\x1b'), "escape codes in a pipe: {err:?}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}

/// Copies the MiniLM folder's small files and links its weights into a
/// temporary folder, with `edit` applied to it.
fn edited_model(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = model_dir();
    for name in [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
    ] {
        std::fs::copy(source.join(name), dir.path().join(name)).expect("copied");
    }
    std::os::unix::fs::symlink(
        source.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .expect("linked");
    std::fs::create_dir(dir.path().join("1_Pooling")).expect("folder");
    std::fs::copy(
        source.join("1_Pooling/config.json"),
        dir.path().join("1_Pooling/config.json"),
    )
    .expect("copied");
    edit(dir.path());
    dir
}

#[test]
fn an_unknown_model_type_exits_with_2_naming_it_and_the_supported_ones() {
    let dir = edited_model(|dir| {
        let path = dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("config")).expect("JSON");
        config["model_type"] = "gpt_neox".into();
        std::fs::write(&path, config.to_string()).expect("written");
    });
    let output = surf(&[
        "embed",
        "--model",
        dir.path().to_str().expect("utf-8"),
        "hello",
    ]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {message}");
    assert!(message.contains("gpt_neox"), "{message}");
    assert!(
        message.contains("xlm-roberta") && message.contains("mpnet"),
        "{message}"
    );
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn an_unknown_sentence_transformers_module_exits_with_2_naming_it() {
    let dir = edited_model(|dir| {
        let modules = serde_json::json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_CNN", "type": "sentence_transformers.models.CNN"},
        ]);
        std::fs::write(dir.join("modules.json"), modules.to_string()).expect("written");
    });
    let output = surf(&[
        "embed",
        "--model",
        dir.path().to_str().expect("utf-8"),
        "hello",
    ]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {message}");
    assert!(
        message.contains("sentence_transformers.models.CNN"),
        "{message}"
    );
    assert!(message.contains("Dense"), "{message}");
}

/// A copy of a shared fixture folder with `edit` applied to its config.json.
fn edited_fixture(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let source = root().join("../shared/fixtures").join(name);
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&source).expect("the fixture folder") {
        let path = entry.expect("an entry").path();
        if path.is_file() {
            let target = dir.path().join(path.file_name().expect("a name"));
            std::fs::copy(&path, target).expect("copied");
        }
    }
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("config")).expect("JSON");
    edit(&mut config);
    std::fs::write(&path, config.to_string()).expect("written");
    dir
}

#[test]
fn an_unsupported_rope_variant_or_layer_type_exits_with_2_naming_it() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit); 3] = [
        ("yarn", |config| {
            config["rope_parameters"] =
                serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0});
        }),
        ("llama3", |config| {
            config["rope_scaling"] = serde_json::json!({"type": "llama3", "factor": 8.0});
        }),
        ("chunked_attention", |config| {
            config["layer_types"] =
                serde_json::json!(["full_attention", "chunked_attention", "full_attention"]);
        }),
    ];
    for (name, edit) in cases {
        let dir = edited_fixture("qwen3", edit);
        let output = surf(&[
            "embed",
            "--model",
            dir.path().to_str().expect("utf-8"),
            "hello",
        ]);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{name}: {message}");
        assert!(message.contains(name), "{message}");
        assert!(!message.contains("panicked"), "{message}");
    }
}

#[test]
fn a_prompt_by_name_or_as_text_goes_before_each_text_and_an_unknown_name_exits_with_2() {
    if !has_gpu() {
        return;
    }
    let model = root().join("../shared/fixtures/qwen3");
    let model = model.to_str().expect("utf-8");
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("../shared/fixtures/qwen3/reference-prompt-query.json"))
            .expect("the prompt reference"),
    )
    .expect("JSON");
    let item = &reference["items"][1];
    let text = item["text"].as_str().expect("text");
    let expected: Vec<f64> = item["embedding"]
        .as_array()
        .expect("embedding")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect();
    let prompt = "Instruct: Given a web search query, retrieve relevant passages\nQuery:";
    for args in [["--prompt-name", "query"], ["--prompt", prompt]] {
        let output = surf(&["embed", "--model", model, args[0], args[1], text]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let line: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("one JSON line");
        assert_eq!(line["tokens"], item["n_tokens"]);
        let vector: Vec<f64> = line["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect();
        let dot: f64 = vector.iter().zip(&expected).map(|(a, b)| a * b).sum();
        let norms = vector.iter().map(|x| x * x).sum::<f64>().sqrt()
            * expected.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(dot / norms >= 0.9999, "{args:?}: cosine {}", dot / norms);
    }
    let output = surf(&["embed", "--model", model, "--prompt-name", "passage", text]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(
        message.contains("passage") && message.contains("document, query"),
        "{message}"
    );
}
