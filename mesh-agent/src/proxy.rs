//! The node proxy. Outbound connections are accepted on the pod's 127.0.0.1:15001, their
//! original destination recovered from the kernel and resolved (service VIP to endpoint). A
//! destination in the mesh is reached over HBONE (mTLS HTTP/2 CONNECT to its pod's port 15008,
//! presenting the source pod's identity); any other goes as plain TCP from inside the pod's
//! network namespace. Inbound: plaintext connections arrive on the pod's inbound listener and
//! HBONE connections on its HBONE listener, both through sk_lookup, and are delivered to the
//! application port inside the pod.

mod authz;
mod copy;
pub mod inbound;
pub mod limits;
pub mod live;
pub mod metrics;
mod outbound;
pub mod route;
pub mod sampled;
pub mod telemetry;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

pub use crate::capture::listeners::Listener;
use crate::{
    capture::ebpf::OrigDstMap,
    identity::{CertManager, SpiffeId},
    metrics::{ConnCounters, FailureLabels, Metrics, RouteCounters},
    state::{Store, Workload},
    sys::Netns,
    tunnel,
};

/// How long an upstream connect may take before the client is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every proxied connection needs, shared.
#[derive(Debug)]
pub struct Inputs {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// The agent's own network namespace, where threads return after creating pod sockets.
    pub home: Netns,
    pub orig_dst: Arc<OrigDstMap>,
    /// This node's name: HBONE authorities must name one of its workloads.
    pub node: String,
    /// Workload certificates of this node's pods.
    pub certs: Arc<CertManager>,
    /// Outbound HBONE connections.
    pub pool: Arc<tunnel::client::Pool>,
    /// The pods this agent captures, by address (capture keeps it current): destinations the
    /// same-node fast path delivers to directly.
    pub local: LocalPods,
    /// Whether the same-node fast path is on (`hbone.same_node_fast_path`).
    pub same_node_fast_path: bool,
    /// Whether pods get the return path and connections are delivered from the client's
    /// address (`delivery.preserve_client_address`).
    pub preserve_client_address: bool,
    /// How inbound HBONE connections are treated (`hbone.max_connection_age_secs`, idle
    /// timeout and PINGs from `hbone.server`).
    pub hbone_server: tunnel::server::Options,
    /// What inbound HBONE clients may hold (`hbone.server`).
    pub limits: Arc<limits::Limits>,
    /// Every proxied connection and HBONE stream: an agent that stops waits on it until they
    /// have ended (or its drain deadline passes).
    pub tasks: tokio_util::task::TaskTracker,
    /// Every inbound HBONE connection (their streams are in `tasks`): they end once told to
    /// (see [`Drain`]) and their last stream has ended.
    pub hbone: tokio_util::task::TaskTracker,
    /// How far the agent is in stopping; only ever moves forward ([`Inputs::drain_to`]).
    pub drain: watch::Sender<Drain>,
    /// The connections being served (`/connections`).
    pub connections: Arc<live::Connections>,
}

impl Inputs {
    /// Moves the agent's drain state forward to `to` (never back).
    pub fn drain_to(&self, to: Drain) {
        self.drain.send_if_modified(|now| {
            let forward = to > *now;
            if forward {
                *now = to;
            }
            forward
        });
    }
}

/// How far the agent is in stopping, as inbound HBONE connections see it: each tells its
/// client (graceful GOAWAY: open streams go on, the next ones go to a new connection) when it
/// should stop taking new streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Drain {
    /// Serving: no GOAWAY.
    #[default]
    Serving,
    /// The agent handed its listeners to a successor, or was told to stop: the connections
    /// open now send GOAWAY, so that new connections reach the successor. A connection
    /// accepted from now on (no successor yet, so this agent still accepts) is served as
    /// usual: a GOAWAY would only bring its client straight back, one handshake per stream.
    Draining,
    /// No proxied connection or stream is left and the agent is about to exit: every HBONE
    /// connection sends GOAWAY, so that it ends once the streams opened before it are done.
    Closing,
}

