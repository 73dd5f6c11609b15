//! Watch events into state changes: one task owns what the conversion needs to remember
//! between events (the Services and EndpointSlices a state service is made of, the pods that
//! are not workloads, the policies that are invalid, the keys each watcher has delivered) and
//! applies each event to the store as one incremental [`Changes`].
//!
//! A watcher that relists (after 410 Gone or a lost connection that cannot resume) delivers
//! `Init`, every object, then `InitDone`: objects are upserted as they come (the state in
//! force keeps serving meanwhile), and at `InitDone` the objects it did not deliver again are
//! removed (deleted while the watch was down).

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use ::kube::runtime::watcher::Event;
use k8s_openapi::api::core::v1::ObjectReference;
use tracing::{debug, info, warn};

use super::{
    convert::{PolicyObject, ServiceDef, SliceDef},
    watch::{Metrics, Object, Reporter},
    Error, PodState, Rules, Skip,
};
use crate::{
    discovery::policies,
    state::{self, Changes, Store},
};

/// The kinds watched, in the order of their watchers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    /// This node's pods, in full (a reflector for the node's pod lifecycle manager): the
    /// applier only follows its lists, for readiness.
    NodePod,
    Service,
    EndpointSlice,
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::NodePod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::AuthorizationPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NodePod => "NodePod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }
}

/// What the applier remembers.
#[derive(Debug)]
pub struct Applier {
    rules: Rules,
    store: Arc<Store>,
    metrics: Metrics,
    reporter: Reporter,
    /// Keys each watcher has delivered and not deleted.
    known: HashMap<Kind, HashSet<String>>,
    /// During a relist: the keys delivered since `Init`.
    relisting: HashMap<Kind, HashSet<String>>,
    /// Kinds that have finished their first list.
    synced: HashSet<Kind>,
    services: HashMap<String, ServiceDef>,
    slices: HashMap<String, SliceDef>,
    /// Service key to the keys of its slices.
    slices_of: HashMap<String, BTreeSet<String>>,
    /// Pods that are not workloads (logged and counted once each).
    skipped: HashSet<String>,
    /// Policies that are invalid now.
    invalid_policies: HashSet<String>,
    /// Objects that conflicted with the state (an address or VIP port another object had),
    /// tried again after each removal: the other object may have been the one leaving (a pod
    /// address reused while the old pod's deletion had not arrived, or during a relist).
    conflicts: HashMap<(Kind, String), Object>,
}

impl Applier {
    pub fn new(rules: Rules, store: Arc<Store>, metrics: Metrics, reporter: Reporter) -> Self {
        Self {
            rules,
            store,
            metrics,
            reporter,
            known: HashMap::new(),
            relisting: HashMap::new(),
            synced: HashSet::new(),
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            skipped: HashSet::new(),
            invalid_policies: HashSet::new(),
            conflicts: HashMap::new(),
        }
    }

    /// For a source without this node's pods (a waypoint): only the mesh-wide watchers count
    /// for readiness.
    pub fn without_node_pods(&mut self) {
        self.synced.insert(Kind::NodePod);
    }

