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

use serde::Serialize;

use super::{telemetry::Report, Direction};

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

/// Where a copy loop adds the bytes it moves: the connection's progress, and the other end's
/// when that is a connection of this agent too (a same-node delivery: the source pod's
/// outbound connection, whose bytes are the same ones the other way round).
#[derive(Debug, Clone, Copy)]
pub struct Meter<'a> {
    pub pod: &'a Progress,
    pub mirror: Option<&'a Progress>,
}

impl Meter<'_> {
    /// `n` bytes from the pod's side.
    pub fn from_pod(&self, n: u64) {
        self.pod.sent.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = self.mirror {
            m.received.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// `n` bytes toward the pod's side.
    pub fn to_pod(&self, n: u64) {
        self.pod.received.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = self.mirror {
            m.sent.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// What is known of a connection beyond its report: set once by the path that serves it.
#[derive(Debug, Default, Clone)]
struct Detail {
    /// Outbound: the original destination; inbound: the application's address.
    dst: Option<SocketAddr>,
    /// Outbound: the endpoint chosen and how it is reached.
    endpoint: Option<SocketAddr>,
    transport: Option<&'static str>,
    /// Inbound: the policy decision (`allow`), its policy and rule.
    decision: Option<(&'static str, Arc<str>, Option<usize>)>,
}

/// One proxied connection (or HBONE stream).
#[derive(Debug)]
pub struct Conn {
    id: u64,
    direction: Direction,
    /// `namespace/name` of the pod served.
    pod: Arc<str>,
    /// The client's address as the agent saw it.
    src: SocketAddr,
    started: SystemTime,
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

    /// Outbound: the endpoint chosen and how it is reached (`hbone`, `waypoint`, `local`,
    /// `plaintext`).
    pub fn set_route(&self, endpoint: SocketAddr, transport: &'static str) {
        let mut d = self.detail();
        d.endpoint = Some(endpoint);
        d.transport = Some(transport);
    }

    /// Inbound: how it arrived (`hbone`, `plaintext`, `local`).
    pub fn set_transport(&self, transport: &'static str) {
        self.detail().transport = Some(transport);
    }

    /// Inbound: the decision that admitted the connection.
    pub fn set_decision(&self, d: &crate::policy::Decision) {
        self.detail().decision = Some((d.verdict(), d.policy_label(), d.rule));
    }

    /// What `/connections` shows of it.
    fn view(&self, now: Instant) -> View {
        let detail = self.detail().clone();
        let labels = self.report.labels();
        let label = |f: fn(&super::telemetry::TcpLabels) -> String| labels.as_ref().map(f);
        let (sent, received) = self.progress.get();
        View {
            id: self.id,
            pod: self.pod.to_string(),
            direction: self.direction.as_str(),
            src: self.src,
            dst: detail.dst,
            endpoint: detail.endpoint,
            transport: detail.transport,
            src_workload: label(|l| party(&l.source_workload_namespace, &l.source_workload)),
            src_identity: label(|l| l.source_principal.to_string()),
            dst_workload: label(|l| {
                party(&l.destination_workload_namespace, &l.destination_workload)
            }),
            dst_identity: label(|l| l.destination_principal.to_string()),
            dst_service: label(|l| l.destination_service.to_string()),
            security: labels.as_ref().map(|l| l.connection_security_policy),
            decision: detail.decision.as_ref().map(|d| d.0),
            policy: detail.decision.as_ref().map(|d| d.1.to_string()),
            rule: detail.decision.as_ref().and_then(|d| d.2),
            started_unix_ms: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            age_ms: u64::try_from(now.duration_since(self.start).as_millis()).unwrap_or(u64::MAX),
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
    pub rule: Option<usize>,
    pub started_unix_ms: u64,
    pub age_ms: u64,
    pub sent: u64,
    pub received: u64,
}

/// Every connection being served, by id.
#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
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
            direction,
            pod: pod.clone(),
            src,
            started: SystemTime::now(),
            start: Instant::now(),
            report: Report::default(),
            progress: Progress::default(),
            detail: Mutex::default(),
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
        let now = Instant::now();
        let mut views: Vec<View> = conns.iter().map(|c| c.view(now)).collect();
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
        a.set_route("10.0.1.5:8080".parse().expect("addr"), "hbone");
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
        assert_eq!(
            table.list().iter().map(|v| v.id).collect::<Vec<_>>(),
            [b.id]
        );
        drop(b);
        assert!(table.is_empty());
    }
}