/// The captured pods of this node by address, replaced as a whole when capture changes.
pub type LocalPods = arc_swap::ArcSwap<std::collections::HashMap<IpAddr, Arc<Pod>>>;

/// A captured pod as the proxy sees it. Its network namespace is fixed for its life; what the
/// state may change in place (addresses, service account and so identity) is in [`PodState`],
/// swapped as a whole: each connection works with the state it started with.
#[derive(Debug)]
pub struct Pod {
    pub key: String,
    /// `key`, shared by the pod's connections as they list themselves.
    pub shared_key: Arc<str>,
    pub netns: Arc<Netns>,
    pub netns_cookie: u64,
    current: arc_swap::ArcSwap<PodState>,
    pub outbound: ConnCounters,
    pub inbound: ConnCounters,
    /// `mesh_outbound_routes_total` of this pod.
    pub routes: RouteCounters,
    /// Samples the log lines a peer can provoke at will (denials, bad requests).
    pub sampled: sampled::LogSampler,
    /// The (direction, reason) of the failures counted for this pod: the series to remove
    /// with it ([`Pod::remove_series`]).
    failures: std::sync::Mutex<std::collections::BTreeSet<(&'static str, &'static str)>>,
    /// Whether connections are delivered to the application from the client's address (the
    /// pod has its return path, `capture::return_path`); otherwise from the pod's own.
    pub client_address: bool,
}

/// What can change about a captured pod without capturing it again.
#[derive(Debug)]
pub struct PodState {
    pub workload: Arc<Workload>,
    /// The pod's SPIFFE identity (from its service account).
    pub identity: SpiffeId,
    /// TLS of the pod's HBONE listener: presents the pod's current certificate.
    pub server_tls: Arc<rustls::ServerConfig>,
}

impl Pod {
    pub fn new(
        netns: Arc<Netns>,
        netns_cookie: u64,
        state: PodState,
        metrics: &Metrics,
        client_address: bool,
    ) -> Self {
        let w = &state.workload;
        Self {
            client_address,
            key: w.key(),
            shared_key: Arc::from(w.key()),
            outbound: metrics
                .proxy
                .conn_counters("outbound", &w.namespace, &w.name),
            inbound: metrics
                .proxy
                .conn_counters("inbound", &w.namespace, &w.name),
            routes: RouteCounters::new(&w.namespace, &w.name),
            sampled: sampled::LogSampler::default(),
            failures: Default::default(),
            current: arc_swap::ArcSwap::from_pointee(state),
            netns,
            netns_cookie,
        }
    }

    /// The pod's current addresses, identity and TLS.
    pub fn state(&self) -> Arc<PodState> {
        self.current.load_full()
    }

    /// Replaces what changed in place (new connections see it; open ones keep theirs).
    pub fn set_state(&self, state: PodState) {
        self.current.store(Arc::new(state));
    }

    /// Its `mesh_tcp_*` counters of one direction.
    pub fn counters(&self, direction: Direction) -> &ConnCounters {
        match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }

    /// Removes the pod's per-pod series from `metrics` (the pod is no longer served).
    pub fn remove_series(&self, metrics: &Metrics) {
        let w = &self.state().workload;
        let failures: Vec<_> = (self.failures.lock())
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        metrics.proxy.remove_pod(&w.namespace, &w.name, &failures);
    }

    fn count_failure(&self, metrics: &Metrics, direction: Direction, e: &Error) {
        (self.failures.lock())
            .unwrap_or_else(|e| e.into_inner())
            .insert((direction.as_str(), e.reason()));
        metrics
            .proxy
            .failures
            .get_or_create(&FailureLabels {
                direction: direction.as_str(),
                namespace: self.state().workload.namespace.clone(),
                workload: self.state().workload.name.clone(),
                reason: e.reason(),
            })
            .inc();
    }
}

