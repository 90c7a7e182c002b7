//! The word table of a streamed model is read by rows: a client asks the
//! weight server for the rows its inputs use, checks each against its hash,
//! and caches them within a bound.

mod transport_support;

use std::collections::BTreeSet;
use std::sync::Arc;

use surf_engine::{Engine, RemoteSource};
use surf_transport::manifest::MAX_ROWS_PER_REQUEST;
use surf_transport::wire::FetchRefusal;
use surf_transport::{Error as TransportError, ErrorKind, ObjectRef, WeightClient};
use transport_support::{connect, model_dir, start_model_server};

const TEXTS: [&str; 3] = [
    "Weights surf in over QUIC.",
    "Embeddings come out.",
    "Only the rows a batch uses cross the network.",
];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn streaming_engine(
    gpu: &surf_engine::Gpu,
    client: WeightClient,
    runtime: &tokio::runtime::Runtime,
    row_cache_bytes: u64,
) -> Engine {
    let source =
        RemoteSource::new(client, runtime.handle().clone()).with_row_cache_bytes(row_cache_bytes);
    Engine::builder()
        .source(Arc::new(source))
        .gpu(gpu.clone())
        .build()
        .expect("the streaming engine starts")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn assert_same_vectors(streamed: &[surf_engine::Embedding], local: &[surf_engine::Embedding]) {
    assert_eq!(streamed.len(), local.len());
    for (i, (s, l)) in streamed.iter().zip(local).enumerate() {
        assert_eq!(s.token_ids, l.token_ids, "tokens of text {i}");
        let similarity = cosine(&s.vector, &l.vector);
        assert!(similarity >= 0.99999, "text {i}: cosine {similarity}");
    }
}

#[test]
fn a_streamed_model_fetches_only_the_rows_its_inputs_use_and_fetches_them_once() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let runtime = runtime();
    let server = runtime.block_on(start_model_server());
    let client = runtime.block_on(connect(&[&server]));
    let manifest = client.manifest().clone();
    let table = manifest
        .row_table("embeddings.word_embeddings.weight")
        .expect("the word table is served by rows")
        .clone();
    assert!(
        manifest.tensor(&table.name).is_none(),
        "no component carries the word table"
    );
    let embeddings = manifest
        .component("embeddings")
        .expect("the pinned component");
    let table_bytes = table.rows * table.row_bytes();
    assert!(
        embeddings.byte_len < table_bytes / 10,
        "the pinned component is {} bytes, the table {table_bytes}",
        embeddings.byte_len
    );

    let engine = streaming_engine(&gpu, client, &runtime, 64 << 20);
    let local = Engine::builder()
        .model_dir(model_dir())
        .gpu(gpu.clone())
        .build()
        .expect("the local engine starts");
    let streamed = engine.embed(&TEXTS).expect("the streamed run");
    assert_same_vectors(&streamed, &local.embed(&TEXTS).expect("the local run"));

    // Row 0 (the padding token, read when the engine starts) and each
    // distinct token once, after the list of row hashes.
    let mut distinct: BTreeSet<u32> = streamed.iter().flat_map(|e| e.token_ids.clone()).collect();
    distinct.insert(0);
    let expected = table.hash_list_bytes() + distinct.len() as u64 * table.row_bytes();
    let served = server.stats().row_bytes_served;
    assert_eq!(served, expected, "{} distinct rows", distinct.len());
    let fetched_before = engine.inference_stats().expect("stats").bytes_fetched;

    engine.embed(&TEXTS).expect("the second run");
    assert_eq!(
        server.stats().row_bytes_served,
        served,
        "cached rows are not fetched again"
    );
    assert_eq!(
        engine.inference_stats().expect("stats").bytes_fetched,
        fetched_before
    );
}

#[test]
fn a_row_cache_smaller_than_a_batch_gives_the_same_vectors_and_fetches_again() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let runtime = runtime();
    let server = runtime.block_on(start_model_server());
    let client = runtime.block_on(connect(&[&server]));
    let row_bytes = client.manifest().row_tables[0].row_bytes();
    let engine = streaming_engine(&gpu, client, &runtime, 2 * row_bytes);
    let local = Engine::builder()
        .model_dir(model_dir())
        .gpu(gpu.clone())
        .build()
        .expect("the local engine starts");
    let expected = local.embed(&TEXTS).expect("the local run");
    assert_same_vectors(&engine.embed(&TEXTS).expect("the first run"), &expected);
    let served = server.stats().row_bytes_served;
    assert_same_vectors(&engine.embed(&TEXTS).expect("the second run"), &expected);
    assert!(
        server.stats().row_bytes_served > served,
        "rows the cache could not keep are fetched again"
    );
}

#[test]
fn rows_outside_the_table_or_too_many_at_once_are_refused() {
    let runtime = runtime();
    let server = runtime.block_on(start_model_server());
    let client = runtime.block_on(connect(&[&server]));
    let table = client.manifest().row_tables[0].clone();
    let past_the_end = table.rows as u32;

    let error = runtime
        .block_on(client.fetch_rows(&table.name, &[1, past_the_end]))
        .expect_err("a row past the table");
    assert!(
        matches!(error, TransportError::RowOutOfRange { row, .. } if row == past_the_end),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::BadInput);

    let ask = |rows: Vec<u32>| {
        let object = ObjectRef::Rows {
            table: table.name.clone(),
            rows,
        };
        runtime.block_on(client.fetch_unverified_range(object, 0..1))
    };
    let refusal = |result: Result<bytes::Bytes, TransportError>| match result {
        Err(TransportError::FetchRefused { refusal, .. }) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refusal(ask(vec![past_the_end])),
        FetchRefusal::RowOutOfBounds {
            row: past_the_end,
            rows: table.rows
        }
    );
    assert_eq!(
        refusal(ask(vec![0; MAX_ROWS_PER_REQUEST + 1])),
        FetchRefusal::TooManyRows {
            asked: MAX_ROWS_PER_REQUEST as u64 + 1,
            limit: MAX_ROWS_PER_REQUEST as u64
        }
    );
    let unknown = runtime.block_on(client.fetch_rows("no.such.table", &[0]));
    assert!(
        matches!(unknown, Err(TransportError::UnknownRowTable { .. })),
        "{unknown:?}"
    );
}
