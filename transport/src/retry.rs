//! What a fetch does after an attempt fails: a plain state machine, with no
//! sockets and no clock of its own, so that retries, backoff, resumption,
//! failover and the fetch's deadline are decided (and tested) apart from the
//! QUIC code, which only reports what happened and does what it is told.
//!
//! An attempt that fails is reported with how it failed ([`Recovery`]), and
//! how far its bytes got; the answer is to try again after a pause, from an
//! offset, on the same server or the next, or to give up. Failures count
//! only while no new bytes are verified: a fetch that keeps moving forward
//! is never given up for its number of attempts, only for its deadline.

use std::time::{Duration, Instant};

use crate::client::RetryPolicy;
use crate::error::Recovery;

/// How one attempt ended, as the code that made it saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttemptFailure {
    pub recovery: Recovery,
    /// Offset up to which the object's bytes have arrived.
    pub received: u64,
    /// Offset up to which they matched their hashes (never past `received`).
    pub verified: u64,
    /// The bytes past `verified` failed their hash check.
    pub damaged: bool,
}

/// Which server the next attempt goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextServer {
    /// The server keeps its standing and its connection; the next attempt
    /// takes whichever server's turn it is.
    KeepCurrent,
    /// The server misbehaved: drop its connection and set it aside, so that
    /// the next attempt goes to another server.
    FailOver,
}

/// Why a fetch ends without its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// Trying again cannot help: the error is final.
    Final,
    /// `attempts` attempts in a row failed without verifying a new byte.
    RetriesExhausted { attempts: u32 },
    /// The fetch's deadline passed, or would pass before the next attempt.
    DeadlinePassed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Retry {
        /// How long to wait before the next attempt.
        after: Duration,
        next_server: NextServer,
        /// Offset the next attempt asks from: bytes before it are kept.
        resume_at: u64,
    },
    GiveUp(GiveUp),
}

/// The retry state of one fetch.
#[derive(Debug, Clone)]
pub(crate) struct FetchRetry {
    policy: RetryPolicy,
    deadline: Instant,
    failures_in_a_row: u32,
    /// The furthest verified offset of any attempt so far.
    verified: u64,
}

