//! Tests of the state: the data path's reads, the rules, and that incremental updates always
//! give the snapshot a full build of the same state gives.

use std::{collections::BTreeMap, path::PathBuf};

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{canonical::canonical, *};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn workload(ns: &str, name: &str, node: &str, ips: &[&str], app: &str) -> Workload {
    Workload {
        namespace: ns.into(),
        name: name.into(),
        service_account: "default".into(),
        node: node.into(),
        ips: ips.iter().map(|s| ip(s)).collect(),
        netns: format!("/run/netns/{name}").into(),
        cgroup: format!("/cg/{name}").into(),
        uid: None,
        labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
        capture: CaptureExclusions::default(),
    }
}

fn service(ns: &str, name: &str, vips: &[&str], ports: &[(u16, u16)], app: &str) -> Service {
    Service {
        namespace: ns.into(),
        name: name.into(),
        vips: vips.iter().map(|s| ip(s)).collect(),
        ports: ports
            .iter()
            .map(|&(port, target_port)| PortMapping {
                port,
                target_port,
                protocol: Default::default(),
            })
            .collect(),
        selector: BTreeMap::from([("app".to_owned(), app.to_owned())]),
        endpoints: None,
    }
}

/// A small mesh: shop (enabled) with two api pods and a client, legacy (disabled) with one.
fn small() -> Changes {
    Changes {
        namespaces: vec![
            Namespace {
                name: "shop".into(),
                enabled: true,
                waypoint: None,
            },
            Namespace {
                name: "legacy".into(),
                enabled: false,
                waypoint: None,
            },
        ],
        workloads: vec![
            workload("shop", "api-1", "n1", &["10.0.1.1"], "api"),
            workload("shop", "api-2", "n2", &["10.0.2.1"], "api"),
            workload("shop", "client", "n1", &["10.0.1.2"], "client"),
            workload("legacy", "old", "n1", &["10.0.1.3"], "api"),
        ],
        services: vec![service("shop", "api", &["10.96.0.1"], &[(80, 8080)], "api")],
        ..Changes::default()
    }
}

fn built(changes: Changes) -> Snapshot {
    Snapshot::default().apply(changes).expect("valid").0
}

#[test]
fn round_robin_over_endpoints() {
    let a = addr("10.0.0.1:8080");
    let b = addr("10.0.0.2:8080");
    let vip = addr("10.96.0.1:80");
    let mut snap = Snapshot::default();
    snap.services.insert(
        vip,
        Arc::new(ServicePort::new("shop/api".into(), vec![a, b])),
    );
    let picks: Vec<_> = (0..4).map(|_| snap.resolve(vip)).collect();
    let ep = |e| Destination::Service {
        service: "shop/api".into(),
        endpoint: e,
    };
    assert_eq!(picks, vec![ep(a), ep(b), ep(a), ep(b)]);
    let other = addr("10.0.0.9:5432");
    assert_eq!(snap.resolve(other), Destination::Passthrough(other));
}

#[test]
fn service_without_endpoints() {
    let vip = addr("10.96.0.1:80");
    let mut snap = Snapshot::default();
    snap.services
        .insert(vip, Arc::new(ServicePort::new("shop/api".into(), vec![])));
    assert_eq!(
        snap.resolve(vip),
        Destination::NoEndpoints {
            service: "shop/api".into()
        }
    );
}

#[test]
fn reads_of_the_data_path_and_capture() {
    let snap = built(small());
    assert!(snap.namespace_enabled("shop"));
    assert!(!snap.namespace_enabled("legacy"));
    let on_n1: Vec<String> = snap.captured_on("n1").map(|w| w.key()).collect();
    assert_eq!(on_n1, ["shop/api-1", "shop/client"]);
    assert_eq!(snap.captured_on("n9").count(), 0);
    assert!(snap.meshed_workload(ip("10.0.2.1")).is_some());
    assert!(
        snap.meshed_workload(ip("10.0.1.3")).is_none(),
        "legacy is not meshed"
    );
    let port = snap.services.get(&addr("10.96.0.1:80")).expect("port");
    assert_eq!(
        port.endpoints,
        [addr("10.0.1.1:8080"), addr("10.0.2.1:8080")],
        "only the api pods of shop"
    );
}

