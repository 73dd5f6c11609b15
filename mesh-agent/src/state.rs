//! The mesh state the data path reads: workloads, namespaces and services, held in an
//! immutable [`Snapshot`] that discovery replaces atomically. Readers never block writers.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::CaptureExclusions;

/// A pod (or any workload with an address) as the mesh knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace file.
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// The pod's own exclusions.
    pub capture: CaptureExclusions,
}

impl Workload {
    /// `namespace/name`, the workload's name in logs and metrics.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A service port: where connections to `vip:port` go.
#[derive(Debug)]
pub struct ServicePort {
    /// `namespace/name` of the service.
    pub service: String,
    /// Endpoint addresses with the target port.
    pub endpoints: Vec<SocketAddr>,
    /// Round-robin position.
    next: AtomicUsize,
}

impl ServicePort {
    pub fn new(service: String, endpoints: Vec<SocketAddr>) -> Self {
        Self {
            service,
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    /// The next endpoint in round-robin order, if any.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(self.endpoints[i])
    }
}

/// One consistent view of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Namespace name to whether capture is enabled.
    pub namespaces: HashMap<String, bool>,
    pub workloads: Vec<Arc<Workload>>,
    /// Every workload address to its workload.
    pub workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    pub services: HashMap<SocketAddr, Arc<ServicePort>>,
}

/// Where an outbound connection goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// A service port, resolved to one of its endpoints.
    Service {
        service: String,
        endpoint: SocketAddr,
    },
    /// A service port without endpoints.
    NoEndpoints { service: String },
    /// Not a service: the original destination as it is.
    Passthrough(SocketAddr),
}

impl Snapshot {
    /// Whether capture is enabled for a namespace (unknown namespaces are not).
    pub fn namespace_enabled(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).copied().unwrap_or(false)
    }

    /// The workloads of `node` in enabled namespaces: the pods the agent must capture.
    pub fn captured_on<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads
            .iter()
            .filter(move |w| w.node == node && self.namespace_enabled(&w.namespace))
    }

    /// The workload at `ip` if it is in the mesh (its namespace is enabled): traffic to it goes
    /// over HBONE.
    pub fn meshed_workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip
            .get(&ip)
            .filter(|w| self.namespace_enabled(&w.namespace))
    }

    /// Resolves an original destination.
    pub fn resolve(&self, orig: SocketAddr) -> Destination {
        match self.services.get(&orig) {
            Some(port) => match port.pick() {
                Some(endpoint) => Destination::Service {
                    service: port.service.clone(),
                    endpoint,
                },
                None => Destination::NoEndpoints {
                    service: port.service.clone(),
                },
            },
            None => Destination::Passthrough(orig),
        }
    }
}

/// The current snapshot plus change notification for the control path.
#[derive(Debug)]
pub struct Store {
    current: ArcSwap<Snapshot>,
    generation: watch::Sender<u64>,
}

impl Store {
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            generation: watch::channel(0).0,
        }
    }

    /// The current snapshot (cheap; never blocks).
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot and wakes subscribers.
    pub fn replace(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        self.generation.send_modify(|g| *g += 1);
    }

    /// A receiver that changes whenever the snapshot is replaced.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_over_endpoints() {
        let a: SocketAddr = "10.0.0.1:8080".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:8080".parse().expect("addr");
        let vip: SocketAddr = "10.96.0.1:80".parse().expect("addr");
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
        let other: SocketAddr = "10.0.0.9:5432".parse().expect("addr");
        assert_eq!(snap.resolve(other), Destination::Passthrough(other));
    }

    #[test]
    fn service_without_endpoints() {
        let vip: SocketAddr = "10.96.0.1:80".parse().expect("addr");
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
}
