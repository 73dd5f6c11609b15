//! The Prometheus registry and the agent's metric families. Label sets are bounded: direction,
//! the pods of this node, fixed reason strings. Per-pod counter handles are created once at
//! capture time so the data path never allocates for metrics.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

/// Labels of per-pod connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `outbound` (the pod connects) or `inbound` (the pod is connected to).
    pub direction: &'static str,
    pub namespace: String,
    pub workload: String,
}

/// Labels of connection failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: &'static str,
    pub namespace: String,
    pub workload: String,
    /// A fixed reason string (see `proxy::Error::reason`).
    pub reason: &'static str,
}

/// Labels of outbound destination choices.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub namespace: String,
    pub workload: String,
    /// `service` (a VIP resolved to an endpoint) or `direct` (the original destination).
    pub route: &'static str,
    /// `hbone` (the destination is in the mesh: mTLS), `local` (in the mesh and captured by this
    /// agent too: the same-node fast path) or `plaintext` (outside the mesh).
    pub transport: &'static str,
}

/// `change` label of `mesh_capture_pod_changes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub change: &'static str,
}

/// Labels of `mesh_handovers_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoverLabels {
    /// `giver` (the running agent) or `taker` (the new one).
    pub role: &'static str,
    /// `ok`, `aborted` or `error`.
    pub result: &'static str,
}

/// `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Result {
    pub result: &'static str,
}

impl Result {
    pub fn ok() -> Self {
        Self { result: "ok" }
    }
    pub fn error() -> Self {
        Self { result: "error" }
    }
}

/// The `route` values of `mesh_outbound_routes_total`.
const ROUTES: [&str; 2] = ["service", "direct"];
/// Its `transport` values.
const TRANSPORTS: [&str; 4] = ["hbone", "local", "plaintext", "waypoint"];

/// Route counters of one pod's outbound connections. Each (route, transport) counter is made on
/// first use, so only the kinds a pod uses appear, and after that a connection counts without
/// building labels or looking them up.
#[derive(Debug)]
pub struct RouteCounters {
    namespace: String,
    workload: String,
    /// By [`RouteCounters::slot`].
    counters: [std::sync::OnceLock<Counter>; ROUTES.len() * TRANSPORTS.len()],
}

impl RouteCounters {
    pub fn new(namespace: &str, workload: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            workload: workload.to_owned(),
            counters: Default::default(),
        }
    }

    /// Counts one outbound connection: `route` is `service` or `direct`, `transport` `hbone`,
    /// `local`, `plaintext` or `waypoint`.
    pub fn inc(&self, metrics: &Metrics, route: &'static str, transport: &'static str) {
        let labels = || RouteLabels {
            namespace: self.namespace.clone(),
            workload: self.workload.clone(),
            route,
            transport,
        };
        match Self::slot(route, transport) {
            Some(i) => self.counters[i]
                .get_or_init(|| metrics.routes.get_or_create(&labels()).clone())
                .inc(),
            None => metrics.routes.get_or_create(&labels()).inc(),
        };
    }

    fn slot(route: &str, transport: &str) -> Option<usize> {
        let r = ROUTES.iter().position(|x| *x == route)?;
        let t = TRANSPORTS.iter().position(|x| *x == transport)?;
        Some(r * TRANSPORTS.len() + t)
    }
}

/// Labels of authorization decisions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny` or `audit` (an AUDIT policy matched; counted besides the verdict).
    pub action: &'static str,
    /// The deciding policy (`namespace/name`; several, comma-separated, when no ALLOW policy
    /// matched); empty when no policy decided.
    pub policy: PolicyLabel,
    /// A fixed reason string (see `policy::Reason`).
    pub reason: &'static str,
}

/// Labels of established connections closed because a policy change denies them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevokedLabels {
    pub policy: PolicyLabel,
    pub reason: &'static str,
}

/// A policy's name as a label value, sharing the policy's own `Arc<str>`: counting a decision
/// does not allocate.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PolicyLabel(pub Arc<str>);

impl EncodeLabelValue for PolicyLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// Labels of invalid policies.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub policy: String,
    /// `fail_closed`, `kept_last_good` or `not_applied`.
    pub outcome: &'static str,
}

/// Labels naming one pod.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub workload: String,
}

/// Counter handles for one pod and direction.
#[derive(Clone, Debug)]
pub struct ConnCounters {
    pub opened: Counter,
    pub closed: Counter,
    /// Bytes from the pod's side toward the peer.
    pub sent: Counter,
    /// Bytes from the peer toward the pod's side.
    pub received: Counter,
}

