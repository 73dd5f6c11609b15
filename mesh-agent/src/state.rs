//! The mesh state the data path reads: namespaces, workloads and services, held in an
//! immutable [`Snapshot`] that the control path replaces atomically. Readers never block
//! writers.
//!
//! A snapshot is made of persistent maps (`imbl`): [`Snapshot::apply`] builds the next snapshot
//! from the current one by changing only what a [`Changes`] names, sharing every other entry, so
//! an update costs about what it changes, not the size of the mesh. Private indexes keep each
//! step small: workloads by label (endpoint selection), by node (capture), and services by
//! namespace (the services a workload change may affect).

mod apply;
pub mod bench;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod canonical;
mod index;
pub mod metrics;
mod policies;
#[cfg(test)]
pub(crate) mod tests;
pub mod validate;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use arc_swap::ArcSwap;
use imbl::{HashMap, OrdMap};
use index::Index;
use tokio::sync::watch;
pub use validate::Problem;

use crate::{
    config::CaptureExclusions,
    policy::{Policy, Selected},
};

/// `namespace/name`: how workloads and services are keyed.
pub type Key = Arc<str>;

/// A namespace, whether the mesh captures its pods, and its waypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// Capture the pods of this namespace.
    pub enabled: bool,
    /// The namespace's waypoint (its L7 proxy): the name of the service of this namespace
    /// whose endpoints are the waypoint's pods (HBONE on port 15008). Connections to the
    /// namespace's services go through it.
    pub waypoint: Option<String>,
}

/// A pod (or any workload with an address) as the mesh knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace file; empty when the node finds it itself (from the CNI
    /// plugin, or from a process of the pod: `pods::sandbox`).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory; empty when the node finds it itself (from `uid`, under
    /// the kubelet's cgroup layouts).
    pub cgroup: PathBuf,
    /// The pod's UID (Kubernetes `metadata.uid`): how the node finds the pod's cgroup and
    /// network namespace when `netns` and `cgroup` are not given.
    pub uid: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The pod's own exclusions.
    pub capture: CaptureExclusions,
}

/// The pod label that says what a workload is to the mesh; with [`ROLE_WAYPOINT`] it is a pod
/// of a waypoint: a workload of the mesh (its address, its identity) that terminates and
/// originates HBONE itself, so it is never captured.
pub const ROLE_LABEL: &str = "mesh-agent/role";
/// [`ROLE_LABEL`]'s value for a waypoint's pods.
pub const ROLE_WAYPOINT: &str = "waypoint";

impl Workload {
    /// `namespace/name`, the workload's name in logs and metrics.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Istio's canonical service of the workload, as its metrics and Kiali's app graph name
    /// it: the label `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else
    /// `app`, else the workload's name.
    pub fn canonical_service(&self) -> &str {
        [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|k| self.labels.get(*k))
        .map_or(self.name.as_str(), String::as_str)
    }

    /// Istio's canonical revision of the workload: the label
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else `version`,
    /// else `latest`.
    pub fn canonical_revision(&self) -> &str {
        [
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]
        .iter()
        .find_map(|k| self.labels.get(*k))
        .map_or("latest", String::as_str)
    }

    /// Whether this is a pod of a waypoint ([`ROLE_LABEL`]): never captured.
    pub fn is_waypoint(&self) -> bool {
        self.labels.get(ROLE_LABEL).map(String::as_str) == Some(ROLE_WAYPOINT)
    }
}

/// A service's host name, as Kubernetes' DNS and Istio's metrics (`destination_service`) name it.
pub fn service_host(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.cluster.local")
}

/// A service: virtual addresses whose ports lead to the workloads its selector picks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortMapping>,
    /// Endpoints: the workloads of the service's namespace with all these labels. An empty
    /// selector selects nothing (as a Kubernetes Service without selector).
    pub selector: BTreeMap<String, String>,
    /// Endpoints given explicitly instead of selected, by service `port` (a port not listed
    /// has none): the Kubernetes source's, from the service's EndpointSlices. The selector of
    /// such a service must be empty. `None`: endpoints come from the selector (the state file).
    pub endpoints: Option<BTreeMap<u16, Vec<SocketAddr>>>,
}

impl Service {
    /// `namespace/name`, the service's name in logs and metrics.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The endpoints of service port `port` when they are explicit: sorted, without
    /// duplicates.
    pub fn explicit_endpoints(&self, port: u16) -> Option<Vec<SocketAddr>> {
        self.endpoints.as_ref().map(|by_port| {
            let mut endpoints = by_port.get(&port).cloned().unwrap_or_default();
            endpoints.sort_unstable();
            endpoints.dedup();
            endpoints
        })
    }

