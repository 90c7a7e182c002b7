//! Accepting connections: each one greeted, then its fetch streams served
//! until it goes away.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Stats;

use super::fetch::serve_fetch;
use super::greeting::greet;
use super::{ConnectionLimits, Shared};

/// How many connections may be served, and be in their handshake, at once.
pub(super) struct Admission {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
}

impl Admission {
    pub(super) fn new(limits: &ConnectionLimits) -> Self {
        Admission {
            connections: Arc::new(Semaphore::new(limits.max_connections as usize)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes as usize)),
        }
    }

    /// Room for one more connection and its handshake, or `None` when the
    /// server is full: a client refused at once can try another server,
    /// where one left waiting would only time out.
    fn admit(&self) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let connection = self.connections.clone().try_acquire_owned().ok()?;
        let handshake = self.handshakes.clone().try_acquire_owned().ok()?;
        Some((connection, handshake))
    }
}

pub(super) async fn accept_connections(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            () = shared.cancel.cancelled() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let Some((connection_permit, handshake_permit)) = shared.admission.admit() else {
            tracing::warn!(peer = %incoming.remote_address(), "connection refused: the server is at its connection limit");
            shared.stats.connections_refused.increment();
            incoming.refuse();
            continue;
        };
        let connection_shared = shared.clone();
        shared.tracker.spawn(async move {
            let _connection_permit = connection_permit;
            match incoming.await {
                Ok(connection) => {
                    serve_connection(connection, connection_shared, handshake_permit).await;
                }
                Err(error) => tracing::debug!(%error, "QUIC handshake failed"),
            }
        });
    }
}

/// Decrements the active-connection gauge however the connection ends.
struct ActiveConnection<'a>(&'a Stats);

impl Drop for ActiveConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_active.decrement();
    }
}

async fn serve_connection(
    connection: quinn::Connection,
    shared: Arc<Shared>,
    handshake_permit: OwnedSemaphorePermit,
) {
    let peer = connection.remote_address();
    shared.stats.connections.increment();
    shared.stats.connections_active.increment();
    let _active = ActiveConnection(&shared.stats);

    let served = tokio::select! {
        () = shared.cancel.cancelled() => None,
        served = greet(&connection, &shared) => served,
    };
    drop(handshake_permit);
    let Some(served) = served else {
        return;
    };
    tracing::debug!(%peer, "client connected");
    loop {
        let stream = tokio::select! {
            () = shared.cancel.cancelled() => return,
            stream = connection.accept_bi() => stream,
        };
        match stream {
            Ok((send, recv)) => {
                let fetch_shared = shared.clone();
                let fetch_connection = connection.clone();
                let fetch_served = Arc::clone(&served);
                shared.tracker.spawn(async move {
                    serve_fetch(fetch_connection, send, recv, &fetch_shared, &fetch_served).await;
                });
            }
            Err(error) => {
                tracing::debug!(%peer, %error, "client gone");
                return;
            }
        }
    }
}
