//! The HBONE client: a pool of mTLS HTTP/2 connections per (source identity, destination
//! address, expected destination identity), multiplexing one CONNECT stream per proxied TCP
//! connection. A new stream goes to the connection of the key carrying the fewest streams;
//! while every connection is busy and the key has fewer than `max_conns`, another one is opened
//! first, so that concurrent streams spread over several connections (each connection's
//! encryption runs in one task, on one core at a time: one saturated connection must not cap
//! a node pair). A connection takes at most `max_streams`. Connections idle longer than `idle`
//! are closed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::{net::TcpStream, time::Instant};
use tracing::{debug, info, warn, Instrument as _};

use super::{liveness, record, settings, tls, Error, HANDSHAKE_TIMEOUT};
use crate::identity::SpiffeId;

/// What a pooled connection is for. One source pod's tunnels are its own, as ztunnel keys them
/// (source identity, source address, destination): the destination decides each stream on the
/// address the tunnel came from, and a tunnel lives in its source pod's network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: SpiffeId,
    /// The source pod: its network namespace cookie (the tunnel is dialled from inside it,
    /// from the pod's address).
    pub src_pod: u64,
    /// `<destination pod ip>:15008`.
    pub dst: SocketAddr,
    pub expected: SpiffeId,
}

/// Pool metrics ([`PoolMetrics::registered`] registers them).
#[derive(Clone, Debug, Default)]
pub struct PoolMetrics {
    /// HBONE connections opened (TLS handshakes made).
    pub connections_opened: Counter,
    /// HBONE connections currently pooled.
    pub connections: Gauge,
    /// CONNECT streams opened.
    pub streams_opened: Counter,
    /// CONNECT streams the server refused unprocessed (draining) and that were opened again.
    pub streams_retried: Counter,
}

impl PoolMetrics {
    /// New pool metrics, registered in `metrics`.
    pub fn registered(metrics: &crate::metrics::Metrics) -> Self {
        let m = Self::default();
        metrics.register(
            "mesh_hbone_connections_opened",
            "HBONE connections opened (TLS handshakes)",
            m.connections_opened.clone(),
        );
        metrics.register(
            "mesh_hbone_connections",
            "HBONE connections in the pool",
            m.connections.clone(),
        );
        metrics.register(
            "mesh_hbone_streams_opened",
            "HBONE CONNECT streams opened",
            m.streams_opened.clone(),
        );
        metrics.register(
            "mesh_hbone_streams_retried",
            "HBONE CONNECT streams a draining peer refused unprocessed, opened again on another \
             connection",
            m.streams_retried.clone(),
        );
        m
    }
}

/// Pool limits.
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    /// Streams per connection before another connection is opened.
    pub max_streams: usize,
    /// Connections per key that concurrent streams are spread over.
    pub max_conns: usize,
    /// Idle time after which a connection without streams is closed.
    pub idle: Duration,
    /// A connection takes no new stream after this, nor after the server's certificate
    /// expires; it closes once its last stream has ended.
    pub max_age: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams: settings::MAX_CONCURRENT_STREAMS as usize,
            max_conns: default_max_conns(),
            idle: Duration::from_secs(60),
            max_age: Duration::from_secs(3600),
        }
    }
}

/// Connections per key by default: one per core, at most four (each one costs a handshake).
pub fn default_max_conns() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
}

#[derive(Debug)]
struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    /// Set by the connection's driver task when it ends (the task holds only this, not the
    /// request handle: h2 closes a connection once every request handle is dropped).
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
    /// From then on the connection takes no new stream (see [`PoolConfig::max_age`]).
    retire_at: tokio::time::Instant,
}

impl Conn {
    /// Open, and young enough for a new stream.
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && tokio::time::Instant::now() < self.retire_at
    }
}

/// A CONNECT stream; holding it keeps the connection's stream count.
#[derive(Debug)]
pub struct Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Which pooled connection carries it (for logs).
    pub conn_id: u64,
    _guard: Guard,
}

#[derive(Debug)]
struct Guard(Arc<Conn>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// The pool.
#[derive(Debug)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    /// One dial at a time per key: a burst of new streams shares one new connection instead
    /// of each making a TLS handshake.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    config: PoolConfig,
    metrics: PoolMetrics,
    next_id: AtomicU64,
}

