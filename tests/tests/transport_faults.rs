//! Damaged bytes, stalled servers and servers that stop mid-fetch: the client
//! catches the damage, resumes from the last good offset and fails over.

mod transport_support;

use std::time::Duration;

use surf_server::ServerConfig;
use surf_server::fault::FaultPlan;
use surf_transport::{ClientConfig, Error, ErrorKind, WeightClient};
use transport_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bits_flipped_in_flight_are_caught_and_fetched_again() {
    let model = model_dir();
    let file = file_tensors(&model);
    let plan = FaultPlan::new()
        .corrupt("embeddings", 10, 1)
        .corrupt("encoder.layer.1", 1_500_000, 2)
        .corrupt("head", 0, 1);
    let server =
        start_server(ServerConfig::new(&model, loopback()).with_faults(plan.clone())).await;
    let client = connect(&[&server]).await;

    fetch_and_check_whole_model(&client, &file).await;

    assert_eq!(plan.bits_flipped(), 4, "every planned fault was committed");
    let components = server.manifest().components.len() as u64;
    let stats = server.stats();
    assert_eq!(
        stats.requests,
        components + 4,
        "one retry per damaged reply"
    );
    // Retries resume at the damaged chunk: the bytes sent past the damage
    // before the client stopped the stream are all that is sent twice.
    assert!(stats.bytes_served < 2 * server.manifest().total_bytes());
    client.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_stay_damaged_are_never_handed_on() {
    let plan = FaultPlan::new().corrupt("head", 5, u32::MAX);
    let server =
        start_server(ServerConfig::new(model_dir(), loopback()).with_faults(plan.clone())).await;
    let client = connect(&[&server]).await;

    let result = client.fetch_component("head").await;
    match result {
        Err(Error::RetriesExhausted { last, attempts, .. }) => {
            assert!(matches!(*last, Error::HashMismatch { start: 0, .. }));
            assert_eq!(attempts, client_config(&[&server]).retry.max_attempts);
        }
        other => panic!("expected the fetch to give up, got {other:?}"),
    }
    client.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_mid_fetch_is_replaced_by_the_next_one() {
    let model = model_dir();
    let file = file_tensors(&model);
    // Well inside the model's 11 MB of components: the word table is served
    // by rows, outside them.
    let plan = FaultPlan::new().stall_after_bytes(4 << 20);
    let first = start_server(ServerConfig::new(&model, loopback()).with_faults(plan.clone())).await;
    let second = start_server(ServerConfig::new(&model, loopback())).await;
    let client = connect(&[&first, &second]).await;
    let total = client.manifest().total_bytes();

    let fetch = tokio::spawn({
        let client = client.clone();
        let file = file.clone();
        async move { fetch_and_check_whole_model(&client, &file).await }
    });
    plan.stalled().await;
    let served_by_first = first.stats().bytes_served;
    first.abort().await;
    fetch
        .await
        .expect("the whole model arrives from the second server");

    assert_eq!(client.current_server().await, Some(second.local_addr()));
    let served_by_second = second.stats().bytes_served;
    assert!(served_by_first > 0);
    assert!(
        served_by_second < total,
        "the second server sent {served_by_second} of {total} bytes: interrupted fetches resumed"
    );
    client.close().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_is_failed_over() {
    let model = model_dir();
    let file = file_tensors(&model);
    let plan = FaultPlan::new().stall_after_bytes(5 << 20);
    let silent =
        start_server(ServerConfig::new(&model, loopback()).with_faults(plan.clone())).await;
    let healthy = start_server(ServerConfig::new(&model, loopback())).await;
    let mut config = client_config(&[&silent, &healthy]);
    config.timeouts.response = Duration::from_millis(500);
    let client = WeightClient::connect(config).await.expect("connects");

    let name = "encoder.layer.0";
    let bytes = client
        .fetch_component(name)
        .await
        .expect("the layer arrives");
    assert_component_matches_file(client.manifest(), name, &bytes, &file);
    assert_eq!(client.current_server().await, Some(healthy.local_addr()));
    assert!(healthy.stats().bytes_served < bytes.len() as u64);
    client.close().await;
    healthy.shutdown().await;
    silent.abort().await;
}

/// Far more than any fetch below may take: only a hang reaches it.
const HANG_GUARD: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_sending_mid_component_fails_the_fetch_at_its_deadline() {
    // A layer (1.8 MB), not the pinned component, which is small now that
    // the word table is served by rows.
    let plan = FaultPlan::new().stall_after_bytes(1 << 20);
    let server =
        start_server(ServerConfig::new(model_dir(), loopback()).with_faults(plan.clone())).await;
    let mut config = client_config(&[&server]);
    // Each silence alone is tolerated for longer than the whole fetch.
    config.timeouts.response = Duration::from_secs(60);
    config.timeouts.fetch = Duration::from_secs(2);
    let client = WeightClient::connect(config).await.expect("connects");

    let result = tokio::time::timeout(HANG_GUARD, client.fetch_component("encoder.layer.0"))
        .await
        .expect("the fetch ends by itself");
    match &result {
        Err(Error::FetchDeadline {
            object,
            server: Some(addr),
            timeout,
            received,
            expected,
        }) => {
            assert_eq!(object, "component encoder.layer.0");
            assert_eq!(*addr, server.local_addr());
            assert_eq!(*timeout, Duration::from_secs(2));
            assert!(received < expected, "{received} of {expected}");
        }
        other => panic!("expected the fetch deadline, got {other:?}"),
    }
    let error = result.expect_err("no bytes");
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    let message = error.to_string();
    assert!(
        message.contains("encoder.layer.0") && message.contains(&server.local_addr().to_string()),
        "{message}"
    );
    client.close().await;
    server.abort().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_where_nothing_answers_is_unavailable() {
    // A bound socket that never reads: the handshake gets no answer at all,
    // not even an ICMP refusal.
    let silent = std::net::UdpSocket::bind(loopback()).expect("a UDP socket");
    let (certificate, _) =
        surf_server::self_signed_certificate(loopback()).expect("a certificate to pin");
    let config = ClientConfig::new(vec![silent.local_addr().expect("bound")], vec![certificate]);
    let result = tokio::time::timeout(HANG_GUARD, WeightClient::connect(config))
        .await
        .expect("connecting ends by itself");
    let error = result.err().expect("nothing answered");
    assert!(
        matches!(error, Error::ConnectTimeout { addr, .. } if addr == silent.local_addr().expect("bound")),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::Unavailable);
}

/// Many clients while the server damages replies: run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stress test: 48 clients fetch the whole model"]
async fn stress_many_clients_through_damaged_replies() {
    let model = model_dir();
    let file = file_tensors(&model);
    let plan = FaultPlan::new()
        // Inside the position table: the word table is served by rows.
        .corrupt("embeddings", 1 << 19, 5)
        .corrupt("encoder.layer.5", 0, 5);
    let server =
        start_server(ServerConfig::new(&model, loopback()).with_faults(plan.clone())).await;
    let mut clients = Vec::new();
    for _ in 0..48 {
        let file = file.clone();
        let config = client_config(&[&server]);
        clients.push(tokio::spawn(async move {
            let client = WeightClient::connect(config).await.expect("connects");
            fetch_and_check_whole_model(&client, &file).await;
            client.close().await;
        }));
    }
    for client in clients {
        client.await.expect("every client gets the whole model");
    }
    assert_eq!(plan.bits_flipped(), 10);
    server.shutdown().await;
}
