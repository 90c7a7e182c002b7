//! Records the wgpu version from the workspace's lock file, as
//! `SURF_WGPU_VERSION`: measured kernel choices are valid for one wgpu, since
//! its shader translation decides what the driver compiles.

fn wgpu_version(lock: &str) -> Option<&str> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"wgpu\"" {
            let version = lines.next()?.trim().strip_prefix("version = \"")?;
            return version.strip_suffix('"');
        }
    }
    None
}

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let lock_path = std::path::Path::new(&manifest_dir).join("../Cargo.lock");
    println!("cargo::rerun-if-changed={}", lock_path.display());
    println!("cargo::rerun-if-changed=build.rs");
    let lock = std::fs::read_to_string(&lock_path).unwrap_or_default();
    let version = wgpu_version(&lock).unwrap_or("unknown").to_string();
    println!("cargo::rustc-env=SURF_WGPU_VERSION={version}");
}
