//! A deterministic fuzz test of policy input (the state file's and, later, the Kubernetes API's):
//! random specs built from the resource's own field names and hostile values, and random
//! mutations of valid YAML. Compiling never panics, an invalid DENY always has a fail-closed
//! stand-in, and every compiled policy decides random connections without panicking.

use std::net::IpAddr;

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_yaml::{Mapping, Value};

use super::{compile, evaluate, Action, Conn, Selected};
use crate::identity::SpiffeId;

const KEYS: &[&str] = &[
    "selector",
    "matchLabels",
    "action",
    "rules",
    "from",
    "to",
    "when",
    "source",
    "operation",
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "requestPrincipals",
    "remoteIpBlocks",
    "ports",
    "notPorts",
    "methods",
    "paths",
    "hosts",
    "key",
    "values",
    "notValues",
    "provider",
    "targetRefs",
    "principal",
    "",
    "app",
];

const STRINGS: &[&str] = &[
    "ALLOW",
    "DENY",
    "AUDIT",
    "CUSTOM",
    "deny",
    "*",
    "**",
    "a*b",
    "*a*",
    "cluster.local/ns/a/sa/b",
    "spiffe://cluster.local/ns/a/sa/b",
    "cluster.local/ns/a/sa/*",
    "*/sa/b",
    "10.0.0.0/8",
    "10.0.0.1",
    "::ffff:10.0.0.0/104",
    "::ffff:1.2.3.4",
    "fd00::/8",
    "10.0.0.0/33",
    "300.1.1.1",
    "80",
    "0",
    "-1",
    "65535",
    "65536",
    " 8080 ",
    "",
    "source.ip",
    "source.principal",
    "destination.port",
    "request.headers[x]",
    "connection.sni",
    "remote.ip",
    "ü",
    "a/b",
    "\n",
];

fn value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 4 { 4 } else { 7 }) {
        0 => Value::Null,
        1 => Value::from(rng.random_range(-2i64..70_000)),
        2 | 3 => Value::from(STRINGS[rng.random_range(0..STRINGS.len())]),
        4 => Value::Bool(rng.random_bool(0.5)),
        5 => Value::Sequence(
            (0..rng.random_range(0..4))
                .map(|_| value(rng, depth + 1))
                .collect(),
        ),
        _ => mapping(rng, depth + 1),
    }
}

fn mapping(rng: &mut StdRng, depth: u32) -> Value {
    let mut m = Mapping::new();
    for _ in 0..rng.random_range(0..4) {
        let key = KEYS[rng.random_range(0..KEYS.len())];
        m.insert(Value::from(key), value(rng, depth));
    }
    Value::Mapping(m)
}

/// A valid spec to mutate.
const SEED: &str = "{selector: {matchLabels: {app: api}}, action: DENY, rules: [{from: [{source: \
    {principals: [cluster.local/ns/a/sa/b], notIpBlocks: [10.0.0.0/8]}}], to: [{operation: \
    {ports: ['80'], methods: [GET]}}], when: [{key: source.ip, values: [10.1.0.0/16]}]}]}";

fn mutated(rng: &mut StdRng) -> Option<Value> {
    let mut bytes = SEED.as_bytes().to_vec();
    for _ in 0..rng.random_range(1..6) {
        let i = rng.random_range(0..bytes.len());
        match rng.random_range(0..3) {
            0 => bytes[i] = b"{}[],:'*/ a0"[rng.random_range(0..12)],
            1 => {
                bytes.remove(i);
            }
            _ => bytes.insert(i, bytes[rng.random_range(0..bytes.len())]),
        }
    }
    serde_yaml::from_slice(&bytes).ok()
}

fn decide_some(rng: &mut StdRng, policy: super::Policy) {
    let policy = std::sync::Arc::new(policy);
    let selected = Selected::new([&policy]);
    let id = SpiffeId::new("cluster.local", "a", "b").expect("valid id");
    for _ in 0..4 {
        let src: IpAddr = if rng.random_bool(0.5) {
            IpAddr::from([10, rng.random(), rng.random(), rng.random()])
        } else {
            IpAddr::from(rng.random::<[u8; 16]>())
        };
        let conn = Conn {
            identity: rng.random_bool(0.5).then_some(&id),
            src,
            dst: IpAddr::from([10, 0, 0, 1]),
            port: rng.random(),
        };
        let d = evaluate(Some(&selected), &conn);
        assert!(d.policy.is_some() || selected.allow.is_empty());
    }
}

#[test]
fn compiling_random_specs_never_panics_and_an_invalid_deny_fails_closed() {
    let mut rng = StdRng::seed_from_u64(5);
    let (mut ok, mut invalid) = (0, 0);
    for i in 0..6000 {
        let spec = if i % 2 == 0 {
            mapping(&mut rng, 0)
        } else {
            match mutated(&mut rng) {
                Some(v) => v,
                None => continue,
            }
        };
        let declared_deny = spec.get("action").and_then(Value::as_str) == Some("DENY");
        match compile("a", "p", spec.clone()) {
            Ok(p) => {
                ok += 1;
                decide_some(&mut rng, p);
            }
            Err(e) => {
                invalid += 1;
                assert!(e.to_string().starts_with("policy a/p: spec"), "{e}");
                let stand_in = e.fail_closed();
                if declared_deny {
                    let action = stand_in.as_ref().map(|p| p.action);
                    assert_eq!(
                        action,
                        Some(Action::Deny),
                        "an invalid DENY fails open: {spec:?}"
                    );
                }
                if let Some(p) = stand_in {
                    decide_some(&mut rng, p);
                }
            }
        }
    }
    assert!(ok > 100 && invalid > 1000, "{ok} valid, {invalid} invalid");
}
