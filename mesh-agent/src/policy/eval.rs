//! Selecting a workload's policies and deciding a connection (L4), or deciding a request
//! under the policies of its service (L7, at the waypoint).
//!
//! The order is Istio's: a matching DENY denies; AUDIT policies that match are noted; with no
//! ALLOW policy selecting the workload the connection is allowed; otherwise it must match one
//! of them. A plaintext connection has no identity: a principal or namespace it is required to
//! have cannot match, and a `not` of one excludes only connections that have it. A request
//! lacking a header is treated alike: `values` of it cannot match, `notValues` exclude nothing.
//!
//! Both decisions are one function over one form of the rules: at L4 the L7 attributes are not
//! evaluated (a rule that needs them in an ALLOW is `never`), at L7 everything is.

use std::{borrow::Cow, collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use http::HeaderName;
use ipnet::IpNet;

use super::{Action, Condition, Operation, Pattern, Policy, Rule, Source};
use crate::identity::SpiffeId;

/// What a connection looks like to L4 policy.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    /// The verified peer identity; `None` for plaintext.
    pub identity: Option<&'a SpiffeId>,
    /// The source address.
    pub src: IpAddr,
    /// The destination (workload) address.
    pub dst: IpAddr,
    /// The destination (workload) port.
    pub port: u16,
}

/// What a request looks like to L7 policy, at the waypoint.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The client's verified identity (the waypoint's inbound mTLS peer); `None` for plaintext.
    pub identity: Option<&'a SpiffeId>,
    /// The client's address.
    pub src: IpAddr,
    /// The destination address the client sent to.
    pub dst: IpAddr,
    /// The destination port the client sent to (`ports`, `destination.port`).
    pub port: u16,
    /// The host, as `waypoint::normalize::host` gives it: lowercase, no port.
    pub host: &'a str,
    pub method: &'a str,
    /// The path, as `waypoint::normalize::target` gives it (no query).
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// The policies that select one workload, by action, each list in key order. Computed when
/// the state changes, so that a decision costs the policies of the workload only.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Selected {
    pub deny: Vec<Arc<Policy>>,
    pub allow: Vec<Arc<Policy>>,
    pub audit: Vec<Arc<Policy>>,
}

impl Selected {
    /// Sorts `policies` (already selected) by action.
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a Arc<Policy>>) -> Self {
        let mut s = Selected::default();
        for p in policies {
            match p.action {
                Action::Deny => s.deny.push(p.clone()),
                Action::Allow => s.allow.push(p.clone()),
                Action::Audit => s.audit.push(p.clone()),
            }
        }
        for list in [&mut s.deny, &mut s.allow, &mut s.audit] {
            list.sort_by(|a, b| a.key.cmp(&b.key));
        }
        s
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// Whether both hold the very same policies (pointer equality): a connection decided
    /// under one need not be decided again under the other.
    pub fn same(&self, other: &Selected) -> bool {
        let eq = |a: &[Arc<Policy>], b: &[Arc<Policy>]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
        };
        eq(&self.deny, &other.deny)
            && eq(&self.allow, &other.allow)
            && eq(&self.audit, &other.audit)
    }
}

/// Whether `policy` selects a workload of `namespace` with `labels` (at L4); a policy in
/// `root_namespace` selects in every namespace. A policy bound with `targetRefs` selects no
/// workload: the waypoint enforces it.
pub fn selects(
    policy: &Policy,
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    policy.targets.is_empty()
        && (policy.namespace == namespace || policy.namespace == root_namespace)
        && policy
            .selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
}

/// Why a connection was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No ALLOW or DENY policy selects the workload.
    NoPolicy,
    /// A rule of an ALLOW policy matched.
    AllowRule,
    /// A rule of a DENY policy matched.
    DenyRule,
    /// An invalid policy fails closed: a DENY that denies everything until fixed, or (at start,
    /// its last good version unknown) an ALLOW that allows nothing and kept the connection from
    /// matching an ALLOW.
    InvalidPolicy,
    /// ALLOW policies select the workload and none matched.
    NoAllowMatch,
}

