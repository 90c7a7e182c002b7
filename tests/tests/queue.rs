//! The engine's request queue without HTTP: requests larger than a batch are
//! split and come back whole and in order, requests from many threads share
//! batches, and a request whose caller has gone is never computed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use surf_engine::queue::{BatchLimits, BatchObserver, BatchReport};
use surf_engine::source::FetchedComponent;
use surf_engine::{EmbedQueue, Engine, LocalSource, ModelSpec, VramBudget, WeightSource};
use surf_tests::{cosine, load_golden, minilm_dir};

/// Counts what the queue handed to the engine.
#[derive(Default)]
struct Tally {
    batches: AtomicUsize,
    inputs: AtomicUsize,
    largest: AtomicUsize,
}

fn observer(tally: &Arc<Tally>) -> BatchObserver {
    let tally = Arc::clone(tally);
    Arc::new(move |report: &BatchReport| {
        tally.batches.fetch_add(1, Ordering::SeqCst);
        tally
            .inputs
            .fetch_add(report.shape.inputs, Ordering::SeqCst);
        tally
            .largest
            .fetch_max(report.shape.padded_tokens(), Ordering::SeqCst);
    })
}

#[test]
fn a_request_larger_than_a_batch_is_split_and_reassembled_in_order() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let engine = Arc::new(
        Engine::builder()
            .model_dir(minilm_dir())
            .gpu(gpu)
            .build()
            .expect("the model loads"),
    );
    let tally = Arc::new(Tally::default());
    // 256 padded tokens a batch: the 40 golden texts cannot share one.
    let limits = BatchLimits {
        max_batch_tokens: 256,
        max_batch_requests: Some(8),
    };
    let queue = EmbedQueue::start(Arc::clone(&engine), limits, Some(observer(&tally)))
        .expect("the queue starts");
    let golden = load_golden("minilm-dev.candle.json");
    let texts: Vec<&str> = golden.items.iter().map(|i| i.text.as_str()).collect();
    let embedded = queue.embed_blocking(&texts).expect("the request succeeds");
    assert_eq!(embedded.vectors.len(), texts.len());
    for (i, (vector, item)) in embedded.vectors.iter().zip(&golden.items).enumerate() {
        let c = cosine(vector, &item.embedding);
        assert!(c >= 0.9999, "input {i}: cosine {c}");
    }
    assert_eq!(
        embedded.tokens,
        golden.items.iter().map(|i| i.ids.len()).sum::<usize>()
    );
    let batches = tally.batches.load(Ordering::SeqCst);
    assert!(batches >= texts.len().div_ceil(8), "{batches} batches");
    assert!(tally.largest.load(Ordering::SeqCst) <= 256);

    // Refused before queueing: an id outside the vocabulary, an empty input.
    let bad = vec![surf_engine::Tokens::from_ids(vec![101, 1_000_000, 102])];
    assert!(matches!(
        queue.submit(bad),
        Err(surf_engine::QueueError::Invalid(_))
    ));
    let empty = vec![surf_engine::Tokens::from_ids(Vec::new())];
    assert!(matches!(
        queue.submit(empty),
        Err(surf_engine::QueueError::Invalid(_))
    ));
}

#[test]
fn callers_on_many_threads_share_batches_and_get_their_own_vectors() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let engine = Arc::new(
        Engine::builder()
            .model_dir(minilm_dir())
            .gpu(gpu)
            .build()
            .expect("the model loads"),
    );
    let tally = Arc::new(Tally::default());
    let queue = Arc::new(
        EmbedQueue::start(engine, BatchLimits::default(), Some(observer(&tally)))
            .expect("the queue starts"),
    );
    let golden = Arc::new(load_golden("minilm-dev.candle.json"));
    let threads: Vec<_> = (0..16)
        .map(|caller| {
            let queue = Arc::clone(&queue);
            let golden = Arc::clone(&golden);
            std::thread::spawn(move || {
                for round in 0..3 {
                    let index = (caller * 5 + round) % golden.items.len();
                    let item = &golden.items[index];
                    let embedded = queue.embed_blocking(&[item.text.as_str()]).expect("embeds");
                    let c = cosine(&embedded.vectors[0], &item.embedding);
                    assert!(c >= 0.9999, "caller {caller} round {round}: cosine {c}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("the caller finished");
    }
    let batches = tally.batches.load(Ordering::SeqCst);
    let inputs = tally.inputs.load(Ordering::SeqCst);
    assert_eq!(inputs, 16 * 3);
    assert!(
        batches < inputs,
        "48 single-text requests ran in {batches} batches"
    );
}

/// A model folder whose fetches wait while the gate is closed.
struct GatedSource {
    inner: LocalSource,
    open: Mutex<bool>,
    opened: Condvar,
    waiting: AtomicUsize,
}

impl GatedSource {
    fn set(&self, open: bool) {
        *self.open.lock().expect("gate") = open;
        self.opened.notify_all();
    }
}

impl WeightSource for GatedSource {
    fn origin(&self) -> String {
        self.inner.origin()
    }
    fn spec(&self) -> surf_engine::Result<ModelSpec> {
        self.inner.spec()
    }
    fn model_id(&self) -> String {
        self.inner.model_id()
    }
    fn fetch(&self, component: &str) -> surf_engine::Result<FetchedComponent> {
        let mut open = self.open.lock().expect("gate");
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while !*open {
            open = self.opened.wait(open).expect("gate");
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        drop(open);
        self.inner.fetch(component)
    }
}

#[test]
fn a_request_whose_caller_went_away_is_dropped_before_it_is_computed() {
    let Some(gpu) = surf_engine::gpu::gpu_for_tests() else {
        return;
    };
    let source = Arc::new(GatedSource {
        inner: LocalSource::open(&minilm_dir()).expect("the model opens"),
        open: Mutex::new(true),
        opened: Condvar::new(),
        waiting: AtomicUsize::new(0),
    });
    // One slot and no host cache: every batch fetches its layers again.
    let engine = Arc::new(
        Engine::builder()
            .source(Arc::clone(&source) as Arc<dyn WeightSource>)
            .vram_budget(VramBudget::Layers(1))
            .host_cache_bytes(0)
            .gpu(gpu)
            .build()
            .expect("the engine builds"),
    );
    let tally = Arc::new(Tally::default());
    let queue = EmbedQueue::start(
        Arc::clone(&engine),
        BatchLimits {
            max_batch_tokens: 256,
            max_batch_requests: Some(1),
        },
        Some(observer(&tally)),
    )
    .expect("the queue starts");
    let tokens = |text: &str| engine.tokenizer().encode(&[text]).expect("tokenizes");

    source.set(false);
    let running = queue.submit(tokens("held at the gate")).expect("queued");
    // The engine thread now waits inside the first batch for a layer.
    while source.waiting.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let abandoned = queue
        .submit(tokens("nobody waits for this"))
        .expect("queued");
    let wanted = queue.submit(tokens("this one is awaited")).expect("queued");
    drop(abandoned);
    source.set(true);

    let first = running.wait_blocking().expect("the held request completes");
    let last = wanted
        .wait_blocking()
        .expect("the awaited request completes");
    assert_eq!(first.vectors.len(), 1);
    assert_eq!(last.vectors.len(), 1);
    assert_eq!(
        tally.inputs.load(Ordering::SeqCst),
        2,
        "the abandoned input was computed"
    );
}