impl FetchRetry {
    /// A fetch starting at `now` that must finish within `budget`.
    pub(crate) fn new(policy: RetryPolicy, now: Instant, budget: Duration) -> Self {
        FetchRetry {
            policy,
            // A budget too large to add is as good as none.
            deadline: now
                .checked_add(budget)
                .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600)),
            failures_in_a_row: 0,
            verified: 0,
        }
    }

    /// When the fetch must have finished; an attempt still running then is
    /// abandoned and [`FetchRetry::deadline_passed`] reported.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// An attempt failed at `now`: what to do next.
    pub(crate) fn attempt_failed(&mut self, now: Instant, failure: AttemptFailure) -> Decision {
        let next_server = match failure.recovery {
            Recovery::GiveUp => return Decision::GiveUp(GiveUp::Final),
            Recovery::RetrySameServer => NextServer::KeepCurrent,
            Recovery::FailOver => NextServer::FailOver,
        };
        if failure.verified > self.verified {
            self.verified = failure.verified;
            self.failures_in_a_row = 0;
        }
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        if self.failures_in_a_row >= self.policy.max_attempts {
            return Decision::GiveUp(GiveUp::RetriesExhausted {
                attempts: self.failures_in_a_row,
            });
        }
        let after = self.policy.backoff(self.failures_in_a_row);
        if now
            .checked_add(after)
            .is_none_or(|then| then >= self.deadline)
        {
            return Decision::GiveUp(GiveUp::DeadlinePassed);
        }
        let resume_at = if failure.damaged {
            failure.verified
        } else {
            failure.received
        };
        Decision::Retry {
            after,
            next_server,
            resume_at,
        }
    }

    /// The deadline passed while an attempt was running.
    pub(crate) fn deadline_passed(&mut self) -> Decision {
        Decision::GiveUp(GiveUp::DeadlinePassed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
    };

    fn failure(recovery: Recovery, received: u64, verified: u64) -> AttemptFailure {
        AttemptFailure {
            recovery,
            received,
            verified,
            damaged: false,
        }
    }

    /// Feeds `script` to a fresh fetch, each failure reported once the
    /// previous decision's pause is over (plus `attempt_time`), and returns
    /// the decisions.
    fn run(budget: Duration, attempt_time: Duration, script: &[AttemptFailure]) -> Vec<Decision> {
        let start = Instant::now();
        let mut retry = FetchRetry::new(POLICY, start, budget);
        let mut now = start;
        let mut decisions = Vec::new();
        for &failure in script {
            now += attempt_time;
            let decision = retry.attempt_failed(now, failure);
            decisions.push(decision);
            match decision {
                Decision::Retry { after, .. } => now += after,
                Decision::GiveUp(_) => break,
            }
        }
        decisions
    }

    #[test]
    fn a_final_error_ends_the_fetch_at_once() {
        let decisions = run(
            Duration::from_secs(60),
            Duration::ZERO,
            &[failure(Recovery::GiveUp, 0, 0)],
        );
        assert_eq!(decisions, [Decision::GiveUp(GiveUp::Final)]);
    }

    #[test]
    fn a_server_that_keeps_failing_is_given_up_after_max_attempts_with_growing_pauses() {
        let script = [failure(Recovery::FailOver, 0, 0); 6];
        let decisions = run(Duration::from_secs(60), Duration::ZERO, &script);
        let pauses: Vec<Duration> = decisions
            .iter()
            .filter_map(|decision| match decision {
                Decision::Retry {
                    after,
                    next_server: NextServer::FailOver,
                    resume_at: 0,
                } => Some(*after),
                _ => None,
            })
            .collect();
        assert_eq!(pauses, [100, 200, 400].map(Duration::from_millis));
        assert_eq!(
            decisions.last(),
            Some(&Decision::GiveUp(GiveUp::RetriesExhausted { attempts: 4 }))
        );
    }

    #[test]
    fn damaged_bytes_are_fetched_again_from_the_last_verified_offset() {
        let damaged = AttemptFailure {
            damaged: true,
            ..failure(Recovery::RetrySameServer, 3000, 2048)
        };
        let cut_off = failure(Recovery::FailOver, 5000, 4096);
        let decisions = run(Duration::from_secs(60), Duration::ZERO, &[damaged, cut_off]);
        assert!(matches!(
            decisions[..],
            [
                Decision::Retry {
                    next_server: NextServer::KeepCurrent,
                    resume_at: 2048,
                    ..
                },
                Decision::Retry {
                    next_server: NextServer::FailOver,
                    resume_at: 5000,
                    ..
                },
            ]
        ));
    }

    #[test]
    fn progress_resets_the_count_of_failures_in_a_row() {
        // Each attempt verifies a new chunk before the server cuts it off:
        // many more attempts than max_attempts, and never given up.
        let script: Vec<AttemptFailure> = (1..=12)
            .map(|chunk| failure(Recovery::FailOver, chunk * 1024 + 10, chunk * 1024))
            .collect();
        let decisions = run(Duration::from_secs(60), Duration::ZERO, &script);
        assert_eq!(decisions.len(), 12);
        assert!(decisions.iter().all(|decision| matches!(
            decision,
            Decision::Retry { after, .. } if *after == POLICY.initial_backoff
        )));
        // Without progress the count starts again, and runs out.
        let stuck = [failure(Recovery::FailOver, 0, 0); 4];
        let decisions = run(Duration::from_secs(60), Duration::ZERO, &stuck);
        assert_eq!(
            decisions.last(),
            Some(&Decision::GiveUp(GiveUp::RetriesExhausted { attempts: 4 }))
        );
    }

    #[test]
    fn no_retry_is_scheduled_past_the_deadline() {
        // Attempts of 400 ms each in a budget of one second: the second
        // failure's pause would end past the deadline.
        let script = [failure(Recovery::FailOver, 0, 0); 3];
        let decisions = run(Duration::from_secs(1), Duration::from_millis(400), &script);
        assert!(matches!(decisions[0], Decision::Retry { .. }));
        assert_eq!(decisions[1], Decision::GiveUp(GiveUp::DeadlinePassed));
    }

    #[test]
    fn the_deadline_passing_mid_attempt_gives_up() {
        let mut retry = FetchRetry::new(POLICY, Instant::now(), Duration::from_secs(2));
        assert_eq!(
            retry.deadline_passed(),
            Decision::GiveUp(GiveUp::DeadlinePassed)
        );
    }

    /// With the default settings a server where nothing answers costs a
    /// fetch its connect timeout per attempt: the attempts and their pauses
    /// together end well within a minute, long before the fetch deadline.
    #[test]
    fn an_unanswering_server_is_given_up_within_a_minute_by_default() {
        let timeouts = crate::Timeouts::default();
        let start = Instant::now();
        let mut retry = FetchRetry::new(RetryPolicy::default(), start, timeouts.fetch);
        let mut now = start;
        let outcome = loop {
            now += timeouts.connect;
            match retry.attempt_failed(now, failure(Recovery::FailOver, 0, 0)) {
                Decision::Retry { after, .. } => now += after,
                Decision::GiveUp(give_up) => break give_up,
            }
        };
        assert!(
            matches!(outcome, GiveUp::RetriesExhausted { .. }),
            "{outcome:?}"
        );
        assert!(
            now - start < Duration::from_secs(60),
            "given up after {:?}",
            now - start
        );
    }
}
