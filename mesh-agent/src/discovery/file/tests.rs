use std::net::SocketAddr;

use super::*;
use crate::state::{canonical::canonical, Applied};

const GOOD: &str = r#"
namespaces: [{name: shop, enabled: true}, {name: legacy}]
workloads:
  - {name: api, namespace: shop, node: n2, ips: [10.240.2.2], netns: /run/netns/a, cgroup: /cg/a, labels: {app: api}}
  - {name: api2, namespace: shop, node: n1, ips: [10.240.1.9], netns: /run/netns/b, cgroup: /cg/b, labels: {app: api}}
  - {name: client, namespace: legacy, node: n1, ips: [10.240.1.3], netns: /run/netns/c, cgroup: /cg/c, labels: {app: api}}
services:
  - {name: api, namespace: shop, vips: [10.240.100.10], ports: [{port: 80, target_port: 8080}], selector: {app: api}}
"#;

fn parse_str(text: &str) -> Result<Snapshot, String> {
    let path = Path::new("state.yaml");
    parse(path, text)
        .and_then(|desired| build(path, desired, &Snapshot::default()))
        .map_err(|e| e.to_string())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn endpoints(snap: &Snapshot, vip: &str) -> Vec<String> {
    let port = snap.services.get(&addr(vip)).expect("service port");
    port.endpoints.iter().map(|e| e.to_string()).collect()
}

/// Reloads `text` over `store` as the watcher does (parse, settle, diff, apply).
fn reload_str(store: &Store, text: &str) -> Result<Applied, String> {
    reload_policies(store, text).map(|(applied, _)| applied)
}

/// As [`reload_str`], also returning the rejected policies.
fn reload_policies(store: &Store, text: &str) -> Result<(Applied, Vec<Rejection>), String> {
    let mut desired = parse(Path::new("state.yaml"), text).map_err(|e| e.to_string())?;
    let rejections = desired.settle(&store.load());
    let applied = store
        .apply(diff(&store.load(), desired))
        .map_err(|e| e.to_string())?;
    Ok((applied, rejections))
}

#[test]
fn parses_and_selects_endpoints_in_the_service_namespace() {
    let snap = parse_str(GOOD).expect("valid");
    assert!(snap.namespace_enabled("shop"));
    assert!(!snap.namespace_enabled("legacy"));
    assert!(!snap.namespace_enabled("unknown"));
    // Endpoints are sorted by address.
    assert_eq!(
        endpoints(&snap, "10.240.100.10:80"),
        ["10.240.1.9:8080", "10.240.2.2:8080"]
    );
    let on_n1: Vec<String> = snap.captured_on("n1").map(|w| w.key()).collect();
    assert_eq!(on_n1, ["shop/api2"]);
    let api = snap.workloads.get("shop/api").expect("shop/api");
    assert_eq!(api.service_account, "default");
}

#[test]
fn errors_name_the_entry_and_field() {
    let cases = [
        (GOOD.replace("ips: [10.240.1.3]", "ips: [10.240.2.2]"), "workloads[2] (legacy/client).ips: 10.240.2.2 is also the address of shop/api"),
        // The later entry is blamed, whichever entry changed.
        (GOOD.replace("ips: [10.240.2.2]", "ips: [10.240.1.3]"), "workloads[2] (legacy/client).ips: 10.240.1.3 is also the address of shop/api"),
        (GOOD.replace("ips: [10.240.1.9]", "ips: [10.240.1.9, 10.240.1.9]"), "workloads[1] (shop/api2).ips: 10.240.1.9 is also the address of shop/api2"),
        (GOOD.replace("ips: [10.240.1.9]", "ips: [10.240.1.9, '::ffff:10.240.1.9']"), "workloads[1] (shop/api2).ips: ::ffff:10.240.1.9 is an IPv4-mapped IPv6 address: write it as 10.240.1.9"),
        (GOOD.replace("vips: [10.240.100.10]", "vips: ['::ffff:10.240.100.10']"), "services[0] (shop/api).vips: ::ffff:10.240.100.10 is an IPv4-mapped IPv6 address: write it as 10.240.100.10"),
        (GOOD.replace("netns: /run/netns/b", "netns: rel/b"), "workloads[1] (shop/api2).netns: rel/b is not an absolute path"),
        (GOOD.replace("cgroup: /cg/b", "cgroup: cg/b"), "workloads[1] (shop/api2).cgroup: cg/b is not an absolute path"),
        (GOOD.replace("netns: /run/netns/b", "netns: ''"), "workloads[1] (shop/api2).netns: missing: give both netns and cgroup, or neither and the pod's uid"),
        (GOOD.replace("cgroup: /cg/b", "cgroup: ''"), "workloads[1] (shop/api2).cgroup: missing: give both netns and cgroup, or neither and the pod's uid"),
        (GOOD.replace("cgroup: /cg/b,", "cgroup: /cg/b, capture: {exclude_inbound_ports: [0]},"), "workloads[1] (shop/api2).capture.exclude_inbound_ports: port 0 is not a valid port"),
        (GOOD.replace("cgroup: /cg/b,", "cgroup: /cg/b, capture: {exclude_inbound_ports: [8080, 15021]},"), "workloads[1] (shop/api2).capture.exclude_inbound_ports: port 15021 is one of the agent's ports"),
        (GOOD.replace("target_port: 8080", "target_port: 0"), "services[0] (shop/api).ports[0]: port 0 is not a valid port"),
        (GOOD.replace("vips: [10.240.100.10]", "vips: []"), "services[0] (shop/api).vips: a service needs at least one address"),
        (GOOD.replace("ips: [10.240.2.2]", "ips: [10.240.2.300]"), "ips"),
        (GOOD.replace("labels: {app: api}}", "labels: {app: api}, colour: red}"), "colour"),
        (GOOD.replace("ips: [10.240.1.9]", "ips: []"), "workloads[1] (shop/api2).ips: a workload needs at least one address"),
        (GOOD.replace("name: api2, namespace: shop", "name: '', namespace: shop"), "workloads[1]: name and namespace must not be empty"),
        (GOOD.replace("name: api2", "name: api"), "workloads[1] (shop/api): listed twice"),
        (GOOD.replace("{name: legacy}", "{name: shop}"), "namespaces[1]: namespace shop is listed twice"),
        (GOOD.replace("{name: legacy}", "{name: ''}"), "namespaces[1].name is empty"),
        (format!("{GOOD}\n  - {{name: api, namespace: shop, vips: [10.240.100.10], ports: [{{port: 80, target_port: 1}}]}}"), "services[1] (shop/api): listed twice"),
        (format!("waypoints: [{{namespace: staging, name: waypoint}}]\n{GOOD}"), "waypoints[0].namespace: namespace \"staging\" is not listed in namespaces"),
        (format!("waypoints: [{{namespace: shop, name: waypoint}}, {{namespace: shop, name: other}}]\n{GOOD}"), "waypoints[1]: namespace shop has a waypoint already"),
        (format!("waypoints: [{{namespace: shop, name: Way_Point}}]\n{GOOD}"), "waypoints[0].waypoint: \"Way_Point\" is not a service name"),
        (format!("waypoints: [{{namespace: shop}}]\n{GOOD}"), "missing field `name`"),
        (format!("{GOOD}\n  - {{name: api3, namespace: shop, vips: [10.240.100.10], ports: [{{port: 80, target_port: 1}}]}}"), "services[1] (shop/api3): 10.240.100.10:80 is also a port of shop/api"),
        (format!("{GOOD}\n  - {{name: api3, namespace: shop, vips: [10.240.100.11], ports: [{{port: 80, target_port: 1}}, {{port: 80, target_port: 2}}]}}"), "services[1] (shop/api3): 10.240.100.11:80 is also a port of shop/api3"),
    ];
    for (text, want) in cases {
        let err = parse_str(&text).expect_err(want);
        assert!(err.contains(want), "error {err:?} should contain {want:?}");
    }
}

#[test]
fn an_invalid_reload_is_rejected_whole_and_the_last_good_state_serves() {
    let store = Store::new();
    reload_str(&store, GOOD).expect("valid");
    let before = canonical(&store.load());
    // Enable legacy and, in the same change, give legacy/client the address of shop/api.
    let bad = GOOD
        .replace("{name: legacy}", "{name: legacy, enabled: true}")
        .replace("ips: [10.240.1.3]", "ips: [10.240.2.2]");
    let err = reload_str(&store, &bad).expect_err("duplicate address");
    assert!(
        err.contains(
            "workloads[2] (legacy/client).ips: 10.240.2.2 is also the address of shop/api"
        ),
        "{err}"
    );
    assert_eq!(canonical(&store.load()), before);
    assert!(!store.load().namespace_enabled("legacy"));
}

/// Service ports and their expected endpoints.
type Endpoints<'a> = &'a [(&'a str, &'a [&'a str])];

#[test]
fn a_reload_applies_only_what_changed() {
    let relabel = GOOD.replace(
        "cgroup: /cg/b, labels: {app: api}",
        "cgroup: /cg/b, labels: {app: web}",
    );
    let added = format!(
        "{GOOD}\n  - {{name: web, namespace: shop, vips: [10.240.100.11], ports: [{{port: 80, target_port: 80}}], selector: {{app: web}}}}"
    );
    let cases: [(&str, &str, Applied, Endpoints); 5] = [
        ("same content", GOOD, Applied::default(), &[("10.240.100.10:80", &["10.240.1.9:8080", "10.240.2.2:8080"])]),
        (
            "relabel a workload",
            &relabel,
            Applied { workloads: 1, service_ports: 1, ..Applied::default() },
            &[("10.240.100.10:80", &["10.240.2.2:8080"])],
        ),
        (
            "enable a namespace",
            &GOOD.replace("{name: legacy}", "{name: legacy, enabled: true}"),
            Applied { namespaces: 1, ..Applied::default() },
            &[],
        ),
        (
            "remove a workload",
            &GOOD.replace("  - {name: api2, namespace: shop, node: n1, ips: [10.240.1.9], netns: /run/netns/b, cgroup: /cg/b, labels: {app: api}}\n", ""),
            Applied { workloads: 1, service_ports: 1, ..Applied::default() },
            &[("10.240.100.10:80", &["10.240.2.2:8080"])],
        ),
        (
            "add a service",
            &added,
            Applied { services: 1, service_ports: 1, ..Applied::default() },
            &[("10.240.100.11:80", &[])],
        ),
    ];
    for (name, text, want, eps) in cases {
        let store = Store::new();
        reload_str(&store, GOOD).expect("valid");
        let vip = addr("10.240.100.10:80");
        let port_before = store.load().services.get(&vip).cloned().expect("port");
        let applied = reload_str(&store, text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(applied, want, "{name}");
        let snap = store.load();
        for (vip, want) in eps {
            assert_eq!(endpoints(&snap, vip), *want, "{name}: endpoints of {vip}");
        }
        // The incremental result is the state a fresh build of the file gives.
        assert_eq!(
            canonical(&snap),
            canonical(&parse_str(text).expect("valid")),
            "{name}"
        );
        // A port whose endpoints did not change is kept as it is (its round robin goes on).
        let port_after = snap.services.get(&vip).expect("port");
        if port_after.endpoints == port_before.endpoints {
            assert!(
                Arc::ptr_eq(port_after, &port_before),
                "{name}: port rebuilt"
            );
        }
    }
}

/// GOOD plus `policies` (YAML list items, indented for the file).
fn with_policies(policies: &str) -> String {
    format!("{GOOD}policies:\n{policies}")
}

const ALLOW_CLIENT: &str = r#"
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-client, namespace: shop}
    spec:
      selector: {matchLabels: {app: api}}
      rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
"#;

const ALLOW_CLIENT_BROKEN: &str = r#"
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-client, namespace: shop}
    spec:
      selector: {matchLabels: {app: api}}
      rules: [{from: [{source: {principal: [cluster.local/ns/shop/sa/client]}}]}]
"#;

const DENY_BROKEN: &str = r#"
  - metadata: {name: deny-range, namespace: shop}
    spec:
      selector: {matchLabels: {app: api}}
      action: DENY
      rules: [{to: [{operation: {ports: ["80a"]}}]}]
"#;

#[test]
fn policies_select_workloads_of_their_namespace() {
    let store = Store::new();
    reload_str(&store, &with_policies(ALLOW_CLIENT)).expect("valid");
    let snap = store.load();
    let selected = snap
        .authorization("shop/api")
        .expect("shop/api is selected");
    assert_eq!(selected.allow.len(), 1);
    assert_eq!(&*selected.allow[0].key, "shop/allow-client");
    assert!(snap.authorization("shop/api2").is_some(), "same labels");
    assert!(
        snap.authorization("legacy/client").is_none(),
        "another namespace, though app=api"
    );
}

#[test]
fn an_invalid_policy_is_rejected_alone_and_the_rest_applies() {
    let store = Store::new();
    reload_str(&store, GOOD).expect("valid");
    let (applied, rejections) = reload_policies(
        &store,
        &with_policies(&format!("{ALLOW_CLIENT_BROKEN}{DENY_BROKEN}")),
    )
    .expect("the file is applied");
    let described: Vec<String> = rejections.iter().map(ToString::to_string).collect();
    assert_eq!(rejections.len(), 2, "{described:#?}");
    // A new invalid ALLOW fails closed on a reload as it does at start.
    assert_eq!(rejections[0].outcome, policies::Outcome::FailClosed);
    assert!(
        described[0].starts_with(
            "policy shop/allow-client: spec.rules[0].from[0].source.principal: unknown field `principal`"
        ),
        "{}",
        described[0]
    );
    assert_eq!(rejections[1].outcome, policies::Outcome::FailClosed);
    assert!(
        described[1].starts_with(
            "policy shop/deny-range: spec.rules[0].to[0].operation.ports[0]: \"80a\" is not a port"
        ),
        "{}",
        described[1]
    );
    // The invalid DENY stands in as a DENY of everything, the invalid ALLOW as an ALLOW of
    // nothing, for the workloads they select.
    assert_eq!(applied.policies, 2);
    let snap = store.load();
    let selected = snap.authorization("shop/api").expect("selected");
    assert_eq!(
        selected.allow.len(),
        1,
        "the invalid ALLOW does not stand in"
    );
    assert!(selected.allow[0].invalid.is_some() && selected.allow[0].rules.is_empty());
    assert_eq!(selected.deny.len(), 1);
    assert!(selected.deny[0].invalid.is_some());
    assert_eq!(
        selected.deny[0].selector.get("app").map(String::as_str),
        Some("api")
    );
}

#[test]
fn an_invalid_allow_keeps_its_last_good_version() {
    let store = Store::new();
    reload_str(&store, &with_policies(ALLOW_CLIENT)).expect("valid");
    let before = store
        .load()
        .authorization("shop/api")
        .cloned()
        .expect("selected");
    let (applied, rejections) =
        reload_policies(&store, &with_policies(ALLOW_CLIENT_BROKEN)).expect("applied");
    assert_eq!(rejections.len(), 1);
    assert_eq!(rejections[0].outcome, policies::Outcome::KeptLastGood);
    assert!(applied.is_empty(), "nothing changed: {applied:?}");
    let after = store
        .load()
        .authorization("shop/api")
        .cloned()
        .expect("selected");
    assert!(
        Arc::ptr_eq(&before, &after),
        "the same selection stays in force"
    );
    // Fixed again: no change either (it is the version in force).
    let applied = reload_str(&store, &with_policies(ALLOW_CLIENT)).expect("valid");
    assert!(applied.is_empty());
    // Removed: the workloads are selected by nothing.
    let applied = reload_str(&store, GOOD).expect("valid");
    assert_eq!((applied.policies, applied.authz), (1, 2));
    assert!(store.load().authorization("shop/api").is_none());
}

#[test]
fn policy_entries_that_cannot_be_named_reject_the_file() {
    let nameless = with_policies("  - metadata: {namespace: shop}\n    spec: {}\n");
    let e = parse_str(&nameless).expect_err("no name");
    assert!(e.contains("policies[0].metadata.name is missing"), "{e}");
    let twice = with_policies(&format!("{ALLOW_CLIENT}{ALLOW_CLIENT}"));
    let e = parse_str(&twice).expect_err("twice");
    assert!(
        e.contains("policies[1] (shop/allow-client): listed twice"),
        "{e}"
    );
}

#[test]
fn the_object_around_the_spec_is_checked_too() {
    let cases = [
        ("kind: Policy\n", "shop/p: kind: "),
        ("apiVersion: v1\n", "shop/p: apiVersion: "),
        ("extra: 1\n", "shop/p: extra: unknown field"),
    ];
    for (line, want) in cases {
        let text = with_policies(&format!(
            "  - metadata: {{name: p, namespace: shop}}\n    spec: {{action: DENY}}\n    {line}"
        ));
        let mut desired = parse(Path::new("state.yaml"), &text).expect("the file parses");
        assert_eq!(desired.invalid_policies.len(), 1, "{line}");
        let rejections = desired.settle(&Snapshot::default());
        let shown = rejections[0].to_string();
        assert!(shown.contains(want), "{line}: {shown}");
        // A DENY around a broken object still fails closed.
        assert_eq!(
            rejections[0].outcome,
            policies::Outcome::FailClosed,
            "{line}"
        );
    }
}

/// Every policy in docs/policy.md is valid (the page's examples stay true).
#[test]
fn the_documented_policies_are_valid() {
    let doc = include_str!("../../../../docs/policy.md");
    let mut checked = 0;
    for block in doc.split("```yaml\n").skip(1) {
        let block = block.split("```").next().unwrap_or_default();
        for part in block.split("\n---\n") {
            let v: serde_yaml::Value = serde_yaml::from_str(part).expect("the example is YAML");
            let entries = match v.get("policies") {
                Some(serde_yaml::Value::Sequence(list)) => list.clone(),
                _ => vec![v],
            };
            for e in entries {
                let (key, p) = policies::entry(0, e).expect("named");
                p.unwrap_or_else(|e| panic!("docs/policy.md, {key}: {e}"));
                checked += 1;
            }
        }
    }
    assert!(checked >= 7, "only {checked} examples found");
}

#[test]
fn at_start_an_invalid_allow_fails_closed_until_fixed() {
    let path = Path::new("state.yaml");
    let mut desired = parse(path, &with_policies(ALLOW_CLIENT_BROKEN)).expect("parses");
    let base = Snapshot::default();
    let rejections = desired.settle(&base);
    assert_eq!(rejections[0].outcome, policies::Outcome::FailClosed);
    assert!(
        rejections[0]
            .to_string()
            .contains("an invalid ALLOW fails closed"),
        "{}",
        rejections[0]
    );
    let store = Store::new();
    store.replace(build(path, desired, &base).expect("valid"));
    let snap = store.load();
    let selected = snap.authorization("shop/api").expect("selected");
    assert!(selected.allow[0].invalid.is_some() && selected.allow[0].rules.is_empty());
    let client = crate::identity::SpiffeId::new("cluster.local", "shop", "client").expect("id");
    let conn = crate::policy::Conn {
        identity: Some(&client),
        src: "10.240.1.2".parse().expect("ip"),
        dst: "10.240.2.2".parse().expect("ip"),
        port: 8080,
    };
    let d = crate::policy::evaluate(Some(selected), &conn);
    assert!(!d.allowed);
    assert_eq!(d.reason, crate::policy::Reason::InvalidPolicy);
    assert_eq!(d.policy.as_deref(), Some("shop/allow-client"));
    // A reload that still has it keeps the stand-in: it never turns into "no policy".
    let (applied, rejections) =
        reload_policies(&store, &with_policies(ALLOW_CLIENT_BROKEN)).expect("applied");
    assert_eq!(rejections[0].outcome, policies::Outcome::FailClosed);
    assert!(applied.is_empty(), "{applied:?}");
    // Fixed: the valid version replaces the stand-in, and the client is allowed.
    reload_str(&store, &with_policies(ALLOW_CLIENT)).expect("valid");
    let snap = store.load();
    let selected = snap.authorization("shop/api").expect("selected");
    assert!(selected.allow[0].invalid.is_none());
    assert!(crate::policy::evaluate(Some(selected), &conn).allowed);
}

#[test]
fn a_state_file_over_the_cap_is_refused_without_being_read_whole() {
    let dir = std::env::temp_dir().join(format!("mesh-state-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("state.yaml");
    let file = std::fs::File::create(&path).expect("create");
    // Sparse: the size is there, the bytes are not.
    file.set_len(MAX_STATE_BYTES + 1).expect("set_len");
    let e = load(&path, "mesh-system").expect_err("over the cap");
    let message = e.to_string();
    assert!(
        message.contains(&format!("is larger than {MAX_STATE_BYTES} bytes")),
        "{message}"
    );
    std::fs::write(&path, GOOD).expect("write");
    load(&path, "mesh-system").expect("under the cap");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_policy_in_istios_root_namespace_is_named_when_it_applies_to_nothing() {
    const IN_ISTIO_SYSTEM: &str = r#"
  - metadata: {name: deny-all, namespace: istio-system}
    spec: {action: DENY, rules: [{}]}
"#;
    let warning = |snap: &Snapshot| {
        let p = snap
            .policies
            .values()
            .find(|p| p.namespace == "istio-system")
            .expect("the policy");
        foreign_root_namespace(snap, p)
    };
    let dir = std::env::temp_dir().join(format!("mesh-foreign-root-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("state.yaml");
    std::fs::write(&path, with_policies(IN_ISTIO_SYSTEM)).expect("write");
    // The default root namespace is mesh-system: the policy applies to nothing, and says so.
    let (snap, _, _) = load(&path, "mesh-system").expect("load");
    let w = warning(&snap).expect("a warning");
    assert!(
        w.contains("namespace istio-system is Istio's root namespace")
            && w.contains("policy.root_namespace: istio-system"),
        "{w}"
    );
    // With istio-system as the root namespace it applies mesh-wide: no warning.
    let (snap, _, _) = load(&path, "istio-system").expect("load");
    assert_eq!(warning(&snap), None);
    // Nor when the state has such a namespace (its pods are what it selects).
    let with_ns = with_policies(IN_ISTIO_SYSTEM).replace(
        "namespaces: [{name: shop, enabled: true}, {name: legacy}]",
        "namespaces: [{name: shop, enabled: true}, {name: legacy}, {name: istio-system}]",
    );
    std::fs::write(&path, with_ns).expect("write");
    let (snap, _, _) = load(&path, "mesh-system").expect("load");
    assert_eq!(warning(&snap), None);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_waypoints_entry_gives_its_namespace_a_waypoint() {
    let text = format!("waypoints: [{{namespace: shop, name: waypoint}}]\n{GOOD}");
    let snap = parse_str(&text).expect("valid");
    assert_eq!(snap.waypoint_of("shop"), Some("waypoint"));
    assert_eq!(snap.waypoint_of("legacy"), None);
}
