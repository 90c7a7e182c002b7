//! A concurrent front for [`Engine`]: callers on any thread or task submit
//! tokenized inputs and await their vectors, while one engine thread owns the
//! GPU work. Waiting inputs are packed into padded batches under a token
//! budget ([`plan`]); a request larger than one batch is split across batches
//! and reassembled in input order.
//!
//! Tokenization happens on the callers' threads, before `submit`. The next
//! batch is staged while the current one runs: each submitted input joins it
//! at once if it fits. An input whose caller has gone away (its [`Ticket`]
//! dropped) is dropped before it takes room in a batch. A failed batch fails
//! the requests in it, and only those, with a typed [`QueueError`]; the engine
//! rebuilds its GPU state before the next batch.

pub mod plan;

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::Engine;
use crate::error::Error;
use crate::tokenize::Tokens;
use plan::BatchPlan;
pub use plan::{BatchLimits, BatchShape};

/// Why a submitted request got no vectors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The request itself is wrong (an input too long, a token id outside the
    /// vocabulary); nothing was queued.
    #[error(transparent)]
    Invalid(Arc<Error>),
    /// The engine failed on a batch holding this request.
    #[error("the batch holding this request failed: {0}")]
    Batch(Arc<Error>),
    /// The engine panicked on a batch holding this request.
    #[error("the engine panicked while running this request's batch: {0}")]
    Panicked(String),
    /// The queue was shut down before the request was accepted.
    #[error("the embedding queue is shut down")]
    Closed,
}

/// The vectors of one request, in input order, with where its time went.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens of all inputs, `[CLS]` and `[SEP]` included.
    pub tokens: usize,
    /// From `submit` to the start of the first batch holding the request.
    pub queue_time: Duration,
    /// Summed run time of the batches that held the request.
    pub inference_time: Duration,
}

/// One batch, as [`BatchObserver`]s see it.
#[derive(Debug, Clone, Copy)]
pub struct BatchReport {
    pub shape: BatchShape,
    pub elapsed: Duration,
    pub failed: bool,
    /// Inputs still waiting when the batch started.
    pub waiting: usize,
}

/// Called on the engine thread after every batch.
pub type BatchObserver = Arc<dyn Fn(&BatchReport) + Send + Sync>;

/// Whether the last batch succeeded, for health checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueHealth {
    pub batches_run: u64,
    pub batches_failed: u64,
    /// The most recent batch failed; cleared by the next one that succeeds.
    pub failing: bool,
}

/// Awaits the vectors of one submitted request. Dropping it withdraws the
/// request: inputs not yet computed are skipped.
#[derive(Debug)]
pub struct Ticket {
    receiver: oneshot::Receiver<Result<Embedded, QueueError>>,
}

impl Ticket {
    pub async fn wait(self) -> Result<Embedded, QueueError> {
        self.receiver.await.unwrap_or(Err(QueueError::Closed))
    }

    /// Blocks the calling thread until the vectors are ready. It works on
    /// any thread (the engine thread answers without any async runtime), but
    /// inside a runtime it holds a worker thread for the wait: prefer `wait`.
    pub fn wait_blocking(self) -> Result<Embedded, QueueError> {
        pollster::block_on(self.receiver).unwrap_or(Err(QueueError::Closed))
    }
}

/// A submitted request's reply channel and the vectors gathered so far.
struct Reply {
    sender: Option<oneshot::Sender<Result<Embedded, QueueError>>>,
    vectors: Vec<Option<Vec<f32>>>,
    remaining: usize,
    tokens: usize,
    first_batch: Option<Instant>,
    inference: Duration,
}

struct Request {
    submitted: Instant,
    reply: Mutex<Reply>,
}

impl Request {
    fn reply(&self) -> MutexGuard<'_, Reply> {
        // Plain data: a panic elsewhere while it was held leaves it usable.
        self.reply.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// False once the request has been answered or its caller went away.
    fn is_wanted(&self) -> bool {
        self.reply()
            .sender
            .as_ref()
            .is_some_and(|sender| !sender.is_closed())
    }

