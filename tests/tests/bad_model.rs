//! A broken model folder is refused with an error that names the file and the
//! problem, before any GPU work.

use std::path::Path;

use safetensors::Dtype;
use surf_engine::synth::{SynthSpec, random_tensors, write_model, write_safetensors};
use surf_engine::{Engine, Error};
use surf_tests::minilm_dir;

fn tiny_spec() -> SynthSpec {
    SynthSpec::sized(2, 32, 4, 64)
}

fn tokenizer_json() -> Vec<u8> {
    std::fs::read(minilm_dir().join("tokenizer.json")).expect("the default model's tokenizer")
}

fn tiny_model(dir: &Path) {
    write_model(dir, &tiny_spec(), &tokenizer_json()).expect("a synthetic model is written");
}

fn open_error(dir: &Path) -> Error {
    match Engine::builder().model_dir(dir).build() {
        Ok(_) => panic!("{} was accepted", dir.display()),
        Err(e) => e,
    }
}

fn assert_bad_input(error: &Error, needles: &[&str]) {
    assert!(
        error.is_bad_input(),
        "{error} should be reported as bad input"
    );
    let text = error.to_string();
    for needle in needles {
        assert!(text.contains(needle), "`{text}` should mention `{needle}`");
    }
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("config.json")).expect("valid JSON");
    config[key] = value;
    std::fs::write(&path, serde_json::to_vec(&config).expect("JSON")).expect("config.json written");
}

#[test]
fn a_missing_folder_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nowhere");
    assert_bad_input(&open_error(&missing), &["nowhere", "does not exist"]);
}

#[test]
fn a_missing_config_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    std::fs::remove_file(dir.path().join("config.json")).expect("removed");
    assert_bad_input(&open_error(dir.path()), &["config.json", "missing"]);
}

#[test]
fn a_malformed_config_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    std::fs::write(dir.path().join("config.json"), b"{\"hidden_size\": ").expect("written");
    assert_bad_input(&open_error(dir.path()), &["config.json", "invalid JSON"]);
}

#[test]
fn an_unknown_activation_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    edit_config(dir.path(), "hidden_act", "swishy".into());
    assert_bad_input(
        &open_error(dir.path()),
        &["config.json", "hidden_act", "swishy"],
    );
}

#[test]
fn an_unknown_model_type_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    edit_config(dir.path(), "model_type", "gpt_neox".into());
    assert_bad_input(
        &open_error(dir.path()),
        &["config.json", "model_type", "gpt_neox"],
    );
}

#[test]
fn a_missing_tensor_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    let mut tensors = random_tensors(&tiny_spec()).expect("tensors of a valid shape");
    tensors.retain(|(name, _, _)| name != "encoder.layer.1.output.dense.bias");
    write_safetensors(&dir.path().join("model.safetensors"), &tensors, Dtype::F32)
        .expect("written");
    assert_bad_input(
        &open_error(dir.path()),
        &[
            "model.safetensors",
            "encoder.layer.1.output.dense.bias",
            "missing",
        ],
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    let mut tensors = random_tensors(&tiny_spec()).expect("tensors of a valid shape");
    for (name, shape, _) in &mut tensors {
        if name == "encoder.layer.0.intermediate.dense.weight" {
            shape.reverse();
        }
    }
    write_safetensors(&dir.path().join("model.safetensors"), &tensors, Dtype::F32)
        .expect("written");
    assert_bad_input(
        &open_error(dir.path()),
        &[
            "model.safetensors",
            "encoder.layer.0.intermediate.dense.weight",
            "[32, 64]",
            "[64, 32]",
        ],
    );
}

#[test]
fn a_truncated_weights_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).expect("weights");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).expect("truncated");
    assert_bad_input(
        &open_error(dir.path()),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn a_weights_file_that_is_not_safetensors_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"PK\x03\x04 this is a zip",
    )
    .expect("written");
    assert_bad_input(
        &open_error(dir.path()),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn a_missing_weights_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("removed");
    assert_bad_input(&open_error(dir.path()), &["model.safetensors", "missing"]);
}

#[test]
fn a_tokenizer_that_is_not_json_is_refused() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model(dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), b"not a tokenizer").expect("written");
    let error = match Engine::builder().model_dir(dir.path()).gpu(gpu).build() {
        Ok(_) => panic!("a broken tokenizer was accepted"),
        Err(e) => e,
    };
    assert_bad_input(&error, &["tokenizer.json"]);
}

/// f16 and bf16 checkpoints are converted on load: a checkpoint stored in half
/// precision gives the embeddings of the f32 checkpoint holding the same values.
#[test]
fn half_precision_weights_match_f32_weights_of_the_same_values() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let texts = [
        "a short sentence",
        "",
        "another, somewhat longer sentence about weights",
    ];
    for dtype in [Dtype::F16, Dtype::BF16] {
        let exact = tempfile::tempdir().expect("tempdir");
        let half = tempfile::tempdir().expect("tempdir");
        tiny_model(exact.path());
        tiny_model(half.path());
        let mut tensors = random_tensors(&tiny_spec()).expect("tensors of a valid shape");
        for (_, _, values) in &mut tensors {
            for v in values.iter_mut() {
                *v = match dtype {
                    Dtype::F16 => half::f16::from_f32(*v).to_f32(),
                    _ => half::bf16::from_f32(*v).to_f32(),
                };
            }
        }
        write_safetensors(
            &exact.path().join("model.safetensors"),
            &tensors,
            Dtype::F32,
        )
        .expect("written");
        write_safetensors(&half.path().join("model.safetensors"), &tensors, dtype)
            .expect("written");
        let run = |dir: &Path| {
            Engine::builder()
                .model_dir(dir)
                .gpu(gpu.clone())
                .build()
                .expect("loads")
                .infer(&texts)
                .expect("runs")
        };
        let reference = run(exact.path());
        let converted = run(half.path());
        for (a, b) in reference.iter().zip(&converted) {
            assert_eq!(a, b, "{dtype:?} weights give the f32 result bit for bit");
        }
        let half_size = std::fs::metadata(half.path().join("model.safetensors"))
            .expect("file")
            .len();
        let full_size = std::fs::metadata(exact.path().join("model.safetensors"))
            .expect("file")
            .len();
        assert!(
            half_size < full_size * 6 / 10,
            "{dtype:?} file is stored in half precision"
        );
    }
}
