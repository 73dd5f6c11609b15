//! Authorization policies in the snapshot: the policies by key and by namespace, and for each
//! workload the policies that select it ([`Selected`]), recomputed when a change touches them
//! so that a decision reads one entry, whatever the size of the mesh.
//!
//! Policies bound with `targetRefs` select no workload: the waypoint asks for them per request
//! ([`Snapshot::service_policies`]), a scan of the namespace's policies.
//!
//! What a change recomputes: the workloads it changes, and the workloads that a changed
//! policy selects before or after the change: through the label index for a selector, the
//! whole namespace for an empty one, every workload for a policy of the root namespace (which
//! selects in every namespace). A workload whose selection is the same policies as before keeps
//! its entry (pointer-equal), which is how the proxy knows that its connections need no new
//! decision.

use std::{
    collections::{BTreeSet, HashSet},
    ops::Bound,
    sync::Arc,
};

use super::{apply::Moved, Applied, Error, Key, Kind, Problem, Snapshot, Workload};
use crate::policy::{self, Policy, Selected, TargetRef};

impl Snapshot {
    /// The policies that select the workload `namespace/name`; `None` when none does.
    pub fn authorization(&self, workload: &str) -> Option<&Arc<Selected>> {
        self.authz.get(workload)
    }

    /// The policies the waypoint applies to a request for the service `namespace/service`:
    /// those of the namespace bound with `targetRefs` to that Service, or to the namespace's
    /// waypoint (a Gateway named as [`Snapshot::waypoint_of`] says). Policies with a selector,
    /// and those of the root namespace bound elsewhere, are not among them. Costs a scan of the
    /// namespace's policies.
    pub fn service_policies(&self, namespace: &str, service: &str) -> Selected {
        let waypoint = self.waypoint_of(namespace);
        let applies = |p: &&Arc<Policy>| {
            p.targets.iter().any(|t| match t {
                TargetRef::Service(name) => name == service,
                TargetRef::Gateway(name) => Some(name.as_str()) == waypoint,
                TargetRef::Unreadable => true,
            })
        };
        let policies = self.policies_by_namespace.get(namespace);
        Selected::new(
            policies
                .into_iter()
                .flat_map(|p| p.values())
                .filter(applies),
        )
    }

    /// The policy `namespace/name`.
    pub fn policy(&self, key: &str) -> Option<&Arc<Policy>> {
        self.policies.get(key)
    }

    /// The root namespace: its policies apply in every namespace.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Removes and adds policies, then recomputes the selections that the change and the
    /// workloads in `moved` (old and new versions) affect.
    pub(super) fn apply_policies(
        &mut self,
        upserts: Vec<Policy>,
        removals: &[String],
        moved: &[Moved],
        applied: &mut Applied,
    ) -> Result<(), Error> {
        let mut seen = HashSet::with_capacity(upserts.len());
        let mut new = Vec::with_capacity(upserts.len());
        for p in upserts {
            let key = format!("{}/{}", p.namespace, p.name);
            if p.name.is_empty() || p.namespace.is_empty() {
                return Err(Error::Invalid {
                    kind: Kind::Policy,
                    key,
                    problem: Problem::whole("name and namespace must not be empty"),
                });
            }
            if *p.key != *key {
                return Err(Error::Invalid {
                    kind: Kind::Policy,
                    key,
                    problem: Problem::whole("its key is not namespace/name"),
                });
            }
            if !seen.insert(key.clone()) {
                return Err(Error::Invalid {
                    kind: Kind::Policy,
                    key,
                    problem: Problem::listed_twice(),
                });
            }
            new.push((Key::from(key), Arc::new(p)));
        }
        new.retain(|(key, p)| self.policies.get(key).is_none_or(|old| old != p));
        // The policies whose old or new version changes: what they select is selected again.
        let mut changed: Vec<Arc<Policy>> = Vec::new();
        for key in removals.iter().filter(|k| !seen.contains(*k)) {
            if let Some(old) = self.remove_policy(key) {
                changed.push(old);
                applied.policies += 1;
            }
        }
        for (key, p) in new {
            if let Some(old) = self.remove_policy(&key) {
                changed.push(old);
            }
            changed.push(p.clone());
            self.policies_by_namespace
                .entry(p.namespace.clone())
                .or_default()
                .insert(key.clone(), p.clone());
            self.policies.insert(key, p);
            applied.policies += 1;
        }
        // Policies bound with targetRefs select no workload, before or after.
        changed.retain(|p| p.targets.is_empty());
        let mut again: Vec<Arc<Workload>> = Vec::new();
        if changed.iter().any(|p| p.namespace == *self.root_namespace) {
            again.extend(self.workloads.values().cloned());
        } else {
            let mut whole = BTreeSet::new();
            for p in &changed {
                if p.selector.is_empty() {
                    whole.insert(p.namespace.as_str());
                } else {
                    let selected = self.index.with_labels(&p.namespace, &p.selector);
                    again.extend(selected.cloned());
                }
            }
            for ns in whole {
                let from = format!("{ns}/");
                // `0` follows `/`: the range holds exactly the keys `ns/...`.
                let to = format!("{ns}0");
                let range = (Bound::Included(from.as_str()), Bound::Excluded(to.as_str()));
                let all = self.workloads.range::<_, str>(range);
                again.extend(all.map(|(_, w)| w.clone()));
            }
            again.extend(moved.iter().filter_map(|m| m.new.clone()));
        }
        for m in moved {
            if let (Some(old), None) = (&m.old, &m.new) {
                if self.authz.remove(old.key().as_str()).is_some() {
                    applied.authz += 1;
                }
            }
        }
        let mut done = HashSet::with_capacity(again.len());
        for w in again {
            let key = Key::from(w.key());
            if done.insert(key.clone()) {
                self.select_policies(key, &w, applied);
            }
        }
        Ok(())
    }

    fn remove_policy(&mut self, key: &str) -> Option<Arc<Policy>> {
        let old = self.policies.remove(key)?;
        if let Some(ns) = self.policies_by_namespace.get_mut(&old.namespace) {
            ns.remove(key);
            if ns.is_empty() {
                self.policies_by_namespace.remove(&old.namespace);
            }
        }
        Some(old)
    }

    /// Recomputes the selection of one workload; keeps the entry in place when it holds the
    /// same policies.
    fn select_policies(&mut self, key: Key, w: &Workload, applied: &mut Applied) {
        let root = &*self.root_namespace;
        let candidates = [root, w.namespace.as_str()]
            .into_iter()
            .enumerate()
            // The root namespace's own workloads: its policies once.
            .filter(|(i, ns)| *i == 0 || *ns != root)
            .filter_map(|(_, ns)| self.policies_by_namespace.get(ns))
            .flat_map(|policies| policies.values())
            .filter(|p| policy::selects(p, root, &w.namespace, &w.labels));
        let selected = Selected::new(candidates);
        let current = self.authz.get(&key);
        if selected.is_empty() {
            if current.is_some() {
                self.authz.remove(&key);
                applied.authz += 1;
            }
        } else if current.is_none_or(|c| !c.same(&selected)) {
            self.authz.insert(key, Arc::new(selected));
            applied.authz += 1;
        }
    }
}
