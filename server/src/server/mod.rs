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
use crate::origin::OriginConfig;
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
        let catalog = open_catalog(&config).await?;
        let manifest = Arc::clone(&catalog[0].manifest);

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

        let shared = Arc::new(Shared {
            cache: ComponentCache::new(config.cache_bytes, stats.clone()),
            catalog,
            redis,
            stats,
            token_digest: config
                .token
                .as_deref()
                .map(|token| blake3::hash(token.as_bytes())),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            faults: config.faults,
            admission: Admission::new(&config.limits),
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

    /// The first model's manifest, in the first dtype served.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Every (model name, manifest) served, each model in each dtype.
    pub fn manifests(&self) -> Vec<(String, Arc<Manifest>)> {
        self.shared
            .catalog
            .iter()
            .map(|served| (served.name.clone(), Arc::clone(&served.manifest)))
            .collect()
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
        for served in &self.shared.catalog {
            served.origin.close().await;
        }
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
    /// Every model in every dtype served; a client's hello picks one.
    catalog: Vec<Arc<Served>>,
    redis: Option<RedisTier>,
    cache: ComponentCache,
    stats: Arc<Stats>,
    token_digest: Option<blake3::Hash>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    faults: Faults,
    admission: Admission,
}

/// One model in one dtype, as a connection is served it.
struct Served {
    /// Its place in the catalog, which keys its components in the cache.
    index: usize,
    /// The name clients ask for it by.
    name: String,
    dtype: Dtype,
    origin: Origin,
    /// The manifest served: the model folder's, or the upstream's unchanged.
    manifest: Arc<Manifest>,
    /// The handshake reply with the manifest, encoded once.
    accepted_reply: Bytes,
}

impl Served {
    /// The cache key of one of its components: models and dtypes apart.
    fn cache_key(&self, component: &str) -> String {
        format!("{}/{}", self.index, component)
    }
}

/// Opens every model in every dtype the config names, the first model in
/// the first dtype first.
async fn open_catalog(config: &ServerConfig) -> Result<Vec<Arc<Served>>, Error> {
    let mut models = vec![(config.model_name.clone(), &config.origin)];
    models.extend(
        config
            .extra_models
            .iter()
            .map(|(name, origin)| (Some(name.clone()), origin)),
    );
    let mut dtypes = vec![config.weight_dtype];
    for &dtype in &config.extra_dtypes {
        if !dtypes.contains(&dtype) {
            dtypes.push(dtype);
        }
    }
    let mut catalog: Vec<Arc<Served>> = Vec::new();
    for (name, origin_config) in models {
        for &dtype in &dtypes {
            let origin = Origin::open(origin_config, dtype).await?;
            let manifest = Arc::new(origin.manifest().clone());
            let name = name
                .clone()
                .unwrap_or_else(|| default_name(origin_config, &manifest));
            if catalog
                .iter()
                .any(|served| served.name == name && served.dtype == dtype)
            {
                return Err(Error::Config(format!(
                    "two models are named `{name}`; give each a name of its own (NAME=DIR)"
                )));
            }
            tracing::info!(
                model = %name,
                id = %manifest.model_id,
                dtype = %manifest.weight_dtype,
                revision = %manifest.revision,
                components = manifest.components.len(),
                bytes = manifest.total_bytes(),
                "model loaded"
            );
            let accepted_reply = Bytes::from(wire::encode_handshake_frame(
                "hello reply",
                PROTOCOL_VERSION,
                &HelloReply::Accepted(Box::new(Manifest::clone(&manifest))),
                limits::HELLO_REPLY,
            )?);
            catalog.push(Arc::new(Served {
                index: catalog.len(),
                name,
                dtype,
                origin,
                manifest,
                accepted_reply,
            }));
        }
    }
    Ok(catalog)
}

/// The name of a model given none: its folder's, or the upstream's id.
fn default_name(origin: &OriginConfig, manifest: &Manifest) -> String {
    match origin {
        OriginConfig::Model(dir) => dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| manifest.model_id.clone()),
        OriginConfig::Upstream(upstream) => upstream
            .model
            .clone()
            .unwrap_or_else(|| manifest.model_id.clone()),
    }
}
