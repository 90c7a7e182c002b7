//! `Engine`: tokenizer, pinned embeddings, paged encoder layers and the batched
//! forward pass.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::{ModelSpec, Pooling};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::bindings::BindingCache;
use crate::kernels::family::KernelMode;
use crate::kernels::rotary::RotaryTables;
use crate::model::blocks::RelativeBias;
use crate::model::head::Head;
use crate::model::{Architecture, BatchBuffers, Dims, HEAD_COMPONENT, Kernels, PINNED_COMPONENT};
use crate::paging::{Pager, PagerConfig, VramBudget};
use crate::source::WeightSource;
use crate::stats::{CacheInfo, InferenceStats, PagingCounters, Timings};
use crate::tokenize::{TextTokenizer, Tokens};
use crate::weights::TensorSource;

pub use surf_transport::WEIGHTS_FILE;
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// What goes before each text to embed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompt<'a> {
    /// The model's `default_prompt_name`, or nothing.
    Default,
    /// One of the model's prompts by name (`config_sentence_transformers.json`).
    Named(&'a str),
    /// This text.
    Text(&'a str),
}

/// One embedded text.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// Token ids fed to the model, `[CLS]` and `[SEP]` included, after truncation.
    pub token_ids: Vec<u32>,
    pub vector: Vec<f32>,
}

mod batching;
use batching::batch_length;
mod builder;
mod forward;
mod in_flight;
mod rerank;
mod residency;
pub use rerank::{
    ClassifierInput, ModelKind, Prediction, ScoreOptions, activate, label_scores, rank,
};

pub use builder::{EngineBuilder, kernel_mode_from_env};

/// What one inference call needs exclusively.
struct RunState {
    workspace: Option<BatchBuffers>,
    /// The pinned weights the kernels read (position and type tables,
    /// norms); `None` while the model is idle and gave them up to another
    /// model sharing the GPU (see `residency`).
    pinned: Option<wgpu::Buffer>,
    /// The second set of activation buffers and the read-back buffers, so
    /// that a batch is submitted while the one before it runs.
    turns: in_flight::TakingTurns,
    pager: Pager,
    /// Bind groups and parameter buffers of the batches run so far; they name
    /// the activation buffers and slots, so they go when those do.
    bindings: BindingCache,
}

/// What `inference_stats` reads: kept apart from [`RunState`] so that
/// statistics stay readable while a batch runs.
#[derive(Default)]
struct StatsState {
    timings: Timings,
    paging: PagingCounters,
}

/// The word embedding table, kept on the host: a batch uploads the rows its
/// tokens use, so a table of any size works within any binding limit and
/// takes no GPU memory.
struct WordTable {
    tensors: Box<dyn TensorSource + Send + Sync>,
    name: &'static str,
    shape: [usize; 2],
}

impl WordTable {
    /// Appends the rows of `ids`, as f32.
    fn gather(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        self.tensors.gather_rows(self.name, &self.shape, ids, out)
    }

    /// Bytes of rows fetched from a weight server since the engine started.
    fn received(&self) -> u64 {
        self.tensors.bytes_received()
    }
}

