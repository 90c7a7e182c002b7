//! Where a server's components come from when its own cache does not hold
//! them: its model folder, or another weight server upstream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use surf_transport::wire::FetchRefusal;
use surf_transport::{CertificateDer, ClientConfig, Dtype, Manifest, WeightClient};

use crate::Error;
use crate::metrics::Stats;
use crate::store::ModelStore;

/// What a server serves.
#[derive(Debug, Clone)]
pub enum OriginConfig {
    /// A model folder on this machine.
    Model(PathBuf),
    /// Other weight servers, whose manifest is served unchanged.
    Upstream(UpstreamConfig),
}

/// The servers a regional server pulls from, and how it talks to them.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// In order of preference; the client fails over between them.
    pub servers: Vec<SocketAddr>,
    /// Certificates to pin (the origin's `--cert-out`, or its chain's root).
    pub trusted_certs: Vec<CertificateDer<'static>>,
    pub token: Option<String>,
    /// The upstream's model to serve, by its name there; `None`: its first.
    pub model: Option<String>,
}

impl UpstreamConfig {
    pub fn new(servers: Vec<SocketAddr>, trusted_certs: Vec<CertificateDer<'static>>) -> Self {
        UpstreamConfig {
            servers,
            trusted_certs,
            token: None,
            model: None,
        }
    }
}

/// An opened origin.
pub enum Origin {
    Local(Arc<ModelStore>),
    Upstream(WeightClient),
}

impl Origin {
    /// Opens the model folder, or connects upstream and takes its manifest.
    /// Asks upstream for float weights as `weight_dtype`.
    pub async fn open(config: &OriginConfig, weight_dtype: Dtype) -> Result<Self, Error> {
        match config {
            OriginConfig::Model(model_dir) => {
                let model_dir = model_dir.clone();
                let store =
                    tokio::task::spawn_blocking(move || ModelStore::open(&model_dir, weight_dtype))
                        .await??;
                Ok(Origin::Local(Arc::new(store)))
            }
            OriginConfig::Upstream(upstream) => {
                let mut client_config =
                    ClientConfig::new(upstream.servers.clone(), upstream.trusted_certs.clone());
                client_config.token = upstream.token.clone();
                client_config.weight_dtype = weight_dtype;
                client_config.model = upstream.model.clone();
                let client = WeightClient::connect(client_config)
                    .await
                    .map_err(|source| Error::Upstream {
                        servers: upstream.servers.clone(),
                        source: Box::new(source),
                    })?;
                Ok(Origin::Upstream(client))
            }
        }
    }

    pub fn manifest(&self) -> &Manifest {
        match self {
            Origin::Local(store) => store.manifest(),
            Origin::Upstream(client) => client.manifest(),
        }
    }

    /// The component's bytes when they are already at hand, free: a slice of
    /// the mapped model file.
    pub fn mapped_component(&self, name: &str) -> Option<Bytes> {
        match self {
            Origin::Local(store) => store.mapped_component(name),
            Origin::Upstream(_) => None,
        }
    }

    /// Whether the shared tier is worth asking for `name`: everything that
    /// comes from upstream, but from a local folder only what had to be
    /// converted, since reading the mapped file is faster than Redis.
    pub fn worth_sharing(&self, name: &str) -> bool {
        match self {
            Origin::Local(store) => store.is_converted(name),
            Origin::Upstream(_) => true,
        }
    }

    /// Produces the component's bytes: gathered (and converted) from the
    /// folder, or fetched and hash-checked from upstream.
    pub async fn load(&self, name: &str, stats: &Stats) -> Result<Bytes, FetchRefusal> {
        match self {
            Origin::Local(store) => {
                let (store, name) = (store.clone(), name.to_owned());
                // Gathering and converting touch megabytes: keep them off
                // the async workers.
                tokio::task::spawn_blocking(move || store.gather_component(&name))
                    .await
                    .map_err(|error| FetchRefusal::Internal {
                        detail: error.to_string(),
                    })?
                    .ok_or(FetchRefusal::UnknownObject)
            }
            Origin::Upstream(client) => {
                stats.upstream_fetches.increment();
                let bytes = client.fetch_component(name).await.map_err(|error| {
                    tracing::warn!(component = name, "the upstream fetch failed");
                    upstream_refusal(error)
                })?;
                stats.upstream_bytes.add(bytes.len() as u64);
                Ok(bytes)
            }
        }
    }

    /// The digests of every row of a row table, back to back.
    pub async fn row_hashes(&self, table: &str) -> Result<Bytes, FetchRefusal> {
        match self {
            Origin::Local(store) => store.row_hashes(table).ok_or(FetchRefusal::UnknownObject),
            Origin::Upstream(client) => {
                let digests = client.row_hashes(table).await.map_err(upstream_refusal)?;
                Ok(digests.iter().flat_map(|digest| digest.0).collect())
            }
        }
    }

    /// Rows of a row table as served, back to back: read from the folder,
    /// or fetched and hash-checked from upstream.
    pub async fn rows(&self, table: &str, rows: Vec<u32>) -> Result<Bytes, FetchRefusal> {
        match self {
            Origin::Local(store) => {
                let (store, table) = (store.clone(), table.to_owned());
                // Rows of a large table may not be in the page cache yet.
                tokio::task::spawn_blocking(move || store.rows(&table, &rows))
                    .await
                    .map_err(|error| FetchRefusal::Internal {
                        detail: error.to_string(),
                    })?
                    .ok_or(FetchRefusal::UnknownObject)?
            }
            Origin::Upstream(client) => {
                let bytes = client
                    .fetch_rows(table, &rows)
                    .await
                    .map_err(upstream_refusal)?;
                Ok(Bytes::from(bytes))
            }
        }
    }

    /// Closes the upstream connection politely.
    pub async fn close(&self) {
        if let Origin::Upstream(client) = self {
            client.close().await;
        }
    }
}

/// What a client of this server is told when upstream failed.
fn upstream_refusal(error: surf_transport::Error) -> FetchRefusal {
    tracing::warn!(%error, "an upstream fetch failed");
    FetchRefusal::Internal {
        detail: format!("upstream: {error}"),
    }
}