/// Why a proxied connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no original destination recorded for client {client} in this pod: the connection reached \
         the outbound listener without being redirected by mesh_connect4/6 (see mesh_capture_events_total)"
    )]
    NoOrigDst { client: SocketAddr },
    #[error("reading the original destination map failed: {0}")]
    OrigDstMap(std::io::Error),
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: String },
    #[error(
        "service {service} is reached through its namespace's waypoint {waypoint}, which has no \
         pod in the mesh: refused"
    )]
    NoWaypoint { service: String, waypoint: String },
    #[error("refusing to proxy to {addr}: it is the agent's own port or loopback (a loop)")]
    Loop { addr: SocketAddr },
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// EADDRNOTAVAIL: every local port toward `addr` is taken for the address the agent
    /// connects from (the client's, or the pod's own when the client's address is not
    /// preserved): connections open, or closed by the agent first and in TIME_WAIT.
    #[error(
        "connecting to {addr} failed: no free local port toward it in the pod (the pod's \
         ephemeral ports toward it, for the address the agent connects from, are in use or in \
         TIME_WAIT); widen net.ipv4.ip_local_port_range in the pod, or, with \
         delivery.preserve_client_address off, set net.ipv4.tcp_tw_reuse=1 there \
         (docs/performance.md, \"Connection churn and TIME_WAIT\")"
    )]
    NoLocalPort { addr: SocketAddr },
    #[error(
        "connecting to {addr} timed out after {CONNECT_TIMEOUT:?}: is it reachable from the pod?"
    )]
    ConnectTimeout { addr: SocketAddr },
    #[error("cannot create a socket in the pod's network namespace: {0}")]
    Socket(std::io::Error),
    #[error("{0}")]
    Hbone(#[from] tunnel::Error),
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::Error),
    #[error("bad HBONE request from {peer}: {why}")]
    BadRequest { peer: SpiffeId, why: String },
    #[error("no slot to connect to {addr} within {CONNECT_TIMEOUT:?}: hbone.server.max_connects_in_flight are in flight")]
    ConnectsInFlight { addr: SocketAddr },
    #[error("{peer} reset the stream before the application was connected: not connected")]
    EarlyReset { peer: SpiffeId },
    #[error("tunnelled stream: {0}")]
    Stream(std::io::Error),
    #[error("same-node delivery to {pod} failed (its inbound log line says why)")]
    LocalDelivery {
        pod: String,
        /// Istio's flags of the destination's side (`DENY` when its policy refused it).
        flags: telemetry::Flags,
    },
    #[error(
        "denied by policy {} rule {} ({})",
        .0.policy_str(),
        .0.rule_str(),
        .0.reason
    )]
    Denied(Box<crate::policy::Decision>),
    #[error(
        "closed: after a policy change, policy {} rule {} denies it ({})",
        .0.policy_str(),
        .0.rule_str(),
        .0.reason
    )]
    Revoked(Box<crate::policy::Decision>),
}

impl Error {
    /// The destination's policy refused the CONNECT: 403 from our agents, 401 from Istio's
    /// ztunnel.
    pub fn denied_by_destination(&self) -> bool {
        matches!(
            self,
            Error::Hbone(tunnel::Error::Status { status, .. })
                if *status == http::StatusCode::FORBIDDEN
                    || *status == http::StatusCode::UNAUTHORIZED
        )
    }

    /// Istio's `response_flags` for a connection that ended with this error.
    pub fn flags(&self) -> telemetry::Flags {
        match self {
            Error::Denied(_) | Error::Revoked(_) => telemetry::Flags::Deny,
            e if e.denied_by_destination() => telemetry::Flags::Deny,
            Error::Connect { .. }
            | Error::NoLocalPort { .. }
            | Error::ConnectTimeout { .. }
            | Error::ConnectsInFlight { .. }
            | Error::Socket(_)
            | Error::Hbone(_)
            | Error::Identity(_) => telemetry::Flags::Connect,
            Error::LocalDelivery { flags, .. } => *flags,
            _ => telemetry::Flags::None,
        }
    }

