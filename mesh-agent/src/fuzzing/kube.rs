//! The `kube_objects` target: Kubernetes objects as the API server delivers them, through the
//! Kubernetes source's conversion (`discovery::kube::convert`) into the state.
//!
//! Input: one byte choosing the kind (`0` Namespace, `1` Pod, `2` Service, `3` EndpointSlice,
//! `4` AuthorizationPolicy; the rest modulo 5), one byte of options (bit 0: accept
//! `istio.io/dataplane-mode=ambient`), then the object as JSON.
//!
//! Checked: nothing panics; an error names the object's kind and a field; whatever the
//! conversion accepts, the state accepts on its own (the conversion's rules are at least the
//! store's): a namespace, a workload, a service with no slices, a service built around a
//! slice, a valid policy or the stand-in of an invalid one.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{
    core::v1::{Namespace as KubeNamespace, Pod, Service as KubeService},
    discovery::v1::EndpointSlice,
};
use kube::api::DynamicObject;
use serde::de::DeserializeOwned;

use crate::{
    discovery::{
        kube::{
            convert::ServicePortDef, Error, PodState, PolicyObject, Rules, ServiceDef, SliceDef,
        },
        policies,
    },
    state::{self, Changes, Snapshot},
};

/// The `kube_objects` target.
pub fn kube_objects(input: &[u8]) {
    let [kind, options, json @ ..] = input else {
        return;
    };
    let rules = Rules {
        istio_ambient: options & 1 == 1,
        ..Rules::default()
    };
    match kind % 5 {
        0 => namespace(json, &rules),
        1 => pod(json, &rules),
        2 => service(json),
        3 => slice(json),
        _ => policy(json),
    }
}

fn parse<T: DeserializeOwned>(json: &[u8]) -> Option<T> {
    serde_json::from_slice(json).ok()
}

/// Applies `changes` to an empty state: the conversion's output must be valid on its own.
fn accepted(changes: Changes, what: &str) {
    if let Err(e) = Snapshot::default().apply(changes) {
        panic!("the state refuses a converted {what}: {e}");
    }
}

/// An error of the conversion names the kind and a field.
fn named(e: &Error, kind: &str) {
    let Error::Invalid { object, field, .. } = e else {
        panic!("a conversion error that is not about the object: {e}");
    };
    assert_eq!(object.kind, kind, "{e}");
    assert!(!field.is_empty(), "no field in {e}");
    assert!(e.to_string().starts_with(kind), "{e}");
}

fn namespace(json: &[u8], rules: &Rules) {
    let Some(ns) = parse::<KubeNamespace>(json) else {
        return;
    };
    match state::Namespace::try_from((&ns, rules)) {
        Ok(ns) => accepted(
            Changes {
                namespaces: vec![ns],
                ..Changes::default()
            },
            "namespace",
        ),
        Err(e) => named(&e, "Namespace"),
    }
}

fn pod(json: &[u8], rules: &Rules) {
    let Some(pod) = parse::<Pod>(json) else {
        return;
    };
    match PodState::try_from((&pod, rules)) {
        Ok(PodState::Workload(w)) => accepted(
            Changes {
                workloads: vec![*w],
                ..Changes::default()
            },
            "pod",
        ),
        Ok(PodState::Skipped(_)) => {}
        Err(e) => named(&e, "Pod"),
    }
}

fn service(json: &[u8]) {
    let Some(svc) = parse::<KubeService>(json) else {
        return;
    };
    match ServiceDef::try_from(&svc) {
        Ok(def) => {
            if let Some(s) = def.to_state([]) {
                accepted(
                    Changes {
                        services: vec![s],
                        ..Changes::default()
                    },
                    "service",
                );
            }
        }
        Err(e) => named(&e, "Service"),
    }
}

fn slice(json: &[u8]) {
    let Some(slice) = parse::<EndpointSlice>(json) else {
        return;
    };
    match SliceDef::try_from(&slice) {
        Ok(def) => {
            // A service whose ports are the slice's port names, each once.
            let mut names: Vec<&String> = def.ports.iter().map(|(name, _)| name).collect();
            names.sort_unstable();
            names.dedup();
            let ports = (1..)
                .zip(names)
                .map(|(port, name)| ServicePortDef {
                    name: name.clone(),
                    port,
                    target_port: port,
                    protocol: Default::default(),
                })
                .collect();
            let service = ServiceDef {
                namespace: "ns".into(),
                name: "svc".into(),
                vips: vec![IpAddr::from([10, 96, 0, 1])],
                ports,
            };
            if let Some(s) = service.to_state([&def]) {
                let listed: usize = s
                    .endpoints
                    .iter()
                    .flat_map(BTreeMap::values)
                    .map(Vec::len)
                    .sum();
                assert!(
                    listed <= def.ready.len() * def.ports.len(),
                    "endpoints out of nowhere"
                );
                accepted(
                    Changes {
                        services: vec![s],
                        ..Changes::default()
                    },
                    "service with the slice",
                );
            }
        }
        Err(e) => named(&e, "EndpointSlice"),
    }
}

fn policy(json: &[u8]) {
    let Some(obj) = parse::<DynamicObject>(json) else {
        return;
    };
    match PolicyObject::try_from(&obj) {
        Ok(PolicyObject { policy: Ok(p), .. }) => accepted(
            Changes {
                policies: vec![p],
                ..Changes::default()
            },
            "policy",
        ),
        Ok(PolicyObject {
            policy: Err(invalid),
            ..
        }) => {
            let (in_force, _) = policies::settle(&Snapshot::default(), vec![invalid]);
            accepted(
                Changes {
                    policies: in_force.into_iter().map(|(_, p)| p).collect(),
                    ..Changes::default()
                },
                "stand-in of an invalid policy",
            );
        }
        Err(e) => named(&e, "AuthorizationPolicy"),
    }
}
