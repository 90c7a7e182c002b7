//! The VRAM pager: encoder layers live in fixed-size GPU slots under a budget,
//! with a host-memory LRU behind them and background fetches ahead of use.
//! Every decision comes from [`policy::PagePolicy`]; this module carries them
//! out on the GPU and the weight source.

pub mod policy;

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};

use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::BertLayer;
use crate::source::WeightSource;
use crate::stats::PagingCounters;
use policy::{PagePolicy, Placement};

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
}

impl Default for PagerConfig {
    fn default() -> Self {
        Self {
            vram_budget: VramBudget::Unbounded,
            host_cache_bytes: 0,
            prefetch: 2,
        }
    }
}

type PackedLayer = Arc<Vec<f32>>;

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
    config: Arc<BertConfig>,
    /// Bytes of one packed layer, the size of every slot.
    slot_bytes: u64,
    pinned_bytes: u64,
    budget: VramBudget,
    policy: PagePolicy,
    slots: Vec<Option<wgpu::Buffer>>,
    host: lru::LruCache<usize, PackedLayer>,
    host_bytes: u64,
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
    /// Fetched layers that found no free slot yet and no room in the host cache.
    arrived: HashMap<usize, PackedLayer>,
    /// Layers put in the host cache by a fetch and not yet used from it.
    unused_fetches: std::collections::HashSet<usize>,
    prefetch: usize,
    staging: wgpu::util::StagingBelt,
    observer: Option<FetchObserver>,
    pub counters: PagingCounters,
}

