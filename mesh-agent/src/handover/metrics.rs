//! The handover's family: handovers to or from another agent, by role and result.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// Labels of `mesh_handovers_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoverLabels {
    /// `giver` (the running agent) or `taker` (the new one).
    pub role: &'static str,
    /// `ok`, `aborted` or `error`.
    pub result: &'static str,
}

/// The handover's families.
#[derive(Debug, Default)]
pub struct Families {
    /// Handovers to or from another agent, by role and result.
    pub handovers: Family<HandoverLabels, Counter>,
}

impl Families {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_handovers",
            "Listener handovers between agents of this node, by role (giver, taker) and result",
            self.handovers.clone(),
        );
    }
}
