//! The `policies` of the state file: Istio AuthorizationPolicy objects as Kubernetes holds them
//! (`apiVersion`, `kind`, `metadata`, `spec`), so that a policy can be pasted from a cluster.
//!
//! Each policy is checked on its own: an invalid one does not reject the file. What happens to
//! it is decided against the state in force ([`settle`]): an invalid DENY fails closed (a DENY
//! of everything for the workloads it selects), an invalid ALLOW or AUDIT keeps its last good
//! version, or is left out when it has none. Only an entry that cannot even be named (no
//! `metadata.name` or `metadata.namespace`) rejects the whole file, as any broken entry does.

use std::fmt;

use serde_yaml::Value;

use crate::{
    policy::{self, Invalid, Policy},
    state::Snapshot,
};

/// What became of an invalid policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An invalid DENY (or unreadable action): the workloads it selects deny every connection.
    FailClosed,
    /// An invalid ALLOW or AUDIT with a valid version in force: that version stays.
    KeptLastGood,
    /// An invalid ALLOW or AUDIT never valid before: not applied.
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
        let what = match self.outcome {
            Outcome::FailClosed => {
                "an invalid DENY fails closed: the workloads it selects deny every connection \
                 until it is fixed"
            }
            Outcome::KeptLastGood => "its last good version stays in force",
            Outcome::NotApplied => "it is not applied (it has no earlier valid version)",
        };
        write!(f, "{}; {what}", self.invalid)
    }
}

/// Top-level fields of a policy object besides `metadata` and `spec`.
const KNOWN: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

/// One entry of `policies`: its key and the policy, or why it is invalid. `Err(message)` when
/// the entry cannot be named, which rejects the file.
pub fn entry(i: usize, value: Value) -> Result<(String, Result<Policy, Invalid>), String> {
    let Value::Mapping(mut map) = value else {
        return Err(format!(
            "policies[{i}]: expected an AuthorizationPolicy (apiVersion, kind, metadata, spec)"
        ));
    };
    let metadata = map.get("metadata").cloned().unwrap_or(Value::Null);
    let field = |name: &str| {
        metadata
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("policies[{i}].metadata.{name} is missing or not a string"))
    };
    let (name, namespace) = (field("name")?, field("namespace")?);
    let key = format!("{namespace}/{name}");
    let spec = map
        .remove("spec")
        .unwrap_or(Value::Mapping(Default::default()));
    let invalid = |field: &str, message: String| {
        // The object around the spec is at fault; the spec still tells action and selector.
        let (action, selector) = match policy::compile(&namespace, &name, spec.clone()) {
            Ok(p) => (Some(p.action), Some(p.selector)),
            Err(inv) => (inv.action, inv.selector),
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
/// to put in force in their place, with what became of each.
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
        } else if let Some(good) = current.policy(&key).filter(|p| p.invalid.is_none()) {
            in_force.push((key, Policy::clone(good)));
            Outcome::KeptLastGood
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
