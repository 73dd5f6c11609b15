//! The Kubernetes source against an independent API emulator: KMock's `KubernetesEmulator`
//! (PyPI `kmock`, installed by `cargo xtask test` into `target/kmock-venv`), started empty on
//! 127.0.0.1 by `kube_emulator.py` (which adds what KMock lacks and the watchers rely on:
//! resourceVersions, resumed watches, 410 Gone, dropped watches; see its documentation). The
//! test creates, labels, patches and deletes objects through the emulator's HTTP API while
//! the watchers run, and checks the state after each step. No root needed.

mod emulator;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use emulator::{not_skipped, Emulator};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
    events::v1::Event,
};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use mesh_agent::{
    config::KubeConfig,
    discovery::kube::{run, watch::policy_resource, Rules},
    metrics::Metrics,
    state::{Snapshot, Store},
};
use serde::de::DeserializeOwned;
use serde_json::json;

fn fixture<T: DeserializeOwned>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/discovery/kube/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
    // What the server sets on create.
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("resourceVersion");
    }
    serde_json::from_value(value).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A fixture with a JSON merge of `changes` (objects merged, anything else replaced).
fn fixture_with<T: DeserializeOwned>(name: &str, changes: serde_json::Value) -> T {
    fn merge(base: &mut serde_json::Value, changes: serde_json::Value) {
        match (base, changes) {
            (serde_json::Value::Object(base), serde_json::Value::Object(changes)) => {
                for (k, v) in changes {
                    merge(base.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (base, changes) => *base = changes,
        }
    }
    let mut value: serde_json::Value = fixture(name);
    merge(&mut value, changes);
    serde_json::from_value(value).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Waits until `check` holds for the current snapshot, at most 20 s.
async fn until(store: &Store, what: &str, check: impl Fn(&Snapshot) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut changes = store.subscribe();
    while !check(&store.load()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!("timed out after 20 s waiting for: {what}");
        }
        let _ = tokio::time::timeout(left, changes.changed()).await;
    }
}

/// Waits until the metrics text has a line starting with `prefix` and a value of at least
/// `min`, at most 20 s.
async fn until_metric(metrics: &Metrics, prefix: &str, min: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics.encode().expect("metrics");
        let value = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if value.is_some_and(|v| v >= min) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {prefix} >= {min}; metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_follows_the_api_through_changes_drops_and_410() {
    let Some(python) = not_skipped("the_state_follows_the_api_through_changes_drops_and_410")
    else {
        return;
    };
    let emulator = Emulator::start(&python);
    let client = emulator.client();
    // The agent's client from a kubeconfig file, as `kube.kubeconfig` gives it.
    let kubeconfig =
        std::env::temp_dir().join(format!("mesh-kube-test-{}.yaml", std::process::id()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: emulator\n\
             clusters: [{{name: emulator, cluster: {{server: 'http://127.0.0.1:{}'}}}}]\n\
             users: [{{name: emulator, user: {{}}}}]\n\
             contexts: [{{name: emulator, context: {{cluster: emulator, user: emulator}}}}]\n",
            emulator.port
        ),
    )
    .expect("write a kubeconfig");
    let agent_client = mesh_agent::discovery::kube::client(&KubeConfig {
        kubeconfig: Some(kubeconfig.clone()),
        ..KubeConfig::default()
    })
    .await
    .unwrap_or_else(|e| panic!("a client from {}: {e}", kubeconfig.display()));
    let _ = std::fs::remove_file(&kubeconfig);
    let store = Arc::new(Store::new());
    let metrics = Arc::new(Metrics::new());
    let running = run(
        agent_client,
        "n1",
        Rules::default(),
        store.clone(),
        metrics.clone(),
    );
    let mut synced = running.synced.clone();
    tokio::time::timeout(Duration::from_secs(20), synced.wait_for(|s| *s))
        .await
        .expect("every watcher lists within 20 s")
        .expect("the watchers run");

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    let policies: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "shop", &policy_resource());
    let post = PostParams::default();
    let merge = |v: serde_json::Value| Patch::Merge(v);
    let patch = PatchParams::default();

    // A namespace labelled for the mesh.
    namespaces
        .create(&post, &fixture("namespace-enabled.json"))
        .await
        .expect("create namespace");
    until(&store, "shop is meshed", |s| s.namespace_enabled("shop")).await;

    // A running pod becomes a workload; relabelled, the workload follows.
    pods.create(&post, &fixture("pod-running.json"))
        .await
        .expect("create pod");
    let pod = "shop/api-7c9d8f6b5-x2x8q";
    until(&store, "the pod is a workload", |s| {
        s.workloads.contains_key(pod)
    })
    .await;
    // A pod of another node: in the state, not among this node's pods.
    pods.create(
        &post,
        &fixture_with(
            "pod-running.json",
            json!({"metadata": {"name": "elsewhere"}, "spec": {"nodeName": "n2"},
                   "status": {"podIPs": [{"ip": "10.244.2.77"}], "podIP": "10.244.2.77"}}),
        ),
    )
    .await
    .expect("create pod of n2");
    until(&store, "the pod of n2 is a workload", |s| {
        s.workloads.contains_key("shop/elsewhere")
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let node_pods: Vec<(String, bool)> = running
            .node_pods
            .state()
            .iter()
            .map(|p| {
                let name = p.metadata.name.clone().unwrap_or_default();
                (name, p.metadata.uid.is_some())
            })
            .collect();
        // The whole object (the UID included), of this node only.
        if node_pods == [("api-7c9d8f6b5-x2x8q".to_owned(), true)] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "this node's pods are {node_pods:?}, not the one pod of n1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pods.patch(
        "api-7c9d8f6b5-x2x8q",
        &patch,
        &merge(json!({"metadata": {"labels": {"version": "v2"}}})),
    )
    .await
    .expect("label pod");
    until(&store, "the workload has the new label", |s| {
        s.workloads
            .get(pod)
            .is_some_and(|w| w.labels.get("version").map(String::as_str) == Some("v2"))
    })
    .await;

    // A service and its slices: endpoints from the slices, named ports resolved.
    services
        .create(&post, &fixture("service-api.json"))
        .await
        .expect("create service");
    let vip: std::net::SocketAddr = "10.96.12.34:80".parse().expect("addr");
    until(&store, "the service port exists, without endpoints", |s| {
        s.services.get(&vip).is_some_and(|p| p.endpoints.is_empty())
    })
    .await;
    slices
        .create(&post, &fixture("endpointslice-api-a.json"))
        .await
        .expect("create slice a");
    slices
        .create(&post, &fixture("endpointslice-api-b.json"))
        .await
        .expect("create slice b");
    until(&store, "the endpoints of both slices", |s| {
        s.services.get(&vip).is_some_and(|p| {
            p.endpoints
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                == ["10.244.1.17:8080", "10.244.2.9:8080", "10.244.3.4:9090"]
        })
    })
    .await;

    // A bad pod is skipped, counted and reported on itself; the watcher goes on.
    pods.create(&post, &fixture("pod-bad-ip.json"))
        .await
        .expect("create bad pod");
    until_metric(
        &metrics,
        "mesh_kube_objects_rejected_total{kind=\"Pod\"}",
        1.0,
    )
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), "shop");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = events.list(&ListParams::default()).await.expect("events");
        let reported = list.items.iter().any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("api-bad-ip")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("status.podIPs[1].ip"))
        });
        if reported {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Event on the bad pod: {:?}",
            list.items
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Policies: a valid ALLOW is in force; an invalid DENY fails closed.
    policies
        .create(&post, &fixture("authorizationpolicy-allow.json"))
        .await
        .expect("create policy");
    policies
        .create(&post, &fixture("authorizationpolicy-bad-port.json"))
        .await
        .expect("create bad policy");
    until(&store, "the ALLOW and the fail-closed DENY", |s| {
        s.policies
            .get("shop/allow-client")
            .is_some_and(|p| p.invalid.is_none())
            && s.policies
                .get("shop/deny-bad-port")
                .is_some_and(|p| p.invalid.is_some())
    })
    .await;

    // Unlabelled (the emulator's merge patch cannot delete a key: a value other than
    // "true"), the namespace leaves the mesh.
    namespaces
        .patch(
            "shop",
            &patch,
            &merge(json!({"metadata": {"labels": {"mesh-agent/enabled": "off"}}})),
        )
        .await
        .expect("unlabel namespace");
    until(&store, "shop is not meshed", |s| {
        !s.namespace_enabled("shop")
    })
    .await;

    // Dropped watches resume: a change after the drop arrives.
    emulator.control("drop").await;
    namespaces
        .patch(
            "shop",
            &patch,
            &merge(json!({"metadata": {"labels": {"mesh-agent/enabled": "true"}}})),
        )
        .await
        .expect("label namespace");
    until(&store, "shop is meshed again after the drop", |s| {
        s.namespace_enabled("shop")
    })
    .await;

    // 410 Gone: the watchers relist; a pod deleted meanwhile is removed by the relist, one
    // created meanwhile appears, and the rest keeps serving throughout.
    emulator.control("expire").await;
    pods.delete("api-7c9d8f6b5-x2x8q", &DeleteParams::default())
        .await
        .expect("delete pod");
    pods.create(&post, &fixture("pod-pod-ip-only.json"))
        .await
        .expect("create pod");
    until(&store, "the deleted pod gone, the new one there", |s| {
        !s.workloads.contains_key(pod) && s.workloads.contains_key("shop/api-v4-only")
    })
    .await;
    until_metric(&metrics, "mesh_kube_relists_total{kind=\"Pod\"}", 2.0).await;
    until_metric(&metrics, "mesh_kube_watch_errors_total{kind=\"Pod\"}", 1.0).await;
    until_metric(&metrics, "mesh_kube_state_age_seconds", 0.0).await;
    assert!(
        store
            .load()
            .services
            .get(&vip)
            .is_some_and(|p| p.endpoints.len() == 3),
        "the service kept its endpoints through the relist"
    );

    // Deletions.
    slices
        .delete("api-9pl4d", &DeleteParams::default())
        .await
        .expect("delete slice b");
    until(&store, "slice b's endpoint gone", |s| {
        s.services.get(&vip).is_some_and(|p| p.endpoints.len() == 2)
    })
    .await;
    services
        .delete("api", &DeleteParams::default())
        .await
        .expect("delete service");
    until(&store, "the service gone", |s| {
        !s.services.contains_key(&vip)
    })
    .await;
    policies
        .delete("deny-bad-port", &DeleteParams::default())
        .await
        .expect("delete policy");
    until(&store, "the fail-closed DENY gone", |s| {
        !s.policies.contains_key("shop/deny-bad-port")
    })
    .await;
}
