//! The applier on its own: watch events in, the store checked after each, no API server.

use std::{path::PathBuf, sync::Arc};

use ::kube::{api::DynamicObject, runtime::watcher::Event};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::{Applier, Kind};
use crate::{
    discovery::kube::{
        watch::{Metrics, Object, Reporter},
        Rules,
    },
    state::Store,
};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/discovery/kube/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A fixture with a JSON merge of `changes` (objects merged, anything else replaced).
fn with(name: &str, changes: Value) -> Value {
    fn merge(base: &mut Value, changes: Value) {
        match (base, changes) {
            (Value::Object(base), Value::Object(changes)) => {
                for (k, v) in changes {
                    merge(base.entry(k).or_insert(Value::Null), v);
                }
            }
            (base, changes) => *base = changes,
        }
    }
    let mut value = fixture(name);
    merge(&mut value, changes);
    value
}

fn typed<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("not the object: {e}"))
}

fn pod(value: Value) -> Object {
    Object::Pod(Box::new(typed::<Pod>(value)))
}

fn slice(value: Value) -> Object {
    Object::EndpointSlice(Box::new(typed::<EndpointSlice>(value)))
}

fn policy(value: Value) -> Object {
    Object::Policy(Box::new(typed::<DynamicObject>(value)))
}

struct Harness {
    applier: Applier,
    store: Arc<Store>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Harness {
    fn new() -> Self {
        let store = Arc::new(Store::new());
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let applier = Applier::new(
            Rules::default(),
            store.clone(),
            Metrics::new(metrics.clone()),
            Reporter::none(),
        );
        Self {
            applier,
            store,
            metrics,
        }
    }

    fn apply(&mut self, kind: Kind, obj: Object) {
        self.applier.handle(kind, Event::Apply(obj));
    }

    fn workloads(&self) -> Vec<String> {
        self.store
            .load()
            .workloads
            .keys()
            .map(ToString::to_string)
            .collect()
    }

    fn endpoints(&self, vip: &str) -> Vec<String> {
        let vip: std::net::SocketAddr = vip.parse().expect("addr");
        self.store
            .load()
            .services
            .get(&vip)
            .unwrap_or_else(|| panic!("no service port {vip}"))
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// The value of the first metric line starting with `prefix`.
    fn metric(&self, prefix: &str) -> Option<f64> {
        self.metrics
            .encode()
            .expect("metrics")
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

#[test]
fn a_relist_keeps_serving_then_removes_what_it_did_not_list() {
    let mut h = Harness::new();
    let a = with("pod-running.json", json!({"metadata": {"name": "a"}}));
    let b = with(
        "pod-running.json",
        json!({"metadata": {"name": "b"}, "status": {"podIPs": [{"ip": "10.244.9.9"}]}}),
    );
    h.applier.handle(Kind::Pod, Event::Init);
    h.applier
        .handle(Kind::Pod, Event::InitApply(pod(a.clone())));
    h.applier.handle(Kind::Pod, Event::InitApply(pod(b)));
    assert!(!h.applier.synced(), "only pods have listed");
    h.applier.handle(Kind::Pod, Event::InitDone);
    assert_eq!(h.workloads(), ["shop/a", "shop/b"]);
    // 410 Gone: a new list, with b deleted meanwhile. Until it ends, b keeps serving.
    h.applier.handle(Kind::Pod, Event::Init);
    h.applier.handle(Kind::Pod, Event::InitApply(pod(a)));
    assert_eq!(
        h.workloads(),
        ["shop/a", "shop/b"],
        "the state in force serves"
    );
    h.applier.handle(Kind::Pod, Event::InitDone);
    assert_eq!(h.workloads(), ["shop/a"], "b was not listed again");
    assert_eq!(h.metric("mesh_kube_relists_total{kind=\"Pod\"}"), Some(2.0));
    for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::Pod) {
        h.applier.handle(kind, Event::Init);
        h.applier.handle(kind, Event::InitDone);
    }
    assert!(h.applier.synced());
    assert_eq!(h.workloads(), ["shop/a"]);
}

#[test]
fn pods_come_and_go_with_their_phase_and_are_counted_once() {
    let mut h = Harness::new();
    h.apply(Kind::Pod, pod(fixture("pod-running.json")));
    assert_eq!(h.workloads(), ["shop/api-7c9d8f6b5-x2x8q"]);
    let finished = with(
        "pod-running.json",
        json!({"status": {"phase": "Succeeded"}}),
    );
    h.apply(Kind::Pod, pod(finished.clone()));
    h.apply(Kind::Pod, pod(finished));
    assert!(h.workloads().is_empty(), "a finished pod is not a workload");
    assert_eq!(
        h.metric("mesh_kube_pods_skipped_total{reason=\"finished\"}"),
        Some(1.0),
        "counted once per pod"
    );
}

#[test]
fn a_pod_refused_for_a_reused_address_comes_in_once_the_old_pod_leaves() {
    let mut h = Harness::new();
    h.apply(Kind::Pod, pod(fixture("pod-running.json")));
    // Same address, another pod: its predecessor's deletion has not arrived yet.
    let next = with(
        "pod-running.json",
        json!({"metadata": {"name": "api-next"}}),
    );
    h.apply(Kind::Pod, pod(next));
    assert_eq!(h.workloads(), ["shop/api-7c9d8f6b5-x2x8q"]);
    assert_eq!(
        h.metric("mesh_kube_objects_rejected_total{kind=\"Pod\"}"),
        Some(1.0)
    );
    h.applier
        .handle(Kind::Pod, Event::Delete(pod(fixture("pod-running.json"))));
    assert_eq!(h.workloads(), ["shop/api-next"]);
}

#[test]
fn endpoints_follow_slices_between_services() {
    let mut h = Harness::new();
    let svc = typed(fixture("service-api.json"));
    h.apply(Kind::Service, Object::Service(Box::new(svc)));
    let other = typed(with(
        "service-api.json",
        json!({"metadata": {"name": "api-v2"}, "spec": {"clusterIPs": ["10.96.12.35"]}}),
    ));
    h.apply(Kind::Service, Object::Service(Box::new(other)));
    h.apply(
        Kind::EndpointSlice,
        slice(fixture("endpointslice-api-b.json")),
    );
    assert_eq!(h.endpoints("10.96.12.34:80"), ["10.244.3.4:9090"]);
    assert!(h.endpoints("10.96.12.35:80").is_empty());
    // The slice now belongs to api-v2.
    let moved = with(
        "endpointslice-api-b.json",
        json!({"metadata": {"labels": {"kubernetes.io/service-name": "api-v2"}}}),
    );
    h.apply(Kind::EndpointSlice, slice(moved.clone()));
    assert!(h.endpoints("10.96.12.34:80").is_empty());
    assert_eq!(h.endpoints("10.96.12.35:80"), ["10.244.3.4:9090"]);
    h.applier
        .handle(Kind::EndpointSlice, Event::Delete(slice(moved)));
    assert!(h.endpoints("10.96.12.35:80").is_empty());
}

#[test]
fn an_invalid_policy_keeps_its_last_good_version_and_is_counted_while_invalid() {
    let mut h = Harness::new();
    let ns: Namespace = typed(fixture("namespace-enabled.json"));
    h.apply(Kind::Namespace, Object::Namespace(Box::new(ns)));
    h.apply(
        Kind::AuthorizationPolicy,
        policy(fixture("authorizationpolicy-allow.json")),
    );
    let good = h
        .store
        .load()
        .policies
        .get("shop/allow-client")
        .cloned()
        .expect("the valid ALLOW is in force");
    let broken = with(
        "authorizationpolicy-allow.json",
        json!({"spec": {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}}),
    );
    h.apply(Kind::AuthorizationPolicy, policy(broken.clone()));
    assert_eq!(
        h.store.load().policies.get("shop/allow-client"),
        Some(&good),
        "the last good version stays"
    );
    assert_eq!(h.metric("mesh_policies_invalid"), Some(1.0));
    h.applier
        .handle(Kind::AuthorizationPolicy, Event::Delete(policy(broken)));
    assert!(h.store.load().policies.is_empty());
    assert_eq!(h.metric("mesh_policies_invalid"), Some(0.0));
}
