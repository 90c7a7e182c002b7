//! `Engine`: tokenizer, pinned embeddings, paged encoder layers and the batched
//! forward pass.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::{ModelSpec, Pooling};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::DispatchPlan;
use crate::kernels::attention::MASKED;
use crate::kernels::bindings::BindingCache;
use crate::kernels::family::{KERNELS_ENV, KernelMode};
use crate::model::{BatchBuffers, BertEmbeddings, BertLayer, Kernels, LayerLayout, record_head};
use crate::paging::{Pager, PagerConfig, VramBudget};
use crate::source::{LocalSource, WeightSource};
use crate::stats::{CacheInfo, InferenceStats, PagingCounters, Timings};
use crate::tokenize::{TextTokenizer, Tokens};

pub use surf_transport::WEIGHTS_FILE;
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// One embedded text.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// Token ids fed to the model, `[CLS]` and `[SEP]` included, after truncation.
    pub token_ids: Vec<u32>,
    pub vector: Vec<f32>,
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    model_dir: Option<PathBuf>,
    source: Option<Arc<dyn WeightSource>>,
    batch_size: usize,
    pager: PagerConfig,
    observer: Option<crate::paging::FetchObserver>,
    gpu: Option<Gpu>,
    normalize: Option<bool>,
    kernels: Option<KernelMode>,
}