    /// A fixed string for the failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoOrigDst { .. } => "no_original_destination",
            Error::OrigDstMap(_) => "original_destination_map",
            Error::NoEndpoints { .. } => "no_endpoints",
            Error::NoWaypoint { .. } => "no_waypoint",
            Error::Loop { .. } => "loop",
            Error::Connect { .. } => "connect",
            Error::NoLocalPort { .. } => "no_local_port",
            Error::ConnectTimeout { .. } => "connect_timeout",
            Error::ConnectsInFlight { .. } => "connects_in_flight",
            Error::Socket(_) => "socket",
            // The destination's agent denied it: its log line names the policy.
            e if e.denied_by_destination() => "hbone_forbidden",
            Error::Hbone(tunnel::Error::Status { .. }) => "hbone_status",
            Error::Hbone(tunnel::Error::Tls { .. } | tunnel::Error::Alpn { .. }) => "hbone_tls",
            Error::Hbone(_) => "hbone",
            Error::Identity(_) => "identity",
            Error::BadRequest { .. } => "bad_request",
            Error::EarlyReset { .. } => "early_reset",
            Error::Stream(_) => "stream",
            Error::LocalDelivery { .. } => "local_delivery",
            Error::Denied(_) => "policy_denied",
            Error::Revoked(_) => "policy_revoked",
        }
    }
}

/// Which side of a pod a connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The pod connects out (its 127.0.0.1:15001).
    Outbound,
    /// The pod is connected to (its inbound listeners, through sk_lookup).
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How the accept loops of a pod are told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Keep accepting.
    Running,
    /// The pod is released: take the connections already queued (nobody else will), then
    /// close.
    Release,
    /// The listeners were handed over to another agent: stop at once; it accepts what is
    /// queued.
    Handover,
}

/// Serves one of a pod's listeners until told to stop (see [`Stop`]). Every connection is a
/// task of `inputs.tasks`, so that an agent that stops accepting can wait for them to end.
pub fn spawn_listener(
    listener: Arc<tokio::net::TcpListener>,
    kind: Listener,
    pod: Arc<Pod>,
    inputs: Arc<Inputs>,
    mut stop: watch::Receiver<Stop>,
) {
    use tracing::Instrument as _;
    let span = tracing::info_span!("listener", pod = %pod.key, kind = kind.as_str());
    tokio::spawn(
        async move {
            let spawn = |(stream, peer): (tokio::net::TcpStream, SocketAddr)| {
                // Bytes are forwarded as they come: never hold a small segment back (Nagle).
                let _ = stream.set_nodelay(true);
                let (pod, inputs) = (pod.clone(), inputs.clone());
                let tasks = inputs.tasks.clone();
                match kind {
                    Listener::Outbound => {
                        tasks.spawn(serve_outbound(stream, peer, pod, inputs));
                    }
                    Listener::Inbound => {
                        tasks.spawn(serve_inbound(stream, peer, pod, inputs));
                    }
                    Listener::Hbone => {
                        let admitted = match inputs.limits.admit(peer.ip()) {
                            Ok(admitted) => admitted,
                            Err(why) => {
                                if let Some(left_out) = pod.sampled.admit() {
                                    tracing::warn!(src = %peer, limit = why.as_str(), left_out, "HBONE connection refused: limit reached (hbone.server)");
                                }
                                reset(stream);
                                return;
                            }
                        };
                        // Read at accept, not when the task first runs (which may be after
                        // the agent started draining).
                        let late = *inputs.drain.borrow() != Drain::Serving;
                        let hbone = inputs.hbone.clone();
                        hbone.spawn(async move {
                            // Until the client has sent something and its handshake has a
                            // slot, its connection costs its socket and this small task: the
                            // connection's future (about 10 KiB) is made after. A peek, not
                            // `readable()`: tokio reports a freshly accepted socket readable
                            // before anything arrived (seen: 1,800 of 2,000 silent connects),
                            // and a peek that finds nothing clears that.
                            let waited = tokio::time::timeout(tunnel::SERVER_HANDSHAKE_TIMEOUT, async {
                                if stream.peek(&mut [0u8; 1]).await? == 0 {
                                    return Ok(None);
                                }
                                Ok::<_, std::io::Error>(admitted.handshake_slot().await)
                            });
                            match waited.await {
                                Ok(Ok(Some(slot))) => {
                                    inbound::serve_hbone(
                                        stream, peer, late, admitted, slot, pod, inputs,
                                    )
                                    .await;
                                }
                                Ok(Ok(None)) => {
                                    tracing::debug!(src = %peer, "HBONE client closed before its handshake");
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(src = %peer, error = %e, "HBONE connection failed before its handshake");
                                }
                                Err(_) => {
                                    tracing::debug!(src = %peer, "HBONE client sent nothing, or found no handshake slot: closed at the handshake timeout");
                                    let e = Error::Hbone(tunnel::Error::Timeout { addr: peer });
                                    pod.count_failure(&inputs.metrics, Direction::Inbound, &e);
                                }
                            }
                        });
                    }
                }
            };
            let how = loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(conn) => spawn(conn),
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            // Out of file descriptors and similar: back off instead of spinning.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    changed = stop.changed() => {
                        let how = *stop.borrow_and_update();
                        match (changed, how) {
                            (Ok(()), Stop::Running) => continue,
                            (Ok(()), how) => break how,
                            // The pod's capture is gone without a word: as a release.
                            (Err(_), _) => break Stop::Release,
                        }
                    }
                }
            };
            if how == Stop::Release {
                while let Ok(Ok(conn)) =
                    tokio::time::timeout(Duration::ZERO, listener.accept()).await
                {
                    spawn(conn);
                }
            }
            tracing::debug!(?how, "listener closed");
        }
        .instrument(span),
    );
}

