//! Which waiting inputs go into the next batch: a plain decision over lengths,
//! with no threads or GPU, so that it can be tested on its own.

use std::collections::VecDeque;

/// Limits of one batch the queue hands to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Padded tokens of one batch: its longest input times its inputs.
    pub max_batch_tokens: usize,
    /// Inputs of one batch; `None` leaves only the token budget.
    pub max_batch_requests: Option<usize>,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_batch_tokens: 16384,
            max_batch_requests: None,
        }
    }
}

/// The shape of a batch being formed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchShape {
    pub inputs: usize,
    pub longest: usize,
    /// Real tokens, without padding.
    pub tokens: usize,
}

impl BatchShape {
    /// Rows the padded batch computes.
    pub fn padded_tokens(&self) -> usize {
        self.inputs * self.longest
    }

    /// Whether one more input of `len` tokens keeps the batch within `limits`.
    /// An empty batch takes any input, so that no input waits forever.
    pub fn admits(&self, len: usize, limits: &BatchLimits) -> bool {
        if self.inputs == 0 {
            return true;
        }
        let inputs = self.inputs + 1;
        if limits.max_batch_requests.is_some_and(|max| inputs > max) {
            return false;
        }
        inputs * self.longest.max(len) <= limits.max_batch_tokens
    }

    pub fn add(&mut self, len: usize) {
        self.inputs += 1;
        self.longest = self.longest.max(len);
        self.tokens += len;
    }
}

/// Inputs waiting for the engine, in arrival order, and the batch staged from
/// their head. The staged batch grows as inputs arrive while the engine runs
/// the current one, and is handed over whole when the engine is free.
#[derive(Debug)]
pub struct BatchPlan<T> {
    limits: BatchLimits,
    staged: Vec<T>,
    shape: BatchShape,
    /// Inputs that did not fit the staged batch; first in, first staged.
    overflow: VecDeque<T>,
}

