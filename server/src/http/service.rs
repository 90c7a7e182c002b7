//! The core of the embedding service, between the HTTP handlers and the
//! engine's queue: admission (`--max-concurrent-requests`), validation,
//! tokenization off the async workers, queueing, and the per-request
//! `dimensions` and normalisation of the vectors that come back. Pairs for a
//! cross-encoder take the same road: tokenized with the pair template, then
//! queued and merged into batches with every other request. A service may
//! serve several models ([`Engines`]); a request names one, or goes to the
//! default.

use std::sync::Arc;
use std::time::{Duration, Instant};

use surf_engine::engine::activate;
use surf_engine::queue::{BatchLimits, BatchObserver, Fairness};
use surf_engine::{
    ClassifierInput, EmbedQueue, Engine, Engines, ModelKind, Prompt, Tokens, Truncation,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{ApiError, ErrorKind};
use super::metrics::ServiceMetrics;
use super::types::InputItem;

/// Limits and defaults of the service, with TEI's names.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub max_concurrent_requests: usize,
    pub batch: BatchLimits,
    pub max_client_batch_size: usize,
    pub auto_truncate: bool,
    /// The model name answered by `/v1/embeddings` and `/info`, when one
    /// model is served.
    pub served_model_name: Option<String>,
    /// How long the oldest request of any model may wait before its model runs.
    pub fairness: Fairness,
    /// The prompt of requests that name none (`--default-prompt-name`);
    /// without it, the model's own default, if any.
    pub default_prompt_name: Option<String>,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 512,
            batch: BatchLimits::default(),
            max_client_batch_size: 32,
            auto_truncate: true,
            served_model_name: None,
            fairness: Fairness::default(),
            default_prompt_name: None,
        }
    }
}

/// What one embedding request asks for, besides its inputs.
#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// `None`: the server's `--auto-truncate`.
    pub truncate: Option<bool>,
    pub direction: Truncation,
    pub normalize: bool,
    pub dimensions: Option<usize>,
}

/// What one scoring request (`/rerank`, `/predict`) asks for, besides its
/// inputs.
#[derive(Debug, Clone, Copy)]
pub struct ScoreRequestOptions {
    /// `None`: the server's `--auto-truncate`.
    pub truncate: Option<bool>,
    pub direction: Truncation,
    pub raw_scores: bool,
}

/// One input of a classifier, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassifierItem {
    Text(String),
    Pair(String, String),
}

impl ClassifierItem {
    /// Characters of the input, for `x-compute-characters`.
    fn characters(&self) -> usize {
        match self {
            ClassifierItem::Text(text) => text.chars().count(),
            ClassifierItem::Pair(first, second) => first.chars().count() + second.chars().count(),
        }
    }
}

/// Vectors in input order, and where the request's time went. For a
/// scoring request, each vector holds the input's scores, one per label.
#[derive(Debug)]
pub struct EmbedAnswer {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
    pub characters: usize,
    pub tokenization_time: Duration,
    pub queue_time: Duration,
    pub inference_time: Duration,
    pub total_time: Duration,
}

pub struct EmbedService {
    queue: EmbedQueue,
    permits: Arc<Semaphore>,
    settings: ServiceSettings,
    metrics: Arc<ServiceMetrics>,
    /// Unix seconds at start, for `/v1/models`.
    started: u64,
}

impl EmbedService {
    /// Serves one engine, under `--served-model-name` or its model id.
    pub fn start(engine: Arc<Engine>, settings: ServiceSettings) -> surf_engine::Result<Self> {
        let name = settings
            .served_model_name
            .clone()
            .unwrap_or_else(|| engine.model_id().to_string());
        Self::start_models(Arc::new(Engines::single(name, engine)?), settings)
    }

