//! Authorization's families: decisions by action, policy and reason; connections closed by a
//! policy change; invalid policies.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Labels of authorization decisions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny` or `audit` (an AUDIT policy matched; counted besides the verdict).
    pub action: &'static str,
    /// The deciding policy (`namespace/name`; several, comma-separated, when no ALLOW policy
    /// matched); empty when no policy decided.
    pub policy: PolicyLabel,
    /// A fixed reason string (see `policy::Reason`).
    pub reason: &'static str,
}

/// Labels of established connections closed because a policy change denies them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevokedLabels {
    pub policy: PolicyLabel,
    pub reason: &'static str,
}

/// A policy's name as a label value, sharing the policy's own `Arc<str>`: counting a decision
/// does not allocate.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PolicyLabel(pub Arc<str>);

impl EncodeLabelValue for PolicyLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// Labels of invalid policies.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub policy: String,
    /// `fail_closed`, `kept_last_good` or `not_applied`.
    pub outcome: &'static str,
}

/// Authorization's families.
#[derive(Debug)]
pub struct Families {
    /// Inbound authorization decisions, by action and policy.
    pub decisions: Family<DecisionLabels, Counter>,
    /// The decisions without any policy (the common case), as a handle: no lookup per connection.
    pub allowed_without_policy: Counter,
    /// Established connections closed because a policy change denies them.
    pub revoked: Family<RevokedLabels, Counter>,
    /// Invalid policies found by a load or reload, by what became of them.
    pub policy_rejected: Family<RejectedLabels, Counter>,
    /// Invalid policies in the current state source.
    pub policies_invalid: Gauge,
}

impl Default for Families {
    fn default() -> Self {
        let decisions = Family::<DecisionLabels, Counter>::default();
        let allowed_without_policy = decisions
            .get_or_create(&DecisionLabels {
                action: "allow",
                policy: PolicyLabel(Arc::from("")),
                reason: super::Reason::NoPolicy.as_str(),
            })
            .clone();
        Self {
            decisions,
            allowed_without_policy,
            revoked: Family::default(),
            policy_rejected: Family::default(),
            policies_invalid: Gauge::default(),
        }
    }
}

impl Families {
    /// The decision families (`connections`: a process that decides connections, the node
    /// agent), then the invalid policies' (every process that loads policies).
    pub fn register(&self, registry: &mut Registry, connections: bool) {
        if connections {
            registry.register(
                "mesh_policy_decisions",
                "Inbound connections decided by L4 authorization, by action, policy and reason",
                self.decisions.clone(),
            );
            registry.register(
                "mesh_policy_connections_closed",
                "Established connections closed because a policy change denies them",
                self.revoked.clone(),
            );
        }
        registry.register(
            "mesh_policy_rejected",
            "Invalid policies found when the state was loaded, by what became of them",
            self.policy_rejected.clone(),
        );
        registry.register(
            "mesh_policies_invalid",
            "Invalid policies in the current state",
            self.policies_invalid.clone(),
        );
    }
}
