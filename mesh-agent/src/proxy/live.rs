//! The connections the node proxy serves right now, for the admin endpoint's `/connections`
//! and `mesh-agent inspect connections`: each one's pod, direction, addresses, identities (as
//! its Istio report names them), route, policy decision, age and bytes so far.
//!
//! A connection registers when its task starts ([`Connections::open`]) and leaves when the
//! task ends (the [`Registered`] guard). The byte copiers add to its counters as bytes move
//! (one relaxed atomic add per chunk), so a long transfer shows its progress, not only its
//! total at the end. Listing copies what it needs under the table's lock: it never waits on a
//! connection.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::{metrics::ConnCounters, telemetry::Report, Direction};

/// Bytes moved so far, each way, from the pod's side (`sent`) and toward it (`received`).
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl Progress {
    /// Both counters (pod's side first).
    pub fn get(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// Where the bytes of one connection's pod side are counted as they move: the connection's
/// progress (`/connections`), its pod's `mesh_tcp_sent_bytes` / `mesh_tcp_received_bytes`, and
/// its `istio_tcp_*` series once established; so a long transfer shows in every family while
/// it runs, as in ztunnel, not at its end.
#[derive(Debug)]
pub struct Side<'a> {
    progress: &'a Progress,
    /// The pod's counters: bytes from its side, toward it.
    pod: (&'a Counter, &'a Counter),
    /// The Istio series' counters: bytes from the pod's side, toward it.
    istio: Option<(Counter, Counter)>,
}

impl<'a> Side<'a> {
    /// `conn`, a connection of a pod with `counters`, on `direction`'s side. Made once the
    /// connection is established (its Istio series is known then).
    pub fn new(conn: &'a Conn, counters: &'a ConnCounters, direction: Direction) -> Self {
        let istio = conn.report.series().map(|series| {
            let (request, response) = series.bytes();
            match direction {
                // The pod is the client: it sends the request.
                Direction::Outbound => (request.clone(), response.clone()),
                Direction::Inbound => (response.clone(), request.clone()),
            }
        });
        Self {
            progress: &conn.progress,
            pod: (&counters.sent, &counters.received),
            istio,
        }
    }

    /// `n` bytes from the pod's side.
    fn sent(&self, n: u64) {
        self.progress.sent.fetch_add(n, Ordering::Relaxed);
        self.pod.0.inc_by(n);
        if let Some((from, _)) = &self.istio {
            from.inc_by(n);
        }
    }

    /// `n` bytes toward the pod's side.
    fn received(&self, n: u64) {
        self.progress.received.fetch_add(n, Ordering::Relaxed);
        self.pod.1.inc_by(n);
        if let Some((_, to)) = &self.istio {
            to.inc_by(n);
        }
    }
}

/// Where a copy loop adds the bytes it moves: the connection's side, and the other end's
/// when that is a connection of this agent too (a same-node delivery: the source pod's
/// outbound connection, whose bytes are the same ones the other way round).
#[derive(Debug)]
pub struct Meter<'a> {
    pub side: Side<'a>,
    pub mirror: Option<Side<'a>>,
}

impl Meter<'_> {
    /// `n` bytes from the pod's side.
    pub fn from_pod(&self, n: u64) {
        self.side.sent(n);
        if let Some(m) = &self.mirror {
            m.received(n);
        }
    }

    /// `n` bytes toward the pod's side.
    pub fn to_pod(&self, n: u64) {
        self.side.received(n);
        if let Some(m) = &self.mirror {
            m.sent(n);
        }
    }
}

/// How a connection reaches or leaves its pod, as `/connections` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Outbound over HBONE to the endpoint, or inbound from an HBONE stream.
    Hbone,
    /// Outbound over HBONE to the namespace's waypoint.
    Waypoint,
    /// Between two pods of this agent, without a tunnel.
    Local,
    /// Plain TCP (outside the mesh, or from a client outside it).
    Plaintext,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Hbone => "hbone",
            Transport::Waypoint => "waypoint",
            Transport::Local => "local",
            Transport::Plaintext => "plaintext",
        }
    }
}