    /// Whether the service selects a workload with these labels (in its namespace).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.selector.is_empty() && self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Whether the service selects `w`: same namespace, all the selector's labels.
    pub fn selects_workload(&self, w: &Workload) -> bool {
        w.namespace == self.namespace && self.selects(&w.labels)
    }
}

/// One port of a service and the workload port it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub port: u16,
    pub target_port: u16,
    /// What the service declares the port speaks (a waypoint takes it over sniffing).
    pub protocol: Protocol,
}

/// A service port's declared protocol: Kubernetes' `appProtocol`, or Istio's port name
/// convention (`http-web`, `grpc`, `tcp-db`); the state file's `protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Not declared: a waypoint tells from the first bytes.
    #[default]
    Unspecified,
    /// HTTP (HTTP/1.1, or HTTP/2 with prior knowledge, told by the preface).
    Http,
    /// HTTP/2 with prior knowledge (`kubernetes.io/h2c`, `http2`, `grpc`).
    Http2,
    /// Not HTTP: proxied as bytes, without waiting for the client to speak.
    Tcp,
}

impl Protocol {
    /// From a Service port's `appProtocol` (which wins) or `name`.
    pub fn declared(app_protocol: Option<&str>, name: &str) -> Protocol {
        let by = |p: &str| match p.to_ascii_lowercase().as_str() {
            "http" | "https-insecure" => Some(Protocol::Http),
            "http2" | "h2c" | "kubernetes.io/h2c" | "grpc" | "grpc-web" => Some(Protocol::Http2),
            "tcp" | "mysql" | "mongo" | "redis" | "tls" | "https" | "kubernetes.io/ws" => {
                Some(Protocol::Tcp)
            }
            _ => None,
        };
        if let Some(p) = app_protocol.and_then(by) {
            return p;
        }
        // Istio's convention: `<protocol>[-<suffix>]`.
        let prefix = name.split('-').next().unwrap_or("");
        by(prefix).unwrap_or_default()
    }
}

/// A service port: where connections to `vip:port` go.
#[derive(Debug)]
pub struct ServicePort {
    /// `namespace/name` of the service.
    pub service: String,
    /// Endpoint addresses with the target port, sorted.
    pub endpoints: Vec<SocketAddr>,
    /// Round-robin position.
    next: AtomicUsize,
}

impl ServicePort {
    /// A service port whose round robin starts at the first endpoint.
    pub fn new(service: String, endpoints: Vec<SocketAddr>) -> Self {
        Self::with_position(service, endpoints, 0)
    }

    /// A service port whose round robin goes on from `position` (that of the port it replaces,
    /// so that an update does not send every agent's next connection to the first endpoint).
    fn with_position(service: String, endpoints: Vec<SocketAddr>, position: usize) -> Self {
        Self {
            service,
            endpoints,
            next: AtomicUsize::new(position),
        }
    }

    /// The round-robin position (the count of picks so far, for a port never replaced).
    fn position(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    /// The next endpoint in round-robin order, if any.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(self.endpoints[i])
    }

    /// The endpoint [`ServicePort::pick`] would give next, without taking it (an inspection
    /// must not move the round robin).
    pub fn peek(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        Some(self.endpoints[self.position() % self.endpoints.len()])
    }
}

/// Adds, changes and removals of objects, applied together or not at all. Removals are applied
/// before upserts, so a change may move an address or a VIP port from one object to another.
/// An upsert equal to the object in place is not a change.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Namespaces added or changed.
    pub namespaces: Vec<Namespace>,
    /// Namespaces removed, by name.
    pub removed_namespaces: Vec<String>,
    /// Workloads added or changed.
    pub workloads: Vec<Workload>,
    /// Workloads removed, by `namespace/name`.
    pub removed_workloads: Vec<String>,
    /// Services added or changed.
    pub services: Vec<Service>,
    /// Services removed, by `namespace/name`.
    pub removed_services: Vec<String>,
    /// Authorization policies added or changed.
    pub policies: Vec<Policy>,
    /// Policies removed, by `namespace/name`.
    pub removed_policies: Vec<String>,
}

/// What an applied [`Changes`] really changed (upserts equal to the object in place and
/// removals of unknown objects do not count).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Namespaces added, changed or removed.
    pub namespaces: usize,
    /// Workloads added, changed or removed.
    pub workloads: usize,
    /// Services added, changed or removed.
    pub services: usize,
    /// `vip:port` entries created, replaced (new endpoints) or removed.
    pub service_ports: usize,
    /// Policies added, changed or removed.
    pub policies: usize,
    /// Workloads whose set of selecting policies changed.
    pub authz: usize,
}

impl Applied {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The kind of an object of the state, in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Namespace,
    Workload,
    Service,
    Policy,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Namespace => "namespace",
            Kind::Workload => "workload",
            Kind::Service => "service",
            Kind::Policy => "policy",
        })
    }
}