/// Computes sentence embeddings (or a classifier's scores) on the GPU.
pub struct Engine {
    gpu: Gpu,
    spec: ModelSpec,
    dims: Dims,
    tokenizer: TextTokenizer,
    kernels: Kernels,
    architecture: Arc<dyn Architecture>,
    /// The packed pinned weights, kept on the host so that they can be
    /// uploaded again after the model gave its GPU copy up.
    pinned_host: Vec<u8>,
    words: WordTable,
    relative_bias: Option<RelativeBias>,
    rotary: Option<RotaryTables>,
    head: Head,
    weight_dtype: crate::dtype::WeightDtype,
    batch_size: usize,
    max_rows: usize,
    model_id: String,
    revision: Option<String>,
    state: Mutex<RunState>,
    stats: Mutex<StatsState>,
    /// GPU bytes held for weights after the last batch or change of
    /// holding, readable without waiting for a batch to end.
    vram_in_use: std::sync::atomic::AtomicU64,
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder::new()
    }

    /// Opens the model folder `dir` on the best adapter with default settings.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::builder().model_dir(dir.as_ref()).build()
    }

    fn start(
        gpu: Gpu,
        spec: ModelSpec,
        source: Arc<dyn WeightSource>,
        batch_size: usize,
        settings: PagerConfig,
        kernel_mode: KernelMode,
    ) -> Result<Self> {
        let config = &spec.config;
        let dims = config.dims();
        let mut tokenizer = TextTokenizer::from_json(
            &spec.origin.join(crate::config::TOKENIZER_FILE),
            &spec.tokenizer_json,
            spec.max_seq_length,
            dims.vocab,
        )?;
        tokenizer.set_token_types(spec.token_types);
        let dtype = settings.weight_dtype;
        let mut kernels = Kernels::new(&gpu, dtype);
        gpu.check_errors()?;
        let started = Instant::now();
        let choices = kernels.choose(&gpu, kernel_mode, &dims)?;

        let architecture = config.architecture();
        let slot_bytes = (architecture.layer_len() * dtype.size_bytes()) as u64;
        gpu.check_binding_size("a layer buffer", slot_bytes)?;
        let fetched = source.fetch(PINNED_COMPONENT)?;
        let packed = architecture.pack_pinned(fetched.tensors.as_ref(), dtype)?;
        gpu.check_binding_size("the pinned weights", packed.bytes().len() as u64)?;
        let pinned = gpu.storage_buffer_with("pinned weights", packed.bytes());
        let relative_bias = architecture.relative_bias(fetched.tensors.as_ref())?;
        let pinned_host = packed.bytes().to_vec();
        let rotary = architecture.rotary();
        let words = WordTable {
            name: architecture.word_table(fetched.tensors.as_ref()),
            tensors: fetched.tensors,
            shape: [dims.vocab, dims.hidden],
        };
        // Checks the table's shape and dtype once, before any batch.
        words.gather(&[0], &mut Vec::new())?;
        let mut fetched_bytes = fetched.bytes;
        let head = match spec.labels {
            Some(_) => {
                let component = source.fetch(HEAD_COMPONENT)?;
                fetched_bytes += component.bytes;
                Head::load(&gpu, &spec, Some(component.tensors.as_ref()), dtype)?
            }
            None => Head::load(&gpu, &spec, None, dtype)?,
        };
        let pinned_bytes = pinned_host.len() as u64 + head.bytes();
        let mut pager = Pager::new(
            gpu.clone(),
            Arc::clone(&source),
            Arc::clone(&architecture),
            slot_bytes,
            pinned_bytes,
            settings,
        )?;
        pager.counters.bytes_fetched += fetched_bytes;
        pager.counters.bytes_uploaded += pinned_bytes;

        let binding_limit = gpu
            .limits
            .max_storage_buffer_binding_size
            .min(gpu.limits.max_buffer_size);
        let row_bytes = BatchBuffers::widest_row_bytes(&dims);
        let rows_by_memory = (binding_limit / row_bytes) as usize;
        if rows_by_memory < spec.max_seq_length {
            return Err(Error::AdapterLimit {
                adapter: gpu.adapter_name().into(),
                what: "an activation buffer",
                needed: spec.max_seq_length as u64 * row_bytes,
                limit: binding_limit,
            });
        }
        let max_rows = rows_by_memory.min(batch_size * spec.max_seq_length);
        let engine = Self {
            gpu,
            spec,
            dims,
            tokenizer,
            kernels,
            architecture,
            pinned_host,
            words,
            relative_bias,
            rotary,
            head,
            weight_dtype: dtype,
            batch_size,
            max_rows,
            model_id: source.model_id(),
            revision: source.revision(),
            state: Mutex::new(RunState {
                workspace: None,
                pinned: Some(pinned),
                turns: in_flight::TakingTurns::default(),
                pager,
                bindings: BindingCache::default(),
            }),
            stats: Mutex::new(StatsState::default()),
            vram_in_use: std::sync::atomic::AtomicU64::new(0),
        };
        let mut state = engine.state()?;
        engine.prime_pipelines(&mut state)?;
        engine.note_vram(&state);
        drop(state);
        engine.gpu.save_pipeline_cache();
        tracing::info!(
            reused_choices = choices.reused,
            measured_choices = choices.measured,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "kernels chosen and compiled"
        );
        Ok(engine)
    }

    /// The run state. A panic in an earlier call poisons the lock; the state
    /// is then rebuilt on fresh buffers rather than the engine refusing
    /// every later call.
    fn state(&self) -> Result<MutexGuard<'_, RunState>> {
        match self.state.lock() {
            Ok(state) => Ok(state),
            Err(poisoned) => {
                let mut state = poisoned.into_inner();
                tracing::warn!("an earlier inference panicked; its GPU state is rebuilt");
                Self::discard_gpu_state(&mut state);
                self.state.clear_poison();
                Ok(state)
            }
        }
    }

    fn stats(&self) -> MutexGuard<'_, StatsState> {
        // Plain numbers: a panic while they were held leaves nothing half-made.
        self.stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Throws away what a failed batch may have left half-written: the
    /// activation buffers and every layer slot.
    fn discard_gpu_state(state: &mut RunState) {
        state.workspace = None;
        state.turns = in_flight::TakingTurns::default();
        state.bindings.clear();
        state.pager.reset_after_failure();
    }

    /// Bind groups made for batches since the engine started: batches of a
    /// shape already run reuse theirs, so this stops growing in a steady state.
    pub fn bind_groups_created(&self) -> Result<u64> {
        Ok(self.state()?.bindings.created())
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The model's name: the folder's, or the weight server's model id.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The weights' revision, where the source knows one.
    pub fn revision(&self) -> Option<&str> {
        self.revision.as_deref()
    }

    /// The tokenizer, usable from any thread without touching the GPU.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Whether vectors come back L2-normalised.
    pub fn normalizes(&self) -> bool {
        self.spec.normalize
    }

    /// The most texts one GPU batch holds.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Length of each output: the embedding, or a classifier's logits.
    pub fn dimension(&self) -> usize {
        self.head.dimension()
    }

    /// A sequence classifier's labels in id order; `None` for embedding
    /// models. A classifier's outputs are its raw logits, one per label.
    pub fn classifier_labels(&self) -> Option<&[String]> {
        self.spec.labels.as_deref()
    }

    /// The model's family.
    pub fn family(&self) -> crate::model::Family {
        self.spec.config.family()
    }

    pub fn pooling(&self) -> Pooling {
        self.spec.pooling
    }

    /// Embeds `texts`, returning one vector per text in input order.
    pub fn infer(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        Ok(self.embed(texts)?.into_iter().map(|e| e.vector).collect())
    }

    /// Embeds `texts`, returning token ids and vectors in input order; the
    /// model's default prompt, where it has one, goes before each text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Embedding>> {
        self.embed_with_prompt(texts, Prompt::Default)
    }

    /// The text `prompt` puts before each input, if any.
    pub fn prompt_text<'a>(&'a self, prompt: Prompt<'a>) -> Result<Option<&'a str>> {
        match prompt {
            Prompt::Default => self.spec.prompt(None),
            Prompt::Named(name) => self.spec.prompt(Some(name)),
            Prompt::Text(text) => Ok(Some(text)),
        }
    }

    /// Like `embed`, with `prompt` before each text, as sentence-transformers
    /// does: the prompt and the text are tokenized together, so the token
    /// ids include the prompt's.
    pub fn embed_with_prompt(&self, texts: &[&str], prompt: Prompt<'_>) -> Result<Vec<Embedding>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let prompted: Vec<String>;
        let texts = match self.prompt_text(prompt)? {
            Some(prefix) if !prefix.is_empty() => {
                prompted = texts.iter().map(|text| format!("{prefix}{text}")).collect();
                prompted.iter().map(String::as_str).collect()
            }
            _ => texts.to_vec(),
        };
        let texts = texts.as_slice();
        let tokens = self.tokenizer.encode(texts)?;
        let vectors = self.embed_tokens(&tokens)?;
        Ok(tokens
            .into_iter()
            .zip(vectors)
            .map(|(t, vector)| Embedding {
                token_ids: t.ids,
                vector,
            })
            .collect())
    }

    /// Token ids of `texts` as the model sees them, without running it.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        self.tokenizer.encode(texts)
    }

    /// Loads `layers` into GPU memory ahead of the first request.
    pub fn warmup(&self, layers: &[usize]) -> Result<()> {
        let mut state = self.state()?;
        for &layer in layers {
            if layer >= state.pager.layers() {
                return Err(Error::InvalidInput(format!(
                    "layer {layer} does not exist; the model has {}",
                    state.pager.layers()
                )));
            }
            state.pager.acquire(layer, &[])?;
        }
        self.gpu
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for uploads failed: {e}")))?;
        self.gpu.check_errors()
    }

    /// Sets the weight budget in MiB of GPU memory, pinned parts included.
    pub fn set_vram_budget(&self, megabytes: u64) -> Result<()> {
        self.state()?
            .pager
            .set_budget(VramBudget::Bytes(megabytes << 20))
    }

    /// Sets the weight budget in encoder layers (besides the pinned parts).
    pub fn set_cache_size(&self, layers: usize) -> Result<()> {
        self.state()?.pager.set_budget(VramBudget::Layers(layers))
    }

    /// Sets the host cache size in MiB.
    pub fn set_host_cache(&self, megabytes: u64) -> Result<()> {
        self.state()?.pager.set_host_cache_bytes(megabytes << 20);
        Ok(())
    }

    /// Sets the prefetch depth; refused when the staging it needs would not
    /// fit a budget that shares the adapter's memory.
    pub fn set_prefetch(&self, depth: usize) -> Result<()> {
        self.state()?.pager.set_prefetch(depth)
    }

    /// Drops every paged layer from GPU memory and the host cache.
    pub fn clear_cache(&self) -> Result<()> {
        self.state()?.pager.clear()
    }

    /// Latency and paging statistics; readable while a batch runs.
    pub fn inference_stats(&self) -> Result<InferenceStats> {
        // The pager's own counters when no batch holds it (warm-up and cache
        // changes move them too); the copy from the last batch otherwise.
        let live = match self.state.try_lock() {
            Ok(state) => Some(state.pager.counters),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                Some(poisoned.get_ref().pager.counters)
            }
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let mut stats = self.stats();
        if let Some(counters) = live {
            stats.paging = counters;
        }
        Ok(stats.timings.summarize(&stats.paging))
    }

    pub fn cache_info(&self) -> Result<CacheInfo> {
        let state = self.state()?;
        let pager = &state.pager;
        let mut cached_components = vec!["embeddings".to_string()];
        cached_components.extend(
            pager
                .resident_layers()
                .into_iter()
                .map(|layer| self.spec.config.layer_component(layer)),
        );
        let bytes = pager.vram_bytes();
        Ok(CacheInfo {
            cached_components,
            memory_usage_mb: bytes as f64 / (1u64 << 20) as f64,
            memory_usage_bytes: bytes,
            budget_bytes: pager.budget_bytes(),
            layer_slots: pager.capacity(),
            host_cache_bytes: pager.host_bytes(),
            host_cache_capacity_bytes: pager.host_capacity(),
            host_window_bytes: pager.host_window_bytes(),
            staging_bytes: pager.staging_bytes(),
            staging_limit_bytes: pager.staging_limit_bytes(),
            staging_in_vram: pager.staging_in_vram(),
            eviction: pager.eviction().to_string(),
            weight_dtype: pager.weight_dtype().to_string(),
            layer_bytes: pager.slot_bytes(),
            pinned_bytes: self.pinned_bytes(),
        })
    }

    /// Bytes of one encoder layer in GPU memory.
    pub fn layer_bytes(&self) -> u64 {
        (self.architecture.layer_len() * self.weight_dtype.size_bytes()) as u64
    }

    /// How the weights are held in GPU memory.
    pub fn weight_dtype(&self) -> crate::dtype::WeightDtype {
        self.weight_dtype
    }

    /// Bytes of the pinned weights in GPU memory (position and type tables,
    /// norms, the head); the word table stays on the host.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_host.len() as u64 + self.head.bytes()
    }

    /// Refuses inputs the model cannot run: empty or longer than its limit,
    /// token ids outside the vocabulary, mismatched token types.
    pub fn check_tokens(&self, inputs: &[Tokens]) -> Result<()> {
        let vocab = self.dims.vocab as u32;
        let types = self.dims.token_types() as u32;
        for (i, t) in inputs.iter().enumerate() {
            if t.ids.is_empty() || t.ids.len() > self.spec.max_seq_length {
                return Err(Error::InvalidInput(format!(
                    "input {i} has {} tokens; between 1 and {} are allowed",
                    t.ids.len(),
                    self.spec.max_seq_length
                )));
            }
            if t.ids.len() != t.type_ids.len() {
                return Err(Error::InvalidInput(format!(
                    "input {i} has mismatched token type ids"
                )));
            }
            if let Some(bad) = t.ids.iter().find(|&&id| id >= vocab) {
                return Err(Error::InvalidInput(format!(
                    "input {i} has token id {bad} outside the vocabulary"
                )));
            }
            if let Some(bad) = t.type_ids.iter().find(|&&id| id >= types) {
                return Err(Error::InvalidInput(format!(
                    "input {i} has token type {bad}"
                )));
            }
        }
        Ok(())
    }

    /// Runs already tokenized inputs, sorted by length into padded batches.
    pub fn embed_tokens(&self, inputs: &[Tokens]) -> Result<Vec<Vec<f32>>> {
        let started = Instant::now();
        self.check_tokens(inputs)?;
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].ids.len()));

        let mut results: Vec<Vec<f32>> = vec![Vec::new(); inputs.len()];
        let mut state = self.state()?;
        let outcome = self
            .ensure_pinned(&mut state)
            .and_then(|()| self.run_sorted(&mut state, inputs, &order, &mut results));
        let counters = state.pager.counters;
        if outcome.is_err() {
            Self::discard_gpu_state(&mut state);
        }
        self.note_vram(&state);
        drop(state);
        let mut stats = self.stats();
        stats.paging = counters;
        outcome?;
        stats
            .timings
            .record(started.elapsed().as_secs_f64(), inputs.len());
        Ok(results)
    }

    /// Runs `order` (input indices, longest first) in padded batches, each
    /// recorded inside its own GPU error scope: an error raised while one
    /// batch is recorded fails that batch alone, whichever engine shares the
    /// device. Each batch is submitted before the vectors of the one before
    /// it are read, so the GPU runs one while the host prepares the next.
    fn run_sorted(
        &self,
        state: &mut RunState,
        inputs: &[Tokens],
        order: &[usize],
        results: &mut [Vec<f32>],
    ) -> Result<()> {
        let mut start = 0;
        let mut previous: Option<(&[usize], in_flight::PendingVectors)> = None;
        while start < order.len() {
            let seq_len = inputs[order[start]].ids.len();
            let end = start
                + batch_length(
                    &order[start..],
                    |i| inputs[i].ids.len(),
                    self.batch_size,
                    self.max_rows,
                );
            let members = &order[start..end];
            let scope = self.gpu.error_scope();
            let submitted = self.submit_batch(state, inputs, members, seq_len);
            let scoped = scope.finish();
            let submitted = submitted?;
            scoped?;
            if let Some((members, pending)) = previous.replace((members, submitted)) {
                for (&i, v) in members.iter().zip(self.finish_batch(pending, members)?) {
                    results[i] = v;
                }
            }
            start = end;
        }
        if let Some((members, pending)) = previous {
            for (&i, v) in members.iter().zip(self.finish_batch(pending, members)?) {
                results[i] = v;
            }
        }
        Ok(())
    }
}