/// `Detail::rule` when no rule decided (4 bytes, not an `Option`'s 8).
const NO_RULE: u32 = u32::MAX;

/// What is known of a connection beyond its report: set once by the path that serves it.
/// Kept small (every open connection has one): codes, not strings.
#[derive(Debug, Clone)]
struct Detail {
    /// Outbound: the original destination; inbound: the application's address.
    dst: Option<SocketAddr>,
    /// Outbound: the endpoint chosen.
    endpoint: Option<SocketAddr>,
    transport: Option<Transport>,
    /// Inbound: the policy that decided the connection (`None`: none did) and its rule;
    /// `decided` once a decision admitted it.
    policy: Option<Arc<str>>,
    /// [`NO_RULE`] when none.
    rule: u32,
    decided: bool,
    /// Immutable; here, in the padding, rather than in [`Conn`].
    direction: Option<Direction>,
}

impl Detail {
    fn new(direction: Direction) -> Self {
        Self {
            dst: None,
            endpoint: None,
            transport: None,
            policy: None,
            rule: NO_RULE,
            decided: false,
            direction: Some(direction),
        }
    }
}

/// One proxied connection (or HBONE stream). About 200 bytes for as long as it is open.
#[derive(Debug)]
pub struct Conn {
    /// Unique among the connections of this agent.
    id: u64,
    /// `namespace/name` of the pod served.
    pod: Arc<str>,
    /// The client's address as the agent saw it.
    src: SocketAddr,
    start: Instant,
    /// The connection's `istio_tcp_*` report: who is at either end.
    pub report: Report,
    /// Bytes so far, fed by the copy loops.
    pub progress: Progress,
    detail: Mutex<Detail>,
}

impl Conn {
    fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client's address as the agent saw it.
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    /// The destination: the original one (outbound) or the application's address (inbound).
    pub fn set_dst(&self, dst: SocketAddr) {
        self.detail().dst = Some(dst);
    }

    /// Outbound: the endpoint chosen and how it is reached.
    pub fn set_route(&self, endpoint: SocketAddr, transport: Transport) {
        let mut d = self.detail();
        d.endpoint = Some(endpoint);
        d.transport = Some(transport);
    }

    /// Inbound: how it arrived.
    pub fn set_transport(&self, transport: Transport) {
        self.detail().transport = Some(transport);
    }

    /// Inbound: the decision on the connection (listed only when it admitted it: a denied
    /// connection ends at once).
    pub fn set_decision(&self, d: &crate::policy::Decision) {
        let mut detail = self.detail();
        detail.decided = d.allowed;
        detail.policy = d.policy.clone();
        detail.rule = d
            .rule
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(NO_RULE);
    }

    /// What `/connections` shows of it.
    fn view(&self, now: Instant, wall: SystemTime) -> View {
        let detail = self.detail().clone();
        let labels = self.report.labels();
        let label = |f: fn(&super::telemetry::TcpLabels) -> String| labels.as_ref().map(f);
        let (sent, received) = self.progress.get();
        let age = now.duration_since(self.start);
        View {
            id: self.id,
            pod: self.pod.to_string(),
            direction: detail.direction.map_or("", Direction::as_str),
            src: self.src,
            dst: detail.dst,
            endpoint: detail.endpoint,
            transport: detail.transport.map(Transport::as_str),
            src_workload: label(|l| party(&l.source_workload_namespace, &l.source_workload)),
            src_identity: label(|l| l.source_principal.to_string()),
            dst_workload: label(|l| {
                party(&l.destination_workload_namespace, &l.destination_workload)
            }),
            dst_identity: label(|l| l.destination_principal.to_string()),
            dst_service: label(|l| l.destination_service.to_string()),
            security: labels.as_ref().map(|l| l.connection_security_policy),
            // Only an admitted connection is listed with a decision: a denied one ends at once.
            decision: detail.decided.then_some("allow"),
            policy: detail
                .decided
                .then(|| detail.policy.as_deref().unwrap_or("-").to_owned()),
            rule: (detail.rule != NO_RULE).then_some(detail.rule),
            started_unix_ms: wall
                .checked_sub(age)
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            sent,
            received,
        }
    }
}