/// A service with explicit endpoints (the Kubernetes source's, from EndpointSlices) takes
/// them as given, per port, sorted; workloads joining or leaving do not touch them; and it may
/// not have a selector too.
#[test]
fn explicit_endpoints_are_taken_as_given() {
    let mut changes = small();
    let mut s = service(
        "shop",
        "ext",
        &["10.96.0.9"],
        &[(80, 8080), (443, 8443)],
        "",
    );
    s.selector.clear();
    s.endpoints = Some(BTreeMap::from([(
        80,
        vec![
            addr("10.9.0.2:9090"),
            addr("10.9.0.1:9090"),
            addr("10.9.0.1:9090"),
        ],
    )]));
    changes.services.push(s.clone());
    let snap = built(changes);
    let endpoints = |snap: &Snapshot, vip: &str| {
        snap.services
            .get(&addr(vip))
            .unwrap_or_else(|| panic!("{vip}: no service port"))
            .endpoints
            .clone()
    };
    assert_eq!(
        endpoints(&snap, "10.96.0.9:80"),
        [addr("10.9.0.1:9090"), addr("10.9.0.2:9090")],
        "sorted, once each, with their own port"
    );
    assert!(
        endpoints(&snap, "10.96.0.9:443").is_empty(),
        "a port not listed has none"
    );
    let (next, _) = snap
        .apply(Changes {
            workloads: vec![workload("shop", "api-3", "n1", &["10.0.1.9"], "")],
            ..Changes::default()
        })
        .expect("valid");
    assert_eq!(endpoints(&next, "10.96.0.9:80").len(), 2);
    let mut both = s;
    both.selector = BTreeMap::from([("app".to_owned(), "api".to_owned())]);
    let err = next
        .apply(Changes {
            services: vec![both],
            ..Changes::default()
        })
        .expect_err("a selector and explicit endpoints");
    assert_eq!(
        err.to_string(),
        "service (shop/ext).selector: a service with explicit endpoints has no selector"
    );
}

#[test]
fn a_changed_port_goes_on_from_its_round_robin_position() {
    let store = Store::new();
    store.apply(small()).expect("valid");
    let vip = addr("10.96.0.1:80");
    let first = store.load().resolve(vip);
    // A third api pod: the port is rebuilt with three endpoints, its position kept (1).
    store
        .apply(Changes {
            workloads: vec![workload("shop", "api-3", "n2", &["10.0.0.5"], "api")],
            ..Changes::default()
        })
        .expect("valid");
    let snap = store.load();
    let port = snap.services.get(&vip).expect("port");
    assert_eq!(port.position(), 1);
    assert_eq!(
        snap.resolve(vip),
        Destination::Service {
            service: "shop/api".into(),
            endpoint: addr("10.0.1.1:8080")
        }
    );
    assert_ne!(first, snap.resolve(vip));
}