    /// Starts the queue over every model and runs one batch through each,
    /// so that the service is healthy before it listens.
    pub fn start_models(
        engines: Arc<Engines>,
        settings: ServiceSettings,
    ) -> surf_engine::Result<Self> {
        if settings.max_concurrent_requests == 0 || settings.max_client_batch_size == 0 {
            return Err(surf_engine::Error::InvalidInput(
                "--max-concurrent-requests and --max-client-batch-size must be at least 1".into(),
            ));
        }
        if let Some(name) = &settings.default_prompt_name {
            engines
                .engine(engines.default_index())
                .prompt_text(Prompt::Named(name))?;
        }
        let metrics = Arc::new(ServiceMetrics::new(engines.names()));
        let observer: BatchObserver = {
            let metrics = Arc::clone(&metrics);
            Arc::new(move |report| metrics.batch_done(report))
        };
        let queue = EmbedQueue::start_models(
            Arc::clone(&engines),
            settings.batch,
            settings.fairness,
            Some(observer),
        )?;
        let service = Self {
            queue,
            permits: Arc::new(Semaphore::new(settings.max_concurrent_requests)),
            settings,
            metrics,
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        // The default model last, so that it is the one resident first.
        let default = engines.default_index();
        let order = (0..engines.len())
            .filter(|&m| m != default)
            .chain(std::iter::once(default));
        for model in order {
            let probe = vec![Tokens::from_ids(service.probe_ids(model))];
            service
                .queue
                .submit_to(model, probe)
                .and_then(|ticket| ticket.wait_blocking())
                .map_err(|e| {
                    surf_engine::Error::Gpu(format!(
                        "the warm-up batch of {} failed: {e}",
                        engines.name(model)
                    ))
                })?;
        }
        Ok(service)
    }

    /// The default model's engine.
    pub fn engine(&self) -> &Arc<Engine> {
        self.queue.engine()
    }

    /// Every model served.
    pub fn engines(&self) -> &Arc<Engines> {
        self.queue.engines()
    }

    /// Unix seconds when the service started.
    pub fn started(&self) -> u64 {
        self.started
    }

    /// The model a request names, or the default one when it names none.
    /// With one model served, any name is answered by it (clients often
    /// send a fixed name); with several, a name not served is 404.
    pub fn resolve(&self, requested: Option<&str>) -> Result<usize, ApiError> {
        let engines = self.engines();
        let Some(name) = requested else {
            return Ok(engines.default_index());
        };
        match engines.index(name) {
            Ok(model) => Ok(model),
            Err(_) if engines.len() == 1 => {
                tracing::debug!(asked = %name, served = %engines.name(0), "a request names another model; answering with the served one");
                Ok(0)
            }
            Err(error) => Err(ApiError {
                kind: ErrorKind::ModelNotFound,
                message: error.to_string(),
                param: Some("model"),
            }),
        }
    }

    /// The name answered for `model`.
    pub fn name_of(&self, model: usize) -> String {
        self.engines().name(model).to_string()
    }

    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &ServiceMetrics {
        &self.metrics
    }

    /// The name answered for the default model.
    pub fn model_name(&self) -> String {
        self.name_of(self.engines().default_index())
    }

    /// A permit to be in flight, or 429 at once: the queue never grows
    /// past `--max-concurrent-requests` requests.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.permits).try_acquire_owned().map_err(|_| {
            ApiError::new(
                ErrorKind::Overloaded,
                format!(
                    "the service is at its limit of {} concurrent requests",
                    self.settings.max_concurrent_requests
                ),
            )
        })
    }

    /// Checks how many inputs a request carries.
    pub fn check_count(&self, count: usize, param: &'static str) -> Result<(), ApiError> {
        if count == 0 {
            return Err(ApiError {
                kind: ErrorKind::Empty,
                message: "the input list is empty".into(),
                param: Some(param),
            });
        }
        let limit = self.settings.max_client_batch_size;
        if count > limit {
            return Err(ApiError::validation(
                param,
                format!(
                    "{count} inputs in one request; at most {limit} are allowed (--max-client-batch-size)"
                ),
            ));
        }
        Ok(())
    }

    /// Embeds `items` (texts or token ids) in input order, texts after the
    /// default prompt.
    pub async fn embed(
        &self,
        model: usize,
        items: Vec<InputItem>,
        options: EmbedOptions,
        param: &'static str,
    ) -> Result<EmbedAnswer, ApiError> {
        self.embed_prompted(model, items, options, None, param)
            .await
    }

    /// Like `embed`, with the prompt `prompt_name` before each text; an
    /// unknown name is a validation error listing the model's prompts.
    /// `--default-prompt-name` applies to the default model only: other
    /// models take their own default prompt.
    pub async fn embed_prompted(
        &self,
        model: usize,
        mut items: Vec<InputItem>,
        options: EmbedOptions,
        prompt_name: Option<String>,
        param: &'static str,
    ) -> Result<EmbedAnswer, ApiError> {
        let name = prompt_name.or_else(|| {
            (model == self.engines().default_index())
                .then(|| self.settings.default_prompt_name.clone())
                .flatten()
        });
        let prompt = match &name {
            Some(name) => Prompt::Named(name),
            None => Prompt::Default,
        };
        let prefix = self
            .engines()
            .engine(model)
            .prompt_text(prompt)
            .map_err(|e| ApiError::validation("prompt_name", e.to_string()))?;
        if let Some(prefix) = prefix.filter(|p| !p.is_empty()) {
            for item in &mut items {
                if let InputItem::Text(text) = item {
                    text.insert_str(0, prefix);
                }
            }
        }
        let started = Instant::now();
        let _permit = self.admit()?;
        self.require_kind(
            model,
            &[ModelKind::Embedding],
            "model is not an embedding model",
        )?;
        self.check_count(items.len(), param)?;
        let engine = self.engines().engine(model);
        let dimension = engine.dimension();
        if let Some(dimensions) = options.dimensions
            && (dimensions == 0 || dimensions > dimension)
        {
            return Err(ApiError::validation(
                "dimensions",
                format!(
                    "dimensions must be between 1 and the model's {dimension}; got {dimensions}"
                ),
            ));
        }
        let truncate = options.truncate.unwrap_or(self.settings.auto_truncate);
        let characters = items
            .iter()
            .map(|item| match item {
                InputItem::Text(text) => text.chars().count(),
                InputItem::Ids(_) => 0,
            })
            .sum();

        let direction = options.direction;
        let already_normalized = engine.normalizes();
        let mut answer = self
            .run_queued(model, started, characters, move |engine| {
                tokenize(engine, items, truncate, direction, param)
            })
            .await?;
        answer.vectors = std::mem::take(&mut answer.vectors)
            .into_iter()
            .map(|vector| shape_vector(vector, options, already_normalized))
            .collect();
        Ok(answer)
    }

    /// What `model` computes: embeddings, one reranking score, or labels.
    pub fn model_kind(&self, model: usize) -> ModelKind {
        self.engines().engine(model).model_kind()
    }

    /// Refuses a route the model cannot serve, as TEI does: a Backend error.
    fn require_kind(
        &self,
        model: usize,
        allowed: &[ModelKind],
        message: &str,
    ) -> Result<(), ApiError> {
        if allowed.contains(&self.model_kind(model)) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorKind::Backend, message))
        }
    }

    /// Scores every text against `query` with a one-label cross-encoder:
    /// one score per text, in the texts' order.
    pub async fn rerank(
        &self,
        model: usize,
        query: String,
        texts: Vec<String>,
        options: ScoreRequestOptions,
        param: &'static str,
    ) -> Result<EmbedAnswer, ApiError> {
        self.require_kind(
            model,
            &[ModelKind::Reranker],
            "model is not a re-ranker model",
        )?;
        let items = texts
            .into_iter()
            .map(|text| ClassifierItem::Pair(query.clone(), text))
            .collect();
        self.score(model, items, options, param).await
    }

    /// Every label's score for each text or pair, in input order.
    pub async fn predict(
        &self,
        model: usize,
        items: Vec<ClassifierItem>,
        options: ScoreRequestOptions,
        param: &'static str,
    ) -> Result<EmbedAnswer, ApiError> {
        self.require_kind(
            model,
            &[ModelKind::Reranker, ModelKind::Classifier],
            "model is not a classifier model",
        )?;
        self.score(model, items, options, param).await
    }

    /// Runs a classifier's inputs and turns its logits into scores.
    async fn score(
        &self,
        model: usize,
        items: Vec<ClassifierItem>,
        options: ScoreRequestOptions,
        param: &'static str,
    ) -> Result<EmbedAnswer, ApiError> {
        let started = Instant::now();
        let _permit = self.admit()?;
        self.check_count(items.len(), param)?;
        let characters = items.iter().map(ClassifierItem::characters).sum();
        let truncation = self.truncation(options);
        let answer = self
            .run_queued(model, started, characters, move |engine| {
                tokenize_classifier(engine, items, truncation, param)
            })
            .await?;
        Ok(activate_all(answer, options.raw_scores))
    }

    fn truncation(&self, options: ScoreRequestOptions) -> Truncation {
        if options.truncate.unwrap_or(self.settings.auto_truncate) {
            options.direction
        } else {
            Truncation::None
        }
    }

    /// Tokenizes on a blocking thread, queues the tokens and waits for their
    /// outputs: the one road from a request to the engine.
    async fn run_queued<F>(
        &self,
        model: usize,
        started: Instant,
        characters: usize,
        tokenize: F,
    ) -> Result<EmbedAnswer, ApiError>
    where
        F: FnOnce(&Engine) -> Result<Vec<Tokens>, ApiError> + Send + 'static,
    {
        let engine = Arc::clone(self.engines().engine(model));
        let tokenized = tokio::task::spawn_blocking(move || tokenize(&engine))
            .await
            .map_err(|e| {
                ApiError::new(ErrorKind::Backend, format!("tokenization failed: {e}"))
            })??;
        let tokenization_time = started.elapsed();

        let ticket = self.queue.submit_to(model, tokenized)?;
        self.metrics.set_queue_size(self.queue.waiting());
        let embedded = ticket.wait().await?;
        self.metrics.queued(model, embedded.queue_time);
        Ok(EmbedAnswer {
            vectors: embedded.vectors,
            tokens: embedded.tokens,
            characters,
            tokenization_time,
            queue_time: embedded.queue_time,
            inference_time: embedded.inference_time,
            total_time: started.elapsed(),
        })
    }

    /// Healthy once a batch has run and the last one succeeded. After a
    /// failure, one probe batch tells whether the engine has recovered.
    pub async fn check_health(&self) -> bool {
        let health = self.queue.health();
        if health.batches_run > 0 && !health.failing {
            return true;
        }
        let default = self.engines().default_index();
        let probe = vec![Tokens::from_ids(self.probe_ids(default))];
        match self.queue.submit_to(default, probe) {
            Ok(ticket) => ticket.wait().await.is_ok(),
            Err(_) => false,
        }
    }

    fn probe_ids(&self, model: usize) -> Vec<u32> {
        let pad = self.engines().engine(model).spec().config.pad_token_id();
        vec![pad]
    }

    /// Inputs queued and not yet computed.
    pub fn waiting(&self) -> usize {
        self.queue.waiting()
    }

    /// Answers every accepted request, then stops the engine thread.
    pub fn shutdown(&self) {
        self.queue.shutdown();
    }
}

