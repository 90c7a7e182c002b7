//! The pager's decisions, with no GPU or socket in them: which slot a layer
//! goes to, which layer it evicts (least recently used), and which layers to
//! fetch ahead. The GPU side only carries these decisions out.

use std::collections::BTreeSet;

/// What to do to make a layer usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Already in `slot`.
    Resident { slot: usize },
    /// Upload it into `slot`, which held `evicted` (if anything).
    Load { slot: usize, evicted: Option<usize> },
}

/// Counters of the policy's decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

#[derive(Debug, Clone)]
pub struct PagePolicy {
    layers: usize,
    /// Layer held by each slot; the vector's length is the slot capacity.
    slots: Vec<Option<usize>>,
    /// For each layer, the tick of its last use, `None` when not resident.
    last_use: Vec<Option<u64>>,
    slot_of: Vec<Option<usize>>,
    /// Layers whose bytes are being fetched to the host.
    in_flight: BTreeSet<usize>,
    tick: u64,
    pub counters: PolicyCounters,
}

impl PagePolicy {
    pub fn new(layers: usize, capacity: usize) -> Self {
        Self {
            layers,
            slots: vec![None; capacity],
            last_use: vec![None; layers],
            slot_of: vec![None; layers],
            in_flight: BTreeSet::new(),
            tick: 0,
            counters: PolicyCounters::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn is_resident(&self, layer: usize) -> bool {
        self.slot_of.get(layer).copied().flatten().is_some()
    }

    pub fn resident_layers(&self) -> Vec<usize> {
        (0..self.layers).filter(|&l| self.is_resident(l)).collect()
    }

    /// Makes `layer` resident, never evicting a layer in `protected` (the ones
    /// the GPU still has to run before this one is used). Returns `None` when
    /// every slot is protected.
    pub fn place(&mut self, layer: usize, protected: &[usize]) -> Option<Placement> {
        assert!(layer < self.layers, "layer {layer} of {}", self.layers);
        self.tick += 1;
        if let Some(slot) = self.slot_of[layer] {
            self.last_use[layer] = Some(self.tick);
            self.counters.hits += 1;
            return Some(Placement::Resident { slot });
        }
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                let (slot, _) = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(|(slot, held)| held.map(|l| (slot, l)))
                    .filter(|(_, l)| !protected.contains(l))
                    .min_by_key(|(_, l)| self.last_use[*l])?;
                slot
            }
        };
        let evicted = self.slots[slot].take();
        if let Some(old) = evicted {
            self.slot_of[old] = None;
            self.last_use[old] = None;
            self.counters.evictions += 1;
        }
        self.slots[slot] = Some(layer);
        self.slot_of[layer] = Some(slot);
        self.last_use[layer] = Some(self.tick);
        self.counters.misses += 1;
        Some(Placement::Load { slot, evicted })
    }

    /// Layers worth fetching while `current` runs: the next `depth` layers of a
    /// front-to-back pass (wrapping to the start for the next batch), skipping
    /// those resident or already being fetched.
    pub fn prefetch_candidates(&self, current: usize, depth: usize) -> Vec<usize> {
        if self.layers == 0 {
            return Vec::new();
        }
        (1..=depth.min(self.layers - 1))
            .map(|ahead| (current + ahead) % self.layers)
            .filter(|&l| !self.is_resident(l) && !self.in_flight.contains(&l))
            .collect()
    }

    pub fn fetch_started(&mut self, layer: usize) {
        self.in_flight.insert(layer);
    }

    pub fn fetch_finished(&mut self, layer: usize) {
        self.in_flight.remove(&layer);
    }

    pub fn is_in_flight(&self, layer: usize) -> bool {
        self.in_flight.contains(&layer)
    }

    /// Changes the number of slots. Growing adds free slots; shrinking drops
    /// the slots past the new capacity, and the layers in them, so that the
    /// buffers behind those slots can be freed without moving any bytes.
    /// Returns the (slot, layer) pairs evicted.
    pub fn resize(&mut self, capacity: usize) -> Vec<(usize, usize)> {
        let mut evicted = Vec::new();
        for slot in capacity..self.slots.len() {
            if let Some(l) = self.slots[slot].take() {
                evicted.push((slot, l));
                self.slot_of[l] = None;
                self.last_use[l] = None;
                self.counters.evictions += 1;
            }
        }
        self.slots.resize(capacity, None);
        evicted
    }