#[test]
fn store_errors_name_the_object_and_field() {
    let mut relative = workload("shop", "api-1", "n1", &["10.0.1.1"], "api");
    relative.netns = "netns/a".into();
    let mut port_zero = workload("shop", "api-1", "n1", &["10.0.1.1"], "api");
    port_zero.capture.exclude_outbound_ports = vec![0];
    let cases: Vec<(Changes, &str)> = vec![
        (
            Changes {
                workloads: vec![workload("legacy", "old", "n1", &["10.0.2.1"], "api")],
                ..Changes::default()
            },
            "workload (legacy/old).ips: 10.0.2.1 is also the address of shop/api-2",
        ),
        (
            Changes {
                workloads: vec![relative],
                ..Changes::default()
            },
            "workload (shop/api-1).netns: netns/a is not an absolute path",
        ),
        (
            Changes {
                workloads: vec![port_zero],
                ..Changes::default()
            },
            "workload (shop/api-1).capture.exclude_outbound_ports: port 0 is not a valid port",
        ),
        (
            Changes {
                workloads: vec![workload("", "x", "n1", &["10.0.9.9"], "api")],
                ..Changes::default()
            },
            "workload (/x): name and namespace must not be empty",
        ),
        (
            Changes {
                workloads: vec![
                    workload("shop", "x", "n1", &["10.0.9.9"], "api"),
                    workload("shop", "x", "n1", &["10.0.9.8"], "api"),
                ],
                ..Changes::default()
            },
            "workload (shop/x): listed twice",
        ),
        (
            Changes {
                services: vec![service("shop", "web", &["10.96.0.1"], &[(80, 80)], "web")],
                ..Changes::default()
            },
            "service (shop/web): 10.96.0.1:80 is also a port of shop/api",
        ),
        (
            Changes {
                services: vec![service("shop", "web", &["10.96.0.2"], &[(80, 0)], "web")],
                ..Changes::default()
            },
            "service (shop/web).ports[0]: port 0 is not a valid port",
        ),
        (
            Changes {
                services: vec![service("shop", "web", &[], &[(80, 80)], "web")],
                ..Changes::default()
            },
            "service (shop/web).vips: a service needs at least one address",
        ),
        (
            Changes {
                namespaces: vec![Namespace {
                    name: String::new(),
                    enabled: true,
                    waypoint: None,
                }],
                ..Changes::default()
            },
            "namespace (): the name is empty",
        ),
        (
            Changes {
                workloads: vec![Workload {
                    netns: PathBuf::new(),
                    cgroup: PathBuf::new(),
                    ..workload("shop", "web", "n1", &["10.0.0.9"], "web")
                }],
                ..Changes::default()
            },
            "workload (shop/web).uid: a workload without netns and cgroup needs the pod's uid \
             (the node finds its cgroup and network namespace from it)",
        ),
        (
            Changes {
                workloads: vec![Workload {
                    cgroup: PathBuf::new(),
                    ..workload("shop", "web", "n1", &["10.0.0.9"], "web")
                }],
                ..Changes::default()
            },
            "workload (shop/web).cgroup: missing: give both netns and cgroup, or neither and the \
             pod's uid",
        ),
    ];
    for (changes, want) in cases {
        let store = Store::new();
        store.apply(small()).expect("valid");
        let before = canonical(&store.load());
        let generation = *store.subscribe().borrow();
        let err = store.apply(changes).expect_err(want);
        assert_eq!(err.to_string(), want);
        assert_eq!(canonical(&store.load()), before, "{want}: state changed");
        assert_eq!(*store.subscribe().borrow(), generation, "{want}: published");
    }
}

#[test]
fn an_address_or_a_vip_can_move_between_objects_in_one_change() {
    let store = Store::new();
    store.apply(small()).expect("valid");
    // api-1 and api-2 swap addresses; the api VIP moves to a new service.
    let changes = Changes {
        workloads: vec![
            workload("shop", "api-1", "n1", &["10.0.2.1"], "api"),
            workload("shop", "api-2", "n2", &["10.0.1.1"], "api"),
        ],
        services: vec![service(
            "shop",
            "api-v2",
            &["10.96.0.1"],
            &[(80, 9090)],
            "api",
        )],
        removed_services: vec!["shop/api".into()],
        ..Changes::default()
    };
    let applied = store.apply(changes.clone()).expect("valid");
    assert_eq!(
        applied,
        Applied {
            workloads: 2,
            services: 2,
            service_ports: 1,
            ..Applied::default()
        }
    );
    let mut full = small();
    full.workloads.splice(0..2, changes.workloads);
    full.services = changes.services;
    assert_eq!(canonical(&store.load()), canonical(&built(full)));
}

/// A random state of a small universe, where collisions (addresses, VIPs, labels) are common.
#[derive(Debug, Clone, Default)]
struct Model {
    namespaces: BTreeMap<String, Namespace>,
    workloads: BTreeMap<String, Workload>,
    services: BTreeMap<String, Service>,
    policies: BTreeMap<String, Policy>,
}

impl Model {
    fn changes(&self) -> Changes {
        Changes {
            namespaces: self.namespaces.values().cloned().collect(),
            workloads: self.workloads.values().cloned().collect(),
            services: self.services.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
            ..Changes::default()
        }
    }

