//! `why` against a state file and a capture view made here: the verdicts an operator meets,
//! each with what decided it.

use super::*;
use crate::{
    capture::inspect::LinkView,
    pods::inspect::{CaptureView, ServedView},
};

const STATE: &str = r#"
namespaces:
  - {name: shop, enabled: true}
  - {name: legacy, enabled: false}
  - {name: books, enabled: true}
workloads:
  - {name: client, namespace: shop, service_account: client, node: n1, ips: [10.0.1.2], netns: /x, cgroup: /x, labels: {app: client},
     capture: {exclude_outbound_ports: [3306]}}
  - {name: db, namespace: shop, service_account: db, node: n1, ips: [10.0.1.3], netns: /x, cgroup: /x, labels: {app: db},
     capture: {exclude_inbound_ports: [9000]}}
  - {name: api, namespace: shop, service_account: api, node: n2, ips: [10.0.2.2], netns: /x, cgroup: /x, labels: {app: api}}
  - {name: old, namespace: legacy, node: n1, ips: [10.0.1.4], netns: /x, cgroup: /x, labels: {app: old}}
  - {name: wp, namespace: books, service_account: wp, node: n2, ips: [10.0.2.9], labels: {mesh-agent/role: waypoint, app: wp}}
  - {name: shelf, namespace: books, node: n2, ips: [10.0.2.5], netns: /x, cgroup: /x, labels: {app: shelf}}
  - {name: shelf-2, namespace: books, node: n2, ips: [10.0.2.6], netns: /x, cgroup: /x, labels: {app: shelf}}
services:
  - {name: api, namespace: shop, vips: [10.96.0.1], ports: [{port: 80, target_port: 8080}], selector: {app: api}}
  - {name: empty, namespace: shop, vips: [10.96.0.2], ports: [{port: 80, target_port: 8080}], selector: {app: nobody}}
  - {name: shelves, namespace: books, vips: [10.96.1.1], ports: [{port: 80, target_port: 8080}], selector: {app: shelf}}
  - {name: wp, namespace: books, vips: [10.96.1.9], ports: [{port: 15008, target_port: 15008}], selector: {app: wp}}
waypoints:
  - {namespace: books, name: wp}
policies:
  - metadata: {name: db-clients, namespace: shop}
    spec:
      selector: {matchLabels: {app: db}}
      action: ALLOW
      rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}], to: [{operation: {ports: ["5432"]}}]}]
"#;

fn snapshot() -> Snapshot {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("why-tests-{}-{n}.yaml", std::process::id()));
    std::fs::write(&path, STATE).expect("write the state");
    let loaded = crate::discovery::file::load(&path, "mesh-system");
    let _ = std::fs::remove_file(&path);
    loaded.expect("the state loads").0
}

fn link(program: &'static str, problem: Option<&str>) -> LinkView {
    LinkView {
        program,
        pin: format!("/pins/{program}").into(),
        link_id: Some(1),
        prog_id: Some(2),
        attached: problem.is_none(),
        problem: problem.map(str::to_owned),
    }
}

