//! The engine against the reference embeddings of `shared/golden`.

use surf_engine::Engine;
use surf_engine::kernels::family::{KernelFamily, KernelMode};
use surf_tests::{assert_matches_golden, dev_sentences, load_golden, minilm_dir};

fn engine(batch_size: usize) -> Option<Engine> {
    let gpu = surf_engine::gpu::gpu_for_tests()?;
    Some(
        Engine::builder()
            .model_dir(minilm_dir())
            .batch_size(batch_size)
            .gpu(gpu)
            .build()
            .expect("the default model loads"),
    )
}

#[test]
fn golden_texts_match_the_references_in_one_padded_batch() {
    let Some(engine) = engine(64) else { return };
    let golden = load_golden("minilm-dev.candle.json");
    let sentences = dev_sentences();
    assert_eq!(sentences.len(), golden.items.len());
    for (s, item) in sentences.iter().zip(&golden.items) {
        assert_eq!(s, &item.text, "dev-sentences.txt and the golden file agree");
    }
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let out = engine.embed(&texts).expect("inference succeeds");
    let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
    let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
    let worst = assert_matches_golden(&golden, &ids, &vectors);
    eprintln!("one batch: lowest cosine {worst:.9}");

    // The second reference, from an independent float64 implementation.
    let numpy = load_golden("minilm-dev.numpy.json");
    let worst = assert_matches_golden(&numpy, &ids, &vectors);
    eprintln!("one batch vs numpy: lowest cosine {worst:.9}");
}

#[test]
fn golden_texts_match_the_references_one_at_a_time() {
    let Some(engine) = engine(1) else { return };
    let golden = load_golden("minilm-dev.candle.json");
    let mut ids = Vec::new();
    let mut vectors = Vec::new();
    for text in dev_sentences() {
        let mut out = engine.embed(&[text.as_str()]).expect("inference succeeds");
        assert_eq!(out.len(), 1);
        let e = out.remove(0);
        ids.push(e.token_ids);
        vectors.push(e.vector);
    }
    let worst = assert_matches_golden(&golden, &ids, &vectors);
    eprintln!("one at a time: lowest cosine {worst:.9}");
}

#[test]
fn results_come_back_in_input_order_whatever_the_batching() {
    let Some(engine) = engine(3) else { return };
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let batched = engine.infer(&texts).expect("inference succeeds");
    let mut reversed: Vec<&str> = texts.clone();
    reversed.reverse();
    let mut back = engine.infer(&reversed).expect("inference succeeds");
    back.reverse();
    for (i, (a, b)) in batched.iter().zip(&back).enumerate() {
        let c = surf_tests::cosine(a, b);
        assert!(c > 0.99999, "input {i}: cosine {c} between two batchings");
    }
}

#[test]
fn an_empty_list_gives_an_empty_result() {
    let Some(engine) = engine(8) else { return };
    assert!(engine.infer(&[]).expect("empty input is fine").is_empty());
}

#[test]
fn every_kernel_family_gives_golden_vectors() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let candle = load_golden("minilm-dev.candle.json");
    let numpy = load_golden("minilm-dev.numpy.json");
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let families = KernelFamily::supported(&gpu);
    assert!(families.contains(&KernelFamily::Portable));
    for family in families {
        let engine = Engine::builder()
            .model_dir(minilm_dir())
            .batch_size(64)
            .gpu(gpu.clone())
            .kernels(KernelMode::Forced(family))
            .build()
            .expect("the default model loads");
        let out = engine.embed(&texts).expect("inference succeeds");
        let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
        let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
        let worst = assert_matches_golden(&candle, &ids, &vectors);
        let worst_numpy = assert_matches_golden(&numpy, &ids, &vectors);
        eprintln!("{family}: lowest cosine {worst:.9} (candle), {worst_numpy:.9} (numpy)");
    }
}

#[test]
fn a_repeated_batch_reuses_its_bind_groups_and_its_vectors_stay_golden() {
    let Some(engine) = engine(64) else { return };
    let golden = load_golden("minilm-dev.candle.json");
    let sentences = dev_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    // The texts run as several batches of different lengths; the activation
    // buffers grow during the first call, which drops the groups made before.
    let first = engine.embed(&texts).expect("inference succeeds");
    engine.embed(&texts).expect("inference succeeds");
    let made = engine.bind_groups_created().expect("engine state");
    assert!(made > 0, "the first batches make their bind groups");
    let second = engine.embed(&texts).expect("inference succeeds");
    assert_eq!(
        engine.bind_groups_created().expect("engine state"),
        made,
        "the same batch again makes no new bind group"
    );
    // The reused parameter buffers were rewritten: a shorter batch in
    // between must not leave its row counts behind.
    engine.embed(&texts[..3]).expect("inference succeeds");
    let third = engine.embed(&texts).expect("inference succeeds");
    for out in [first, second, third] {
        let ids: Vec<Vec<u32>> = out.iter().map(|e| e.token_ids.clone()).collect();
        let vectors: Vec<Vec<f32>> = out.into_iter().map(|e| e.vector).collect();
        assert_matches_golden(&golden, &ids, &vectors);
    }
}
