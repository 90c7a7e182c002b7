//! The VRAM pager: encoder layers live in fixed-size GPU slots under a budget,
//! with a host-memory cache behind them and background fetches ahead of use.
//! Every decision comes from the plain state machines beside it
//! ([`policy::PagePolicy`] for GPU slots, [`host_policy::HostPolicy`] for the
//! host cache, [`watch::HitRateWatch`] for the low-hit-rate warning); this
//! module carries them out on the GPU and the weight source.

pub mod host_policy;
pub mod policy;
pub mod schedule;
pub mod shared;
pub mod watch;

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};

use crate::dtype::WeightDtype;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::{Architecture, PackedWeights};
use crate::source::WeightSource;
use crate::stats::PagingCounters;
use host_policy::{Admission, HostPolicy};
use policy::{PagePolicy, Placement};
pub use schedule::{Eviction, UnknownEviction};
use watch::HitRateWatch;

/// How much GPU memory the weights may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VramBudget {
    /// Every layer resident.
    Unbounded,
    /// Bytes for all weights, pinned parts included.
    Bytes(u64),
    /// A number of encoder layers, besides the pinned parts.
    Layers(usize),
}

/// Settings of the pager.
#[derive(Debug, Clone, Copy)]
pub struct PagerConfig {
    pub vram_budget: VramBudget,
    pub host_cache_bytes: u64,
    /// Layers fetched ahead of the one running.
    pub prefetch: usize,
    /// Which layer a full cache gives up, in GPU memory and in the host cache.
    pub eviction: Eviction,
    /// How layers are packed, fetched and held: f16 halves every slot.
    pub weight_dtype: WeightDtype,
}

impl Default for PagerConfig {
    fn default() -> Self {
        Self {
            vram_budget: VramBudget::Unbounded,
            host_cache_bytes: 0,
            prefetch: 2,
            eviction: Eviction::default(),
            weight_dtype: WeightDtype::default(),
        }
    }
}

type PackedLayer = Arc<PackedWeights>;

/// Called with (layer, bytes received) each time a layer arrives from the
/// weight source; the command line drives its progress bar with it.
pub type FetchObserver = Arc<dyn Fn(usize, u64) + Send + Sync>;

type FetchResult = Result<(PackedLayer, u64)>;

/// A layer being fetched and packed on the fetch thread.
struct PendingFetch {
    result: Receiver<FetchResult>,
}

/// A request to the fetch thread.
struct FetchJob {
    layer: usize,
    reply: Sender<FetchResult>,
}

pub struct Pager {
    gpu: Gpu,
    source: Arc<dyn WeightSource>,
    architecture: Arc<dyn Architecture>,
    /// Bytes of one packed layer, the size of every slot.
    slot_bytes: u64,
    pinned_bytes: u64,
    budget: VramBudget,
    policy: PagePolicy,
    slots: Vec<Option<wgpu::Buffer>>,
    host: HashMap<usize, PackedLayer>,
    host_policy: HostPolicy,
    host_capacity: u64,
    pending: HashMap<usize, PendingFetch>,
    /// Queue of the fetch thread, which fetches and packs one layer at a time
    /// in the order asked. One stream in order beats several at once: the
    /// layer needed next arrives first instead of sharing the link with the
    /// ones after it.
    fetch_queue: Sender<FetchJob>,
    /// Set when the pager is dropped, so that the fetch thread skips the jobs
    /// still queued instead of fetching layers nobody will use.
    fetch_stop: Arc<AtomicBool>,
    /// Fetched layers that found no slot yet and no room in the host cache.
    /// Only layers of the prefetch window land here, so it holds at most
    /// `prefetch` layers.
    arrived: HashMap<usize, PackedLayer>,
    /// Layers put in the host cache by a fetch and not yet used from it.
    unused_fetches: HashSet<usize>,
    prefetch: usize,
    weight_dtype: WeightDtype,
    staging: Staging,
    observer: Option<FetchObserver>,
    /// Policy counters and upload bytes when the running pass began.
    pass_start: Option<(policy::PolicyCounters, u64, u64)>,
    watch: HitRateWatch,
    pub counters: PagingCounters,
}