/// Every metric family of the agent.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent: Family<ConnLabels, Counter>,
    pub received: Family<ConnLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub routes: Family<RouteLabels, Counter>,
    pub state_reloads: Family<Result, Counter>,
    /// Seconds to apply a state change and make the new snapshot live.
    pub state_apply: Histogram,
    /// Seconds to read a state source into objects (parse and validate the file).
    pub state_parse: Histogram,
    pub captured_pods: Gauge,
    pub capture_failures: Family<PodLabels, Counter>,
    /// Pods whose return path could not be installed (delivered from their own address).
    pub return_path_failures: Counter,
    /// Pods whose capture is in place but that no listener serves (refused until served).
    pub closed_pods: Gauge,
    /// What capture did to pods: captured, adopted, reattached, closed, released.
    pub capture_changes: Family<ChangeLabels, Counter>,
    /// Handovers to or from another agent, by role and result.
    pub handovers: Family<HandoverLabels, Counter>,
    /// Inbound authorization decisions, by action and policy.
    pub decisions: Family<DecisionLabels, Counter>,
    /// The decisions without any policy (the common case), as a handle: no lookup per connection.
    pub allowed_without_policy: Counter,
    /// Established connections closed because a policy change denies them.
    pub revoked: Family<RevokedLabels, Counter>,
    /// Invalid policies found by a load or reload, by what became of them.
    pub policy_rejected: Family<RejectedLabels, Counter>,
    /// Invalid policies in the current state source.
    pub policies_invalid: Gauge,
    /// Istio's `istio_tcp_*` families (node agent only).
    pub istio: crate::proxy::telemetry::IstioTcp,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_families(true)
    }

    /// The families of a process without pods (the waypoint): the state's and policies' only;
    /// the node's connection, capture and handover families are not exported.
    pub fn without_node_families() -> Self {
        Self::with_families(false)
    }

    fn with_families(node: bool) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            failures: Family::default(),
            routes: Family::default(),
            state_reloads: Family::default(),
            state_apply: Histogram::new(APPLY_BUCKETS),
            state_parse: Histogram::new(PARSE_BUCKETS),
            captured_pods: Gauge::default(),
            capture_failures: Family::default(),
            return_path_failures: Counter::default(),
            closed_pods: Gauge::default(),
            capture_changes: Family::default(),
            handovers: Family::default(),
            decisions: Family::default(),
            allowed_without_policy: Counter::default(),
            revoked: Family::default(),
            policy_rejected: Family::default(),
            policies_invalid: Gauge::default(),
            istio: Default::default(),
            registry: Mutex::new(Registry::default()),
        };
        let allowed_without_policy = m
            .decisions
            .get_or_create(&DecisionLabels {
                action: "allow",
                policy: PolicyLabel(Arc::from("")),
                reason: crate::policy::Reason::NoPolicy.as_str(),
            })
            .clone();
        let m = Self {
            allowed_without_policy,
            ..m
        };
        if node {
            m.istio.register(&mut registry);
        }
        if node {
            registry.register(
                "mesh_tcp_connections_opened",
                "TCP connections proxied, by pod and direction",
                m.opened.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_tcp_connections_closed",
                "Proxied TCP connections that ended",
                m.closed.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_tcp_sent_bytes",
                "Bytes from the pod's side of a proxied connection",
                m.sent.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_tcp_received_bytes",
                "Bytes toward the pod's side of a proxied connection",
                m.received.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_tcp_connection_failures",
                "Proxied connections that failed, by reason",
                m.failures.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_outbound_routes",
                "Outbound destination choices: service or direct; over HBONE, through a waypoint, to a pod of this node (local) or plaintext",
                m.routes.clone(),
            );
        }
        registry.register(
            "mesh_state_reloads",
            "State file reloads, by result",
            m.state_reloads.clone(),
        );
        registry.register(
            "mesh_state_apply_seconds",
            "Time to apply a state change and make the new snapshot live",
            m.state_apply.clone(),
        );
        registry.register(
            "mesh_state_parse_seconds",
            "Time to parse and validate the state file",
            m.state_parse.clone(),
        );
        if node {
            registry.register(
                "mesh_captured_pods",
                "Pods of this node currently captured",
                m.captured_pods.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_pod_capture_failures",
                "Failed attempts to capture a pod",
                m.capture_failures.clone(),
            );
            registry.register(
                "mesh_return_path_failures",
                "Pods served without their return path: connections reach the application from \
                 the pod's own address instead of the client's",
                m.return_path_failures.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_closed_pods",
                "Pods of this node whose capture is in place but that no listener serves: their \
                 connections are refused until they are served",
                m.closed_pods.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_capture_pod_changes",
                "What capture did to pods: captured (new), adopted (pinned by an earlier agent), \
                 reattached (adopted, some links attached again), closed (captured without being \
                 served), released",
                m.capture_changes.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_handovers",
                "Listener handovers between agents of this node, by role (giver, taker) and result",
                m.handovers.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_policy_decisions",
                "Inbound connections decided by L4 authorization, by action, policy and reason",
                m.decisions.clone(),
            );
        }
        if node {
            registry.register(
                "mesh_policy_connections_closed",
                "Established connections closed because a policy change denies them",
                m.revoked.clone(),
            );
        }
        registry.register(
            "mesh_policy_rejected",
            "Invalid policies found when the state was loaded, by what became of them",
            m.policy_rejected.clone(),
        );
        registry.register(
            "mesh_policies_invalid",
            "Invalid policies in the current state",
            m.policies_invalid.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        m
    }

    /// Registers a metric owned by another module (identity, tunnel).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(name, help, metric);
    }

    /// Adds a collector evaluated at each scrape (the eBPF counters).
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(collector);
    }

    /// Removes the per-pod series of a pod that is no longer served: its connection counters
    /// (both directions), its route counters and the failures in `failures` (direction,
    /// reason), so that pods coming and going do not grow the exposition without bound. A
    /// connection of the pod still open counts into handles no longer exported.
    pub fn remove_pod(
        &self,
        namespace: &str,
        workload: &str,
        failures: &[(&'static str, &'static str)],
    ) {
        for direction in ["outbound", "inbound"] {
            let labels = ConnLabels {
                direction,
                namespace: namespace.into(),
                workload: workload.into(),
            };
            for family in [&self.opened, &self.closed, &self.sent, &self.received] {
                family.remove(&labels);
            }
        }
        for route in ROUTES {
            for transport in TRANSPORTS {
                self.routes.remove(&RouteLabels {
                    namespace: namespace.into(),
                    workload: workload.into(),
                    route,
                    transport,
                });
            }
        }
        for (direction, reason) in failures {
            self.failures.remove(&FailureLabels {
                direction,
                namespace: namespace.into(),
                workload: workload.into(),
                reason,
            });
        }
    }

    /// The counter handles of one pod and direction.
    pub fn conn_counters(
        &self,
        direction: &'static str,
        namespace: &str,
        workload: &str,
    ) -> ConnCounters {
        let labels = ConnLabels {
            direction,
            namespace: namespace.into(),
            workload: workload.into(),
        };
        ConnCounters {
            opened: self.opened.get_or_create(&labels).clone(),
            closed: self.closed.get_or_create(&labels).clone(),
            sent: self.sent.get_or_create(&labels).clone(),
            received: self.received.get_or_create(&labels).clone(),
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> std::result::Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(
            &mut out,
            &self.registry.lock().unwrap_or_else(|e| e.into_inner()),
        )?;
        Ok(out)
    }
}