    /// The model after `changes` (removals first, as the store applies them).
    fn after(&self, changes: &Changes) -> Model {
        let mut next = self.clone();
        for name in &changes.removed_namespaces {
            next.namespaces.remove(name);
        }
        for key in &changes.removed_workloads {
            next.workloads.remove(key);
        }
        for key in &changes.removed_services {
            next.services.remove(key);
        }
        for ns in &changes.namespaces {
            next.namespaces.insert(ns.name.clone(), ns.clone());
        }
        for w in &changes.workloads {
            next.workloads.insert(w.key(), w.clone());
        }
        for key in &changes.removed_policies {
            next.policies.remove(key);
        }
        for s in &changes.services {
            next.services.insert(s.key(), s.clone());
        }
        for p in &changes.policies {
            next.policies.insert(p.key.to_string(), p.clone());
        }
        next
    }
}

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const APPS: [&str; 3] = ["x", "y", "z"];

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.random_range(0..from.len())]
}

fn random_labels(rng: &mut StdRng) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if rng.random_bool(0.9) {
        labels.insert("app".to_owned(), pick(rng, &APPS).to_owned());
    }
    if rng.random_bool(0.5) {
        labels.insert("tier".to_owned(), pick(rng, &["1", "2"]).to_owned());
    }
    labels
}

fn random_workload(rng: &mut StdRng) -> Workload {
    let name = format!("w{}", rng.random_range(0..8));
    let mut w = workload(
        pick(rng, &NAMESPACES),
        &name,
        pick(rng, &["n1", "n2"]),
        &[],
        "",
    );
    w.ips = (0..rng.random_range(1..=2))
        .map(|_| IpAddr::from([10, 0, 0, rng.random_range(1..=14)]))
        .collect();
    w.labels = random_labels(rng);
    if rng.random_bool(0.03) {
        w.cgroup = "relative".into();
    }
    w
}

/// A policy of one of the namespaces or the root namespace, selecting by `app` or everything.
fn random_policy(rng: &mut StdRng) -> Policy {
    let ns = pick(rng, &["a", "b", "mesh-system"]);
    let name = format!("p{}", rng.random_range(0..4));
    let action = pick(rng, &["ALLOW", "DENY", "AUDIT"]);
    let selector = if rng.random_bool(0.7) {
        format!("selector: {{matchLabels: {{app: {}}}}}, ", pick(rng, &APPS))
    } else {
        String::new()
    };
    let port = rng.random_range(1..4);
    let spec = format!(
        "{{{selector}action: {action}, rules: [{{to: [{{operation: {{ports: [{port}]}}}}]}}]}}"
    );
    crate::policy::compile(ns, &name, serde_yaml::from_str(&spec).expect("yaml"))
        .expect("valid policy")
}

fn random_service(rng: &mut StdRng) -> Service {
    let name = format!("s{}", rng.random_range(0..5));
    let mut s = service(pick(rng, &NAMESPACES), &name, &[], &[], "");
    s.vips = (0..rng.random_range(1..=2))
        .map(|_| IpAddr::from([10, 96, 0, rng.random_range(1..=5)]))
        .collect();
    s.ports = (0..rng.random_range(1..=2))
        .map(|_| PortMapping {
            port: [80, 443, 8080][rng.random_range(0..3)],
            target_port: if rng.random_bool(0.03) { 0 } else { 9000 },
            protocol: Default::default(),
        })
        .collect();
    s.selector = random_labels(rng);
    // Explicit endpoints (the Kubernetes source's), now and then with the selector they may
    // not have.
    if rng.random_bool(0.3) {
        if rng.random_bool(0.9) {
            s.selector.clear();
        }
        let mut endpoints = BTreeMap::new();
        for p in &s.ports {
            if rng.random_bool(0.2) {
                continue;
            }
            let addrs = (0..rng.random_range(0..=3))
                .map(|_| {
                    SocketAddr::new(
                        IpAddr::from([10, 0, 0, rng.random_range(1..=14)]),
                        [9000, 9001][rng.random_range(0..2)],
                    )
                })
                .collect();
            endpoints.insert(p.port, addrs);
        }
        s.endpoints = Some(endpoints);
    }
    s
}