/// The upload path's staging memory: chunks of one layer each, at most
/// `limit` of them, because an upload waits for the oldest one still in
/// flight before it takes another chunk.
struct Staging {
    belt: wgpu::util::StagingBelt,
    in_flight: VecDeque<wgpu::SubmissionIndex>,
    limit: usize,
    /// Chunks the belt has allocated: the most uploads ever in flight at once.
    chunks: usize,
}

impl Staging {
    fn new(gpu: &Gpu, slot_bytes: u64, prefetch: usize) -> Self {
        Self {
            belt: wgpu::util::StagingBelt::new(gpu.device.clone(), slot_bytes.max(4)),
            in_flight: VecDeque::new(),
            limit: staging_chunks(prefetch),
            chunks: 0,
        }
    }
}

/// Staging chunks an upload path with prefetch depth `prefetch` keeps: the
/// upload of layer `i + d`, made while layer `i` computes, reuses the chunk of
/// the upload `d` steps back, which the GPU finished before computing `i`.
pub fn staging_chunks(prefetch: usize) -> usize {
    prefetch.max(1)
}

impl Pager {
    pub fn new(
        gpu: Gpu,
        source: Arc<dyn WeightSource>,
        architecture: Arc<dyn Architecture>,
        slot_bytes: u64,
        pinned_bytes: u64,
        settings: PagerConfig,
    ) -> Result<Self> {
        let layers = architecture.config().num_layers();
        let staging_in_budget = staging_in_budget(&gpu, settings.prefetch, slot_bytes);
        let capacity = slots_for(
            settings.vram_budget,
            layers,
            slot_bytes,
            pinned_bytes,
            staging_in_budget,
            settings.weight_dtype,
        )?;
        let staging = Staging::new(&gpu, slot_bytes, settings.prefetch);
        let fetch_stop = Arc::new(AtomicBool::new(false));
        let fetch_queue = spawn_fetch_thread(
            Arc::clone(&source),
            Arc::clone(&architecture),
            settings.weight_dtype,
            Arc::clone(&fetch_stop),
        )?;
        Ok(Self {
            gpu,
            source,
            architecture,
            slot_bytes,
            pinned_bytes,
            budget: settings.vram_budget,
            policy: PagePolicy::new(layers, capacity, settings.eviction),
            slots: vec![None; capacity],
            host: HashMap::new(),
            host_policy: HostPolicy::new(
                layers,
                host_layers(settings.host_cache_bytes, slot_bytes),
                settings.eviction,
            ),
            host_capacity: settings.host_cache_bytes,
            pending: HashMap::new(),
            fetch_queue,
            fetch_stop,
            arrived: HashMap::new(),
            unused_fetches: HashSet::new(),
            prefetch: settings.prefetch,
            weight_dtype: settings.weight_dtype,
            staging,
            observer: None,
            pass_start: None,
            watch: HitRateWatch::default(),
            counters: PagingCounters::default(),
        })
    }

    pub fn layers(&self) -> usize {
        self.policy.layers()
    }

    pub fn set_observer(&mut self, observer: Option<FetchObserver>) {
        self.observer = observer;
    }

    pub fn capacity(&self) -> usize {
        self.policy.capacity()
    }

    pub fn budget(&self) -> VramBudget {
        self.budget
    }

    pub fn eviction(&self) -> Eviction {
        self.policy.eviction()
    }

    /// The element type of the layers the pager holds.
    pub fn weight_dtype(&self) -> WeightDtype {
        self.weight_dtype
    }

    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// Bytes of staging memory the upload path holds now.
    pub fn staging_bytes(&self) -> u64 {
        self.staging.chunks as u64 * self.slot_bytes
    }

