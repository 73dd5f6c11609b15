//! `mesh-agent-bench state`: what the control path costs at scale, measured on a synthetic mesh
//! built in memory (no file, no I/O). Prints one JSON line for the benchmark harness.
//!
//! The synthetic mesh: services spread over namespaces of about 100 services each, with 1 to 3
//! ports and a selector that matches about `workloads / services` workloads of their namespace;
//! workloads spread over those namespaces and 100 nodes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use super::{Changes, Error, Namespace, PortMapping, Service, Snapshot, Store, Workload};
use crate::{config::CaptureExclusions, policy::Policy};

/// Nodes of the synthetic mesh.
const NODES: u32 = 100;
/// Services per namespace, about.
const SERVICES_PER_NAMESPACE: u32 = 100;
/// Single-object updates timed, of each kind.
const UPDATES: u32 = 100;
/// Workload addresses start after 10.0.0.0; VIPs after 10.96.0.0.
const WORKLOAD_BASE: u32 = 0x0a00_0000;
const VIP_BASE: u32 = 0x0a60_0000;
/// The largest synthetic mesh whose addresses fit: workloads below 10.96.0.0, VIPs in 10/8.
pub const MAX_WORKLOADS: u32 = VIP_BASE - WORKLOAD_BASE - 1;
pub const MAX_SERVICES: u32 = 0x0b00_0000 - VIP_BASE - 1;

/// The size of a synthetic mesh.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub services: u32,
    pub workloads: u32,
}

impl Shape {
    /// Namespaces: one per 100 services.
    pub fn namespaces(&self) -> u32 {
        self.services.div_ceil(SERVICES_PER_NAMESPACE).max(1)
    }

    /// Whether the addresses fit ([`MAX_WORKLOADS`], [`MAX_SERVICES`]).
    pub fn fits(&self) -> bool {
        self.workloads <= MAX_WORKLOADS && self.services <= MAX_SERVICES
    }

    /// The service a workload belongs to (its `app` label), if there are services.
    fn service_of(&self, workload: u32) -> Option<u32> {
        workload.checked_rem(self.services)
    }

    /// The namespace of service `i`.
    fn namespace_of(&self, service: u32) -> String {
        format!("ns-{}", service % self.namespaces())
    }

    /// Service `i`.
    pub fn service(&self, i: u32) -> Service {
        let ports = [(80, 8080), (443, 8443), (9090, 9090)];
        let count = 1 + usize::try_from(i % 3).unwrap_or(0);
        Service {
            namespace: self.namespace_of(i),
            name: format!("svc-{i}"),
            vips: vec![IpAddr::V4(Ipv4Addr::from(VIP_BASE + 1 + i))],
            ports: ports[..count]
                .iter()
                .map(|&(port, target_port)| PortMapping {
                    port,
                    target_port,
                    protocol: Default::default(),
                })
                .collect(),
            selector: BTreeMap::from([("app".to_owned(), format!("app-{i}"))]),
            endpoints: None,
        }
    }

    /// Workload `j`.
    pub fn workload(&self, j: u32) -> Workload {
        let service = self.service_of(j).unwrap_or(0);
        Workload {
            namespace: self.namespace_of(service),
            name: format!("w-{j}"),
            service_account: format!("sa-{service}"),
            // Spread so that each node has pods of many namespaces.
            node: format!("node-{}", (j + j / NODES) % NODES),
            ips: vec![IpAddr::V4(Ipv4Addr::from(WORKLOAD_BASE + 1 + j))],
            netns: PathBuf::from(format!("/run/netns/w-{j}")),
            cgroup: PathBuf::from(format!("/sys/fs/cgroup/mesh/w-{j}")),
            uid: None,
            labels: BTreeMap::from([
                ("app".to_owned(), format!("app-{service}")),
                ("version".to_owned(), format!("v{}", j % 3)),
            ]),
            capture: CaptureExclusions::default(),
        }
    }

    /// The whole mesh as one change (every tenth namespace is not enabled).
    pub fn changes(&self) -> Changes {
        Changes {
            namespaces: (0..self.namespaces())
                .map(|n| Namespace {
                    name: format!("ns-{n}"),
                    enabled: n % 10 != 9,
                    waypoint: None,
                })
                .collect(),
            workloads: (0..self.workloads).map(|j| self.workload(j)).collect(),
            services: (0..self.services).map(|i| self.service(i)).collect(),
            ..Changes::default()
        }
    }

