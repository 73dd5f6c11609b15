//! The Prometheus registry of the agent, and the families' labels the subsystems share. Label
//! sets are bounded: direction, the pods of this node, fixed reason strings. Per-pod counter
//! handles are created once at capture time so the data path never allocates for metrics.

use std::sync::Mutex;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::counter::ConstCounter,
    registry::Registry,
};

pub use crate::{
    handover::metrics::HandoverLabels,
    pods::metrics::{ChangeLabels, PodLabels},
    policy::metrics::{DecisionLabels, PolicyLabel, RejectedLabels, RevokedLabels},
    proxy::metrics::{ConnCounters, ConnLabels, FailureLabels, RouteCounters, RouteLabels},
};

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

/// Every metric family of the agent, each group its subsystem's: the subsystem defines its
/// families and labels and registers them (`register` in `proxy::metrics`, `proxy::telemetry`,
/// `state::metrics`, `pods::metrics`, `handover::metrics`, `policy::metrics`). Families a
/// subsystem makes at run time (identity, the HBONE pool and server, the eBPF counters, CNI,
/// the Kubernetes source) are registered through [`Metrics::register`].
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// The node proxy's connection families.
    pub proxy: crate::proxy::metrics::Families,
    /// Istio's `istio_tcp_*` families (node agent only).
    pub istio: crate::proxy::telemetry::IstioTcp,
    pub state: crate::state::metrics::Families,
    pub capture: crate::pods::metrics::Families,
    pub handover: crate::handover::metrics::Families,
    pub policy: crate::policy::metrics::Families,
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
        let m = Self {
            registry: Mutex::new(Registry::default()),
            proxy: Default::default(),
            istio: Default::default(),
            state: Default::default(),
            capture: Default::default(),
            handover: Default::default(),
            policy: Default::default(),
        };
        let mut registry = Registry::default();
        if node {
            m.istio.register(&mut registry);
            m.proxy.register(&mut registry);
        }
        m.state.register(&mut registry);
        if node {
            m.capture.register(&mut registry);
            m.handover.register(&mut registry);
        }
        m.policy.register(&mut registry, node);
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
                m.proxy.conn_counters(direction, "shop", pod).opened.inc();
            }
            RouteCounters::new("shop", pod).inc(&m.proxy, "service", "hbone");
            m.proxy
                .failures
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
        m.proxy
            .remove_pod("shop", "gone", &[("outbound", "connect")]);
        let after = m.encode().expect("encode");
        assert_eq!(series(&after, "gone"), 0, "{after}");
        assert_eq!(series(&after, "stays"), 10, "{after}");
    }
}
