//! `surf embed --server` against servers that refuse or do not answer: the
//! exit status follows the error's kind, and the message names the server.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use surf_server::{ServerConfig, WeightServer};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/all-MiniLM-L6-v2")
}

fn embed_from(server: &str, cert: &Path, token: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surf"))
        .args(["embed", "--server", server, "--server-cert"])
        .arg(cert)
        .args(["--token", token, "hello"])
        .env_remove("SURF_TOKEN")
        .output()
        .expect("surf runs")
}

#[test]
fn a_wrong_token_exits_with_2_and_names_the_server() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut config = ServerConfig::new(model_dir(), ([127, 0, 0, 1], 0).into());
    config.token = Some("the-right-one".into());
    let server = runtime
        .block_on(WeightServer::bind(config))
        .expect("server starts");
    let scratch = tempfile::tempdir().expect("temp dir");
    let cert = scratch.path().join("server.pem");
    std::fs::write(
        &cert,
        server.certificate_pem().expect("a generated certificate"),
    )
    .expect("certificate written");
    let addr = server.local_addr().to_string();

    let output = embed_from(&addr, &cert, "a-wrong-one");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(&addr), "the message names {addr}: {stderr}");
    assert!(stderr.to_lowercase().contains("token"), "{stderr}");
    runtime.block_on(server.shutdown());
}

#[test]
fn an_address_where_nothing_answers_fails_with_1_and_names_it() {
    // A bound UDP port that never answers QUIC: the handshake times out.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
    let addr = silent.local_addr().expect("its address").to_string();
    let scratch = tempfile::tempdir().expect("temp dir");
    let cert = scratch.path().join("server.pem");
    // Any well-formed certificate will do as the pin: none is ever shown.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = runtime
        .block_on(WeightServer::bind(ServerConfig::new(
            model_dir(),
            ([127, 0, 0, 1], 0).into(),
        )))
        .expect("server starts");
    std::fs::write(
        &cert,
        server.certificate_pem().expect("a generated certificate"),
    )
    .expect("certificate written");
    runtime.block_on(server.shutdown());

    let output = embed_from(&addr, &cert, "any");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(&addr), "the message names {addr}: {stderr}");
}