/// `namespace/name`, or `unknown`.
fn party(namespace: &super::telemetry::Label, name: &super::telemetry::Label) -> String {
    match (namespace.is_known(), name.is_known()) {
        (true, true) => format!("{namespace}/{name}"),
        _ => "unknown".to_owned(),
    }
}

/// One connection as `/connections` lists it. Bytes are the pod's: `sent` from its side,
/// `received` toward it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct View {
    /// Unique among the connections of this agent.
    pub id: u64,
    pub pod: String,
    pub direction: &'static str,
    pub src: SocketAddr,
    pub dst: Option<SocketAddr>,
    pub endpoint: Option<SocketAddr>,
    pub transport: Option<&'static str>,
    pub src_workload: Option<String>,
    pub src_identity: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
    pub dst_service: Option<String>,
    pub security: Option<&'static str>,
    pub decision: Option<&'static str>,
    pub policy: Option<String>,
    pub rule: Option<u32>,
    pub started_unix_ms: u64,
    pub age_ms: u64,
    pub sent: u64,
    pub received: u64,
}

/// Every connection being served, by id.
#[derive(Debug, Default)]
pub struct Connections {
    next: std::sync::atomic::AtomicU64,
    table: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Connections {
    /// Registers a new connection of `pod`, from `src`; it leaves when the guard is dropped.
    pub fn open(
        self: &Arc<Self>,
        direction: Direction,
        pod: &Arc<str>,
        src: SocketAddr,
    ) -> Registered {
        let conn = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            pod: pod.clone(),
            src,
            start: Instant::now(),
            report: Report::default(),
            progress: Progress::default(),
            detail: Mutex::new(Detail::new(direction)),
        });
        self.lock().insert(conn.id, conn.clone());
        Registered {
            conn,
            table: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every open connection, oldest first.
    pub fn list(&self) -> Vec<View> {
        let conns: Vec<Arc<Conn>> = self.lock().values().cloned().collect();
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut views: Vec<View> = conns.iter().map(|c| c.view(now, wall)).collect();
        views.sort_by_key(|v| v.id);
        views
    }
}

/// A registered connection: removed from the table when dropped (the connection ended).
#[derive(Debug)]
pub struct Registered {
    conn: Arc<Conn>,
    table: Arc<Connections>,
}

impl std::ops::Deref for Registered {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.lock().remove(&self.conn.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_listed_with_its_progress_until_it_ends() {
        let table = Arc::new(Connections::default());
        let pod: Arc<str> = Arc::from("shop/web");
        let a = table.open(
            Direction::Outbound,
            &pod,
            "10.0.0.1:40000".parse().expect("addr"),
        );
        let b = table.open(
            Direction::Inbound,
            &pod,
            "10.0.0.2:40001".parse().expect("addr"),
        );
        a.set_dst("10.96.0.10:80".parse().expect("addr"));
        a.set_route("10.0.1.5:8080".parse().expect("addr"), Transport::Hbone);
        a.progress.sent.fetch_add(100, Ordering::Relaxed);
        a.progress.received.fetch_add(7, Ordering::Relaxed);
        let listed = table.list();
        assert_eq!(listed.len(), 2);
        let first = &listed[0];
        assert_eq!(
            (first.pod.as_str(), first.direction),
            ("shop/web", "outbound")
        );
        assert_eq!((first.sent, first.received), (100, 7));
        assert_eq!(first.transport, Some("hbone"));
        assert_eq!(first.src_workload, None, "no report yet");
        assert_eq!(listed[1].direction, "inbound");
        drop(a);
        let left = table.list();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].direction, left[0].src), ("inbound", b.src()));
        drop(b);
        assert!(table.is_empty());
    }

    #[test]
    fn an_open_connection_costs_one_small_allocation() {
        // With its reference counts, within jemalloc's 224-byte class (docs/performance.md,
        // "Memory"): every open connection has one.
        assert!(
            std::mem::size_of::<Conn>() + 16 <= 224,
            "{}",
            std::mem::size_of::<Conn>()
        );
    }
}
