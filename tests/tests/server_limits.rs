//! A server takes on no more connections than it is allowed: clients past
//! the limit are refused at once with a clear error, while those it serves
//! are undisturbed.

mod transport_support;

use std::time::Duration;

use surf_server::{ConnectionLimits, ServerConfig};
use surf_transport::{Error, ErrorKind, WeightClient};
use transport_support::*;

/// Far more than anything below may take: only a hang reaches it.
const HANG_GUARD: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_connection_limit_is_refused_while_the_first_is_served() {
    let config = ServerConfig {
        limits: ConnectionLimits {
            max_connections: 1,
            ..ConnectionLimits::default()
        },
        ..ServerConfig::new(model_dir(), loopback())
    };
    let server = start_server(config).await;
    let first = connect(&[&server]).await;
    first
        .fetch_component("head")
        .await
        .expect("the first client is served");

    let second = tokio::time::timeout(HANG_GUARD, WeightClient::connect(client_config(&[&server])))
        .await
        .expect("the refusal comes at once");
    match second {
        Err(Error::ServerBusy { addr }) => assert_eq!(addr, server.local_addr()),
        Err(other) => panic!("expected a refusal for the connection limit, got {other}"),
        Ok(_) => panic!("a second client was let in past a limit of one"),
    }
    assert_eq!(
        Error::ServerBusy {
            addr: server.local_addr()
        }
        .kind(),
        ErrorKind::Unavailable
    );
    assert_eq!(server.stats().connections_refused, 1);

    let bytes = first
        .fetch_component("encoder.layer.0")
        .await
        .expect("the first client is still served");
    assert!(!bytes.is_empty());

    // Once the first client leaves, its slot is free again.
    first.close().await;
    tokio::time::timeout(HANG_GUARD, async {
        while server.stats().connections_active > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the server notices the first client leave");
    let third = tokio::time::timeout(HANG_GUARD, WeightClient::connect(client_config(&[&server])))
        .await
        .expect("connecting ends by itself")
        .expect("a freed slot takes a new client");
    third.close().await;
    server.shutdown().await;
}