    fn started(&self, at: Instant) {
        let mut reply = self.reply();
        reply.first_batch.get_or_insert(at);
    }

    fn deliver(&self, index: usize, vector: Vec<f32>) {
        let mut reply = self.reply();
        if reply.sender.is_none() || reply.vectors[index].is_some() {
            return;
        }
        reply.vectors[index] = Some(vector);
        reply.remaining -= 1;
        if reply.remaining > 0 {
            return;
        }
        let vectors: Vec<Vec<f32>> = reply.vectors.iter_mut().filter_map(Option::take).collect();
        let done = Embedded {
            vectors,
            tokens: reply.tokens,
            queue_time: reply
                .first_batch
                .map_or(Duration::ZERO, |t| t.duration_since(self.submitted)),
            inference_time: reply.inference,
        };
        if let Some(sender) = reply.sender.take() {
            let _ = sender.send(Ok(done));
        }
    }

    fn add_inference(&self, elapsed: Duration) {
        self.reply().inference += elapsed;
    }

    fn fail(&self, error: QueueError) {
        if let Some(sender) = self.reply().sender.take() {
            let _ = sender.send(Err(error));
        }
    }
}

/// One input of a request.
struct Piece {
    request: Arc<Request>,
    index: usize,
    tokens: Tokens,
}

struct State {
    plan: BatchPlan<Piece>,
    closed: bool,
    health: QueueHealth,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    observer: Option<BatchObserver>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The queue in front of one engine, and its engine thread.
pub struct EmbedQueue {
    engine: Arc<Engine>,
    shared: Arc<Shared>,
    engine_thread: Mutex<Option<JoinHandle<()>>>,
}

impl EmbedQueue {
    /// Starts the engine thread. `limits.max_batch_tokens` must hold at least
    /// one input of the model's longest length.
    pub fn start(
        engine: Arc<Engine>,
        limits: BatchLimits,
        observer: Option<BatchObserver>,
    ) -> Result<Self, Error> {
        let longest = engine.spec().max_seq_length;
        if limits.max_batch_tokens < longest {
            return Err(Error::InvalidInput(format!(
                "max_batch_tokens is {} but one input may have {longest} tokens",
                limits.max_batch_tokens
            )));
        }
        if limits.max_batch_requests == Some(0) {
            return Err(Error::InvalidInput(
                "max_batch_requests must be at least 1".into(),
            ));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                plan: BatchPlan::new(limits),
                closed: false,
                health: QueueHealth::default(),
            }),
            work: Condvar::new(),
            observer,
        });
        let thread = {
            let engine = Arc::clone(&engine);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("surf-engine".into())
                .spawn(move || run_engine(&engine, &shared))
                .map_err(|e| Error::Gpu(format!("cannot start the engine thread: {e}")))?
        };
        Ok(Self {
            engine,
            shared,
            engine_thread: Mutex::new(Some(thread)),
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn limits(&self) -> BatchLimits {
        self.shared.state().plan.limits()
    }

    /// Queues tokenized inputs. Bad inputs are refused here, before they can
    /// fail a batch that other requests share.
    pub fn submit(&self, inputs: Vec<Tokens>) -> Result<Ticket, QueueError> {
        self.engine
            .check_tokens(&inputs)
            .map_err(|e| QueueError::Invalid(Arc::new(e)))?;
        let (sender, receiver) = oneshot::channel();
        let count = inputs.len();
        let request = Arc::new(Request {
            submitted: Instant::now(),
            reply: Mutex::new(Reply {
                sender: Some(sender),
                vectors: vec![None; count],
                remaining: count,
                tokens: inputs.iter().map(Tokens::len).sum(),
                first_batch: None,
                inference: Duration::ZERO,
            }),
        });
        if count == 0 {
            request.fail(QueueError::Invalid(Arc::new(Error::InvalidInput(
                "a request needs at least one input".into(),
            ))));
            return Ok(Ticket { receiver });
        }
        let mut state = self.shared.state();
        if state.closed {
            return Err(QueueError::Closed);
        }
        for (index, tokens) in inputs.into_iter().enumerate() {
            let len = tokens.len();
            let piece = Piece {
                request: Arc::clone(&request),
                index,
                tokens,
            };
            state.plan.push(piece, len);
        }
        drop(state);
        self.shared.work.notify_one();
        Ok(Ticket { receiver })
    }

    /// Tokenizes `texts` on this thread, then queues them and waits (inside
    /// an async runtime, prefer `submit` and `Ticket::wait`).
    pub fn embed_blocking(&self, texts: &[&str]) -> Result<Embedded, QueueError> {
        let tokens = self
            .engine
            .tokenizer()
            .encode(texts)
            .map_err(|e| QueueError::Invalid(Arc::new(e)))?;
        self.submit(tokens)?.wait_blocking()
    }

    /// Inputs queued and not yet handed to the engine.
    pub fn waiting(&self) -> usize {
        self.shared.state().plan.len()
    }

    pub fn health(&self) -> QueueHealth {
        self.shared.state().health
    }

    /// Refuses new requests, computes every accepted one, then stops the
    /// engine thread.
    pub fn shutdown(&self) {
        self.shared.state().closed = true;
        self.shared.work.notify_all();
        let handle = self
            .engine_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("the engine thread panicked");
        }
    }
}

