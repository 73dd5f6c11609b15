//! Building the next snapshot from the current one and a [`Changes`]: only the objects named
//! by the change and the service ports they affect are touched; every other entry is shared
//! with the current snapshot.
//!
//! Order: namespaces, then workloads, then services (so that new services select from the new
//! workloads), then the endpoints of the unchanged services that changed workloads join or
//! leave. Within each kind, removals (and the old versions of replaced objects) go before
//! insertions, so an address can move between objects in one change. Every rule is checked on
//! the way; the first broken one rejects the whole change and the current snapshot is
//! untouched (the work happens on a copy, which is O(1) with persistent maps).

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{
    validate, Applied, Changes, Error, Key, Kind, Namespace, Problem, Service, ServicePort,
    Snapshot, Workload,
};

/// Up to this many changed workloads in a namespace, the endpoints of a service they affect
/// are patched (the old versions' addresses out, the new ones' in); beyond, selected again.
/// (Small in tests, so that both ways are exercised.)
const PATCH_MAX: usize = if cfg!(test) { 2 } else { 32 };

/// A workload that changed: its version before and after the change (`None`: absent).
#[derive(Debug)]
pub(super) struct Moved {
    pub old: Option<Arc<Workload>>,
    pub new: Option<Arc<Workload>>,
}

fn invalid(kind: Kind, key: &str, problem: Problem) -> Error {
    Error::Invalid {
        kind,
        key: key.to_owned(),
        problem,
    }
}

impl Snapshot {
    /// The snapshot after `changes`, and what they really changed; or why they are invalid
    /// (nothing is applied then). Costs about the size of the change: a changed workload costs
    /// the services that share a label with it, a changed service the workloads of its
    /// namespace that have its selector's rarest label.
    pub fn apply(&self, changes: Changes) -> Result<(Snapshot, Applied), Error> {
        let Changes {
            namespaces,
            removed_namespaces,
            workloads,
            removed_workloads,
            services,
            removed_services,
            policies,
            removed_policies,
        } = changes;
        let mut next = self.clone();
        let mut applied = Applied::default();
        next.apply_namespaces(namespaces, &removed_namespaces, &mut applied)?;
        let moved = next.apply_workloads(workloads, &removed_workloads, &mut applied)?;
        let redone = next.apply_services(services, &removed_services, &mut applied)?;
        next.follow_workloads(&moved, &redone, &mut applied);
        next.apply_policies(policies, &removed_policies, &moved, &mut applied)?;
        Ok((next, applied))
    }

    fn apply_namespaces(
        &mut self,
        upserts: Vec<Namespace>,
        removals: &[String],
        applied: &mut Applied,
    ) -> Result<(), Error> {
        let mut seen = HashSet::with_capacity(upserts.len());
        for ns in &upserts {
            validate::namespace_name(&ns.name)
                .map_err(|p| invalid(Kind::Namespace, &ns.name, p))?;
            if let Some(waypoint) = &ns.waypoint {
                validate::waypoint_name(waypoint)
                    .map_err(|p| invalid(Kind::Namespace, &ns.name, p))?;
            }
            if !seen.insert(ns.name.as_str()) {
                return Err(invalid(Kind::Namespace, &ns.name, Problem::listed_twice()));
            }
        }
        let (before, waypoints_before) = (self.namespaces.clone(), self.waypoints.clone());
        let mut touched: HashSet<&str> = seen;
        for name in removals {
            self.namespaces.remove(name.as_str());
            self.waypoints.remove(name.as_str());
            touched.insert(name.as_str());
        }
        for ns in &upserts {
            self.namespaces.insert(ns.name.clone(), ns.enabled);
            match &ns.waypoint {
                Some(waypoint) => self.waypoints.insert(ns.name.clone(), waypoint.clone()),
                None => self.waypoints.remove(ns.name.as_str()),
            };
        }
        applied.namespaces += touched
            .iter()
            .filter(|name| {
                before.get(**name) != self.namespaces.get(**name)
                    || waypoints_before.get(**name) != self.waypoints.get(**name)
            })
            .count();
        Ok(())
    }

