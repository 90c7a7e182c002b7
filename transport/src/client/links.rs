//! The connections to the servers: made when a server's turn first comes,
//! dropped and set aside when it misbehaves.

use std::time::Instant;

use crate::Error;
use crate::error::ServerFailure;
use crate::rotation::Rotation;
use crate::wire::close_code;

use super::WeightClient;
use super::handshake::handshake;

/// The connections to the servers, and whose turn it is.
pub(super) struct Servers {
    /// One per server of the list, made when its turn first comes.
    pub(super) links: Vec<Option<Link>>,
    pub(super) rotation: Rotation,
    /// The server of the link handed out last.
    pub(super) last_used: Option<usize>,
    pub(super) links_made: u64,
}

#[derive(Clone)]
pub(super) struct Link {
    pub(super) connection: quinn::Connection,
    pub(super) server: usize,
    pub(super) id: u64,
}

impl WeightClient {
    /// The connection to the server whose turn it is, made if needed; a
    /// server that cannot be reached is set aside and the next one asked.
    pub(super) async fn link(&self) -> Result<Link, Error> {
        let mut servers = self.inner.servers.lock().await;
        let order = servers.rotation.order(Instant::now());
        let addrs = &self.inner.config.servers;
        let mut failures = Vec::new();
        for index in order {
            if let Some(link) = &servers.links[index] {
                if link.connection.close_reason().is_none() {
                    let link = link.clone();
                    servers.last_used = Some(index);
                    return Ok(link);
                }
                servers.links[index] = None;
            }
            let addr = addrs[index];
            let outcome = handshake(&self.inner.endpoint, addr, &self.inner.config)
                .await
                .and_then(|(connection, manifest)| {
                    if manifest.revision == self.inner.manifest.revision {
                        Ok(connection)
                    } else {
                        connection.close(close_code::DONE.into(), b"revision mismatch");
                        Err(Error::RevisionMismatch {
                            addr,
                            expected: self.inner.manifest.revision.clone(),
                            found: manifest.revision,
                        })
                    }
                });
            match outcome {
                Ok(connection) => {
                    tracing::info!(%addr, "connected to weight server");
                    let link = Link {
                        connection,
                        server: index,
                        id: servers.links_made,
                    };
                    servers.links_made += 1;
                    servers.links[index] = Some(link.clone());
                    servers.rotation.succeeded(index);
                    servers.last_used = Some(index);
                    return Ok(link);
                }
                Err(error) => {
                    tracing::warn!(%addr, %error, "weight server unavailable");
                    servers.rotation.failed(index, Instant::now());
                    failures.push(ServerFailure {
                        addr,
                        error: Box::new(error),
                    });
                }
            }
        }
        // Servers that all answer that they serve another dtype are no
        // passing outage: the dtype error itself ends the fetch.
        if all_dtype_unavailable(&failures) {
            return Err(*failures.swap_remove(0).error);
        }
        Err(Error::NoServerReachable { failures })
    }

    /// Drops a link that misbehaved (unless another task already replaced
    /// it) and sets its server aside, so that the next attempts go to the
    /// others.
    pub(super) async fn abandon(&self, link: &Link) {
        let mut servers = self.inner.servers.lock().await;
        let live = &mut servers.links[link.server];
        if live.as_ref().is_some_and(|live| live.id == link.id) {
            *live = None;
            servers.rotation.failed(link.server, Instant::now());
        }
        link.connection
            .close(close_code::UNRESPONSIVE.into(), b"failing over");
    }
}

/// The error of a connect that no server of the list accepted: the one
/// failure itself when there was one, the first dtype refusal when every
/// server answered that it serves another weight dtype, the whole list
/// otherwise.
pub(super) fn collapse_failures(mut failures: Vec<ServerFailure>) -> Error {
    if failures.len() == 1 || all_dtype_unavailable(&failures) {
        return *failures.swap_remove(0).error;
    }
    Error::NoServerReachable { failures }
}

fn all_dtype_unavailable(failures: &[ServerFailure]) -> bool {
    !failures.is_empty()
        && failures
            .iter()
            .all(|failure| matches!(*failure.error, Error::DtypeUnavailable { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use crate::error::Recovery;
    use crate::manifest::Dtype;

    fn failure(port: u16, error: Error) -> ServerFailure {
        ServerFailure {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            error: Box::new(error),
        }
    }

    fn dtype_unavailable(port: u16) -> Error {
        Error::DtypeUnavailable {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            requested: Dtype::F16,
            served: Dtype::F32,
        }
    }

    #[test]
    fn servers_that_all_serve_another_dtype_give_the_dtype_error() {
        let error = collapse_failures(vec![
            failure(1, dtype_unavailable(1)),
            failure(2, dtype_unavailable(2)),
        ]);
        assert!(
            matches!(
                error,
                Error::DtypeUnavailable {
                    addr,
                    requested: Dtype::F16,
                    served: Dtype::F32,
                } if addr.port() == 1
            ),
            "{error}"
        );
        assert!(error.is_bad_input());
        assert_eq!(error.recovery(), Recovery::GiveUp);
        assert!(
            error.to_string().contains("start it with --dtype f16"),
            "{error}"
        );
    }

    #[test]
    fn a_dtype_refusal_among_outages_keeps_the_whole_list() {
        let timeout = Error::Timeout {
            during: "waiting for the manifest",
            timeout: Duration::from_secs(1),
        };
        let error = collapse_failures(vec![failure(1, timeout), failure(2, dtype_unavailable(2))]);
        assert!(
            matches!(&error, Error::NoServerReachable { failures } if failures.len() == 2),
            "{error}"
        );
        assert!(error.to_string().contains("serves f32 weights, not f16"));
        assert!(!error.is_bad_input());
    }
}
