//! Table-driven tests of the policy semantics.
//!
//! `decisions` is the table: policies as operators write them (YAML `spec`s), a destination
//! workload, a connection, and the expected verdict with the policy and rule that decide it.
//! The focused tests below it cover compile errors, the fail-closed stand-in, L7 warnings,
//! AUDIT and selection. `waypoint` has the policies bound with `targetRefs` and their L7
//! decisions.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use super::{
    compile, evaluate, selects, Action, Conn, Decision, Invalid, Policy, Reason, Rule, Selected,
    Source,
};
use crate::identity::SpiffeId;

mod waypoint;

const ROOT: &str = "mesh-system";
/// The destination workload's address in every case.
const DST: &str = "10.0.1.10";

/// Compiles `spec` (YAML) as policy `key` (`namespace/name`).
fn try_policy(key: &str, spec: &str) -> Result<Policy, Box<Invalid>> {
    let (ns, name) = key.split_once('/').expect("key is namespace/name");
    let value: serde_yaml::Value =
        serde_yaml::from_str(spec).unwrap_or_else(|e| panic!("{key}: not YAML: {e}\n{spec}"));
    compile(ns, name, value).map_err(Box::new)
}

fn policy(key: &str, spec: &str) -> Policy {
    try_policy(key, spec).unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn invalid(key: &str, spec: &str) -> Invalid {
    match try_policy(key, spec) {
        Ok(p) => panic!("{key}: {spec} compiled: {p:?}"),
        Err(e) => *e,
    }
}

/// `ns/sa` in `cluster.local`, or a whole `spiffe://` id.
fn peer(s: &str) -> SpiffeId {
    if s.starts_with("spiffe://") {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    } else {
        let (ns, sa) = s.split_once('/').expect("peer is ns/sa");
        SpiffeId::new("cluster.local", ns, sa).unwrap_or_else(|e| panic!("{s}: {e}"))
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Selects the policies of a workload of `ns` with `workload_labels` and decides a connection.
fn decide(
    policies: &[Arc<Policy>],
    ns: &str,
    workload_labels: &[(&str, &str)],
    identity: Option<&SpiffeId>,
    src: &str,
    port: u16,
) -> Decision {
    let labels = labels(workload_labels);
    let selected = Selected::new(policies.iter().filter(|p| selects(p, ROOT, ns, &labels)));
    let conn = Conn {
        identity,
        src: ip(src),
        dst: ip(DST),
        port,
    };
    evaluate(Some(&selected), &conn)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Want {
    allowed: bool,
    reason: Reason,
    policy: Option<&'static str>,
    rule: Option<usize>,
}

const NO_POLICY: Want = Want {
    allowed: true,
    reason: Reason::NoPolicy,
    policy: None,
    rule: None,
};

const fn allow(policy: &'static str, rule: usize) -> Want {
    Want {
        allowed: true,
        reason: Reason::AllowRule,
        policy: Some(policy),
        rule: Some(rule),
    }
}

const fn deny(policy: &'static str, rule: usize) -> Want {
    Want {
        allowed: false,
        reason: Reason::DenyRule,
        policy: Some(policy),
        rule: Some(rule),
    }
}

/// ALLOW policies select the workload and none matches; `policies`: their keys, comma-joined.
const fn no_match(policies: &'static str) -> Want {
    Want {
        allowed: false,
        reason: Reason::NoAllowMatch,
        policy: Some(policies),
        rule: None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    /// `(namespace/name, spec as YAML)`.
    policies: &'static [(&'static str, &'static str)],
    /// The destination workload.
    ns: &'static str,
    labels: &'static [(&'static str, &'static str)],
    /// The peer identity (see [`peer`]); `None`: plaintext.
    peer: Option<&'static str>,
    src: &'static str,
    port: u16,
    want: Want,
}

const BASE: Case = Case {
    name: "",
    policies: &[],
    ns: "shop",
    labels: &[("app", "api")],
    peer: Some("shop/client"),
    src: "10.0.1.5",
    port: 8080,
    want: NO_POLICY,
};

// Frequently used specs.
const ALLOW_ALL: &str = "{rules: [{}]}";
const ALLOW_CLIENT: &str =
    "{rules: [{from: [{source: {principals: ['cluster.local/ns/shop/sa/client']}}]}]}";
const DENY_PLAINTEXT: &str = "{action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}";

#[rustfmt::skip]
const CASES: &[Case] = &[
    // No policy, policies that do not apply, empty rules.
    Case { name: "no policy", ..BASE },
    Case { name: "DENY that does not match: no_policy",
        policies: &[("shop/d", "{action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}")], ..BASE },
    Case { name: "allow-nothing of another namespace does not apply",
        policies: &[("other/none", "{}")], ..BASE },
    Case { name: "allow-nothing for other labels does not apply",
        policies: &[("shop/none", "{selector: {matchLabels: {app: web}}}")], ..BASE },
    Case { name: "selector needs all its labels",
        policies: &[("shop/none", "{selector: {matchLabels: {app: api, tier: db}}}")], ..BASE },
    Case { name: "selector with a subset of the workload's labels applies",
        policies: &[("shop/none", "{selector: {matchLabels: {app: api}}}")],
        labels: &[("app", "api"), ("version", "v2")], want: no_match("shop/none"), ..BASE },
    Case { name: "spec {} is allow-nothing",
        policies: &[("shop/none", "{}")], want: no_match("shop/none"), ..BASE },
    Case { name: "null spec is allow-nothing",
        policies: &[("shop/none", "~")], want: no_match("shop/none"), ..BASE },
    Case { name: "ALLOW with rules: [] allows nothing",
        policies: &[("shop/none", "{action: ALLOW, rules: []}")], want: no_match("shop/none"), ..BASE },
    Case { name: "rules: [{}] allows everything",
        policies: &[("shop/all", ALLOW_ALL)], peer: None, src: "192.0.2.1", port: 1, want: allow("shop/all", 0), ..BASE },
    Case { name: "DENY rules: [{}] denies everything",
        policies: &[("shop/all", "{action: DENY, rules: [{}]}")], want: deny("shop/all", 0), ..BASE },
    Case { name: "DENY without rules denies nothing",
        policies: &[("shop/none", "{action: DENY}")], ..BASE },
    Case { name: "empty source and operation match anything",
        policies: &[("shop/a", "{rules: [{from: [{source: {}}], to: [{operation: {}}]}]}")], peer: None,
        want: allow("shop/a", 0), ..BASE },
    // Principals.
    Case { name: "exact principal",
        policies: &[("shop/a", ALLOW_CLIENT)], want: allow("shop/a", 0), ..BASE },
    Case { name: "exact principal with spiffe://",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/shop/sa/client']}}]}]}")],
        want: allow("shop/a", 0), ..BASE },
    Case { name: "exact principal, other service account",
        policies: &[("shop/a", ALLOW_CLIENT)], peer: Some("shop/other"), want: no_match("shop/a"), ..BASE },
    Case { name: "exact principal, other trust domain",
        policies: &[("shop/a", ALLOW_CLIENT)], peer: Some("spiffe://example.org/ns/shop/sa/client"),
        want: no_match("shop/a"), ..BASE },
    Case { name: "principals are OR, the rule index is reported",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['cluster.local/ns/x/sa/y']}}]},
            {from: [{source: {principals: ['cluster.local/ns/x/sa/z', 'cluster.local/ns/shop/sa/client']}}]}]}")],
        want: allow("shop/a", 1), ..BASE },
    Case { name: "prefix principal",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['cluster.local/ns/shop/*']}}]}]}")],
        peer: Some("shop/anyone"), want: allow("shop/a", 0), ..BASE },
    Case { name: "prefix principal is not a namespace prefix",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['cluster.local/ns/shop/*']}}]}]}")],
        peer: Some("shopping/client"), want: no_match("shop/a"), ..BASE },
    Case { name: "suffix principal",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['*/sa/client']}}]}]}")],
        peer: Some("spiffe://example.org/ns/other/sa/client"), want: allow("shop/a", 0), ..BASE },
    Case { name: "suffix principal, other account",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['*/sa/admin']}}]}]}")],
        want: no_match("shop/a"), ..BASE },
    Case { name: "principal * matches any mTLS peer",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['*']}}]}]}")],
        peer: Some("spiffe://example.org/ns/x/sa/y"), want: allow("shop/a", 0), ..BASE },
    Case { name: "principal * does not match plaintext",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['*']}}]}]}")],
        peer: None, want: no_match("shop/a"), ..BASE },
    Case { name: "exact principal does not match plaintext",
        policies: &[("shop/a", ALLOW_CLIENT)], peer: None, want: no_match("shop/a"), ..BASE },
    // notPrincipals.
    Case { name: "notPrincipals excludes the peer",
        policies: &[("shop/a", "{rules: [{from: [{source: {notPrincipals: ['cluster.local/ns/shop/sa/client']}}]}]}")],
        want: no_match("shop/a"), ..BASE },
    Case { name: "notPrincipals lets others in",
        policies: &[("shop/a", "{rules: [{from: [{source: {notPrincipals: ['cluster.local/ns/shop/sa/client']}}]}]}")],
        peer: Some("shop/other"), want: allow("shop/a", 0), ..BASE },
    Case { name: "notPrincipals does not exclude plaintext",
        policies: &[("shop/a", "{rules: [{from: [{source: {notPrincipals: ['*/sa/client']}}]}]}")],
        peer: None, want: allow("shop/a", 0), ..BASE },
    Case { name: "DENY notPrincipals * denies plaintext",
        policies: &[("shop/d", DENY_PLAINTEXT)], peer: None, want: deny("shop/d", 0), ..BASE },
    Case { name: "DENY notPrincipals * lets mTLS through",
        policies: &[("shop/d", DENY_PLAINTEXT)], ..BASE },
    // Namespaces.
    Case { name: "namespaces exact",
        policies: &[("shop/a", "{rules: [{from: [{source: {namespaces: [shop]}}]}]}")], want: allow("shop/a", 0), ..BASE },
    Case { name: "namespaces exact, other namespace",
        policies: &[("shop/a", "{rules: [{from: [{source: {namespaces: [shop]}}]}]}")], peer: Some("shop2/client"),
        want: no_match("shop/a"), ..BASE },
    Case { name: "namespaces prefix",
        policies: &[("shop/a", "{rules: [{from: [{source: {namespaces: ['team-*']}}]}]}")], peer: Some("team-a/x"),
        want: allow("shop/a", 0), ..BASE },
    Case { name: "namespaces suffix",
        policies: &[("shop/a", "{rules: [{from: [{source: {namespaces: ['*-prod']}}]}]}")], peer: Some("pay-prod/x"),
        want: allow("shop/a", 0), ..BASE },
    Case { name: "namespaces suffix, no match",
        policies: &[("shop/a", "{rules: [{from: [{source: {namespaces: ['*-prod']}}]}]}")], peer: Some("pay-dev/x"),
        want: no_match("shop/a"), ..BASE },
    Case { name: "namespaces * does not match plaintext",
        policies: &[("shop/a", "{rules: [{from: [{source: {namespaces: ['*']}}]}]}")], peer: None,
        want: no_match("shop/a"), ..BASE },
    Case { name: "DENY notNamespaces denies other namespaces",
        policies: &[("shop/d", "{action: DENY, rules: [{from: [{source: {notNamespaces: [shop]}}]}]}")],
        peer: Some("other/client"), want: deny("shop/d", 0), ..BASE },
    Case { name: "DENY notNamespaces spares its namespace",
        policies: &[("shop/d", "{action: DENY, rules: [{from: [{source: {notNamespaces: [shop]}}]}]}")], ..BASE },
    Case { name: "DENY notNamespaces denies plaintext",
        policies: &[("shop/d", "{action: DENY, rules: [{from: [{source: {notNamespaces: [shop]}}]}]}")],
        peer: None, want: deny("shop/d", 0), ..BASE },
    // Fields of a source are AND, sources are OR.
    Case { name: "source fields are AND",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['*'], namespaces: [other]}}]}]}")],
        want: no_match("shop/a"), ..BASE },
    Case { name: "sources are OR",
        policies: &[("shop/a", "{rules: [{from: [{source: {namespaces: [other]}}, {source: {ipBlocks: ['10.0.1.0/24']}}]}]}")],
        peer: None, want: allow("shop/a", 0), ..BASE },
    // Addresses.
    Case { name: "ipBlocks CIDR",
        policies: &[("shop/a", "{rules: [{from: [{source: {ipBlocks: ['10.0.0.0/16']}}]}]}")], peer: None,
        want: allow("shop/a", 0), ..BASE },
    Case { name: "ipBlocks CIDR, other address",
        policies: &[("shop/a", "{rules: [{from: [{source: {ipBlocks: ['10.0.0.0/16']}}]}]}")], src: "10.1.0.5",
        want: no_match("shop/a"), ..BASE },
    Case { name: "ipBlocks single address",
        policies: &[("shop/a", "{rules: [{from: [{source: {ipBlocks: ['10.0.9.9', '10.0.1.5']}}]}]}")],
        want: allow("shop/a", 0), ..BASE },
    Case { name: "ipBlocks CIDR with host bits",
        policies: &[("shop/a", "{rules: [{from: [{source: {ipBlocks: ['10.0.1.77/24']}}]}]}")],
        want: allow("shop/a", 0), ..BASE },
    Case { name: "ipBlocks IPv4 matches an IPv4-mapped IPv6 source",
        policies: &[("shop/a", "{rules: [{from: [{source: {ipBlocks: ['10.0.0.0/8']}}]}]}")], src: "::ffff:10.0.1.5",
        want: allow("shop/a", 0), ..BASE },
    Case { name: "an IPv4-mapped ipBlock matches the IPv4 source (a DENY written that way holds)",
        policies: &[("shop/d", "{action: DENY, rules: [{from: [{source: {ipBlocks: ['::ffff:10.0.0.0/104']}}]}]}")],
        want: deny("shop/d", 0), ..BASE },
    Case { name: "ipBlocks IPv6",
        policies: &[("shop/a", "{rules: [{from: [{source: {ipBlocks: ['fd00::/8']}}]}]}")], src: "fd00::5",
        want: allow("shop/a", 0), ..BASE },
    Case { name: "ipBlocks IPv6 does not match IPv4",
        policies: &[("shop/a", "{rules: [{from: [{source: {ipBlocks: ['fd00::/8']}}]}]}")],
        want: no_match("shop/a"), ..BASE },
    Case { name: "DENY notIpBlocks denies outsiders",
        policies: &[("shop/d", "{action: DENY, rules: [{from: [{source: {notIpBlocks: ['10.0.0.0/8']}}]}]}")],
        src: "192.168.1.1", want: deny("shop/d", 0), ..BASE },
    Case { name: "DENY notIpBlocks spares insiders (IPv4-mapped too)",
        policies: &[("shop/d", "{action: DENY, rules: [{from: [{source: {notIpBlocks: ['10.0.0.0/8']}}]}]}")],
        src: "::ffff:10.9.9.9", ..BASE },
    // Ports.
    Case { name: "ports as strings",
        policies: &[("shop/a", "{rules: [{to: [{operation: {ports: ['9090', '8080']}}]}]}")], want: allow("shop/a", 0), ..BASE },
    Case { name: "ports as numbers",
        policies: &[("shop/a", "{rules: [{to: [{operation: {ports: [8080]}}]}]}")], want: allow("shop/a", 0), ..BASE },
    Case { name: "ports, other port",
        policies: &[("shop/a", "{rules: [{to: [{operation: {ports: ['8080']}}]}]}")], port: 8081,
        want: no_match("shop/a"), ..BASE },
    Case { name: "DENY notPorts denies other ports",
        policies: &[("shop/d", "{action: DENY, rules: [{to: [{operation: {notPorts: ['8080']}}]}]}")], port: 15000,
        want: deny("shop/d", 0), ..BASE },
    Case { name: "DENY notPorts spares its port",
        policies: &[("shop/d", "{action: DENY, rules: [{to: [{operation: {notPorts: ['8080']}}]}]}")], ..BASE },
    Case { name: "from AND to",
        policies: &[("shop/a", "{rules: [{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: ['9090']}}]}]}")],
        want: no_match("shop/a"), ..BASE },
    // when.
    Case { name: "when source.ip",
        policies: &[("shop/a", "{rules: [{when: [{key: source.ip, values: ['10.0.1.0/24']}]}]}")], peer: None,
        want: allow("shop/a", 0), ..BASE },
    Case { name: "when source.ip notValues",
        policies: &[("shop/a", "{rules: [{when: [{key: source.ip, notValues: ['10.0.1.5']}]}]}")],
        want: no_match("shop/a"), ..BASE },
    Case { name: "when source.principal",
        policies: &[("shop/a", "{rules: [{when: [{key: source.principal, values: ['spiffe://cluster.local/ns/shop/*']}]}]}")],
        want: allow("shop/a", 0), ..BASE },
    Case { name: "when source.principal, plaintext",
        policies: &[("shop/a", "{rules: [{when: [{key: source.principal, values: ['*']}]}]}")], peer: None,
        want: no_match("shop/a"), ..BASE },
    Case { name: "when source.namespace notValues, plaintext",
        policies: &[("shop/a", "{rules: [{when: [{key: source.namespace, notValues: [other]}]}]}")], peer: None,
        want: allow("shop/a", 0), ..BASE },
    Case { name: "when destination.ip",
        policies: &[("shop/a", "{rules: [{when: [{key: destination.ip, values: ['10.0.1.0/24']}]}]}")],
        want: allow("shop/a", 0), ..BASE },
    Case { name: "when destination.ip, other address",
        policies: &[("shop/a", "{rules: [{when: [{key: destination.ip, values: ['10.9.0.0/16']}]}]}")],
        want: no_match("shop/a"), ..BASE },
    Case { name: "when destination.port notValues",
        policies: &[("shop/d", "{action: DENY, rules: [{when: [{key: destination.port, notValues: ['8080']}]}]}")],
        port: 22, want: deny("shop/d", 0), ..BASE },
    Case { name: "when conditions are AND",
        policies: &[("shop/a", "{rules: [{when: [{key: destination.port, values: ['8080']}, {key: source.namespace, values: [other]}]}]}")],
        want: no_match("shop/a"), ..BASE },
    // L7 attributes.
    Case { name: "ALLOW rule with methods matches nothing",
        policies: &[("shop/a", "{rules: [{to: [{operation: {methods: [GET]}}]}]}")], want: no_match("shop/a"), ..BASE },
    Case { name: "ALLOW: the L7 rule is skipped, the next one matches",
        policies: &[("shop/a", "{rules: [{from: [{source: {requestPrincipals: ['*']}}]}, {from: [{source: {namespaces: [shop]}}]}]}")],
        want: allow("shop/a", 1), ..BASE },
    Case { name: "ALLOW rule with L4 and L7 parts matches nothing",
        policies: &[("shop/a", "{rules: [{from: [{source: {principals: ['*'], remoteIpBlocks: ['10.0.0.0/8']}}]}]}")],
        want: no_match("shop/a"), ..BASE },
    Case { name: "ALLOW rule with an L7 when key matches nothing",
        policies: &[("shop/a", "{rules: [{when: [{key: 'request.headers[x-user]', values: [alice]}]}]}")],
        want: no_match("shop/a"), ..BASE },
    Case { name: "DENY rule with only L7 parts denies everything",
        policies: &[("shop/d", "{action: DENY, rules: [{to: [{operation: {paths: ['/admin']}}]}]}")], peer: None,
        want: deny("shop/d", 0), ..BASE },
    Case { name: "DENY rule with L7 parts matches on its L4 parts",
        policies: &[("shop/d", "{action: DENY, rules: [{to: [{operation: {methods: [POST], ports: ['9090']}}]}]}")], ..BASE },
    Case { name: "DENY rule with L7 parts denies what its L4 parts match",
        policies: &[("shop/d", "{action: DENY, rules: [{from: [{source: {requestPrincipals: ['*'], namespaces: [shop]}}],
            when: [{key: remote.ip, values: ['1.2.3.4']}]}]}")],
        want: deny("shop/d", 0), ..BASE },
    // Several policies.
    Case { name: "DENY beats ALLOW",
        policies: &[("shop/all", ALLOW_ALL), ("shop/d", "{action: DENY, rules: [{from: [{source: {namespaces: [shop]}}]}]}")],
        want: deny("shop/d", 0), ..BASE },
    Case { name: "the first matching DENY in key order decides",
        policies: &[("shop/z", "{action: DENY, rules: [{}]}"), ("shop/b", "{action: DENY, rules: [{}, {}]}")],
        want: deny("shop/b", 0), ..BASE },
    Case { name: "either of two ALLOWs may match",
        policies: &[("shop/a", ALLOW_CLIENT), ("shop/b", "{rules: [{to: [{operation: {ports: ['8080']}}]}]}")],
        peer: None, want: allow("shop/b", 0), ..BASE },
    Case { name: "no ALLOW matches: all are named, in key order",
        policies: &[("shop/z", ALLOW_CLIENT), ("shop/b", "{}"), ("other/all", ALLOW_ALL)],
        peer: Some("other/x"), want: no_match("shop/b,shop/z"), ..BASE },
    Case { name: "AUDIT does not change the verdict",
        policies: &[("shop/audit", "{action: AUDIT, rules: [{}]}")], ..BASE },
    // Root namespace.
    Case { name: "root DENY applies in every namespace",
        policies: &[("mesh-system/no-plaintext", DENY_PLAINTEXT), ("shop/all", ALLOW_ALL)], peer: None,
        want: deny("mesh-system/no-plaintext", 0), ..BASE },
    Case { name: "root DENY applies in its own namespace",
        policies: &[("mesh-system/no-plaintext", DENY_PLAINTEXT)], ns: "mesh-system", peer: None,
        want: deny("mesh-system/no-plaintext", 0), ..BASE },
    Case { name: "root ALLOW with selector applies",
        policies: &[("mesh-system/api", "{selector: {matchLabels: {app: api}}, rules: [{from: [{source: {namespaces: [shop]}}]}]}")],
        want: allow("mesh-system/api", 0), ..BASE },
    Case { name: "root ALLOW with selector, other workload",
        policies: &[("mesh-system/api", "{selector: {matchLabels: {app: api}}}")], labels: &[("app", "web")], ..BASE },
    Case { name: "root and namespace ALLOWs, none matches",
        policies: &[("shop/client", ALLOW_CLIENT), ("mesh-system/api", "{selector: {matchLabels: {app: api}}}")],
        peer: Some("shop/other"), want: no_match("mesh-system/api,shop/client"), ..BASE },
    Case { name: "root ALLOW or namespace ALLOW may match",
        policies: &[("shop/client", ALLOW_CLIENT), ("mesh-system/api", "{selector: {matchLabels: {app: api}}}")],
        want: allow("shop/client", 0), ..BASE },
];

