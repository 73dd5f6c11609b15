//! Istio's L4 metrics: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total` and `istio_tcp_received_bytes_total`, with Istio's label names
//! and values (so that Istio's dashboards and Kiali read them unchanged).
//!
//! Each proxied connection carries one [`Report`]: the path that serves it says who is at
//! either end as soon as it knows ([`Report::know`]) and when the connection is established
//! ([`Report::established`]); `proxy::account`, which counts the `mesh_tcp_*` families and
//! writes the connection's log line, closes it ([`Report::close`]). Both families come from the
//! same place.
//!
//! Cardinality is bounded by the workloads: no ports, addresses or connection ids in labels,
//! and the series that name a workload are removed once the state no longer has it
//! ([`IstioTcp::retain_workloads`]).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::{identity::SpiffeId, state::Workload};

/// A label value, or `unknown` when the agent does not know it (Istio's convention).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Label(Option<Arc<str>>);

impl Label {
    fn of(value: impl Into<Arc<str>>) -> Self {
        Self(Some(value.into()))
    }

    /// Whether the value is known (not `unknown`).
    pub fn is_known(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("unknown"))
    }
}

/// A label for a log line: `unknown` when absent, as in the metrics.
#[derive(Debug, Clone, Copy)]
pub struct Known<'a>(pub Option<&'a Label>);

impl std::fmt::Display for Known<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(label) => label.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        EncodeLabelValue::encode(&self.0.as_deref().unwrap_or("unknown"), encoder)
    }
}

/// The labels of Istio's TCP metrics, in ztunnel's order (Istio's standard labels without the
/// cluster and locality ones: one cluster, no topology in the state).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (the client's agent) or `destination` (the server's).
    pub reporter: &'static str,
    pub source_workload: Label,
    /// The workload's canonical service (`state::Workload::canonical_service`).
    pub source_canonical_service: Label,
    pub source_canonical_revision: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    /// As ztunnel: the canonical service and revision again.
    pub source_app: Label,
    pub source_version: Label,
    /// The service's host name (`name.namespace.svc.cluster.local`) when the client connected
    /// to a service.
    pub destination_service: Label,
    pub destination_service_namespace: Label,
    pub destination_service_name: Label,
    pub destination_workload: Label,
    pub destination_canonical_service: Label,
    pub destination_canonical_revision: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    /// Always `tcp`.
    pub request_protocol: &'static str,
    /// `-`, `DENY` (refused by an authorization policy) or `CONNECT` (the upstream connection
    /// failed).
    pub response_flags: &'static str,
    /// `mutual_tls` (HBONE, or this agent's same-node delivery, where the agent knows both
    /// identities) or `unknown` (plaintext).
    pub connection_security_policy: &'static str,
}

/// Who is at one end of a connection, as far as the agent knows.
#[derive(Debug, Default)]
pub struct Party<'a> {
    pub workload: Option<&'a Workload>,
    /// The identity: the one its certificate proved, or the one this agent gives it.
    pub principal: Option<&'a SpiffeId>,
}

/// What Istio's labels say of one end.
struct PartyLabels {
    workload: Label,
    canonical_service: Label,
    canonical_revision: Label,
    namespace: Label,
    principal: Label,
}

impl Party<'_> {
    /// Its workload, canonical service and revision, namespace (the workload's, else its
    /// identity's) and principal.
    fn labels(&self) -> PartyLabels {
        let namespace = match (self.workload, self.principal) {
            (Some(w), _) => Label::of(w.namespace.as_str()),
            (None, Some(id)) => Label::of(id.namespace.as_str()),
            (None, None) => Label::default(),
        };
        let of = |f: fn(&Workload) -> &str| {
            self.workload
                .map_or_else(Label::default, |w| Label::of(f(w)))
        };
        PartyLabels {
            workload: of(|w| &w.name),
            canonical_service: of(Workload::canonical_service),
            canonical_revision: of(Workload::canonical_revision),
            namespace,
            principal: self
                .principal
                .map_or_else(Label::default, |id| Label::of(id.to_string())),
        }
    }
}

/// Whether a connection is carried with mTLS identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    MutualTls,
    /// Plaintext: no identity.
    None,
}

/// The reporting side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// This agent serves the client of the connection (outbound).
    Source,
    /// This agent serves its server (inbound).
    Destination,
}