impl EngineBuilder {
    /// A folder holding `config.json`, `model.safetensors`, `tokenizer.json` and,
    /// where present, the sentence-transformers files.
    pub fn model_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.model_dir = Some(dir.into());
        self
    }

    /// Any weight source, such as a weight server (`source::RemoteSource`).
    pub fn source(mut self, source: Arc<dyn WeightSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// Largest number of texts run through the model at once.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// GPU memory for weights: unbounded (the default), bytes, or layers.
    pub fn vram_budget(mut self, budget: VramBudget) -> Self {
        self.pager.vram_budget = budget;
        self
    }

    /// Host memory for layers evicted from the GPU, in bytes.
    pub fn host_cache_bytes(mut self, bytes: u64) -> Self {
        self.pager.host_cache_bytes = bytes;
        self
    }

    /// Layers fetched and uploaded ahead of the one computing.
    pub fn prefetch(mut self, depth: usize) -> Self {
        self.pager.prefetch = depth;
        self
    }

    /// Which layer a full cache gives up: the one used farthest ahead in
    /// the pass order (the default), or the least recently used.
    pub fn eviction(mut self, eviction: crate::paging::Eviction) -> Self {
        self.pager.eviction = eviction;
        self
    }

    /// How weights are held in GPU memory: f32 (the default) or f16, which
    /// halves every layer and the embedding tables; the arithmetic stays f32.
    /// A weight source should serve the same dtype (a remote one is asked for
    /// it by its client's configuration); one that serves another is converted.
    pub fn weight_dtype(mut self, dtype: crate::dtype::WeightDtype) -> Self {
        self.pager.weight_dtype = dtype;
        self
    }

    /// Calls `observer(layer, bytes)` whenever a layer arrives from the source.
    pub fn on_layer_fetched(mut self, observer: crate::paging::FetchObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Uses an already opened device instead of choosing an adapter.
    pub fn gpu(mut self, gpu: Gpu) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// Overrides whether vectors leave the GPU L2-normalised; by default the
    /// model folder's sentence-transformers modules decide. A service that
    /// normalises per request asks for raw pooled vectors.
    pub fn normalize(mut self, normalize: bool) -> Self {
        self.normalize = Some(normalize);
        self
    }

    /// Which kernels run: measured per shape on the adapter (`Auto`) or one
    /// family everywhere. By default `SURF_KERNELS` decides, else `Auto`.
    pub fn kernels(mut self, mode: KernelMode) -> Self {
        self.kernels = Some(mode);
        self
    }

    pub fn build(self) -> Result<Engine> {
        if self.batch_size == 0 {
            return Err(Error::InvalidInput("batch size must be at least 1".into()));
        }
        let source: Arc<dyn WeightSource> = match (self.source, self.model_dir) {
            (Some(source), _) => source,
            (None, Some(dir)) => Arc::new(LocalSource::open(&dir)?),
            (None, None) => {
                return Err(Error::InvalidInput(
                    "no model folder or weight source was given".into(),
                ));
            }
        };
        let mut spec = source.spec()?;
        if let Some(normalize) = self.normalize {
            spec.normalize = normalize;
        }
        let gpu = match self.gpu {
            Some(gpu) => gpu,
            None => Gpu::new()?,
        };
        let kernels = match self.kernels {
            Some(mode) => mode,
            None => kernel_mode_from_env()?,
        };
        let engine = Engine::start(gpu, spec, source, self.batch_size, self.pager, kernels)?;
        engine.state()?.pager.set_observer(self.observer);
        Ok(engine)
    }
}

/// The kernel mode `SURF_KERNELS` asks for; `Auto` when it is unset.
pub fn kernel_mode_from_env() -> Result<KernelMode> {
    match std::env::var(KERNELS_ENV) {
        Err(_) => Ok(KernelMode::Auto),
        Ok(value) => KernelMode::parse(&value).ok_or_else(|| Error::KernelChoice {
            value,
            accepted: KernelMode::accepted(),
        }),
    }
}

/// What one inference call needs exclusively.
struct RunState {
    workspace: Option<BatchBuffers>,
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

/// Computes sentence embeddings on the GPU.
pub struct Engine {
    gpu: Gpu,
    spec: ModelSpec,
    tokenizer: TextTokenizer,
    kernels: Kernels,
    embeddings: BertEmbeddings,
    layer_layout: LayerLayout,
    weight_dtype: crate::dtype::WeightDtype,
    batch_size: usize,
    max_rows: usize,
    model_id: String,
    revision: Option<String>,
    state: Mutex<RunState>,
    stats: Mutex<StatsState>,
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            model_dir: None,
            source: None,
            batch_size: DEFAULT_BATCH_SIZE,
            pager: PagerConfig::default(),
            observer: None,
            gpu: None,
            normalize: None,
            kernels: None,
        }
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
        let tokenizer = TextTokenizer::from_json(
            &spec.origin.join(crate::config::TOKENIZER_FILE),
            &spec.tokenizer_json,
            spec.max_seq_length,
            config.vocab_size,
        )?;
        let dtype = settings.weight_dtype;
        let mut kernels = Kernels::new(&gpu, dtype);
        gpu.check_errors()?;
        let started = Instant::now();
        let choices = kernels.choose(&gpu, kernel_mode, config)?;

        let layer_layout = BertLayer::layout(config);
        let slot_bytes = (layer_layout.len * dtype.size_bytes()) as u64;
        gpu.check_binding_size("a layer buffer", slot_bytes)?;
        let fetched = source.fetch("embeddings")?;
        let embeddings = BertEmbeddings::load(&gpu, fetched.tensors.as_ref(), config, dtype)?;
        let mut pager = Pager::new(
            gpu.clone(),
            Arc::clone(&source),
            Arc::new(config.clone()),
            slot_bytes,
            embeddings.buffer_bytes(),
            settings,
        )?;
        pager.counters.bytes_fetched += fetched.bytes;
        pager.counters.bytes_uploaded += embeddings.buffer_bytes();

        let binding_limit = gpu
            .limits
            .max_storage_buffer_binding_size
            .min(gpu.limits.max_buffer_size);
        let rows_by_memory = (binding_limit / BatchBuffers::widest_row_bytes(config)) as usize;
        if rows_by_memory < spec.max_seq_length {
            return Err(Error::AdapterLimit {
                adapter: gpu.adapter_name().into(),
                what: "an activation buffer",
                needed: spec.max_seq_length as u64 * BatchBuffers::widest_row_bytes(config),
                limit: binding_limit,
            });
        }
        let max_rows = rows_by_memory.min(batch_size * spec.max_seq_length);
        let engine = Self {
            gpu,
            spec,
            tokenizer,
            kernels,
            embeddings,
            layer_layout,
            weight_dtype: dtype,
            batch_size,
            max_rows,
            model_id: source.model_id(),
            revision: source.revision(),
            state: Mutex::new(RunState {
                workspace: None,
                pager,
                bindings: BindingCache::default(),
            }),
            stats: Mutex::new(StatsState::default()),
        };
        let mut state = engine.state()?;
        engine.prime_pipelines(&mut state)?;
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

    /// Length of each embedding.
    pub fn dimension(&self) -> usize {
        self.spec.config.hidden_size
    }

    pub fn pooling(&self) -> Pooling {
        self.spec.pooling
    }

    /// Embeds `texts`, returning one vector per text in input order.
    pub fn infer(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        Ok(self.embed(texts)?.into_iter().map(|e| e.vector).collect())
    }

    /// Embeds `texts`, returning token ids and vectors in input order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Embedding>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
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
                .map(surf_transport::layer_component),
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
            pinned_bytes: self.embeddings.buffer_bytes(),
        })
    }

    /// Bytes of one encoder layer in GPU memory.
    pub fn layer_bytes(&self) -> u64 {
        (self.layer_layout.len * self.weight_dtype.size_bytes()) as u64
    }

    /// How the weights are held in GPU memory.
    pub fn weight_dtype(&self) -> crate::dtype::WeightDtype {
        self.weight_dtype
    }

    /// Bytes of the pinned weights (the embedding tables).
    pub fn pinned_bytes(&self) -> u64 {
        self.embeddings.buffer_bytes()
    }

    /// Refuses inputs the model cannot run: empty or longer than its limit,
    /// token ids outside the vocabulary, mismatched token types.
    pub fn check_tokens(&self, inputs: &[Tokens]) -> Result<()> {
        let vocab = self.spec.config.vocab_size as u32;
        let types = self.spec.config.type_vocab_size as u32;
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
        let outcome = self.run_sorted(&mut state, inputs, &order, &mut results);
        let counters = state.pager.counters;
        if outcome.is_err() {
            Self::discard_gpu_state(&mut state);
        }
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
    /// inside its own GPU error scope: an error raised while one batch is
    /// recorded fails that batch alone, whichever engine shares the device.
    fn run_sorted(
        &self,
        state: &mut RunState,
        inputs: &[Tokens],
        order: &[usize],
        results: &mut [Vec<f32>],
    ) -> Result<()> {
        let mut start = 0;
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
            let vectors = self.run_batch(state, inputs, members, seq_len);
            let scoped = scope.finish();
            let vectors = vectors?;
            scoped?;
            for (&i, v) in members.iter().zip(vectors) {
                results[i] = v;
            }
            start = end;
        }
        Ok(())
    }

    /// Records one encoder layer whose packed weights are in `weights`.
    fn record_layer(&self, plan: &mut DispatchPlan, weights: &wgpu::Buffer, batch: &BatchBuffers) {
        BertLayer::forward(
            &self.gpu,
            &self.kernels,
            plan,
            &self.spec.config,
            self.spec.activation,
            &self.layer_layout,
            weights,
            batch,
        );
    }

    /// Records pooling and, where the model asks for it, normalisation.
    fn record_head(&self, plan: &mut DispatchPlan, batch: &BatchBuffers) {
        record_head(
            &self.kernels,
            plan,
            &self.spec.config,
            self.spec.pooling,
            self.spec.normalize,
            batch,
        );
    }

    /// Sizes the activation buffers for the batch `members` of `inputs`,
    /// padded to `seq_len`, and writes its tokens and mask.
    fn load_batch(
        &self,
        state: &mut RunState,
        inputs: &[Tokens],
        members: &[usize],
        seq_len: usize,
    ) -> Result<()> {
        let config = &self.spec.config;
        let sequences = members.len();
        let rows = sequences * seq_len;
        let workspace = &mut state.workspace;
        let fits = workspace
            .as_ref()
            .is_some_and(|w| w.capacity_rows >= rows && w.capacity_sequences >= sequences);
        if !fits {
            let capacity_rows = rows.max(workspace.as_ref().map_or(0, |w| w.capacity_rows));
            let capacity_sequences =
                sequences.max(workspace.as_ref().map_or(0, |w| w.capacity_sequences));
            state.bindings.clear();
            *workspace = Some(BatchBuffers::new(
                &self.gpu,
                config,
                capacity_rows,
                capacity_sequences,
            ));
        }
        let Some(batch) = workspace.as_mut() else {
            return Err(Error::Gpu("no activation buffers".into()));
        };
        batch.rows = rows;
        batch.sequences = sequences;
        batch.seq_len = seq_len;

        let mut token_rows = vec![0u32; rows * 3];
        let mut mask = vec![MASKED; rows];
        let mut lengths = Vec::with_capacity(sequences);
        for (s, &i) in members.iter().enumerate() {
            let t = &inputs[i];
            lengths.push(t.ids.len() as u32);
            for p in 0..seq_len {
                let row = s * seq_len + p;
                let (id, type_id) = match t.ids.get(p) {
                    Some(&id) => {
                        mask[row] = 0.0;
                        (id, t.type_ids[p])
                    }
                    None => (config.pad_token_id as u32, 0),
                };
                token_rows[row * 3] = id;
                token_rows[row * 3 + 1] = p as u32;
                token_rows[row * 3 + 2] = type_id;
            }
        }
        let queue = &self.gpu.queue;
        queue.write_buffer(&batch.tokens, 0, bytemuck::cast_slice(&token_rows));
        queue.write_buffer(&batch.mask, 0, bytemuck::cast_slice(&mask));
        queue.write_buffer(&batch.lengths, 0, bytemuck::cast_slice(&lengths));
        Ok(())
    }

    /// Runs every pipeline of the graph once on short pad-token inputs,
    /// against an empty layer slot. Software adapters such as llvmpipe compile a shader
    /// on its first dispatch, not when the pipeline is made; without this the
    /// first request of every engine pays about a second of compilation.
    /// The result is thrown away, and no layer weights are needed.
    fn prime_pipelines(&self, state: &mut RunState) -> Result<()> {
        let Some(scratch) = state.pager.empty_slot_buffer() else {
            return Ok(());
        };
        // The matmul picks its tile heights from the row count; these probes
        // reach every one of them.
        let lengths = crate::kernels::matmul::PRIMING_ROWS
            .into_iter()
            .filter(|&rows| rows <= self.spec.max_seq_length);
        for rows in lengths {
            let probe = Tokens {
                ids: vec![self.spec.config.pad_token_id as u32; rows],
                type_ids: vec![0; rows],
            };
            self.load_batch(state, std::slice::from_ref(&probe), &[0], rows)?;
            let Some(batch) = state.workspace.as_ref() else {
                return Err(Error::Gpu("no activation buffers".into()));
            };
            let mut plan = DispatchPlan::new(&self.gpu);
            self.embeddings
                .forward(&self.gpu, &self.kernels, &mut plan, batch);
            self.record_layer(&mut plan, &scratch, batch);
            self.record_head(&mut plan, batch);
            plan.submit(&self.gpu);
        }
        self.gpu.wait_idle()?;
        self.gpu.check_errors()
    }

    fn run_batch(
        &self,
        state: &mut RunState,
        inputs: &[Tokens],
        members: &[usize],
        seq_len: usize,
    ) -> Result<Vec<Vec<f32>>> {
        self.load_batch(state, inputs, members, seq_len)?;
        let config = &self.spec.config;
        let sequences = members.len();
        let Some(batch) = state.workspace.as_ref() else {
            return Err(Error::Gpu("no activation buffers".into()));
        };

        let pager = &mut state.pager;
        let bindings = &mut state.bindings;
        bindings.begin_batch();
        // With every layer resident the whole batch is one submission; when
        // layers are paged, each layer is submitted on its own so that the GPU
        // computes it while the next one is fetched and uploaded.
        let paging = pager.capacity() < pager.layers();
        let mut plan = DispatchPlan::new(&self.gpu);
        let mut recorded: Vec<usize> = Vec::new();
        self.embeddings
            .forward(&self.gpu, &self.kernels, &mut plan, batch);
        // Fetches start before the embeddings are computed, the first layer
        // first, so that the weight stream never waits for the GPU.
        pager.prefetch_from(0);
        pager.begin_pass();
        for layer in 0..pager.layers() {
            pager.prefetch_from(layer);
            if !pager.is_resident(layer) && !plan.is_empty() {
                std::mem::replace(&mut plan, DispatchPlan::new(&self.gpu))
                    .submit_cached(&self.gpu, bindings);
                recorded.clear();
            }
            let weights = pager.acquire(layer, &recorded)?;
            self.record_layer(&mut plan, &weights, batch);
            recorded.push(layer);
            // While the layers ahead are resident, recording goes on into the
            // same submission: a submission per layer only pays where an
            // upload can run beside the compute.
            if paging && pager.window_needs_upload(layer) {
                std::mem::replace(&mut plan, DispatchPlan::new(&self.gpu))
                    .submit_cached(&self.gpu, bindings);
                recorded.clear();
                pager.upload_ready(layer)?;
            }
        }
        pager.end_pass();
        self.record_head(&mut plan, batch);
        plan.submit_cached(&self.gpu, bindings);

        let hidden = config.hidden_size;
        let bytes = self
            .gpu
            .read_buffer(&batch.pooled, (sequences * hidden * 4) as u64)?;
        let floats: &[f32] = bytemuck::cast_slice(&bytes);
        let vectors: Vec<Vec<f32>> = floats.chunks_exact(hidden).map(|c| c.to_vec()).collect();
        if let Some(position) = vectors
            .iter()
            .position(|v| v.iter().any(|x| !x.is_finite()))
        {
            return Err(Error::Gpu(format!(
                "the embedding of input {} is not finite",
                members[position]
            )));
        }
        Ok(vectors)
    }
}