/// This node (n1) serves shop/client and shop/db; `broken` programs of shop/client are
/// detached.
fn capture(broken: &[&'static str]) -> CaptureView {
    capture_of(&[("shop/client", broken), ("shop/db", &[])], &[])
}

/// This node serves `served` (with those programs detached); `failed` could not be served.
fn capture_of(served: &[(&str, &[&'static str])], failed: &[(&str, &str)]) -> CaptureView {
    let serve = |pod: &str, broken: &[&'static str]| ServedView {
        pod: pod.into(),
        ips: Vec::new(),
        identity: String::new(),
        netns_cookie: 1,
        cgroup: "/x".into(),
        client_address: true,
        links: crate::capture::pins::ORDER
            .iter()
            .map(|p| link(p, broken.contains(p).then_some("link 1 is detached")))
            .collect(),
    };
    CaptureView {
        served: served.iter().map(|(p, b)| serve(p, b)).collect(),
        closed: Vec::new(),
        failed: failed
            .iter()
            .map(|(p, why)| ((*p).to_owned(), (*why).to_owned()))
            .collect(),
        not_started: Vec::new(),
        programs: Vec::new(),
    }
}

/// This node, n1, with the fast path and no node-wide exclusions, capturing as `capture` says.
fn here(capture: &CaptureView) -> Here<'_> {
    static NO_EXCLUSIONS: std::sync::LazyLock<CaptureExclusions> =
        std::sync::LazyLock::new(CaptureExclusions::default);
    Here {
        node: "n1",
        trust_domain: "cluster.local",
        same_node_fast_path: true,
        global: &NO_EXCLUSIONS,
        capture,
    }
}

fn ask(capture: &CaptureView, src: &str, dst: &str) -> Answer {
    let here = here(capture);
    let q = Question::parse(src, dst).expect("question");
    answer(&snapshot(), &here, &q).unwrap_or_else(|e| panic!("{src} -> {dst}: {e}"))
}

#[test]
fn the_verdicts_name_what_decided_them() {
    let intact = capture(&[]);
    // Allowed, same node: the policy and rule.
    let a = ask(&intact, "shop/client", "shop/db:5432");
    assert_eq!(a.verdict, "allowed", "{a:#?}");
    let route = a.route.as_ref().expect("route");
    assert_eq!(route.transport, "local");
    let policy = a.policy.as_ref().expect("policy");
    assert_eq!(
        (policy.policy.as_deref(), policy.rule),
        (Some("shop/db-clients"), Some(0))
    );
    // The same pair on a port the policy does not allow.
    let a = ask(&intact, "shop/client", "shop/db:6379");
    assert_eq!(a.verdict, "denied", "{a:#?}");
    assert_eq!(a.policy.as_ref().map(|p| p.reason), Some("no_allow_match"));
    // Denied, from another node's pod, over HBONE with its identity.
    let a = ask(&intact, "shop/api", "shop/db:5432");
    assert_eq!(a.verdict, "denied", "{a:#?}");
    assert_eq!(a.route.as_ref().map(|r| r.transport), Some("hbone"));
    assert_eq!(
        a.policy.as_ref().and_then(|p| p.identity.as_deref()),
        Some("spiffe://cluster.local/ns/shop/sa/api")
    );
    assert!(a.capture.why.contains("node n2's agent"), "{a:#?}");
    // Not captured: its namespace is out of the mesh; the destination decides on its address.
    let a = ask(&intact, "legacy/old", "shop/db:5432");
    assert_eq!(a.verdict, "denied", "{a:#?}");
    assert!(!a.capture.ok);
    assert_eq!(a.policy.as_ref().map(|p| p.identity.is_none()), Some(true));
    let a = ask(&intact, "legacy/old", "shop/api:8080");
    assert_eq!(a.verdict, "not_captured", "{a:#?}");
    // Not captured: the pod's own exclusion.
    let a = ask(&intact, "shop/client", "shop/api:3306");
    assert_eq!(a.verdict, "not_captured", "{a:#?}");
    assert!(
        a.capture.why.contains("the pod's exclude_outbound_ports"),
        "{a:#?}"
    );
    // Refused before any policy: a service without endpoints.
    let a = ask(&intact, "shop/client", "shop/empty:80");
    assert_eq!(a.verdict, "refused", "{a:#?}");
    assert!(a.summary.contains("shop/empty has no endpoints"), "{a:#?}");
    // A service of a namespace with a waypoint: through it, and its L7 policies decide.
    let a = ask(&intact, "shop/client", "books/shelves:80");
    assert_eq!(a.destination.kind, "service");
    let route = a.route.as_ref().expect("route");
    assert_eq!(
        (route.transport, route.peer.as_deref()),
        ("waypoint", Some("books/wp"))
    );
    assert!(a.summary.contains("waypoint books/wp"), "{a:#?}");
    assert!(a.policy.is_none(), "decided at the waypoint: {a:#?}");
    // Its pod by address: straight to it, over HBONE.
    let a = ask(&intact, "shop/client", "books/shelf:8080");
    assert_eq!(
        a.route.as_ref().map(|r| r.transport),
        Some("hbone"),
        "{a:#?}"
    );
}

#[test]
fn a_pod_comes_before_a_service_of_the_same_name() {
    let snap = snapshot();
    let intact = capture(&[]);
    let here = here(&intact);
    let a = ask(&intact, "shop/client", "shop/api:80");
    // shop/api is a pod too: the pod's port 80, not the service.
    assert_eq!(a.destination.kind, "pod");
    let q = Question {
        src: ("shop".into(), "client".into()),
        dst: ("shop".into(), "empty".into()),
        port: 81,
    };
    let e = answer(&snap, &here, &q).expect_err("no such port");
    assert!(
        e.contains("service shop/empty has no port 81 (it has 80)"),
        "{e}"
    );
}

#[test]
fn a_degraded_source_is_judged_on_the_links_its_connection_meets() {
    // connect4 detached: IPv4 connections leave without the mesh.
    let a = ask(&capture(&["mesh_connect4"]), "shop/client", "shop/api:8080");
    assert_eq!(a.verdict, "not_captured", "{a:#?}");
    assert!(a.capture.why.contains("mesh_connect4"), "{a:#?}");
    // sock_ops detached: redirected, but the agent cannot learn the destination: refused.
    let a = ask(&capture(&["mesh_sock_ops"]), "shop/client", "shop/api:8080");
    assert_eq!(a.verdict, "refused", "{a:#?}");
    // Only IPv6's connect or the inbound sk_lookup: this IPv4 connection is still captured.
    for broken in ["mesh_connect6", "mesh_sk_lookup"] {
        let a = ask(&capture(&[broken]), "shop/client", "shop/api:8080");
        assert_eq!(a.verdict, "allowed", "{broken}: {a:#?}");
        assert!(a.capture.why.contains("degraded"), "{a:#?}");
    }
}

#[test]
fn questions_are_parsed_or_refused_naming_what_is_wrong() {
    let q = Question::parse("shop/web-0", "db/pg-0:5432").expect("parse");
    assert_eq!(q.src, ("shop".into(), "web-0".into()));
    assert_eq!(q.dst, ("db".into(), "pg-0".into()));
    assert_eq!(q.port, 5432);
    for (src, dst, says) in [
        ("shop", "db/pg:1", "source \"shop\" is not NAMESPACE/NAME"),
        ("shop/web", "db/pg", "has no port"),
        ("shop/web", "db/pg:http", "\"http\" is not a port"),
        ("shop/web", "db/pg:0", "\"0\" is not a port"),
        (
            "shop/web",
            "pg:80",
            "destination \"pg\" is not NAMESPACE/NAME",
        ),
        ("/web", "db/pg:80", "source \"/web\""),
    ] {
        let e = Question::parse(src, dst).expect_err(src);
        assert!(e.contains(says), "{src} {dst}: {e}");
    }
}

#[test]
fn what_an_uncaptured_connection_meets_at_the_destination() {
    let intact = capture(&[]);
    // To a service: the mesh does not resolve it; one of its endpoints' policy decides.
    let a = ask(&intact, "legacy/old", "shop/api:80");
    assert_eq!(a.verdict, "not_captured", "{a:#?}");
    assert_eq!(
        a.policy.as_ref().map(|p| p.workload.as_str()),
        Some("shop/api")
    );
    // A port the destination excludes from inbound capture: straight to the application.
    let a = ask(&intact, "legacy/old", "shop/db:9000");
    assert!(
        a.policy.is_none() && a.summary.contains("exclude_inbound_ports"),
        "{a:#?}"
    );
    // The destination's sk_lookup detached (on this node): straight to the application too.
    let detached = capture_of(
        &[("shop/client", &[]), ("shop/db", &["mesh_sk_lookup"])],
        &[],
    );
    let a = ask(&detached, "legacy/old", "shop/db:5432");
    assert!(
        a.policy.is_none() && a.summary.contains("mesh_sk_lookup"),
        "{a:#?}"
    );
    // A source the next reconcile takes: not captured yet.
    let pending = capture_of(&[("shop/db", &[])], &[]);
    let a = ask(&pending, "shop/client", "shop/api:8080");
    assert_eq!(a.verdict, "not_captured", "{a:#?}");
    assert!(a.capture.why.starts_with("not captured yet"), "{a:#?}");
}

#[test]
fn a_same_node_destination_this_agent_does_not_serve_is_refused() {
    let db_failed = capture_of(&[("shop/client", &[])], &[("shop/db", "no certificate")]);
    let a = ask(&db_failed, "shop/client", "shop/db:5432");
    assert_eq!(a.verdict, "refused", "{a:#?}");
    assert!(
        a.summary.contains("shop/db is on this node and not served"),
        "{a:#?}"
    );
}

#[test]
fn asking_does_not_move_a_services_round_robin() {
    let snap = snapshot();
    let intact = capture(&[]);
    let here = here(&intact);
    let vip: SocketAddr = "10.96.1.1:80".parse().expect("vip");
    let next = snap.services.get(&vip).and_then(|p| p.peek());
    for src in ["legacy/old", "shop/client"] {
        let q = Question::parse(src, "books/shelves:80").expect("question");
        for _ in 0..3 {
            answer(&snap, &here, &q).expect("answer");
        }
    }
    assert_eq!(snap.services.get(&vip).and_then(|p| p.peek()), next);
    assert_eq!(snap.services.get(&vip).and_then(|p| p.pick()), next);
    assert_ne!(
        snap.services.get(&vip).and_then(|p| p.peek()),
        next,
        "two endpoints"
    );
}
