//! `/config_dump`: the effective configuration; this node's workloads with their capture state,
//! links and the policies in force on them; services with their endpoints; policies;
//! certificates (never keys); the eBPF programs and maps. One JSON document, read at once from
//! the state snapshot, the capture task and the kernel.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use super::Node;
use crate::{
    capture::inspect::{LinkView, MapView},
    pods::inspect::CaptureView,
    state::{Snapshot, Workload},
};

/// Where a workload of this node stands with capture.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Capture {
    /// `captured`, `degraded` (captured, but a link is not attached as it must be),
    /// `refused` (held closed: its connections are refused), `not_captured`, `waiting` (its
    /// sandbox has not started) or `pending` (the next reconcile takes it).
    pub state: &'static str,
    pub why: String,
}

/// Where `w`, a workload of this node, stands with capture.
pub fn capture_of(
    snap: &Snapshot,
    capture: &CaptureView,
    w: &Workload,
) -> (Capture, Vec<LinkView>) {
    let key = w.key();
    let c = |state, why: String| Capture { state, why };
    if w.is_waypoint() {
        return (
            c(
                "not_captured",
                "a waypoint pod: it speaks HBONE itself".into(),
            ),
            Vec::new(),
        );
    }
    if !snap.namespace_enabled(&w.namespace) {
        return (
            c(
                "not_captured",
                format!("namespace {} is not in the mesh", w.namespace),
            ),
            Vec::new(),
        );
    }
    if let Some(served) = capture.served.iter().find(|s| s.pod == key) {
        let problems: Vec<String> = (served.links.iter())
            .filter_map(|l| Some(format!("{}: {}", l.program, l.problem.as_deref()?)))
            .collect();
        let capture = if problems.is_empty() {
            c(
                "captured",
                "served by this agent, every program attached".into(),
            )
        } else {
            c("degraded", problems.join("; "))
        };
        return (capture, served.links.clone());
    }
    if let Some(why) = capture.failed.get(&key) {
        return (
            c(
                "refused",
                format!("could not be served (its connections are refused): {why}"),
            ),
            Vec::new(),
        );
    }
    if capture.not_started.contains(&key) {
        return (
            c("waiting", "its sandbox has no process yet".into()),
            Vec::new(),
        );
    }
    if capture.closed.iter().any(|p| p.pod == key) {
        return (
            c(
                "refused",
                "capture is pinned and no listener serves it: its connections are refused".into(),
            ),
            Vec::new(),
        );
    }
    (
        c("pending", "the next reconcile captures it".into()),
        Vec::new(),
    )
}

/// The policies in force on workload `key` (L4), by action.
pub fn policies_of(snap: &Snapshot, key: &str) -> BTreeMap<&'static str, Vec<String>> {
    let mut by_action = BTreeMap::new();
    if let Some(selected) = snap.authorization(key) {
        for (action, list) in [
            ("deny", &selected.deny),
            ("allow", &selected.allow),
            ("audit", &selected.audit),
        ] {
            if !list.is_empty() {
                by_action.insert(action, list.iter().map(|p| p.key.to_string()).collect());
            }
        }
    }
    by_action
}

pub fn config_dump(node: &Node, capture: &CaptureView, maps: &[MapView]) -> Value {
    let snap = node.inputs.store.load();
    let here = &node.inputs.node;
    let workloads: Vec<Value> = (snap.workloads.values())
        .filter(|w| w.node == *here)
        .map(|w| {
            let (state, links) = capture_of(&snap, capture, w);
            json!({
                "workload": w.key(),
                "ips": w.ips,
                "service_account": w.service_account,
                "identity": format!("spiffe://{}/ns/{}/sa/{}", node.trust_domain, w.namespace, w.service_account),
                "capture": state,
                "links": links,
                "policies": policies_of(&snap, &w.key()),
            })
        })
        .collect();
    let services: Vec<Value> = (snap.service_definitions())
        .map(|(_, s)| {
            let ports: Vec<Value> = (s.ports.iter())
                .map(|p| {
                    let endpoints: Vec<String> = (s.vips.iter())
                        .find_map(|vip| snap.services.get(&std::net::SocketAddr::new(*vip, p.port)))
                        .map(|sp| sp.endpoints.iter().map(ToString::to_string).collect())
                        .unwrap_or_default();
                    json!({
                        "port": p.port,
                        "target_port": p.target_port,
                        "protocol": p.protocol,
                        "endpoints": endpoints,
                    })
                })
                .collect();
            let waypoint = (snap.namespace_enabled(&s.namespace))
                .then(|| snap.waypoint_of(&s.namespace))
                .flatten()
                .filter(|w| *w != s.name);
            json!({
                "service": s.key(),
                "vips": s.vips,
                "ports": ports,
                "waypoint": waypoint,
            })
        })
        .collect();
    let policies: Vec<Value> = (snap.policies.values())
        .map(|p| {
            json!({
                "policy": p.key.to_string(),
                "action": p.action.as_str(),
                "selector": p.selector,
                "targets": p.targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "rules": p.rules.len(),
                "invalid": p.invalid,
                "warnings": p.warnings,
            })
        })
        .collect();
    json!({
        "node": here,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": node.readiness.get().map_or_else(|| json!(true), |why| json!(why)),
        "config": node.config,
        "bpf_dir": node.bpf_dir,
        "namespaces": snap.namespaces.iter().filter(|(_, on)| **on).map(|(n, _)| n.clone()).collect::<std::collections::BTreeSet<_>>(),
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": node.inputs.certs.certificates(),
        "ebpf": {
            "programs": capture.programs,
            "maps": maps,
        },
        "capture": {
            "failed": capture.failed,
            "not_started": capture.not_started,
            "closed": capture.closed,
        },
        "connections": node.inputs.connections.len(),
    })
}
