//! The pager's decisions for GPU memory, with no GPU or socket in them: which
//! slot a layer goes to, which layer it evicts, which layers to fetch ahead,
//! and what survives a smaller budget. The GPU side only carries them out.

use std::collections::BTreeSet;

use super::schedule::{Cursor, Eviction};

/// What to do to make a layer usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Already in `slot`.
    Resident { slot: usize },
    /// Upload it into `slot`, which held `evicted` (if anything).
    Load { slot: usize, evicted: Option<usize> },
}

/// Counters of the policy's decisions. A miss is an upload; a hit is a use
/// of a layer that needed no upload since its previous use, so a layer
/// uploaded ahead of time counts once, as a miss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// A resident layer changing slots when the capacity shrinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotMove {
    pub layer: usize,
    pub from: usize,
    pub to: usize,
}

/// What a change of capacity asks of the GPU side: copies into surviving
/// slots (done before the slots past the new capacity are freed), and the
/// layers given up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resize {
    pub moves: Vec<SlotMove>,
    pub evicted: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct PagePolicy {
    eviction: Eviction,
    cursor: Cursor,
    layers: usize,
    /// Layer held by each slot; the vector's length is the slot capacity.
    slots: Vec<Option<usize>>,
    slot_of: Vec<Option<usize>>,
    /// Tick of each layer's latest use or upload, for LRU.
    last_touch: Vec<u64>,
    /// Uploaded ahead of time and not used since.
    loaded_ahead: Vec<bool>,
    /// Layers whose bytes are being fetched to the host.
    in_flight: BTreeSet<usize>,
    tick: u64,
    pub counters: PolicyCounters,
}

impl PagePolicy {
    /// A policy for the engine's cyclic passes over `layers` layers.
    pub fn new(layers: usize, capacity: usize, eviction: Eviction) -> Self {
        Self::with_cursor(Cursor::cyclic(layers), layers, capacity, eviction)
    }

    pub fn with_cursor(cursor: Cursor, layers: usize, capacity: usize, eviction: Eviction) -> Self {
        Self {
            eviction,
            cursor,
            layers,
            slots: vec![None; capacity],
            slot_of: vec![None; layers],
            last_touch: vec![0; layers],
            loaded_ahead: vec![false; layers],
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

    pub fn eviction(&self) -> Eviction {
        self.eviction
    }

    pub fn set_eviction(&mut self, eviction: Eviction) {
        self.eviction = eviction;
    }

    /// Where the schedule stands, for the host cache to measure distances on.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    pub fn is_resident(&self, layer: usize) -> bool {
        self.slot_of.get(layer).copied().flatten().is_some()
    }

    pub fn resident_layers(&self) -> Vec<usize> {
        (0..self.layers).filter(|&l| self.is_resident(l)).collect()
    }

    /// Makes `layer` resident for its use now, never evicting a layer in
    /// `protected` (recorded for the GPU and not yet submitted). Returns
    /// `None` when every slot is protected.
    pub fn use_layer(&mut self, layer: usize, protected: &[usize]) -> Option<Placement> {
        assert!(layer < self.layers, "layer {layer} of {}", self.layers);
        self.cursor.advance(layer);
        self.tick += 1;
        if let Some(slot) = self.slot_of[layer] {
            if !std::mem::take(&mut self.loaded_ahead[layer]) {
                self.counters.hits += 1;
            }
            self.last_touch[layer] = self.tick;
            return Some(Placement::Resident { slot });
        }
        let slot = self.free_slot().or_else(|| self.victim(protected, None))?;
        Some(self.load(layer, slot, false))
    }

    /// Makes `layer`, used later, resident now if that is worth it. With
    /// optimal eviction it only takes the slot of a layer needed after it, so
    /// an upload ahead never costs an upload of something needed sooner.
    /// Returns `None` when the layer should wait; `Resident` when it is there.
    pub fn place_ahead(&mut self, layer: usize, protected: &[usize]) -> Option<Placement> {
        assert!(layer < self.layers, "layer {layer} of {}", self.layers);
        if let Some(slot) = self.slot_of[layer] {
            return Some(Placement::Resident { slot });
        }
        let bound = match self.eviction {
            Eviction::Optimal => Some(self.cursor.next_use(layer)),
            Eviction::Lru => None,
        };
        let slot = self.free_slot().or_else(|| self.victim(protected, bound))?;
        self.tick += 1;
        Some(self.load(layer, slot, true))
    }

    fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(Option::is_none)
    }