impl Pager {
    pub fn new(
        gpu: Gpu,
        source: Arc<dyn WeightSource>,
        config: Arc<BertConfig>,
        slot_bytes: u64,
        pinned_bytes: u64,
        settings: PagerConfig,
    ) -> Result<Self> {
        let layers = config.num_hidden_layers;
        let capacity = slots_for(settings.vram_budget, layers, slot_bytes, pinned_bytes)?;
        let staging = wgpu::util::StagingBelt::new(gpu.device.clone(), slot_bytes.max(4));
        let fetch_stop = Arc::new(AtomicBool::new(false));
        let fetch_queue = spawn_fetch_thread(
            Arc::clone(&source),
            Arc::clone(&config),
            Arc::clone(&fetch_stop),
        )?;
        Ok(Self {
            gpu,
            source,
            config,
            slot_bytes,
            pinned_bytes,
            budget: settings.vram_budget,
            policy: PagePolicy::new(layers, capacity),
            slots: vec![None; capacity],
            host: lru::LruCache::unbounded(),
            host_bytes: 0,
            host_capacity: settings.host_cache_bytes,
            pending: HashMap::new(),
            fetch_queue,
            fetch_stop,
            arrived: HashMap::new(),
            unused_fetches: Default::default(),
            prefetch: settings.prefetch,
            staging,
            observer: None,
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

    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// GPU bytes held for weights: pinned parts plus allocated slots.
    pub fn vram_bytes(&self) -> u64 {
        self.pinned_bytes + self.slots.iter().flatten().count() as u64 * self.slot_bytes
    }

    pub fn budget_bytes(&self) -> Option<u64> {
        match self.budget {
            VramBudget::Unbounded => None,
            VramBudget::Bytes(b) => Some(b),
            VramBudget::Layers(n) => Some(self.pinned_bytes + n as u64 * self.slot_bytes),
        }
    }

    pub fn host_bytes(&self) -> u64 {
        self.host_bytes
    }

    pub fn host_capacity(&self) -> u64 {
        self.host_capacity
    }

    pub fn resident_layers(&self) -> Vec<usize> {
        self.policy.resident_layers()
    }

    /// Changes the budget; shrinking frees the slots past the new capacity.
    pub fn set_budget(&mut self, budget: VramBudget) -> Result<()> {
        let capacity = slots_for(budget, self.layers(), self.slot_bytes, self.pinned_bytes)?;
        self.policy.resize(capacity);
        // Buffers past the new capacity are dropped, which frees them.
        self.slots.resize(capacity, None);
        self.budget = budget;
        self.counters.evictions = self.policy.counters.evictions;
        Ok(())
    }

    pub fn set_host_cache_bytes(&mut self, bytes: u64) {
        self.host_capacity = bytes;
        self.trim_host();
    }

    pub fn set_prefetch(&mut self, depth: usize) {
        self.prefetch = depth;
    }

    /// Empties GPU slots (their buffers are freed) and the host cache.
    pub fn clear(&mut self) {
        self.policy.clear();
        for slot in &mut self.slots {
            *slot = None;
        }
        self.host.clear();
        self.host_bytes = 0;
        self.arrived.clear();
        self.unused_fetches.clear();
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
        self.staging =
            wgpu::util::StagingBelt::new(self.gpu.device.clone(), self.slot_bytes.max(4));
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
        let at_hand = self.host.contains(&layer) || self.arrived.contains_key(&layer);
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

    /// Host bytes of `layer`: from the host cache, a fetch in flight, or the source.
    fn host_layer(&mut self, layer: usize) -> Result<PackedLayer> {
        if let Some(packed) = self.host.get(&layer) {
            // A layer fetched ahead and not used yet was a miss, counted when it arrived.
            if !self.unused_fetches.remove(&layer) {
                self.counters.host_hits += 1;
            }
            return Ok(Arc::clone(packed));
        }
        if let Some(packed) = self.arrived.remove(&layer) {
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
            None => fetch_layer(self.source.as_ref(), &self.config, layer)?,
        };
        self.accept_fetched(layer, &packed, bytes)?;
        // Used right away, so later reads from the host cache are real hits.
        self.unused_fetches.remove(&layer);
        Ok(packed)
    }

    /// Counts a finished fetch and keeps its bytes in the host cache.
    fn accept_fetched(&mut self, layer: usize, packed: &PackedLayer, bytes: u64) -> Result<()> {
        self.counters.fetches += 1;
        self.counters.host_misses += 1;
        self.counters.bytes_fetched += bytes;
        if let Some(observer) = &self.observer {
            observer(layer, bytes);
        }
        if (packed.len() * 4) as u64 != self.slot_bytes {
            return Err(Error::WeightSource(format!(
                "layer {layer} packs to {} bytes, other layers to {}",
                packed.len() * 4,
                self.slot_bytes
            )));
        }
        if self.host_capacity >= self.slot_bytes {
            self.host_bytes += self.slot_bytes;
            self.host.put(layer, Arc::clone(packed));
            self.unused_fetches.insert(layer);
            self.trim_host();
        }
        Ok(())
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

    fn trim_host(&mut self) {
        while self.host_bytes > self.host_capacity {
            let Some((layer, _)) = self.host.pop_lru() else {
                self.host_bytes = 0;
                break;
            };
            self.unused_fetches.remove(&layer);
            self.host_bytes -= self.slot_bytes;
        }
    }

    /// Makes `layer` resident and returns its buffer. Work already submitted
    /// to the queue runs before any upload recorded here, so a slot whose
    /// previous layer is still being computed may be overwritten safely;
    /// `protected` layers (recorded but not yet submitted) are never evicted.
    pub fn acquire(&mut self, layer: usize, protected: &[usize]) -> Result<wgpu::Buffer> {
        if self.policy.is_resident(layer) {
            let placement = self.policy.place(layer, protected);
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
        let placement = self.policy.place(layer, protected).ok_or_else(|| {
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

    /// Uploads the layers following `current` whose bytes have already
    /// arrived, so that they are in VRAM before they are needed.
    pub fn upload_ready(&mut self, current: usize) -> Result<()> {
        let ahead: Vec<usize> = (1..=self.prefetch.min(self.layers().saturating_sub(1)))
            .map(|a| (current + a) % self.layers())
            .collect();
        for &layer in &ahead {
            let arrived = self
                .pending
                .get(&layer)
                .and_then(|p| p.result.try_recv().ok());
            let Some(result) = arrived else { continue };
            self.pending.remove(&layer);
            self.policy.fetch_finished(layer);
            let (packed, bytes) = result?;
            self.counters.prefetches_in_time += 1;
            self.accept_fetched(layer, &packed, bytes)?;
            if self.policy.is_resident(layer) {
                continue;
            }
            // Keep the current layer and the other upcoming ones; evict older ones.
            let mut protected: Vec<usize> = ahead.clone();
            protected.push(current);
            let Some(placement) = self.policy.place(layer, &protected) else {
                if !self.host.contains(&layer) {
                    self.arrived.insert(layer, packed);
                }
                continue;
            };
            self.sync_counters();
            if let Placement::Load { slot, .. } = placement {
                self.unused_fetches.remove(&layer);
                let buffer = self.slot_buffer(slot);
                self.upload(&buffer, &packed)?;
            }
        }
        Ok(())
    }

    fn upload(&mut self, buffer: &wgpu::Buffer, packed: &[f32]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(packed);
        let size = NonZeroU64::new(bytes.len() as u64)
            .ok_or_else(|| Error::Gpu("an empty layer cannot be uploaded".into()))?;
        let mut encoder = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("upload"),
            });
        {
            let mut view = self.staging.write_buffer(&mut encoder, buffer, 0, size);
            view.copy_from_slice(bytes);
        }
        self.staging.finish();
        self.gpu.queue.submit([encoder.finish()]);
        self.staging.recall();
        self.counters.bytes_uploaded += bytes.len() as u64;
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
    config: Arc<BertConfig>,
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
                let result = fetch_layer(source.as_ref(), &config, job.layer);
                // The pager may have stopped waiting; then nobody wants the layer.
                let _ = job.reply.send(result);
            }
        })
        .map_err(|e| Error::WeightSource(format!("cannot start the fetch thread: {e}")))?;
    Ok(queue)
}

fn fetch_layer(
    source: &dyn WeightSource,
    config: &BertConfig,
    layer: usize,
) -> Result<(PackedLayer, u64)> {
    let component = source.fetch(&format!("encoder.layer.{layer}"))?;
    let (_, packed) = BertLayer::pack(component.tensors.as_ref(), config, layer)?;
    Ok((Arc::new(packed), component.bytes))
}

/// Slots that `budget` allows, or an error that names the smallest budget that works.
pub fn slots_for(
    budget: VramBudget,
    layers: usize,
    slot_bytes: u64,
    pinned_bytes: u64,
) -> Result<usize> {
    let smallest = pinned_bytes + slot_bytes;
    let to_mb = |b: u64| b.div_ceil(1 << 20);
    match budget {
        VramBudget::Unbounded => Ok(layers),
        VramBudget::Layers(0) => Err(Error::InvalidInput(
            "a cache of 0 layers cannot run the model; at least 1 layer is needed".into(),
        )),
        VramBudget::Layers(n) => Ok(n.min(layers)),
        VramBudget::Bytes(bytes) => {
            if bytes < smallest {
                return Err(Error::InvalidInput(format!(
                    "a VRAM budget of {} MB cannot hold the pinned weights ({} MB) and one layer ({} MB); \
                     the smallest budget that works is {} MB",
                    bytes >> 20,
                    to_mb(pinned_bytes),
                    to_mb(slot_bytes),
                    to_mb(smallest)
                )));
            }
            Ok((((bytes - pinned_bytes) / slot_bytes) as usize).min(layers))
        }
    }
}
