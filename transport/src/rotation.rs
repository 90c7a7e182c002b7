//! Which server a fetch goes to: a plain state machine, with no sockets, so
//! that spreading and failover are tested on their own.
//!
//! Fetches take the servers in turn, so that load spreads over every server
//! that answers, not only the first. A server that failed (a refused or
//! timed-out handshake, a connection lost mid-fetch) is set aside for a
//! cooldown that doubles with each failure in a row; while it is set aside
//! the others are asked first, and it is asked again last, so that a client
//! whose servers are all failing still tries each of them.

use std::time::{Duration, Instant};

/// The cooldown after a first failure, and its ceiling.
const FIRST_COOLDOWN: Duration = Duration::from_secs(1);
const LONGEST_COOLDOWN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub(crate) struct Rotation {
    servers: Vec<ServerHealth>,
    /// The server the next fetch asks first.
    next: usize,
}

#[derive(Debug, Clone, Default)]
struct ServerHealth {
    failures_in_a_row: u32,
    set_aside_until: Option<Instant>,
}

impl Rotation {
    pub(crate) fn new(servers: usize) -> Self {
        Rotation {
            servers: vec![ServerHealth::default(); servers],
            next: 0,
        }
    }

    /// Starts the turns at `index` (the server that answered first).
    pub(crate) fn start_at(&mut self, index: usize) {
        self.next = index % self.servers.len().max(1);
    }

    /// The servers in the order one fetch should try them: from the one
    /// whose turn it is, those in good standing first, then those set aside.
    /// Moves the turn on by one.
    pub(crate) fn order(&mut self, now: Instant) -> Vec<usize> {
        let count = self.servers.len();
        let from_turn = (0..count).map(|step| (self.next + step) % count);
        let (mut ready, set_aside): (Vec<usize>, Vec<usize>) =
            from_turn.partition(|&index| !self.is_set_aside(index, now));
        ready.extend(set_aside);
        if count > 0 {
            self.next = (self.next + 1) % count;
        }
        ready
    }

    pub(crate) fn is_set_aside(&self, index: usize, now: Instant) -> bool {
        self.servers[index]
            .set_aside_until
            .is_some_and(|until| now < until)
    }

    /// The server answered: back in good standing.
    pub(crate) fn succeeded(&mut self, index: usize) {
        self.servers[index] = ServerHealth::default();
    }

    /// The server failed: set aside for a cooldown that grows with each
    /// failure in a row.
    pub(crate) fn failed(&mut self, index: usize, now: Instant) {
        let health = &mut self.servers[index];
        health.failures_in_a_row = health.failures_in_a_row.saturating_add(1);
        let doublings = (health.failures_in_a_row - 1).min(16);
        let cooldown = FIRST_COOLDOWN
            .saturating_mul(1 << doublings)
            .min(LONGEST_COOLDOWN);
        health.set_aside_until = Some(now + cooldown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_servers_take_fetches_in_turn() {
        let now = Instant::now();
        let mut rotation = Rotation::new(3);
        let firsts: Vec<usize> = (0..6).map(|_| rotation.order(now)[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert_eq!(rotation.order(now), [0, 1, 2]);
    }

    #[test]
    fn a_failed_server_is_asked_last_until_its_cooldown_ends() {
        let now = Instant::now();
        let mut rotation = Rotation::new(3);
        rotation.failed(1, now);
        for _ in 0..6 {
            let order = rotation.order(now);
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], 1, "{order:?}");
        }
        let later = now + FIRST_COOLDOWN;
        let firsts: Vec<usize> = (0..3).map(|_| rotation.order(later)[0]).collect();
        assert!(firsts.contains(&1), "{firsts:?}");
    }

    #[test]
    fn cooldowns_double_with_failures_in_a_row_up_to_a_ceiling_and_reset_on_success() {
        let now = Instant::now();
        let mut rotation = Rotation::new(2);
        let mut expected = FIRST_COOLDOWN;
        for _ in 0..10 {
            rotation.failed(0, now);
            assert!(rotation.is_set_aside(0, now + expected - Duration::from_millis(1)));
            assert!(!rotation.is_set_aside(0, now + expected));
            expected = (expected * 2).min(LONGEST_COOLDOWN);
        }
        rotation.succeeded(0);
        assert!(!rotation.is_set_aside(0, now));
        rotation.failed(0, now);
        assert!(!rotation.is_set_aside(0, now + FIRST_COOLDOWN));
    }

    #[test]
    fn every_server_is_still_tried_when_all_are_set_aside() {
        let now = Instant::now();
        let mut rotation = Rotation::new(3);
        rotation.start_at(2);
        for index in 0..3 {
            rotation.failed(index, now);
        }
        assert_eq!(rotation.order(now), [2, 0, 1]);
        assert_eq!(rotation.order(now), [0, 1, 2]);
    }
}