impl Pool {
    pub fn new(config: PoolConfig, metrics: PoolMetrics) -> Arc<Self> {
        let pool = Arc::new(Self {
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            config,
            metrics,
            next_id: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval((config.idle / 2).max(Duration::from_millis(10)));
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { break };
                pool.expire_idle();
            }
        });
        pool
    }

    /// Opens a CONNECT stream to `authority` through an HBONE connection for `key`, dialling a
    /// new connection with `dial` (a TCP connect from the source pod) when none has room.
    pub async fn open<D, DF>(
        &self,
        key: &PoolKey,
        tls: impl Fn() -> Result<Arc<rustls::ClientConfig>, Error>,
        dial: D,
        authority: SocketAddr,
        forwarded_for: SocketAddr,
        initial: Option<Bytes>,
    ) -> Result<Stream, Error>
    where
        D: Fn() -> DF,
        DF: std::future::Future<Output = std::io::Result<TcpStream>>,
    {
        let addr = key.dst;
        // A stream the server refused without processing it (REFUSED_STREAM, or beyond the
        // last stream of a graceful GOAWAY: its agent is handing over to a successor) is
        // opened again on another connection; nothing of it reached an application.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let opened = self.try_open(key, &tls, &dial, authority, forwarded_for, initial.clone());
            match opened.await {
                Err(Error::H2 { source, .. })
                    if attempt < MAX_ATTEMPTS && refused_unprocessed(&source) =>
                {
                    debug!(dst = %addr, attempt, error = %source, "HBONE stream refused unprocessed; opening it again");
                    self.metrics.streams_retried.inc();
                }
                result => return result,
            }
        }
    }

    async fn try_open<D, DF>(
        &self,
        key: &PoolKey,
        tls: &impl Fn() -> Result<Arc<rustls::ClientConfig>, Error>,
        dial: &D,
        authority: SocketAddr,
        forwarded_for: SocketAddr,
        initial: Option<Bytes>,
    ) -> Result<Stream, Error>
    where
        D: Fn() -> DF,
        DF: std::future::Future<Output = std::io::Result<TcpStream>>,
    {
        let addr = key.dst;
        let h2_err = |source| Error::H2 { addr, source };
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .header("forwarded", format!("for=\"{forwarded_for}\""))
            .body(())
            .map_err(|e| Error::BadAuthority {
                authority,
                message: e.to_string(),
            })?;
        // A pooled connection the server is draining (GOAWAY) or that just failed refuses new
        // streams: mark it closed and try once more, on another connection.
        let mut retried = false;
        let (conn, mut send) = loop {
            let conn = self.acquire(key, tls, dial).await?;
            match conn.send.clone().ready().await {
                Ok(send) => break (conn, send),
                Err(e) => {
                    conn.closed.store(true, Ordering::Release);
                    conn.active.fetch_sub(1, Ordering::AcqRel);
                    if retried {
                        return Err(h2_err(e));
                    }
                    retried = true;
                    debug!(conn = conn.id, error = %e, "pooled HBONE connection refuses new streams; retrying");
                }
            }
        };
        let guard = Guard(conn.clone());
        let (response, mut stream) = send.send_request(request, false).map_err(h2_err)?;
        self.metrics.streams_opened.inc();
        // Bytes the client already sent go with the request (one write, one round trip less
        // before the destination sees them); the peer discards them if it refuses the stream.
        if let Some(initial) = initial.filter(|b| !b.is_empty()) {
            stream.reserve_capacity(initial.len());
            stream.send_data(initial, false).map_err(h2_err)?;
        }
        let response = match response.await {
            Ok(response) => response,
            Err(e) => {
                if e.is_go_away() {
                    // The connection takes no more streams.
                    conn.closed.store(true, Ordering::Release);
                }
                return Err(h2_err(e));
            }
        };
        if response.status() != StatusCode::OK {
            return Err(Error::Status {
                addr,
                authority,
                status: response.status(),
            });
        }
        Ok(Stream {
            send: stream,
            recv: response.into_body(),
            conn_id: conn.id,
            _guard: guard,
        })
    }

    /// A connection with room for one more stream (counted in): pooled, or dialled now.
    async fn acquire<D, DF>(
        &self,
        key: &PoolKey,
        tls: &impl Fn() -> Result<Arc<rustls::ClientConfig>, Error>,
        dial: &D,
    ) -> Result<Arc<Conn>, Error>
    where
        D: Fn() -> DF,
        DF: std::future::Future<Output = std::io::Result<TcpStream>>,
    {
        Ok(match self.checkout(key) {
            Some(conn) => conn,
            None => {
                let gate = self
                    .dialing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key.clone())
                    .or_default()
                    .clone();
                let _turn = gate.lock().await;
                // Whoever dialled while we waited may have made room for us.
                match self.checkout(key) {
                    Some(conn) => conn,
                    // Boxed: the handshake futures are large and only this rare path needs them.
                    None => match Box::pin(self.dial(key, tls, dial)).await {
                        Ok(conn) => conn,
                        // A failed extra connection must not fail a stream that an existing
                        // connection can carry.
                        Err(e) => self.checkout_any(key).ok_or(e)?,
                    },
                }
            }
        })
    }

    /// The live connection for `key` with the fewest streams, counted in; `None` when none has
    /// room, or when all are busy and the key may still get another connection (spreading).
    fn checkout(&self, key: &PoolKey) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        let before = list.len();
        list.retain(|c| !c.closed.load(Ordering::Acquire));
        self.metrics
            .connections
            .dec_by(i64::try_from(before - list.len()).unwrap_or(0));
        let may_grow = list.iter().filter(|c| c.usable()).count() < self.config.max_conns;
        // Streams are only added under this lock; they may end concurrently, which only makes
        // the choice conservative.
        let conn = list
            .iter()
            .filter(|c| c.usable())
            .min_by_key(|c| c.active.load(Ordering::Acquire))?;
        let active = conn.active.load(Ordering::Acquire);
        if active >= self.config.max_streams || (active > 0 && may_grow) {
            return None;
        }
        conn.active.fetch_add(1, Ordering::AcqRel);
        Some(conn.clone())
    }

    /// Any live connection for `key` with room, counted in (no spreading).
    fn checkout_any(&self, key: &PoolKey) -> Option<Arc<Conn>> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .get(key)?
            .iter()
            .filter(|c| c.usable())
            .find(|c| {
                c.active
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.config.max_streams).then_some(n + 1)
                    })
                    .is_ok()
            })
            .cloned()
    }

    async fn dial<D, DF>(
        &self,
        key: &PoolKey,
        tls: &impl Fn() -> Result<Arc<rustls::ClientConfig>, Error>,
        dial: &D,
    ) -> Result<Arc<Conn>, Error>
    where
        D: Fn() -> DF,
        DF: std::future::Future<Output = std::io::Result<TcpStream>>,
    {
        let addr = key.dst;
        let config = tls()?;
        let activity = liveness::Activity::new();
        let handshake = async {
            let tcp = dial()
                .await
                .map_err(|source| Error::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let server_name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = record::connect(config, server_name, tcp)
                .await
                .map_err(|source| Error::Tls { addr, source })?;
            if tls.alpn_protocol() != Some(tls::ALPN_H2) {
                return Err(Error::Alpn { addr });
            }
            let peer_not_after = tls
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(tls::not_after_of)
                .unwrap_or(0);
            h2::client::Builder::new()
                .initial_window_size(settings::STREAM_WINDOW)
                .initial_connection_window_size(settings::CLIENT_CONNECTION_WINDOW)
                .max_frame_size(settings::MAX_FRAME)
                .max_send_buffer_size(settings::MAX_SEND_BUFFER)
                .max_concurrent_reset_streams(settings::MAX_CONCURRENT_RESET_STREAMS)
                .handshake::<_, Bytes>(liveness::Watched::new(tls, activity.clone()))
                .await
                .map(|(send, connection)| (send, connection, peer_not_after))
                .map_err(|source| Error::H2 { addr, source })
        };
        let (send, mut connection, peer_not_after) =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
                .await
                .map_err(|_| Error::Timeout { addr })??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            send,
            active: AtomicUsize::new(1),
            closed: Arc::new(AtomicBool::new(false)),
            idle_since: Mutex::new(Instant::now()),
            retire_at: super::retire_at(peer_not_after, self.config.max_age),
        });
        info!(conn = id, dst = %addr, src = %key.src, peer_identity = %key.expected, "HBONE connection opened");
        self.metrics.connections_opened.inc();
        self.metrics.connections.inc();
        let unresponsive = liveness::unresponsive(
            connection.ping_pong(),
            activity,
            settings::PING_INTERVAL,
            settings::PING_TIMEOUT,
        );
        let driver_closed = conn.closed.clone();
        tokio::spawn(
            async move {
                let result = tokio::select! {
                    r = &mut connection => r.map_err(|e| e.to_string()),
                    () = unresponsive => Err(format!(
                        "no sign of the server for {:?}: it took nothing we sent and answered no PING",
                        settings::PING_INTERVAL + settings::PING_TIMEOUT
                    )),
                };
                driver_closed.store(true, Ordering::Release);
                match result {
                    Ok(()) => debug!("HBONE connection closed"),
                    Err(e) => warn!(error = %e, "HBONE connection ended"),
                }
            }
            .instrument(tracing::debug_span!("hbone_conn", conn = id, dst = %addr)),
        );
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }

    /// Closes connections without streams for longer than `idle` (dropping the last request
    /// handle lets h2 close the connection).
    fn expire_idle(&self) {
        let now = Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0i64;
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(*c.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
                        >= self.config.idle;
                // A retired connection leaves the pool at once: its open streams keep it (they
                // hold it), and h2 closes it after the last one.
                let retired = tokio::time::Instant::now() >= c.retire_at;
                let keep = !idle && !retired && !c.closed.load(Ordering::Acquire);
                if !keep {
                    removed += 1;
                    if retired {
                        debug!(conn = c.id, "HBONE connection retired (maximum age or the server's certificate expired)");
                    } else {
                        debug!(conn = c.id, "HBONE connection expired");
                    }
                }
                keep
            });
        }
        conns.retain(|_, list| !list.is_empty());
        drop(conns);
        // Forget dial gates nobody holds or waits for.
        self.dialing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, gate| Arc::strong_count(gate) > 1);
        self.metrics.connections.dec_by(removed);
    }
}

/// How often one stream is opened before a refusal is returned to the caller.
const MAX_ATTEMPTS: u32 = 3;

/// Whether the server refused a stream without processing it (RFC 9113 section 8.7): reset
/// with REFUSED_STREAM, or above the last stream id of a graceful GOAWAY (NO_ERROR). Only
/// these are safe to open again: anything else may have reached the application.
fn refused_unprocessed(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR)))
}
