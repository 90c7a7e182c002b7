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
//!
//! The queue can front several models ([`Engines`]): each has its own queue
//! of inputs and its own batches, and the one engine thread runs the batch
//! of the model [`pick`] chooses, so that no model waits past the bound of
//! [`Fairness`] and, short of that, a model whose weights are resident goes
//! first.

pub mod pick;
pub mod plan;

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::Engine;
use crate::engines::Engines;
use crate::error::Error;
use crate::tokenize::Tokens;
pub use pick::Fairness;
use pick::{LaneView, next_lane};
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
    /// The model the batch ran on, as indexed in the queue's [`Engines`].
    pub model: usize,
    pub shape: BatchShape,
    pub elapsed: Duration,
    pub failed: bool,
    /// Inputs still waiting when the batch started, for every model.
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

/// One model's waiting inputs.
struct Lane {
    plan: BatchPlan<Piece>,
    /// When its last batch started.
    last_served: Option<Instant>,
}

struct State {
    lanes: Vec<Lane>,
    closed: bool,
    health: QueueHealth,
    /// Recent batch run time, smoothed: how long the next batch will make
    /// the others wait.
    batch_time: Duration,
}

impl State {
    fn waiting(&self) -> usize {
        self.lanes.iter().map(|lane| lane.plan.len()).sum()
    }

    /// The lanes as [`pick::next_lane`] sees them at `now`.
    fn views(&self, now: Instant, resident: &[f64]) -> Vec<LaneView> {
        self.lanes
            .iter()
            .zip(resident)
            .map(|(lane, &resident)| LaneView {
                oldest_wait: lane
                    .plan
                    .oldest()
                    .map(|piece| now.saturating_duration_since(piece.request.submitted)),
                resident,
                since_served: lane
                    .last_served
                    .map_or(Duration::MAX, |at| now.saturating_duration_since(at)),
            })
            .collect()
    }
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    observer: Option<BatchObserver>,
    fairness: Fairness,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The queue in front of one engine or several, and its engine thread.
pub struct EmbedQueue {
    engines: Arc<Engines>,
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
        let name = engine.model_id().to_string();
        let engines = Arc::new(Engines::single(name, engine)?);
        Self::start_models(engines, limits, Fairness::default(), observer)
    }

