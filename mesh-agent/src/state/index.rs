//! The indexes of a snapshot that only the update path reads: services by key and by the
//! labels of their selectors (the services a workload change may affect), workloads by node
//! (capture) and by label (endpoint selection).
//!
//! Label indexes are keyed by a hash of `(namespace, label, value)`: a collision only adds
//! candidates, and every candidate is checked (namespace and labels) anyway. A label shared by
//! few objects (the common case: `app=...`, or a per-pod label) is held in a small shared slice,
//! copied on change; only a label shared by many uses a persistent map, so that memory stays
//! near one entry per label value.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

use imbl::{HashMap, OrdMap};

use super::{Key, Service, Workload};

/// Up to this many members, a label's workloads are a sorted slice. (Small in tests, so that
/// both forms are exercised.)
const FEW: usize = if cfg!(test) { 4 } else { 32 };

/// The index part of a snapshot.
#[derive(Debug, Default, Clone)]
pub(super) struct Index {
    /// Service definitions by `namespace/name`.
    pub services: OrdMap<Key, Arc<Service>>,
    /// [`label_hash`] to the services whose selector has that label.
    pub services_by_label: HashMap<u64, Members<Service>>,
    /// Node to its workloads.
    pub workloads_by_node: HashMap<String, OrdMap<Key, Arc<Workload>>>,
    /// [`label_hash`] to the workloads with that label.
    pub workloads_by_label: HashMap<u64, Members<Workload>>,
}

/// The hash of one label of a namespace, the key of the label index.
pub(super) fn label_hash(namespace: &str, label: &str, value: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (namespace, label, value).hash(&mut h);
    h.finish()
}

/// The objects with one label, by key.
#[derive(Debug)]
pub(super) enum Members<V> {
    /// At most [`FEW`], sorted by key.
    Few(Arc<[(Key, Arc<V>)]>),
    /// More.
    Many(OrdMap<Key, Arc<V>>),
}

impl<V> Clone for Members<V> {
    fn clone(&self) -> Self {
        match self {
            Members::Few(few) => Members::Few(few.clone()),
            Members::Many(many) => Members::Many(many.clone()),
        }
    }
}

impl<V> Members<V> {
    pub fn len(&self) -> usize {
        match self {
            Members::Few(few) => few.len(),
            Members::Many(many) => many.len(),
        }
    }

    /// The members, by key.
    pub fn iter(&self) -> Box<dyn Iterator<Item = (&Key, &Arc<V>)> + '_> {
        match self {
            Members::Few(few) => Box::new(few.iter().map(|(k, v)| (k, v))),
            Members::Many(many) => Box::new(many.iter()),
        }
    }

    fn insert(&mut self, key: Key, value: Arc<V>) {
        match self {
            Members::Few(few) if few.len() < FEW => {
                let mut v = few.to_vec();
                match v.binary_search_by(|(k, _)| k.cmp(&key)) {
                    Ok(i) => v[i] = (key, value),
                    Err(i) => v.insert(i, (key, value)),
                }
                *few = v.into();
            }
            Members::Few(few) => {
                let mut many: OrdMap<Key, Arc<V>> = few.iter().cloned().collect();
                many.insert(key, value);
                *self = Members::Many(many);
            }
            Members::Many(many) => {
                many.insert(key, value);
            }
        }
    }

    fn remove(&mut self, key: &str) {
        match self {
            Members::Few(few) => {
                if few.iter().any(|(k, _)| **k == *key) {
                    *few = few.iter().filter(|(k, _)| **k != *key).cloned().collect();
                }
            }
            Members::Many(many) => {
                many.remove(key);
                if many.len() < FEW / 2 {
                    *self =
                        Members::Few(many.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
                }
            }
        }
    }
}

/// Adds `key` to the members of `hash`.
fn add<V>(index: &mut HashMap<u64, Members<V>>, hash: u64, key: &Key, value: &Arc<V>) {
    match index.get_mut(&hash) {
        Some(members) => members.insert(key.clone(), value.clone()),
        None => {
            index.insert(
                hash,
                Members::Few(Arc::from([(key.clone(), value.clone())])),
            );
        }
    }
}

/// Removes `key` from the members of `hash`, and `hash` once it has none.
fn forget<V>(index: &mut HashMap<u64, Members<V>>, hash: u64, key: &str) {
    if let Some(members) = index.get_mut(&hash) {
        members.remove(key);
        if members.len() == 0 {
            index.remove(&hash);
        }
    }
}

impl Index {
    /// Indexes a workload by node and labels.
    pub fn insert_workload(&mut self, key: &Key, w: &Arc<Workload>) {
        self.workloads_by_node
            .entry(w.node.clone())
            .or_default()
            .insert(key.clone(), w.clone());
        for (label, value) in &w.labels {
            let hash = label_hash(&w.namespace, label, value);
            add(&mut self.workloads_by_label, hash, key, w);
        }
    }

    /// Forgets a workload indexed by [`Index::insert_workload`].
    pub fn remove_workload(&mut self, key: &str, w: &Workload) {
        if let Some(members) = self.workloads_by_node.get_mut(&w.node) {
            members.remove(key);
            if members.is_empty() {
                self.workloads_by_node.remove(&w.node);
            }
        }
        for (label, value) in &w.labels {
            forget(
                &mut self.workloads_by_label,
                label_hash(&w.namespace, label, value),
                key,
            );
        }
    }