/// A change of 1 to 4 operations on random objects (never two upserts of one key).
fn random_change(rng: &mut StdRng, model: &Model) -> Changes {
    let mut c = Changes::default();
    let existing = |keys: Vec<&String>, rng: &mut StdRng| {
        (!keys.is_empty()).then(|| keys[rng.random_range(0..keys.len())].clone())
    };
    for _ in 0..rng.random_range(1..=4) {
        match rng.random_range(0..10) {
            8 => {
                let p = random_policy(rng);
                if c.policies.iter().all(|o| o.key != p.key) {
                    c.policies.push(p);
                }
            }
            9 => {
                if let Some(key) = existing(model.policies.keys().collect(), rng) {
                    c.removed_policies.push(key);
                }
            }
            0 | 1 => {
                let w = random_workload(rng);
                if c.workloads.iter().all(|o| o.key() != w.key()) {
                    c.workloads.push(w);
                }
            }
            2 => {
                if let Some(key) = existing(model.workloads.keys().collect(), rng) {
                    let mut w = model.workloads[&key].clone();
                    w.labels = random_labels(rng);
                    if c.workloads.iter().all(|o| o.key() != key) {
                        c.workloads.push(w);
                    }
                }
            }
            3 => {
                if let Some(key) = existing(model.workloads.keys().collect(), rng) {
                    c.removed_workloads.push(key);
                }
            }
            4 => {
                let s = random_service(rng);
                if c.services.iter().all(|o| o.key() != s.key()) {
                    c.services.push(s);
                }
            }
            5 => {
                if let Some(key) = existing(model.services.keys().collect(), rng) {
                    c.removed_services.push(key);
                }
            }
            6 => {
                let name = pick(rng, &NAMESPACES).to_owned();
                if c.namespaces.iter().all(|n| n.name != name) {
                    let enabled = rng.random_bool(0.5);
                    let waypoint = rng.random_bool(0.3).then(|| "waypoint".to_owned());
                    c.namespaces.push(Namespace {
                        name,
                        enabled,
                        waypoint,
                    });
                }
            }
            _ => c.removed_namespaces.push(pick(rng, &NAMESPACES).to_owned()),
        }
    }
    c
}

#[test]
fn incremental_updates_equal_a_full_build() {
    for seed in 0..40 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = Model::default();
        let mut current = Snapshot::default();
        let (mut accepted, mut rejected) = (0, 0);
        for step in 0..60 {
            let changes = random_change(&mut rng, &model);
            let next_model = model.after(&changes);
            let full = Snapshot::default().apply(next_model.changes());
            let incremental = current.apply(changes.clone());
            match (full, incremental) {
                (Ok((full, _)), Ok((inc, _))) => {
                    assert_eq!(
                        canonical(&inc),
                        canonical(&full),
                        "seed {seed} step {step}: {changes:#?}"
                    );
                    current = inc;
                    model = next_model;
                    accepted += 1;
                }
                (Err(_), Err(_)) => rejected += 1,
                (full, inc) => panic!(
                    "seed {seed} step {step}: full build {:?}, incremental {:?}, for {changes:#?}",
                    full.map(|_| ()),
                    inc.map(|_| ())
                ),
            }
        }
        assert!(
            accepted > 10 && rejected > 0,
            "seed {seed}: {accepted} accepted, {rejected} rejected"
        );
    }
}

