//! `surf serve` as a process: first stdout line, pinned certificate, token,
//! metrics, SIGTERM, and the exit status for a broken model folder.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use surf_transport::{ClientConfig, WeightClient, tls};

fn model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the MiniLM model is missing at {}: run `bash assets/fetch-model.sh` first",
        dir.display()
    );
    dir
}

fn surf() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_surf"));
    command.env_remove("SURF_TOKEN");
    command
}

/// Stops the server process even when an assertion fails first.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("the metrics port answers");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("request sent");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response read");
    response
}

#[test]
fn serve_prints_its_address_pins_its_certificate_and_stops_on_sigterm() {
    let scratch = tempfile::tempdir().expect("a temp dir");
    let cert_path = scratch.path().join("server.pem");
    let child = surf()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--model")
        .arg(model_dir())
        .arg("--cert-out")
        .arg(&cert_path)
        .args(["--token", "let-me-in"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("surf starts");
    let mut server = ServerProcess(child);
    let mut stdout = BufReader::new(server.0.stdout.take().expect("stdout"));
    let mut stderr = BufReader::new(server.0.stderr.take().expect("stderr"));

    let mut first_line = String::new();
    stdout.read_line(&mut first_line).expect("a first line");
    let addr: SocketAddr = first_line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first_line:?}"))
        .parse()
        .expect("a socket address");
    assert_ne!(addr.port(), 0, "the real port is printed");

    let metrics_addr: SocketAddr = loop {
        let mut line = String::new();
        assert_ne!(
            stderr.read_line(&mut line).expect("stderr reads"),
            0,
            "no metrics line"
        );
        if let Some(rest) = line.trim_end().strip_prefix("metrics on http://") {
            break rest
                .trim_end_matches("/metrics")
                .parse()
                .expect("an address");
        }
    };

    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let trusted = tls::load_certificates_pem(&cert_path).expect("the written certificate");
        let mut config = ClientConfig::new(vec![addr], trusted);
        config.token = Some("let-me-in".into());
        let client = WeightClient::connect(config)
            .await
            .expect("connects with the pin");
        let pooler = client
            .fetch_component("head")
            .await
            .expect("pooler arrives");
        assert!(!pooler.is_empty());
        client.close().await;
    });

    let metrics = http_get(metrics_addr, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    for name in [
        "surf_server_connections_total 1",
        "surf_server_requests_total 1",
        "surf_server_bytes_served_total",
        "surf_server_cache_hits_total",
        "surf_server_cache_misses_total",
        "surf_server_cache_evictions_total",
        "surf_server_cache_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    assert!(http_get(metrics_addr, "/other").starts_with("HTTP/1.1 404"));

    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let exit = server.0.wait().expect("surf exits");
    assert!(
        exit.success(),
        "surf serve exits cleanly on SIGTERM: {exit:?}"
    );
}

#[test]
fn serve_refuses_a_broken_model_folder_with_exit_status_2() {
    let scratch = tempfile::tempdir().expect("a temp dir");
    std::fs::write(
        scratch.path().join("model.safetensors"),
        b"\x10\0\0\0\0\0\0\0{not json at all}",
    )
    .expect("writes");
    let output = surf()
        .arg("serve")
        .arg("--model")
        .arg(scratch.path())
        .args(["--listen", "127.0.0.1:0"])
        .arg("--cert-out")
        .arg(scratch.path().join("cert.pem"))
        .output()
        .expect("surf runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty(), "nothing is announced");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("not a valid safetensors file"),
        "{stderr}"
    );
}