    fn apply_workloads(
        &mut self,
        upserts: Vec<Workload>,
        removals: &[String],
        applied: &mut Applied,
    ) -> Result<Vec<Moved>, Error> {
        let mut seen = HashSet::with_capacity(upserts.len());
        let mut new = Vec::with_capacity(upserts.len());
        for w in upserts {
            let key = w.key();
            validate::workload_name(&w).map_err(|p| invalid(Kind::Workload, &key, p))?;
            if !seen.insert(key.clone()) {
                return Err(invalid(Kind::Workload, &key, Problem::listed_twice()));
            }
            new.push((Key::from(key), Arc::new(w)));
        }
        // An upsert equal to the workload in place changes nothing.
        new.retain(|(key, w)| self.workloads.get(key).is_none_or(|old| old != w));
        let mut moved = Vec::with_capacity(new.len() + removals.len());
        for key in removals.iter().filter(|key| !seen.contains(*key)) {
            if let Some(old) = self.remove_workload(key) {
                moved.push(Moved {
                    old: Some(old),
                    new: None,
                });
            }
        }
        let mut replaced = StdHashMap::with_capacity(new.len());
        for (key, _) in &new {
            if let Some(old) = self.remove_workload(key) {
                replaced.insert(key.clone(), old);
            }
        }
        for (key, w) in new {
            let mut own = HashSet::with_capacity(w.ips.len());
            validate::workload(&w, |ip| {
                if !own.insert(ip) {
                    return Some(key.to_string());
                }
                self.workloads_by_ip.get(&ip).map(|other| other.key())
            })
            .map_err(|p| invalid(Kind::Workload, &key, p))?;
            self.insert_workload(key.clone(), w.clone());
            moved.push(Moved {
                old: replaced.remove(&key),
                new: Some(w),
            });
        }
        applied.workloads += moved.len();
        Ok(moved)
    }

    fn remove_workload(&mut self, key: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(key)?;
        for ip in &old.ips {
            self.workloads_by_ip.remove(ip);
        }
        self.index.remove_workload(key, &old);
        Some(old)
    }

    fn insert_workload(&mut self, key: Key, w: Arc<Workload>) {
        for ip in &w.ips {
            self.workloads_by_ip.insert(*ip, w.clone());
        }
        self.index.insert_workload(&key, &w);
        self.workloads.insert(key, w);
    }

    /// Removes, replaces and adds services; returns the keys of those removed or (re)built,
    /// whose endpoints are therefore already those of the new workloads.
    fn apply_services(
        &mut self,
        upserts: Vec<Service>,
        removals: &[String],
        applied: &mut Applied,
    ) -> Result<HashSet<Key>, Error> {
        let mut seen = HashSet::with_capacity(upserts.len());
        let mut new = Vec::with_capacity(upserts.len());
        for s in upserts {
            let key = s.key();
            if !seen.insert(key.clone()) {
                return Err(invalid(Kind::Service, &key, Problem::listed_twice()));
            }
            new.push((Key::from(key), Arc::new(s)));
        }
        new.retain(|(key, s)| self.index.services.get(key).is_none_or(|old| old != s));
        // The ports of removed and replaced services: a rebuilt port with the same endpoints is
        // kept as it is, one with new endpoints goes on from the old round-robin position.
        let mut old_ports = StdHashMap::new();
        let mut redone = HashSet::with_capacity(new.len() + removals.len());
        let keys = removals
            .iter()
            .map(String::as_str)
            .filter(|key| !seen.contains(*key))
            .chain(new.iter().map(|(key, _)| &**key));
        for key in keys {
            if let Some(key) = self.remove_service(key, &mut old_ports) {
                redone.insert(key);
            }
        }
        for (key, s) in new {
            let mut own = HashSet::new();
            validate::service(&s, |vip_port| {
                if !own.insert(vip_port) {
                    return Some(key.to_string());
                }
                self.services.get(&vip_port).map(|p| p.service.clone())
            })
            .map_err(|p| invalid(Kind::Service, &key, p))?;
            let ips = if s.endpoints.is_some() {
                Vec::new()
            } else {
                self.select(&s)
            };
            for p in &s.ports {
                let endpoints = s
                    .explicit_endpoints(p.port)
                    .unwrap_or_else(|| with_port(&ips, p.target_port));
                for vip in &s.vips {
                    let vip_port = SocketAddr::new(*vip, p.port);
                    let port = match old_ports.remove(&vip_port) {
                        Some(old) if old.service == *key && old.endpoints == endpoints => old,
                        Some(old) if old.service == *key => {
                            applied.service_ports += 1;
                            Arc::new(ServicePort::with_position(
                                key.to_string(),
                                endpoints.clone(),
                                old.position(),
                            ))
                        }
                        _ => {
                            applied.service_ports += 1;
                            Arc::new(ServicePort::new(key.to_string(), endpoints.clone()))
                        }
                    };
                    self.services.insert(vip_port, port);
                }
            }
            self.index.insert_service(&key, s);
            redone.insert(key);
        }
        applied.service_ports += old_ports.len();
        applied.services += redone.len();
        Ok(redone)
    }