/// One outbound connection: a span with its addresses, the counters, one log line at the end.
/// Outbound and inbound are separate tasks, not one `match` over both: a future is as large as
/// everything it might await, and an idle connection keeps its whole future allocated.
async fn serve_outbound(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    inputs: Arc<Inputs>,
) {
    use tracing::{field::Empty, Instrument as _};
    let span = tracing::info_span!(
        "outbound",
        pod = %pod.key,
        src = %peer,
        orig_dst = Empty,
        endpoint = Empty,
        route = Empty,
        transport = Empty,
        peer_identity = Empty,
        hbone_conn = Empty
    );
    let conn = inputs
        .connections
        .open(Direction::Outbound, &pod.shared_key, peer);
    let work = std::pin::pin!(outbound::proxy(stream, peer, &pod, &inputs, &conn));
    // Logged and counted by `account`.
    let _ = account(Direction::Outbound, &pod, &inputs, &conn, work)
        .instrument(span)
        .await;
}

/// One plaintext inbound connection, as [`serve_outbound`]. (HBONE streams get the same
/// treatment in `inbound::serve_hbone`.)
async fn serve_inbound(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    inputs: Arc<Inputs>,
) {
    use tracing::{field::Empty, Instrument as _};
    let span = tracing::info_span!(
        "inbound",
        pod = %pod.key,
        src = %peer,
        dst = Empty,
        decision = Empty,
        policy = Empty,
        rule = Empty,
        audit = Empty
    );
    let conn = inputs
        .connections
        .open(Direction::Inbound, &pod.shared_key, peer);
    let work = std::pin::pin!(inbound::proxy(stream, peer, &pod, &inputs, &conn));
    // Logged and counted by `account`.
    let _ = account(Direction::Inbound, &pod, &inputs, &conn, work)
        .instrument(span)
        .await;
}