    /// The most staging memory the upload path can hold.
    pub fn staging_limit_bytes(&self) -> u64 {
        self.staging.limit as u64 * self.slot_bytes
    }

    /// Whether staging memory is device memory here, and so inside the budget.
    pub fn staging_in_vram(&self) -> bool {
        shares_memory(&self.gpu)
    }

    /// GPU bytes held for weights: pinned parts, allocated slots, and the
    /// staging chunks where the adapter's memory is the host's.
    pub fn vram_bytes(&self) -> u64 {
        let staging = if self.staging_in_vram() {
            self.staging_bytes()
        } else {
            0
        };
        self.pinned_bytes + self.slots.iter().flatten().count() as u64 * self.slot_bytes + staging
    }

    pub fn budget_bytes(&self) -> Option<u64> {
        match self.budget {
            VramBudget::Unbounded => None,
            VramBudget::Bytes(b) => Some(b),
            VramBudget::Layers(n) => Some(
                self.pinned_bytes
                    + n as u64 * self.slot_bytes
                    + staging_in_budget(&self.gpu, self.prefetch, self.slot_bytes),
            ),
        }
    }

    /// Bytes in the host cache.
    pub fn host_bytes(&self) -> u64 {
        self.host.len() as u64 * self.slot_bytes
    }

    pub fn host_capacity(&self) -> u64 {
        self.host_capacity
    }

    /// Host bytes held outside the host cache for the prefetch window:
    /// layers parked until a slot frees, and fetches in flight or finished
    /// and not yet taken (counted whole, as the most they can hold).
    pub fn host_window_bytes(&self) -> u64 {
        (self.arrived.len() + self.pending.len()) as u64 * self.slot_bytes
    }

    pub fn resident_layers(&self) -> Vec<usize> {
        self.policy.resident_layers()
    }

