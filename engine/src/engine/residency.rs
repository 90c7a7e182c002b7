//! What an engine holds in GPU and host memory when it shares them with
//! other models ([`crate::engines::Engines`]): its footprint, as the shared
//! budget counts it, and carrying out the holding the budget grants.

use std::sync::atomic::Ordering;

use super::{Engine, RunState};
use crate::error::Result;
use crate::paging::VramBudget;
use crate::paging::shared::{Footprint, Holding};

impl Engine {
    /// What the model can hold in GPU memory: the pinned tables and, on
    /// adapters whose memory is the host's, the upload staging as its base;
    /// the head, which stays, as fixed; and its layers.
    pub fn vram_footprint(&self) -> Result<Footprint> {
        let state = self.state()?;
        let pager = &state.pager;
        let staging = if pager.staging_in_vram() {
            pager.staging_limit_bytes()
        } else {
            0
        };
        Ok(Footprint {
            base_bytes: self.pinned_host.len() as u64 + staging,
            fixed_bytes: self.head.bytes(),
            layer_bytes: self.layer_bytes(),
            layers: pager.layers(),
        })
    }

    /// What the model can hold in the host cache: its layers.
    pub fn host_footprint(&self) -> Footprint {
        Footprint {
            base_bytes: 0,
            fixed_bytes: 0,
            layer_bytes: self.layer_bytes(),
            layers: self.dims.layers,
        }
    }

    /// Holds what `holding` grants in GPU memory: without its base the model
    /// gives up its pinned tables, every slot, its staging and its
    /// activation buffers; with it, at most `holding.layers` layer slots,
    /// the ones valued most kept.
    pub fn hold(&self, holding: Holding) -> Result<()> {
        let mut state = self.state()?;
        let outcome = self.apply_holding(&mut state, holding);
        self.note_vram(&state);
        outcome
    }

    fn apply_holding(&self, state: &mut RunState, holding: Holding) -> Result<()> {
        if !holding.base {
            state.pinned = None;
            state.workspace = None;
            state.turns = super::in_flight::TakingTurns::default();
            state.bindings.clear();
            state.pager.set_pinned_bytes(self.head.bytes());
            return state.pager.release_slots();
        }
        self.ensure_pinned(state)?;
        if holding.layers == 0 {
            state.pager.release_slots()
        } else if holding.layers != state.pager.capacity() {
            state.pager.set_budget(VramBudget::Layers(holding.layers))
        } else {
            Ok(())
        }
    }

    /// Bounds the model's share of the host cache to `layers` layers.
    pub fn set_host_layers(&self, layers: usize) -> Result<()> {
        let mut state = self.state()?;
        state
            .pager
            .set_host_cache_bytes(layers as u64 * self.layer_bytes());
        Ok(())
    }

    /// Share of the model's weights in GPU memory now, from 0 (pinned
    /// tables given up) to 1 (every layer resident).
    pub fn resident_share(&self) -> Result<f64> {
        let state = self.state()?;
        if state.pinned.is_none() {
            return Ok(0.0);
        }
        let layers = state.pager.layers().max(1);
        Ok(state.pager.resident_layers().len() as f64 / layers as f64)
    }

    /// Encoder layers in GPU memory now.
    pub fn resident_layer_count(&self) -> Result<usize> {
        Ok(self.state()?.pager.resident_layers().len())
    }

    /// GPU bytes held for weights after the last batch or change of holding;
    /// never waits for a batch.
    pub fn vram_in_use(&self) -> u64 {
        self.vram_in_use.load(Ordering::Relaxed)
    }

    /// Whether the pinned tables are in GPU memory.
    pub fn pinned_resident(&self) -> Result<bool> {
        Ok(self.state()?.pinned.is_some())
    }

    /// Uploads the pinned tables again when the model gave them up.
    pub(super) fn ensure_pinned(&self, state: &mut RunState) -> Result<()> {
        if state.pinned.is_some() {
            return Ok(());
        }
        state.pinned = Some(
            self.gpu
                .storage_buffer_with("pinned weights", &self.pinned_host),
        );
        state.pager.set_pinned_bytes(self.pinned_bytes());
        state.pager.counters.bytes_uploaded += self.pinned_host.len() as u64;
        Ok(())
    }

    pub(super) fn note_vram(&self, state: &RunState) {
        self.vram_in_use
            .store(state.pager.vram_bytes(), Ordering::Relaxed);
    }
}