    /// Starts one engine thread for several models: each keeps its own
    /// batches under `limits`, and `fairness` bounds how long any waits.
    pub fn start_models(
        engines: Arc<Engines>,
        limits: BatchLimits,
        fairness: Fairness,
        observer: Option<BatchObserver>,
    ) -> Result<Self, Error> {
        for model in engines.models() {
            let longest = model.engine.spec().max_seq_length;
            if limits.max_batch_tokens < longest {
                return Err(Error::InvalidInput(format!(
                    "max_batch_tokens is {} but one input of {} may have {longest} tokens",
                    limits.max_batch_tokens, model.name
                )));
            }
        }
        if limits.max_batch_requests == Some(0) {
            return Err(Error::InvalidInput(
                "max_batch_requests must be at least 1".into(),
            ));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lanes: (0..engines.len())
                    .map(|_| Lane {
                        plan: BatchPlan::new(limits),
                        last_served: None,
                    })
                    .collect(),
                closed: false,
                health: QueueHealth::default(),
                batch_time: Duration::ZERO,
            }),
            work: Condvar::new(),
            observer,
            fairness,
        });
        let thread = {
            let engines = Arc::clone(&engines);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("surf-engine".into())
                .spawn(move || run_engine(&engines, &shared))
                .map_err(|e| Error::Gpu(format!("cannot start the engine thread: {e}")))?
        };
        Ok(Self {
            engines,
            shared,
            engine_thread: Mutex::new(Some(thread)),
        })
    }

    /// The default model's engine.
    pub fn engine(&self) -> &Arc<Engine> {
        self.engines.engine(self.engines.default_index())
    }

    /// Every model the queue runs.
    pub fn engines(&self) -> &Arc<Engines> {
        &self.engines
    }

    pub fn limits(&self) -> BatchLimits {
        self.shared.state().lanes[0].plan.limits()
    }

    /// How the next model is chosen.
    pub fn fairness(&self) -> Fairness {
        self.shared.fairness
    }

    /// Queues tokenized inputs for the default model. Bad inputs are refused
    /// here, before they can fail a batch that other requests share.
    pub fn submit(&self, inputs: Vec<Tokens>) -> Result<Ticket, QueueError> {
        self.submit_to(self.engines.default_index(), inputs)
    }

    /// Queues tokenized inputs for `model`, an index into the queue's
    /// [`Engines`].
    pub fn submit_to(&self, model: usize, inputs: Vec<Tokens>) -> Result<Ticket, QueueError> {
        if model >= self.engines.len() {
            return Err(QueueError::Invalid(Arc::new(Error::InvalidInput(format!(
                "model {model} does not exist; the queue runs {}",
                self.engines.len()
            )))));
        }
        self.engines
            .engine(model)
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
        self.engines.record_request(model);
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
            state.lanes[model].plan.push(piece, len);
        }
        drop(state);
        self.shared.work.notify_one();
        Ok(Ticket { receiver })
    }

    /// Tokenizes `texts` on this thread, then queues them and waits (inside
    /// an async runtime, prefer `submit` and `Ticket::wait`).
    pub fn embed_blocking(&self, texts: &[&str]) -> Result<Embedded, QueueError> {
        let tokens = self
            .engine()
            .tokenizer()
            .encode(texts)
            .map_err(|e| QueueError::Invalid(Arc::new(e)))?;
        self.submit(tokens)?.wait_blocking()
    }

    /// Inputs queued and not yet handed to the engine, for every model.
    pub fn waiting(&self) -> usize {
        self.shared.state().waiting()
    }

    /// Inputs of `model` queued and not yet handed to the engine.
    pub fn waiting_for(&self, model: usize) -> usize {
        self.shared
            .state()
            .lanes
            .get(model)
            .map_or(0, |lane| lane.plan.len())
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

/// Shares of each model's weights in GPU memory, read only when there is a
/// choice to make.
fn resident_shares(engines: &Engines) -> Vec<f64> {
    if engines.len() == 1 {
        return vec![1.0];
    }
    (0..engines.len())
        .map(|model| engines.resident_share(model))
        .collect()
}

/// The engine thread: takes staged batches until the queue is closed and empty.
fn run_engine(engines: &Engines, shared: &Shared) {
    loop {
        let (model, batch, shape, waiting) = {
            // Read before the queue's lock is taken: it waits on each engine.
            let mut resident = resident_shares(engines);
            let mut state = shared.state();
            loop {
                let views = state.views(Instant::now(), &resident);
                let Some(model) = next_lane(&views, &shared.fairness, state.batch_time) else {
                    if state.closed {
                        return;
                    }
                    state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner());
                    if engines.len() > 1 {
                        drop(state);
                        resident = resident_shares(engines);
                        state = shared.state();
                    }
                    continue;
                };
                let lane = &mut state.lanes[model];
                let (batch, shape) = lane.plan.take(
                    |piece| piece.request.is_wanted(),
                    |piece| piece.tokens.len(),
                );
                if !batch.is_empty() {
                    lane.last_served = Some(Instant::now());
                    break (model, batch, shape, state.waiting());
                }
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
        let outcome = compute(engines, model, &inputs);
        let elapsed = started.elapsed();
        let failed = outcome.is_err();
        let report = {
            let mut state = shared.state();
            state.batch_time = if state.batch_time.is_zero() {
                elapsed
            } else {
                (state.batch_time * 3 + elapsed) / 4
            };
            let health = &mut state.health;
            health.batches_run += 1;
            health.failing = failed;
            health.batches_failed += u64::from(failed);
            BatchReport {
                model,
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

/// Runs one batch on `model`, turning a panic into an error.
fn compute(
    engines: &Engines,
    model: usize,
    inputs: &[Tokens],
) -> Result<Vec<Vec<f32>>, QueueError> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| engines.run(model, inputs))) {
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
