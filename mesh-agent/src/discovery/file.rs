//! The file source: the mesh state as YAML (docs/formats.md), polled for changes. An invalid
//! file is rejected with an error naming the entry and field, and the last good state keeps
//! serving.
//!
//! A reload costs parse + diff + incremental apply: the file is parsed and checked whole (so
//! that errors name the entry by its place in the file), compared by object key with the
//! current snapshot, and only what differs is applied to the store.

mod diff;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

pub use diff::diff;
use serde::Deserialize;
use tracing::{error, info, warn};

use super::{
    policies::{self, Rejection},
    Error,
};
use crate::{
    config::CaptureExclusions,
    metrics::Metrics,
    policy::{Invalid, Policy},
    state::{validate, Changes, Namespace, PortMapping, Service, Snapshot, Store, Workload},
};

/// The state file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// AuthorizationPolicy objects, each checked on its own (`policies` module).
    #[serde(default)]
    pub policies: Vec<serde_yaml::Value>,
    /// Namespaces with a waypoint: connections to their services go through it.
    #[serde(default)]
    pub waypoints: Vec<WaypointSpec>,
    /// Gateway API HTTPRoutes: each namespace's waypoint reads its own (`waypoint::table`);
    /// the node agent leaves them alone.
    #[serde(default)]
    pub routes: Vec<serde_yaml::Value>,
}

/// A namespace's waypoint: `name` is the service of `namespace` whose endpoints are the
/// waypoint's pods (the namespace label `mesh-agent/waypoint=<name>` of the Kubernetes source).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaypointSpec {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub netns: PathBuf,
    #[serde(default)]
    pub cgroup: PathBuf,
    /// The pod's UID: with it and without netns and cgroup, the node finds the pod's sandbox.
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub capture: CaptureExclusions,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePortSpec {
    pub port: u16,
    pub target_port: u16,
    /// What the port speaks (`http`, `http2`, `tcp`); default: told from the first bytes.
    #[serde(default)]
    pub protocol: crate::state::Protocol,
}

fn default_service_account() -> String {
    "default".into()
}

impl From<WorkloadSpec> for Workload {
    fn from(w: WorkloadSpec) -> Self {
        Workload {
            namespace: w.namespace,
            name: w.name,
            service_account: w.service_account,
            node: w.node,
            ips: w.ips,
            netns: w.netns,
            cgroup: w.cgroup,
            uid: w.uid,
            labels: w.labels,
            capture: w.capture,
        }
    }
}

impl From<ServiceSpec> for Service {
    fn from(s: ServiceSpec) -> Self {
        Service {
            namespace: s.namespace,
            name: s.name,
            vips: s.vips,
            ports: s
                .ports
                .into_iter()
                .map(|p| PortMapping {
                    port: p.port,
                    target_port: p.target_port,
                    protocol: p.protocol,
                })
                .collect(),
            selector: s.selector,
            endpoints: None,
        }
    }
}

/// A valid state file: its objects in file order, each workload and service with its key
/// (`namespace/name`), keys unique within each kind.
#[derive(Debug, Default)]
pub struct Desired {
    pub namespaces: Vec<Namespace>,
    pub workloads: Vec<(String, Workload)>,
    pub services: Vec<(String, Service)>,
    /// Valid policies, and (after [`Desired::settle`]) the stand-ins of invalid ones.
    pub policies: Vec<(String, Policy)>,
    /// Invalid policies, until [`Desired::settle`] decides what becomes of them.
    pub invalid_policies: Vec<Invalid>,
}

impl Desired {
    /// Every object as an upsert: the change that builds this state from nothing.
    pub fn into_changes(self) -> Changes {
        Changes {
            namespaces: self.namespaces,
            workloads: self.workloads.into_iter().map(|(_, w)| w).collect(),
            services: self.services.into_iter().map(|(_, s)| s).collect(),
            policies: self.policies.into_iter().map(|(_, p)| p).collect(),
            ..Changes::default()
        }
    }

    /// Decides what each invalid policy becomes against the state in force (`policies::settle`;
    /// `start`: the agent is starting, nothing is known of earlier versions) and returns the
    /// rejections, for the log and the metrics.
    pub fn settle(&mut self, current: &Snapshot) -> Vec<Rejection> {
        let (in_force, rejections) =
            policies::settle(current, std::mem::take(&mut self.invalid_policies));
        self.policies.extend(in_force);
        rejections
    }
}

/// Checks the whole file in file order, so that the first broken rule is reported with the
/// entry's place in the file (`workloads[3] (legacy/client).ips: ...`). The rules are the
/// store's ([`validate`]); the file adds that no object is listed twice.
impl TryFrom<StateFile> for Desired {
    type Error = String;