/// Buckets of `mesh_state_apply_seconds`: 10 us to 1 s, at 1, 2.5 and 5 of each decade.
const APPLY_BUCKETS: [f64; 16] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0,
];

/// Buckets of `mesh_state_parse_seconds`: 100 us to 10 s (a file of 50,000 workloads takes
/// about a second).
const PARSE_BUCKETS: [f64; 16] = [
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A collector of labelled counters read at scrape time from a source (the eBPF per-CPU map).
pub struct ReadCounters<F> {
    pub name: &'static str,
    pub help: &'static str,
    pub read: F,
}

impl<F> std::fmt::Debug for ReadCounters<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCounters")
            .field("name", &self.name)
            .finish()
    }
}

/// `(program, reason)` labels of the eBPF counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramReason {
    pub program: &'static str,
    pub reason: &'static str,
}

impl<F> Collector for ReadCounters<F>
where
    F: Fn() -> Vec<(ProgramReason, u64)> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            self.name,
            self.help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (labels, value) in (self.read)() {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_that_is_no_longer_served_leaves_the_exposition() {
        let m = Metrics::new();
        for pod in ["gone", "stays"] {
            for direction in ["outbound", "inbound"] {
                m.conn_counters(direction, "shop", pod).opened.inc();
            }
            RouteCounters::new("shop", pod).inc(&m, "service", "hbone");
            m.failures
                .get_or_create(&FailureLabels {
                    direction: "outbound",
                    namespace: "shop".into(),
                    workload: pod.into(),
                    reason: "connect",
                })
                .inc();
        }
        let series = |text: &str, pod: &str| {
            text.lines()
                .filter(|l| l.contains(&format!("workload=\"{pod}\"")))
                .count()
        };
        let before = m.encode().expect("encode");
        assert_eq!(series(&before, "gone"), 10, "{before}");
        m.remove_pod("shop", "gone", &[("outbound", "connect")]);
        let after = m.encode().expect("encode");
        assert_eq!(series(&after, "gone"), 0, "{after}");
        assert_eq!(series(&after, "stays"), 10, "{after}");
    }
}
