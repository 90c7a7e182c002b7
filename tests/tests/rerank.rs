//! Cross-encoders through the library: pairs tokenized as the tokenizer's
//! pair template joins them, and both reranker fixtures' scores (logits and
//! sigmoids) within 1e-3 of sentence-transformers', batched and one pair at
//! a time, from a model folder and streamed from a weight server under a
//! one-layer budget.

use std::sync::Arc;

use surf_engine::tokenize::TextTokenizer;
use surf_engine::{
    ClassifierInput, Engine, ModelKind, RemoteSource, ScoreOptions, Truncation, VramBudget,
};
use surf_server::{ServerConfig, WeightServer};
use surf_tests::{PairReference, fixture_dir, minilm_dir, pair_references};
use surf_transport::{ClientConfig, WeightClient};

const FIXTURES: [&str; 2] = ["bert-reranker", "xlmr-reranker"];
const TOLERANCE: f32 = 1e-3;

fn tokenizer(fixture: &str, max_len: usize) -> TextTokenizer {
    let dir = fixture_dir(fixture);
    let path = dir.join("tokenizer.json");
    let json = std::fs::read(&path).expect("tokenizer.json");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config.json"))
            .expect("config JSON");
    let vocab = config["vocab_size"].as_u64().expect("vocab_size") as usize;
    TextTokenizer::from_json(&path, &json, max_len, vocab).expect("the tokenizer loads")
}

fn pairs(references: &[PairReference]) -> Vec<(&str, &str)> {
    references
        .iter()
        .map(|r| (r.query.as_str(), r.passage.as_str()))
        .collect()
}

/// What the pair template adds after an empty passage: the references
/// record such a pair's ids as the query's alone, yet their scores are those
/// of the pair template with nothing in the passage's place (checked below).
fn empty_passage_tail(fixture: &str) -> &'static [u32] {
    match fixture {
        "bert-reranker" => &[3],
        _ => &[2, 2],
    }
}

#[test]
fn pairs_tokenize_as_sentence_transformers_tokenized_them() {
    for fixture in FIXTURES {
        let references = pair_references(fixture);
        let tokens = tokenizer(fixture, 256)
            .encode_pairs(&pairs(&references), Truncation::Right)
            .expect("pairs tokenize");
        for (reference, tokens) in references.iter().zip(&tokens) {
            let mut expected = reference.ids.clone();
            if reference.passage.is_empty() {
                expected.extend(empty_passage_tail(fixture));
            }
            assert_eq!(tokens.ids, expected, "{fixture}: {reference:?}");
        }
    }
}

#[test]
fn bert_pairs_give_the_passage_token_type_one() {
    let references = pair_references("bert-reranker");
    let tokens = tokenizer("bert-reranker", 256)
        .encode_pairs(&pairs(&references), Truncation::Right)
        .expect("pairs tokenize");
    let sep = 3;
    for tokens in &tokens {
        let first_sep = tokens.ids.iter().position(|&id| id == sep).expect("[SEP]");
        let expected: Vec<u32> = (0..tokens.len())
            .map(|i| u32::from(i > first_sep))
            .collect();
        assert_eq!(tokens.type_ids, expected, "{:?}", tokens.ids);
    }
    // XLM-RoBERTa has one token type.
    let references = pair_references("xlmr-reranker");
    let tokens = tokenizer("xlmr-reranker", 256)
        .encode_pairs(&pairs(&references), Truncation::Right)
        .expect("pairs tokenize");
    assert!(tokens.iter().all(|t| t.type_ids.iter().all(|&t| t == 0)));
}

#[test]
fn a_long_pair_loses_passage_tokens_first_from_the_side_asked() {
    let references = pair_references("bert-reranker");
    // The longest pair: a 4-token query (without specials) and a long passage.
    let long = references
        .iter()
        .max_by_key(|r| r.ids.len())
        .expect("references");
    let whole = &long.ids;
    let sep = 3;
    let first_sep = whole.iter().position(|&id| id == sep).expect("[SEP]");
    let query = &whole[1..first_sep];
    let passage = &whole[first_sep + 1..whole.len() - 1];
    let limit = query.len() + 3 + 5;
    let tokenizer = tokenizer("bert-reranker", limit);
    let pair = [(long.query.as_str(), long.passage.as_str())];

    let right = tokenizer
        .encode_pairs(&pair, Truncation::Right)
        .expect("tokenizes");
    assert_eq!(right[0].len(), limit);
    assert_eq!(
        &right[0].ids[1..first_sep],
        query,
        "the query is kept whole"
    );
    assert_eq!(&right[0].ids[first_sep + 1..limit - 1], &passage[..5]);
    assert_eq!(right[0].ids[limit - 1], sep);

    let left = tokenizer
        .encode_pairs(&pair, Truncation::Left)
        .expect("tokenizes");
    assert_eq!(&left[0].ids[1..first_sep], query);
    assert_eq!(
        &left[0].ids[first_sep + 1..limit - 1],
        &passage[passage.len() - 5..]
    );

    let untouched = tokenizer
        .encode_pairs(&pair, Truncation::None)
        .expect("tokenizes");
    assert_eq!(&untouched[0].ids, whole);

    // A query longer than the room leaves the passage empty and is cut too.
    let tiny = self::tokenizer("bert-reranker", 5);
    let cut = tiny
        .encode_pairs(&pair, Truncation::Right)
        .expect("tokenizes");
    assert_eq!(cut[0].ids, [whole[0], query[0], query[1], sep, sep]);
}