    /// The `k`th single-service change against `snap`: new target ports (every endpoint
    /// changes) or a narrower selector.
    pub fn service_change(&self, snap: &Snapshot, k: u32) -> Option<Service> {
        let i = k
            .wrapping_mul(7919)
            .wrapping_add(13)
            .checked_rem(self.services)?;
        let mut s = Service::clone(snap.service(&format!("{}/svc-{i}", self.namespace_of(i)))?);
        if k % 2 == 1 {
            s.selector.insert("version".into(), format!("v{}", k % 3));
        } else {
            for p in &mut s.ports {
                p.target_port ^= 1;
            }
        }
        Some(s)
    }

    /// The `k`th single-workload change against `snap`: its `app` label moves to the next
    /// service of its namespace (it leaves one service and joins another).
    pub fn workload_change(&self, snap: &Snapshot, k: u32) -> Option<Workload> {
        let j = k
            .wrapping_mul(104_729)
            .wrapping_add(7)
            .checked_rem(self.workloads)?;
        let service = self.service_of(j)?;
        let key = format!("{}/w-{j}", self.namespace_of(service));
        let mut w = Workload::clone(snap.workloads.get(key.as_str())?);
        let to = (service + self.namespaces()) % self.services;
        w.labels.insert("app".into(), format!("app-{to}"));
        Some(w)
    }
}

/// The `k`th namespace policy: an ALLOW on one service's workloads for one identity, its port
/// changing with `k` (so that each one is a change).
fn namespace_policy(shape: &Shape, k: u32) -> Option<Policy> {
    let i = k.wrapping_mul(31).checked_rem(shape.services)?;
    let spec = format!(
        "{{selector: {{matchLabels: {{app: app-{i}}}}}, rules: [{{from: [{{source: \
         {{principals: [cluster.local/ns/{}/sa/sa-{i}]}}}}], to: [{{operation: {{ports: [{}]}}}}]}}]}}",
        shape.namespace_of(i),
        1 + k % 1000
    );
    compiled(&shape.namespace_of(i), &format!("allow-{i}"), &spec)
}

/// A mesh-wide DENY in the root namespace, its port changing with `k`.
fn root_policy(k: u32) -> Option<Policy> {
    let spec = format!(
        "{{action: DENY, rules: [{{from: [{{source: {{notPrincipals: ['*']}}}}], \
         to: [{{operation: {{ports: [{}]}}}}]}}]}}",
        1 + k % 1000
    );
    compiled(super::DEFAULT_ROOT_NAMESPACE, "deny-plaintext", &spec)
}

fn compiled(namespace: &str, name: &str, spec: &str) -> Option<Policy> {
    crate::policy::compile(namespace, name, serde_yaml::from_str(spec).ok()?).ok()
}

/// What `mesh-agent-bench state` measures.
#[derive(Debug)]
pub struct Report {
    pub shape: Shape,
    pub service_ports: usize,
    pub build: Duration,
    pub service_updates: Vec<Duration>,
    pub workload_updates: Vec<Duration>,
    /// A namespace policy added or changed (its namespace's workloads selected again).
    pub policy_updates: Vec<Duration>,
    /// The root namespace's policy changed (every workload selected again).
    pub root_policy_updates: Vec<Duration>,
    /// Mean time of one decision (a workload selected by a namespace and a root policy).
    pub decide: Duration,
    pub rss_mib: Option<f64>,
    /// Mean time of [`Snapshot::resolve`] on a service port.
    pub resolve: Duration,
}

impl Report {
    /// The report as one JSON line.
    pub fn json(&self) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let p50 = |v: &[Duration]| v.get(v.len() / 2).copied().map_or(0.0, us);
        let max = |v: &[Duration]| v.last().copied().map_or(0.0, us);
        format!(
            concat!(
                "{{\"services\":{},\"workloads\":{},\"service_ports\":{},\"build_ms\":{:.1},",
                "\"update_one_service_us_p50\":{:.1},\"update_one_service_us_max\":{:.1},",
                "\"update_one_workload_us_p50\":{:.1},\"update_one_workload_us_max\":{:.1},",
                "\"update_one_policy_us_p50\":{:.1},\"update_one_policy_us_max\":{:.1},",
                "\"update_root_policy_ms_p50\":{:.2},\"decide_ns\":{:.0},",
                "\"resolve_ns\":{:.0},\"rss_mib\":{}}}"
            ),
            self.shape.services,
            self.shape.workloads,
            self.service_ports,
            self.build.as_secs_f64() * 1e3,
            p50(&self.service_updates),
            max(&self.service_updates),
            p50(&self.workload_updates),
            max(&self.workload_updates),
            p50(&self.policy_updates),
            max(&self.policy_updates),
            p50(&self.root_policy_updates) / 1e3,
            self.decide.as_secs_f64() * 1e9,
            self.resolve.as_secs_f64() * 1e9,
            self.rss_mib
                .map_or_else(|| "null".to_owned(), |m| format!("{m:.1}")),
        )
    }
}

