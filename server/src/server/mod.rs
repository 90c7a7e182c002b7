//! The QUIC endpoint: handshakes, token checks and fetch streams.
//!
//! `config` holds what the server is told and `identity` its self-signed
//! certificate; `accept` takes connections in, `greeting` runs their
//! handshake and `fetch` serves their streams. This file starts and stops
//! the whole.

mod accept;
mod config;
mod fetch;
mod greeting;
mod identity;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use surf_transport::wire::{self, HelloReply, PROTOCOL_VERSION, close_code, limits};
use surf_transport::{Dtype, Manifest};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::cache::ComponentCache;
use crate::fault::Faults;
use crate::metrics::{self, Stats, StatsSnapshot};
use crate::origin::Origin;
use crate::redis_tier::RedisTier;

/// How long a new connection has to say hello, and a stream to state its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a refused client to read why before closing on it.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Replies go out in slices of this size, so that a fault hook or a
/// vanished client is noticed between slices.
const REPLY_SLICE: usize = 256 * 1024;

use accept::{Admission, accept_connections};
pub use config::{ConnectionLimits, Identity, ServerConfig};
use identity::self_signed;
pub use identity::self_signed_certificate;

/// Starts weight servers.
pub struct WeightServer;

impl WeightServer {
    /// Loads and checks the model (or takes the upstream's manifest), binds
    /// the endpoint and starts serving. Must run inside a tokio runtime.
    pub async fn bind(config: ServerConfig) -> Result<RunningServer, Error> {
        let origin = Origin::open(&config.origin, config.weight_dtype).await?;
        let manifest = Arc::new(origin.manifest().clone());
        let weight_dtype = manifest.weight_dtype;
        tracing::info!(
            model = %manifest.model_id,
            revision = %manifest.revision,
            components = manifest.components.len(),
            bytes = manifest.total_bytes(),
            "model loaded"
        );

        let (chain, key, certificate_pem) = match config.identity {
            Identity::SelfSigned => {
                let (certificate, key, pem) = self_signed(config.listen)?;
                (vec![certificate], key, Some(pem))
            }
            Identity::Provided { chain, key } => (chain, key, None),
        };
        let certificate = chain
            .first()
            .cloned()
            .ok_or(surf_transport::Error::NoTrustedCertificates)?;
        let mut quic_config = surf_transport::tls::server_config(chain, key)?;
        let mut transport = surf_transport::tls::transport_config();
        transport.max_concurrent_bidi_streams(config.limits.max_streams_per_connection.into());
        quic_config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(quic_config, config.listen).map_err(|source| {
            Error::Listen {
                addr: config.listen,
                source,
            }
        })?;
        let local_addr = endpoint.local_addr().map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;

        let stats = Arc::new(Stats::default());
        let redis = config
            .redis
            .as_ref()
            .map(|redis| RedisTier::connect(redis, stats.clone()))
            .transpose()?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics_addr = match config.metrics_listen {
            Some(addr) => {
                let listener = metrics::bind_metrics(addr).await?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| Error::MetricsListen { addr, source })?;
                tokio::spawn(metrics::serve_metrics(
                    listener,
                    stats.clone(),
                    cancel.clone(),
                ));
                Some(bound)
            }
            None => None,
        };

        let accepted_reply = Bytes::from(wire::encode_handshake_frame(
            "hello reply",
            PROTOCOL_VERSION,
            &HelloReply::Accepted(Box::new(Manifest::clone(&manifest))),
            limits::HELLO_REPLY,
        )?);
        let shared = Arc::new(Shared {
            cache: ComponentCache::new(config.cache_bytes, stats.clone()),
            origin,
            manifest: manifest.clone(),
            redis,
            stats,
            token_digest: config
                .token
                .as_deref()
                .map(|token| blake3::hash(token.as_bytes())),
            accepted_reply,
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            faults: config.faults,
            admission: Admission::new(&config.limits),
            weight_dtype,
        });
        let accept_task = tokio::spawn(accept_connections(endpoint.clone(), shared.clone()));
        Ok(RunningServer {
            local_addr,
            metrics_addr,
            certificate,
            certificate_pem,
            manifest,
            shared,
            endpoint,
            cancel,
            tracker,
            accept_task: Some(accept_task),
            shutdown_grace: config.shutdown_grace,
        })
    }
}

/// A server that is accepting connections. Dropping it stops it abruptly;
/// [`RunningServer::shutdown`] lets fetches in flight finish first.
pub struct RunningServer {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    certificate: CertificateDer<'static>,
    certificate_pem: Option<String>,
    manifest: Arc<Manifest>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
    tracker: TaskTracker,
    accept_task: Option<JoinHandle<()>>,
    shutdown_grace: Duration,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The leaf certificate that clients pin.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The self-signed certificate in PEM, for clients to pin; `None` when
    /// the certificate was provided (clients already have its file).
    pub fn certificate_pem(&self) -> Option<&str> {
        self.certificate_pem.as_deref()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Stops accepting connections and requests, lets the fetches in flight
    /// finish (up to the configured grace period), then closes everything.
    pub async fn shutdown(mut self) {
        self.endpoint.set_server_config(None);
        self.cancel.cancel();
        if let Some(accept_task) = self.accept_task.take() {
            let _ = accept_task.await;
        }
        self.tracker.close();
        if tokio::time::timeout(self.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.shutdown_grace, "fetches still running at the end of the grace period are cut off");
        }
        self.endpoint
            .close(close_code::SHUTTING_DOWN.into(), b"server shutting down");
        self.shared.origin.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Stops at once, cutting every connection mid-stream, as a crash would.
    pub async fn abort(mut self) {
        self.cancel.cancel();
        self.endpoint
            .close(close_code::SHUTTING_DOWN.into(), b"server stopped");
        if let Some(accept_task) = self.accept_task.take() {
            accept_task.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.endpoint
            .close(close_code::SHUTTING_DOWN.into(), b"server stopped");
    }
}

struct Shared {
    origin: Origin,
    /// The manifest served: the model folder's, or the upstream's unchanged.
    manifest: Arc<Manifest>,
    redis: Option<RedisTier>,
    cache: ComponentCache,
    stats: Arc<Stats>,
    token_digest: Option<blake3::Hash>,
    /// The handshake reply with the manifest, encoded once.
    accepted_reply: Bytes,
    cancel: CancellationToken,
    tracker: TaskTracker,
    faults: Faults,
    weight_dtype: Dtype,
    admission: Admission,
}
