//! One memory budget shared by the pagers of several models whose layers
//! differ in size: which model gives up memory when another is about to run.
//! A plain state machine, told of requests and runs, with no GPU.
//!
//! Within a pass each model's own [`super::policy::PagePolicy`] evicts by
//! next use; across models the budget is moved here. Before a model runs it
//! gets at least its pinned part and one layer, taken from the models least
//! likely to be asked next when memory is short, and then as many of its
//! layers as fit, taken only from models valued below it. A model's value
//! mixes how recently and how often it was requested: every request adds
//! one, and the sum halves every `half_life` requests made to any model
//! (LRFU), so a model asked for often long ago loses to one asked for now,
//! and of two models asked for last at the same time the busier one wins.

/// What one model can hold in one tier of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Held whenever the model holds any layer and given up only when it is
    /// idle: the pinned tables and, where it shares the budget, the upload
    /// staging. 0 in the host tier.
    pub base_bytes: u64,
    /// Held for the model's whole life (a head that is never evicted).
    pub fixed_bytes: u64,
    /// Bytes of one encoder layer.
    pub layer_bytes: u64,
    pub layers: usize,
}

impl Footprint {
    /// Bytes of `holding`, the fixed part included.
    pub fn bytes(&self, holding: Holding) -> u64 {
        let base = if holding.base { self.base_bytes } else { 0 };
        self.fixed_bytes + base + holding.layers as u64 * self.layer_bytes
    }

    /// Bytes of the whole model.
    pub fn whole_bytes(&self) -> u64 {
        self.bytes(Holding {
            base: true,
            layers: self.layers,
        })
    }
}

/// What a model may hold now: its base part, and a number of layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holding {
    pub base: bool,
    pub layers: usize,
}

/// A model's new holding, to be carried out by its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub model: usize,
    pub holding: Holding,
}

/// A budget too small for the smallest model run beside the fixed parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "a budget of {budget} bytes cannot run every model; the smallest that can is {needed} bytes"
)]
pub struct BudgetTooSmall {
    pub budget: u64,
    pub needed: u64,
}

/// Requests after which a model's value halves.
pub const DEFAULT_HALF_LIFE: f64 = 32.0;

#[derive(Debug, Clone)]
struct Entry {
    footprint: Footprint,
    holding: Holding,
    /// Decayed request count as of `last_request`.
    score: f64,
    last_request: u64,
}

#[derive(Debug, Clone)]
pub struct SharedBudget {
    /// `None`: every model holds what it likes and nothing is moved.
    budget: Option<u64>,
    /// Layers a running model needs at least: 1 in GPU memory, 0 in the host
    /// cache.
    min_layers: usize,
    models: Vec<Entry>,
    /// Requests seen, to any model.
    clock: u64,
    half_life: f64,
}

impl SharedBudget {
    /// A budget over `models`, which hold nothing yet.
    pub fn new(
        budget: Option<u64>,
        min_layers: usize,
        models: &[Footprint],
    ) -> Result<Self, BudgetTooSmall> {
        let shared = Self {
            budget,
            min_layers,
            models: models
                .iter()
                .map(|&footprint| Entry {
                    footprint,
                    holding: Holding::default(),
                    score: 0.0,
                    last_request: 0,
                })
                .collect(),
            clock: 0,
            half_life: DEFAULT_HALF_LIFE,
        };
        if let Some(budget) = budget {
            let needed = shared.smallest_budget();
            if budget < needed {
                return Err(BudgetTooSmall { budget, needed });
            }
        }
        Ok(shared)
    }

    /// Sets after how many requests a model's value halves.
    pub fn with_half_life(mut self, requests: f64) -> Self {
        self.half_life = requests.max(1.0);
        self
    }

    /// The smallest budget in which every model can run: all fixed parts,
    /// and the largest base part with its minimum of layers.
    pub fn smallest_budget(&self) -> u64 {
        let fixed: u64 = self.models.iter().map(|m| m.footprint.fixed_bytes).sum();
        let largest_run = self
            .models
            .iter()
            .map(|m| self.running_minimum(&m.footprint) - m.footprint.fixed_bytes)
            .max()
            .unwrap_or(0);
        fixed + largest_run
    }