fn local_engine(fixture: &str, gpu: &surf_engine::Gpu, budget: VramBudget) -> Engine {
    Engine::builder()
        .model_dir(fixture_dir(fixture))
        .gpu(gpu.clone())
        .vram_budget(budget)
        .build()
        .unwrap_or_else(|e| panic!("{fixture} loads: {e}"))
}

/// Scores of every reference pair, batched (`predict`) and one pair at a
/// time (`rerank` of one passage), raw and with the sigmoid; all within
/// 1e-3 of sentence-transformers'.
fn assert_scores_match(engine: &Engine, fixture: &str) {
    assert_eq!(engine.model_kind(), ModelKind::Reranker, "{fixture}");
    // Both fixtures' tokenizer_config.json name the generic tokenizer class,
    // which hands the model no token types: it saw zeros.
    assert!(!engine.spec().token_types, "{fixture}");
    let references = pair_references(fixture);
    let inputs: Vec<ClassifierInput<'_>> = references
        .iter()
        .map(|r| ClassifierInput::Pair(&r.query, &r.passage))
        .collect();
    for raw_scores in [false, true] {
        let options = ScoreOptions {
            raw_scores,
            ..ScoreOptions::default()
        };
        let batched = engine.predict(&inputs, options).expect("predict");
        for (reference, predictions) in references.iter().zip(&batched) {
            let expected = if raw_scores {
                reference.raw_score
            } else {
                reference.score
            };
            assert_eq!(predictions.len(), 1, "one label");
            let got = predictions[0].score;
            assert!(
                (got - expected).abs() <= TOLERANCE,
                "{fixture} batched (raw {raw_scores}): {got} vs {expected} for {reference:?}"
            );
        }
    }
    // One pair at a time, each its own batch with no padding.
    for reference in &references {
        let alone = engine
            .rerank(&reference.query, &[&reference.passage])
            .expect("rerank");
        assert_eq!(alone.len(), 1);
        assert_eq!(alone[0].0, 0);
        assert!(
            (alone[0].1 - reference.score).abs() <= TOLERANCE,
            "{fixture} alone: {} vs {} for {reference:?}",
            alone[0].1,
            reference.score
        );
    }
}

/// Passages of one query come back sorted, with the indices they were given.
fn assert_ranked(engine: &Engine, fixture: &str) {
    let references = pair_references(fixture);
    let query = &references[2].query;
    let group: Vec<&PairReference> = references.iter().filter(|r| &r.query == query).collect();
    assert!(
        group.len() >= 3,
        "pairs-dev.txt has a query with 3 passages"
    );
    let passages: Vec<&str> = group.iter().map(|r| r.passage.as_str()).collect();
    let ranked = engine.rerank(query, &passages).expect("rerank");
    assert_eq!(ranked.len(), group.len());
    for window in ranked.windows(2) {
        assert!(window[0].1 >= window[1].1, "{ranked:?} is sorted");
    }
    for &(index, score) in &ranked {
        assert!(
            (score - group[index].score).abs() <= TOLERANCE,
            "{ranked:?}"
        );
    }
}

#[test]
fn reranker_scores_match_sentence_transformers_from_a_model_folder() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    for fixture in FIXTURES {
        let engine = local_engine(fixture, &gpu, VramBudget::Unbounded);
        assert_scores_match(&engine, fixture);
        assert_ranked(&engine, fixture);
    }
}

#[test]
fn reranker_scores_match_when_streamed_from_a_weight_server_under_one_layer() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for fixture in FIXTURES {
        let server = runtime
            .block_on(WeightServer::bind(ServerConfig::new(
                fixture_dir(fixture),
                ([127, 0, 0, 1], 0).into(),
            )))
            .expect("the weight server starts");
        let config = ClientConfig::new(
            vec![server.local_addr()],
            vec![server.certificate_der().clone()],
        );
        let client = runtime
            .block_on(WeightClient::connect(config))
            .expect("client connects");
        let source = RemoteSource::new(client, runtime.handle().clone());
        let engine = Engine::builder()
            .source(Arc::new(source))
            .gpu(gpu.clone())
            .vram_budget(VramBudget::Layers(1))
            .host_cache_bytes(0)
            .build()
            .expect("the streamed engine starts");
        assert_scores_match(&engine, fixture);
        let stats = engine.inference_stats().expect("stats");
        assert!(stats.evictions > 0, "layers were paged: {stats:?}");
        drop(engine);
        runtime.block_on(server.shutdown());
    }
}

#[test]
fn an_embedding_model_refuses_to_rerank_or_predict() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let engine = Engine::builder()
        .model_dir(minilm_dir())
        .gpu(gpu)
        .build()
        .expect("MiniLM loads");
    assert_eq!(engine.model_kind(), ModelKind::Embedding);
    let error = engine.rerank("q", &["p"]).expect_err("no head");
    assert!(error.is_bad_input(), "{error}");
    assert!(error.to_string().contains("embedding"), "{error}");
    let error = engine
        .predict(&[ClassifierInput::Text("t")], ScoreOptions::default())
        .expect_err("no head");
    assert!(error.is_bad_input(), "{error}");
}