    /// Changes the budget. Shrinking keeps the layers the policy values most,
    /// copying those held past the new capacity into the slots that remain,
    /// and frees the rest.
    pub fn set_budget(&mut self, budget: VramBudget) -> Result<()> {
        let capacity = slots_for(
            budget,
            self.layers(),
            self.slot_bytes,
            self.pinned_bytes,
            staging_in_budget(&self.gpu, self.prefetch, self.slot_bytes),
            self.weight_dtype,
        )?;
        let plan = self.policy.resize(capacity);
        if !plan.moves.is_empty() {
            let mut encoder =
                self.gpu
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("slot moves"),
                    });
            for step in &plan.moves {
                let from = self.slots[step.from].clone().ok_or_else(|| {
                    Error::Gpu(format!("slot {} has no buffer to move", step.from))
                })?;
                let to = self.slot_buffer(step.to);
                encoder.copy_buffer_to_buffer(&from, 0, &to, 0, self.slot_bytes);
            }
            self.gpu.queue.submit([encoder.finish()]);
        }
        // Buffers past the new capacity are dropped; wgpu frees them once the
        // copies out of them have run.
        self.slots.resize(capacity, None);
        self.budget = budget;
        self.watch.reset();
        self.sync_counters();
        Ok(())
    }

    pub fn set_host_cache_bytes(&mut self, bytes: u64) {
        self.host_capacity = bytes;
        let dropped = self
            .host_policy
            .resize(host_layers(bytes, self.slot_bytes), self.policy.cursor());
        for layer in dropped {
            self.drop_host(layer);
        }
    }

    pub fn set_prefetch(&mut self, depth: usize) -> Result<()> {
        if shares_memory(&self.gpu) && matches!(self.budget, VramBudget::Bytes(_)) {
            // The staging area grows with the depth and shares the budget.
            slots_for(
                self.budget,
                self.layers(),
                self.slot_bytes,
                self.pinned_bytes,
                staging_in_budget(&self.gpu, depth, self.slot_bytes),
                self.weight_dtype,
            )?;
        }
        self.prefetch = depth;
        self.staging.limit = staging_chunks(depth);
        if self.staging.chunks > self.staging.limit {
            self.wait_uploads()?;
            self.staging = Staging::new(&self.gpu, self.slot_bytes, depth);
        }
        self.set_budget(self.budget)
    }

    /// Empties GPU slots (their buffers are freed), the staging chunks and
    /// the host cache.
    pub fn clear(&mut self) -> Result<()> {
        self.policy.clear();
        for slot in &mut self.slots {
            *slot = None;
        }
        self.host.clear();
        self.host_policy.clear();
        self.arrived.clear();
        self.unused_fetches.clear();
        self.wait_uploads()?;
        self.staging = Staging::new(&self.gpu, self.slot_bytes, self.prefetch);
        Ok(())
    }

    /// Frees every slot buffer and the staging chunks, keeping the host
    /// cache and the fetches in flight: what a model gives up when another
    /// needs the GPU memory it holds. The capacity stays; the slots are
    /// allocated again as layers are placed.
    pub fn release_slots(&mut self) -> Result<()> {
        self.policy.clear();
        for slot in &mut self.slots {
            *slot = None;
        }
        self.arrived.clear();
        self.wait_uploads()?;
        self.staging = Staging::new(&self.gpu, self.slot_bytes, self.prefetch);
        self.sync_counters();
        Ok(())
    }

    /// Sets the bytes of pinned weights the GPU holds beside the slots, when
    /// the engine gives its pinned tables up or uploads them again.
    pub fn set_pinned_bytes(&mut self, bytes: u64) {
        self.pinned_bytes = bytes;
    }

    /// Layers in host memory for this pager: the host cache and what the
    /// prefetch window parked.
    pub fn host_layers_held(&self) -> usize {
        self.host.len()
    }

    /// Forgets every layer in GPU memory and frees the slot buffers, and
    /// drops the fetches in flight, keeping the host cache. After a failed
    /// batch the slots may hold half-written uploads and a queued fetch may
    /// hold the failure itself; the next batch loads into fresh buffers and
    /// asks the source again instead of trusting either.
    pub fn reset_after_failure(&mut self) {
        self.policy.clear();
        for slot in &mut self.slots {
            *slot = None;
        }
        for (layer, _) in self.pending.drain() {
            self.policy.fetch_finished(layer);
        }
        self.pass_start = None;
        self.staging = Staging::new(&self.gpu, self.slot_bytes, self.prefetch);
    }

    /// Marks the start of a forward pass, for the per-pass counters.
    pub fn begin_pass(&mut self) {
        self.pass_start = Some((
            self.policy.counters,
            self.counters.uploads,
            self.counters.bytes_uploaded,
        ));
    }

    /// Marks the end of a forward pass: per-pass counters, and one warning
    /// when the budget keeps the hit rate low pass after pass.
    pub fn end_pass(&mut self) {
        let Some((start, uploads, bytes)) = self.pass_start.take() else {
            return;
        };
        let now = self.policy.counters;
        let pass_uploads = self.counters.uploads - uploads;
        let pass_bytes = self.counters.bytes_uploaded - bytes;
        self.counters.passes += 1;
        self.counters.pass_uploads += pass_uploads;
        self.counters.pass_bytes_uploaded += pass_bytes;
        self.counters.last_pass_uploads = pass_uploads;
        self.counters.last_pass_bytes_uploaded = pass_bytes;
        if self.capacity() >= self.layers() {
            return;
        }
        if let Some(rate) = self
            .watch
            .end_pass(now.hits - start.hits, now.misses - start.misses)
        {
            self.warn_low_hit_rate(rate, pass_uploads);
        }
    }

    fn warn_low_hit_rate(&self, rate: f64, pass_uploads: u64) {
        let mb = |bytes: u64| bytes.div_ceil(1 << 20);
        let staging = staging_in_budget(&self.gpu, self.prefetch, self.slot_bytes);
        let resident = self.pinned_bytes + self.layers() as u64 * self.slot_bytes + staging;
        let advice = match self.eviction() {
            Eviction::Optimal => format!(
                "each further {} MB of budget keeps one more layer resident and saves its upload on every pass",
                mb(self.slot_bytes)
            ),
            Eviction::Lru => {
                "with LRU eviction a budget smaller than the model uploads every layer \
                 on every pass; the default optimal eviction keeps most of the budget resident"
                    .to_string()
            }
        };
        tracing::warn!(
            "the GPU hit rate has been {rate:.2} over the last {} passes ({pass_uploads} of {} layers uploaded in the last one) \
             with room for {} layers; a budget of {} MB keeps the whole model resident, and {advice}",
            watch::WATCH_PASSES,
            self.layers(),
            self.capacity(),
            mb(resident),
        );
    }

    /// Queues fetches of `current`, when it is not at hand, and of the
    /// layers that follow it up to the prefetch depth.
    pub fn prefetch_from(&mut self, current: usize) {
        if current < self.layers() && !self.policy.is_resident(current) {
            self.start_fetch(current);
        }
        for layer in self.policy.prefetch_candidates(current, self.prefetch) {
            self.start_fetch(layer);
        }
    }

    fn start_fetch(&mut self, layer: usize) {
        let at_hand = self.host.contains_key(&layer) || self.arrived.contains_key(&layer);
        if at_hand || self.pending.contains_key(&layer) {
            return;
        }
        let (reply, result) = channel();
        if self.fetch_queue.send(FetchJob { layer, reply }).is_err() {
            // The fetch thread is gone; `host_layer` fetches on this thread.
            tracing::warn!("the fetch thread has stopped; layer {layer} is fetched on demand");
            return;
        }
        self.policy.fetch_started(layer);
        self.pending.insert(layer, PendingFetch { result });
    }

    /// The buffer of a slot while no layer has been placed yet, to run the
    /// pipelines once against; `None` once any layer is resident.
    pub fn empty_slot_buffer(&mut self) -> Option<wgpu::Buffer> {
        if !self.policy.resident_layers().is_empty() || self.slots.is_empty() {
            return None;
        }
        Some(self.slot_buffer(0))
    }

    /// Bytes of `layer` already in host memory (the host cache or parked),
    /// without waiting for anything.
    fn at_hand(&mut self, layer: usize) -> Option<PackedLayer> {
        if let Some(packed) = self.host.get(&layer) {
            let packed = Arc::clone(packed);
            // A layer fetched ahead and not used yet was a miss, counted when it arrived.
            if !self.unused_fetches.remove(&layer) {
                self.counters.host_hits += 1;
            }
            self.host_policy.touch(layer);
            return Some(packed);
        }
        self.arrived.remove(&layer)
    }

    /// Host bytes of `layer`: from host memory, a fetch in flight, or the source.
    fn host_layer(&mut self, layer: usize) -> Result<PackedLayer> {
        if let Some(packed) = self.at_hand(layer) {
            return Ok(packed);
        }
        let (packed, bytes) = match self.pending.remove(&layer) {
            Some(pending) => {
                let outcome = match pending.result.try_recv() {
                    Ok(result) => {
                        self.counters.prefetches_in_time += 1;
                        result
                    }
                    Err(TryRecvError::Empty) => {
                        self.counters.prefetches_late += 1;
                        pending.result.recv().map_err(|_| {
                            Error::WeightSource(format!("the fetch of layer {layer} died"))
                        })?
                    }
                    Err(TryRecvError::Disconnected) => Err(Error::WeightSource(format!(
                        "the fetch of layer {layer} died"
                    ))),
                };
                self.policy.fetch_finished(layer);
                outcome?
            }
            None => fetch_layer(
                self.source.as_ref(),
                self.architecture.as_ref(),
                self.weight_dtype,
                layer,
            )?,
        };
        self.accept_fetched(layer, &packed, bytes)?;
        // Used right away, so later reads from the host cache are real hits.
        self.unused_fetches.remove(&layer);
        Ok(packed)
    }

    /// Counts a finished fetch and keeps its bytes in the host cache when
    /// the host policy wants them there. Returns whether it did.
    fn accept_fetched(&mut self, layer: usize, packed: &PackedLayer, bytes: u64) -> Result<bool> {
        self.counters.fetches += 1;
        self.counters.host_misses += 1;
        self.counters.bytes_fetched += bytes;
        if let Some(observer) = &self.observer {
            observer(layer, bytes);
        }
        if packed.bytes().len() as u64 != self.slot_bytes {
            return Err(Error::WeightSource(format!(
                "layer {layer} packs to {} bytes, other layers to {}",
                packed.bytes().len(),
                self.slot_bytes
            )));
        }
        match self.host_policy.admit(layer, self.policy.cursor()) {
            Admission::Skip => Ok(false),
            Admission::Keep { evicted } => {
                for old in evicted {
                    self.drop_host(old);
                }
                self.host.insert(layer, Arc::clone(packed));
                self.unused_fetches.insert(layer);
                Ok(true)
            }
        }
    }

    fn drop_host(&mut self, layer: usize) {
        self.host.remove(&layer);
        self.host_policy.remove(layer);
        self.unused_fetches.remove(&layer);
    }

    fn slot_buffer(&mut self, slot: usize) -> wgpu::Buffer {
        match &self.slots[slot] {
            Some(buffer) => buffer.clone(),
            None => {
                let buffer = self
                    .gpu
                    .storage_buffer(&format!("layer slot {slot}"), self.slot_bytes);
                self.slots[slot] = Some(buffer.clone());
                buffer
            }
        }
    }

    pub fn is_resident(&self, layer: usize) -> bool {
        self.policy.is_resident(layer)
    }

    /// Makes `layer` resident and returns its buffer. Work already submitted
    /// to the queue runs before any upload recorded here, so a slot whose
    /// previous layer is still being computed may be overwritten safely;
    /// `protected` layers (recorded but not yet submitted) are never evicted.
    pub fn acquire(&mut self, layer: usize, protected: &[usize]) -> Result<wgpu::Buffer> {
        if self.policy.is_resident(layer) {
            let placement = self.policy.use_layer(layer, protected);
            self.sync_counters();
            if let Some(Placement::Resident { slot }) = placement
                && let Some(buffer) = &self.slots[slot]
            {
                return Ok(buffer.clone());
            }
            return Err(Error::Gpu(format!(
                "layer {layer} is resident but has no buffer"
            )));
        }
        let packed = self.host_layer(layer)?;
        let placement = self.policy.use_layer(layer, protected).ok_or_else(|| {
            Error::Gpu(format!(
                "no slot can take layer {layer}: every slot is in use"
            ))
        })?;
        self.sync_counters();
        let Placement::Load { slot, .. } = placement else {
            return Err(Error::Gpu(format!("layer {layer} was placed twice")));
        };
        let buffer = self.slot_buffer(slot);
        self.upload(&buffer, &packed)?;
        Ok(buffer)
    }

    /// Whether a layer of the prefetch window after `current` is missing from
    /// GPU memory, so that uploading ahead has something to do.
    pub fn window_needs_upload(&self, current: usize) -> bool {
        let layers = self.layers();
        (1..=self.prefetch.max(1).min(layers.saturating_sub(1)))
            .any(|a| !self.policy.is_resident((current + a) % layers))
    }

    /// Uploads the layers following `current` whose bytes are at hand, when
    /// the policy finds them a slot, so that they are in VRAM before they are
    /// needed. A layer the policy does not place now waits in host memory.
    pub fn upload_ready(&mut self, current: usize) -> Result<()> {
        let ahead: Vec<usize> = (1..=self.prefetch.min(self.layers().saturating_sub(1)))
            .map(|a| (current + a) % self.layers())
            .collect();
        // Keep the current layer and the other upcoming ones.
        let mut protected: Vec<usize> = ahead.clone();
        protected.push(current);
        for &layer in &ahead {
            if self.policy.is_resident(layer) {
                continue;
            }
            let arrived = self
                .pending
                .get(&layer)
                .and_then(|p| p.result.try_recv().ok());
            let packed = match arrived {
                Some(result) => {
                    self.pending.remove(&layer);
                    self.policy.fetch_finished(layer);
                    let (packed, bytes) = result?;
                    self.counters.prefetches_in_time += 1;
                    self.accept_fetched(layer, &packed, bytes)?;
                    packed
                }
                None => {
                    if !self.host.contains_key(&layer) && !self.arrived.contains_key(&layer) {
                        continue;
                    }
                    match self.at_hand(layer) {
                        Some(packed) => packed,
                        None => continue,
                    }
                }
            };
            match self.policy.place_ahead(layer, &protected) {
                Some(Placement::Load { slot, .. }) => {
                    self.sync_counters();
                    self.unused_fetches.remove(&layer);
                    let buffer = self.slot_buffer(slot);
                    self.upload(&buffer, &packed)?;
                }
                Some(Placement::Resident { .. }) => {}
                None => {
                    if !self.host.contains_key(&layer) {
                        self.arrived.insert(layer, packed);
                    }
                }
            }
        }
        Ok(())
    }

    fn upload(&mut self, buffer: &wgpu::Buffer, packed: &PackedWeights) -> Result<()> {
        let bytes = packed.bytes();
        let size = NonZeroU64::new(bytes.len() as u64)
            .ok_or_else(|| Error::Gpu("an empty layer cannot be uploaded".into()))?;
        // Taking a chunk beyond the limit would make the belt allocate a new
        // one; wait for the oldest upload instead, whose chunk then returns.
        while self.staging.in_flight.len() >= self.staging.limit {
            let Some(oldest) = self.staging.in_flight.pop_front() else {
                break;
            };
            self.gpu
                .device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(oldest),
                    timeout: None,
                })
                .map_err(|e| Error::Gpu(format!("waiting for an upload failed: {e}")))?;
        }
        let mut encoder = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("upload"),
            });
        {
            let mut view = self
                .staging
                .belt
                .write_buffer(&mut encoder, buffer, 0, size);
            view.copy_from_slice(bytes);
        }
        self.staging.belt.finish();
        let index = self.gpu.queue.submit([encoder.finish()]);
        self.staging.belt.recall();
        self.staging.in_flight.push_back(index);
        self.staging.chunks = self.staging.chunks.max(self.staging.in_flight.len());
        self.counters.bytes_uploaded += bytes.len() as u64;
        self.counters.uploads += 1;
        Ok(())
    }

    /// Waits until every upload has run, so that staging chunks can go.
    fn wait_uploads(&mut self) -> Result<()> {
        if let Some(last) = self.staging.in_flight.pop_back() {
            self.staging.in_flight.clear();
            self.gpu
                .device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(last),
                    timeout: None,
                })
                .map_err(|e| Error::Gpu(format!("waiting for uploads failed: {e}")))?;
        }
        Ok(())
    }

    fn sync_counters(&mut self) {
        let c = self.policy.counters;
        self.counters.vram_hits = c.hits;
        self.counters.vram_misses = c.misses;
        self.counters.evictions = c.evictions;
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.fetch_stop.store(true, Ordering::Relaxed);
    }
}