#[test]
fn decisions() {
    assert!(CASES.len() >= 45, "only {} cases", CASES.len());
    let mut names = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for case in CASES {
        assert!(
            names.insert(case.name),
            "duplicate case name {:?}",
            case.name
        );
        let policies: Vec<Arc<Policy>> = case
            .policies
            .iter()
            .map(|(key, spec)| Arc::new(policy(key, spec)))
            .collect();
        let identity = case.peer.map(peer);
        let d = decide(
            &policies,
            case.ns,
            case.labels,
            identity.as_ref(),
            case.src,
            case.port,
        );
        let got = (d.allowed, d.reason, d.policy.as_deref(), d.rule);
        let w = case.want;
        if got != (w.allowed, w.reason, w.policy, w.rule) {
            failures.push(format!("{}:\n    got  {got:?}\n    want {w:?}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn no_selected_policies() {
    let id = peer("shop/client");
    let conn = Conn {
        identity: Some(&id),
        src: ip("10.0.1.5"),
        dst: ip(DST),
        port: 8080,
    };
    for d in [
        evaluate(None, &conn),
        evaluate(Some(&Selected::default()), &conn),
    ] {
        assert_eq!(
            (d.allowed, d.reason, d.policy, d.rule),
            (true, Reason::NoPolicy, None, None)
        );
        assert!(d.audited.is_empty());
    }
    assert!(Selected::new(&[] as &[Arc<Policy>]).is_empty());
}

/// `(spec, the field named, what the message says)`: each spec is invalid.
#[rustfmt::skip]
const COMPILE_ERRORS: &[(&str, &str, &str)] = &[
    ("{rules: [{from: [{source: {principal: ['cluster.local/ns/a/sa/b']}}]}]}",
        "spec.rules[0].from[0].source.principal", "unknown field `principal`"),
    ("{rule: [{}]}", "spec.rule", "unknown field `rule`"),
    ("{selector: {labels: {app: api}}}", "spec.selector.labels", "unknown field `labels`"),
    ("{rules: [{to: [{operation: {port: ['80']}}]}]}", "spec.rules[0].to[0].operation.port", "unknown field `port`"),
    ("{rules: [{from: [{}]}]}", "spec.rules[0].from[0]", "missing field `source`"),
    ("{rules: {}}", "spec.rules", "invalid type"),
    ("[DENY]", "policy shop/x: spec: ", "invalid type"),
    ("{rules: [{from: [{source: {ipBlocks: ['10.0.0.0/8', '10.0.0.0/33']}}]}]}",
        "spec.rules[0].from[0].source.ipBlocks[1]", "\"10.0.0.0/33\" is not an address or CIDR block"),
    ("{rules: [{from: [{source: {notIpBlocks: [10.0.0.x]}}]}]}",
        "spec.rules[0].from[0].source.notIpBlocks[0]", "not an address"),
    ("{rules: [{to: [{operation: {ports: ['80', '80a']}}]}]}",
        "spec.rules[0].to[0].operation.ports[1]", "\"80a\" is not a port (1-65535)"),
    ("{rules: [{}, {to: [{operation: {ports: [0]}}]}]}", "spec.rules[1].to[0].operation.ports[0]", "0 is not a port"),
    ("{rules: [{to: [{operation: {}}, {operation: {notPorts: [70000]}}]}]}",
        "spec.rules[0].to[1].operation.notPorts[0]", "70000 is not a port"),
    ("{rules: [{from: [{source: {principals: ['*foo*']}}]}]}",
        "spec.rules[0].from[0].source.principals[0]", "may only stand alone"),
    ("{rules: [{from: [{source: {principals: ['cluster.local/ns/a/sa/b', 'a*b']}}]}]}",
        "spec.rules[0].from[0].source.principals[1]", "may only stand alone"),
    ("{rules: [{from: [{source: {notPrincipals: ['']}}]}]}", "spec.rules[0].from[0].source.notPrincipals[0]", "empty"),
    ("{rules: [{from: [{source: {principals: [cluster.local/client]}}]}]}",
        "spec.rules[0].from[0].source.principals[0]", "is not <trust-domain>/ns/<namespace>/sa/<service-account>"),
    ("{rules: [{from: [{source: {principals: ['cluster.local/ns/a b/sa/c']}}]}]}",
        "spec.rules[0].from[0].source.principals[0]", "' ' is not allowed"),
    ("{rules: [{from: [{source: {namespaces: [a/b]}}]}]}", "spec.rules[0].from[0].source.namespaces[0]", "contains `/`"),
    ("{action: DENI}", "spec.action", "unknown action \"DENI\""),
    ("{action: CUSTOM}", "spec.action", "CUSTOM"),
    ("{action: DENY, provider: {name: ext}}", "spec.provider", "not supported"),
    ("{targetRefs: [{kind: Gateway, name: gw}]}", "spec.targetRefs[0].group", "a Gateway's group is"),
    ("{targetRef: {kind: ServiceEntry, name: s}}", "spec.targetRef.kind", "\"ServiceEntry\" is not supported"),
    ("{rules: [{when: [{key: connection.sni, values: [a.example]}]}]}",
        "spec.rules[0].when[0].key", "\"connection.sni\" is not supported"),
    ("{rules: [{when: [{key: source.ip}]}]}", "spec.rules[0].when[0].values", "needs values or notValues"),
    ("{rules: [{when: [{key: destination.port, values: ['80', http]}]}]}",
        "spec.rules[0].when[0].values[1]", "\"http\" is not a port"),
    ("{rules: [{when: [{key: source.principal, notValues: ['*x*']}]}]}",
        "spec.rules[0].when[0].notValues[0]", "may only stand alone"),
    ("{selector: {matchLabels: {'': x}}}", "spec.selector.matchLabels", "label key \"\" is empty"),
];

#[test]
fn compile_errors() {
    for &(spec, field, message) in COMPILE_ERRORS {
        let e = invalid("shop/x", spec);
        let shown = e.to_string();
        assert!(
            shown.starts_with("policy shop/x: spec"),
            "{spec}: {shown:?} does not name the policy"
        );
        assert!(shown.contains(field), "{spec}: {shown:?} lacks {field:?}");
        assert!(
            shown.contains(message),
            "{spec}: {shown:?} lacks {message:?}"
        );
        assert_eq!(e.key(), "shop/x");
    }
}

#[test]
fn fail_closed() {
    let api = labels(&[("app", "api")]);
    // (spec, action read from it, selector of the stand-in)
    let deny_cases = [
        (
            "{action: DENY, selector: {matchLabels: {app: api}}, rules: [{from: [{source: {ipBlocks: [x]}}]}]}",
            Some(Action::Deny),
            api.clone(),
        ),
        (
            "{action: DENY, selector: {matchLabels: {app: api}}, rules: [{from: [{source: {principal: [x]}}]}]}",
            Some(Action::Deny),
            api.clone(),
        ),
        ("{action: DENI, selector: {matchLabels: {app: api}}}", None, api.clone()),
        ("{action: CUSTOM, provider: {name: ext}}", None, BTreeMap::new()),
        ("{action: [DENY], selector: {matchLabels: {app: api}}}", None, api),
        (
            "{action: DENY, selector: {matchLabels: [app]}, rules: [{}]}",
            Some(Action::Deny),
            BTreeMap::new(),
        ),
        ("[{action: DENY}]", None, BTreeMap::new()),
        ("'action: DENY'", None, BTreeMap::new()),
    ];
    for (spec, action, selector) in deny_cases {
        let e = invalid("shop/x", spec);
        assert_eq!(e.action, action, "{spec}");
        let p = e
            .fail_closed()
            .unwrap_or_else(|| panic!("{spec}: no stand-in for {e}"));
        assert_eq!(p.key.as_ref(), "shop/x", "{spec}");
        assert_eq!(p.action, Action::Deny, "{spec}");
        assert_eq!(p.selector, selector, "{spec}");
        assert_eq!(p.rules, vec![Rule::default()], "{spec}");
        assert_eq!(p.invalid.as_deref(), Some(e.to_string().as_str()), "{spec}");

        // It denies every connection to the workloads it selects, whatever allows them.
        let policies = [Arc::new(p), Arc::new(policy("shop/all", ALLOW_ALL))];
        for id in [Some(peer("shop/client")), None] {
            let d = decide(
                &policies,
                "shop",
                &[("app", "api")],
                id.as_ref(),
                "10.0.1.5",
                80,
            );
            assert_eq!(
                (d.allowed, d.reason, d.policy.as_deref(), d.rule),
                (false, Reason::InvalidPolicy, Some("shop/x"), Some(0)),
                "{spec}"
            );
        }
        let elsewhere = decide(&policies, "other", &[("app", "api")], None, "10.0.1.5", 80);
        assert_eq!(elsewhere.reason, Reason::NoPolicy, "{spec}");
    }

    // An invalid ALLOW or AUDIT has no stand-in: the caller keeps its last good version.
    for spec in [
        "{rules: [{from: [{source: {ipBlocks: [x]}}]}]}",
        "{action: ALLOW, rules: [{to: [{operation: {ports: ['80a']}}]}]}",
        "{action: AUDIT, rules: [{from: [{source: {principal: [x]}}]}]}",
        "{action: ALLOW, targetRefs: [{kind: Gateway, name: gw}]}",
    ] {
        let e = invalid("shop/x", spec);
        assert!(e.fail_closed().is_none(), "{spec}: {e}");
    }

    // A stand-in in the root namespace denies in every namespace.
    let root = invalid(
        "mesh-system/x",
        "{action: DENY, rules: [{to: [{operation: {ports: [0]}}]}]}",
    );
    let policies = [Arc::new(root.fail_closed().expect("a DENY stand-in"))];
    let d = decide(&policies, "shop", &[], None, "10.0.1.5", 80);
    assert_eq!(d.reason, Reason::InvalidPolicy);
    assert_eq!(d.policy.as_deref(), Some("mesh-system/x"));
}

#[test]
fn l7_warnings() {
    let p = policy(
        "shop/a",
        "{rules: [{from: [{source: {namespaces: [shop]}}]}, {to: [{operation: {methods: [GET], paths: ['/x']}}]}]}",
    );
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    let w = &p.warnings[0];
    for part in [
        "rules[1]",
        "methods, paths",
        "ALLOW",
        "matches no connection",
    ] {
        assert!(w.contains(part), "{w:?} lacks {part:?}");
    }
    assert!(!p.rules[0].never);
    assert!(p.rules[1].never);

    let p = policy(
        "shop/d",
        "{action: DENY, rules: [{}, {from: [{source: {requestPrincipals: ['*'], notRemoteIpBlocks: ['1.2.3.4']}}],
          when: [{key: 'request.auth.claims[iss]', values: [x]}, {key: source.ip, values: ['10.0.0.0/8']}]}]}",
    );
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    let w = &p.warnings[0];
    for part in [
        "rules[1]",
        "requestPrincipals, notRemoteIpBlocks, when",
        "DENY",
        "fail closed",
    ] {
        assert!(w.contains(part), "{w:?} lacks {part:?}");
    }
    // The L7 parts are dropped; the L4 condition stays.
    assert!(!p.rules[1].never);
    assert_eq!(p.rules[1].from, vec![Source::default()]);
    assert_eq!(p.rules[1].when.len(), 1);

    let p = policy(
        "shop/audit",
        "{action: AUDIT, rules: [{to: [{operation: {hosts: [a.example], ports: ['80']}}]}]}",
    );
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert!(p.warnings[0].contains("rules[0] needs L7 attributes (hosts)"));
    assert!(p.warnings[0].contains("AUDIT"));
    assert!(!p.rules[0].never);
    assert_eq!(p.rules[0].to[0].ports, vec![80]);

    // L4 only: no warning.
    for spec in [
        ALLOW_CLIENT,
        DENY_PLAINTEXT,
        "{rules: [{when: [{key: destination.port, values: ['80']}]}]}",
    ] {
        assert!(policy("shop/a", spec).warnings.is_empty(), "{spec}");
    }
}

#[test]
fn audit() {
    let audits = [
        (
            "shop/b-audit",
            "{action: AUDIT, rules: [{from: [{source: {namespaces: [other]}}]}, {}]}",
        ),
        (
            "shop/a-audit",
            "{action: AUDIT, rules: [{to: [{operation: {ports: ['8080']}}]}]}",
        ),
        (
            "shop/c-audit",
            "{action: AUDIT, rules: [{from: [{source: {principals: ['*']}}]}]}",
        ),
        ("shop/nothing", "{action: AUDIT}"),
        (
            "shop/web",
            "{action: AUDIT, selector: {matchLabels: {app: web}}, rules: [{}]}",
        ),
    ];
    let client = peer("shop/client");
    // The AUDIT policies and `extra`, for the `app: api` workload of `shop`.
    let run = |extra: &[(&str, &str)], identity: Option<&SpiffeId>, port: u16| {
        let all: Vec<Arc<Policy>> = audits
            .iter()
            .chain(extra)
            .map(|(key, spec)| Arc::new(policy(key, spec)))
            .collect();
        decide(&all, "shop", &[("app", "api")], identity, "10.0.1.5", port)
    };

    // Alone: the verdict is no_policy; every matching AUDIT is recorded, in key order.
    let d = run(&[], Some(&client), 8080);
    assert_eq!(
        (d.allowed, d.reason, d.policy_str()),
        (true, Reason::NoPolicy, "-")
    );
    assert_eq!(
        d.audited_str(),
        "shop/a-audit#0,shop/b-audit#1,shop/c-audit#0"
    );
    assert_eq!(d.audited[0], (Arc::<str>::from("shop/a-audit"), 0));
    assert_eq!(run(&[], None, 9090).audited_str(), "shop/b-audit#1");

    // With an ALLOW that matches, and one that does not.
    let d = run(&[("shop/all", ALLOW_ALL)], None, 8080);
    assert_eq!((d.allowed, d.reason), (true, Reason::AllowRule));
    assert_eq!(d.audited_str(), "shop/a-audit#0,shop/b-audit#1");
    let d = run(&[("shop/a", ALLOW_CLIENT)], None, 8080);
    assert_eq!((d.allowed, d.reason), (false, Reason::NoAllowMatch));
    assert_eq!(d.audited_str(), "shop/a-audit#0,shop/b-audit#1");

    // A DENY denies; the AUDIT policies that match are still recorded (Istio evaluates AUDIT
    // before DENY).
    let d = run(&[("shop/d", DENY_PLAINTEXT)], None, 8080);
    assert_eq!(
        (d.verdict(), d.reason, d.rule_str()),
        ("deny", Reason::DenyRule, "0".into())
    );
    assert_eq!(d.audited_str(), "shop/a-audit#0,shop/b-audit#1");
}

#[test]
fn selection() {
    let api = labels(&[("app", "api"), ("version", "v1")]);
    let web = labels(&[("app", "web")]);
    let none = BTreeMap::new();
    let all = policy("shop/all", "{}");
    let api_only = policy("shop/api", "{selector: {matchLabels: {app: api}}}");
    let root_all = policy("mesh-system/all", "{action: DENY}");
    let root_api = policy(
        "mesh-system/api",
        "{selector: {matchLabels: {app: api, version: v1}}}",
    );
    let other = policy("other/all", "{}");

    // (policy, namespace, labels, selected)
    let cases = [
        (&all, "shop", &api, true),
        (&all, "shop", &none, true),
        (&all, "other", &api, false),
        (&api_only, "shop", &api, true),
        (&api_only, "shop", &web, false),
        (&api_only, "shop", &none, false),
        (&api_only, "other", &api, false),
        (&root_all, "shop", &none, true),
        (&root_all, "other", &web, true),
        (&root_all, "mesh-system", &none, true),
        (&root_api, "shop", &api, true),
        (&root_api, "other", &api, true),
        (&root_api, "shop", &web, false),
        (&root_api, "shop", &labels(&[("app", "api")]), false),
        (&other, "shop", &api, false),
    ];
    for (p, ns, labels, want) in cases {
        assert_eq!(
            selects(p, ROOT, ns, labels),
            want,
            "{} for {ns} {labels:?}",
            p.key
        );
    }
    // Outside the root namespace a policy of `mesh-system` is an ordinary one.
    assert!(!selects(&root_all, "istio-system", "shop", &none));
    assert!(selects(&root_all, "istio-system", "mesh-system", &none));

    // Selected groups by action, each in key order.
    let p = |key: &str, spec: &str| Arc::new(policy(key, spec));
    let list = [
        p("shop/z", "{}"),
        p("shop/d2", "{action: DENY}"),
        p("shop/au", "{action: AUDIT}"),
        p("mesh-system/a", "{}"),
        p("shop/d1", "{action: DENY}"),
    ];
    let s = Selected::new(&list);
    let keys = |v: &[Arc<Policy>]| v.iter().map(|p| p.key.to_string()).collect::<Vec<_>>();
    assert_eq!(keys(&s.deny), ["shop/d1", "shop/d2"]);
    assert_eq!(keys(&s.allow), ["mesh-system/a", "shop/z"]);
    assert_eq!(keys(&s.audit), ["shop/au"]);
    assert!(!s.is_empty());
}
