//! The service's Prometheus metrics, in a registry of its own (not a global
//! one: tests run several services in one process). What concerns one model
//! carries a `model` label; the VRAM gauges have one series per model and a
//! total whose `model` label is empty (which Prometheus reads as no label).

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use surf_engine::InferenceStats;
use surf_engine::queue::BatchReport;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Model {
    pub model: String,
}

type HistogramMaker = fn() -> Histogram;

fn seconds_histogram() -> Histogram {
    // 0.5 ms to about 33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

/// Counters of the pager as last read, so that counters only add what is new.
#[derive(Default)]
struct PagerSeen {
    vram_hits: u64,
    evictions: u64,
    bytes_fetched: u64,
    bytes_uploaded: u64,
}

fn batch_size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

fn batch_tokens_histogram() -> Histogram {
    Histogram::new(exponential_buckets(16.0, 2.0, 14))
}

pub struct ServiceMetrics {
    registry: Registry,
    /// Model names by index, as the queue reports batches.
    models: Vec<String>,
    requests: Family<RouteStatus, Counter>,
    request_duration: Family<Route, Histogram, HistogramMaker>,
    model_requests: Family<Model, Counter>,
    queue_size: Gauge,
    queue_duration: Family<Model, Histogram, HistogramMaker>,
    inference_duration: Family<Model, Histogram, HistogramMaker>,
    batch_size: Family<Model, Histogram, HistogramMaker>,
    batch_tokens: Family<Model, Histogram, HistogramMaker>,
    batches_failed: Family<Model, Counter>,
    pager_hits: Family<Model, Counter>,
    pager_evictions: Family<Model, Counter>,
    pager_bytes_fetched: Family<Model, Counter>,
    pager_bytes_uploaded: Family<Model, Counter>,
    vram_used: Family<Model, Gauge>,
    vram_budget: Family<Model, Gauge>,
    pager_seen: Mutex<Vec<PagerSeen>>,
}

impl ServiceMetrics {
    /// Metrics of a service serving `models`, in the queue's order.
    pub fn new(models: Vec<String>) -> Self {
        let mut registry = Registry::with_prefix("surf");
        let requests = Family::<RouteStatus, Counter>::default();
        let request_duration =
            Family::<Route, Histogram, HistogramMaker>::new_with_constructor(seconds_histogram);
        let model_requests = Family::<Model, Counter>::default();
        let queue_size = Gauge::default();
        let queue_duration =
            Family::<Model, Histogram, HistogramMaker>::new_with_constructor(seconds_histogram);
        let inference_duration =
            Family::<Model, Histogram, HistogramMaker>::new_with_constructor(seconds_histogram);
        let batch_size =
            Family::<Model, Histogram, HistogramMaker>::new_with_constructor(batch_size_histogram);
        let batch_tokens = Family::<Model, Histogram, HistogramMaker>::new_with_constructor(
            batch_tokens_histogram,
        );
        let batches_failed = Family::<Model, Counter>::default();
        let pager_hits = Family::<Model, Counter>::default();
        let pager_evictions = Family::<Model, Counter>::default();
        let pager_bytes_fetched = Family::<Model, Counter>::default();
        let pager_bytes_uploaded = Family::<Model, Counter>::default();
        let vram_used = Family::<Model, Gauge>::default();
        let vram_budget = Family::<Model, Gauge>::default();
        registry.register(
            "model_requests",
            "Requests queued for a model",
            model_requests.clone(),
        );
        registry.register(
            "vram_used_bytes",
            "GPU bytes held for weights, by model; the empty model label is the total",
            vram_used.clone(),
        );
        registry.register(
            "vram_budget_bytes",
            "GPU bytes a model may hold now under the shared budget; the empty model label is the whole budget",
            vram_budget.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request to answer, by route",
            request_duration.clone(),
        );
        registry.register(
            "queue_size",
            "Inputs waiting for the engine",
            queue_size.clone(),
        );
        registry.register(
            "queue_duration_seconds",
            "Time a request waited before its first batch started",
            queue_duration.clone(),
        );
        registry.register(
            "inference_duration_seconds",
            "Run time of one batch on the engine",
            inference_duration.clone(),
        );
        registry.register("batch_size", "Inputs per batch", batch_size.clone());
        registry.register(
            "batch_tokens",
            "Padded tokens per batch (longest input times inputs)",
            batch_tokens.clone(),
        );
        registry.register(
            "batches_failed",
            "Batches the engine failed on",
            batches_failed.clone(),
        );
        registry.register(
            "pager_vram_hits",
            "Layer uses that found the layer in GPU memory",
            pager_hits.clone(),
        );
        registry.register(
            "pager_evictions",
            "Layers evicted from GPU memory",
            pager_evictions.clone(),
        );
        registry.register(
            "pager_fetched_bytes",
            "Weight bytes fetched from the weight source",
            pager_bytes_fetched.clone(),
        );
        registry.register(
            "pager_uploaded_bytes",
            "Weight bytes uploaded to GPU memory",
            pager_bytes_uploaded.clone(),
        );
        let pager_seen = Mutex::new(models.iter().map(|_| PagerSeen::default()).collect());
        Self {
            registry,
            models,
            requests,
            request_duration,
            model_requests,
            queue_size,
            queue_duration,
            inference_duration,
            batch_size,
            batch_tokens,
            batches_failed,
            pager_hits,
            pager_evictions,
            pager_bytes_fetched,
            pager_bytes_uploaded,
            vram_used,
            vram_budget,
            pager_seen,
        }
    }

    fn model(&self, model: usize) -> Model {
        Model {
            model: self.models.get(model).cloned().unwrap_or_default(),
        }
    }

    pub fn request_answered(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_string(),
                status,
            })
            .inc();
        self.request_duration
            .get_or_create(&Route {
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a request to `model` and how long it waited for its first batch.
    pub fn queued(&self, model: usize, waited: Duration) {
        let label = self.model(model);
        self.model_requests.get_or_create(&label).inc();
        self.queue_duration
            .get_or_create(&label)
            .observe(waited.as_secs_f64());
    }

    /// Called by the queue after every batch.
    pub fn batch_done(&self, report: &BatchReport) {
        let label = self.model(report.model);
        self.batch_size
            .get_or_create(&label)
            .observe(report.shape.inputs as f64);
        self.batch_tokens
            .get_or_create(&label)
            .observe(report.shape.padded_tokens() as f64);
        self.inference_duration
            .get_or_create(&label)
            .observe(report.elapsed.as_secs_f64());
        self.queue_size.set(report.waiting as i64);
        if report.failed {
            self.batches_failed.get_or_create(&label).inc();
        }
    }

    /// Sets the VRAM gauges of `model`: bytes held and bytes it may hold.
    pub fn set_vram(&self, model: usize, used: u64, granted: Option<u64>) {
        let label = self.model(model);
        self.vram_used
            .get_or_create(&label)
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        if let Some(granted) = granted {
            self.vram_budget
                .get_or_create(&label)
                .set(i64::try_from(granted).unwrap_or(i64::MAX));
        }
    }

    /// Sets the total VRAM gauges: bytes held by every model, and the budget.
    pub fn set_vram_total(&self, used: u64, budget: Option<u64>) {
        let total = Model {
            model: String::new(),
        };
        self.vram_used
            .get_or_create(&total)
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        if let Some(budget) = budget {
            self.vram_budget
                .get_or_create(&total)
                .set(i64::try_from(budget).unwrap_or(i64::MAX));
        }
    }

    pub fn set_queue_size(&self, waiting: usize) {
        self.queue_size.set(waiting as i64);
    }

    /// Brings the pager counters of `model` up to its engine's figures.
    pub fn sync_pager(&self, model: usize, stats: &InferenceStats) {
        let mut seen = self.pager_seen.lock().unwrap_or_else(|p| p.into_inner());
        let Some(seen) = seen.get_mut(model) else {
            return;
        };
        let label = self.model(model);
        let advance = |family: &Family<Model, Counter>, last: &mut u64, now: u64| {
            family
                .get_or_create(&label)
                .inc_by(now.saturating_sub(*last));
            *last = now.max(*last);
        };
        advance(&self.pager_hits, &mut seen.vram_hits, stats.vram_hits);
        advance(&self.pager_evictions, &mut seen.evictions, stats.evictions);
        advance(
            &self.pager_bytes_fetched,
            &mut seen.bytes_fetched,
            stats.bytes_fetched,
        );
        advance(
            &self.pager_bytes_uploaded,
            &mut seen.bytes_uploaded,
            stats.bytes_uploaded,
        );
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "encoding the metrics failed");
        }
        text
    }
}
