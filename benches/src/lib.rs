//! Shared set-up for the criterion benches.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use surf_engine::gpu::Gpu;
use surf_engine::kernels::DispatchPlan;

/// `SURF_BENCH_QUICK=1` asks for a smoke run: few short samples, for CI.
pub fn quick() -> bool {
    std::env::var("SURF_BENCH_QUICK").is_ok_and(|value| value == "1")
}

/// Where `assets/fetch-model.sh` puts all-MiniLM-L6-v2.
pub fn minilm_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/models/all-MiniLM-L6-v2")
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
