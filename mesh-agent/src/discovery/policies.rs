//! Policies from any source: Istio AuthorizationPolicy objects as Kubernetes holds them
//! (`apiVersion`, `kind`, `metadata`, `spec`), checked one by one, and the one place that
//! decides what an invalid policy becomes (the fail-closed rules), for the state file and the
//! Kubernetes API alike.
//!
//! Each policy is checked on its own: an invalid one does not reject the file. What happens to
//! it is decided against the state in force ([`settle`]), so that an invalid policy never
//! widens what the last good state allowed:
//! - an invalid DENY fails closed (a DENY of everything for the workloads it selects);
//! - an invalid ALLOW or AUDIT keeps what is in force for it (its last good version, or the
//!   stand-in it already has);
//! - with nothing in force: at start, when the last good version is unknown, an invalid ALLOW
//!   stands in as an ALLOW of nothing (fail closed); on a reload it is left out (the state in
//!   force stays as it is), and so is an AUDIT.
//!
//! Only an entry that cannot even be named (no `metadata.name` or `metadata.namespace`) rejects
//! the whole file, as any broken entry does.

use std::fmt;

use serde_yaml::Value;
use tracing::error;

use crate::{
    metrics::Metrics,
    policy::{self, Action, Invalid, Policy},
    state::Snapshot,
};

/// What became of an invalid policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A stand-in denies: an invalid DENY (or unreadable action) denies every connection to
    /// the workloads it selects; an invalid ALLOW at start allows nothing.
    FailClosed,
    /// An invalid ALLOW or AUDIT with a valid version in force: that version stays.
    KeptLastGood,
    /// An invalid ALLOW or AUDIT with nothing in force on a reload, or an AUDIT at start: not
    /// applied.
    NotApplied,
}

impl Outcome {
    /// For logs and the metric's `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::FailClosed => "fail_closed",
            Outcome::KeptLastGood => "kept_last_good",
            Outcome::NotApplied => "not_applied",
        }
    }
}

/// An invalid policy and what became of it.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub invalid: Invalid,
    pub outcome: Outcome,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.outcome, self.invalid.action) {
            (Outcome::FailClosed, Some(Action::Allow)) => {
                "an invalid ALLOW fails closed: the workloads it selects accept only what their \
                 other ALLOW policies allow until it is fixed (no valid version of it is in force)"
            }
            (Outcome::FailClosed, _) => {
                "an invalid DENY fails closed: the workloads it selects deny every connection \
                 until it is fixed"
            }
            (Outcome::KeptLastGood, _) => "its last good version stays in force",
            (Outcome::NotApplied, _) => {
                "it is not applied (an AUDIT with no earlier valid version)"
            }
        };
        write!(f, "{}; {what}", self.invalid)
    }
}

/// Top-level fields of a policy object besides `metadata` and `spec`.
const KNOWN: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

/// One entry of the state file's `policies`: its key and the policy, or why it is invalid.
/// `Err(message)` when the entry cannot be named, which rejects the file.
pub fn entry(i: usize, value: Value) -> Result<(String, Result<Policy, Invalid>), String> {
    object(&format!("policies[{i}]"), value)
}