/// Builds the synthetic mesh in a [`Store`], then times single-service and single-workload
/// updates through [`Store::apply`] (each one made live, as for the data path).
pub fn run(shape: Shape) -> Result<Report, Error> {
    let store = Store::new();
    let changes = shape.changes();
    let started = Instant::now();
    store.apply(changes)?;
    let build = started.elapsed();
    let rss_mib = rss_mib();
    let mut service_updates = Vec::new();
    let mut workload_updates = Vec::new();
    for k in 0..UPDATES {
        if let Some(s) = shape.service_change(&store.load(), k) {
            service_updates.push(timed(
                &store,
                Changes {
                    services: vec![s],
                    ..Changes::default()
                },
            )?);
        }
        if let Some(w) = shape.workload_change(&store.load(), k) {
            workload_updates.push(timed(
                &store,
                Changes {
                    workloads: vec![w],
                    ..Changes::default()
                },
            )?);
        }
    }
    service_updates.sort_unstable();
    workload_updates.sort_unstable();
    let mut policy_updates = Vec::new();
    let mut root_policy_updates = Vec::new();
    for k in 0..UPDATES {
        if let Some(p) = namespace_policy(&shape, k) {
            policy_updates.push(timed(
                &store,
                Changes {
                    policies: vec![p],
                    ..Changes::default()
                },
            )?);
        }
        // Each one re-selects every workload: fewer of them.
        if k % 10 == 0 {
            if let Some(p) = root_policy(k) {
                root_policy_updates.push(timed(
                    &store,
                    Changes {
                        policies: vec![p],
                        ..Changes::default()
                    },
                )?);
            }
        }
    }
    policy_updates.sort_unstable();
    root_policy_updates.sort_unstable();
    let snap = store.load();
    let decide = time_decisions(&shape, &snap);
    let vips: Vec<SocketAddr> = snap.services.keys().copied().collect();
    let rounds = (1_000_000 / vips.len().max(1)).max(1);
    let started = Instant::now();
    for _ in 0..rounds {
        for vip in &vips {
            std::hint::black_box(snap.resolve(*vip));
        }
    }
    let lookups = u32::try_from(rounds * vips.len())
        .unwrap_or(u32::MAX)
        .max(1);
    Ok(Report {
        shape,
        service_ports: snap.services.len(),
        build,
        service_updates,
        workload_updates,
        policy_updates,
        root_policy_updates,
        decide,
        rss_mib,
        resolve: started.elapsed() / lookups,
    })
}

/// Mean time of a decision on a workload selected by a namespace policy and the root policy,
/// as the proxy makes it: the workload's selection from the snapshot, then `evaluate`.
fn time_decisions(shape: &Shape, snap: &Snapshot) -> Duration {
    let Some(i) = 0u32.checked_rem(shape.services) else {
        return Duration::ZERO;
    };
    let namespace = shape.namespace_of(i);
    let Some(w) = snap
        .workloads
        .values()
        .find(|w| w.namespace == namespace && snap.authorization(&w.key()).is_some())
    else {
        return Duration::ZERO;
    };
    let key = w.key();
    let Ok(identity) = crate::identity::SpiffeId::new("cluster.local", &namespace, "sa-0") else {
        return Duration::ZERO;
    };
    let rounds: u32 = 1_000_000;
    let started = Instant::now();
    for n in 0..rounds {
        let conn = crate::policy::Conn {
            identity: Some(&identity),
            src: IpAddr::V4(Ipv4Addr::from(WORKLOAD_BASE + 2)),
            dst: w.ips[0],
            port: u16::try_from(1 + n % 1000).unwrap_or(1),
        };
        let selected = snap.authorization(&key);
        std::hint::black_box(crate::policy::evaluate(selected.map(|s| &**s), &conn));
    }
    started.elapsed() / rounds
}

fn timed(store: &Store, changes: Changes) -> Result<Duration, Error> {
    let started = Instant::now();
    store.apply(changes)?;
    Ok(started.elapsed())
}

/// This process's resident memory, from /proc/self/status.
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
