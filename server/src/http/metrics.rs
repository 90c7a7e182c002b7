//! The service's Prometheus metrics, in a registry of its own (not a global
//! one: tests run several services in one process).

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

pub struct ServiceMetrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    request_duration: Family<Route, Histogram, HistogramMaker>,
    queue_size: Gauge,
    queue_duration: Histogram,
    inference_duration: Histogram,
    batch_size: Histogram,
    batch_tokens: Histogram,
    batches_failed: Counter,
    pager_hits: Counter,
    pager_evictions: Counter,
    pager_bytes_fetched: Counter,
    pager_bytes_uploaded: Counter,
    pager_seen: Mutex<PagerSeen>,
}

impl Default for ServiceMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServiceMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("surf");
        let requests = Family::<RouteStatus, Counter>::default();
        let request_duration =
            Family::<Route, Histogram, HistogramMaker>::new_with_constructor(seconds_histogram);
        let queue_size = Gauge::default();
        let queue_duration = seconds_histogram();
        let inference_duration = seconds_histogram();
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let batch_tokens = Histogram::new(exponential_buckets(16.0, 2.0, 14));
        let batches_failed = Counter::default();
        let pager_hits = Counter::default();
        let pager_evictions = Counter::default();
        let pager_bytes_fetched = Counter::default();
        let pager_bytes_uploaded = Counter::default();
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
        Self {
            registry,
            requests,
            request_duration,
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
            pager_seen: Mutex::new(PagerSeen::default()),
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

    pub fn queued(&self, waited: Duration) {
        self.queue_duration.observe(waited.as_secs_f64());
    }

    /// Called by the queue after every batch.
    pub fn batch_done(&self, report: &BatchReport) {
        self.batch_size.observe(report.shape.inputs as f64);
        self.batch_tokens
            .observe(report.shape.padded_tokens() as f64);
        self.inference_duration
            .observe(report.elapsed.as_secs_f64());
        self.queue_size.set(report.waiting as i64);
        if report.failed {
            self.batches_failed.inc();
        }
    }

    pub fn set_queue_size(&self, waiting: usize) {
        self.queue_size.set(waiting as i64);
    }

    /// Brings the pager counters up to the engine's figures.
    pub fn sync_pager(&self, stats: &InferenceStats) {
        let mut seen = self.pager_seen.lock().unwrap_or_else(|p| p.into_inner());
        let advance = |counter: &Counter, last: &mut u64, now: u64| {
            counter.inc_by(now.saturating_sub(*last));
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
