//! The state's families: reloads of its source, and the time to read one and to apply a change.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::metrics::Result;

/// Buckets of `mesh_state_apply_seconds`: 10 us to 1 s, at 1, 2.5 and 5 of each decade.
const APPLY_BUCKETS: [f64; 16] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0,
];

/// Buckets of `mesh_state_parse_seconds`: 100 us to 10 s (a file of 50,000 workloads takes
/// about a second).
const PARSE_BUCKETS: [f64; 16] = [
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The state's families.
#[derive(Debug)]
pub struct Families {
    pub state_reloads: Family<Result, Counter>,
    /// Seconds to apply a state change and make the new snapshot live.
    pub state_apply: Histogram,
    /// Seconds to read a state source into objects (parse and validate the file).
    pub state_parse: Histogram,
}

impl Default for Families {
    fn default() -> Self {
        Self {
            state_reloads: Family::default(),
            state_apply: Histogram::new(APPLY_BUCKETS),
            state_parse: Histogram::new(PARSE_BUCKETS),
        }
    }
}

impl Families {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_state_reloads",
            "State file reloads, by result",
            self.state_reloads.clone(),
        );
        registry.register(
            "mesh_state_apply_seconds",
            "Time to apply a state change and make the new snapshot live",
            self.state_apply.clone(),
        );
        registry.register(
            "mesh_state_parse_seconds",
            "Time to parse and validate the state file",
            self.state_parse.clone(),
        );
    }
}