impl<T> BatchPlan<T> {
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            limits,
            staged: Vec::new(),
            shape: BatchShape::default(),
            overflow: VecDeque::new(),
        }
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    /// Inputs staged or waiting behind the staged batch.
    pub fn len(&self) -> usize {
        self.staged.len() + self.overflow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.staged.is_empty() && self.overflow.is_empty()
    }

    /// The input that has waited longest: the staged batch's first, else
    /// the first behind it.
    pub fn oldest(&self) -> Option<&T> {
        self.staged.first().or_else(|| self.overflow.front())
    }

    /// Queues one input of `len` tokens: into the staged batch while it fits
    /// and nothing older is waiting, behind it otherwise (first in, first out).
    pub fn push(&mut self, item: T, len: usize) {
        if self.overflow.is_empty() && self.shape.admits(len, &self.limits) {
            self.shape.add(len);
            self.staged.push(item);
        } else {
            self.overflow.push_back(item);
        }
    }

    /// Hands over the staged batch and stages the next one from the inputs
    /// waiting behind it. `keep` drops inputs nobody waits for any more, before
    /// they take room in a batch; `len_of` gives an input's length.
    pub fn take(
        &mut self,
        mut keep: impl FnMut(&T) -> bool,
        len_of: impl Fn(&T) -> usize,
    ) -> (Vec<T>, BatchShape) {
        let before = self.staged.len();
        self.staged.retain(&mut keep);
        if self.staged.len() != before {
            // Dropped inputs freed room: restage from what is left.
            self.shape = BatchShape::default();
            for item in &self.staged {
                self.shape.add(len_of(item));
            }
        }
        self.refill(&mut keep, &len_of);
        let batch = std::mem::take(&mut self.staged);
        let shape = std::mem::take(&mut self.shape);
        self.refill(&mut keep, &len_of);
        (batch, shape)
    }

    fn refill(&mut self, keep: &mut impl FnMut(&T) -> bool, len_of: &impl Fn(&T) -> usize) {
        while let Some(next) = self.overflow.front() {
            if !keep(next) {
                self.overflow.pop_front();
                continue;
            }
            let len = len_of(next);
            if !self.shape.admits(len, &self.limits) {
                break;
            }
            self.shape.add(len);
            if let Some(item) = self.overflow.pop_front() {
                self.staged.push(item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(tokens: usize, requests: Option<usize>) -> BatchLimits {
        BatchLimits {
            max_batch_tokens: tokens,
            max_batch_requests: requests,
        }
    }

    /// Items are (id, length); every batch is drained in turn.
    fn drain(plan: &mut BatchPlan<(usize, usize)>) -> Vec<Vec<usize>> {
        let mut batches = Vec::new();
        while !plan.is_empty() {
            let (batch, shape) = plan.take(|_| true, |item| item.1);
            assert!(shape.padded_tokens() <= plan.limits().max_batch_tokens || batch.len() == 1);
            batches.push(batch.into_iter().map(|item| item.0).collect());
        }
        batches
    }

    #[test]
    fn padded_tokens_bound_each_batch() {
        let mut plan = BatchPlan::new(limits(100, None));
        // 4 x 20 = 80 fits; a fifth makes 100, a sixth 120.
        for id in 0..7 {
            plan.push((id, 20), 20);
        }
        assert_eq!(drain(&mut plan), vec![vec![0, 1, 2, 3, 4], vec![5, 6]]);
    }

    #[test]
    fn a_long_input_counts_for_every_row_of_its_batch() {
        let mut plan = BatchPlan::new(limits(100, None));
        for (id, len) in [(0, 10), (1, 10), (2, 40), (3, 10)] {
            plan.push((id, len), len);
        }
        // 3 x 40 = 120 > 100: the long one starts the next batch.
        assert_eq!(drain(&mut plan), vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn the_request_cap_bounds_inputs_per_batch() {
        let mut plan = BatchPlan::new(limits(10_000, Some(3)));
        for id in 0..7 {
            plan.push((id, 5), 5);
        }
        assert_eq!(
            drain(&mut plan),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
        );
    }

    #[test]
    fn order_is_first_in_first_out_even_when_a_later_input_would_fit() {
        let mut plan = BatchPlan::new(limits(130, None));
        plan.push((0, 60), 60);
        plan.push((1, 70), 70); // 2 x 70 > 130
        plan.push((2, 1), 1); // 2 x 60 would fit beside 0, but 1 came first
        assert_eq!(drain(&mut plan), vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn an_input_over_the_budget_runs_alone() {
        let mut plan = BatchPlan::new(limits(100, None));
        plan.push((0, 5), 5);
        plan.push((1, 300), 300);
        plan.push((2, 5), 5);
        assert_eq!(drain(&mut plan), vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn inputs_nobody_waits_for_are_dropped_and_free_their_room() {
        let mut plan = BatchPlan::new(limits(40, None));
        for id in 0..6 {
            plan.push((id, 10), 10);
        }
        let (batch, shape) = plan.take(|item| item.0 % 2 == 0, |item| item.1);
        let ids: Vec<usize> = batch.iter().map(|item| item.0).collect();
        assert_eq!(ids, vec![0, 2, 4]);
        assert_eq!(shape.inputs, 3);
        assert_eq!(shape.tokens, 30);
        assert!(plan.is_empty());
    }

    #[test]
    fn the_next_batch_is_staged_while_the_current_one_runs() {
        let mut plan = BatchPlan::new(limits(30, None));
        for id in 0..3 {
            plan.push((id, 10), 10);
        }
        plan.push((3, 10), 10);
        let (first, _) = plan.take(|_| true, |item| item.1);
        assert_eq!(first.len(), 3);
        // The one left over was staged at once; new arrivals join it.
        plan.push((4, 10), 10);
        plan.push((5, 10), 10);
        plan.push((6, 10), 10);
        let (second, shape) = plan.take(|_| true, |item| item.1);
        assert_eq!(
            second.iter().map(|i| i.0).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(shape.padded_tokens(), 30);
        assert_eq!(plan.len(), 1);
    }
}