fn spawn_fetch_thread(
    source: Arc<dyn WeightSource>,
    architecture: Arc<dyn Architecture>,
    dtype: WeightDtype,
    stop: Arc<AtomicBool>,
) -> Result<Sender<FetchJob>> {
    let (queue, jobs) = channel::<FetchJob>();
    std::thread::Builder::new()
        .name("surf-fetch".into())
        .spawn(move || {
            // Ends when the pager, and with it the queue's sender, is dropped.
            for job in jobs {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let result = fetch_layer(source.as_ref(), architecture.as_ref(), dtype, job.layer);
                // The pager may have stopped waiting; then nobody wants the layer.
                let _ = job.reply.send(result);
            }
        })
        .map_err(|e| Error::WeightSource(format!("cannot start the fetch thread: {e}")))?;
    Ok(queue)
}

fn fetch_layer(
    source: &dyn WeightSource,
    architecture: &dyn Architecture,
    dtype: WeightDtype,
    layer: usize,
) -> Result<(PackedLayer, u64)> {
    let component = source.fetch(&architecture.config().layer_component(layer))?;
    let packed = architecture.pack_layer(component.tensors.as_ref(), layer, dtype)?;
    Ok((Arc::new(packed), component.bytes))
}

/// Whether the adapter's memory is the host's (a CPU or integrated GPU), so
/// that staging buffers take from the same memory as the layer slots.
fn shares_memory(gpu: &Gpu) -> bool {
    matches!(
        gpu.device_type(),
        wgpu::DeviceType::Cpu | wgpu::DeviceType::IntegratedGpu
    )
}