    fn try_from(file: StateFile) -> Result<Self, String> {
        let mut desired = Desired::default();
        let mut names = HashSet::new();
        for (i, ns) in file.namespaces.into_iter().enumerate() {
            if ns.name.is_empty() {
                return Err(format!("namespaces[{i}].name is empty"));
            }
            if !names.insert(ns.name.clone()) {
                return Err(format!(
                    "namespaces[{i}]: namespace {} is listed twice",
                    ns.name
                ));
            }
            desired.namespaces.push(Namespace {
                name: ns.name,
                enabled: ns.enabled,
                waypoint: None,
            });
        }
        for (i, w) in file.waypoints.into_iter().enumerate() {
            let Some(ns) = desired
                .namespaces
                .iter_mut()
                .find(|ns| ns.name == w.namespace)
            else {
                return Err(format!(
                    "waypoints[{i}].namespace: namespace {:?} is not listed in namespaces",
                    w.namespace
                ));
            };
            if ns.waypoint.is_some() {
                return Err(format!(
                    "waypoints[{i}]: namespace {} has a waypoint already",
                    w.namespace
                ));
            }
            validate::waypoint_name(&w.name).map_err(|p| format!("waypoints[{i}]{p}"))?;
            ns.waypoint = Some(w.name);
        }
        let mut keys = HashSet::new();
        // Who has each address: the index of a workload in `desired.workloads`.
        let mut ips = HashMap::new();
        for (i, spec) in file.workloads.into_iter().enumerate() {
            let w = Workload::from(spec);
            let key = w.key();
            validate::workload_name(&w).map_err(|p| format!("workloads[{i}]{p}"))?;
            if !keys.insert(key.clone()) {
                return Err(format!("workloads[{i}] ({key}): listed twice"));
            }
            let seen = &desired.workloads;
            validate::workload(&w, |ip| {
                ips.insert(ip, i)
                    .map(|other| seen.get(other).map_or(key.clone(), |(k, _)| k.clone()))
            })
            .map_err(|p| format!("workloads[{i}] ({key}){p}"))?;
            desired.workloads.push((key, w));
        }
        let mut keys = HashSet::new();
        // Who has each `vip:port`: the index of a service in `desired.services`.
        let mut vip_ports = HashMap::new();
        for (i, spec) in file.services.into_iter().enumerate() {
            let s = Service::from(spec);
            let key = s.key();
            if !keys.insert(key.clone()) {
                return Err(format!("services[{i}] ({key}): listed twice"));
            }
            let seen = &desired.services;
            validate::service(&s, |vip_port: SocketAddr| {
                vip_ports
                    .insert(vip_port, i)
                    .map(|other| seen.get(other).map_or(key.clone(), |(k, _)| k.clone()))
            })
            .map_err(|p| format!("services[{i}] ({key}){p}"))?;
            desired.services.push((key, s));
        }
        let mut keys = HashSet::new();
        for (i, value) in file.policies.into_iter().enumerate() {
            let (key, policy) = policies::entry(i, value)?;
            if !keys.insert(key.clone()) {
                return Err(format!("policies[{i}] ({key}): listed twice"));
            }
            match policy {
                Ok(p) => desired.policies.push((key, p)),
                Err(invalid) => desired.invalid_policies.push(invalid),
            }
        }
        Ok(desired)
    }
}

/// Parses and checks state file text.
pub fn parse(path: &Path, text: &str) -> Result<Desired, Error> {
    let file: StateFile = serde_yaml::from_str(text).map_err(|source| Error::Parse {
        path: path.to_owned(),
        source,
    })?;
    Desired::try_from(file).map_err(|message| Error::Invalid {
        path: path.to_owned(),
        message,
    })
}

