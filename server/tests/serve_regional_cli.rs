//! `surf serve --upstream ... --redis ...` as processes: a regional server
//! in front of an origin, its metrics, and a wrong upstream token.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use surf_tests::minilm_dir;
use surf_tests::redis_server::RedisServer;
use surf_transport::{ClientConfig, WeightClient, tls};

/// The token the origins of these tests ask for.
const ORIGIN_TOKEN: &str = "origin-secret";

fn surf() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_surf"));
    command
        .env_remove("SURF_TOKEN")
        .env_remove("SURF_UPSTREAM_TOKEN");
    command
}

/// A `surf serve` process, killed when dropped, with the address it printed
/// and its stderr for later lines.
struct Served {
    child: Child,
    addr: SocketAddr,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&std::ffi::OsStr]) -> Served {
    let mut child = surf()
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("surf starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut first_line = String::new();
    stdout.read_line(&mut first_line).expect("a first line");
    let addr = first_line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first_line:?}"))
        .parse()
        .expect("a socket address");
    Served {
        child,
        addr,
        stderr,
    }
}

/// An origin serving MiniLM behind [`ORIGIN_TOKEN`], its certificate
/// written to `pem`.
fn serve_origin(pem: &Path) -> Served {
    serve(&[
        "--model".as_ref(),
        minilm_dir().as_os_str(),
        "--cert-out".as_ref(),
        pem.as_os_str(),
        "--token".as_ref(),
        ORIGIN_TOKEN.as_ref(),
    ])
}

fn metrics_addr(served: &mut Served) -> SocketAddr {
    loop {
        let mut line = String::new();
        assert_ne!(
            served.stderr.read_line(&mut line).expect("stderr reads"),
            0,
            "no metrics line"
        );
        if let Some(rest) = line.trim_end().strip_prefix("metrics on http://") {
            return rest
                .trim_end_matches("/metrics")
                .parse()
                .expect("an address");
        }
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("the metrics port answers");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("request sent");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response read");
    response
}

/// The value of a counter in an OpenMetrics text.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
}

#[test]
fn a_regional_server_pulls_from_its_origin_and_counts_its_redis_tier() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let scratch = tempfile::tempdir().expect("a temp dir");
    let origin_pem = scratch.path().join("origin.pem");
    let region_pem = scratch.path().join("region.pem");
    let origin = serve_origin(&origin_pem);
    let origin_addr = origin.addr.to_string();
    let redis_url = redis.url();
    let mut region = serve(&[
        "--upstream".as_ref(),
        origin_addr.as_ref(),
        "--upstream-cert".as_ref(),
        origin_pem.as_os_str(),
        "--upstream-token".as_ref(),
        ORIGIN_TOKEN.as_ref(),
        "--redis".as_ref(),
        redis_url.as_ref(),
        "--redis-prefix".as_ref(),
        "cli".as_ref(),
        "--cache-mb".as_ref(),
        "0".as_ref(),
        "--cert-out".as_ref(),
        region_pem.as_os_str(),
        "--metrics-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ]);
    let metrics_at = metrics_addr(&mut region);

    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let pooler_len = runtime.block_on(async {
        let trusted = tls::load_certificates_pem(&region_pem).expect("the region's certificate");
        let client = WeightClient::connect(ClientConfig::new(vec![region.addr], trusted))
            .await
            .expect("the region answers without a token of its own");
        let pooler = client
            .manifest()
            .component("head")
            .expect("listed")
            .byte_len;
        let first = client
            .fetch_component("head")
            .await
            .expect("from the origin");
        // The write to Redis happens in the background: wait for it to land.
        let started = std::time::Instant::now();
        loop {
            let metrics = http_get(metrics_at, "/metrics");
            if counter(&metrics, "surf_server_redis_writes_total") >= 1 {
                break;
            }
            assert!(started.elapsed().as_secs() < 20, "{metrics}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let second = client.fetch_component("head").await.expect("from Redis");
        assert_eq!(first, second);
        client.close().await;
        pooler
    });

    let metrics = http_get(metrics_at, "/metrics");
    assert_eq!(counter(&metrics, "surf_server_upstream_fetches_total"), 1);
    assert_eq!(
        counter(&metrics, "surf_server_upstream_bytes_total"),
        pooler_len
    );
    assert_eq!(counter(&metrics, "surf_server_redis_hits_total"), 1);
    assert_eq!(counter(&metrics, "surf_server_redis_misses_total"), 1);
    assert_eq!(counter(&metrics, "surf_server_redis_errors_total"), 0);
    drop(region);
    drop(origin);
}

#[test]
fn a_wrong_upstream_token_exits_2_naming_the_origin() {
    let scratch = tempfile::tempdir().expect("a temp dir");
    let origin_pem = scratch.path().join("origin.pem");
    let origin = serve_origin(&origin_pem);
    let output = surf()
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(["--upstream", &origin.addr.to_string()])
        .arg("--upstream-cert")
        .arg(&origin_pem)
        .args(["--upstream-token", "wrong"])
        .arg("--cert-out")
        .arg(scratch.path().join("region.pem"))
        .output()
        .expect("surf runs");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(output.stdout.is_empty(), "nothing is announced");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&origin.addr.to_string()), "{stderr}");
}

#[test]
fn serve_without_a_model_or_an_upstream_is_refused() {
    let output = surf()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cert-out",
            "/dev/null",
        ])
        .output()
        .expect("surf runs");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--model") && stderr.contains("--upstream"),
        "{stderr}"
    );
}