/// Counts and logs one proxied connection (or HBONE stream) around its work.
/// Returns the byte counts, or Istio's flags of the failure when the connection failed (already
/// logged and counted).
///
/// `work` comes pinned in the caller's future: a future passed by value to an async fn is
/// stored twice (as the argument and as the value awaited), and an idle connection would keep
/// both copies of its largest state allocated.
async fn account(
    direction: Direction,
    pod: &Pod,
    inputs: &Inputs,
    conn: &live::Conn,
    work: std::pin::Pin<&mut impl std::future::Future<Output = Result<(u64, u64), Error>>>,
) -> Result<(u64, u64), telemetry::Flags> {
    let report = &conn.report;
    let counters = pod.counters(direction);
    counters.opened.inc();
    let start = std::time::Instant::now();
    let result = work.await;
    let flags = result
        .as_ref()
        .map_or_else(Error::flags, |_| telemetry::Flags::None);
    // Bytes were counted as they moved (`live::Meter`), in both families.
    let series = report.close(&inputs.metrics.istio, flags);
    let labels = series.as_deref().map(|s| &s.labels);
    let end = |f: fn(&telemetry::TcpLabels) -> &telemetry::Label| telemetry::Known(labels.map(f));
    let duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    // What moved, also of a connection that failed mid-way (a reset, a policy change).
    let (sent, received) = conn.progress.get();
    // The access log: one line per connection as it ends, its ends as the metrics name them
    // (the span adds addresses, route and, inbound, the policy decision), and why it ended:
    // `close` is `closed` (both sides finished) or the failure's reason (as
    // `mesh_tcp_connection_failures_total` counts it), `flags` Istio's.
    macro_rules! access {
        ($level:expr, $message:literal $(, $($field:tt)+)?) => {
            tracing::event!(
                target: "access",
                $level,
                sent,
                received,
                duration_ms,
                src.workload = %end(|l| &l.source_workload),
                src.namespace = %end(|l| &l.source_workload_namespace),
                src.identity = %end(|l| &l.source_principal),
                dst.workload = %end(|l| &l.destination_workload),
                dst.namespace = %end(|l| &l.destination_workload_namespace),
                dst.identity = %end(|l| &l.destination_principal),
                dst.service = %end(|l| &l.destination_service),
                flags = flags.as_str(),
                $($($field)+,)?
                $message
            )
        };
    }
    use tracing::Level;
    let result = match result {
        Ok((sent, received)) => {
            access!(Level::INFO, "connection closed", close = "closed");
            Ok((sent, received))
        }
        Err(e) => {
            pod.count_failure(&inputs.metrics, direction, &e);
            let close = e.reason();
            match &e {
                // Decisions, not faults: the span says which policy and rule. A peer can
                // provoke these at will: counted always, logged sampled.
                Error::Denied(d) => {
                    if let Some(left_out) = pod.sampled.admit() {
                        access!(Level::INFO, "connection denied", close, policy = %d.policy_str(), rule = %d.rule_str(), reason = %d.reason, left_out);
                    }
                }
                Error::Revoked(d) => access!(
                    Level::INFO,
                    "connection closed by a policy change",
                    close,
                    policy = %d.policy_str(),
                    rule = %d.rule_str(),
                    reason = %d.reason
                ),
                // Counted; not worth a line each (a flood of them closes the connection, logged).
                Error::EarlyReset { .. } => {
                    access!(Level::DEBUG, "connection failed", close, error = %e)
                }
                // A decision too, the destination's: its own log names the policy.
                e if e.denied_by_destination() => {
                    access!(Level::INFO, "connection denied by the destination's policy", close, error = %e)
                }
                Error::BadRequest { .. } => {
                    if let Some(left_out) = pod.sampled.admit() {
                        access!(Level::WARN, "connection failed", close, error = %e, left_out);
                    }
                }
                _ => access!(Level::WARN, "connection failed", close, error = %e),
            }
            Err(flags)
        }
    };
    counters.closed.inc();
    result
}

/// Creates a TCP socket inside the pod's network namespace and connects it to `addr`: from
/// `client`'s address when given and the pod delivers from clients' addresses (see
/// [`delivery_socket`]), else from the pod's own.
async fn connect_in_pod(
    pod: &Pod,
    home: &Netns,
    addr: SocketAddr,
    client: Option<IpAddr>,
) -> Result<tokio::net::TcpStream, Error> {
    let client = client.filter(|ip| pod.client_address && transparent_from(pod, *ip, addr));
    let socket = match client {
        Some(ip) => delivery_socket(pod, home, ip, addr),
        None => pod_socket(pod, home, addr),
    }
    .map_err(Error::Socket)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) if source.kind() == std::io::ErrorKind::AddrNotAvailable => {
            Err(Error::NoLocalPort { addr })
        }
        Ok(Err(source)) => Err(Error::Connect { addr, source }),
        Err(_) => Err(Error::ConnectTimeout { addr }),
    }
}