/// Tokenizes texts and checks token-id inputs, on a blocking thread.
fn tokenize(
    engine: &Engine,
    items: Vec<InputItem>,
    truncate: bool,
    direction: Truncation,
    param: &'static str,
) -> Result<Vec<Tokens>, ApiError> {
    let tokenizer = engine.tokenizer();
    let max_len = tokenizer.max_len();
    let truncation = if truncate {
        direction
    } else {
        Truncation::None
    };
    let mut tokens = Vec::with_capacity(items.len());
    let mut texts: Vec<(usize, String)> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match item {
            InputItem::Text(text) => {
                texts.push((index, text));
                tokens.push(Tokens::from_ids(Vec::new()));
            }
            InputItem::Ids(ids) => {
                if ids.is_empty() {
                    return Err(ApiError {
                        kind: ErrorKind::Empty,
                        message: format!("input {index} has no token ids"),
                        param: Some(param),
                    });
                }
                tokens.push(Tokens::from_ids(cut_ids(ids, max_len, truncation)));
            }
        }
    }
    if !texts.is_empty() {
        let refs: Vec<&str> = texts.iter().map(|(_, text)| text.as_str()).collect();
        let encoded = tokenizer
            .encode_with(&refs, truncation)
            .map_err(|e| ApiError::new(ErrorKind::Tokenizer, e.to_string()))?;
        for ((index, _), encoding) in texts.iter().zip(encoded) {
            tokens[*index] = encoding;
        }
    }
    check_lengths(&tokens, max_len, param)?;
    Ok(tokens)
}

