//! Shared set-up for the criterion benches.

pub mod loopback;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use surf_engine::gpu::Gpu;
use surf_engine::kernels::DispatchPlan;

/// `SURF_BENCH_QUICK=1` asks for a smoke run: few short samples, for CI.
pub fn quick() -> bool {
    std::env::var("SURF_BENCH_QUICK").is_ok_and(|value| value == "1")
}

/// The device every bench runs on: the adapter the engine picks by default
/// (`SURF_ADAPTER` overrides). Without one a bench says why and measures
/// nothing, except under `CI=true`, where CI has installed a software adapter
/// and a missing one is a failure.
pub fn device(bench: &str) -> Option<Gpu> {
    match Gpu::new() {
        Ok(gpu) => {
            println!("{bench} bench on {}", gpu.adapter_name());
            Some(gpu)
        }
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but the {bench} bench found no usable GPU adapter: {e}")
        }
        Err(e) => {
            println!("{bench} bench skipped: {e}");
            None
        }
    }
}

/// Where `assets/fetch-model.sh` puts all-MiniLM-L6-v2.
pub fn minilm_dir() -> PathBuf {
    repo_root().join("assets/models/all-MiniLM-L6-v2")
}

/// The workspace root: where the bench was built, unless `SURF_REPO_ROOT`
/// names another copy (bench executables carried to another machine).
pub fn repo_root() -> PathBuf {
    match std::env::var_os("SURF_REPO_ROOT") {
        Some(root) if !root.is_empty() => PathBuf::from(root),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
    }
}

/// Where benches leave their figures as JSON for `bench-report`.
pub fn out_dir() -> PathBuf {
    repo_root().join("bench-out")
}

/// Writes `value` to `bench-out/<name>.json`. A bench that cannot write its
/// figures says so and goes on: the printed tables are still there.
pub fn write_json(name: &str, value: &serde_json::Value) {
    let dir = out_dir();
    let path = dir.join(format!("{name}.json"));
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
        std::fs::write(&path, text)
    });
    match written {
        Ok(()) => println!("figures written to {}", display(&path)),
        Err(e) => println!("could not write {}: {e}", display(&path)),
    }
}

fn display(path: &Path) -> String {
    path.canonicalize()
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// Runs `launches` launches recorded by `record` in one submission and waits
/// for the device: the time the GPU needs for them, plus one submission.
pub fn time_launches(gpu: &Gpu, launches: u64, record: impl Fn(&mut DispatchPlan)) -> Duration {
    let mut plan = DispatchPlan::new(gpu);
    for _ in 0..launches {
        record(&mut plan);
    }
    let start = Instant::now();
    plan.submit(gpu);
    gpu.wait_idle().expect("waiting for the GPU");
    start.elapsed()
}

/// Total time and count of the iterations criterion ran, to print a rate of
/// our own after its report.
#[derive(Default)]
pub struct Tally {
    total: std::cell::Cell<Duration>,
    iterations: std::cell::Cell<u64>,
}

impl Tally {
    pub fn add(&self, elapsed: Duration, iterations: u64) -> Duration {
        self.total.set(self.total.get() + elapsed);
        self.iterations.set(self.iterations.get() + iterations);
        elapsed
    }

    /// `work` units per iteration, per second, over every recorded iteration.
    pub fn rate(&self, work: f64) -> f64 {
        work * self.iterations.get() as f64 / self.total.get().as_secs_f64().max(f64::MIN_POSITIVE)
    }
}