/// Errors of the state: a change that breaks a rule. Nothing of such a change is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An object of the change is invalid or conflicts with another object.
    #[error("{kind} ({key}){problem}")]
    Invalid {
        kind: Kind,
        /// `namespace/name` (the name for a namespace).
        key: String,
        problem: Problem,
    },
}

/// One consistent view of the mesh.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Namespace name to whether capture is enabled.
    pub namespaces: HashMap<String, bool>,
    /// Namespace name to its waypoint's service name (namespaces with a waypoint only).
    waypoints: HashMap<String, String>,
    /// Workloads by `namespace/name`.
    pub workloads: OrdMap<Key, Arc<Workload>>,
    /// Every workload address to its workload.
    pub workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Every `vip:port` of every service.
    pub services: HashMap<SocketAddr, Arc<ServicePort>>,
    /// Authorization policies by `namespace/name`.
    pub policies: OrdMap<Key, Arc<Policy>>,
    /// Policies by namespace.
    policies_by_namespace: HashMap<String, OrdMap<Key, Arc<Policy>>>,
    /// Workload `namespace/name` to the policies that select it (absent: none).
    authz: HashMap<Key, Arc<Selected>>,
    root_namespace: RootNamespace,
    index: Index,
}

/// The namespace whose policies apply mesh-wide (`policy.root_namespace` of the agent).
#[derive(Debug, Clone)]
struct RootNamespace(Arc<str>);

/// The root namespace when none is configured.
pub const DEFAULT_ROOT_NAMESPACE: &str = "mesh-system";

impl Default for RootNamespace {
    fn default() -> Self {
        RootNamespace(Arc::from(DEFAULT_ROOT_NAMESPACE))
    }
}

