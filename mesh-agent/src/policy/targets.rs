//! `spec.targetRefs` (and the older single `spec.targetRef`): what a policy enforced by the
//! waypoint applies to. As Istio's ambient mode, a reference is a Service of the policy's
//! namespace (`{kind: Service, name}`, group `""` or left out) or the namespace's waypoint
//! (`{kind: Gateway, group: gateway.networking.k8s.io, name}`); anything else is refused,
//! naming the field (`spec.targetRefs[1].kind`). The fields stay untyped in [`super::spec`]
//! (the CRD keeps whatever was written), so they are read here, by hand.

use serde_yaml::Value;

use super::{spec::AuthorizationPolicySpec, TargetRef};

/// A field error: the field (from `spec`) and what is wrong.
type FieldError = (String, String);

/// The group of a Gateway API Gateway (a waypoint).
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// What an invalid policy is bound to, read leniently from its `spec`: `None` when it has no
/// `targetRef`/`targetRefs` (a selector policy), its references when they can be read, else
/// [`TargetRef::Unreadable`] (every service of the namespace's waypoint).
pub(super) fn hint_targets(namespace: &str, spec: &Value) -> Option<Vec<TargetRef>> {
    let present = |key: &str| spec.get(key).filter(|v| !v.is_null());
    let refs: Vec<&Value> = match (present("targetRef"), present("targetRefs")) {
        (None, None) => return None,
        (Some(one), None) => vec![one],
        (None, Some(list)) => list
            .as_sequence()
            .map(|l| l.iter().collect())
            .unwrap_or_default(),
        (Some(_), Some(_)) => Vec::new(),
    };
    let read: Result<Vec<TargetRef>, _> = refs
        .into_iter()
        .map(|v| target("spec.targetRefs", namespace, v))
        .collect();
    Some(match read {
        Ok(targets) if !targets.is_empty() => targets,
        _ => vec![TargetRef::Unreadable],
    })
}

/// The references of a policy of `namespace`; empty when it has none (it uses a selector).
pub(super) fn targets(
    namespace: &str,
    spec: &AuthorizationPolicySpec,
) -> Result<Vec<TargetRef>, FieldError> {
    let single = spec.target_ref.as_ref().filter(|v| !v.is_null());
    let many = spec.target_refs.as_ref().filter(|v| !v.is_null());
    let targets = match (single, many) {
        (None, None) => return Ok(Vec::new()),
        (Some(_), Some(_)) => {
            return Err((
                "spec.targetRef".into(),
                "set targetRefs or targetRef, not both".into(),
            ))
        }
        (Some(one), None) => vec![target("spec.targetRef", namespace, one)?],
        (None, Some(list)) => {
            let Some(list) = list.as_sequence() else {
                return Err((
                    "spec.targetRefs".into(),
                    "expected a list of references ({kind: Service, name: ...} or {kind: \
                     Gateway, group: gateway.networking.k8s.io, name: ...})"
                        .into(),
                ));
            };
            if list.is_empty() {
                return Err((
                    "spec.targetRefs".into(),
                    "is empty: name the Services or the waypoint (Gateway) the policy applies \
                     to, or leave it out and use selector"
                        .into(),
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, v)| target(&format!("spec.targetRefs[{i}]"), namespace, v))
                .collect::<Result<_, _>>()?
        }
    };
    if spec.selector.is_some() {
        return Err((
            "spec.selector".into(),
            "a policy has a selector (enforced by the node proxies) or targetRefs (enforced by \
             the waypoint), not both"
                .into(),
        ));
    }
    Ok(targets)
}

/// One reference, at `field`.
fn target(field: &str, namespace: &str, v: &Value) -> Result<TargetRef, FieldError> {
    let at = |name: &str| format!("{field}.{name}");
    let Some(map) = v.as_mapping() else {
        return Err((
            field.to_owned(),
            "expected a reference: {kind: Service, name: ...} or {kind: Gateway, group: \
             gateway.networking.k8s.io, name: ...}"
                .into(),
        ));
    };
    for key in map.keys() {
        match key.as_str() {
            Some("kind" | "group" | "name" | "namespace") => {}
            Some(other) => {
                return Err((
                    at(other),
                    "unknown field: a reference has kind, group, name and namespace".into(),
                ))
            }
            None => return Err((field.to_owned(), format!("field {key:?} is not a name"))),
        }
    }
    let get = |name: &str| -> Result<Option<&str>, FieldError> {
        match map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| (at(name), format!("expected a string, found {v:?}"))),
        }
    };
    let kind = get("kind")?.ok_or_else(|| (at("kind"), "is missing: Service or Gateway".into()))?;
    let group = get("group")?;
    let name = get("name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| (at("name"), "is missing".into()))?;
    if !object_name(name) {
        return Err((
            at("name"),
            format!(
                "{name:?} is not a Kubernetes object name (lowercase letters, digits, '-', '.')"
            ),
        ));
    }
    if let Some(ns) = get("namespace")? {
        if ns != namespace {
            return Err((
                at("namespace"),
                format!(
                    "{ns:?} is not the policy's namespace {namespace:?}: a policy applies to the \
                     Services and the waypoint of its own namespace"
                ),
            ));
        }
    }
    match kind {
        "Service" => match group {
            None | Some("") => Ok(TargetRef::Service(name.to_owned())),
            Some(other) => Err((
                at("group"),
                format!("{other:?}: a Service's group is \"\" (the core group); leave it out"),
            )),
        },
        "Gateway" => match group {
            Some(GATEWAY_GROUP) => Ok(TargetRef::Gateway(name.to_owned())),
            Some(other) => Err((
                at("group"),
                format!("{other:?}: a Gateway's group is {GATEWAY_GROUP}"),
            )),
            None => Err((
                at("group"),
                format!("is missing: a Gateway's group is {GATEWAY_GROUP}"),
            )),
        },
        other => Err((
            at("kind"),
            format!(
                "{other:?} is not supported: Service (the requests to that Service) or Gateway \
                 (the requests through the namespace's waypoint)"
            ),
        )),
    }
}

/// A Kubernetes object name (RFC 1123 subdomain): lowercase letters, digits, `-` and `.`,
/// starting and ending with a letter or digit, at most 253 characters.
fn object_name(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    s.len() <= 253
        && edge(s.chars().next())
        && edge(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
}