/// Tokenizes a classifier's texts and pairs, on a blocking thread.
fn tokenize_classifier(
    engine: &Engine,
    items: Vec<ClassifierItem>,
    truncation: Truncation,
    param: &'static str,
) -> Result<Vec<Tokens>, ApiError> {
    let inputs: Vec<ClassifierInput<'_>> = items
        .iter()
        .map(|item| match item {
            ClassifierItem::Text(text) => ClassifierInput::Text(text),
            ClassifierItem::Pair(first, second) => ClassifierInput::Pair(first, second),
        })
        .collect();
    let tokens = engine
        .tokenize_classifier_inputs(&inputs, truncation)
        .map_err(|e| ApiError::new(ErrorKind::Tokenizer, e.to_string()))?;
    check_lengths(&tokens, engine.tokenizer().max_len(), param)?;
    Ok(tokens)
}

/// Refuses an input longer than the model's limit: one sent with
/// `truncate: false`.
fn check_lengths(tokens: &[Tokens], max_len: usize, param: &'static str) -> Result<(), ApiError> {
    for (index, input) in tokens.iter().enumerate() {
        if input.len() > max_len {
            return Err(ApiError::validation(
                param,
                format!(
                    "input {index} has {} tokens, more than the model's limit of {max_len}; \
                     send `truncate: true` or shorten it",
                    input.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Logits to scores: sigmoid or softmax, or left raw.
fn activate_all(mut answer: EmbedAnswer, raw_scores: bool) -> EmbedAnswer {
    answer.vectors = std::mem::take(&mut answer.vectors)
        .into_iter()
        .map(|logits| activate(logits, raw_scores))
        .collect();
    answer
}

/// Token ids cut to `max_len` from the side `truncation` says; untouched
/// without truncation, so that the length check refuses them.
fn cut_ids(mut ids: Vec<u32>, max_len: usize, truncation: Truncation) -> Vec<u32> {
    if ids.len() <= max_len {
        return ids;
    }
    match truncation {
        Truncation::Right => ids.truncate(max_len),
        Truncation::Left => {
            ids.drain(..ids.len() - max_len);
        }
        Truncation::None => {}
    }
    ids
}

/// Cuts a pooled vector to `dimensions` and normalises it when asked. A
/// vector the engine normalised is normalised again after a cut.
fn shape_vector(mut vector: Vec<f32>, options: EmbedOptions, already_normalized: bool) -> Vec<f32> {
    let cut = options.dimensions.is_some_and(|d| d < vector.len());
    if let Some(dimensions) = options.dimensions {
        vector.truncate(dimensions);
    }
    if options.normalize && (cut || !already_normalized) {
        let norm = vector
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            for x in &mut vector {
                *x = (f64::from(*x) / norm) as f32;
            }
        }
    }
    vector
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(normalize: bool, dimensions: Option<usize>) -> EmbedOptions {
        EmbedOptions {
            truncate: None,
            direction: Truncation::Right,
            normalize,
            dimensions,
        }
    }

    #[test]
    fn dimensions_cut_first_then_normalise() {
        let v = shape_vector(vec![3.0, 4.0, 12.0], options(true, Some(2)), false);
        assert_eq!(v, vec![0.6, 0.8]);
        let raw = shape_vector(vec![3.0, 4.0, 12.0], options(false, Some(2)), false);
        assert_eq!(raw, vec![3.0, 4.0]);
        let whole = shape_vector(vec![3.0, 4.0], options(true, None), false);
        assert_eq!(whole, vec![0.6, 0.8]);
    }

    #[test]
    fn token_ids_are_cut_from_the_side_asked() {
        let ids: Vec<u32> = (0..6).collect();
        assert_eq!(cut_ids(ids.clone(), 4, Truncation::Right), vec![0, 1, 2, 3]);
        assert_eq!(cut_ids(ids.clone(), 4, Truncation::Left), vec![2, 3, 4, 5]);
        assert_eq!(cut_ids(ids.clone(), 4, Truncation::None), ids);
    }
}