/// One AuthorizationPolicy object from any source (`at` says where it is, for the one error
/// that is not the policy's own: an object that cannot be named): its key and the policy, or
/// why it is invalid.
pub fn object(at: &str, value: Value) -> Result<(String, Result<Policy, Invalid>), String> {
    let Value::Mapping(mut map) = value else {
        return Err(format!(
            "{at}: expected an AuthorizationPolicy (apiVersion, kind, metadata, spec)"
        ));
    };
    let metadata = map.get("metadata").cloned().unwrap_or(Value::Null);
    let field = |name: &str| {
        metadata
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("{at}.metadata.{name} is missing or not a string"))
    };
    let (name, namespace) = (field("name")?, field("namespace")?);
    let key = format!("{namespace}/{name}");
    let spec = map
        .remove("spec")
        .unwrap_or(Value::Mapping(Default::default()));
    let invalid = |field: &str, message: String| {
        // The object around the spec is at fault; the spec still tells action and selector.
        let (action, selector, targets) = match policy::compile(&namespace, &name, spec.clone()) {
            Ok(p) => (
                Some(p.action),
                Some(p.selector),
                (!p.targets.is_empty()).then_some(p.targets),
            ),
            Err(inv) => (inv.action, inv.selector, inv.targets),
        };
        Invalid {
            namespace: namespace.clone(),
            name: name.clone(),
            error: policy::Error::Invalid {
                policy: key.clone(),
                field: field.to_owned(),
                message,
            },
            action,
            selector,
            targets,
        }
    };
    let unknown = map
        .keys()
        .filter_map(Value::as_str)
        .find(|k| !KNOWN.contains(k));
    if let Some(k) = unknown {
        return Ok((key.clone(), Err(invalid(k, "unknown field".into()))));
    }
    if let Some(kind) = map.get("kind") {
        if kind.as_str() != Some("AuthorizationPolicy") {
            return Ok((
                key.clone(),
                Err(invalid(
                    "kind",
                    format!("{kind:?} is not AuthorizationPolicy"),
                )),
            ));
        }
    }
    if let Some(version) = map.get("apiVersion") {
        let ok = version
            .as_str()
            .is_some_and(|v| matches!(v, "security.istio.io/v1" | "security.istio.io/v1beta1"));
        if !ok {
            return Ok((
                key.clone(),
                Err(invalid(
                    "apiVersion",
                    format!("{version:?}: expected security.istio.io/v1 or v1beta1"),
                )),
            ));
        }
    }
    Ok((key, policy::compile(&namespace, &name, spec)))
}

/// Decides, against the state in force, what each invalid policy becomes: returns the policies
/// to put in force in their place, with what became of each. At start the state in force is
/// empty, so nothing is known of earlier versions.
pub fn settle(
    current: &Snapshot,
    invalid: Vec<Invalid>,
) -> (Vec<(String, Policy)>, Vec<Rejection>) {
    let mut in_force = Vec::new();
    let mut rejections = Vec::with_capacity(invalid.len());
    for inv in invalid {
        let key = inv.key();
        let outcome = if let Some(stand_in) = inv.fail_closed() {
            in_force.push((key, stand_in));
            Outcome::FailClosed
        } else if let Some(kept) = current.policy(&key) {
            // What is in force stays: the last good version, or the stand-in it has already.
            let outcome = if kept.invalid.is_none() {
                Outcome::KeptLastGood
            } else {
                Outcome::FailClosed
            };
            in_force.push((key, Policy::clone(kept)));
            outcome
        } else if let Some(stand_in) = inv.allow_nothing() {
            // At start (no earlier version is known) and on a reload (a new policy) alike: an
            // ALLOW means the workloads it selects accept only what ALLOW policies allow, so
            // leaving it out would open them wider than intended.
            in_force.push((key, stand_in));
            Outcome::FailClosed
        } else {
            Outcome::NotApplied
        };
        rejections.push(Rejection {
            invalid: inv,
            outcome,
        });
    }
    (in_force, rejections)
}

/// Logs and counts invalid policies (at load and at each reload that finds them): the file's
/// whole set, so `mesh_policies_invalid` becomes its size.
pub fn report(rejections: &[Rejection], metrics: &Metrics) {
    count(rejections, metrics);
    metrics
        .policy
        .policies_invalid
        .set(i64::try_from(rejections.len()).unwrap_or(i64::MAX));
}

/// Logs and counts invalid policies in `mesh_policy_rejected_total` (a source that sees one
/// object at a time sets `mesh_policies_invalid` itself).
pub fn count(rejections: &[Rejection], metrics: &Metrics) {
    for r in rejections {
        error!(policy = %r.invalid.key(), outcome = %r.outcome.as_str(), "policy rejected: {r}");
        metrics
            .policy
            .policy_rejected
            .get_or_create(&crate::metrics::RejectedLabels {
                policy: r.invalid.key(),
                outcome: r.outcome.as_str(),
            })
            .inc();
    }
}
