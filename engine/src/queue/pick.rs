//! Which model's batch the engine thread runs next, when several models
//! have inputs waiting: a plain decision over how long each has waited and
//! how much of it is in GPU memory, tested without threads or a GPU.
//!
//! No model starves: a model whose oldest input would pass the wait bound
//! by the end of one more batch is urgent, and urgent models are served in
//! turn, the one served longest ago first, ahead of everything else. Until
//! then, among the models whose oldest inputs have waited about as long as
//! the longest wait, the one with most of its weights resident runs, since
//! it uploads least.

use std::time::Duration;

/// How the next model is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fairness {
    /// How long the oldest input of any model may wait before its model runs.
    pub max_wait: Duration,
    /// Waits within this much of the longest count as about as long.
    pub similar_wait: Duration,
}

impl Fairness {
    /// A bound of `max_wait`, with waits within a quarter of it alike.
    pub fn with_max_wait(max_wait: Duration) -> Self {
        Self {
            max_wait,
            similar_wait: max_wait / 4,
        }
    }
}

impl Default for Fairness {
    fn default() -> Self {
        Self::with_max_wait(Duration::from_millis(500))
    }
}

/// One model's queue as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LaneView {
    /// How long its oldest waiting input has waited; `None` when none waits.
    pub oldest_wait: Option<Duration>,
    /// Share of its weights in GPU memory, 0 to 1.
    pub resident: f64,
    /// Time since its last batch started; long for a model never run.
    pub since_served: Duration,
}

/// The lane to run next, or `None` when nothing waits. `batch_time` is how
/// long a batch takes, as recently measured.
pub fn next_lane(lanes: &[LaneView], fairness: &Fairness, batch_time: Duration) -> Option<usize> {
    let waiting = || {
        lanes
            .iter()
            .enumerate()
            .filter_map(|(i, lane)| lane.oldest_wait.map(|wait| (i, wait, lane)))
    };
    let urgent = waiting()
        .filter(|(_, wait, _)| *wait + batch_time >= fairness.max_wait)
        .max_by(|a, b| {
            a.2.since_served
                .cmp(&b.2.since_served)
                .then(a.1.cmp(&b.1))
                .then(b.0.cmp(&a.0))
        });
    if let Some((lane, _, _)) = urgent {
        return Some(lane);
    }
    let longest = waiting().map(|(_, wait, _)| wait).max()?;
    waiting()
        .filter(|(_, wait, _)| *wait + fairness.similar_wait >= longest)
        .max_by(|a, b| {
            a.2.resident
                .total_cmp(&b.2.resident)
                .then(a.1.cmp(&b.1))
                .then(b.0.cmp(&a.0))
        })
        .map(|(lane, _, _)| lane)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn lane(wait_ms: Option<u64>, resident: f64, since_served_ms: u64) -> LaneView {
        LaneView {
            oldest_wait: wait_ms.map(Duration::from_millis),
            resident,
            since_served: Duration::from_millis(since_served_ms),
        }
    }

    fn fairness() -> Fairness {
        Fairness::with_max_wait(400 * MS)
    }

    #[test]
    fn nothing_waiting_runs_nothing() {
        let lanes = [lane(None, 1.0, 0), lane(None, 0.0, 0)];
        assert_eq!(next_lane(&lanes, &fairness(), 10 * MS), None);
    }

    #[test]
    fn among_similar_waits_the_resident_model_runs() {
        // 90 ms and 120 ms are within 100 ms of each other.
        let lanes = [lane(Some(120), 0.1, 50), lane(Some(90), 1.0, 10)];
        assert_eq!(next_lane(&lanes, &fairness(), 10 * MS), Some(1));
    }

    #[test]
    fn a_much_longer_wait_beats_residency() {
        let lanes = [lane(Some(250), 0.0, 300), lane(Some(20), 1.0, 10)];
        assert_eq!(next_lane(&lanes, &fairness(), 10 * MS), Some(0));
    }

    #[test]
    fn a_model_about_to_pass_the_bound_runs_before_a_resident_one() {
        // 350 ms plus a 60 ms batch passes 400 ms.
        let lanes = [lane(Some(380), 1.0, 5), lane(Some(350), 0.0, 900)];
        let fairness = Fairness {
            max_wait: 400 * MS,
            similar_wait: 100 * MS,
        };
        assert_eq!(next_lane(&lanes, &fairness, 60 * MS), Some(1));
    }

    #[test]
    fn urgent_models_take_turns_however_deep_one_backlog_is() {
        // Lane 0 is flooded: its oldest input always waits longest. Lane 1
        // became urgent too and was served longest ago: it goes first.
        let lanes = [lane(Some(2000), 1.0, 30), lane(Some(420), 0.0, 2500)];
        assert_eq!(next_lane(&lanes, &fairness(), 30 * MS), Some(1));
    }

    /// Drives a flood of one lane against single requests to others, with
    /// simulated batches: no oldest input ever waits more than the bound
    /// plus one batch per other urgent lane.
    #[test]
    fn simulated_floods_keep_every_wait_within_the_bound() {
        let batch = 30 * MS;
        let fairness = fairness();
        let lanes = 4;
        let mut now = Duration::ZERO;
        // Arrival time of each lane's oldest waiting input.
        let mut oldest: Vec<Option<Duration>> = vec![Some(Duration::ZERO); lanes];
        let mut last_served = vec![Duration::ZERO; lanes];
        let mut worst = Duration::ZERO;
        for step in 0..400u32 {
            let views: Vec<LaneView> = (0..lanes)
                .map(|i| LaneView {
                    oldest_wait: oldest[i].map(|t| now - t),
                    // Lane 0 is the resident one, and always has work.
                    resident: if i == 0 { 1.0 } else { 0.0 },
                    since_served: now - last_served[i],
                })
                .collect();
            let chosen = next_lane(&views, &fairness, batch).expect("lane 0 always waits");
            if let Some(arrived) = oldest[chosen] {
                worst = worst.max(now - arrived);
            }
            last_served[chosen] = now;
            now += batch;
            // The flood refills lane 0 at once; other lanes get a request
            // every 7 batches, staggered.
            oldest[chosen] = if chosen == 0 { Some(now) } else { None };
            for (i, slot) in oldest.iter_mut().enumerate().skip(1) {
                if slot.is_none() && (step + i as u32).is_multiple_of(7) {
                    *slot = Some(now);
                }
            }
        }
        assert!(
            worst <= fairness.max_wait + batch * (lanes as u32 - 1),
            "worst wait {worst:?}"
        );
    }
}