impl Reason {
    /// For logs and the metric's `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoPolicy => "no_policy",
            Reason::AllowRule => "allow_rule",
            Reason::DenyRule => "deny_rule",
            Reason::InvalidPolicy => "invalid_policy",
            Reason::NoAllowMatch => "no_allow_match",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict on one connection and what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// The deciding policy (`namespace/name`); for [`Reason::NoAllowMatch`] the ALLOW policies
    /// that select the workload, comma-separated; `None` without policy.
    pub policy: Option<Arc<str>>,
    /// The index of the deciding rule in its policy.
    pub rule: Option<usize>,
    /// AUDIT policies that matched, with their rule.
    pub audited: Vec<(Arc<str>, usize)>,
}

impl Decision {
    /// `allow` or `deny`.
    pub fn verdict(&self) -> &'static str {
        if self.allowed {
            "allow"
        } else {
            "deny"
        }
    }

    /// The deciding policy, `-` when none.
    pub fn policy_str(&self) -> &str {
        self.policy.as_deref().unwrap_or("-")
    }

    /// The deciding policy as a metric label: the decision's own `Arc` (no copy), `-` when none.
    pub fn policy_label(&self) -> Arc<str> {
        self.policy.clone().unwrap_or_else(|| Arc::from("-"))
    }

    /// The deciding rule, `-` when none.
    pub fn rule_str(&self) -> String {
        self.rule.map_or_else(|| "-".to_owned(), |r| r.to_string())
    }

    /// The matched AUDIT policies as `ns/name#rule,...`, empty when none.
    pub fn audited_str(&self) -> String {
        self.audited
            .iter()
            .map(|(p, r)| format!("{p}#{r}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Decides `conn` under the policies of its destination workload.
pub fn evaluate(selected: Option<&Selected>, conn: &Conn<'_>) -> Decision {
    decide(selected, &Attrs::new(*conn, None))
}

/// Decides a request at the waypoint under the policies of its service
/// (`Snapshot::service_policies`): as [`evaluate`], every attribute evaluated.
pub fn decide_request(selected: &Selected, req: &Request<'_>) -> Decision {
    let conn = Conn {
        identity: req.identity,
        src: req.src,
        dst: req.dst,
        port: req.port,
    };
    let http = Http {
        host: req.host,
        method: req.method,
        path: req.path,
        headers: req.headers,
    };
    decide(Some(selected), &Attrs::new(conn, Some(http)))
}

fn decide(selected: Option<&Selected>, attrs: &Attrs<'_>) -> Decision {
    let no_policy = Decision {
        allowed: true,
        reason: Reason::NoPolicy,
        policy: None,
        rule: None,
        audited: Vec::new(),
    };
    let Some(selected) = selected else {
        return no_policy;
    };
    // AUDIT first, as Istio does: a connection that a DENY denies is still audited.
    let audited: Vec<_> = selected
        .audit
        .iter()
        .filter_map(|p| first_match(p, attrs).map(|r| (p.key.clone(), r)))
        .collect();
    for p in &selected.deny {
        if let Some(rule) = first_match(p, attrs) {
            let reason = if p.invalid.is_some() {
                Reason::InvalidPolicy
            } else {
                Reason::DenyRule
            };
            return Decision {
                allowed: false,
                reason,
                policy: Some(p.key.clone()),
                rule: Some(rule),
                audited,
            };
        }
    }
    if selected.allow.is_empty() {
        return Decision {
            audited,
            ..no_policy
        };
    }
    for p in &selected.allow {
        if let Some(rule) = first_match(p, attrs) {
            return Decision {
                allowed: true,
                reason: Reason::AllowRule,
                policy: Some(p.key.clone()),
                rule: Some(rule),
                audited,
            };
        }
    }
    // An invalid ALLOW that stands in (allowing nothing) is what denied, if there is one.
    let invalid: Vec<&Arc<Policy>> = selected
        .allow
        .iter()
        .filter(|p| p.invalid.is_some())
        .collect();
    let (reason, named) = if invalid.is_empty() {
        (
            Reason::NoAllowMatch,
            selected.allow.iter().collect::<Vec<_>>(),
        )
    } else {
        (Reason::InvalidPolicy, invalid)
    };
    let policy = match named.as_slice() {
        [one] => one.key.clone(),
        many => Arc::from(many.iter().map(|p| &*p.key).collect::<Vec<_>>().join(",")),
    };
    Decision {
        allowed: false,
        reason,
        policy: Some(policy),
        rule: None,
        audited,
    }
}

/// The L7 part of a request.
struct Http<'a> {
    host: &'a str,
    method: &'a str,
    path: &'a str,
    headers: &'a http::HeaderMap,
}

/// The connection's attributes, the principal rendered once (as Istio writes principals:
/// without `spiffe://`), and a request's when deciding one.
struct Attrs<'a> {
    conn: Conn<'a>,
    principal: Option<String>,
    http: Option<Http<'a>>,
}

impl<'a> Attrs<'a> {
    fn new(conn: Conn<'a>, http: Option<Http<'a>>) -> Self {
        let principal = conn.identity.map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
        });
        Attrs {
            conn,
            principal,
            http,
        }
    }

    fn namespace(&self) -> Option<&str> {
        self.conn.identity.map(|id| id.namespace.as_str())
    }
}