#[test]
fn a_mesh_of_10000_services_and_50000_workloads() {
    use super::bench::Shape;
    let shape = Shape {
        services: 10_000,
        workloads: 50_000,
    };
    let store = Store::new();
    let applied = store.apply(shape.changes()).expect("valid");
    assert_eq!(applied.workloads, 50_000);
    assert_eq!(applied.services, 10_000);
    let snap = store.load();
    // Service i selects the workloads j with j % 10_000 == i: five each.
    let mut ports = 0;
    for i in 0..shape.services {
        let s = shape.service(i);
        let want: Vec<IpAddr> = (0..5)
            .map(|n| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0001 + i + n * 10_000)))
            .collect();
        for p in &s.ports {
            let port = snap
                .services
                .get(&SocketAddr::new(s.vips[0], p.port))
                .expect("service port");
            let got: Vec<IpAddr> = port.endpoints.iter().map(SocketAddr::ip).collect();
            assert_eq!(got, want, "{}", s.key());
            ports += 1;
        }
    }
    assert_eq!(snap.services.len(), ports);
    // 100 nodes of 500 workloads; namespaces ns-9, ns-19, ... are not enabled.
    let captured: usize = (0..100)
        .map(|n| snap.captured_on(&format!("node-{n}")).count())
        .sum();
    assert_eq!(captured, 45_000);
    assert_eq!(snap.captured_on("node-7").count(), 450);
    // Single-object changes, then the result is compared with a full build of the same state.
    let mut changes = Changes::default();
    for k in 0..20 {
        let snap = store.load();
        let s = shape.service_change(&snap, k).expect("service");
        let w = shape.workload_change(&snap, k).expect("workload");
        changes.services.retain(|o| o.key() != s.key());
        changes.workloads.retain(|o| o.key() != w.key());
        changes.services.push(s.clone());
        changes.workloads.push(w.clone());
        let applied = store
            .apply(Changes {
                services: vec![s],
                workloads: vec![w],
                ..Changes::default()
            })
            .expect("valid");
        assert_eq!((applied.services, applied.workloads), (1, 1));
    }
    let mut full = shape.changes();
    for s in changes.services {
        if let Some(o) = full.services.iter_mut().find(|o| o.key() == s.key()) {
            *o = s;
        }
    }
    for w in changes.workloads {
        if let Some(o) = full.workloads.iter_mut().find(|o| o.key() == w.key()) {
            *o = w;
        }
    }
    assert!(
        canonical(&store.load()) == canonical(&built(full)),
        "incremental != full build"
    );
}

#[test]
fn a_node_may_issue_the_identities_of_its_workloads_and_of_those_that_just_left() {
    use crate::identity::{Placement as _, SpiffeId};
    let store = Store::new();
    store.apply(small()).expect("valid");
    let default_of = |ns: &str| SpiffeId::new("cluster.local", ns, "default").expect("id");
    // shop/api-1 (service account default) runs on n1, shop/api-2 on n2; nothing of legacy
    // runs on n2.
    assert!(store.may_issue("n1", &default_of("shop")));
    assert!(store.may_issue("n2", &default_of("shop")));
    assert!(store.may_issue("n1", &default_of("legacy")));
    assert!(!store.may_issue("n2", &default_of("legacy")));
    assert!(!store.may_issue("n3", &default_of("shop")));
    let other_sa = SpiffeId::new("cluster.local", "shop", "admin").expect("id");
    assert!(!store.may_issue("n1", &other_sa));
    // legacy/old moves from n1 to n2: n2 may issue it now, and n1 still may for a while (the
    // grace period), not forever.
    store
        .apply(Changes {
            workloads: vec![workload("legacy", "old", "n2", &["10.0.2.9"], "api")],
            ..Changes::default()
        })
        .expect("valid");
    assert!(store.may_issue("n2", &default_of("legacy")));
    assert!(store.may_issue("n1", &default_of("legacy")), "no grace");
    assert!(!store.load().places("n1", &default_of("legacy")));
    // shop/api-2 leaves n2 (deleted): n2 keeps shop's default for the grace period too.
    store
        .apply(Changes {
            removed_workloads: vec!["shop/api-2".into()],
            ..Changes::default()
        })
        .expect("valid");
    assert!(!store.load().places("n2", &default_of("shop")));
    assert!(
        store.may_issue("n2", &default_of("shop")),
        "no grace after a removal"
    );
    assert!(!store.may_issue("n3", &default_of("shop")));
    assert_eq!(store.departures(), 2, "one move, one removal");
}

#[test]
fn only_ended_placements_are_remembered() {
    // An agent's first list applies one pod at a time: nothing of it is remembered.
    let store = Store::new();
    for i in 0..1_000u32 {
        store
            .apply(Changes {
                workloads: vec![workload(
                    "shop",
                    &format!("pod-{i}"),
                    "n1",
                    &[&format!("10.1.{}.{}", i / 250, i % 250 + 1)],
                    "api",
                )],
                ..Changes::default()
            })
            .expect("valid");
    }
    assert_eq!(store.departures(), 0);
    // A relabel changes no placement; a whole new snapshot that drops one pod ends one.
    let mut relabelled = workload("shop", "pod-0", "n1", &["10.1.0.1"], "api");
    relabelled.labels.insert("tier".into(), "gold".into());
    store
        .apply(Changes {
            workloads: vec![relabelled],
            ..Changes::default()
        })
        .expect("valid");
    assert_eq!(store.departures(), 0, "a relabel is no departure");
    let (next, _) = store
        .load()
        .apply(Changes {
            removed_workloads: vec!["shop/pod-1".into()],
            ..Changes::default()
        })
        .expect("valid");
    store.replace(next);
    assert_eq!(store.departures(), 1);
}