impl std::ops::Deref for RootNamespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
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
    /// An empty snapshot whose root namespace (policies that apply mesh-wide) is `root`.
    pub fn with_root_namespace(root: &str) -> Self {
        Snapshot {
            root_namespace: RootNamespace(Arc::from(root)),
            ..Snapshot::default()
        }
    }

    /// Whether capture is enabled for a namespace (unknown namespaces are not).
    pub fn namespace_enabled(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).copied().unwrap_or(false)
    }

    /// The name of `namespace`'s waypoint service, if it has one.
    pub fn waypoint_of(&self, namespace: &str) -> Option<&str> {
        self.waypoints.get(namespace).map(String::as_str)
    }

    /// The workloads of `node` in enabled namespaces, by key: the pods the agent must capture
    /// (a waypoint's pods speak HBONE themselves and are not among them). Costs the number of
    /// workloads of the node, not of the mesh.
    pub fn captured_on<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.index
            .workloads_by_node
            .get(node)
            .into_iter()
            .flat_map(|workloads| workloads.values())
            .filter(move |w| self.namespace_enabled(&w.namespace) && !w.is_waypoint())
    }

    /// The workload at `ip` if it is in the mesh (its namespace is enabled): traffic to it goes
    /// over HBONE.
    pub fn meshed_workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip
            .get(&ip)
            .filter(|w| self.namespace_enabled(&w.namespace))
    }

    /// The service `namespace/name`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.index.services.get(key)
    }

    /// Every service, by key.
    pub fn service_definitions(&self) -> impl Iterator<Item = (&Key, &Arc<Service>)> {
        self.index.services.iter()
    }

    /// Resolves an original destination (a service port: its next endpoint, taken).
    pub fn resolve(&self, orig: SocketAddr) -> Destination {
        self.resolve_with(orig, ServicePort::pick)
    }

    /// [`Snapshot::resolve`] without taking the endpoint (`ServicePort::peek`): for an
    /// inspection.
    pub fn resolve_peek(&self, orig: SocketAddr) -> Destination {
        self.resolve_with(orig, ServicePort::peek)
    }

    fn resolve_with(
        &self,
        orig: SocketAddr,
        pick: fn(&ServicePort) -> Option<SocketAddr>,
    ) -> Destination {
        match self.services.get(&orig) {
            Some(port) => match pick(port) {
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

impl Snapshot {
    /// Whether a workload of `id`'s namespace with its service account runs on `node`.
    pub fn places(&self, node: &str, id: &crate::identity::SpiffeId) -> bool {
        let prefix = format!("{}/", id.namespace);
        self.workloads
            .range::<_, str>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.starts_with(&prefix))
            .any(|(_, w)| w.node == node && w.service_account == id.service_account)
    }
}

/// A node may issue the identities of the workloads the state places on it now, or placed
/// there within [`PLACEMENT_GRACE`].
impl crate::identity::Placement for Store {
    fn may_issue(&self, node: &str, id: &crate::identity::SpiffeId) -> bool {
        if self.load().places(node, id) {
            return true;
        }
        let departures = self.departures.lock().unwrap_or_else(|e| e.into_inner());
        departures.iter().rev().any(|d| {
            d.at.elapsed() <= PLACEMENT_GRACE
                && d.node == node
                && d.namespace == id.namespace
                && d.service_account == id.service_account
        })
    }
}

/// A placement that ended: `node` ran a workload of `namespace` with `service_account` until
/// `at` (the workload left, moved or changed its service account).
#[derive(Debug)]
struct Departure {
    at: std::time::Instant,
    node: String,
    namespace: String,
    service_account: String,
}

/// The current snapshot plus change notification for the control path.
#[derive(Debug)]
pub struct Store {
    current: ArcSwap<Snapshot>,
    generation: watch::Sender<u64>,
    /// Bumped when the policies selecting some workload change.
    authz_generation: watch::Sender<u64>,
    /// Serialises writers: each update is computed from the snapshot it replaces.
    writer: Mutex<()>,
    /// The placements that ended within the last [`PLACEMENT_GRACE`], oldest first: where
    /// workloads were a moment ago. Only what ended is kept, never whole snapshots: a burst of
    /// changes (an agent's first list of 10,000 pods) would otherwise keep every intermediate
    /// snapshot's own nodes for the grace period, some 15 KB per change.
    departures: Mutex<std::collections::VecDeque<Departure>>,
}

/// How long a node may still issue the identity of a workload that left it (a pod that just
/// moved, or a state that reached one agent before another).
pub const PLACEMENT_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            generation: watch::channel(0).0,
            authz_generation: watch::channel(0).0,
            writer: Mutex::new(()),
            departures: Mutex::default(),
        }
    }

    /// Keeps, for [`PLACEMENT_GRACE`], the placements of `old` that `new` ends among the
    /// workloads `keys` (every workload when `None`); forgets older ones.
    fn remember(&self, old: &Snapshot, new: &Snapshot, keys: Option<&[String]>) {
        let now = std::time::Instant::now();
        let ended = |key: &str| {
            let before = old.workloads.get(key)?;
            let after = new.workloads.get(key);
            let kept = after.is_some_and(|w| {
                w.node == before.node && w.service_account == before.service_account
            });
            (!kept).then(|| Departure {
                at: now,
                node: before.node.clone(),
                namespace: before.namespace.clone(),
                service_account: before.service_account.clone(),
            })
        };
        let ended: Vec<Departure> = match keys {
            Some(keys) => keys.iter().filter_map(|k| ended(k)).collect(),
            None => old.workloads.keys().filter_map(|k| ended(k)).collect(),
        };
        let mut departures = self.departures.lock().unwrap_or_else(|e| e.into_inner());
        while departures
            .front()
            .is_some_and(|d| now.duration_since(d.at) > PLACEMENT_GRACE)
        {
            departures.pop_front();
        }
        departures.extend(ended);
    }

    /// How many ended placements are remembered (tests).
    #[cfg(test)]
    fn departures(&self) -> usize {
        self.departures.lock().map_or(0, |d| d.len())
    }

    /// The current snapshot (cheap; never blocks).
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot and wakes subscribers.
    pub fn replace(&self, snapshot: Snapshot) {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = Arc::new(snapshot);
        let old = self.current.swap(snapshot.clone());
        self.remember(&old, &snapshot, None);
        self.generation.send_modify(|g| *g += 1);
        self.authz_generation.send_modify(|g| *g += 1);
    }

    /// Applies `changes` to the current snapshot and, if anything changed, makes the result
    /// current and wakes subscribers. An invalid change is rejected as a whole: the current
    /// snapshot stays.
    pub fn apply(&self, changes: Changes) -> Result<Applied, Error> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let touched: Vec<String> = changes
            .workloads
            .iter()
            .map(Workload::key)
            .chain(changes.removed_workloads.iter().cloned())
            .collect();
        let (next, applied) = self.current.load().apply(changes)?;
        if !applied.is_empty() {
            let next = Arc::new(next);
            let old = self.current.swap(next.clone());
            if applied.workloads > 0 {
                self.remember(&old, &next, Some(&touched));
            }
            self.generation.send_modify(|g| *g += 1);
            if applied.authz > 0 {
                self.authz_generation.send_modify(|g| *g += 1);
            }
        }
        Ok(applied)
    }

    /// A receiver that changes whenever the snapshot is replaced.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A receiver that changes whenever the policies selecting some workload change: the
    /// proxy's established connections decide again then.
    pub fn subscribe_authz(&self) -> watch::Receiver<u64> {
        self.authz_generation.subscribe()
    }
}
