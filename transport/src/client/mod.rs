//! `WeightClient`: fetches verified weight bytes from a list of servers.
//!
//! `config` holds what the client is told, `handshake` opens a connection
//! to one server, `links` keeps the connections and whose turn it is,
//! `fetch` drives one fetch's attempts and `assembly` checks its bytes.

mod assembly;
mod config;
mod fetch;
mod handshake;
mod links;
mod rows;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Mutex;

use crate::error::ServerFailure;
use crate::manifest::Manifest;
use crate::rotation::Rotation;
use crate::wire::{ObjectRef, close_code};
use crate::{Error, tls};

use assembly::{Assembly, Verification};
pub use config::{ClientConfig, RetryPolicy, Timeouts};
use handshake::handshake;
use links::{Link, Servers, collapse_failures};

/// A connection to the weight servers. Cloning is cheap and clones share the
/// connection, so fetches from many tasks run at once on one QUIC connection.
#[derive(Clone)]
pub struct WeightClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    manifest: Manifest,
    servers: Mutex<Servers>,
    /// Each row table's list of row hashes, fetched on first use.
    row_hashes: rows::RowHashLists,
}

impl WeightClient {
    /// Connects to the first server of the list that answers and takes its
    /// manifest.
    pub async fn connect(config: ClientConfig) -> Result<Self, Error> {
        if config.servers.is_empty() {
            return Err(Error::NoServers);
        }
        let quic_config = tls::client_config(&config.trusted_certs)?;
        let bind_addr: SocketAddr = if config.servers.iter().all(SocketAddr::is_ipv4) {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind_addr).map_err(|source| Error::Bind {
            addr: bind_addr,
            source,
        })?;
        endpoint.set_default_client_config(quic_config);

        let mut failures = Vec::new();
        for (index, &addr) in config.servers.iter().enumerate() {
            match handshake(&endpoint, addr, &config).await {
                Ok((connection, manifest)) => {
                    manifest.validate()?;
                    let mut links = vec![None; config.servers.len()];
                    links[index] = Some(Link {
                        connection,
                        server: index,
                        id: 0,
                    });
                    let mut rotation = Rotation::new(config.servers.len());
                    rotation.start_at(index);
                    // Every server before this one failed to connect.
                    for failed in 0..index {
                        rotation.failed(failed, Instant::now());
                    }
                    let servers = Servers {
                        links,
                        rotation,
                        last_used: Some(index),
                        links_made: 1,
                    };
                    return Ok(WeightClient {
                        inner: Arc::new(ClientInner {
                            config,
                            endpoint,
                            manifest,
                            servers: Mutex::new(servers),
                            row_hashes: rows::RowHashLists::default(),
                        }),
                    });
                }
                Err(error) => {
                    tracing::warn!(%addr, %error, "weight server unavailable");
                    failures.push(ServerFailure {
                        addr,
                        error: Box::new(error),
                    });
                }
            }
        }
        Err(collapse_failures(failures))
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// The server of the last fetch attempt, if its connection is open.
    pub async fn current_server(&self) -> Option<SocketAddr> {
        let servers = self.inner.servers.lock().await;
        let index = servers.last_used?;
        servers.links[index]
            .as_ref()
            .filter(|link| link.connection.close_reason().is_none())
            .map(|_| self.inner.config.servers[index])
    }

    /// Fetches all bytes of a component, checked against the manifest's
    /// hashes; damaged bytes are fetched again, never returned.
    pub async fn fetch_component(&self, name: &str) -> Result<Bytes, Error> {
        let component =
            self.inner
                .manifest
                .component(name)
                .ok_or_else(|| Error::UnknownComponent {
                    name: name.to_owned(),
                })?;
        let verification = Verification {
            segments: self.inner.manifest.chunk_ends(component),
            whole: Some(component.hash),
        };
        self.fetch_verified(
            ObjectRef::Component(component.name.clone()),
            component.byte_len,
            &verification,
        )
        .await
    }

    /// Fetches one tensor (by its prefix-free name), checked against its hash.
    pub async fn fetch_tensor(&self, name: &str) -> Result<Bytes, Error> {
        let (_, tensor) = self
            .inner
            .manifest
            .tensor(name)
            .ok_or_else(|| Error::UnknownTensor {
                name: name.to_owned(),
            })?;
        let verification = Verification {
            segments: vec![(tensor.byte_len, tensor.hash)],
            whole: None,
        };
        self.fetch_verified(
            ObjectRef::Tensor(tensor.name.clone()),
            tensor.byte_len,
            &verification,
        )
        .await
    }

    /// Fetches a byte range of an object once, from the current server,
    /// without hash checks or retries: for tools that inspect a server.
    pub async fn fetch_unverified_range(
        &self,
        object: ObjectRef,
        range: Range<u64>,
    ) -> Result<Bytes, Error> {
        let mut assembly = Assembly::new(object.to_string(), range.start, range.end, None)?;
        let link = self.link().await?;
        let fetch = self.fetch_once(&link, &object, &mut assembly);
        match tokio::time::timeout(self.inner.config.timeouts.fetch, fetch).await {
            Ok(result) => result?,
            Err(_elapsed) => return Err(self.deadline_error(&object, Some(&link), &assembly)),
        }
        Ok(Bytes::from(assembly.data))
    }

    /// Closes the connections politely and waits for the servers to hear it.
    pub async fn close(&self) {
        let mut servers = self.inner.servers.lock().await;
        for link in servers.links.iter_mut().filter_map(Option::take) {
            link.connection.close(close_code::DONE.into(), b"done");
        }
        drop(servers);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }
}