    fn running_minimum(&self, footprint: &Footprint) -> u64 {
        footprint.bytes(Holding {
            base: true,
            layers: self.min_layers.min(footprint.layers),
        })
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    pub fn holding(&self, model: usize) -> Holding {
        self.models[model].holding
    }

    /// Bytes `model` may hold now.
    pub fn held_bytes(&self, model: usize) -> u64 {
        let entry = &self.models[model];
        entry.footprint.bytes(entry.holding)
    }

    /// Bytes every model may hold now together; never above the budget.
    pub fn used_bytes(&self) -> u64 {
        (0..self.models.len()).map(|m| self.held_bytes(m)).sum()
    }

    /// Notes one request to `model`.
    pub fn record_request(&mut self, model: usize) {
        self.clock += 1;
        let value = self.value(model);
        let entry = &mut self.models[model];
        entry.score = value + 1.0;
        entry.last_request = self.clock;
    }

    /// How likely `model` is to be asked for next: its requests, each
    /// weighed down by the requests made since.
    pub fn value(&self, model: usize) -> f64 {
        let entry = &self.models[model];
        let age = (self.clock - entry.last_request) as f64;
        entry.score * (-age / self.half_life).exp2()
    }

    /// Makes room for `model` to run and returns the holdings that change,
    /// the ones given up first and `model`'s own last. Without a budget
    /// nothing changes.
    pub fn plan_run(&mut self, model: usize) -> Vec<Change> {
        let Some(budget) = self.budget else {
            return Vec::new();
        };
        let footprint = self.models[model].footprint;
        let minimum = self.running_minimum(&footprint);
        let whole = footprint.whole_bytes();
        let mut changes = Vec::new();
        // Give up memory from the least valued models first.
        let victims = self.victims(model);
        let own_value = self.value(model);
        let room = |shared: &Self| budget - (shared.used_bytes() - shared.held_bytes(model));
        for &victim in &victims {
            if room(self) >= minimum {
                break;
            }
            let deficit = minimum - room(self);
            if let Some(change) = self.take_from(victim, deficit) {
                changes.push(change);
            }
        }
        for &victim in &victims {
            if room(self) >= whole || self.value(victim) >= own_value {
                break;
            }
            let deficit = whole - room(self);
            if let Some(change) = self.take_from(victim, deficit) {
                changes.push(change);
            }
        }
        let available = room(self);
        let layers = if available < minimum {
            // Cannot happen with a budget that passed `new`; hold the minimum
            // of layers rather than none.
            self.min_layers.min(footprint.layers)
        } else {
            let per_layer = footprint.layer_bytes.max(1);
            let beyond_base =
                available - footprint.bytes(Holding::default()) - footprint.base_bytes;
            ((beyond_base / per_layer) as usize).min(footprint.layers)
        };
        let holding = Holding { base: true, layers };
        self.models[model].holding = holding;
        changes.push(Change { model, holding });
        changes
    }

    /// Other models that hold something, least valued first; among equals
    /// the one requested longest ago first.
    fn victims(&self, model: usize) -> Vec<usize> {
        let mut victims: Vec<usize> = (0..self.models.len())
            .filter(|&m| m != model && self.models[m].holding != Holding::default())
            .collect();
        victims.sort_by(|&a, &b| {
            self.value(a)
                .total_cmp(&self.value(b))
                .then(
                    self.models[a]
                        .last_request
                        .cmp(&self.models[b].last_request),
                )
                .then(a.cmp(&b))
        });
        victims
    }

    /// Takes up to `deficit` bytes from `victim`: layers first, then its
    /// base part once no layer is left.
    fn take_from(&mut self, victim: usize, deficit: u64) -> Option<Change> {
        let entry = &mut self.models[victim];
        let before = entry.holding;
        let per_layer = entry.footprint.layer_bytes.max(1);
        let layers_needed = usize::try_from(deficit.div_ceil(per_layer)).unwrap_or(usize::MAX);
        let freed_layers = layers_needed.min(entry.holding.layers);
        entry.holding.layers -= freed_layers;
        let freed = freed_layers as u64 * entry.footprint.layer_bytes;
        if freed < deficit && entry.holding.layers == 0 {
            entry.holding.base = false;
        }
        (entry.holding != before).then_some(Change {
            model: victim,
            holding: entry.holding,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// A model of `layers` layers of `layer_mb` MiB, with `base_mb` pinned.
    fn model(base_mb: u64, layer_mb: u64, layers: usize) -> Footprint {
        Footprint {
            base_bytes: base_mb * MB,
            fixed_bytes: 0,
            layer_bytes: layer_mb * MB,
            layers,
        }
    }

    fn vram(budget_mb: u64, models: &[Footprint]) -> SharedBudget {
        SharedBudget::new(Some(budget_mb * MB), 1, models).expect("budget fits")
    }

    #[test]
    fn models_that_fit_together_are_all_held_whole() {
        let models = [model(2, 10, 4), model(1, 5, 6)];
        let mut shared = vram(200, &models);
        shared.plan_run(0);
        shared.plan_run(1);
        assert_eq!(
            shared.holding(0),
            Holding {
                base: true,
                layers: 4
            }
        );
        assert_eq!(
            shared.holding(1),
            Holding {
                base: true,
                layers: 6
            }
        );
        assert_eq!(shared.used_bytes(), (42 + 31) * MB);
    }

    #[test]
    fn layers_of_different_sizes_share_one_byte_budget() {
        // 42 MB and 31 MB models in 60 MB: the second to run takes what is
        // left after the first, in its own layer size.
        let models = [model(2, 10, 4), model(1, 5, 6)];
        let mut shared = vram(60, &models);
        shared.record_request(0);
        shared.record_request(0);
        shared.plan_run(0);
        shared.record_request(1);
        let changes = shared.plan_run(1);
        // Model 1 is valued below model 0, so it takes only the free 18 MB:
        // its base and 3 layers of 5 MB.
        assert_eq!(
            changes,
            vec![Change {
                model: 1,
                holding: Holding {
                    base: true,
                    layers: 3
                }
            }]
        );
        assert!(shared.used_bytes() <= 60 * MB);
    }

    #[test]
    fn a_model_valued_higher_takes_layers_from_the_least_valued() {
        let models = [model(2, 10, 4), model(1, 5, 6), model(1, 5, 6)];
        let mut shared = vram(80, &models);
        shared.record_request(1);
        shared.plan_run(1);
        shared.record_request(2);
        shared.plan_run(2);
        for _ in 0..5 {
            shared.record_request(0);
        }
        let changes = shared.plan_run(0);
        // Model 1 was requested longest ago: it gives up first.
        assert_eq!(changes[0].model, 1);
        assert_eq!(shared.holding(0).layers, 4);
        assert!(shared.used_bytes() <= 80 * MB);
    }

    #[test]
    fn a_colder_model_runs_on_the_minimum_taken_from_anyone() {
        let models = [model(2, 10, 4), model(1, 5, 6)];
        let mut shared = vram(45, &models);
        for _ in 0..10 {
            shared.record_request(0);
        }
        shared.plan_run(0);
        assert_eq!(shared.holding(0).layers, 4);
        shared.record_request(1);
        let changes = shared.plan_run(1);
        // 3 MB free; model 1 needs 6 MB (base and one layer): model 0 gives
        // up one layer, no more, since it is valued higher.
        assert_eq!(
            changes,
            vec![
                Change {
                    model: 0,
                    holding: Holding {
                        base: true,
                        layers: 3
                    }
                },
                Change {
                    model: 1,
                    holding: Holding {
                        base: true,
                        layers: 2
                    }
                },
            ]
        );
    }

    #[test]
    fn an_idle_model_gives_up_its_pinned_tables_once_its_layers_are_gone() {
        let models = [model(20, 10, 2), model(20, 10, 2)];
        let mut shared = vram(50, &models);
        shared.record_request(0);
        shared.plan_run(0);
        assert_eq!(shared.used_bytes(), 40 * MB);
        for _ in 0..3 {
            shared.record_request(1);
        }
        shared.plan_run(1);
        assert_eq!(
            shared.holding(0),
            Holding {
                base: false,
                layers: 0
            }
        );
        assert_eq!(
            shared.holding(1),
            Holding {
                base: true,
                layers: 2
            }
        );
    }

    #[test]
    fn value_mixes_recency_and_frequency() {
        let models = [model(1, 1, 1), model(1, 1, 1), model(1, 1, 1)];
        let mut shared = vram(100, &models).with_half_life(4.0);
        for _ in 0..8 {
            shared.record_request(0);
        }
        shared.record_request(1);
        // Frequent and recent enough beats one recent request.
        assert!(shared.value(0) > shared.value(1));
        for _ in 0..20 {
            shared.record_request(2);
        }
        shared.record_request(1);
        // Long ago loses to now, however frequent.
        assert!(shared.value(1) > shared.value(0));
    }

    #[test]
    fn without_a_budget_nothing_moves() {
        let models = [model(2, 10, 4)];
        let mut shared = SharedBudget::new(None, 1, &models).expect("no budget");
        assert!(shared.plan_run(0).is_empty());
    }

    #[test]
    fn a_budget_below_the_largest_single_run_is_refused_with_the_smallest() {
        let models = [model(2, 10, 4), model(1, 30, 2)];
        let error = SharedBudget::new(Some(20 * MB), 1, &models).expect_err("too small");
        assert_eq!(error.needed, 31 * MB);
    }

    #[test]
    fn the_host_tier_holds_no_layer_at_its_minimum() {
        let models = [model(0, 10, 4), model(0, 10, 4)];
        let mut shared = SharedBudget::new(Some(30 * MB), 0, &models).expect("fits");
        shared.record_request(0);
        shared.plan_run(0);
        assert_eq!(shared.holding(0).layers, 3);
        shared.record_request(1);
        shared.plan_run(1);
        // Model 1 is the more recent: it takes model 0's layers.
        assert!(shared.holding(1).layers >= 1);
        assert!(shared.used_bytes() <= 30 * MB);
    }

    /// Random runs and requests never hold more than the budget, and every
    /// run gets at least its minimum.
    #[test]
    fn random_mixes_stay_within_the_budget() {
        use rand::{Rng, SeedableRng};
        let models = [
            model(3, 7, 6),
            model(1, 2, 12),
            model(5, 13, 3),
            model(0, 1, 24),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for budget_mb in [21, 40, 77, 150] {
            let mut shared = vram(budget_mb, &models);
            for _ in 0..500 {
                let m = rng.random_range(0..models.len());
                shared.record_request(m);
                shared.plan_run(m);
                assert!(shared.used_bytes() <= budget_mb * MB, "budget {budget_mb}");
                let holding = shared.holding(m);
                assert!(holding.base && holding.layers >= 1, "{holding:?}");
            }
        }
    }
}