    /// The slot to give up, among layers not `protected`; with `farther_than`,
    /// only a layer whose next use comes after that distance.
    fn victim(&self, protected: &[usize], farther_than: Option<u64>) -> Option<usize> {
        let candidates = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, held)| held.map(|l| (slot, l)))
            .filter(|(_, l)| !protected.contains(l));
        let (slot, layer) = match self.eviction {
            Eviction::Optimal => candidates.max_by_key(|&(_, l)| {
                // Among layers never used again, the least recently touched.
                (
                    self.cursor.next_use(l),
                    std::cmp::Reverse(self.last_touch[l]),
                )
            })?,
            Eviction::Lru => candidates.min_by_key(|&(_, l)| self.last_touch[l])?,
        };
        match farther_than {
            Some(bound) if self.cursor.next_use(layer) <= bound => None,
            _ => Some(slot),
        }
    }

    fn load(&mut self, layer: usize, slot: usize, ahead: bool) -> Placement {
        let evicted = self.slots[slot].take();
        if let Some(old) = evicted {
            self.forget(old);
            self.counters.evictions += 1;
        }
        self.slots[slot] = Some(layer);
        self.slot_of[layer] = Some(slot);
        self.last_touch[layer] = self.tick;
        self.loaded_ahead[layer] = ahead;
        self.counters.misses += 1;
        Placement::Load { slot, evicted }
    }

    fn forget(&mut self, layer: usize) {
        self.slot_of[layer] = None;
        self.loaded_ahead[layer] = false;
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

    /// Changes the number of slots. Shrinking keeps the layers the policy
    /// values most (the nearest next uses, or the most recent for LRU) and
    /// moves those held past the new capacity into the slots that remain.
    pub fn resize(&mut self, capacity: usize) -> Resize {
        let mut held: Vec<(usize, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, layer)| layer.map(|l| (slot, l)))
            .collect();
        match self.eviction {
            Eviction::Optimal => held.sort_by_key(|&(_, l)| {
                (
                    self.cursor.next_use(l),
                    std::cmp::Reverse(self.last_touch[l]),
                )
            }),
            Eviction::Lru => held.sort_by_key(|&(_, l)| std::cmp::Reverse(self.last_touch[l])),
        }
        let mut plan = Resize::default();
        for &(slot, layer) in held.iter().skip(capacity) {
            self.slots[slot] = None;
            self.forget(layer);
            self.counters.evictions += 1;
            plan.evicted.push(layer);
        }
        if capacity < self.slots.len() {
            for from in capacity..self.slots.len() {
                let Some(layer) = self.slots[from].take() else {
                    continue;
                };
                // Kept layers number at most `capacity`, so a free slot exists.
                let to = self.slots[..capacity]
                    .iter()
                    .position(Option::is_none)
                    .expect("a surviving slot is free");
                self.slots[to] = Some(layer);
                self.slot_of[layer] = Some(to);
                plan.moves.push(SlotMove { layer, from, to });
            }
        }
        self.slots.resize(capacity, None);
        plan
    }

    /// Evicts everything.
    pub fn clear(&mut self) {
        for slot in 0..self.slots.len() {
            if let Some(layer) = self.slots[slot].take() {
                self.forget(layer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::schedule::Schedule;
    use super::*;

    /// Drives the policy as the engine does in one pass: each layer is used,
    /// then the next `depth` are uploaded ahead while it computes (their bytes
    /// assumed at hand, so every upload the policy allows happens).
    fn pass(policy: &mut PagePolicy, depth: usize) {
        let layers = policy.layers();
        for layer in 0..layers {
            policy
                .use_layer(layer, &[])
                .expect("a slot is free or evictable");
            let ahead: Vec<usize> = (1..=depth.min(layers - 1))
                .map(|a| (layer + a) % layers)
                .collect();
            let mut protected = ahead.clone();
            protected.push(layer);
            for &next in &ahead {
                policy.place_ahead(next, &protected);
            }
            assert!(policy.resident_layers().len() <= policy.capacity());
        }
    }

    fn uploads_in_steady_state(layers: usize, capacity: usize, depth: usize, e: Eviction) -> u64 {
        let mut policy = PagePolicy::new(layers, capacity, e);
        for _ in 0..3 {
            pass(&mut policy, depth);
        }
        let before = policy.counters.misses;
        pass(&mut policy, depth);
        policy.counters.misses - before
    }

    #[test]
    fn optimal_eviction_streams_at_most_n_minus_k_plus_d_plus_1_layers_a_pass() {
        for layers in 2..=48usize {
            for capacity in 1..layers {
                for depth in 0..capacity {
                    let uploads =
                        uploads_in_steady_state(layers, capacity, depth, Eviction::Optimal);
                    let bound = (layers - capacity + depth + 1) as u64;
                    assert!(
                        uploads <= bound,
                        "{layers} layers, {capacity} slots, depth {depth}: {uploads} uploads > {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn lru_uploads_every_layer_of_a_pass_larger_than_the_cache() {
        for (layers, capacity, depth) in [(6, 2, 0), (6, 4, 1), (24, 16, 2), (48, 47, 3)] {
            assert_eq!(
                uploads_in_steady_state(layers, capacity, depth, Eviction::Lru),
                layers as u64,
                "{layers} layers, {capacity} slots, depth {depth}"
            );
        }
    }

    #[test]
    fn a_budget_for_every_layer_loads_each_once() {
        for eviction in [Eviction::Optimal, Eviction::Lru] {
            let mut policy = PagePolicy::new(6, 6, eviction);
            for _ in 0..5 {
                pass(&mut policy, 2);
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
    }

    #[test]
    fn a_layer_uploaded_ahead_counts_as_one_miss_and_no_hit() {
        let mut policy = PagePolicy::new(4, 2, Eviction::Optimal);
        policy.use_layer(0, &[]);
        assert_eq!(
            policy.place_ahead(1, &[0, 1]),
            Some(Placement::Load {
                slot: 1,
                evicted: None
            })
        );
        assert_eq!(
            policy.use_layer(1, &[]),
            Some(Placement::Resident { slot: 1 })
        );
        assert_eq!(policy.counters.misses, 2);
        assert_eq!(policy.counters.hits, 0);
    }

    #[test]
    fn an_upload_ahead_never_evicts_a_layer_needed_sooner() {
        // At layer 0 with 0 and 1 resident, uploading 2 ahead would have to
        // evict 1, which is needed first.
        let mut policy = PagePolicy::new(6, 2, Eviction::Optimal);
        policy.use_layer(1, &[]);
        policy.use_layer(0, &[]);
        assert_eq!(policy.resident_layers(), vec![0, 1]);
        assert_eq!(policy.place_ahead(2, &[0]), None);
        // LRU uploads it anyway, over the least recent layer.
        let mut lru = PagePolicy::new(6, 2, Eviction::Lru);
        lru.use_layer(1, &[]);
        lru.use_layer(2, &[]);
        assert!(matches!(
            lru.place_ahead(3, &[2]),
            Some(Placement::Load {
                evicted: Some(1),
                ..
            })
        ));
    }

    #[test]
    fn optimal_eviction_gives_up_the_layer_used_farthest_ahead() {
        let mut policy = PagePolicy::new(5, 3, Eviction::Optimal);
        for layer in [0, 1, 2] {
            policy.use_layer(layer, &[]);
        }
        // At layer 3, layer 0 is next used in 2 steps, 1 in 3, 2 in 4.
        assert_eq!(
            policy.use_layer(3, &[]),
            Some(Placement::Load {
                slot: 2,
                evicted: Some(2)
            })
        );
        assert_eq!(policy.resident_layers(), vec![0, 1, 3]);
    }

    #[test]
    fn the_least_recently_used_layer_is_evicted_under_lru() {
        let mut policy = PagePolicy::new(4, 2, Eviction::Lru);
        policy.use_layer(0, &[]);
        policy.use_layer(1, &[]);
        policy.use_layer(0, &[]);
        assert_eq!(
            policy.use_layer(2, &[]),
            Some(Placement::Load {
                slot: 1,
                evicted: Some(1)
            })
        );
        assert_eq!(policy.resident_layers(), vec![0, 2]);
    }

    #[test]
    fn protected_layers_are_never_evicted() {
        for eviction in [Eviction::Optimal, Eviction::Lru] {
            let mut policy = PagePolicy::new(4, 2, eviction);
            policy.use_layer(0, &[]);
            policy.use_layer(1, &[]);
            assert_eq!(
                policy.use_layer(2, &[0]),
                Some(Placement::Load {
                    slot: 1,
                    evicted: Some(1)
                })
            );
            assert_eq!(policy.use_layer(3, &[0, 2]), None);
        }
    }

    #[test]
    fn shrinking_keeps_the_nearest_layers_and_moves_them_into_surviving_slots() {
        let mut policy = PagePolicy::new(6, 4, Eviction::Optimal);
        for layer in 0..4 {
            policy.use_layer(layer, &[]);
        }
        // At layer 3 the next uses are 4 (not held), 5, then 0, 1, 2, 3.
        let plan = policy.resize(2);
        assert_eq!(plan.evicted, vec![2, 3]);
        assert!(plan.moves.is_empty());
        assert_eq!(policy.resident_layers(), vec![0, 1]);

        let mut policy = PagePolicy::new(6, 4, Eviction::Optimal);
        for layer in [2, 3, 0, 1, 5] {
            policy.use_layer(layer, &[]);
        }
        // Slots hold 2, 5, 0, 1; at layer 5 the nearest are 0 and 1, which
        // sit past the new capacity.
        let plan = policy.resize(2);
        assert_eq!(plan.evicted, vec![2, 5]);
        assert_eq!(
            plan.moves,
            vec![
                SlotMove {
                    layer: 0,
                    from: 2,
                    to: 0
                },
                SlotMove {
                    layer: 1,
                    from: 3,
                    to: 1
                }
            ]
        );
        assert_eq!(policy.resident_layers(), vec![0, 1]);
        assert_eq!(
            policy.use_layer(0, &[]),
            Some(Placement::Resident { slot: 0 })
        );
        assert_eq!(policy.capacity(), 2);
        assert_eq!(policy.counters.evictions, 3);
    }

    #[test]
    fn shrinking_under_lru_keeps_the_most_recent() {
        let mut policy = PagePolicy::new(6, 3, Eviction::Lru);
        for layer in [4, 0, 5] {
            policy.use_layer(layer, &[]);
        }
        let plan = policy.resize(1);
        assert_eq!(plan.evicted, vec![0, 4]);
        assert_eq!(
            plan.moves,
            vec![SlotMove {
                layer: 5,
                from: 2,
                to: 0
            }]
        );
        assert_eq!(policy.resident_layers(), vec![5]);
    }

    #[test]
    fn growing_keeps_everything_and_adds_free_slots() {
        let mut policy = PagePolicy::new(6, 2, Eviction::Optimal);
        policy.use_layer(0, &[]);
        policy.use_layer(1, &[]);
        assert_eq!(policy.resize(4), Resize::default());
        assert_eq!(
            policy.use_layer(2, &[]),
            Some(Placement::Load {
                slot: 2,
                evicted: None
            })
        );
    }

    #[test]
    fn clear_empties_every_slot() {
        let mut policy = PagePolicy::new(3, 3, Eviction::Optimal);
        pass(&mut policy, 0);
        policy.clear();
        assert!(policy.resident_layers().is_empty());
        assert!(matches!(
            policy.use_layer(1, &[]),
            Some(Placement::Load { evicted: None, .. })
        ));
    }

    #[test]
    fn prefetch_looks_ahead_wraps_and_skips_what_is_there_or_coming() {
        let mut policy = PagePolicy::new(6, 3, Eviction::Optimal);
        policy.use_layer(1, &[]);
        policy.fetch_started(2);
        assert_eq!(policy.prefetch_candidates(0, 3), vec![3]);
        assert_eq!(policy.prefetch_candidates(4, 3), vec![5, 0]);
        policy.fetch_finished(2);
        assert_eq!(policy.prefetch_candidates(0, 2), vec![2]);
        assert_eq!(policy.prefetch_candidates(0, 0), Vec::<usize>::new());
    }

    /// One step of a trace for the offline optimum.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Use(usize),
        Resize(usize),
        Clear,
    }

    /// The fewest misses any eviction choices can reach on `steps`, by trying
    /// them all: at each miss every victim, at each shrink every subset kept.
    fn fewest_misses(steps: &[Step], capacity: usize) -> u64 {
        fn search(
            steps: &[Step],
            at: usize,
            held: u32,
            capacity: usize,
            memo: &mut std::collections::HashMap<(usize, u32, usize), u64>,
        ) -> u64 {
            let Some(&step) = steps.get(at) else {
                return 0;
            };
            if let Some(&known) = memo.get(&(at, held, capacity)) {
                return known;
            }
            let best = match step {
                Step::Clear => search(steps, at + 1, 0, capacity, memo),
                Step::Use(layer) if held & (1 << layer) != 0 => {
                    search(steps, at + 1, held, capacity, memo)
                }
                Step::Use(layer) => {
                    let with = held | (1 << layer);
                    1 + if (held.count_ones() as usize) < capacity {
                        search(steps, at + 1, with, capacity, memo)
                    } else {
                        (0..32)
                            .filter(|v| held & (1 << v) != 0)
                            .map(|v| search(steps, at + 1, with & !(1 << v), capacity, memo))
                            .min()
                            .expect("a full cache has a victim")
                    }
                }
                Step::Resize(new) if held.count_ones() as usize <= new => {
                    search(steps, at + 1, held, new, memo)
                }
                Step::Resize(new) => (0..(1u32 << 8))
                    .filter(|kept| kept & !held == 0 && kept.count_ones() as usize == new)
                    .map(|kept| search(steps, at + 1, kept, new, memo))
                    .min()
                    .expect("some subset fits"),
            };
            memo.insert((at, held, capacity), best);
            best
        }
        search(steps, 0, 0, capacity, &mut Default::default())
    }

    fn policy_misses(steps: &[Step], layers: usize, capacity: usize) -> u64 {
        let trace = steps
            .iter()
            .filter_map(|s| match s {
                Step::Use(l) => Some(*l),
                _ => None,
            })
            .collect();
        let mut policy = PagePolicy::with_cursor(
            Cursor::new(Schedule::Trace(trace)),
            layers,
            capacity,
            Eviction::Optimal,
        );
        for step in steps {
            match *step {
                Step::Use(layer) => {
                    policy.use_layer(layer, &[]).expect("nothing is protected");
                }
                Step::Resize(new) => {
                    policy.resize(new);
                }
                Step::Clear => policy.clear(),
            }
            assert!(policy.resident_layers().len() <= policy.capacity());
        }
        policy.counters.misses
    }

    /// A small deterministic generator, so that a failure names its seed.
    fn next_random(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *state >> 33
    }

    #[test]
    fn optimal_eviction_matches_a_brute_force_optimum_on_random_traces() {
        for seed in 0..400u64 {
            let mut state = seed;
            let layers = 2 + (next_random(&mut state) % 5) as usize;
            let capacity = 1 + (next_random(&mut state) % 3) as usize;
            let len = 6 + (next_random(&mut state) % 12) as usize;
            let steps: Vec<Step> = (0..len)
                .map(|_| match next_random(&mut state) % 12 {
                    0 => Step::Resize(1 + (next_random(&mut state) % 4) as usize),
                    1 => Step::Clear,
                    _ => Step::Use((next_random(&mut state) % layers as u64) as usize),
                })
                .collect();
            assert_eq!(
                policy_misses(&steps, layers, capacity),
                fewest_misses(&steps, capacity),
                "seed {seed}: {steps:?} with {capacity} slots"
            );
        }
    }
}