    fn remove_service(
        &mut self,
        key: &str,
        old_ports: &mut StdHashMap<SocketAddr, Arc<ServicePort>>,
    ) -> Option<Key> {
        let (key, s) = self.index.remove_service(key)?;
        for p in &s.ports {
            for vip in &s.vips {
                let vip_port = SocketAddr::new(*vip, p.port);
                if let Some(port) = self.services.remove(&vip_port) {
                    old_ports.insert(vip_port, port);
                }
            }
        }
        Some(key)
    }

    /// The sorted addresses of the workloads `s` selects.
    fn select(&self, s: &Service) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .index
            .selected(s)
            .flat_map(|w| w.ips.iter().copied())
            .collect();
        ips.sort_unstable();
        ips
    }

    /// Updates the endpoints of the services not rebuilt by this change that a changed
    /// workload joins or leaves: the services whose selector matches its old or its new labels
    /// (found through the services' selector labels, then checked).
    fn follow_workloads(&mut self, moved: &[Moved], redone: &HashSet<Key>, applied: &mut Applied) {
        // Each affected service with the changes that may affect it, each change once.
        let mut affected: BTreeMap<Key, (Arc<Service>, Vec<&Moved>)> = BTreeMap::new();
        for m in moved {
            for w in m.old.iter().chain(m.new.iter()) {
                for (key, s) in self.index.services_with_labels_of(w) {
                    if redone.contains(key) {
                        continue;
                    }
                    let (_, moves) = affected
                        .entry(key.clone())
                        .or_insert_with(|| (s.clone(), Vec::new()));
                    if !moves.last().is_some_and(|last| std::ptr::eq(*last, m)) {
                        moves.push(m);
                    }
                }
            }
        }
        for (s, moves) in affected.into_values() {
            let selected =
                |w: &Option<Arc<Workload>>| w.as_ref().is_some_and(|w| s.selects_workload(w));
            let moves: Vec<&Moved> = moves
                .into_iter()
                .filter(|m| selected(&m.old) || selected(&m.new))
                .collect();
            if moves.is_empty() {
                continue;
            }
            // Patch the current endpoints, unless the change moves many workloads.
            let ips = if moves.len() > PATCH_MAX {
                self.select(&s)
            } else {
                let mut leaving = HashSet::new();
                let mut ips = Vec::new();
                for m in &moves {
                    if let Some(old) = m.old.as_ref().filter(|w| s.selects_workload(w)) {
                        leaving.extend(old.ips.iter().copied());
                    }
                    if let Some(new) = m.new.as_ref().filter(|w| s.selects_workload(w)) {
                        ips.extend(new.ips.iter().copied());
                    }
                }
                let current = self.current_ips(&s);
                ips.extend(current.into_iter().filter(|ip| !leaving.contains(ip)));
                ips.sort_unstable();
                ips
            };
            for p in &s.ports {
                let endpoints = with_port(&ips, p.target_port);
                for vip in &s.vips {
                    let vip_port = SocketAddr::new(*vip, p.port);
                    let Some(current) = self.services.get(&vip_port) else {
                        continue;
                    };
                    if current.endpoints != endpoints {
                        let port = ServicePort::with_position(
                            current.service.clone(),
                            endpoints.clone(),
                            current.position(),
                        );
                        self.services.insert(vip_port, Arc::new(port));
                        applied.service_ports += 1;
                    }
                }
            }
        }
    }

    /// The endpoint addresses of a service as they are (every port of a service has the same).
    fn current_ips(&self, s: &Service) -> Vec<IpAddr> {
        let first = s
            .ports
            .first()
            .zip(s.vips.first())
            .and_then(|(p, vip)| self.services.get(&SocketAddr::new(*vip, p.port)));
        first.map_or_else(Vec::new, |port| {
            port.endpoints.iter().map(SocketAddr::ip).collect()
        })
    }
}

/// Sorted addresses with a port: sorted endpoints.
fn with_port(ips: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
}
