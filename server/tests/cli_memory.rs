//! `surf embed` streaming a model several times larger than its memory flags
//! holds what the flags allow, not the model: its peak RSS grows with the
//! host cache, the prefetch window and the VRAM budget (where the adapter's
//! memory is the host's), not with the layers it streams through them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
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

/// A BERT model of `layers` layers of width 512 (12.6 MB each in f32).
fn synth(dir: &Path, layers: usize) {
    let tokenizer = root().join("assets/models/all-MiniLM-L6-v2/tokenizer.json");
    assert!(
        tokenizer.is_file(),
        "run `bash assets/fetch-model.sh` first"
    );
    let output = surf()
        .args(["synth", "--hidden", "512", "--layers", &layers.to_string()])
        .arg("--out")
        .arg(dir)
        .arg("--tokenizer")
        .arg(&tokenizer)
        .output()
        .expect("surf synth runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn serve(model: &Path, cert: &Path) -> (ServerProcess, SocketAddr) {
    let child = surf()
        .args(["serve", "--listen", "127.0.0.1:0", "--cache-mb", "0"])
        .arg("--model")
        .arg(model)
        .arg("--cert-out")
        .arg(cert)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("surf serve starts");
    let mut server = ServerProcess(child);
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("a first line");
    let addr = line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("an address");
    (server, addr)
}

const VRAM_BUDGET_MB: u64 = 48;
const HOST_CACHE_MB: u64 = 16;
const PREFETCH: u64 = 1;

/// `surf embed --stats` streaming `model` under the flags above: its stats.
fn embed_streamed(model: &Path, scratch: &Path) -> serde_json::Value {
    let cert = scratch.join(format!(
        "{}.pem",
        model
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("server")
    ));
    let (server, addr) = serve(model, &cert);
    let output = surf()
        .args(["embed", "--stats", "--server", &addr.to_string()])
        .arg("--server-cert")
        .arg(&cert)
        .args(["--vram-budget-mb", &VRAM_BUDGET_MB.to_string()])
        .args(["--host-cache-mb", &HOST_CACHE_MB.to_string()])
        .args(["--prefetch", &PREFETCH.to_string()])
        .args(["Weights surf in over QUIC.", "Embeddings come out."])
        .output()
        .expect("surf embed runs");
    drop(server);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report = stderr
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no stats in {stderr}"));
    serde_json::from_str(report).expect("stats are JSON")
}

fn number(value: &serde_json::Value, path: &str) -> u64 {
    value
        .pointer(path)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing from {value}"))
}

#[test]
fn streaming_a_model_several_times_the_flags_holds_what_the_flags_allow() {
    if surf_engine::gpu::gpu_for_tests().is_none() || !cfg!(target_os = "linux") {
        return;
    }
    let scratch = tempfile::tempdir().expect("a temp dir");
    let (small, large) = (scratch.path().join("small"), scratch.path().join("large"));
    synth(&small, 2);
    synth(&large, 32);
    let fits = embed_streamed(&small, scratch.path());
    let streamed = embed_streamed(&large, scratch.path());

    let layer = number(&streamed, "/cache/layer_bytes");
    let mb = 1u64 << 20;
    // The prefetch window: up to prefetch + 1 layers fetched ahead, and the
    // one the fetch thread is decoding (its bytes as received and packed).
    let window = (PREFETCH + 1 + 2) * layer;
    let vram_on_host = if streamed["cache"]["staging_in_vram"] == true {
        VRAM_BUDGET_MB * mb
    } else {
        0
    };
    let flags = HOST_CACHE_MB * mb + window + vram_on_host;
    let model = 32 * layer;
    assert!(
        model > 3 * flags,
        "the model ({model} bytes) is several times what the flags hold ({flags})"
    );
    // Every layer crossed the network, and the word table did not.
    let fetched = number(&streamed, "/stats/bytes_fetched");
    assert!(fetched >= model, "{fetched} bytes fetched of {model}");
    let table = 30522 * 512 * 4;
    assert!(
        fetched < model + table / 10,
        "{fetched} bytes fetched: the word table came whole"
    );

    // What the process holds besides the weights (runtime, tokenizer,
    // compiled pipelines, which a software adapter keeps in host memory) is
    // what it holds for a model that fits the flags; the model may add
    // only what the flags allow.
    let baseline = number(&fits, "/memory/peak_rss_bytes");
    let peak = number(&streamed, "/memory/peak_rss_bytes");
    assert!(
        peak <= baseline + flags,
        "peak RSS {} MB streaming {} MB of layers; {} MB with a model that fits the flags, \
         which allow {} MB more",
        peak / mb,
        model / mb,
        baseline / mb,
        flags / mb
    );
}
