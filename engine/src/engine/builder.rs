//! `EngineBuilder`: the settings of an engine, and the kernel mode `SURF_KERNELS` asks for.

use std::path::PathBuf;
use std::sync::Arc;

use super::{DEFAULT_BATCH_SIZE, Engine};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::family::{KERNELS_ENV, KernelMode};
use crate::paging::{PagerConfig, VramBudget};
use crate::source::{LocalSource, WeightSource};

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
    pub(super) fn new() -> Self {
        Self {
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
