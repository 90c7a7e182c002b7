//! `Engines`: several models on one GPU under one VRAM budget and one host
//! cache, usable without HTTP. Each model is an [`Engine`] of its own; before
//! one runs, the shared budgets ([`SharedBudget`]) decide what every model
//! may hold, and the engines give up or take GPU slots, pinned tables and
//! host-cache room accordingly. One model runs at a time.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::{Engine, EngineBuilder};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::paging::VramBudget;
use crate::paging::shared::{Holding, SharedBudget};
use crate::tokenize::Tokens;

/// One model and the name requests give it.
pub struct NamedEngine {
    pub name: String,
    pub engine: Arc<Engine>,
}

/// What every model may hold, in GPU memory and in the host cache.
struct Memory {
    vram: SharedBudget,
    host: SharedBudget,
}

/// What one model holds now, as [`Engines::residency`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Residency {
    pub name: String,
    /// GPU bytes held for weights.
    pub vram_bytes: u64,
    /// GPU bytes the shared budget lets the model hold now; `None` when
    /// the engines share no budget.
    pub granted_bytes: Option<u64>,
    pub resident_layers: usize,
    pub layers: usize,
    pub pinned_resident: bool,
    /// Bytes of the model's weights when every layer is resident.
    pub whole_bytes: u64,
}

pub struct Engines {
    models: Vec<NamedEngine>,
    default: usize,
    host_cache_bytes: u64,
    memory: Mutex<Memory>,
    /// Held while a model runs: budgets move only between runs.
    turn: Mutex<()>,
}

/// Builds [`Engines`] on one device.
pub struct EnginesBuilder {
    gpu: Option<Gpu>,
    vram_budget: Option<u64>,
    host_cache_bytes: u64,
    models: Vec<(String, EngineBuilder)>,
    default: Option<String>,
}

impl Engines {
    pub fn builder() -> EnginesBuilder {
        EnginesBuilder {
            gpu: None,
            vram_budget: None,
            host_cache_bytes: 0,
            models: Vec::new(),
            default: None,
        }
    }

    /// One engine built on its own, with its own budget, under `name`.
    pub fn single(name: impl Into<String>, engine: Arc<Engine>) -> Result<Self> {
        Self::assemble(
            vec![NamedEngine {
                name: name.into(),
                engine,
            }],
            None,
            0,
            None,
        )
    }

    fn assemble(
        models: Vec<NamedEngine>,
        vram_budget: Option<u64>,
        host_cache_bytes: u64,
        default: Option<&str>,
    ) -> Result<Self> {
        if models.is_empty() {
            return Err(Error::InvalidInput("no model was given".into()));
        }
        for (i, model) in models.iter().enumerate() {
            if model.name.is_empty() {
                return Err(Error::InvalidInput("a model name is empty".into()));
            }
            if models[..i].iter().any(|m| m.name == model.name) {
                return Err(Error::InvalidInput(format!(
                    "two models are named `{}`; give each a name of its own (NAME=DIR)",
                    model.name
                )));
            }
        }
        let memory = Self::budgets(&models, vram_budget, host_cache_bytes)?;
        let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
        let default = match default {
            None => 0,
            Some(name) => {
                names
                    .iter()
                    .position(|n| n == name)
                    .ok_or_else(|| Error::UnknownModel {
                        name: name.to_string(),
                        known: names.clone(),
                    })?
            }
        };
        let engines = Self {
            models,
            default,
            host_cache_bytes,
            memory: Mutex::new(memory),
            turn: Mutex::new(()),
        };
        if vram_budget.is_some() {
            engines.release_all()?;
        }
        Ok(engines)
    }

    /// The shared budgets over `models`: `vram` bytes of GPU memory (none:
    /// each engine keeps its own) and, with it, `host` bytes of host cache.
    fn budgets(models: &[NamedEngine], vram: Option<u64>, host: u64) -> Result<Memory> {
        let mut vram_footprints = Vec::with_capacity(models.len());
        for model in models {
            vram_footprints.push(model.engine.vram_footprint()?);
        }
        let host_footprints: Vec<_> = models.iter().map(|m| m.engine.host_footprint()).collect();
        let vram = SharedBudget::new(vram, 1, &vram_footprints).map_err(|e| {
            let to_mb = |b: u64| b.div_ceil(1 << 20);
            Error::InvalidInput(format!(
                "a VRAM budget of {} MB cannot run every model: the fixed parts of all, and the \
                 pinned weights, staging and one layer of the largest, need {} MB",
                e.budget >> 20,
                to_mb(e.needed)
            ))
        })?;
        let host = SharedBudget::new(vram.budget().map(|_| host), 0, &host_footprints)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        Ok(Memory { vram, host })
    }

    /// Has every engine give up its GPU memory and host cache: nothing is
    /// held until a model runs.
    fn release_all(&self) -> Result<()> {
        for model in &self.models {
            model.engine.hold(Holding::default())?;
            model.engine.set_host_layers(0)?;
        }
        Ok(())
    }

    /// Sets one VRAM budget in bytes for every model together (`None`:
    /// each engine keeps its own from then on); every model gives up what
    /// it holds and takes its share again when it next runs. Request
    /// history starts afresh.
    pub fn set_vram_budget(&self, bytes: Option<u64>) -> Result<()> {
        let _turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        let memory = Self::budgets(&self.models, bytes, self.host_cache_bytes)?;
        *self.memory() = memory;
        if bytes.is_some() {
            self.release_all()?;
        }
        Ok(())
    }

    /// The models in the order given.
    pub fn models(&self) -> &[NamedEngine] {
        &self.models
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    pub fn names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }

