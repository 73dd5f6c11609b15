//! The `policy` target: AuthorizationPolicy objects as the state file holds them, compiled
//! (`policy::compile`, and `discovery::policies::entry` for the whole object) and used to
//! decide connections (`policy::evaluate`).
//!
//! Input: YAML (a `spec`, or a whole object with `metadata` and `spec`); optionally, after a
//! `0xff` byte, connections to decide (an identity choice, a source address and a port each).
//!
//! Checked: nothing panics; an invalid policy's error names the policy and a `spec` field; an
//! invalid DENY (or one whose action cannot be read) always has a stand-in that denies every
//! connection, and an invalid ALLOW's start-up stand-in allows none; compiling the typed spec
//! (the Kubernetes source's way in) gives what compiling the YAML gives, and the typed spec
//! survives serialisation; whatever a rule allows as an ALLOW, the same rule denies as a DENY
//! (what L4 cannot evaluate narrows an ALLOW and widens a DENY, never the other way).

use std::{net::IpAddr, sync::Arc};

use serde_yaml::Value;

use super::Input;
use crate::{
    discovery::policies,
    identity::SpiffeId,
    policy::{
        compile, compile_spec, evaluate, spec::AuthorizationPolicySpec, Action, Conn, Decision,
        Policy, Reason, Selected,
    },
};

/// Connections decided at most per input.
const MAX_CONNS: usize = 16;

/// The `policy` target.
pub fn policy(input: &[u8]) {
    let (yaml, conns) = match input.iter().position(|&b| b == 0xff) {
        Some(at) => (&input[..at], &input[at + 1..]),
        None => (input, &[][..]),
    };
    let Ok(value) = serde_yaml::from_slice::<Value>(yaml) else {
        return;
    };
    let ids = [
        SpiffeId::new("cluster.local", "shop", "client").ok(),
        SpiffeId::new("cluster.local", "ns", "sa").ok(),
        SpiffeId::new("other.domain", "shop", "client").ok(),
    ];
    let conns = connections(conns, &ids);

    // As a whole object of the state file.
    if value.get("metadata").is_some() {
        if let Ok((key, compiled)) = policies::entry(0, value.clone()) {
            if let Err(invalid) = &compiled {
                assert_eq!(invalid.key(), key, "an invalid policy under another key");
            }
            check(
                compiled,
                &value.get("spec").cloned().unwrap_or(Value::Null),
                &conns,
            );
        }
    }
    // As a spec.
    let compiled = compile("ns", "p", value.clone());
    if let Err(invalid) = &compiled {
        let message = invalid.to_string();
        assert!(message.starts_with("policy ns/p: spec"), "{message}");
    }
    // The typed spec: the same policy, and serialisable.
    if let Ok(spec) = serde_yaml::from_value::<AuthorizationPolicySpec>(value.clone()) {
        let typed = compile_spec("ns", "p", &spec);
        assert_eq!(
            typed.as_ref().ok(),
            compiled.as_ref().ok(),
            "compiling the typed spec differs"
        );
        if let Ok(written) = serde_yaml::to_value(&spec) {
            let read = serde_yaml::from_value::<AuthorizationPolicySpec>(written);
            assert_eq!(
                read.ok().as_ref(),
                Some(&spec),
                "the spec does not survive serialisation"
            );
        }
    }
    check(compiled, &value, &conns);
    // The same rules as an ALLOW and as a DENY.
    let Value::Mapping(mut spec) = value else {
        return;
    };
    spec.insert(Value::from("action"), Value::from("ALLOW"));
    let allow = compile("ns", "allow", Value::Mapping(spec.clone()));
    spec.insert(Value::from("action"), Value::from("DENY"));
    let deny = compile("ns", "deny", Value::Mapping(spec));
    if let (Ok(allow), Ok(deny)) = (allow, deny) {
        let (allow, deny) = (Arc::new(allow), Arc::new(deny));
        let (allow, deny) = (Selected::new([&allow]), Selected::new([&deny]));
        for conn in &conns {
            let allowed = evaluate(Some(&allow), conn);
            let denied = evaluate(Some(&deny), conn);
            consistent(&allowed);
            consistent(&denied);
            if allowed.allowed {
                assert!(
                    !denied.allowed,
                    "allowed by a rule as an ALLOW but not denied as a DENY: {conn:?}"
                );
            }
        }
    }
}

/// Checks a compiled policy, or an invalid one's stand-ins, on `conns`.
fn check(compiled: Result<Policy, crate::policy::Invalid>, spec: &Value, conns: &[Conn<'_>]) {
    match compiled {
        Ok(p) => {
            assert!(p.invalid.is_none(), "a valid policy marked invalid");
            assert_eq!(*p.key, format!("{}/{}", p.namespace, p.name));
            let p = Arc::new(p);
            let selected = Selected::new([&p]);
            for conn in conns {
                consistent(&evaluate(Some(&selected), conn));
            }
        }
        Err(invalid) => {
            let written = spec.get("action").and_then(Value::as_str);
            let stand_in = invalid.fail_closed();
            if written == Some("DENY") || invalid.action.is_none() {
                let action = stand_in.as_ref().map(|p| p.action);
                assert_eq!(action, Some(Action::Deny), "an invalid DENY fails open");
            }
            if let Some(p) = stand_in {
                let selected = Selected::new([&Arc::new(p)]);
                for conn in conns {
                    let d = evaluate(Some(&selected), conn);
                    assert!(!d.allowed, "a fail-closed stand-in allowed {conn:?}");
                    assert_eq!(d.reason, Reason::InvalidPolicy);
                }
            }
            if let Some(p) = invalid.allow_nothing() {
                let selected = Selected::new([&Arc::new(p)]);
                for conn in conns {
                    let d = evaluate(Some(&selected), conn);
                    assert!(!d.allowed, "an allow-nothing stand-in allowed {conn:?}");
                }
            }
        }
    }
}

/// A decision agrees with itself: an allow names no deciding rule of a DENY, a deny names
/// the policy that denied.
fn consistent(d: &Decision) {
    match d.reason {
        Reason::NoPolicy => assert!(d.allowed && d.policy.is_none() && d.rule.is_none()),
        Reason::AllowRule => assert!(d.allowed && d.policy.is_some() && d.rule.is_some()),
        Reason::DenyRule => assert!(!d.allowed && d.policy.is_some() && d.rule.is_some()),
        Reason::NoAllowMatch | Reason::InvalidPolicy => {
            assert!(!d.allowed && d.policy.is_some());
        }
    }
}

/// Connections from the input: an identity (or none: plaintext), a source address, a port.
fn connections<'a>(bytes: &[u8], ids: &'a [Option<SpiffeId>]) -> Vec<Conn<'a>> {
    let mut input = Input(bytes);
    let mut conns = Vec::new();
    while conns.len() < MAX_CONNS {
        let Some(choice) = input.byte() else { break };
        let src = if choice & 0x80 != 0 {
            let b: [u8; 16] = input.take(16).try_into().unwrap_or([0; 16]);
            IpAddr::from(b)
        } else {
            let b: [u8; 4] = input.take(4).try_into().unwrap_or([10, 0, 0, 1]);
            IpAddr::from(b)
        };
        let identity = ids
            .get(usize::from(choice & 0x7f) % (ids.len() + 1))
            .and_then(Option::as_ref);
        conns.push(Conn {
            identity,
            src,
            dst: IpAddr::from([10, 0, 0, 7]),
            port: input.u16().unwrap_or(80),
        });
    }
    conns
}
