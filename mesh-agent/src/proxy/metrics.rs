//! The node proxy's own families: connections and bytes per pod and direction, failures by
//! reason, and outbound route choices (Istio's `istio_tcp_*` are `telemetry`'s). Per-pod counter
//! handles are made once at capture time, so the data path never builds labels for them.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
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

/// The `route` values of `mesh_outbound_routes_total`.
const ROUTES: [&str; 2] = ["service", "direct"];
/// Its `transport` values.
const TRANSPORTS: [&str; 4] = ["hbone", "local", "plaintext", "waypoint"];

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

/// The proxy's families.
#[derive(Debug, Default)]
pub struct Families {
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent: Family<ConnLabels, Counter>,
    pub received: Family<ConnLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub routes: Family<RouteLabels, Counter>,
}

impl Families {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_tcp_connections_opened",
            "TCP connections proxied, by pod and direction",
            self.opened.clone(),
        );
        registry.register(
            "mesh_tcp_connections_closed",
            "Proxied TCP connections that ended",
            self.closed.clone(),
        );
        registry.register(
            "mesh_tcp_sent_bytes",
            "Bytes from the pod's side of a proxied connection",
            self.sent.clone(),
        );
        registry.register(
            "mesh_tcp_received_bytes",
            "Bytes toward the pod's side of a proxied connection",
            self.received.clone(),
        );
        registry.register(
            "mesh_tcp_connection_failures",
            "Proxied connections that failed, by reason",
            self.failures.clone(),
        );
        registry.register(
            "mesh_outbound_routes",
            "Outbound destination choices: service or direct; over HBONE, through a waypoint, to a pod of this node (local) or plaintext",
            self.routes.clone(),
        );
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
}

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
    pub fn inc(&self, families: &Families, route: &'static str, transport: &'static str) {
        let labels = || RouteLabels {
            namespace: self.namespace.clone(),
            workload: self.workload.clone(),
            route,
            transport,
        };
        match Self::slot(route, transport) {
            Some(i) => self.counters[i]
                .get_or_init(|| families.routes.get_or_create(&labels()).clone())
                .inc(),
            None => families.routes.get_or_create(&labels()).inc(),
        };
    }

    fn slot(route: &str, transport: &str) -> Option<usize> {
        let r = ROUTES.iter().position(|x| *x == route)?;
        let t = TRANSPORTS.iter().position(|x| *x == transport)?;
        Some(r * TRANSPORTS.len() + t)
    }
}
