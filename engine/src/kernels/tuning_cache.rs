//! Measured kernel choices and the driver's pipeline cache, kept on disk so
//! that later engine starts skip the measuring and the shader compilation.
//!
//! Files live in `$XDG_CACHE_HOME/surf`, else `~/.cache/surf`
//! (`SURF_CACHE_DIR` overrides both). The choices are one JSON file with an
//! entry per device key: adapter, driver, wgpu version and a hash of the
//! kernel sources, so that a new driver or a changed kernel measures again.
//! Engines start concurrently, so every write goes to a temporary file that is
//! renamed over the old one, and a write first merges what others wrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::selection::{Shape, TunedShape};
use crate::gpu::Gpu;

/// Environment variable naming the cache folder.
pub const CACHE_DIR_ENV: &str = "SURF_CACHE_DIR";

const CHOICES_FILE: &str = "kernel-choices.json";

/// The folder for surf's caches, or `None` when no home is known.
pub fn cache_dir() -> Option<PathBuf> {
    let from_env = |name: &str| {
        std::env::var_os(name)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = from_env(CACHE_DIR_ENV) {
        return Some(dir);
    }
    if let Some(dir) = from_env("XDG_CACHE_HOME").filter(|dir| dir.is_absolute()) {
        return Some(dir.join("surf"));
    }
    from_env("HOME").map(|home| home.join(".cache").join("surf"))
}

/// FNV-1a: a stable hash of the kernel texts, the same on every build.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// A hash of every kernel source the engine compiles, after expansion and
/// specialization.
fn kernel_sources_hash() -> u64 {
    let sources = super::sources::every_source();
    let parts: Vec<&str> = sources.iter().map(|s| s.text.as_str()).collect();
    fnv1a(&parts)
}

/// What a measured choice is valid for: this adapter and driver, its
/// subgroup sizes (llvmpipe's follow `LP_NATIVE_VECTOR_WIDTH`), this wgpu,
/// these kernels, and the weights' dtype.
pub fn device_key(gpu: &Gpu, dtype: &str) -> String {
    let info = &gpu.info;
    format!(
        "{} [{:04x}:{:04x}] {:?} driver `{}` `{}` subgroups {}-{} | wgpu {} | kernels {:016x} | {dtype}",
        info.name,
        info.vendor,
        info.device,
        info.backend,
        info.driver,
        info.driver_info,
        info.subgroup_min_size,
        info.subgroup_max_size,
        env!("SURF_WGPU_VERSION"),
        kernel_sources_hash(),
    )
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ChoicesFile {
    /// Measured shapes per device key.
    devices: BTreeMap<String, Vec<TunedShape>>,
}

/// The measured choices file in `dir`.
pub struct ChoiceStore {
    path: PathBuf,
}

impl ChoiceStore {
    pub fn in_dir(dir: &Path) -> Self {
        ChoiceStore {
            path: dir.join(CHOICES_FILE),
        }
    }

    /// The store in [`cache_dir`], if there is one.
    pub fn default_location() -> Option<Self> {
        cache_dir().map(|dir| Self::in_dir(&dir))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything readable in the file; a missing or unreadable file is an
    /// empty one, since it only saves time.
    fn read(&self) -> ChoicesFile {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return ChoicesFile::default();
        };
        serde_json::from_str(&text).unwrap_or_else(|error| {
            tracing::warn!(
                path = %self.path.display(),
                %error,
                "ignoring an unreadable kernel choices file"
            );
            ChoicesFile::default()
        })
    }

    /// The measured shapes stored for `key`.
    pub fn load(&self, key: &str) -> Vec<TunedShape> {
        self.read().devices.remove(key).unwrap_or_default()
    }

    /// Adds `shapes` to those stored for `key` (a shape measured again
    /// replaces its old entry) and writes the file atomically.
    pub fn store(&self, key: &str, shapes: &[TunedShape]) -> std::io::Result<()> {
        let mut file = self.read();
        let entry = file.devices.entry(key.to_string()).or_default();
        let mut by_shape: BTreeMap<Shape, TunedShape> =
            entry.drain(..).map(|t| (t.shape, t)).collect();
        for tuned in shapes {
            by_shape.insert(tuned.shape, tuned.clone());
        }
        *entry = by_shape.into_values().collect();
        let text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
        write_atomically(&self.path, text.as_bytes())
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over
/// `path`, so that a reader sees the old file or the new one, never a part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("a cache file needs a folder"))?;
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let temporary = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{ChoiceStore, fnv1a};
    use crate::kernels::family::KernelFamily;
    use crate::kernels::selection::{Shape, TunedOp, TunedShape};

    fn tuned(rows: usize, family: KernelFamily) -> TunedShape {
        TunedShape {
            shape: Shape {
                op: TunedOp::Matmul,
                rows,
                k: 384,
                n: 1536,
            },
            family,
            timings_us: BTreeMap::from([(family, 10.0), (KernelFamily::Portable, 40.5)]),
            timing: super::super::selection::TimingSource::HostClock,
            fusion: None,
        }
    }

    #[test]
    fn stored_choices_load_back_per_device_and_merge() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ChoiceStore::in_dir(&dir.path().join("nested"));
        assert!(store.load("gpu a").is_empty());
        store
            .store("gpu a", &[tuned(16, KernelFamily::Subgroup8)])
            .expect("store");
        store
            .store("gpu b", &[tuned(16, KernelFamily::Tiled)])
            .expect("store");
        // A later measurement of the same shape replaces it; others stay.
        store
            .store(
                "gpu a",
                &[
                    tuned(16, KernelFamily::Tiled),
                    tuned(128, KernelFamily::Subgroup8),
                ],
            )
            .expect("store");
        let a = store.load("gpu a");
        assert_eq!(
            a,
            vec![
                tuned(16, KernelFamily::Tiled),
                tuned(128, KernelFamily::Subgroup8)
            ]
        );
        assert_eq!(store.load("gpu b"), vec![tuned(16, KernelFamily::Tiled)]);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("nested"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("kernel-choices.json")]);
    }

    #[test]
    fn a_corrupt_file_reads_as_empty_and_is_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ChoiceStore::in_dir(dir.path());
        std::fs::write(store.path(), b"{ not json").expect("write");
        assert!(store.load("gpu a").is_empty());
        store
            .store("gpu a", &[tuned(16, KernelFamily::Tiled)])
            .expect("store");
        assert_eq!(store.load("gpu a").len(), 1);
    }

    #[test]
    fn the_source_hash_depends_on_every_part_and_its_boundaries() {
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
        assert_ne!(fnv1a(&["a"]), fnv1a(&["b"]));
        assert_eq!(fnv1a(&["kernel"]), fnv1a(&["kernel"]));
    }
}
