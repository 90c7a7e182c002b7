//! Watches the GPU hit rate pass by pass and decides when a budget that is
//! too small deserves a warning: once, after a window of passes whose hit
//! rate stays low, so that a service's log gets one clear line instead of
//! one per batch or none.

use std::collections::VecDeque;

/// Passes the hit rate is judged over.
pub const WATCH_PASSES: usize = 8;
/// A hit rate below this over [`WATCH_PASSES`] passes is worth a warning.
pub const LOW_HIT_RATE: f64 = 0.25;

#[derive(Debug, Clone, Default)]
pub struct HitRateWatch {
    passes: VecDeque<(u64, u64)>,
    warned: bool,
}

impl HitRateWatch {
    /// Records one pass's hits and misses; returns the window's hit rate the
    /// first time it is low over a full window, `None` otherwise.
    pub fn end_pass(&mut self, hits: u64, misses: u64) -> Option<f64> {
        if self.passes.len() == WATCH_PASSES {
            self.passes.pop_front();
        }
        self.passes.push_back((hits, misses));
        if self.warned || self.passes.len() < WATCH_PASSES {
            return None;
        }
        let (hits, misses) = self
            .passes
            .iter()
            .fold((0, 0), |(h, m), &(ph, pm)| (h + ph, m + pm));
        if misses == 0 {
            return None;
        }
        let rate = hits as f64 / (hits + misses) as f64;
        if rate < LOW_HIT_RATE {
            self.warned = true;
            return Some(rate);
        }
        None
    }

    /// Forgets the window, as after a change of budget: the new budget is
    /// judged on its own passes and may be warned about again.
    pub fn reset(&mut self) {
        self.passes.clear();
        self.warned = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_low_rate_warns_once_after_a_full_window() {
        let mut watch = HitRateWatch::default();
        for _ in 0..WATCH_PASSES - 1 {
            assert_eq!(watch.end_pass(0, 6), None);
        }
        assert_eq!(
            watch.end_pass(1, 5),
            Some(1.0 / (6.0 * WATCH_PASSES as f64))
        );
        for _ in 0..3 * WATCH_PASSES {
            assert_eq!(watch.end_pass(0, 6), None);
        }
        watch.reset();
        for _ in 0..WATCH_PASSES - 1 {
            assert_eq!(watch.end_pass(0, 6), None);
        }
        assert!(watch.end_pass(0, 6).is_some());
    }

    #[test]
    fn a_good_rate_or_a_resident_model_never_warns() {
        let mut watch = HitRateWatch::default();
        for _ in 0..4 * WATCH_PASSES {
            assert_eq!(watch.end_pass(3, 3), None);
        }
        let mut resident = HitRateWatch::default();
        for _ in 0..4 * WATCH_PASSES {
            assert_eq!(resident.end_pass(6, 0), None);
        }
    }
}
