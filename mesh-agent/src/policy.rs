//! Authorization: who may connect to which workload and port, decided on the peer's mTLS
//! identity (L4, by the node proxies, for policies with a `selector`), and which requests may
//! reach a service through its waypoint (L7, for policies bound with `targetRefs`). Pure and
//! I/O-free: `spec` is the resource as written (Istio's AuthorizationPolicy), `compile` turns it
//! into a [`Policy`] or says which field is wrong (`targets` and `l7` check the parts only the
//! waypoint uses), `eval` selects the policies of a workload and decides a connection or a
//! request. docs/policy.md has the semantics with examples; `tests.rs` has them as a table.
//! `cli` (`mesh-agent policy check`) is the one part that reads a file.

pub mod cli;
mod compile;
mod eval;
#[cfg(test)]
mod fuzz;
mod l7;
pub mod metrics;
pub mod spec;
mod targets;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt, sync::Arc};

pub use compile::{compile, compile_spec, Invalid};
pub use eval::{decide_request, evaluate, selects, Conn, Decision, Reason, Request, Selected};
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
    /// policy in the root namespace). Unused when `targets` is not empty.
    pub selector: BTreeMap<String, String>,
    /// `spec.targetRefs`: the Services (or the waypoint) of the policy's namespace whose
    /// requests it decides, at the waypoint. Not empty: the policy selects no workload at L4.
    pub targets: Vec<TargetRef>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// What the policy asks that its proxy cannot evaluate (L4: L7 attributes; the waypoint:
    /// JWT and remote addresses), and what that means for it; logged when the policy is applied.
    pub warnings: Vec<String>,
    /// `Some(why)`: the policy as written is invalid and this is its fail-closed stand-in (a
    /// DENY of every connection to the workloads it selects).
    pub invalid: Option<String>,
}

/// What a policy bound with `targetRefs` applies to, in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetRef {
    /// `{kind: Service, name}`: the requests to that Service.
    Service(String),
    /// `{kind: Gateway, group: gateway.networking.k8s.io, name}`: the requests to every service
    /// whose traffic goes through that waypoint (the namespace's, when it is named so).
    Gateway(String),
    /// Only for the stand-in of an invalid policy whose references cannot be read: every
    /// service of the namespace's waypoint (it fails closed there, not at L4).
    Unreadable,
}

impl fmt::Display for TargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetRef::Service(name) => write!(f, "Service {name}"),
            TargetRef::Gateway(name) => write!(f, "Gateway {name}"),
            TargetRef::Unreadable => f.write_str("unreadable references"),
        }
    }
}

/// One rule: matches when `from`, `to` and `when` all match. One form for both proxies: at
/// L4 the L7 parts (hosts, methods, paths, request headers) are not evaluated (`never` says
/// what that means), at the waypoint everything is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Any one must match; empty: any source.
    pub from: Vec<Source>,
    /// Any one must match; empty: any operation.
    pub to: Vec<Operation>,
    /// All must match.
    pub when: Vec<Condition>,
    /// The rule needs L7 attributes in an ALLOW: it matches no connection at L4. (In a DENY or
    /// AUDIT, L4 takes them as matching.)
    pub never: bool,
    /// The rule needs attributes that no proxy of this mesh evaluates (JWT:
    /// `requestPrincipals`, `request.auth.*`; `remoteIpBlocks`, `remote.ip`, `experimental.*`)
    /// in an ALLOW: it matches no request at the waypoint either. (In a DENY or AUDIT they are
    /// taken as matching, at L4 and at the waypoint; they are not kept.)
    pub never_l7: bool,
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

/// `to[].operation`: ports (L4 and the waypoint); hosts, methods and paths (the waypoint
/// only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    /// Lowercase, matched against the request's lowercased host without its port.
    pub hosts: Vec<Pattern>,
    pub not_hosts: Vec<Pattern>,
    /// Exact, case-sensitive.
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    /// In the normal form of `waypoint::normalize`, matched against the normalised path.
    pub paths: Vec<Pattern>,
    pub not_paths: Vec<Pattern>,
}

/// A `when` condition.
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
    /// `request.headers[name]` (the waypoint only; the name lowercase): `*` is any value, even
    /// empty, of a header that is there.
    RequestHeader {
        name: http::HeaderName,
        values: Vec<Pattern>,
        not: Vec<Pattern>,
    },
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

    /// A header value: `*` is any value, even empty (the header is there).
    pub fn matches_bytes(&self, value: &[u8]) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value == s.as_bytes(),
            Pattern::Prefix(s) => value.starts_with(s.as_bytes()),
            Pattern::Suffix(s) => value.ends_with(s.as_bytes()),
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