/// Why a connection ended, as Istio's `response_flags` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flags {
    None,
    /// An authorization policy refused it (or closed it when a change denied it).
    Deny,
    /// The connection to the upstream (the application, the peer, the destination outside the
    /// mesh) could not be made.
    Connect,
}

impl Flags {
    pub fn as_str(self) -> &'static str {
        match self {
            Flags::None => "-",
            Flags::Deny => "DENY",
            Flags::Connect => "CONNECT",
        }
    }
}

impl TcpLabels {
    /// The labels of a connection from `source` to `destination`, through `service`
    /// (`namespace/name`) when the client connected to one.
    pub fn new(
        reporter: Reporter,
        source: &Party<'_>,
        destination: &Party<'_>,
        service: Option<&str>,
        security: Security,
    ) -> Self {
        let (src, dst) = (source.labels(), destination.labels());
        let (service_host, service_name, service_namespace) =
            match service.and_then(|s| s.split_once('/')) {
                Some((ns, name)) => (
                    Label::of(crate::state::service_host(ns, name)),
                    Label::of(name),
                    Label::of(ns),
                ),
                None => Default::default(),
            };
        Self {
            reporter: match reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            source_workload: src.workload,
            source_app: src.canonical_service.clone(),
            source_canonical_service: src.canonical_service,
            source_version: src.canonical_revision.clone(),
            source_canonical_revision: src.canonical_revision,
            source_workload_namespace: src.namespace,
            source_principal: src.principal,
            destination_service: service_host,
            destination_service_namespace: service_namespace,
            destination_service_name: service_name,
            destination_workload: dst.workload,
            destination_app: dst.canonical_service.clone(),
            destination_canonical_service: dst.canonical_service,
            destination_version: dst.canonical_revision.clone(),
            destination_canonical_revision: dst.canonical_revision,
            destination_workload_namespace: dst.namespace,
            destination_principal: dst.principal,
            request_protocol: "tcp",
            response_flags: Flags::None.as_str(),
            connection_security_policy: match security {
                Security::MutualTls => "mutual_tls",
                Security::None => "unknown",
            },
        }
    }

    /// The workloads these labels name, `namespace/name`.
    fn workloads(&self) -> impl Iterator<Item = String> + '_ {
        [
            (&self.source_workload_namespace, &self.source_workload),
            (
                &self.destination_workload_namespace,
                &self.destination_workload,
            ),
        ]
        .into_iter()
        .filter_map(|(ns, name)| Some(format!("{}/{}", ns.0.as_deref()?, name.0.as_deref()?)))
    }
}

/// The counters of one label set, shared by the connections that have it.
#[derive(Debug)]
pub struct Series {
    /// What the connection's access log line says about its ends, too.
    pub labels: TcpLabels,
    opened: Counter,
    closed: Counter,
    /// Bytes from the server toward the client (Istio: "sent during response").
    sent: Counter,
    /// Bytes from the client toward the server (Istio: "received during request").
    received: Counter,
}

impl Series {
    /// The byte counters: of the request (client to server, Istio's "received") and of the
    /// response (server to client, "sent").
    pub fn bytes(&self) -> (&Counter, &Counter) {
        (&self.received, &self.sent)
    }
}

/// The `istio_tcp_*` families of the node agent.
#[derive(Debug, Default)]
pub struct IstioTcp {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    /// Every label set counted so far, with its counters: a connection holds its series, not
    /// its labels.
    series: Mutex<HashMap<TcpLabels, Arc<Series>>>,
}