/// Whether a delivery to `addr` needs (and can have) a socket bound to `client`: of the same
/// family, and not one of the pod's own addresses (those it has anyway).
fn transparent_from(pod: &Pod, client: IpAddr, addr: SocketAddr) -> bool {
    client.is_ipv4() == addr.is_ipv4()
        && !client.is_loopback()
        && !client.is_unspecified()
        && !pod.current.load().workload.ips.contains(&client)
}

/// Connects to `addr` from inside the pod's network namespace on behalf of `client`, which is
/// reset when that fails (a refused upstream shows as a reset, not as an empty success).
/// `from`: the client's address, for a delivery to the application (`None` for an outbound
/// connection, which leaves from the pod's own). Returns both. Boxed: the connect future is
/// large and done long before the connection.
async fn connect_for(
    client: tokio::net::TcpStream,
    pod: &Pod,
    home: &Netns,
    addr: SocketAddr,
    from: Option<IpAddr>,
) -> Result<(tokio::net::TcpStream, tokio::net::TcpStream), Error> {
    match Box::pin(connect_in_pod(pod, home, addr, from)).await {
        Ok(upstream) => Ok((client, upstream)),
        Err(e) => {
            reset(client);
            Err(e)
        }
    }
}

/// A non-blocking TCP socket for `addr`, created inside the pod's network namespace.
fn pod_socket(pod: &Pod, home: &Netns, addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = pod.netns.run(home, || new_socket(addr))??;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

fn new_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    // Non-blocking from the start (SOCK_NONBLOCK): no fcntl calls per connection.
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// A socket in the pod's namespace that connects to the application at `addr` from `client`'s
/// address, as ztunnel does: the application (and its logs) see the real client, and the
/// connection's 4-tuple is the client's own, so TIME_WAIT is spread over one port range per
/// client as on the direct path. `IP_TRANSPARENT` lets it bind an address the pod does not
/// have; the mark brings the application's answers back to it over `lo`
/// (`capture::return_path`), and being bound to `lo` is what lets the kernel's default
/// `tcp_tw_reuse=2` ("loopback only") reuse its TIME_WAIT ports, so a client's churn is not
/// capped by the server pod's port range. The port is chosen at connect time
/// (`IP_BIND_ADDRESS_NO_PORT`), per destination.
fn delivery_socket(
    pod: &Pod,
    home: &Netns,
    client: IpAddr,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = pod
        .netns
        .run(home, || -> std::io::Result<socket2::Socket> {
            let socket = new_socket(addr)?;
            socket.set_mark(crate::capture::return_path::MARK)?;
            if client.is_ipv4() {
                socket.set_ip_transparent(true)?;
                crate::sys::set_bind_address_no_port(std::os::fd::AsFd::as_fd(&socket))?;
            } else {
                crate::sys::set_ipv6_transparent(std::os::fd::AsFd::as_fd(&socket))?;
            }
            socket.bind_device(Some(b"lo"))?;
            socket.bind(&SocketAddr::new(client, 0).into())?;
            Ok(socket)
        })??;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

/// Resets a client connection (a refused upstream shows as a reset, not as an empty success).
fn reset(stream: tokio::net::TcpStream) {
    if let Ok(std) = stream.into_std() {
        let _ = crate::sys::set_linger_zero(std::os::fd::AsFd::as_fd(&std));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destinations_401_or_403_is_its_policy_refusal() {
        let status = |status| {
            Error::Hbone(tunnel::Error::Status {
                addr: "10.0.0.2:15008".parse().expect("addr"),
                authority: "10.0.0.2:8080".parse().expect("addr"),
                status,
            })
        };
        for (code, reason) in [
            (http::StatusCode::FORBIDDEN, "hbone_forbidden"),
            (http::StatusCode::UNAUTHORIZED, "hbone_forbidden"),
            (http::StatusCode::SERVICE_UNAVAILABLE, "hbone_status"),
            (http::StatusCode::BAD_REQUEST, "hbone_status"),
        ] {
            assert_eq!(status(code).reason(), reason, "{code}");
            assert_eq!(
                status(code).denied_by_destination(),
                reason == "hbone_forbidden"
            );
        }
    }
}