    /// Whether every watcher has delivered its first full list.
    pub fn synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.synced.contains(k))
    }

    /// Handles one watch event of `kind`.
    pub fn handle(&mut self, kind: Kind, event: Event<Object>) {
        if kind == Kind::NodePod {
            // The reflector holds these; the state has them from the mesh-wide watch.
            match event {
                Event::Init => self.metrics.relist(kind),
                Event::InitDone => {
                    self.synced.insert(kind);
                }
                _ => {}
            }
            self.metrics.touched();
            return;
        }
        match event {
            Event::Init => {
                self.metrics.relist(kind);
                self.relisting.insert(kind, HashSet::new());
            }
            Event::InitApply(obj) => {
                let key = obj.key();
                self.relisting.entry(kind).or_default().insert(key);
                self.upsert(kind, obj);
            }
            Event::InitDone => {
                let seen = self.relisting.remove(&kind).unwrap_or_default();
                let gone: Vec<String> = self
                    .known
                    .get(&kind)
                    .into_iter()
                    .flatten()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.delete(kind, &key);
                }
                self.retry_conflicts();
                if self.synced.insert(kind) {
                    info!(
                        kind = kind.as_str(),
                        objects = seen.len(),
                        "first full list"
                    );
                }
            }
            Event::Apply(obj) => self.upsert(kind, obj),
            Event::Delete(obj) => {
                self.delete(kind, &obj.key());
                self.retry_conflicts();
            }
        }
        self.metrics.touched();
    }

    fn upsert(&mut self, kind: Kind, obj: Object) {
        let key = obj.key();
        self.known.entry(kind).or_default().insert(key.clone());
        self.conflicts.remove(&(kind, key.clone()));
        let reference = obj.reference();
        let kept = obj.clone();
        let changes = match self.changes_for(obj) {
            Ok(changes) => changes,
            Err(e) => return self.reject(kind, &e.to_string(), reference),
        };
        match self.store.apply(changes) {
            Ok(applied) => {
                if applied.workloads + applied.services + applied.namespaces > 0 {
                    // A pod that stopped being a workload, or a service that changed, may
                    // have freed what a conflicting object needs.
                    self.retry_conflicts();
                }
            }
            Err(e) => {
                // The object conflicts with the state: skipped until a removal frees what
                // it needs, or its next event.
                self.reject(kind, &format!("{}: {e}", obj_name(kind, &key)), reference);
                self.conflicts.insert((kind, key), kept);
            }
        }
    }

    /// Tries the conflicting objects again (each at most once per call).
    fn retry_conflicts(&mut self) {
        if self.conflicts.is_empty() {
            return;
        }
        let waiting: Vec<((Kind, String), Object)> = self.conflicts.drain().collect();
        for ((kind, _), obj) in waiting {
            self.upsert_quietly(kind, obj);
        }
    }

    /// [`Self::upsert`] without reporting a conflict again (it was reported when it arose).
    fn upsert_quietly(&mut self, kind: Kind, obj: Object) {
        let key = obj.key();
        let kept = obj.clone();
        let Ok(changes) = self.changes_for(obj) else {
            return;
        };
        match self.store.apply(changes) {
            Ok(_) => {
                info!(kind = kind.as_str(), object = %key, "object applied once what it conflicted with left")
            }
            Err(_) => {
                self.conflicts.insert((kind, key), kept);
            }
        }
    }

    /// The changes that put `obj` in force.
    fn changes_for(&mut self, obj: Object) -> Result<Changes, Error> {
        let mut changes = Changes::default();
        match obj {
            Object::Namespace(ns) => {
                changes
                    .namespaces
                    .push(state::Namespace::try_from((&*ns, &self.rules))?);
            }
            Object::Pod(pod) => {
                let key = Object::Pod(pod.clone()).key();
                match PodState::try_from((&*pod, &self.rules))? {
                    PodState::Workload(w) => {
                        self.skipped.remove(&key);
                        changes.workloads.push(*w);
                    }
                    PodState::Skipped(why) => {
                        if self.skipped.insert(key.clone()) {
                            // Every pod is without an address for a moment, and finishes: only
                            // the pods the mesh leaves out for good are worth an info line.
                            if matches!(why, Skip::HostNetwork | Skip::OptedOut) {
                                info!(pod = %key, reason = why.as_str(), "pod is not a workload of the mesh");
                            } else {
                                debug!(pod = %key, reason = why.as_str(), "pod is not a workload of the mesh");
                            }
                            self.metrics.skipped(why);
                        }
                        changes.removed_workloads.push(key);
                    }
                }
            }
            Object::Service(svc) => {
                let def = ServiceDef::try_from(&*svc)?;
                let key = def.key();
                self.services.insert(key.clone(), def);
                self.service_changes(&key, &mut changes);
            }
            Object::EndpointSlice(slice) => {
                let def = SliceDef::try_from(&*slice)?;
                let key = format!("{}/{}", def.namespace, def.name);
                let before = self.forget_slice(&key);
                let now = def.service_key();
                if let Some(service) = &now {
                    self.slices_of
                        .entry(service.clone())
                        .or_default()
                        .insert(key.clone());
                }
                self.slices.insert(key, def);
                for service in before.into_iter().chain(now).collect::<BTreeSet<_>>() {
                    self.service_changes(&service, &mut changes);
                }
            }
            Object::Policy(obj) => {
                let PolicyObject { key, policy } = PolicyObject::try_from(&*obj)?;
                match policy {
                    Ok(p) => {
                        self.invalid_policies.remove(&key);
                        changes.policies.push(p);
                    }
                    Err(invalid) => {
                        self.invalid_policies.insert(key);
                        let (in_force, rejections) =
                            policies::settle(&self.store.load(), vec![invalid]);
                        policies::count(&rejections, self.metrics.agent());
                        changes
                            .policies
                            .extend(in_force.into_iter().map(|(_, p)| p));
                    }
                }
                self.metrics.policies_invalid(self.invalid_policies.len());
            }
        }
        Ok(changes)
    }

    /// Removes slice `key`; returns the service it belonged to.
    fn forget_slice(&mut self, key: &str) -> Option<String> {
        let old = self.slices.remove(key)?;
        let service = old.service_key()?;
        if let Some(set) = self.slices_of.get_mut(&service) {
            set.remove(key);
            if set.is_empty() {
                self.slices_of.remove(&service);
            }
        }
        Some(service)
    }

    /// The change that brings state service `key` up to date with its definition and slices.
    fn service_changes(&self, key: &str, changes: &mut Changes) {
        let state = self.services.get(key).and_then(|def| {
            let slices = self
                .slices_of
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|k| self.slices.get(k));
            def.to_state(slices)
        });
        match state {
            Some(s) => changes.services.push(s),
            None => changes.removed_services.push(key.to_owned()),
        }
    }

    fn delete(&mut self, kind: Kind, key: &str) {
        if let Some(known) = self.known.get_mut(&kind) {
            known.remove(key);
        }
        self.conflicts.remove(&(kind, key.to_owned()));
        let mut changes = Changes::default();
        match kind {
            Kind::Namespace => changes.removed_namespaces.push(key.to_owned()),
            Kind::Pod => {
                self.skipped.remove(key);
                changes.removed_workloads.push(key.to_owned());
            }
            Kind::NodePod => return,
            Kind::Service => {
                self.services.remove(key);
                changes.removed_services.push(key.to_owned());
            }
            Kind::EndpointSlice => {
                if let Some(service) = self.forget_slice(key) {
                    self.service_changes(&service, &mut changes);
                }
            }
            Kind::AuthorizationPolicy => {
                self.invalid_policies.remove(key);
                self.metrics.policies_invalid(self.invalid_policies.len());
                changes.removed_policies.push(key.to_owned());
            }
        }
        if let Err(e) = self.store.apply(changes) {
            warn!(kind = kind.as_str(), object = key, error = %e, "removal not applied");
        }
    }

    /// Logs, counts and reports (as a Kubernetes Event, best effort) an object the mesh
    /// cannot take; the watcher goes on.
    fn reject(&self, kind: Kind, message: &str, reference: ObjectReference) {
        warn!(kind = kind.as_str(), "object skipped: {message}");
        self.metrics.rejected(kind);
        self.reporter.report(message, reference);
    }
}

fn obj_name(kind: Kind, key: &str) -> String {
    format!("{} {key}", kind.as_str())
}