#[test]
fn a_waypoint_pod_is_a_meshed_workload_never_captured() {
    let mut waypoint = workload("shop", "waypoint-1", "n1", &["10.0.1.9"], "waypoint");
    waypoint
        .labels
        .insert(ROLE_LABEL.to_owned(), ROLE_WAYPOINT.to_owned());
    // A waypoint's pod needs no sandbox to be found: it is never captured.
    waypoint.netns = PathBuf::new();
    waypoint.cgroup = PathBuf::new();
    let mut changes = small();
    changes.workloads.push(waypoint);
    changes.namespaces[0].waypoint = Some("waypoint".into());
    let store = Store::new();
    store.apply(changes).expect("valid");
    let snap = store.load();
    assert!(snap.meshed_workload(ip("10.0.1.9")).is_some());
    let captured: Vec<String> = snap.captured_on("n1").map(|w| w.key()).collect();
    assert!(
        !captured.contains(&"shop/waypoint-1".to_owned()),
        "{captured:?}"
    );
    assert!(captured.contains(&"shop/api-1".to_owned()), "{captured:?}");
    assert_eq!(snap.waypoint_of("shop"), Some("waypoint"));
    assert_eq!(snap.waypoint_of("legacy"), None);
    // An ordinary workload without sandbox or uid is still refused.
    let mut bare = workload("shop", "bare", "n1", &["10.0.1.10"], "bare");
    bare.netns = PathBuf::new();
    bare.cgroup = PathBuf::new();
    let err = store
        .apply(Changes {
            workloads: vec![bare],
            ..Changes::default()
        })
        .expect_err("no sandbox, no uid");
    assert!(err.to_string().contains("uid"), "{err}");
}

#[test]
fn a_namespace_waypoint_must_name_a_service() {
    let store = Store::new();
    let err = store
        .apply(Changes {
            namespaces: vec![Namespace {
                name: "shop".into(),
                enabled: true,
                waypoint: Some("Not_A_Name".into()),
            }],
            ..Changes::default()
        })
        .expect_err("invalid waypoint name");
    assert!(
        err.to_string().contains(".waypoint: \"Not_A_Name\""),
        "{err}"
    );
    // Setting and removing a waypoint are changes of the namespace.
    let set = |waypoint: Option<&str>| Changes {
        namespaces: vec![Namespace {
            name: "shop".into(),
            enabled: true,
            waypoint: waypoint.map(str::to_owned),
        }],
        ..Changes::default()
    };
    assert_eq!(store.apply(set(None)).expect("valid").namespaces, 1);
    assert_eq!(
        store
            .apply(set(Some("waypoint")))
            .expect("valid")
            .namespaces,
        1
    );
    assert_eq!(
        store
            .apply(set(Some("waypoint")))
            .expect("valid")
            .namespaces,
        0
    );
    assert_eq!(store.apply(set(None)).expect("valid").namespaces, 1);
    assert_eq!(store.load().waypoint_of("shop"), None);
}

#[test]
fn a_service_port_declares_its_protocol_by_app_protocol_then_name() {
    use super::Protocol::{self, *};
    for (app, name, want) in [
        (Some("http"), "", Http),
        (Some("kubernetes.io/h2c"), "tcp-x", Http2),
        (Some("grpc"), "", Http2),
        (Some("tcp"), "http-web", Tcp),
        (Some("something-else"), "http-web", Http),
        (None, "http", Http),
        (None, "http2-api", Http2),
        (None, "grpc-api", Http2),
        (None, "tcp-db", Tcp),
        (None, "mysql", Tcp),
        (None, "web", Unspecified),
        (None, "", Unspecified),
        (None, "httpx", Unspecified),
    ] {
        assert_eq!(Protocol::declared(app, name), want, "{app:?} {name:?}");
    }
}
