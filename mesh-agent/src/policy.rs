//! L4 authorization: who may connect to which workload and port, decided on the peer's mTLS
//! identity. Pure and I/O-free: `spec` is the resource as written (Istio's AuthorizationPolicy),
//! `compile` turns it into a [`Policy`] or says which field is wrong, `eval` selects the
//! policies of a workload and decides a connection. docs/policy.md has the semantics with
//! examples; `tests.rs` has them as a table. `cli` (`mesh-agent policy check`) is the one part
//! that reads a file.

pub mod cli;
mod compile;
mod eval;
#[cfg(test)]
mod fuzz;
pub mod spec;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt, sync::Arc};

pub use compile::{compile, compile_spec, Invalid};
pub use eval::{evaluate, selects, Conn, Decision, Reason, Selected};
use ipnet::IpNet;

/// What a policy does when a connection matches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Connections to the selected workloads must match one ALLOW policy.
    Allow,
    /// A matching connection is denied, whatever else allows it.
    Deny,
    /// A matching connection is logged; the verdict does not change.
    Audit,
}

impl Action {
    /// As written in the resource: `ALLOW`, `DENY`, `AUDIT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compiled policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// `namespace/name`: the policy's name in logs and metrics.
    pub key: Arc<str>,
    /// Labels a workload must have; empty: every workload of the namespace (of the mesh for a
    /// policy in the root namespace).
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// What the policy asks that L4 cannot evaluate, and what that means for it; logged when
    /// the policy is applied.
    pub warnings: Vec<String>,
    /// `Some(why)`: the policy as written is invalid and this is its fail-closed stand-in (a
    /// DENY of every connection to the workloads it selects).
    pub invalid: Option<String>,
}

/// One rule: matches when `from`, `to` and `when` all match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Any one must match; empty: any source.
    pub from: Vec<Source>,
    /// Any one must match; empty: any port.
    pub to: Vec<Operation>,
    /// All must match.
    pub when: Vec<Condition>,
    /// The rule needs L7 attributes in an ALLOW: it matches no connection at L4.
    pub never: bool,
}

/// `from[].source`, the L4 part: every non-empty field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
}

/// `to[].operation`, the L4 part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// A `when` condition on an L4 attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `source.ip`
    SourceIp { values: Vec<IpNet>, not: Vec<IpNet> },
    /// `source.principal`
    SourcePrincipal {
        values: Vec<Pattern>,
        not: Vec<Pattern>,
    },
    /// `source.namespace`
    SourceNamespace {
        values: Vec<Pattern>,
        not: Vec<Pattern>,
    },
    /// `destination.ip`
    DestinationIp { values: Vec<IpNet>, not: Vec<IpNet> },
    /// `destination.port`
    DestinationPort { values: Vec<u16>, not: Vec<u16> },
}

/// A string with an optional `*` at the start or the end, as Istio writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: any value (but a value there must be: a plaintext source has no principal).
    Any,
    Exact(String),
    /// `abc*`
    Prefix(String),
    /// `*abc`
    Suffix(String),
}

impl Pattern {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => !value.is_empty(),
            Pattern::Exact(s) => value == s,
            Pattern::Prefix(s) => value.starts_with(s.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

/// Why a policy is invalid, naming the field (relative to the policy: `spec.rules[0]...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("policy {policy}: {field}: {message}")]
    Invalid {
        /// `namespace/name`.
        policy: String,
        field: String,
        message: String,
    },
}
