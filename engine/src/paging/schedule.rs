//! The order in which layers are used, which the eviction policies read: the
//! engine runs layers 0 to N-1, pass after pass, so the next use of every
//! layer is known exactly, and the layer used farthest in the future is the
//! one to evict (Belady's rule).

use std::fmt;
use std::str::FromStr;

/// Which layer to give up when a cache is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Eviction {
    /// The layer whose next use in the schedule is farthest away. On the
    /// engine's cyclic passes this keeps a fixed set of layers resident,
    /// where LRU evicts each one just before it is needed again.
    #[default]
    Optimal,
    /// The least recently used layer.
    Lru,
}

impl Eviction {
    pub const NAMES: [&'static str; 2] = ["optimal", "lru"];

    pub fn name(self) -> &'static str {
        match self {
            Eviction::Optimal => "optimal",
            Eviction::Lru => "lru",
        }
    }
}

impl fmt::Display for Eviction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An eviction name that is neither `optimal` nor `lru`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction policy {given:?}; expected one of: optimal, lru")]
pub struct UnknownEviction {
    pub given: String,
}

impl FromStr for Eviction {
    type Err = UnknownEviction;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "optimal" => Ok(Eviction::Optimal),
            "lru" => Ok(Eviction::Lru),
            _ => Err(UnknownEviction {
                given: s.to_string(),
            }),
        }
    }
}

/// The sequence of layer uses that next-use distances are measured on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// Layers `0..layers`, pass after pass: the engine's own order.
    Cyclic { layers: usize },
    /// A fixed sequence of uses and nothing after it; lets the policy be
    /// checked against an offline optimum on arbitrary traces.
    Trace(Vec<usize>),
}

/// A position in a [`Schedule`]: the use that happened last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    schedule: Schedule,
    /// Index of the latest use; `None` before the first. For a cyclic
    /// schedule, the layer itself.
    position: Option<usize>,
}

/// The distance of a layer that the schedule never uses again.
pub const NEVER: u64 = u64::MAX;

impl Cursor {
    pub fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            position: None,
        }
    }

    pub fn cyclic(layers: usize) -> Self {
        Self::new(Schedule::Cyclic { layers })
    }

    /// Moves to the use of `layer`. A use the schedule did not predict (a
    /// warm-up of chosen layers, say) moves a cyclic cursor to that layer and
    /// leaves a trace cursor where it was.
    pub fn advance(&mut self, layer: usize) {
        match &self.schedule {
            Schedule::Cyclic { .. } => self.position = Some(layer),
            Schedule::Trace(trace) => {
                let from = self.position.map_or(0, |p| p + 1);
                if let Some(offset) = trace[from.min(trace.len())..]
                    .iter()
                    .position(|&l| l == layer)
                {
                    self.position = Some(from + offset);
                }
            }
        }
    }

    /// Uses from now until `layer` is used next: 1 for the very next use,
    /// [`NEVER`] when it is not used again.
    pub fn next_use(&self, layer: usize) -> u64 {
        match &self.schedule {
            Schedule::Cyclic { layers } => {
                let layers = *layers as u64;
                let layer = layer as u64;
                match self.position {
                    None => layer + 1,
                    Some(p) => {
                        let p = p as u64;
                        if layer > p {
                            layer - p
                        } else {
                            layer + layers - p
                        }
                    }
                }
            }
            Schedule::Trace(trace) => {
                let from = self.position.map_or(0, |p| p + 1);
                trace[from.min(trace.len())..]
                    .iter()
                    .position(|&l| l == layer)
                    .map_or(NEVER, |offset| offset as u64 + 1)
            }
        }
    }

    /// The layer used last, if any.
    pub fn current(&self) -> Option<usize> {
        let position = self.position?;
        match &self.schedule {
            Schedule::Cyclic { .. } => Some(position),
            Schedule::Trace(trace) => trace.get(position).copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cyclic_distances_wrap_to_the_next_pass() {
        let mut cursor = Cursor::cyclic(4);
        assert_eq!(
            (0..4).map(|l| cursor.next_use(l)).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        cursor.advance(2);
        assert_eq!(
            (0..4).map(|l| cursor.next_use(l)).collect::<Vec<_>>(),
            [2, 3, 4, 1]
        );
        assert_eq!(cursor.current(), Some(2));
    }

    #[test]
    fn trace_distances_end_with_the_trace() {
        let mut cursor = Cursor::new(Schedule::Trace(vec![3, 1, 3, 0]));
        assert_eq!(cursor.next_use(3), 1);
        assert_eq!(cursor.next_use(0), 4);
        assert_eq!(cursor.next_use(2), NEVER);
        cursor.advance(3);
        cursor.advance(1);
        assert_eq!(cursor.next_use(3), 1);
        assert_eq!(cursor.next_use(1), NEVER);
        // An unpredicted use leaves a trace cursor in place.
        cursor.advance(2);
        assert_eq!(cursor.current(), Some(1));
    }

    #[test]
    fn eviction_names_parse_both_ways() {
        for name in Eviction::NAMES {
            let eviction: Eviction = name.parse().expect("known name");
            assert_eq!(eviction.to_string(), name);
        }
        let error = "mru".parse::<Eviction>().expect_err("unknown");
        assert!(error.to_string().contains("optimal, lru"), "{error}");
    }
}