impl Drop for EmbedQueue {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The engine thread: takes staged batches until the queue is closed and empty.
fn run_engine(engine: &Engine, shared: &Shared) {
    loop {
        let (batch, shape, waiting) = {
            let mut state = shared.state();
            loop {
                let (batch, shape) = state.plan.take(
                    |piece| piece.request.is_wanted(),
                    |piece| piece.tokens.len(),
                );
                if !batch.is_empty() {
                    break (batch, shape, state.plan.len());
                }
                if state.closed {
                    return;
                }
                state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        let started = Instant::now();
        let mut pieces = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        for piece in batch {
            piece.request.started(started);
            pieces.push((piece.request, piece.index));
            inputs.push(piece.tokens);
        }
        let outcome = compute(engine, &inputs);
        let elapsed = started.elapsed();
        let failed = outcome.is_err();
        let report = {
            let mut state = shared.state();
            let health = &mut state.health;
            health.batches_run += 1;
            health.failing = failed;
            health.batches_failed += u64::from(failed);
            BatchReport {
                shape,
                elapsed,
                failed,
                waiting,
            }
        };
        // Reported before anyone is answered, so that a caller who reads the
        // metrics after its answer finds its batch counted.
        if let Some(observer) = &shared.observer {
            observer(&report);
        }
        answer(&pieces, outcome, elapsed);
    }
}

/// Runs one batch on the engine, turning a panic into an error.
fn compute(engine: &Engine, inputs: &[Tokens]) -> Result<Vec<Vec<f32>>, QueueError> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| engine.embed_tokens(inputs))) {
        Ok(Ok(vectors)) => Ok(vectors),
        Ok(Err(error)) => {
            tracing::error!(%error, inputs = inputs.len(), "a batch failed");
            Err(QueueError::Batch(Arc::new(error)))
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(%message, "the engine panicked on a batch");
            Err(QueueError::Panicked(message))
        }
    }
}

/// Hands each piece of a batch its vector, or fails every request in it.
fn answer(
    pieces: &[(Arc<Request>, usize)],
    outcome: Result<Vec<Vec<f32>>, QueueError>,
    elapsed: Duration,
) {
    match outcome {
        Ok(vectors) => {
            let mut requests: Vec<&Arc<Request>> = Vec::new();
            for ((request, index), vector) in pieces.iter().zip(vectors) {
                if !requests.iter().any(|r| Arc::ptr_eq(r, request)) {
                    // Counted once per batch, before the last piece completes it.
                    request.add_inference(elapsed);
                    requests.push(request);
                }
                request.deliver(*index, vector);
            }
        }
        Err(error) => {
            for (request, _) in pieces {
                request.fail(error.clone());
            }
        }
    }
}
