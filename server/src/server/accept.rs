//! Accepting connections: each one greeted, then its fetch streams served
//! until it goes away.

use std::sync::Arc;

use crate::metrics::Stats;

use super::Shared;
use super::fetch::serve_fetch;
use super::greeting::greet;

pub(super) async fn accept_connections(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            () = shared.cancel.cancelled() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let connection_shared = shared.clone();
        shared.tracker.spawn(async move {
            match incoming.await {
                Ok(connection) => serve_connection(connection, connection_shared).await,
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

async fn serve_connection(connection: quinn::Connection, shared: Arc<Shared>) {
    let peer = connection.remote_address();
    shared.stats.connections.increment();
    shared.stats.connections_active.increment();
    let _active = ActiveConnection(&shared.stats);

    let accepted = tokio::select! {
        () = shared.cancel.cancelled() => false,
        accepted = greet(&connection, &shared) => accepted,
    };
    if !accepted {
        return;
    }
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
                shared.tracker.spawn(async move {
                    serve_fetch(fetch_connection, send, recv, &fetch_shared).await;
                });
            }
            Err(error) => {
                tracing::debug!(%peer, %error, "client gone");
                return;
            }
        }
    }
}
