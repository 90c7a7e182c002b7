//! Inference and cache statistics, as users of the engine read them.

use serde::Serialize;

/// Counters of the pager and host cache; summed over the engine's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PagingCounters {
    pub vram_hits: u64,
    pub vram_misses: u64,
    pub host_hits: u64,
    pub host_misses: u64,
    pub evictions: u64,
    pub bytes_fetched: u64,
    pub bytes_uploaded: u64,
    pub fetches: u64,
    pub prefetches_in_time: u64,
    pub prefetches_late: u64,
    /// Layer uploads into GPU slots (the pinned embeddings not included).
    pub uploads: u64,
    /// Forward passes run.
    pub passes: u64,
    /// Layer uploads and their bytes made during passes, summed.
    pub pass_uploads: u64,
    pub pass_bytes_uploaded: u64,
    pub last_pass_uploads: u64,
    pub last_pass_bytes_uploaded: u64,
}

/// What `Engine::inference_stats` reports.
#[derive(Debug, Clone, Serialize)]
pub struct InferenceStats {
    pub total_inferences: u64,
    pub total_texts: u64,
    /// Seconds per `infer` call.
    pub avg_inference_time: f64,
    pub p50_inference_time: f64,
    pub p95_inference_time: f64,
    /// Share of layer uses that found the layer in GPU memory.
    pub cache_hit_rate: f64,
    /// Share of layer loads served from the host cache rather than the source.
    pub host_cache_hit_rate: f64,
    pub vram_hits: u64,
    pub vram_misses: u64,
    pub bytes_fetched: u64,
    pub bytes_uploaded: u64,
    pub evictions: u64,
    pub fetches: u64,
    pub prefetches_in_time: u64,
    pub prefetches_late: u64,
    /// Forward passes run (one per GPU batch).
    pub passes: u64,
    /// Layer uploads per pass, over every pass so far (the cold first
    /// included) and in the latest pass.
    pub uploads_per_pass: f64,
    pub bytes_uploaded_per_pass: f64,
    pub last_pass_uploads: u64,
    pub last_pass_bytes_uploaded: u64,
}

/// What `Engine::cache_info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CacheInfo {
    /// Components held in GPU memory, pinned ones included.
    pub cached_components: Vec<String>,
    /// Bytes of GPU memory held for weights, in MiB.
    pub memory_usage_mb: f64,
    pub memory_usage_bytes: u64,
    /// The weight budget in bytes; `None` when unbounded.
    pub budget_bytes: Option<u64>,
    /// Layers that fit at once.
    pub layer_slots: usize,
    pub host_cache_bytes: u64,
    pub host_cache_capacity_bytes: u64,
    /// Host bytes of the prefetch window outside the host cache: layers
    /// fetched ahead, in flight or parked until a slot frees.
    pub host_window_bytes: u64,
    /// Upload staging held now, and the most it can reach.
    pub staging_bytes: u64,
    pub staging_limit_bytes: u64,
    /// Whether staging is device memory on this adapter, and so counted in
    /// `memory_usage_bytes` and the budget.
    pub staging_in_vram: bool,
    /// `optimal` or `lru`.
    pub eviction: String,
    /// `f32` or `f16`: how weights are held in GPU memory.
    pub weight_dtype: String,
    /// Bytes of one encoder layer in GPU memory (one slot).
    pub layer_bytes: u64,
    /// Bytes of the pinned embedding tables in GPU memory.
    pub pinned_bytes: u64,
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// How many of the latest call latencies the percentiles are taken over:
/// a service that runs for months keeps a fixed window, not every call.
pub const LATENCY_WINDOW: usize = 4096;

/// Per-call latencies (the latest [`LATENCY_WINDOW`]) and totals over the
/// engine's life.
#[derive(Debug, Default)]
pub struct Timings {
    recent: std::collections::VecDeque<f64>,
    calls: u64,
    total_seconds: f64,
    texts: u64,
}

impl Timings {
    pub fn record(&mut self, seconds: f64, texts: usize) {
        if self.recent.len() == LATENCY_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(seconds);
        self.calls += 1;
        self.total_seconds += seconds;
        self.texts += texts as u64;
    }

    /// Latencies held for the percentiles; never more than [`LATENCY_WINDOW`].
    pub fn held(&self) -> usize {
        self.recent.len()
    }

    pub fn summarize(&self, counters: &PagingCounters) -> InferenceStats {
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        InferenceStats {
            total_inferences: self.calls,
            total_texts: self.texts,
            avg_inference_time: if self.calls == 0 {
                0.0
            } else {
                self.total_seconds / self.calls as f64
            },
            p50_inference_time: percentile(&sorted, 0.5),
            p95_inference_time: percentile(&sorted, 0.95),
            cache_hit_rate: ratio(
                counters.vram_hits,
                counters.vram_hits + counters.vram_misses,
            ),
            host_cache_hit_rate: ratio(
                counters.host_hits,
                counters.host_hits + counters.host_misses,
            ),
            vram_hits: counters.vram_hits,
            vram_misses: counters.vram_misses,
            bytes_fetched: counters.bytes_fetched,
            bytes_uploaded: counters.bytes_uploaded,
            evictions: counters.evictions,
            fetches: counters.fetches,
            prefetches_in_time: counters.prefetches_in_time,
            prefetches_late: counters.prefetches_late,
            passes: counters.passes,
            uploads_per_pass: ratio(counters.pass_uploads, counters.passes),
            bytes_uploaded_per_pass: ratio(counters.pass_bytes_uploaded, counters.passes),
            last_pass_uploads: counters.last_pass_uploads,
            last_pass_bytes_uploaded: counters.last_pass_bytes_uploaded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_rates_come_from_the_recorded_calls() {
        let mut timings = Timings::default();
        for s in [0.5, 0.1, 0.3, 0.2, 0.4] {
            timings.record(s, 2);
        }
        let counters = PagingCounters {
            vram_hits: 3,
            vram_misses: 1,
            host_hits: 1,
            host_misses: 3,
            ..Default::default()
        };
        let stats = timings.summarize(&counters);
        assert_eq!(stats.total_inferences, 5);
        assert_eq!(stats.total_texts, 10);
        assert!((stats.avg_inference_time - 0.3).abs() < 1e-12);
        assert_eq!(stats.p50_inference_time, 0.3);
        assert_eq!(stats.p95_inference_time, 0.5);
        assert_eq!(stats.cache_hit_rate, 0.75);
        assert_eq!(stats.host_cache_hit_rate, 0.25);
    }

    #[test]
    fn latencies_held_stay_bounded_while_totals_count_every_call() {
        let mut timings = Timings::default();
        let calls = LATENCY_WINDOW * 3 + 7;
        for i in 0..calls {
            // Old calls were slow, recent ones fast: percentiles follow the window.
            let seconds = if i < calls - LATENCY_WINDOW {
                10.0
            } else {
                1.0
            };
            timings.record(seconds, 1);
        }
        assert_eq!(timings.held(), LATENCY_WINDOW);
        let stats = timings.summarize(&PagingCounters::default());
        assert_eq!(stats.total_inferences, calls as u64);
        assert_eq!(stats.total_texts, calls as u64);
        assert_eq!(stats.p95_inference_time, 1.0);
        let expected_mean =
            (10.0 * (calls - LATENCY_WINDOW) as f64 + LATENCY_WINDOW as f64) / calls as f64;
        assert!((stats.avg_inference_time - expected_mean).abs() < 1e-9);
    }
}