    /// Indexes a service.
    pub fn insert_service(&mut self, key: &Key, s: Arc<Service>) {
        for (label, value) in &s.selector {
            let hash = label_hash(&s.namespace, label, value);
            add(&mut self.services_by_label, hash, key, &s);
        }
        self.services.insert(key.clone(), s);
    }

    /// Forgets a service; returns its key and definition.
    pub fn remove_service(&mut self, key: &str) -> Option<(Key, Arc<Service>)> {
        let (key, s) = self.services.remove_with_key(key)?;
        for (label, value) in &s.selector {
            forget(
                &mut self.services_by_label,
                label_hash(&s.namespace, label, value),
                &key,
            );
        }
        Some((key, s))
    }

    /// The services whose selector has one of the labels of `w`: those a change of `w` may
    /// affect (to be checked with [`Service::selects_workload`]).
    pub fn services_with_labels_of<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = (&'a Key, &'a Arc<Service>)> + 'a {
        w.labels.iter().flat_map(move |(label, value)| {
            self.services_by_label
                .get(&label_hash(&w.namespace, label, value))
                .into_iter()
                .flat_map(Members::iter)
        })
    }

    /// The workloads `s` selects, by key: the candidates of its selector's rarest label,
    /// checked. Costs the number of workloads of the namespace with that label.
    pub fn selected<'a>(&'a self, s: &'a Service) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        (!s.selector.is_empty())
            .then(|| self.with_labels(&s.namespace, &s.selector))
            .into_iter()
            .flatten()
    }

    /// The workloads of `namespace` that have every label of a non-empty `selector`, found
    /// through its rarest label.
    pub fn with_labels<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        let mut rarest: Option<&Members<Workload>> = None;
        let mut none = selector.is_empty();
        for (label, value) in selector {
            match self
                .workloads_by_label
                .get(&label_hash(namespace, label, value))
            {
                Some(members) if rarest.is_none_or(|r| members.len() < r.len()) => {
                    rarest = Some(members);
                }
                Some(_) => {}
                None => none = true,
            }
        }
        rarest
            .filter(|_| !none)
            .into_iter()
            .flat_map(Members::iter)
            .map(|(_, w)| w)
            .filter(move |w| {
                w.namespace == namespace && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{Changes, PortMapping, Snapshot};

    fn workload(ns: &str, name: &str, ip: [u8; 4]) -> Workload {
        Workload {
            namespace: ns.into(),
            name: name.into(),
            service_account: "default".into(),
            node: "n1".into(),
            ips: vec![ip.into()],
            netns: format!("/run/netns/{name}").into(),
            cgroup: format!("/cg/{name}").into(),
            uid: None,
            labels: BTreeMap::from([("app".to_owned(), "x".to_owned())]),
            capture: Default::default(),
        }
    }

    fn service(ns: &str, vip: [u8; 4]) -> Service {
        Service {
            namespace: ns.into(),
            name: "s".into(),
            vips: vec![vip.into()],
            ports: vec![PortMapping {
                port: 80,
                target_port: 8080,
                protocol: Default::default(),
            }],
            selector: BTreeMap::from([("app".to_owned(), "x".to_owned())]),
            endpoints: None,
        }
    }

    /// Hash collisions (simulated: objects of namespace `b` filed under a label of `a`) only
    /// add candidates: neither selection nor the services a workload change reaches leave
    /// their namespace.
    #[test]
    fn label_hash_collisions_only_add_candidates() {
        let (snap, _) = Snapshot::default()
            .apply(Changes {
                workloads: vec![
                    workload("a", "wa", [10, 0, 0, 1]),
                    workload("b", "wb", [10, 0, 0, 2]),
                ],
                services: vec![service("a", [10, 96, 0, 1]), service("b", [10, 96, 0, 2])],
                ..Changes::default()
            })
            .expect("valid");
        let mut snap = snap;
        let collide = label_hash("a", "app", "x");
        let wb = snap.workloads.get("b/wb").cloned().expect("b/wb");
        add(
            &mut snap.index.workloads_by_label,
            collide,
            &Key::from("b/wb"),
            &wb,
        );
        let sb = snap.index.services.get("b/s").cloned().expect("b/s");
        add(
            &mut snap.index.services_by_label,
            collide,
            &Key::from("b/s"),
            &sb,
        );
        let sa = snap.index.services.get("a/s").cloned().expect("a/s");
        let selected: Vec<String> = snap.index.selected(&sa).map(|w| w.key()).collect();
        assert_eq!(selected, ["a/wa"]);
        // A new pod in `a` reaches b/s through the collision, which must not take it.
        let (next, _) = snap
            .apply(Changes {
                workloads: vec![workload("a", "wa2", [10, 0, 0, 3])],
                ..Changes::default()
            })
            .expect("valid");
        let endpoints = |vip: &str| {
            let vip: std::net::SocketAddr = vip.parse().expect("addr");
            next.services.get(&vip).expect("port").endpoints.clone()
        };
        assert_eq!(endpoints("10.96.0.1:80").len(), 2);
        assert_eq!(
            endpoints("10.96.0.2:80"),
            ["10.0.0.2:8080".parse().expect("addr")]
        );
    }
}