fn first_match(p: &Policy, a: &Attrs<'_>) -> Option<usize> {
    p.rules.iter().position(|r| rule_matches(r, a))
}

fn rule_matches(r: &Rule, a: &Attrs<'_>) -> bool {
    let never = if a.http.is_some() {
        r.never_l7
    } else {
        r.never
    };
    !never
        && (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, a)))
        && (r.to.is_empty() || r.to.iter().any(|o| operation_matches(o, a)))
        && r.when.iter().all(|c| condition_matches(c, a))
}

/// Positive values: empty, or one matches. Negative values: none matches. For an attribute
/// the connection lacks (no identity), positive values never match and negative ones exclude
/// nothing.
fn one_of<T>(values: &[T], not: &[T], have: Option<impl Fn(&T) -> bool>) -> bool {
    match have {
        Some(m) => (values.is_empty() || values.iter().any(&m)) && !not.iter().any(&m),
        None => values.is_empty(),
    }
}

fn patterns(values: &[Pattern], not: &[Pattern], value: Option<&str>) -> bool {
    one_of(values, not, value.map(|v| move |p: &Pattern| p.matches(v)))
}

fn nets(values: &[IpNet], not: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    one_of(values, not, Some(|n: &IpNet| n.contains(&ip)))
}

fn ports(values: &[u16], not: &[u16], port: u16) -> bool {
    one_of(values, not, Some(|p: &u16| *p == port))
}

fn source_matches(s: &Source, a: &Attrs<'_>) -> bool {
    patterns(&s.principals, &s.not_principals, a.principal.as_deref())
        && patterns(&s.namespaces, &s.not_namespaces, a.namespace())
        && nets(&s.ip_blocks, &s.not_ip_blocks, a.conn.src)
}

fn operation_matches(o: &Operation, a: &Attrs<'_>) -> bool {
    ports(&o.ports, &o.not_ports, a.conn.port)
        // At L4 the L7 attributes are taken as matching (`never` stands for them in an ALLOW).
        && a.http.as_ref().is_none_or(|h| {
            patterns(&o.hosts, &o.not_hosts, Some(h.host))
                && one_of(&o.methods, &o.not_methods, Some(|m: &String| m == h.method))
                && patterns(&o.paths, &o.not_paths, Some(h.path))
        })
}

/// `request.headers[name]`: the values of a header sent more than once are joined with `,`
/// (as Envoy matches them); a header that is absent has no value.
fn header(
    values: &[Pattern],
    not: &[Pattern],
    headers: &http::HeaderMap,
    name: &HeaderName,
) -> bool {
    let mut all = headers.get_all(name).iter().map(|v| v.as_bytes());
    let value: Option<Cow<'_, [u8]>> = all.next().map(|first| match all.next() {
        None => Cow::Borrowed(first),
        Some(second) => {
            let mut joined = first.to_vec();
            for v in std::iter::once(second).chain(all.by_ref()) {
                joined.push(b',');
                joined.extend_from_slice(v);
            }
            Cow::Owned(joined)
        }
    });
    let value = value.as_deref();
    one_of(
        values,
        not,
        value.map(|v| move |p: &Pattern| p.matches_bytes(v)),
    )
}

fn condition_matches(c: &Condition, a: &Attrs<'_>) -> bool {
    match c {
        Condition::SourceIp { values, not } => nets(values, not, a.conn.src),
        Condition::DestinationIp { values, not } => nets(values, not, a.conn.dst),
        Condition::DestinationPort { values, not } => ports(values, not, a.conn.port),
        Condition::SourcePrincipal { values, not } => patterns(values, not, a.principal.as_deref()),
        Condition::SourceNamespace { values, not } => patterns(values, not, a.namespace()),
        Condition::RequestHeader { name, values, not } => a
            .http
            .as_ref()
            .is_none_or(|h| header(values, not, h.headers, name)),
    }
}
