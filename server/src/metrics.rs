//! Server counters, and their OpenMetrics text exposition at `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::{counter, gauge};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The media type of what [`prometheus_client::encoding::text::encode`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A number that only goes up.
///
/// A thin wrapper so that callers keep `increment`/`add`/`get`; clones share
/// the value, which is how the registry sees what the server counts.
#[derive(Debug, Clone, Default)]
pub struct Counter(counter::Counter<u64, AtomicU64>);

impl Counter {
    pub fn increment(&self) {
        self.0.inc();
    }

    pub fn add(&self, amount: u64) {
        self.0.inc_by(amount);
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A number that goes up and down.
///
/// Unsigned, because everything it measures (open connections, bytes held)
/// is a count that cannot go below zero.
#[derive(Debug, Clone, Default)]
pub struct Gauge(gauge::Gauge<u64, AtomicU64>);

impl Gauge {
    pub fn set(&self, value: u64) {
        self.0.set(value);
    }

    pub fn increment(&self) {
        self.0.inc();
    }

    pub fn decrement(&self) {
        self.0.dec();
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// What the server has done since it started.
///
/// Each `Stats` owns its registry, so that servers sharing a process (as
/// tests do) each expose only their own counts.
#[derive(Debug)]
pub struct Stats {
    pub connections: Counter,
    pub connections_active: Gauge,
    pub connections_refused: Counter,
    pub requests: Counter,
    pub request_errors: Counter,
    pub bytes_served: Counter,
    /// The part of `bytes_served` that was word-table rows and their hashes.
    pub row_bytes_served: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_coalesced: Counter,
    pub cache_evictions: Counter,
    pub cache_bytes: Gauge,
    pub redis_hits: Counter,
    pub redis_misses: Counter,
    pub redis_errors: Counter,
    pub redis_writes: Counter,
    pub upstream_fetches: Counter,
    pub upstream_bytes: Counter,
    /// Writes to Redis started and not yet finished.
    pub redis_writes_pending: Gauge,
    registry: Registry,
}

impl Default for Stats {
    fn default() -> Self {
        let connections = Counter::default();
        let connections_active = Gauge::default();
        let connections_refused = Counter::default();
        let requests = Counter::default();
        let request_errors = Counter::default();
        let bytes_served = Counter::default();
        let row_bytes_served = Counter::default();
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        let cache_coalesced = Counter::default();
        let cache_evictions = Counter::default();
        let cache_bytes = Gauge::default();
        let redis_hits = Counter::default();
        let redis_misses = Counter::default();
        let redis_errors = Counter::default();
        let redis_writes = Counter::default();
        let upstream_fetches = Counter::default();
        let upstream_bytes = Counter::default();
        let redis_writes_pending = Gauge::default();

        // Counter names go in without `_total`: the encoder adds it. Help
        // texts go in without a full stop: the registry adds one.
        let mut registry = Registry::with_prefix("surf_server");
        let counters = [
            ("connections", "QUIC connections accepted", &connections),
            (
                "connections_refused",
                "Connections closed at the handshake (version, token, malformed hello)",
                &connections_refused,
            ),
            ("requests", "Fetch requests received", &requests),
            (
                "request_errors",
                "Fetch requests refused or cut off",
                &request_errors,
            ),
            ("bytes_served", "Weight bytes sent", &bytes_served),
            (
                "row_bytes_served",
                "Word-table rows and row hashes sent (part of bytes_served)",
                &row_bytes_served,
            ),
            ("cache_hits", "Component cache hits", &cache_hits),
            (
                "cache_misses",
                "Component cache misses (each one load)",
                &cache_misses,
            ),
            (
                "cache_coalesced",
                "Requests that waited for a load already in progress",
                &cache_coalesced,
            ),
            (
                "cache_evictions",
                "Component cache evictions",
                &cache_evictions,
            ),
            (
                "redis_hits",
                "Components read from the shared Redis tier, whole and checked",
                &redis_hits,
            ),
            (
                "redis_misses",
                "Lookups in the shared Redis tier that found nothing usable",
                &redis_misses,
            ),
            (
                "redis_errors",
                "Failed Redis commands and values that failed their hash check",
                &redis_errors,
            ),
            (
                "redis_writes",
                "Components written to the shared Redis tier",
                &redis_writes,
            ),
            (
                "upstream_fetches",
                "Components fetched from the upstream origin",
                &upstream_fetches,
            ),
            (
                "upstream_bytes",
                "Bytes fetched from the upstream origin",
                &upstream_bytes,
            ),
        ];
        for (name, help, metric) in counters {
            registry.register(name, help, metric.0.clone());
        }
        let gauges = [
            (
                "connections_active",
                "QUIC connections open now",
                &connections_active,
            ),
            (
                "cache_bytes",
                "Bytes held by the component cache",
                &cache_bytes,
            ),
            (
                "redis_writes_pending",
                "Writes to the shared Redis tier in flight",
                &redis_writes_pending,
            ),
        ];
        for (name, help, metric) in gauges {
            registry.register(name, help, metric.0.clone());
        }

        Stats {
            connections,
            connections_active,
            connections_refused,
            requests,
            request_errors,
            bytes_served,
            row_bytes_served,
            cache_hits,
            cache_misses,
            cache_coalesced,
            cache_evictions,
            cache_bytes,
            redis_hits,
            redis_misses,
            redis_errors,
            redis_writes,
            upstream_fetches,
            upstream_bytes,
            redis_writes_pending,
            registry,
        }
    }
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub connections: u64,
    pub connections_active: u64,
    pub connections_refused: u64,
    pub requests: u64,
    pub request_errors: u64,
    pub bytes_served: u64,
    pub row_bytes_served: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_coalesced: u64,
    pub cache_evictions: u64,
    pub cache_bytes: u64,
    pub redis_hits: u64,
    pub redis_misses: u64,
    pub redis_errors: u64,
    pub redis_writes: u64,
    pub upstream_fetches: u64,
    pub upstream_bytes: u64,
    pub redis_writes_pending: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connections: self.connections.get(),
            connections_active: self.connections_active.get(),
            connections_refused: self.connections_refused.get(),
            requests: self.requests.get(),
            request_errors: self.request_errors.get(),
            bytes_served: self.bytes_served.get(),
            row_bytes_served: self.row_bytes_served.get(),
            cache_hits: self.cache_hits.get(),
            cache_misses: self.cache_misses.get(),
            cache_coalesced: self.cache_coalesced.get(),
            cache_evictions: self.cache_evictions.get(),
            cache_bytes: self.cache_bytes.get(),
            redis_hits: self.redis_hits.get(),
            redis_misses: self.redis_misses.get(),
            redis_errors: self.redis_errors.get(),
            redis_writes: self.redis_writes.get(),
            upstream_fetches: self.upstream_fetches.get(),
            upstream_bytes: self.upstream_bytes.get(),
            redis_writes_pending: self.redis_writes_pending.get(),
        }
    }

    /// The OpenMetrics text exposition of every metric, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// `GET /metrics` over `stats`, to serve alone or to mount in a larger app.
pub fn router(stats: Arc<Stats>) -> Router {
    Router::new()
        .route("/metrics", get(expose))
        .with_state(stats)
}

async fn expose(State(stats): State<Arc<Stats>>) -> Response {
    match stats.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(error) => {
            tracing::warn!(%error, "encoding the metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Answers `GET /metrics` on `listener` until `cancel` fires.
pub async fn serve_metrics(listener: TcpListener, stats: Arc<Stats>, cancel: CancellationToken) {
    // The hand-written server this replaced closed after every answer, and
    // simple scrapers (a raw GET read to EOF) rely on that; a scrape every
    // few seconds gains nothing from keep-alive. Set here rather than in
    // `router`, so that an app mounting the router keeps its own policy.
    let app = router(stats).layer(middleware::map_response(close_after_answer));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::warn!(%error, "the metrics listener failed");
    }
}

async fn close_after_answer(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Binds the metrics listener (separately, so that a bad address is an
/// error at start).
pub async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, crate::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::MetricsListen { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric_once_with_its_value() {
        let stats = Stats::default();
        stats.bytes_served.add(1234);
        stats.connections_active.increment();
        stats.cache_bytes.set(99);
        let text = stats.encode().expect("the registry encodes");

        assert!(text.contains(
            "# HELP surf_server_bytes_served Weight bytes sent.\n\
             # TYPE surf_server_bytes_served counter\n\
             surf_server_bytes_served_total 1234\n"
        ));
        assert!(
            text.contains("# TYPE surf_server_cache_bytes gauge\nsurf_server_cache_bytes 99\n")
        );
        assert!(text.contains("\nsurf_server_connections_active 1\n"));
        assert!(text.ends_with("# EOF\n"));

        let samples: Vec<_> = text.lines().filter(|line| !line.starts_with('#')).collect();
        assert_eq!(samples.len(), 19, "{text}");
        assert!(samples.iter().all(|line| line.starts_with("surf_server_")));
        let mut names: Vec<_> = samples
            .iter()
            .map(|line| line.split_once(' ').expect("name and value").0)
            .collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 19, "a metric appears twice in\n{text}");
    }

    #[test]
    fn each_stats_counts_on_its_own() {
        let first = Stats::default();
        let second = Stats::default();
        first.requests.increment();
        let first = first.encode().expect("the first registry encodes");
        let second = second.encode().expect("the second registry encodes");
        assert!(
            first.contains("\nsurf_server_requests_total 1\n"),
            "{first}"
        );
        assert!(
            second.contains("\nsurf_server_requests_total 0\n"),
            "{second}"
        );
    }

    async fn http(addr: SocketAddr, request_line: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        let request = format!("{request_line}\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("sent");
        let mut response = String::new();
        // Reading to EOF also checks that the server closes after answering.
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_string(&mut response),
        )
        .await
        .expect("the server closes the connection")
        .expect("read");
        response
    }

    #[tokio::test]
    async fn serves_metrics_over_http_until_cancelled() {
        let listener = bind_metrics(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("a loopback port binds");
        let addr = listener.local_addr().expect("a bound address");
        let stats = Arc::new(Stats::default());
        stats.requests.add(7);
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve_metrics(listener, stats, cancel.clone()));

        let ok = http(addr, "GET /metrics HTTP/1.1").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.to_ascii_lowercase()
                .contains(&format!("content-type: {CONTENT_TYPE}\r\n"))
        );
        assert!(ok.contains("\nsurf_server_requests_total 7\n"), "{ok}");
        assert!(ok.ends_with("# EOF\n"), "{ok}");

        let missing = http(addr, "GET /other HTTP/1.1").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let wrong_method = http(addr, "POST /metrics HTTP/1.1").await;
        assert!(wrong_method.starts_with("HTTP/1.1 405"), "{wrong_method}");

        cancel.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the server stops when cancelled")
            .expect("the server task ends cleanly");
    }

    #[tokio::test]
    async fn a_bad_address_is_a_metrics_listen_error() {
        // A documentation address (TEST-NET-1) is not on any local interface.
        let addr = SocketAddr::from(([192, 0, 2, 1], 9));
        let error = bind_metrics(addr).await.expect_err("cannot bind");
        assert!(matches!(error, crate::Error::MetricsListen { addr: bad, .. } if bad == addr));
    }
}
