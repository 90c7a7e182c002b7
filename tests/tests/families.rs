//! Every encoder family against sentence-transformers' outputs on the
//! fixtures of `shared/fixtures` (XLM-RoBERTa, MPNet, a T5 encoder with a
//! Dense module): token ids equal, cosine >= 0.9999, norms within 0.1%, in
//! one padded batch and one text at a time, f32 and f16 weights.

use surf_engine::{Engine, VramBudget, WeightDtype};
use surf_tests::{
    assert_matches_golden_within, assert_norms_match, dev_sentences, fixture_dir,
    load_fixture_reference,
};

const FIXTURES: [&str; 3] = ["xlmr", "mpnet", "t5enc"];

fn engine(name: &str, batch_size: usize, dtype: WeightDtype, layers: Option<usize>) -> Option<Engine> {
    let gpu = surf_engine::gpu::gpu_for_tests()?;
    Some(
        Engine::builder()
            .model_dir(fixture_dir(name))
            .batch_size(batch_size)
            .weight_dtype(dtype)
            .vram_budget(layers.map_or(VramBudget::Unbounded, VramBudget::Layers))
            .gpu(gpu)
            .build()
            .unwrap_or_else(|e| panic!("the {name} fixture loads: {e}")),
    )
}

/// Embeds the dev sentences in batches of `batch_size` and checks them.
fn check(name: &str, batch_size: usize, dtype: WeightDtype, layers: Option<usize>) {
    let Some(engine) = engine(name, batch_size, dtype, layers) else {
        return;
    };
    let golden = load_fixture_reference(name, "reference.json");
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let out = engine.embed(&texts).expect("inference succeeds");
    let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
    let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
    let floor = match dtype {
        WeightDtype::F32 => 0.9999,
        WeightDtype::F16 => 0.9995,
    };
    let worst = assert_matches_golden_within(&golden, &ids, &vectors, floor);
    let norm_tolerance = match dtype {
        WeightDtype::F32 => 1e-3,
        WeightDtype::F16 => 5e-3,
    };
    assert_norms_match(&golden, &vectors, norm_tolerance);
    eprintln!("{name} {dtype} batch {batch_size} layers {layers:?}: lowest cosine {worst:.9}");
}

#[test]
fn every_family_matches_its_reference_in_one_padded_batch() {
    for name in FIXTURES {
        check(name, 64, WeightDtype::F32, None);
    }
}

#[test]
fn every_family_matches_its_reference_one_text_at_a_time() {
    for name in FIXTURES {
        check(name, 1, WeightDtype::F32, None);
    }
}

#[test]
fn every_family_matches_its_reference_with_f16_weights_paged_one_layer_at_a_time() {
    for name in FIXTURES {
        check(name, 8, WeightDtype::F16, Some(1));
    }
}

#[test]
fn the_t5_fixture_projects_through_its_dense_module() {
    let Some(engine) = engine("t5enc", 4, WeightDtype::F32, None) else {
        return;
    };
    // 96 hidden, projected to 64 by 2_Dense, then normalised.
    assert_eq!(engine.spec().config.hidden_size(), 96);
    assert_eq!(engine.dimension(), 64);
    let vector = engine.infer(&["a short text"]).expect("inference succeeds");
    assert_eq!(vector[0].len(), 64);
}
