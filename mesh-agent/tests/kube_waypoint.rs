//! A waypoint's Kubernetes source against the API emulator (KMock, started by
//! `kube_emulator.py`, as in kube_discovery.rs): the mesh's watchers without a node
//! (`discovery::kube::run_mesh`) and the namespace's HTTPRoutes (`run_routes`) installed as the
//! waypoint installs them (`waypoint::runtime::install_routes`). The test creates a namespace
//! naming its waypoint, services and HTTPRoutes, and checks the route table and the status the
//! waypoint writes on each route. No root needed.

mod emulator;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use emulator::{not_skipped, Emulator};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use mesh_agent::{
    discovery::kube::{routes::httproute_resource, run_mesh, run_routes, Rules, Waypoint},
    metrics::Metrics,
    state::Store,
    waypoint::{
        runtime::install_routes,
        table::{Settled, Table},
        telemetry,
    },
};
use serde_json::{json, Value};

fn service(name: &str, vip: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": vip, "clusterIPs": [vip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    }))
    .expect("a Service")
}

fn route(name: &str, rules: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 80}],
            "rules": rules,
        },
    }))
    .expect("an HTTPRoute")
}

/// Waits until `check` holds for the route table, at most 20 s.
async fn until_table(table: &ArcSwap<Table>, what: &str, check: impl Fn(&Table) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check(&table.load()) {
        assert!(
            Instant::now() < deadline,
            "timed out after 20 s waiting for: {what}; table {:?}",
            table.load()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The waypoint's condition `kind` in the route's status (`(status, reason, message,
/// observedGeneration)`), if written.
fn condition(route: &DynamicObject, kind: &str) -> Option<(String, String, String, i64)> {
    let parents = route.data.get("status")?.get("parents")?.as_array()?;
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == "mesh-agent.dev/waypoint")?;
    assert_eq!(ours["parentRef"]["name"], "reviews", "{ours}");
    let c = ours["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?;
    assert!(c["lastTransitionTime"].is_string(), "{c}");
    let s = |f: &str| c[f].as_str().unwrap_or_default().to_owned();
    Some((
        s("status"),
        s("reason"),
        s("message"),
        c["observedGeneration"].as_i64().unwrap_or(-1),
    ))
}

/// Waits until the route's status satisfies `check`, at most 20 s.
async fn until_status(
    routes: &Api<DynamicObject>,
    name: &str,
    what: &str,
    check: impl Fn(&DynamicObject) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let route = routes
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get {name}: {e}"));
        if check(&route) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after 20 s waiting for: {what}; status {:?}",
            route.data.get("status")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_follows_httproutes_and_reports_their_status() {
    let Some(python) = not_skipped("the_waypoint_follows_httproutes_and_reports_their_status")
    else {
        return;
    };
    let emulator = Emulator::start(&python);
    let client = emulator.client();
    let store = Arc::new(Store::new());
    let metrics = Arc::new(Metrics::new());
    let running = run_mesh(
        client.clone(),
        Rules::default(),
        store.clone(),
        metrics.clone(),
    );
    let table = Arc::new(ArcSwap::from_pointee(Table::default()));
    let route_metrics = telemetry::Metrics::new(&metrics);
    let mut settled = Settled::default();
    let sink = table.clone();
    let mut routes_synced = run_routes(
        client.clone(),
        Waypoint {
            namespace: "shop".into(),
            name: "waypoint".into(),
        },
        store.clone(),
        &running,
        move |parsed| install_routes(&sink, &route_metrics, &mut settled, parsed),
    );
    let mut synced = running.synced.clone();
    tokio::time::timeout(Duration::from_secs(20), synced.wait_for(|s| *s))
        .await
        .expect("every mesh watcher lists within 20 s, without a node's pods")
        .expect("the watchers run");
    tokio::time::timeout(Duration::from_secs(20), routes_synced.wait_for(|s| *s))
        .await
        .expect("the HTTPRoutes are listed within 20 s")
        .expect("the route watcher runs");

    let post = PostParams::default();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &post,
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {
                    "mesh-agent/enabled": "true", "mesh-agent/waypoint": "waypoint"}},
            }))
            .expect("a Namespace"),
        )
        .await
        .expect("create namespace");
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    for (name, vip) in [
        ("reviews", "10.96.0.10"),
        ("reviews-v1", "10.96.0.11"),
        ("reviews-v2", "10.96.0.12"),
    ] {
        services
            .create(&post, &service(name, vip))
            .await
            .unwrap_or_else(|e| panic!("create service {name}: {e}"));
    }
    let routes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "shop", &httproute_resource());

    // A valid route: in the table, Accepted and ResolvedRefs.
    routes
        .create(
            &post,
            &route(
                "reviews",
                json!([
                    {"matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
                     "backendRefs": [{"name": "reviews-v2", "port": 80}]},
                    {"backendRefs": [{"name": "reviews-v1", "port": 80}]},
                ]),
            ),
        )
        .await
        .expect("create route");
    let two_rules = |t: &Table| {
        t.candidates("shop/reviews", 80, "reviews.shop.svc.cluster.local")
            .routes
            .first()
            .is_some_and(|r| r.rules.len() == 2 && r.matching.created.is_some())
    };
    until_table(&table, "the route's two rules, with its age", two_rules).await;
    until_status(&routes, "reviews", "Accepted and ResolvedRefs", |r| {
        condition(r, "Accepted")
            == Some((
                "True".into(),
                "Accepted".into(),
                "accepted by the namespace's waypoint".into(),
                1,
            ))
            && condition(r, "ResolvedRefs").is_some_and(|c| c.0 == "True" && c.1 == "ResolvedRefs")
    })
    .await;

    // An invalid change (a header name with a space): Accepted=False naming the field, the
    // last good version in force.
    routes
        .patch(
            "reviews",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rules": [
                {"matches": [{"headers": [{"name": "bad name", "value": "v2"}]}],
                 "backendRefs": [{"name": "reviews-v2", "port": 80}]},
            ]}})),
        )
        .await
        .expect("patch route");
    until_status(&routes, "reviews", "Accepted=False naming the field", |r| {
        condition(r, "Accepted").is_some_and(|(status, reason, message, generation)| {
            status == "False"
                && reason == "UnsupportedValue"
                && message.starts_with("spec.rules[0].matches[0].headers[0].name")
                && message.ends_with("its last good version keeps serving")
                && generation == 2
        })
    })
    .await;
    assert!(
        two_rules(&table.load()),
        "the last good version (two rules) stays in force"
    );
    let text = metrics.encode().expect("metrics");
    assert!(
        text.lines().any(|l| l.starts_with(
            "mesh_waypoint_routes_rejected_total{route=\"shop/reviews\",kept=\"true\"} 1"
        )),
        "the rejection counted once, kept:\n{text}"
    );

    // A route naming a Service that does not exist: ResolvedRefs=False, BackendNotFound; once
    // the Service exists, True.
    routes
        .create(
            &post,
            &route(
                "ghost",
                json!([{"backendRefs": [{"name": "missing", "port": 80}]}]),
            ),
        )
        .await
        .expect("create route");
    until_status(
        &routes,
        "ghost",
        "ResolvedRefs=False, BackendNotFound",
        |r| {
            condition(r, "ResolvedRefs").is_some_and(|(status, reason, message, _)| {
                status == "False"
                    && reason == "BackendNotFound"
                    && message == "spec.rules[0].backendRefs[0]: Service shop/missing not found"
            }) && condition(r, "Accepted").is_some_and(|c| c.0 == "True")
        },
    )
    .await;
    services
        .create(&post, &service("missing", "10.96.0.13"))
        .await
        .expect("create service");
    until_status(&routes, "ghost", "ResolvedRefs=True once it exists", |r| {
        condition(r, "ResolvedRefs").is_some_and(|c| c.0 == "True")
    })
    .await;

    // Deleted: out of the table.
    routes
        .delete("ghost", &Default::default())
        .await
        .expect("delete route");
    until_table(&table, "ghost gone, reviews kept", |t| t.len() == 1).await;
}

/// deploy/examples/waypoint's configuration is one the waypoint takes, `discovery: kube`, its
/// namespace from the environment.
#[test]
fn the_example_waypoint_configuration_loads() {
    use mesh_agent::waypoint::config::Config;
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/waypoint/config.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let text = mesh_agent::config::expand(&text, |name| {
        (name == "POD_NAMESPACE").then(|| "shop".to_owned())
    })
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let config: Config =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    config
        .validate()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(config.namespace, "shop");
    assert_eq!(config.discovery, mesh_agent::config::DiscoverySource::Kube);
}
