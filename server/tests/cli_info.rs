//! `surf info` under `SURF_LIMITS`: the device is created with wgpu's default
//! limits when asked, the report gives the limits it was created with, and a
//! value that names no limits is refused with status 2.

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `surf info --json` with `SURF_LIMITS=limits`, the portable kernels forced
/// (nothing to measure) and a cache folder of its own.
fn info(limits: &str, cache: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surf"))
        .args(["info", "--json"])
        .current_dir(root())
        .env("SURF_LIMITS", limits)
        .env("SURF_KERNELS", "portable")
        .env("SURF_CACHE_DIR", cache)
        .output()
        .expect("surf runs")
}

#[test]
fn default_limits_are_asked_for_and_reported() {
    let cache = tempfile::tempdir().expect("temp dir");
    let output = info("default", cache.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && stderr.contains("no GPU adapter") {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI=true but no GPU adapter: {stderr}"
        );
        eprintln!("skipping: {stderr}");
        return;
    }
    assert!(output.status.success(), "stderr: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    let limits = &report["limits"];
    assert_eq!(limits["requested"], "default", "{limits}");
    assert_eq!(limits["max_storage_buffer_binding_size"], 128 << 20);
    assert_eq!(limits["max_buffer_size"], 256 << 20);
    assert_eq!(limits["max_compute_workgroup_storage_size"], 16 << 10);
    assert_eq!(limits["max_compute_invocations_per_workgroup"], 256);
    assert_eq!(
        report["adapter"]["max_storage_buffer_binding_size"],
        128 << 20
    );
}

#[test]
fn unknown_limits_are_refused_with_the_accepted_values() {
    let cache = tempfile::tempdir().expect("temp dir");
    let output = info("huge", cache.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("SURF_LIMITS"), "{stderr}");
    assert!(stderr.contains("adapter, default"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
