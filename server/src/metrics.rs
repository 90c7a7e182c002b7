//! Server counters, and their Prometheus text exposition at `/metrics`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A number that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn increment(&self) {
        self.add(1);
    }

    pub fn add(&self, amount: u64) {
        self.0.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A number that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn decrement(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the server has done since it started.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: Counter,
    pub connections_active: Gauge,
    pub connections_refused: Counter,
    pub requests: Counter,
    pub request_errors: Counter,
    pub bytes_served: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_coalesced: Counter,
    pub cache_evictions: Counter,
    pub cache_bytes: Gauge,
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
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_coalesced: u64,
    pub cache_evictions: u64,
    pub cache_bytes: u64,
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
            cache_hits: self.cache_hits.get(),
            cache_misses: self.cache_misses.get(),
            cache_coalesced: self.cache_coalesced.get(),
            cache_evictions: self.cache_evictions.get(),
            cache_bytes: self.cache_bytes.get(),
        }
    }
}

impl StatsSnapshot {
    /// The Prometheus text exposition format, version 0.0.4.
    pub fn to_prometheus(&self) -> String {
        let metrics: [(&str, &str, &str, u64); 11] = [
            (
                "connections_total",
                "counter",
                "QUIC connections accepted.",
                self.connections,
            ),
            (
                "connections_active",
                "gauge",
                "QUIC connections open now.",
                self.connections_active,
            ),
            (
                "connections_refused_total",
                "counter",
                "Connections closed at the handshake (version, token, malformed hello).",
                self.connections_refused,
            ),
            (
                "requests_total",
                "counter",
                "Fetch requests received.",
                self.requests,
            ),
            (
                "request_errors_total",
                "counter",
                "Fetch requests refused or cut off.",
                self.request_errors,
            ),
            (
                "bytes_served_total",
                "counter",
                "Weight bytes sent.",
                self.bytes_served,
            ),
            (
                "cache_hits_total",
                "counter",
                "Component cache hits.",
                self.cache_hits,
            ),
            (
                "cache_misses_total",
                "counter",
                "Component cache misses (each one load).",
                self.cache_misses,
            ),
            (
                "cache_coalesced_total",
                "counter",
                "Requests that waited for a load already in progress.",
                self.cache_coalesced,
            ),
            (
                "cache_evictions_total",
                "counter",
                "Component cache evictions.",
                self.cache_evictions,
            ),
            (
                "cache_bytes",
                "gauge",
                "Bytes held by the component cache.",
                self.cache_bytes,
            ),
        ];
        let mut text = String::new();
        for (name, kind, help, value) in metrics {
            let _ = writeln!(text, "# HELP surf_server_{name} {help}");
            let _ = writeln!(text, "# TYPE surf_server_{name} {kind}");
            let _ = writeln!(text, "surf_server_{name} {value}");
        }
        text
    }
}

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers `GET /metrics` on `listener` until `cancel` fires.
pub async fn serve_metrics(listener: TcpListener, stats: Arc<Stats>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let stats = stats.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &stats).await {
                        tracing::debug!(%peer, %error, "metrics request failed");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "accepting a metrics connection failed"),
        }
    }
}

async fn answer(mut stream: TcpStream, stats: &Stats) -> std::io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_request_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow request"))??;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let response = match request.parse(&head) {
        Ok(httparse::Status::Complete(_)) => match (request.method, request.path) {
            (Some("GET"), Some("/metrics")) => http_response(
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &stats.snapshot().to_prometheus(),
            ),
            (Some("GET"), _) => http_response("404 Not Found", "text/plain", "not found\n"),
            _ => http_response("405 Method Not Allowed", "text/plain", "only GET\n"),
        },
        _ => http_response("400 Bad Request", "text/plain", "bad request\n"),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line that ends the request head.
async fn read_request_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            break;
        }
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    Ok(head)
}

fn http_response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
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
        stats.cache_bytes.set(99);
        let text = stats.snapshot().to_prometheus();
        assert!(text.contains("\nsurf_server_bytes_served_total 1234\n"));
        assert!(
            text.contains("# TYPE surf_server_cache_bytes gauge\nsurf_server_cache_bytes 99\n")
        );
        let samples: Vec<_> = text.lines().filter(|line| !line.starts_with('#')).collect();
        assert_eq!(samples.len(), 11);
        assert!(samples.iter().all(|line| line.starts_with("surf_server_")));
    }
}