/// How many of `sorted` (longest first) go into the next padded batch: at most
/// `batch_size` inputs and `max_rows` padded rows, and no more padding than real
/// tokens, so that one long text does not make a batch of short ones slow.
fn batch_length(
    sorted: &[usize],
    len_of: impl Fn(usize) -> usize,
    batch_size: usize,
    max_rows: usize,
) -> usize {
    let Some(&first) = sorted.first() else {
        return 0;
    };
    let seq_len = len_of(first);
    let mut real_tokens = seq_len;
    let mut count = 1;
    for &next in &sorted[1..] {
        let padded_rows = (count + 1) * seq_len;
        let tokens = real_tokens + len_of(next);
        if count == batch_size || padded_rows > max_rows || padded_rows > 2 * tokens {
            break;
        }
        real_tokens = tokens;
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::batch_length;

    fn batches(lengths: &[usize], batch_size: usize, max_rows: usize) -> Vec<usize> {
        let order: Vec<usize> = (0..lengths.len()).collect();
        let mut out = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let n = batch_length(&order[start..], |i| lengths[i], batch_size, max_rows);
            out.push(n);
            start += n;
        }
        out
    }

    #[test]
    fn batches_respect_the_batch_size() {
        assert_eq!(batches(&[10; 7], 3, 1000), vec![3, 3, 1]);
    }

    #[test]
    fn batches_respect_the_row_budget() {
        assert_eq!(batches(&[100; 5], 32, 250), vec![2, 2, 1]);
    }

    #[test]
    fn a_long_text_does_not_pad_many_short_ones() {
        assert_eq!(batches(&[256, 10, 10, 10, 10], 32, 10_000), vec![2, 3]);
    }

    #[test]
    fn similar_lengths_share_a_batch() {
        assert_eq!(batches(&[12, 11, 10, 9, 8], 32, 10_000), vec![5]);
    }
}
