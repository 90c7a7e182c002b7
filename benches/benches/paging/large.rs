//! The paging bench's rows for models larger than the GPU: a model streamed
//! from a weight server by a client in a process of its own, whose peak RSS
//! is read next to the bound the flags set, and one decoder shape's
//! throughput against the budget, each run next to its resident run.
//!
//! The client runs in a child process (this executable again, told what to
//! do by [`CLIENT_ENV`]) so that its peak RSS is the client's alone, not the
//! weight server's or the other engines' of the bench.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use surf_engine::gpu::Gpu;
use surf_engine::model::Kernels;
use surf_engine::synth::SynthSpec;
use surf_engine::{Engine, Eviction, RemoteSource, VramBudget, WeightDtype};
use surf_server::{ServerConfig, WeightServer};
use surf_transport::{CertificateDer, ClientConfig, WeightClient};

/// Set in the child: the JSON of a [`ClientRun`].
pub const CLIENT_ENV: &str = "SURF_PAGING_CLIENT";

/// What the child runs: a streamed client under memory flags.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ClientRun {
    pub server: SocketAddr,
    /// The server's certificate, DER bytes in hex.
    pub certificate: String,
    pub dtype: String,
    pub vram_budget_mb: u64,
    pub host_cache_mb: u64,
    pub prefetch: usize,
    pub passes: usize,
    pub texts: Vec<String>,
}

/// The child's side: builds the engine, runs the passes and prints one
/// JSON line with its rates, bytes and peak RSS.
pub fn client_main(run: &str) {
    surf_engine::process_memory::return_large_frees_to_the_system();
    let run: ClientRun = serde_json::from_str(run).expect("the parent's client run");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let der: Vec<u8> = (0..run.certificate.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&run.certificate[i..i + 2], 16).expect("hex"))
        .collect();
    let dtype: WeightDtype = run.dtype.parse().expect("a dtype");
    let config = ClientConfig {
        weight_dtype: dtype.wire(),
        ..ClientConfig::new(vec![run.server], vec![CertificateDer::from(der)])
    };
    let client = runtime
        .block_on(WeightClient::connect(config))
        .expect("the client connects");
    let started = Instant::now();
    let engine = Engine::builder()
        .source(Arc::new(RemoteSource::new(
            client,
            runtime.handle().clone(),
        )))
        .vram_budget(VramBudget::Bytes(run.vram_budget_mb << 20))
        .host_cache_bytes(run.host_cache_mb << 20)
        .prefetch(run.prefetch)
        .eviction(Eviction::Optimal)
        .weight_dtype(dtype)
        .build()
        .expect("the engine starts");
    let texts: Vec<&str> = run.texts.iter().map(String::as_str).collect();
    engine.infer(&texts).expect("the first pass");
    let first_s = started.elapsed().as_secs_f64();
    let before = engine.inference_stats().expect("stats");
    let steady = Instant::now();
    for _ in 1..run.passes {
        engine.infer(&texts).expect("a pass");
    }
    let steady_s = steady.elapsed().as_secs_f64();
    let after = engine.inference_stats().expect("stats");
    let passes = (after.passes - before.passes).max(1) as f64;
    let info = engine.cache_info().expect("cache info");
    let line = serde_json::json!({
        "adapter": engine.gpu().adapter_name(),
        "first_run_s": first_s,
        "texts_per_s": (run.passes - 1) as f64 * texts.len() as f64 / steady_s.max(1e-9),
        "fetched_per_pass": (after.bytes_fetched - before.bytes_fetched) as f64 / passes,
        "uploaded_per_pass": (after.bytes_uploaded - before.bytes_uploaded) as f64 / passes,
        "fetched_first_run": before.bytes_fetched,
        "peak_rss_bytes": surf_engine::process_memory::peak_rss_bytes(),
        "layer_bytes": info.layer_bytes,
        "layer_slots": info.layer_slots,
        "staging_in_vram": info.staging_in_vram,
    });
    println!("{line}");
}

/// Measures the kernel choices for `spec`'s shapes in this process, which
/// keeps them in the disk cache, so that the client starts as a service's
/// every start after its first does: its peak RSS is then the streaming's,
/// not the one-time measuring's, during which a software adapter holds the
/// compiled kernels of every family at once.
pub fn warm_kernel_choices(gpu: &Gpu, spec: &SynthSpec, dtype: WeightDtype) {
    let dims = spec
        .model_config(Path::new("config.json"))
        .expect("the synthetic model's config")
        .dims();
    let mode = surf_engine::engine::kernel_mode_from_env().expect("SURF_KERNELS");
    Kernels::new(gpu, dtype)
        .choose(gpu, mode, &dims)
        .expect("measuring the kernel families");
}

/// Serves `dir` as `dtype` on loopback in this process and runs the client
/// in a child: its JSON line.
pub fn streamed_in_child(dir: &Path, dtype: WeightDtype, run: ClientRun) -> serde_json::Value {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let server = runtime
        .block_on(WeightServer::bind(ServerConfig {
            weight_dtype: dtype.wire(),
            cache_bytes: 0,
            ..ServerConfig::new(dir, ([127, 0, 0, 1], 0).into())
        }))
        .expect("the weight server starts");
    let run = ClientRun {
        server: server.local_addr(),
        certificate: server
            .certificate_der()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        ..run
    };
    let output = Command::new(std::env::current_exe().expect("this bench's path"))
        .env(CLIENT_ENV, serde_json::to_string(&run).expect("JSON"))
        .output()
        .expect("the client process runs");
    runtime.block_on(server.shutdown());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .expect("the client's JSON line");
    serde_json::from_str(line).expect("JSON")
}

/// The bound on a streaming client's peak RSS: the host cache, the
/// prefetch window (prefetch + 1 layers ahead, and the layer being decoded,
/// as received and packed) and 300 MB for everything else; where the
/// adapter's memory is the host's, the VRAM budget lives there too.
pub fn rss_bound(run: &ClientRun, layer_bytes: u64, vram_on_host: bool) -> u64 {
    let window = (run.prefetch as u64 + 1 + 2) * layer_bytes;
    let vram = if vram_on_host {
        run.vram_budget_mb << 20
    } else {
        0
    };
    (run.host_cache_mb << 20) + window + (300 << 20) + vram
}