    /// The model requests that name none go to.
    pub fn default_index(&self) -> usize {
        self.default
    }

    pub fn engine(&self, model: usize) -> &Arc<Engine> {
        &self.models[model].engine
    }

    pub fn name(&self, model: usize) -> &str {
        &self.models[model].name
    }

    /// The index of the model `name`, or an error listing the names.
    pub fn index(&self, name: &str) -> Result<usize> {
        self.models
            .iter()
            .position(|m| m.name == name)
            .ok_or_else(|| Error::UnknownModel {
                name: name.to_string(),
                known: self.names(),
            })
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        // Plain numbers: a panic while they were held leaves nothing half-made.
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a request to `model`, which raises its value when memory is
    /// shared out.
    pub fn record_request(&self, model: usize) {
        let mut memory = self.memory();
        memory.vram.record_request(model);
        memory.host.record_request(model);
    }

    /// The shared VRAM budget in bytes; `None` when the engines share none.
    pub fn vram_budget(&self) -> Option<u64> {
        self.memory().vram.budget()
    }

    /// GPU bytes the shared budget lets `model` hold now; `None` without one.
    /// Never waits for a batch.
    pub fn granted_bytes(&self, model: usize) -> Option<u64> {
        let memory = self.memory();
        memory.vram.budget().map(|_| memory.vram.held_bytes(model))
    }

    /// GPU bytes every model holds for weights now.
    pub fn vram_in_use(&self) -> u64 {
        self.models.iter().map(|m| m.engine.vram_in_use()).sum()
    }

    /// Share of `model`'s weights in GPU memory, 0 when it cannot be read.
    pub fn resident_share(&self, model: usize) -> f64 {
        self.models[model].engine.resident_share().unwrap_or(0.0)
    }

    /// What each model holds now.
    pub fn residency(&self) -> Result<Vec<Residency>> {
        // Read before any engine is waited on: submitters need this lock.
        let granted: Vec<Option<u64>> = (0..self.models.len())
            .map(|model| self.granted_bytes(model))
            .collect();
        let mut out = Vec::with_capacity(self.models.len());
        for (model, granted_bytes) in self.models.iter().zip(granted) {
            let footprint = model.engine.vram_footprint()?;
            out.push(Residency {
                name: model.name.clone(),
                vram_bytes: model.engine.vram_in_use(),
                granted_bytes,
                resident_layers: model.engine.resident_layer_count()?,
                layers: footprint.layers,
                pinned_resident: model.engine.pinned_resident()?,
                whole_bytes: footprint.whole_bytes(),
            });
        }
        Ok(out)
    }

    /// Runs tokenized inputs on `model`, after making room for it.
    pub fn run(&self, model: usize, inputs: &[Tokens]) -> Result<Vec<Vec<f32>>> {
        let _turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        self.make_room(model)?;
        self.models[model].engine.embed_tokens(inputs)
    }

    /// Embeds `texts` with the model `name`, one vector per text in order.
    pub fn embed(&self, name: &str, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let model = self.index(name)?;
        self.record_request(model);
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let tokens = self.models[model].engine.tokenizer().encode(texts)?;
        self.run(model, &tokens)
    }

    /// Has the engines give up and take memory as the shared budgets plan.
    fn make_room(&self, model: usize) -> Result<()> {
        let (vram, host) = {
            let mut memory = self.memory();
            (memory.vram.plan_run(model), memory.host.plan_run(model))
        };
        for change in vram {
            self.models[change.model].engine.hold(change.holding)?;
        }
        for change in host {
            self.models[change.model]
                .engine
                .set_host_layers(change.holding.layers)?;
        }
        Ok(())
    }
}

impl EnginesBuilder {
    /// Uses an already opened device instead of choosing an adapter.
    pub fn gpu(mut self, gpu: Gpu) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// GPU memory for every model's weights together, in bytes; unset, each
    /// engine keeps the budget its builder gives it.
    pub fn vram_budget_bytes(mut self, bytes: u64) -> Self {
        self.vram_budget = Some(bytes);
        self
    }

    /// Host memory for layers evicted from the GPU, for every model
    /// together (used with a VRAM budget).
    pub fn host_cache_bytes(mut self, bytes: u64) -> Self {
        self.host_cache_bytes = bytes;
        self
    }

    /// Adds a model under `name`, built by `builder` on the shared device.
    pub fn model(mut self, name: impl Into<String>, builder: EngineBuilder) -> Self {
        self.models.push((name.into(), builder));
        self
    }

    /// The model requests that name none go to; the first by default.
    pub fn default_model(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }

    pub fn build(self) -> Result<Engines> {
        let gpu = match self.gpu {
            Some(gpu) => gpu,
            None => Gpu::new()?,
        };
        let mut models = Vec::with_capacity(self.models.len());
        for (name, builder) in self.models {
            let mut builder = builder.gpu(gpu.clone());
            if self.vram_budget.is_some() {
                // The shared budget sets each model's slots before it runs;
                // a start-up holds one.
                builder = builder
                    .vram_budget(VramBudget::Layers(1))
                    .host_cache_bytes(0);
            }
            let engine = builder.build()?;
            if self.vram_budget.is_some() {
                // Given up at once, so that start-up holds one model at a time.
                engine.hold(Holding::default())?;
            }
            models.push(NamedEngine {
                name,
                engine: Arc::new(engine),
            });
        }
        Engines::assemble(
            models,
            self.vram_budget,
            self.host_cache_bytes,
            self.default.as_deref(),
        )
    }
}
