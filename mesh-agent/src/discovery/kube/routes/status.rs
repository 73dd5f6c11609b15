//! An HTTPRoute's status as Gateway API's GAMMA implementations report it: one
//! `status.parents[]` entry per Service parent, with `controllerName` [`CONTROLLER_NAME`] and the
//! conditions `Accepted` and `ResolvedRefs`. Pure: what to write, from the route's `spec`, the
//! conversion's verdict and which Services exist; entries of other controllers are kept as
//! they are.

use serde_json::{json, Map, Value};

use crate::waypoint::httproute::Rejected;

/// The waypoint's `controllerName` in `status.parents[]` (docs/kubernetes.md, "Waypoints").
pub const CONTROLLER_NAME: &str = "mesh-agent.dev/waypoint";

/// Whether a reference names a core Service (group `""`, kind `Service`; absent means these,
/// as the waypoint's conversion reads them).
fn is_service(reference: &Value) -> bool {
    let group = reference.get("group").and_then(Value::as_str).unwrap_or("");
    let kind = reference
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("Service");
    group.is_empty() && kind == "Service"
}

/// The `parentRefs` of a route's `spec` that are Services: the parents the waypoint answers
/// for. None: the route is not a waypoint's (a Gateway's, say), and the waypoint leaves it alone.
pub fn service_parents(spec: &Value) -> Vec<Value> {
    spec.get("parentRefs")
        .and_then(Value::as_array)
        .map(|refs| refs.iter().filter(|p| is_service(p)).cloned().collect())
        .unwrap_or_default()
}

/// What the waypoint made of a route.
#[derive(Debug, Clone, Copy)]
pub struct Verdict<'a> {
    /// The conversion's error, if rejected.
    pub rejected: Option<&'a Rejected>,
    /// Rejected, but its last good version keeps serving.
    pub kept: bool,
}

/// The entries the waypoint wants in `status.parents` (without `lastTransitionTime`), one per
/// Service parent. `exists` says whether Service `name` of `namespace` exists.
pub fn desired(
    namespace: &str,
    spec: &Value,
    generation: Option<i64>,
    verdict: Verdict<'_>,
    exists: impl Fn(&str) -> bool,
) -> Vec<Value> {
    let resolved = resolved_refs(namespace, spec, generation, &exists);
    service_parents(spec)
        .into_iter()
        .map(|parent| {
            let name = parent.get("name").and_then(Value::as_str).unwrap_or("");
            let accepted = match verdict.rejected {
                Some(e) => condition(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    &format!(
                        "{}: {}{}",
                        e.field,
                        e.message,
                        if verdict.kept {
                            "; its last good version keeps serving"
                        } else {
                            ""
                        }
                    ),
                    generation,
                ),
                None if !exists(name) => condition(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    &format!("parent Service {namespace}/{name} not found"),
                    generation,
                ),
                None => condition(
                    "Accepted",
                    true,
                    "Accepted",
                    "accepted by the namespace's waypoint",
                    generation,
                ),
            };
            json!({
                "parentRef": parent,
                "controllerName": CONTROLLER_NAME,
                "conditions": [accepted, resolved.clone()],
            })
        })
        .collect()
}

/// `ResolvedRefs`: every backendRef of every rule names an existing Service of the route's
/// namespace. The first problem gives the reason; the message lists each.
fn resolved_refs(
    namespace: &str,
    spec: &Value,
    generation: Option<i64>,
    exists: &impl Fn(&str) -> bool,
) -> Value {
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    let rules = spec.get("rules").and_then(Value::as_array);
    for (r, rule) in rules.into_iter().flatten().enumerate() {
        let backends = rule.get("backendRefs").and_then(Value::as_array);
        for (b, backend) in backends.into_iter().flatten().enumerate() {
            let field = format!("spec.rules[{r}].backendRefs[{b}]");
            let name = backend.get("name").and_then(Value::as_str).unwrap_or("");
            let ns = backend.get("namespace").and_then(Value::as_str);
            if !is_service(backend) {
                problems.push(("InvalidKind", format!("{field}: not a core Service")));
            } else if ns.is_some_and(|ns| ns != namespace) {
                problems.push((
                    "RefNotPermitted",
                    format!("{field}: a Service of another namespace"),
                ));
            } else if !exists(name) {
                problems.push((
                    "BackendNotFound",
                    format!("{field}: Service {namespace}/{name} not found"),
                ));
            }
        }
    }
    match problems.first() {
        None => condition(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every backend resolved",
            generation,
        ),
        Some((reason, _)) => {
            let message = problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            condition("ResolvedRefs", false, reason, &message, generation)
        }
    }
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>) -> Value {
    let mut c = Map::new();
    c.insert("type".into(), kind.into());
    c.insert("status".into(), if ok { "True" } else { "False" }.into());
    c.insert("reason".into(), reason.into());
    // The API caps a condition's message at 32,768 characters.
    c.insert(
        "message".into(),
        message.chars().take(32_000).collect::<String>().into(),
    );
    if let Some(g) = generation {
        c.insert("observedGeneration".into(), g.into());
    }
    Value::Object(c)
}

fn ours(entry: &Value) -> bool {
    entry.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME)
}