/// Staging bytes that count against a VRAM budget on this adapter.
fn staging_in_budget(gpu: &Gpu, prefetch: usize, slot_bytes: u64) -> u64 {
    if shares_memory(gpu) {
        staging_chunks(prefetch) as u64 * slot_bytes
    } else {
        0
    }
}

/// Whole layers a host cache of `bytes` holds.
fn host_layers(bytes: u64, slot_bytes: u64) -> usize {
    usize::try_from(bytes / slot_bytes.max(1)).unwrap_or(usize::MAX)
}

/// Slots that `budget` allows, or an error that names the smallest budget
/// that works. `staging_bytes` is the upload staging that shares the budget
/// on this adapter (0 where staging lives in host memory). `dtype` is what
/// the slots hold, which the message names: f16 layers take half the bytes.
pub fn slots_for(
    budget: VramBudget,
    layers: usize,
    slot_bytes: u64,
    pinned_bytes: u64,
    staging_bytes: u64,
    dtype: WeightDtype,
) -> Result<usize> {
    let smallest = pinned_bytes + slot_bytes + staging_bytes;
    let to_mb = |b: u64| b.div_ceil(1 << 20);
    match budget {
        VramBudget::Unbounded => Ok(layers),
        VramBudget::Layers(0) => Err(Error::InvalidInput(
            "a cache of 0 layers cannot run the model; at least 1 layer is needed".into(),
        )),
        VramBudget::Layers(n) => Ok(n.min(layers)),
        VramBudget::Bytes(bytes) => {
            if bytes < smallest {
                let staging = if staging_bytes > 0 {
                    format!(
                        ", and the upload staging ({} MB, which shares this adapter's memory; \
                         a smaller --prefetch needs less)",
                        to_mb(staging_bytes)
                    )
                } else {
                    String::new()
                };
                let layer_note = match dtype {
                    WeightDtype::F32 => "f32 weights; --dtype f16 halves every layer",
                    WeightDtype::F16 => "f16 weights, half of f32's",
                };
                return Err(Error::InvalidInput(format!(
                    "a VRAM budget of {} MB cannot hold the pinned weights ({} MB) and one layer ({} MB, {layer_note}){staging}; \
                     the smallest budget that works is {} MB",
                    bytes >> 20,
                    to_mb(pinned_bytes),
                    to_mb(slot_bytes),
                    to_mb(smallest)
                )));
            }
            Ok((((bytes - pinned_bytes - staging_bytes) / slot_bytes) as usize).min(layers))
        }
    }
}
