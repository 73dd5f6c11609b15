//! The node proxy, first form: plain TCP. Outbound connections are accepted on the pod's
//! 127.0.0.1:15001, their original destination recovered from the kernel, resolved (service VIP
//! to endpoint) and connected from inside the pod's network namespace. Inbound connections
//! arrive on the pod's inbound listener through sk_lookup and are delivered to the application
//! port inside the pod. The HBONE (mTLS) seam is `outbound::connect_upstream`: the next issue
//! replaces the plain connect for meshed destinations.

mod copy;
mod inbound;
mod outbound;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    capture::ebpf::OrigDstMap,
    metrics::{ConnCounters, FailureLabels, Metrics},
    state::{Store, Workload},
    sys::Netns,
};

/// How long an upstream connect may take before the client is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy buffer per direction. Large enough for throughput on loopback and veth.
pub const COPY_BUFFER: usize = 64 * 1024;

/// What every proxied connection needs, shared.
#[derive(Debug)]
pub struct Inputs {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// The agent's own network namespace, where threads return after creating pod sockets.
    pub home: Netns,
    pub orig_dst: Arc<OrigDstMap>,
}

/// A captured pod as the proxy sees it.
#[derive(Debug)]
pub struct Pod {
    pub workload: Arc<Workload>,
    pub key: String,
    pub netns: Arc<Netns>,
    pub netns_cookie: u64,
    pub outbound: ConnCounters,
    pub inbound: ConnCounters,
}

impl Pod {
    pub fn new(
        workload: Arc<Workload>,
        netns: Arc<Netns>,
        netns_cookie: u64,
        metrics: &Metrics,
    ) -> Self {
        Self {
            key: workload.key(),
            outbound: metrics.conn_counters("outbound", &workload.namespace, &workload.name),
            inbound: metrics.conn_counters("inbound", &workload.namespace, &workload.name),
            workload,
            netns,
            netns_cookie,
        }
    }

    fn counters(&self, direction: Direction) -> &ConnCounters {
        match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }

    fn count_failure(&self, metrics: &Metrics, direction: Direction, e: &Error) {
        metrics
            .failures
            .get_or_create(&FailureLabels {
                direction: direction.as_str(),
                namespace: self.workload.namespace.clone(),
                workload: self.workload.name.clone(),
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
    #[error("refusing to proxy to {addr}: it is the agent's own port or loopback (a loop)")]
    Loop { addr: SocketAddr },
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "connecting to {addr} timed out after {CONNECT_TIMEOUT:?}: is it reachable from the pod?"
    )]
    ConnectTimeout { addr: SocketAddr },
    #[error("cannot create a socket in the pod's network namespace: {0}")]
    Socket(std::io::Error),
}

impl Error {
    /// A fixed string for the failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoOrigDst { .. } => "no_original_destination",
            Error::OrigDstMap(_) => "original_destination_map",
            Error::NoEndpoints { .. } => "no_endpoints",
            Error::Loop { .. } => "loop",
            Error::Connect { .. } => "connect",
            Error::ConnectTimeout { .. } => "connect_timeout",
            Error::Socket(_) => "socket",
        }
    }
}

/// Which side of a pod a connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The pod connects out (its 127.0.0.1:15001).
    Outbound,
    /// The pod is connected to (its inbound listener, through sk_lookup).
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

/// Serves one of a pod's listeners until `stop`, then takes the connections already queued.
pub fn spawn_listener(
    l: std::net::TcpListener,
    direction: Direction,
    pod: Arc<Pod>,
    inputs: Arc<Inputs>,
    mut stop: watch::Receiver<bool>,
) {
    use tracing::Instrument as _;
    let span = tracing::info_span!("listener", pod = %pod.key, direction = direction.as_str());
    tokio::spawn(
        async move {
            let listener = match tokio::net::TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register the listener with the runtime");
                    return;
                }
            };
            let spawn = |(stream, peer)| {
                tokio::spawn(serve_connection(
                    direction,
                    stream,
                    peer,
                    pod.clone(),
                    inputs.clone(),
                ));
            };
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(conn) => spawn(conn),
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            // Out of file descriptors and similar: back off instead of spinning.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    _ = stop.changed() => break,
                }
            }
            while let Ok(Ok(conn)) = tokio::time::timeout(Duration::ZERO, listener.accept()).await {
                spawn(conn);
            }
            tracing::debug!("listener closed");
        }
        .instrument(span),
    );
}

/// One proxied connection: a span with its addresses, the counters, one log line at the end.
async fn serve_connection(
    direction: Direction,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    inputs: Arc<Inputs>,
) {
    use tracing::{field::Empty, Instrument as _};
    let span = match direction {
        Direction::Outbound => {
            tracing::info_span!("outbound", pod = %pod.key, src = %peer, orig_dst = Empty, endpoint = Empty)
        }
        Direction::Inbound => {
            tracing::info_span!("inbound", pod = %pod.key, src = %peer, dst = Empty)
        }
    };
    async move {
        let counters = pod.counters(direction);
        counters.opened.inc();
        let start = std::time::Instant::now();
        let result = match direction {
            Direction::Outbound => outbound::proxy(stream, peer, &pod, &inputs).await,
            Direction::Inbound => inbound::proxy(stream, &pod, &inputs).await,
        };
        match result {
            Ok((sent, received)) => {
                let duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::info!(sent, received, duration_ms, "connection closed");
            }
            Err(e) => {
                pod.count_failure(&inputs.metrics, direction, &e);
                tracing::warn!(error = %e, "connection failed");
            }
        }
        counters.closed.inc();
    }
    .instrument(span)
    .await;
}

/// Creates a TCP socket inside the pod's network namespace and connects it to `addr`.
async fn connect_in_pod(
    pod: &Pod,
    home: &Netns,
    addr: SocketAddr,
) -> Result<tokio::net::TcpStream, Error> {
    let socket = pod
        .netns
        .run(home, || {
            socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
        })
        .and_then(|s| s)
        .map_err(Error::Socket)?;
    socket.set_nonblocking(true).map_err(Error::Socket)?;
    socket.set_nodelay(true).map_err(Error::Socket)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(Error::Connect { addr, source }),
        Err(_) => Err(Error::ConnectTimeout { addr }),
    }
}

/// Resets a client connection (a refused upstream shows as a reset, not as an empty success).
fn reset(stream: tokio::net::TcpStream) {
    if let Ok(std) = stream.into_std() {
        let _ = crate::sys::set_linger_zero(std::os::fd::AsFd::as_fd(&std));
    }
}