/// An entry without its conditions' `lastTransitionTime`, for comparison.
fn timeless(entry: &Value) -> Value {
    let mut entry = entry.clone();
    if let Some(conditions) = entry.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conditions {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
    }
    entry
}

/// The `status.parents` to write given the object's `status` now, or `None` when the
/// waypoint's entries already say `desired` (whoever wrote them: replicas of a waypoint write
/// the same content, so the second finds nothing to do). A condition whose status did not
/// change keeps its `lastTransitionTime`; a changed or new one gets `now`.
pub fn merge(current: Option<&Value>, desired: Vec<Value>, now: &str) -> Option<Vec<Value>> {
    let parents: Vec<Value> = current
        .and_then(|s| s.get("parents"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (mine, others): (Vec<Value>, Vec<Value>) = parents.into_iter().partition(ours);
    if mine.iter().map(timeless).eq(desired.iter().cloned()) {
        return None;
    }
    let mut out = others;
    for mut entry in desired {
        let before = mine
            .iter()
            .find(|m| m.get("parentRef") == entry.get("parentRef"))
            .and_then(|m| m.get("conditions"))
            .and_then(Value::as_array);
        if let Some(conditions) = entry.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in conditions.iter_mut() {
                let since = before
                    .into_iter()
                    .flatten()
                    .find(|b| b.get("type") == c.get("type") && b.get("status") == c.get("status"))
                    .and_then(|b| b.get("lastTransitionTime"))
                    .cloned()
                    .unwrap_or_else(|| now.into());
                if let Some(c) = c.as_object_mut() {
                    c.insert("lastTransitionTime".into(), since);
                }
            }
        }
        out.push(entry);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Value {
        json!({
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "reviews", "port": 80},
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
            ],
            "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 80}, {"name": "gone", "port": 80}]}],
        })
    }

    fn cond<'a>(entry: &'a Value, kind: &str) -> &'a Value {
        entry["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == kind))
            .unwrap_or_else(|| panic!("no {kind} in {entry}"))
    }

    #[test]
    fn one_entry_per_service_parent_with_both_conditions() {
        let ok = Verdict {
            rejected: None,
            kept: false,
        };
        let all = |_: &str| true;
        let d = desired("shop", &spec(), Some(3), ok, all);
        assert_eq!(d.len(), 1, "the Gateway parent is another controller's");
        assert_eq!(d[0]["parentRef"]["name"], "reviews");
        assert_eq!(d[0]["controllerName"], CONTROLLER_NAME);
        assert_eq!(cond(&d[0], "Accepted")["status"], "True");
        assert_eq!(cond(&d[0], "Accepted")["observedGeneration"], 3);
        assert_eq!(cond(&d[0], "ResolvedRefs")["reason"], "ResolvedRefs");

        let some = |n: &str| n != "gone";
        let d = desired("shop", &spec(), Some(3), ok, some);
        let r = cond(&d[0], "ResolvedRefs");
        assert_eq!(
            (&r["status"], &r["reason"]),
            (&json!("False"), &json!("BackendNotFound"))
        );
        assert_eq!(
            r["message"],
            "spec.rules[0].backendRefs[1]: Service shop/gone not found"
        );

        let e = Rejected {
            route: "shop/reviews".into(),
            field: "spec.rules[0].matches[0].headers[0].name".into(),
            message: "not a header name".into(),
        };
        let bad = Verdict {
            rejected: Some(&e),
            kept: true,
        };
        let d = desired("shop", &spec(), Some(4), bad, all);
        let a = cond(&d[0], "Accepted");
        assert_eq!(
            (&a["status"], &a["reason"]),
            (&json!("False"), &json!("UnsupportedValue"))
        );
        assert_eq!(
            a["message"],
            "spec.rules[0].matches[0].headers[0].name: not a header name; its last good version keeps serving"
        );
        assert_eq!(
            service_parents(&json!({"parentRefs": [{"kind": "Gateway", "name": "x"}]})),
            Vec::<Value>::new()
        );
    }

    #[test]
    fn merge_keeps_others_and_is_idempotent() {
        let ok = Verdict {
            rejected: None,
            kept: false,
        };
        let d = desired("shop", &spec(), Some(1), ok, |_| true);
        let other = json!({"parentRef": {"name": "edge"}, "controllerName": "example.com/gw", "conditions": []});
        let status = json!({"parents": [other.clone()]});
        let written = merge(Some(&status), d.clone(), "2026-01-01T00:00:00Z").expect("a change");
        assert_eq!(written[0], other);
        assert_eq!(
            cond(&written[1], "Accepted")["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        // Written once (by this replica or another): nothing more to write.
        let status = json!({ "parents": written });
        assert_eq!(
            merge(Some(&status), d.clone(), "2026-01-02T00:00:00Z"),
            None
        );
        // A changed condition moves its time; the unchanged one keeps it.
        let d2 = desired("shop", &spec(), Some(1), ok, |n| n != "gone");
        let again = merge(Some(&status), d2, "2026-01-03T00:00:00Z").expect("a change");
        assert_eq!(
            cond(&again[1], "Accepted")["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(
            cond(&again[1], "ResolvedRefs")["lastTransitionTime"],
            "2026-01-03T00:00:00Z"
        );
        assert_eq!(
            merge(None, Vec::new(), "x"),
            None,
            "nothing to say, nothing written"
        );
    }
}