impl IstioTcp {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened (Istio's standard metric)",
            self.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed (Istio's standard metric)",
            self.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes from the server toward the client of a TCP connection (Istio's standard metric)",
            self.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes from the client toward the server of a TCP connection (Istio's standard metric)",
            self.received.clone(),
        );
    }

    /// The series of `labels`, made on first use.
    fn series(&self, labels: TcpLabels) -> Arc<Series> {
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.get(&labels) {
            return s.clone();
        }
        let s = Arc::new(Series {
            opened: self.opened.get_or_create(&labels).clone(),
            closed: self.closed.get_or_create(&labels).clone(),
            sent: self.sent.get_or_create(&labels).clone(),
            received: self.received.get_or_create(&labels).clone(),
            labels: labels.clone(),
        });
        all.insert(labels, s.clone());
        s
    }

    /// Removes the series that name a workload `present` does not know (`namespace/name`).
    /// Returns how many label sets were removed.
    pub fn retain_workloads(&self, present: &HashSet<String>) -> usize {
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let before = all.len();
        all.retain(|labels, _| {
            let keep = labels.workloads().all(|w| present.contains(&w));
            if !keep {
                self.opened.remove(labels);
                self.closed.remove(labels);
                self.sent.remove(labels);
                self.received.remove(labels);
            }
            keep
        });
        before - all.len()
    }
}

/// Keeps the `istio_tcp_*` series to the workloads the state has: after every change of the
/// state, removes those that name a workload it no longer has (a pod that is gone).
pub async fn prune(store: Arc<crate::state::Store>, metrics: Arc<crate::metrics::Metrics>) {
    let mut changed = store.subscribe();
    while changed.changed().await.is_ok() {
        let present: HashSet<String> = (store.load().workloads_by_ip.values())
            .map(|w| w.key())
            .collect();
        let removed = metrics.istio.retain_workloads(&present);
        if removed > 0 {
            tracing::debug!(
                removed,
                "istio_tcp_* series of workloads that are gone removed"
            );
        }
    }
}

#[derive(Debug, Default)]
enum State {
    /// Nothing known yet: a connection that fails now is in no `istio_tcp_*` series (as in
    /// ztunnel: its log line and `mesh_tcp_connection_failures_total` have it).
    #[default]
    Unknown,
    /// Both ends known, not established (yet).
    Known(Box<TcpLabels>),
    /// Established and counted as opened.
    Open(Arc<Series>),
}

/// The `istio_tcp_*` report of one connection (see the module's documentation). Small while
/// the connection is open: its series is shared.
#[derive(Debug, Default)]
pub struct Report(Mutex<State>);

impl Report {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection's labels, once both ends are known.
    pub fn labels(&self) -> Option<TcpLabels> {
        match &*self.state() {
            State::Unknown => None,
            State::Known(labels) => Some((**labels).clone()),
            State::Open(series) => Some(series.labels.clone()),
        }
    }

    /// Both ends are known (not counted before [`Report::established`] or the close).
    pub fn know(&self, labels: TcpLabels) {
        *self.state() = State::Known(Box::new(labels));
    }

    /// The connection is established: counted as opened.
    pub fn established(&self, istio: &IstioTcp) {
        let mut state = self.state();
        if let State::Known(labels) = std::mem::take(&mut *state) {
            let series = istio.series(*labels);
            series.opened.inc();
            *state = State::Open(series);
        }
    }

    /// The series of an established connection: the copy loops count its bytes into it as
    /// they move ([`Series::bytes`]).
    pub fn series(&self) -> Option<Arc<Series>> {
        match &*self.state() {
            State::Open(series) => Some(series.clone()),
            _ => None,
        }
    }

    /// The connection ended: counted as closed (its bytes were counted as they moved). One
    /// that ended before it was established is counted as opened and closed, with `flags`.
    /// Returns the series it was counted in (`None` when its ends were never known).
    pub fn close(&self, istio: &IstioTcp, flags: Flags) -> Option<Arc<Series>> {
        let series = match std::mem::take(&mut *self.state()) {
            State::Unknown => return None,
            State::Known(mut labels) => {
                labels.response_flags = flags.as_str();
                let series = istio.series(*labels);
                series.opened.inc();
                series
            }
            State::Open(series) if flags == Flags::None => series,
            // Established, then closed for a reason worth a flag (a policy change): closed
            // under the flagged labels, as Istio counts it.
            State::Open(series) => {
                let mut labels = series.labels.clone();
                labels.response_flags = flags.as_str();
                istio.series(labels)
            }
        };
        series.closed.inc();
        Some(series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, name: &str) -> Workload {
        Workload {
            namespace: ns.into(),
            name: name.into(),
            service_account: "default".into(),
            node: "n1".into(),
            ips: vec![],
            netns: Default::default(),
            cgroup: Default::default(),
            uid: None,
            labels: Default::default(),
            capture: Default::default(),
        }
    }

    fn encode(istio: &IstioTcp) -> String {
        let mut registry = Registry::default();
        istio.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text
    }

    #[test]
    fn a_connection_is_opened_when_established_and_closed_with_its_bytes() {
        let istio = IstioTcp::default();
        let (client, mut server) = (workload("shop", "client"), workload("shop", "api"));
        // Istio's canonical service and revision: app.kubernetes.io/name before app, version
        // when app.kubernetes.io/version is not there; without labels, the name and `latest`.
        server.labels = [
            ("app", "ignored"),
            ("app.kubernetes.io/name", "api-svc"),
            ("version", "v3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let id = SpiffeId::new("cluster.local", "shop", "api").expect("id");
        let report = Report::default();
        report.know(TcpLabels::new(
            Reporter::Source,
            &Party {
                workload: Some(&client),
                principal: None,
            },
            &Party {
                workload: Some(&server),
                principal: Some(&id),
            },
            Some("shop/api"),
            Security::MutualTls,
        ));
        assert!(!encode(&istio).contains("istio_tcp_connections_opened_total{"));
        report.established(&istio);
        let text = encode(&istio);
        assert!(
            text.contains(
                "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\",\
                 source_canonical_service=\"client\",source_canonical_revision=\"latest\",\
                 source_workload_namespace=\"shop\",source_principal=\"unknown\",\
                 source_app=\"client\",source_version=\"latest\",\
                 destination_service=\"api.shop.svc.cluster.local\",\
                 destination_service_namespace=\"shop\",destination_service_name=\"api\",\
                 destination_workload=\"api\",destination_canonical_service=\"api-svc\",\
                 destination_canonical_revision=\"v3\",destination_workload_namespace=\"shop\",\
                 destination_principal=\"spiffe://cluster.local/ns/shop/sa/api\",\
                 destination_app=\"api-svc\",destination_version=\"v3\",\
                 request_protocol=\"tcp\",response_flags=\"-\",\
                 connection_security_policy=\"mutual_tls\"} 1"
            ),
            "{text}"
        );
        let series = report.series().expect("established");
        let (request, response) = series.bytes();
        request.inc_by(10);
        response.inc_by(2000);
        report.close(&istio, Flags::None);
        let text = encode(&istio);
        assert!(text.contains("istio_tcp_connections_closed_total{reporter=\"source\""));
        assert!(
            text.contains("} 2000\n") && text.contains("} 10\n"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_sent_bytes_total{") && l.ends_with(" 2000")),
            "sent is the response: {text}"
        );
    }

    #[test]
    fn a_denied_connection_is_opened_and_closed_with_its_flag() {
        let istio = IstioTcp::default();
        let server = workload("shop", "api");
        let report = Report::default();
        report.know(TcpLabels::new(
            Reporter::Destination,
            &Party::default(),
            &Party {
                workload: Some(&server),
                principal: None,
            },
            None,
            Security::None,
        ));
        report.close(&istio, Flags::Deny);
        let text = encode(&istio);
        for family in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(family)
                    && l.contains("response_flags=\"DENY\"")
                    && l.contains("source_workload=\"unknown\"")
                    && l.contains("connection_security_policy=\"unknown\"")
                    && l.ends_with(" 1")),
                "{family}: {text}"
            );
        }
        // A report that never learnt its ends counts nothing.
        Report::default().close(&istio, Flags::Connect);
        assert!(!encode(&istio).contains("CONNECT"));
    }

    #[test]
    fn the_series_of_a_workload_that_is_gone_are_removed() {
        let istio = IstioTcp::default();
        let (a, b, c) = (
            workload("shop", "a"),
            workload("shop", "b"),
            workload("shop", "c"),
        );
        for (src, dst) in [(&a, &b), (&c, &b)] {
            let report = Report::default();
            report.know(TcpLabels::new(
                Reporter::Destination,
                &Party {
                    workload: Some(src),
                    principal: None,
                },
                &Party {
                    workload: Some(dst),
                    principal: None,
                },
                None,
                Security::MutualTls,
            ));
            report.established(&istio);
            report.close(&istio, Flags::None);
        }
        let present: HashSet<String> = ["shop/a".to_owned(), "shop/b".to_owned()].into();
        assert_eq!(istio.retain_workloads(&present), 1);
        let text = encode(&istio);
        assert!(text.contains("source_workload=\"a\""), "{text}");
        assert!(!text.contains("source_workload=\"c\""), "{text}");
        assert_eq!(istio.retain_workloads(&present), 0);
    }
}