/// The snapshot of a state, built on `base` (empty, with the root namespace).
pub fn build(path: &Path, desired: Desired, base: &Snapshot) -> Result<Snapshot, Error> {
    base.apply(desired.into_changes())
        .map(|(snap, _)| snap)
        .map_err(|e| Error::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// The largest state file the agent reads (64 MiB: about ten times a mesh of 10,000 services
/// and 50,000 workloads); a larger one is refused and the last good state keeps serving.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// Reads the state file, refusing one larger than [`MAX_STATE_BYTES`] without reading it
/// whole.
fn read(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read as _;
    let io = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let too_large = |size| Error::TooLarge {
        path: path.to_owned(),
        size,
        max: MAX_STATE_BYTES,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > MAX_STATE_BYTES {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // The file may grow while it is read: at most one byte past the cap.
    file.take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Loads the file once (the agent refuses to start on an invalid first state; invalid policies
/// are settled as on a reload and returned). `root_namespace`: policies there apply mesh-wide.
pub fn load(
    path: &Path,
    root_namespace: &str,
) -> Result<(Snapshot, Vec<u8>, Vec<Rejection>), Error> {
    let bytes = read(path)?;
    let started = Instant::now();
    let mut desired = parse(path, &String::from_utf8_lossy(&bytes))?;
    let parse_ms = millis(started.elapsed());
    let started = Instant::now();
    let base = Snapshot::with_root_namespace(root_namespace);
    let rejections = desired.settle(&base);
    let snap = build(path, desired, &base)?;
    info!(
        path = %path.display(),
        parse_ms,
        build_ms = millis(started.elapsed()),
        namespaces = snap.namespaces.len(),
        workloads = snap.workloads.len(),
        services = snap.service_definitions().count(),
        service_ports = snap.services.len(),
        policies = snap.policies.len(),
        "state loaded"
    );
    for p in snap.policies.values() {
        warn_policy(&snap, p);
    }
    Ok((snap, bytes, rejections))
}

/// Logs what a policy asks that L4 cannot evaluate, and a policy that applies to nothing
/// because it sits in another mesh's root namespace.
fn warn_policy(snap: &Snapshot, p: &Policy) {
    for warning in &p.warnings {
        warn!(policy = %p.key, "{warning}");
    }
    if let Some(warning) = foreign_root_namespace(snap, p) {
        warn!(policy = %p.key, "{warning}");
    }
}

/// Root namespaces of other meshes, where policies copied from them often sit.
const FOREIGN_ROOT_NAMESPACES: [&str; 1] = ["istio-system"];

/// Why a policy in another mesh's root namespace (copied from Istio: `istio-system`) applies to
/// no workload here, when that namespace is neither this mesh's root namespace nor one the
/// state knows; `None` otherwise.
pub fn foreign_root_namespace(snap: &Snapshot, p: &Policy) -> Option<String> {
    let ns = p.namespace.as_str();
    let foreign = FOREIGN_ROOT_NAMESPACES.contains(&ns)
        && ns != snap.root_namespace()
        && !snap.namespaces.contains_key(ns);
    foreign.then(|| {
        format!(
            "namespace {ns} is Istio's root namespace, but this mesh's root namespace is {} \
             (policy.root_namespace) and no namespace {ns} exists: the policy applies to no \
             workload. Set policy.root_namespace: {ns} to apply it mesh-wide, or move it",
            snap.root_namespace()
        )
    })
}

/// Milliseconds, to 0.1 ms, for logs.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Applies changed file content: parse, diff with the current snapshot, incremental apply.
/// Records the parse time (also of an invalid file) and the apply time.
fn reload(path: &Path, bytes: &[u8], store: &Store, metrics: &Metrics) -> Result<(), Error> {
    let started = Instant::now();
    let parsed = parse(path, &String::from_utf8_lossy(bytes));
    let parse_time = started.elapsed();
    metrics.state.state_parse.observe(parse_time.as_secs_f64());
    let mut desired = parsed?;
    let started = Instant::now();
    let current = store.load();
    let rejections = desired.settle(&current);
    let changes = diff(&current, desired);
    let diff_time = started.elapsed();
    let upserted: Vec<Policy> = changes.policies.clone();
    let started = Instant::now();
    let applied = store.apply(changes).map_err(|e| Error::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let apply_time = started.elapsed();
    metrics.state.state_apply.observe(apply_time.as_secs_f64());
    let snap = store.load();
    info!(
        path = %path.display(),
        parse_ms = millis(parse_time),
        diff_ms = millis(diff_time),
        apply_us = u64::try_from(apply_time.as_micros()).unwrap_or(u64::MAX),
        namespaces_changed = applied.namespaces,
        workloads_changed = applied.workloads,
        services_changed = applied.services,
        service_ports_changed = applied.service_ports,
        policies_changed = applied.policies,
        workloads_reauthorized = applied.authz,
        workloads = snap.workloads.len(),
        service_ports = snap.services.len(),
        policies = snap.policies.len(),
        "state reloaded"
    );
    for p in &upserted {
        warn_policy(&snap, p);
    }
    policies::report(&rejections, metrics);
    Ok(())
}

/// Polls the file and applies each valid change; an invalid change is logged and counted once
/// per distinct content, and the last good state stays in force.
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    mut last: Vec<u8>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_bad: Option<Vec<u8>> = None;
    loop {
        tick.tick().await;
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read(&path)).await
        };
        let bytes = match read.unwrap_or_else(|e| {
            Err(Error::Read {
                path: path.clone(),
                source: std::io::Error::other(e),
            })
        }) {
            Ok(bytes) => bytes,
            Err(e) => {
                if last_bad.as_deref() != Some(&[]) {
                    error!(error = %e, "keeping the last good state");
                    metrics
                        .state
                        .state_reloads
                        .get_or_create(&crate::metrics::Result::error())
                        .inc();
                    last_bad = Some(Vec::new());
                }
                continue;
            }
        };
        if bytes == last || last_bad.as_ref() == Some(&bytes) {
            continue;
        }
        match reload(&path, &bytes, &store, &metrics) {
            Ok(()) => {
                metrics
                    .state
                    .state_reloads
                    .get_or_create(&crate::metrics::Result::ok())
                    .inc();
                last = bytes;
                last_bad = None;
            }
            Err(e) => {
                error!(error = %e, "state change rejected; keeping the last good state");
                metrics
                    .state
                    .state_reloads
                    .get_or_create(&crate::metrics::Result::error())
                    .inc();
                last_bad = Some(bytes);
            }
        }
    }
}
