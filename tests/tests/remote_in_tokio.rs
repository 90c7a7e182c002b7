//! A `RemoteSource` called from inside tokio, as a service's handlers do:
//! from a multi-thread runtime's task and its `block_on`, from a
//! current-thread runtime, and the one arrangement that cannot work (a
//! current-thread runtime waiting on itself), which must fail, not hang.

use surf_engine::{RemoteSource, WeightSource};
use surf_server::{RunningServer, ServerConfig, WeightServer};
use surf_transport::{ClientConfig, WeightClient};

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A weight server of the default model, and a client of it, both on `runtime`.
fn server_and_client(runtime: &tokio::runtime::Runtime) -> (RunningServer, WeightClient) {
    let server = runtime
        .block_on(WeightServer::bind(ServerConfig::new(
            surf_tests::minilm_dir(),
            ([127, 0, 0, 1], 0).into(),
        )))
        .expect("server starts");
    let config = ClientConfig::new(
        vec![server.local_addr()],
        vec![server.certificate_der().clone()],
    );
    let client = runtime
        .block_on(WeightClient::connect(config))
        .expect("client connects");
    (server, client)
}

fn check_layer(fetched: surf_engine::Result<surf_engine::source::FetchedComponent>) {
    let fetched = fetched.expect("the layer arrives");
    assert!(fetched.bytes > 1_000_000, "a MiniLM layer is about 7 MB");
}

#[test]
fn a_remote_source_fetches_from_inside_a_multi_thread_runtime() {
    let runtime = multi_thread();
    let (_server, client) = server_and_client(&runtime);
    let source = std::sync::Arc::new(RemoteSource::new(client, runtime.handle().clone()));
    // In the runtime's own block_on, and in one of its tasks.
    check_layer(runtime.block_on(async { source.fetch("encoder.layer.0") }));
    let in_task = std::sync::Arc::clone(&source);
    let fetched = runtime
        .block_on(runtime.spawn(async move { in_task.fetch("encoder.layer.1") }))
        .expect("the task completes");
    check_layer(fetched);
    assert!(source.spec().is_ok());
}

#[test]
fn a_remote_source_fetches_from_inside_a_current_thread_runtime() {
    let network = multi_thread();
    let (_server, client) = server_and_client(&network);
    let source = RemoteSource::new(client, network.handle().clone());
    let caller = current_thread();
    check_layer(caller.block_on(async { source.fetch("encoder.layer.2") }));
}

#[test]
fn a_current_thread_runtime_waiting_on_itself_is_an_error_not_a_hang() {
    let runtime = current_thread();
    let (_server, client) = server_and_client(&runtime);
    let source = RemoteSource::new(client, runtime.handle().clone());
    let result = runtime.block_on(async { source.fetch("encoder.layer.0") });
    let error = result.err().expect("no way to drive the fetch");
    assert!(
        error.to_string().contains("current-thread runtime"),
        "{error}"
    );
}

#[test]
fn connecting_and_dropping_a_source_inside_a_runtime_does_not_panic() {
    let network = multi_thread();
    let (server, _client) = server_and_client(&network);
    let config = ClientConfig::new(
        vec![server.local_addr()],
        vec![server.certificate_der().clone()],
    );
    let caller = multi_thread();
    caller.block_on(async move {
        let source = RemoteSource::connect(config).expect("connects from inside tokio");
        check_layer(source.fetch("encoder.layer.3"));
        drop(source);
    });
}