    /// Evicts everything.
    pub fn clear(&mut self) {
        for entry in &mut self.slots {
            if let Some(l) = entry.take() {
                self.slot_of[l] = None;
                self.last_use[l] = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(policy: &mut PagePolicy) {
        for layer in 0..policy.layers() {
            let protected = [layer];
            policy
                .place(layer, &protected)
                .expect("a slot is free or evictable");
        }
    }

    #[test]
    fn a_budget_for_every_layer_loads_each_once() {
        let mut policy = PagePolicy::new(6, 6);
        for _ in 0..5 {
            pass(&mut policy);
        }
        assert_eq!(
            policy.counters,
            PolicyCounters {
                hits: 24,
                misses: 6,
                evictions: 0
            }
        );
    }

    #[test]
    fn sequential_passes_under_a_small_budget_evict_every_layer_every_pass() {
        // LRU on a cyclic scan larger than the cache misses every time.
        let mut policy = PagePolicy::new(6, 2);
        pass(&mut policy);
        assert_eq!(
            policy.counters,
            PolicyCounters {
                hits: 0,
                misses: 6,
                evictions: 4
            }
        );
        pass(&mut policy);
        assert_eq!(
            policy.counters,
            PolicyCounters {
                hits: 0,
                misses: 12,
                evictions: 10
            }
        );
        assert!(policy.resident_layers().len() <= 2);
    }

    #[test]
    fn the_least_recently_used_layer_is_evicted() {
        let mut policy = PagePolicy::new(4, 2);
        policy.place(0, &[]);
        policy.place(1, &[]);
        policy.place(0, &[]);
        assert_eq!(
            policy.place(2, &[]),
            Some(Placement::Load {
                slot: 1,
                evicted: Some(1)
            })
        );
        assert_eq!(policy.resident_layers(), vec![0, 2]);
    }

    #[test]
    fn protected_layers_are_never_evicted() {
        let mut policy = PagePolicy::new(4, 2);
        policy.place(0, &[]);
        policy.place(1, &[]);
        assert_eq!(
            policy.place(2, &[0]),
            Some(Placement::Load {
                slot: 1,
                evicted: Some(1)
            })
        );
        assert_eq!(policy.place(3, &[0, 2]), None);
    }

    #[test]
    fn shrinking_drops_the_slots_past_the_new_capacity() {
        let mut policy = PagePolicy::new(5, 4);
        for l in 0..4 {
            policy.place(l, &[]);
        }
        let evicted = policy.resize(2);
        assert_eq!(evicted, vec![(2, 2), (3, 3)]);
        assert_eq!(policy.resident_layers(), vec![0, 1]);
        assert_eq!(policy.capacity(), 2);
        assert_eq!(policy.counters.evictions, 2);
        // The next load evicts within the smaller capacity.
        assert!(matches!(
            policy.place(4, &[]),
            Some(Placement::Load {
                slot: 0 | 1,
                evicted: Some(_)
            })
        ));
    }

    #[test]
    fn growing_keeps_everything_and_adds_free_slots() {
        let mut policy = PagePolicy::new(6, 2);
        policy.place(0, &[]);
        policy.place(1, &[]);
        assert!(policy.resize(4).is_empty());
        assert_eq!(
            policy.place(2, &[]),
            Some(Placement::Load {
                slot: 2,
                evicted: None
            })
        );
    }

    #[test]
    fn clear_empties_every_slot() {
        let mut policy = PagePolicy::new(3, 3);
        pass(&mut policy);
        policy.clear();
        assert!(policy.resident_layers().is_empty());
        assert!(matches!(
            policy.place(1, &[]),
            Some(Placement::Load { evicted: None, .. })
        ));
    }

    #[test]
    fn prefetch_looks_ahead_wraps_and_skips_what_is_there_or_coming() {
        let mut policy = PagePolicy::new(6, 3);
        policy.place(1, &[]);
        policy.fetch_started(2);
        assert_eq!(policy.prefetch_candidates(0, 3), vec![3]);
        assert_eq!(policy.prefetch_candidates(4, 3), vec![5, 0]);
        policy.fetch_finished(2);
        assert_eq!(policy.prefetch_candidates(0, 2), vec![2]);
        assert_eq!(policy.prefetch_candidates(0, 0), Vec::<usize>::new());
    }
}
