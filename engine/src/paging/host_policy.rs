//! The host cache's decisions: which fetched layers to keep in host memory
//! when the cache holds fewer layers than the model. The same rule as the GPU
//! tier: with optimal eviction, the layer used farthest ahead is the one not
//! kept, and that may be the layer just fetched.

use std::collections::BTreeSet;

use super::schedule::{Cursor, Eviction};

/// What to do with a layer just fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Keep it, dropping `evicted` first.
    Keep { evicted: Vec<usize> },
    /// Do not keep it: everything held is needed sooner.
    Skip,
}

#[derive(Debug, Clone)]
pub struct HostPolicy {
    eviction: Eviction,
    /// Layers the cache may hold.
    capacity: usize,
    held: BTreeSet<usize>,
    last_touch: Vec<u64>,
    tick: u64,
}

impl HostPolicy {
    pub fn new(layers: usize, capacity: usize, eviction: Eviction) -> Self {
        Self {
            eviction,
            capacity,
            held: BTreeSet::new(),
            last_touch: vec![0; layers],
            tick: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn holds(&self, layer: usize) -> bool {
        self.held.contains(&layer)
    }

    pub fn set_eviction(&mut self, eviction: Eviction) {
        self.eviction = eviction;
    }

    /// Records a read of a held layer (LRU's recency).
    pub fn touch(&mut self, layer: usize) {
        self.tick += 1;
        if let Some(touch) = self.last_touch.get_mut(layer) {
            *touch = self.tick;
        }
    }

    /// Decides whether `layer`, just fetched, stays in host memory.
    pub fn admit(&mut self, layer: usize, cursor: &Cursor) -> Admission {
        if self.capacity == 0 || layer >= self.last_touch.len() {
            return Admission::Skip;
        }
        self.touch(layer);
        if !self.held.insert(layer) {
            return Admission::Keep {
                evicted: Vec::new(),
            };
        }
        let evicted = self.trim(cursor);
        if evicted.contains(&layer) {
            return Admission::Skip;
        }
        Admission::Keep { evicted }
    }

    /// Changes the capacity; returns the layers to drop, the least valuable.
    pub fn resize(&mut self, capacity: usize, cursor: &Cursor) -> Vec<usize> {
        self.capacity = capacity;
        self.trim(cursor)
    }

    pub fn remove(&mut self, layer: usize) {
        self.held.remove(&layer);
    }

    pub fn clear(&mut self) {
        self.held.clear();
    }

    fn trim(&mut self, cursor: &Cursor) -> Vec<usize> {
        let mut evicted = Vec::new();
        while self.held.len() > self.capacity {
            let victim =
                match self.eviction {
                    Eviction::Optimal => self.held.iter().copied().max_by_key(|&l| {
                        (cursor.next_use(l), std::cmp::Reverse(self.last_touch[l]))
                    }),
                    Eviction::Lru => self
                        .held
                        .iter()
                        .copied()
                        .min_by_key(|&l| self.last_touch[l]),
                };
            let Some(victim) = victim else { break };
            self.held.remove(&victim);
            evicted.push(victim);
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cyclic passes where every layer is read from the host cache, as when
    /// the GPU holds one layer at a time: returns the host hits of the last pass.
    fn hits_in_steady_state(layers: usize, capacity: usize, eviction: Eviction) -> usize {
        let mut policy = HostPolicy::new(layers, capacity, eviction);
        let mut cursor = Cursor::cyclic(layers);
        let mut hits = 0;
        for pass in 0..4 {
            hits = 0;
            for layer in 0..layers {
                cursor.advance(layer);
                if policy.holds(layer) {
                    policy.touch(layer);
                    hits += 1;
                } else {
                    policy.admit(layer, &cursor);
                }
                assert!(policy.len() <= capacity, "pass {pass}");
            }
        }
        hits
    }

    #[test]
    fn optimal_keeps_all_but_one_of_its_layers_on_cyclic_passes() {
        for layers in 2..=24 {
            for capacity in 1..layers {
                assert!(
                    hits_in_steady_state(layers, capacity, Eviction::Optimal) >= capacity - 1,
                    "{layers} layers, {capacity} held"
                );
                assert_eq!(hits_in_steady_state(layers, capacity, Eviction::Lru), 0);
            }
        }
    }

    #[test]
    fn a_layer_needed_last_is_not_kept_in_a_full_cache() {
        let mut policy = HostPolicy::new(4, 2, Eviction::Optimal);
        let mut cursor = Cursor::cyclic(4);
        cursor.advance(0);
        assert_eq!(
            policy.admit(1, &cursor),
            Admission::Keep {
                evicted: Vec::new()
            }
        );
        assert_eq!(
            policy.admit(2, &cursor),
            Admission::Keep {
                evicted: Vec::new()
            }
        );
        // From layer 0, layer 3 is used after 1 and 2.
        assert_eq!(policy.admit(3, &cursor), Admission::Skip);
        cursor.advance(1);
        // From layer 1, layer 1 itself is used last.
        assert_eq!(
            policy.admit(3, &cursor),
            Admission::Keep { evicted: vec![1] }
        );
    }

    #[test]
    fn shrinking_drops_the_farthest_and_zero_keeps_nothing() {
        let mut policy = HostPolicy::new(6, 4, Eviction::Optimal);
        let mut cursor = Cursor::cyclic(6);
        for layer in 0..4 {
            cursor.advance(layer);
            policy.admit(layer, &cursor);
        }
        assert_eq!(policy.resize(2, &cursor), vec![3, 2]);
        assert!(policy.holds(0) && policy.holds(1));
        assert_eq!(policy.resize(0, &cursor).len(), 2);
        assert_eq!(policy.admit(5, &cursor), Admission::Skip);
        assert!(policy.is_empty());
    }
}
