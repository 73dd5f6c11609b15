//! The conversion from API objects, on fixtures in the API's own JSON (`fixtures/`, in the form
//! `kubectl get -o json` prints, managedFields and all): good objects become the expected state
//! objects, bad ones an error naming the object and the field.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use ::kube::core::DynamicObject;
use k8s_openapi::api::{
    core::v1::{Namespace as KubeNamespace, Pod, Service as KubeService},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;

use super::{convert::PolicyObject, PodState, Rules, ServiceDef, Skip, SliceDef};
use crate::{
    policy::Action,
    state::{self, Changes, Destination, Snapshot},
};

fn fixture<T: DeserializeOwned>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/discovery/kube/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {name} is not a {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn ambient() -> Rules {
    Rules {
        istio_ambient: true,
        ..Rules::default()
    }
}

#[test]
fn namespaces_are_meshed_by_their_label() {
    let custom = Rules {
        label: "mesh".into(),
        value: "on".into(),
        istio_ambient: false,
    };
    #[rustfmt::skip]
    let cases = [
        ("namespace-enabled.json", Rules::default(), "shop", true),
        ("namespace-plain.json", Rules::default(), "legacy", false),
        ("namespace-other-value.json", Rules::default(), "staging", false),
        ("namespace-ambient.json", Rules::default(), "payments", false),
        ("namespace-ambient.json", ambient(), "payments", true),
        ("namespace-enabled.json", custom, "shop", false),
    ];
    for (file, rules, name, enabled) in cases {
        let ns: KubeNamespace = fixture(file);
        let got =
            state::Namespace::try_from((&ns, &rules)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            got,
            state::Namespace {
                name: name.into(),
                enabled,
                waypoint: None,
            },
            "{file} with {rules:?}"
        );
    }
}

#[test]
fn a_namespace_label_names_its_waypoint() {
    let ns: KubeNamespace = fixture("namespace-waypoint.json");
    let got = state::Namespace::try_from((&ns, &Rules::default())).expect("valid");
    assert_eq!(got.waypoint.as_deref(), Some("waypoint"));
    assert!(got.enabled);
    let ns: KubeNamespace = fixture("namespace-bad-waypoint.json");
    let err = state::Namespace::try_from((&ns, &Rules::default()))
        .expect_err("a waypoint label that names no service")
        .to_string();
    assert!(
        err.contains("Namespace shop") && err.contains("metadata.labels[\"mesh-agent/waypoint\"]"),
        "{err}"
    );
}

fn pod(file: &str) -> Result<PodState, String> {
    let pod: Pod = fixture(file);
    PodState::try_from((&pod, &Rules::default())).map_err(|e| e.to_string())
}

#[test]
fn running_pods_are_workloads_with_what_the_data_path_needs() {
    let Ok(PodState::Workload(w)) = pod("pod-running.json") else {
        panic!(
            "pod-running.json: not a workload: {:?}",
            pod("pod-running.json")
        );
    };
    assert_eq!(
        *w,
        state::Workload {
            namespace: "shop".into(),
            name: "api-7c9d8f6b5-x2x8q".into(),
            service_account: "api".into(),
            node: "n1".into(),
            ips: vec![ip("10.244.1.17"), ip("fd00:10:244:1::11")],
            netns: PathBuf::new(),
            cgroup: PathBuf::new(),
            uid: Some("2d6f7a8b-3c4d-4e5f-9a0b-1c2d3e4f5a6b".into()),
            labels: BTreeMap::from([
                ("app".to_owned(), "api".to_owned()),
                ("pod-template-hash".to_owned(), "7c9d8f6b5".to_owned()),
            ]),
            capture: Default::default(),
        }
    );
    // status.podIP alone (clusters before dual-stack), and the default service account.
    let Ok(PodState::Workload(w)) = pod("pod-pod-ip-only.json") else {
        panic!("pod-pod-ip-only.json: not a workload");
    };
    assert_eq!(
        (w.ips, w.service_account.as_str()),
        (vec![ip("10.244.1.17")], "default")
    );
    // A workload as converted is one the state takes.
    let Ok(PodState::Workload(w)) = pod("pod-running.json") else {
        unreachable!("checked above")
    };
    let (snap, _) = Snapshot::default()
        .apply(Changes {
            workloads: vec![*w],
            ..Changes::default()
        })
        .unwrap_or_else(|e| panic!("the state refuses a converted pod: {e}"));
    assert!(snap.workloads_by_ip.contains_key(&ip("fd00:10:244:1::11")));
}

#[test]
fn pods_that_are_not_workloads_say_why() {
    #[rustfmt::skip]
    let cases = [
        ("pod-host-network.json", Skip::HostNetwork),
        ("pod-opted-out.json", Skip::OptedOut),
        ("pod-pending.json", Skip::NoAddress),
        ("pod-succeeded.json", Skip::Finished),
    ];
    for (file, skip) in cases {
        assert_eq!(pod(file), Ok(PodState::Skipped(skip)), "{file}");
    }
}

/// A conversion of a fixture, for tables.
type Convert = fn(&str) -> Result<(), String>;

#[test]
fn bad_objects_name_the_object_and_the_field() {
    fn service(file: &str) -> Result<(), String> {
        ServiceDef::try_from(&fixture::<KubeService>(file))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn slice(file: &str) -> Result<(), String> {
        SliceDef::try_from(&fixture::<EndpointSlice>(file))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn pod_error(file: &str) -> Result<(), String> {
        pod(file).map(|_| ())
    }
    #[rustfmt::skip]
    let cases: [(&str, Convert, &str); 8] = [
        ("pod-bad-ip.json", pod_error, r#"Pod shop/api-bad-ip: status.podIPs[1].ip: "fd00:10:244:1::zz" is not an IP address"#),
        ("pod-mapped-ip.json", pod_error, "Pod shop/api-mapped: status.podIPs[0].ip: ::ffff:10.244.1.17 is an IPv4-mapped IPv6 address (of 10.244.1.17)"),
        ("pod-no-node.json", pod_error, "Pod shop/api-no-node: spec.nodeName: missing on a pod with addresses"),
        ("service-bad-cluster-ip.json", service, r#"Service shop/api-bad-vip: spec.clusterIPs[1]: "10.96.12.345" is not an IP address"#),
        ("service-bad-target-port.json", service, "Service shop/api-bad-port: spec.ports[1].targetPort: 70000 is not a port (1 to 65535)"),
        ("endpointslice-bad-address.json", slice, r#"EndpointSlice shop/api-bad1: endpoints[1].addresses[0]: "10.244.2.900" is not an IP address"#),
        ("endpointslice-wrong-family.json", slice, "EndpointSlice shop/api-bad2: endpoints[0].addresses[0]: fd00:10:244:1::11 is not of the slice's addressType IPv4"),
        ("endpointslice-bad-port.json", slice, "EndpointSlice shop/api-bad3: ports[0].port: 0 is not a port (1 to 65535)"),
    ];
    for (file, convert, want) in cases {
        assert_eq!(convert(file), Err(want.to_owned()), "{file}");
    }
}

/// A service's endpoints are the ready endpoints of all its slices, each with the port its
/// slice gives for the service port's name; UDP ports and not-ready endpoints are left out.
#[test]
fn service_endpoints_come_from_its_endpoint_slices() {
    let def = ServiceDef::try_from(&fixture::<KubeService>("service-api.json"))
        .unwrap_or_else(|e| panic!("service-api.json: {e}"));
    assert_eq!(def.vips, [ip("10.96.12.34"), ip("fd00:10:96::1234")]);
    let ports: Vec<(&str, u16, u16)> = def
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.target_port))
        .collect();
    assert_eq!(ports, [("http", 80, 80), ("https", 443, 8443)], "TCP only");
    let slices: Vec<SliceDef> = [
        "endpointslice-api-a.json",
        "endpointslice-api-b.json",
        "endpointslice-api-v6.json",
    ]
    .iter()
    .map(|f| {
        SliceDef::try_from(&fixture::<EndpointSlice>(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
    })
    .collect();
    assert!(
        slices
            .iter()
            .all(|s| s.service_key().as_deref() == Some("shop/api")),
        "{slices:?}"
    );
    let svc = def
        .to_state(&slices)
        .expect("a service with VIPs and ports");
    let by_port = svc.endpoints.clone().expect("explicit endpoints");
    let want = |list: &[&str]| list.iter().map(|s| addr(s)).collect::<Vec<_>>();
    assert_eq!(
        by_port[&80],
        want(&[
            "10.244.1.17:8080",
            "10.244.2.9:8080",
            "10.244.3.4:9090",
            "[fd00:10:244:1::11]:8080"
        ]),
        "the named port resolved per slice; 10.244.2.10 is not ready"
    );
    assert_eq!(
        by_port[&443],
        want(&[
            "10.244.1.17:8443",
            "10.244.2.9:8443",
            "10.244.3.4:8443",
            "[fd00:10:244:1::11]:8443"
        ])
    );
    assert!(svc.selector.is_empty());
    let (snap, _) = Snapshot::default()
        .apply(Changes {
            services: vec![svc],
            ..Changes::default()
        })
        .unwrap_or_else(|e| panic!("the state refuses a converted service: {e}"));
    assert_eq!(
        snap.resolve(addr("[fd00:10:96::1234]:443")),
        Destination::Service {
            service: "shop/api".into(),
            endpoint: addr("10.244.1.17:8443")
        }
    );
    // Without slices yet: a service without endpoints, never one that selects.
    let empty = def.to_state([]).expect("service");
    assert_eq!(empty.endpoints.as_ref().map(|e| e[&80].len()), Some(0));
    let headless = ServiceDef::try_from(&fixture::<KubeService>("service-headless.json"))
        .unwrap_or_else(|e| panic!("service-headless.json: {e}"));
    assert_eq!(
        headless.to_state(&slices),
        None,
        "a headless service has no VIP"
    );
}

#[test]
fn authorization_policies_are_checked_as_the_state_files_are() {
    let policy = |file: &str| {
        PolicyObject::try_from(&fixture::<DynamicObject>(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let allow = policy("authorizationpolicy-allow.json");
    assert_eq!(allow.key, "shop/allow-client");
    let p = allow
        .policy
        .unwrap_or_else(|e| panic!("authorizationpolicy-allow.json: {e}"));
    assert_eq!(p.action, Action::Allow);
    assert_eq!(
        p.selector,
        BTreeMap::from([("app".to_owned(), "api".to_owned())])
    );
    #[rustfmt::skip]
    let cases = [
        ("authorizationpolicy-bad-port.json", Some(Action::Deny), "policy shop/deny-bad-port: spec.rules[0].to[0].operation.ports[1]: \"http\" is not a port (1-65535)"),
        ("authorizationpolicy-custom.json", None, "policy shop/custom: spec.action: action CUSTOM (an external authorizer) is not supported"),
    ];
    for (file, action, want) in cases {
        let invalid = policy(file).policy.expect_err("an invalid policy");
        assert_eq!(invalid.to_string(), want, "{file}");
        assert_eq!(invalid.action, action, "{file}");
    }
}

/// What the state would refuse as a conflict of the object with itself is refused by the
/// conversion, naming the field.
#[test]
fn a_service_lists_each_vip_and_port_once() {
    let convert = |changes: serde_json::Value| {
        let mut value: serde_json::Value = fixture("service-api.json");
        if let (Some(spec), serde_json::Value::Object(changes)) = (
            value.get_mut("spec").and_then(|s| s.as_object_mut()),
            changes,
        ) {
            spec.extend(changes);
        }
        let svc: KubeService = serde_json::from_value(value).expect("a Service");
        ServiceDef::try_from(&svc)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert_eq!(
        convert(serde_json::json!({"clusterIPs": ["10.96.12.34", "10.96.12.34"]})),
        Err("Service shop/api: spec.clusterIPs[1]: 10.96.12.34 is listed twice".into())
    );
    assert_eq!(
        convert(
            serde_json::json!({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]})
        ),
        Err("Service shop/api: spec.ports[1].port: TCP port 80 is listed twice".into())
    );
}

/// A pod the CNI plugin is adding has no address in the API yet: the node pods give it as a
/// workload with the plugin's addresses, and say which pods are never the mesh's.
#[test]
fn node_pods_give_a_pod_being_added_its_addresses() {
    use ::kube::runtime::{reflector, watcher};

    use crate::pods::cni::{NodePod, NodePods as _};
    let (store, mut writer) = reflector::store::<Pod>();
    let pending: Pod = fixture("pod-pending.json");
    let opted_out: Pod = fixture("pod-opted-out.json");
    for pod in [&pending, &opted_out] {
        writer.apply_watcher_event(&watcher::Event::Apply(pod.clone()));
    }
    let node_pods = super::NodePodsStore {
        pods: store,
        rules: Rules::default(),
    };
    let name = |p: &Pod| {
        (
            p.metadata.namespace.clone().expect("a namespace"),
            p.metadata.name.clone().expect("a name"),
        )
    };
    let (ns, n) = name(&pending);
    let ips = [ip("10.244.1.30")];
    let NodePod::Workload(w) = node_pods.with_addresses(&ns, &n, &ips) else {
        panic!("the pending pod is not a workload with the plugin's addresses");
    };
    assert_eq!(w.ips, ips);
    assert_eq!(w.uid, pending.metadata.uid);
    assert_eq!(node_pods.with_addresses(&ns, &n, &[]), NodePod::Unknown);
    let (ns, n) = name(&opted_out);
    assert_eq!(node_pods.with_addresses(&ns, &n, &ips), NodePod::NotMeshed);
    assert_eq!(
        node_pods.with_addresses("shop", "nobody", &ips),
        NodePod::Unknown
    );
}
