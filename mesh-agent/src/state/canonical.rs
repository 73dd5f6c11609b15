//! A snapshot in a comparable form, checking on the way that its maps and indexes agree: what
//! the tests (and the `state_file` fuzz target) compare an incremental update with a full
//! build by.

use std::collections::BTreeMap;

use super::*;

/// Everything a snapshot holds, in a comparable form (round-robin positions aside). Checks on
/// the way that the maps and indexes agree with each other.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Canonical {
    namespaces: BTreeMap<String, bool>,
    waypoints: BTreeMap<String, String>,
    workloads: BTreeMap<String, Workload>,
    workloads_by_ip: BTreeMap<IpAddr, String>,
    services: BTreeMap<SocketAddr, (String, Vec<SocketAddr>)>,
    definitions: BTreeMap<String, Service>,
    services_by_label: BTreeMap<u64, Vec<String>>,
    workloads_by_node: BTreeMap<String, Vec<String>>,
    workloads_by_label: BTreeMap<u64, Vec<String>>,
    policies: BTreeMap<String, Policy>,
    /// Workload to the keys of the policies that select it (deny, allow, audit).
    authz: BTreeMap<String, Vec<String>>,
}

/// The comparable form of `snap`; panics if its maps and indexes disagree.
pub(crate) fn canonical(snap: &Snapshot) -> Canonical {
    let mut ips = 0;
    for (key, w) in &snap.workloads {
        assert_eq!(**key, w.key(), "workload under the wrong key");
        for ip in &w.ips {
            let owner = snap.workloads_by_ip.get(ip).expect("address indexed");
            assert!(Arc::ptr_eq(owner, w), "{ip} indexed to a stale workload");
            ips += 1;
        }
    }
    assert_eq!(snap.workloads_by_ip.len(), ips, "addresses of no workload");
    let mut ports = 0;
    for (key, s) in &snap.index.services {
        assert_eq!(**key, s.key(), "service under the wrong key");
        for p in &s.ports {
            for vip in &s.vips {
                let port = snap
                    .services
                    .get(&SocketAddr::new(*vip, p.port))
                    .expect("service port");
                assert_eq!(port.service, **key);
                assert!(port.endpoints.is_sorted(), "{key}: endpoints not sorted");
                match s.explicit_endpoints(p.port) {
                    Some(explicit) => assert_eq!(port.endpoints, explicit, "{key}: endpoints"),
                    None => assert!(port.endpoints.iter().all(|e| e.port() == p.target_port)),
                }
                ports += 1;
            }
        }
    }
    assert_eq!(snap.services.len(), ports, "ports of no service");
    let current = |key: &Key, w: &Arc<Workload>, group: &dyn std::fmt::Debug| {
        let current = snap.workloads.get(key).expect("indexed workload exists");
        assert!(Arc::ptr_eq(current, w), "stale workload {key} in {group:?}");
        key.to_string()
    };
    let mut labels = 0;
    let workloads_by_label: BTreeMap<u64, Vec<String>> = snap
        .index
        .workloads_by_label
        .iter()
        .map(|(hash, members)| {
            assert!(members.len() > 0, "empty label {hash} kept");
            labels += members.len();
            let keys: Vec<String> = members.iter().map(|(k, w)| current(k, w, hash)).collect();
            assert!(keys.is_sorted(), "label {hash}: members not sorted");
            (*hash, keys)
        })
        .collect();
    let want_labels: usize = snap.workloads.values().map(|w| w.labels.len()).sum();
    assert_eq!(labels, want_labels, "labels indexed");
    let mut selectors = 0;
    let services_by_label: BTreeMap<u64, Vec<String>> = snap
        .index
        .services_by_label
        .iter()
        .map(|(hash, members)| {
            assert!(members.len() > 0, "empty selector label {hash} kept");
            selectors += members.len();
            let keys: Vec<String> = members
                .iter()
                .map(|(k, s)| {
                    let current = snap.index.services.get(k).expect("indexed service");
                    assert!(Arc::ptr_eq(current, s), "stale service {k} in {hash}");
                    k.to_string()
                })
                .collect();
            assert!(
                keys.is_sorted(),
                "selector label {hash}: members not sorted"
            );
            (*hash, keys)
        })
        .collect();
    let want_selectors: usize = snap.index.services.values().map(|s| s.selector.len()).sum();
    assert_eq!(selectors, want_selectors, "selector labels indexed");
    let by_namespace: usize = snap.policies_by_namespace.values().map(|p| p.len()).sum();
    assert_eq!(by_namespace, snap.policies.len(), "policies by namespace");
    // Each workload's selection is what selecting from scratch gives.
    let mut authz = BTreeMap::new();
    for (key, w) in &snap.workloads {
        let root = &*snap.root_namespace;
        let want = crate::policy::Selected::new(
            snap.policies
                .values()
                .filter(|p| crate::policy::selects(p, root, &w.namespace, &w.labels)),
        );
        let got = snap.authorization(key);
        if want.is_empty() {
            assert!(got.is_none(), "{key}: selection kept without policies");
            continue;
        }
        let got = got.unwrap_or_else(|| panic!("{key}: no selection"));
        assert_eq!(**got, want, "{key}: stale selection");
        for p in got.deny.iter().chain(&got.allow).chain(&got.audit) {
            let current = snap.policies.get(&p.key).expect("selected policy exists");
            assert!(Arc::ptr_eq(current, p), "{key}: stale policy {}", p.key);
        }
        let keys = [&got.deny, &got.allow, &got.audit]
            .into_iter()
            .flatten()
            .map(|p| p.key.to_string())
            .collect();
        authz.insert(key.to_string(), keys);
    }
    assert_eq!(authz.len(), snap.authz.len(), "selections of no workload");
    Canonical {
        namespaces: snap
            .namespaces
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        waypoints: snap
            .waypoints
            .iter()
            .map(|(k, v)| {
                assert!(
                    snap.namespaces.contains_key(k),
                    "waypoint of no namespace {k}"
                );
                (k.clone(), v.clone())
            })
            .collect(),
        workloads: snap
            .workloads
            .iter()
            .map(|(k, w)| (k.to_string(), Workload::clone(w)))
            .collect(),
        workloads_by_ip: snap
            .workloads_by_ip
            .iter()
            .map(|(ip, w)| (*ip, w.key()))
            .collect(),
        services: snap
            .services
            .iter()
            .map(|(vip, p)| (*vip, (p.service.clone(), p.endpoints.clone())))
            .collect(),
        definitions: snap
            .index
            .services
            .iter()
            .map(|(k, s)| (k.to_string(), Service::clone(s)))
            .collect(),
        services_by_label,
        workloads_by_node: snap
            .index
            .workloads_by_node
            .iter()
            .map(|(node, workloads)| {
                assert!(!workloads.is_empty(), "empty node {node} kept");
                let keys = workloads.iter().map(|(k, w)| current(k, w, node)).collect();
                (node.clone(), keys)
            })
            .collect(),
        workloads_by_label,
        policies: snap
            .policies
            .iter()
            .map(|(k, p)| (k.to_string(), Policy::clone(p)))
            .collect(),
        authz,
    }
}
