//! The kernel selection at engine start: a forced family, or measured choices
//! taken from this process's earlier engines, then from the disk cache, and
//! measured for whatever shapes neither holds.
//!
//! One lock covers the lookup and the measuring, so engines starting together
//! in one process measure once between them instead of each timing kernels
//! while the others load the device.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::autotune::{self, Launchers};
use super::family::{KernelFamily, KernelMode};
use super::selection::{ModelShapes, Selection, TunedShape};
use super::tuning_cache::{ChoiceStore, device_key};
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Measured shapes per device key, for engines started later in this process.
static MEASURED: Mutex<Option<HashMap<String, Vec<TunedShape>>>> = Mutex::new(None);

/// Where the choices of an engine came from, for its start-up log and `surf info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChoiceOrigin {
    /// Shapes taken from this process's earlier engines or the disk cache.
    pub reused: usize,
    /// Shapes measured now.
    pub measured: usize,
}

/// The families `mode` allows on `gpu`, or why the forced one cannot run.
pub fn forced_family(gpu: &Gpu, family: KernelFamily) -> Result<KernelFamily> {
    match family.unsupported_reason(gpu) {
        None => Ok(family),
        Some(reason) => Err(Error::KernelFamily {
            family: family.name(),
            adapter: gpu.adapter_name().to_string(),
            reason,
        }),
    }
}

/// The selection for a model of `model` shapes whose weights are `dtype_name`.
pub fn select(
    gpu: &Gpu,
    launchers: &Launchers<'_>,
    mode: KernelMode,
    model: &ModelShapes,
    dtype_name: &str,
) -> Result<(Selection, ChoiceOrigin)> {
    let family = match mode {
        KernelMode::Forced(family) => family,
        KernelMode::Auto => {
            let (shapes, origin) = measured_choices(gpu, launchers, model, dtype_name)?;
            let selection = Selection::Tuned {
                shapes,
                fallback: KernelFamily::fixed_default(gpu),
            };
            return Ok((selection, origin));
        }
    };
    let family = forced_family(gpu, family)?;
    tracing::info!(family = family.name(), "kernel family forced");
    let origin = ChoiceOrigin {
        reused: 0,
        measured: 0,
    };
    Ok((Selection::Forced(family), origin))
}

fn measured_choices(
    gpu: &Gpu,
    launchers: &Launchers<'_>,
    model: &ModelShapes,
    dtype_name: &str,
) -> Result<(Vec<TunedShape>, ChoiceOrigin)> {
    let key = device_key(gpu, dtype_name);
    let mut memo = MEASURED.lock().unwrap_or_else(|poisoned| {
        MEASURED.clear_poison();
        poisoned.into_inner()
    });
    let memo = memo.get_or_insert_with(HashMap::new);
    let store = ChoiceStore::default_location();
    let mut known = match memo.get(&key) {
        Some(shapes) => shapes.clone(),
        None => store.as_ref().map(|s| s.load(&key)).unwrap_or_default(),
    };
    let wanted = model.shapes();
    let missing: Vec<_> = wanted
        .iter()
        .filter(|shape| !known.iter().any(|t| t.shape == **shape))
        .copied()
        .collect();
    let reused = wanted.len() - missing.len();
    if reused > 0 {
        tracing::info!(
            shapes = reused,
            cache = %store.as_ref().map(|s| s.path().display().to_string()).unwrap_or_default(),
            "reusing cached kernel choices"
        );
    }
    if !missing.is_empty() {
        let families = KernelFamily::incumbent_first(gpu, launchers.matmul.dtype());
        let start = Instant::now();
        let found = autotune::measure(gpu, launchers, &missing, &families)?;
        tracing::info!(
            shapes = found.len(),
            families = ?families.iter().map(|f| f.name()).collect::<Vec<_>>(),
            elapsed_ms = start.elapsed().as_millis() as u64,
            "measured the kernel families"
        );
        if let Some(store) = &store
            && let Err(error) = store.store(&key, &found)
        {
            tracing::warn!(
                path = %store.path().display(),
                %error,
                "could not save the kernel choices; the next start measures again"
            );
        }
        known.extend(found);
    }
    memo.insert(key, known.clone());
    let origin = ChoiceOrigin {
        reused,
        measured: missing.len(),
    };
    Ok((known, origin))
}
