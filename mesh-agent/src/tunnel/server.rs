//! The HBONE server: TLS (client certificate required), HTTP/2, one CONNECT per stream.
//! Everything in a request is untrusted input: only the verified peer certificate says who the
//! client is; the authority only selects a port, and the proxy checks it names this pod.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream, SendStream};
use http::{Response, StatusCode};
use tokio::net::TcpStream;
use tracing::debug;

use super::{connect, liveness, record, settings, tls, Error, SERVER_HANDSHAKE_TIMEOUT};
use crate::identity::SpiffeId;

/// One CONNECT request on an authenticated HBONE connection.
#[derive(Debug)]
pub struct Request {
    /// The client's identity, from its verified certificate (shared by the connection's streams).
    pub peer: Arc<SpiffeId>,
    /// The address the HBONE connection reached (the pod's address, through sk_lookup).
    pub local: SocketAddr,
    /// The TCP peer of the HBONE connection (the client's node or pod address).
    pub remote: SocketAddr,
    /// `:authority`, parsed; `Err` says why it is unusable (answered 400 by `reject`).
    pub authority: Result<SocketAddr, &'static str>,
    /// `forwarded` header, informational only.
    pub forwarded: Option<String>,
    respond: SendResponse<Bytes>,
    body: RecvStream,
    early_resets: Arc<EarlyResets>,
}

/// Streams of one connection the client reset before they were answered (rapid reset: each
/// costs the server work and costs the client nothing).
#[derive(Debug, Default)]
struct EarlyResets {
    count: std::sync::atomic::AtomicU32,
    over: tokio::sync::Notify,
}

impl Request {
    /// Runs `work` (connecting to the application) unless the client resets the stream first:
    /// the work of a reset stream is dropped, never finished. `None` when it was reset; past
    /// [`settings::MAX_EARLY_RESETS`] such streams the connection is closed with
    /// GOAWAY(ENHANCE_YOUR_CALM).
    pub async fn unless_reset<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let reset = std::future::poll_fn(|cx| self.respond.poll_reset(cx));
        tokio::select! {
            done = work => Some(done),
            _ = reset => {
                let n = self
                    .early_resets
                    .count
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                if n == settings::MAX_EARLY_RESETS {
                    self.early_resets.over.notify_one();
                }
                None
            }
        }
    }

    /// Answers with an error status and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let _ = self.respond.send_response(response(status), true);
    }

    /// Answers 200 and returns the stream for copying.
    pub fn accept(mut self) -> Result<(SendStream<Bytes>, RecvStream), h2::Error> {
        let send = self
            .respond
            .send_response(response(StatusCode::OK), false)?;
        Ok((send, self.body))
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// How a server treats its connections besides their streams (`hbone.server` in the agent's
/// configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// A connection takes no new stream after this long (nor past the client's certificate).
    pub max_age: Duration,
    /// A connection without an open stream for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// A client that shows no sign of life this long (it took none of our bytes, sent none) is
    /// PINGed, unless our bytes already wait on it.
    pub ping_interval: Duration,
    /// ... and dropped after this long more without a sign or an answer: it no longer reads
    /// what it is sent (dead, or keeping the server's buffers full on purpose). A client that
    /// reads, however slowly, is not ([`super::liveness`]).
    pub ping_timeout: Duration,
}

impl Options {
    /// The defaults, with connections retired at `max_age`.
    pub fn with_max_age(max_age: Duration) -> Self {
        Self {
            max_age,
            idle_timeout: settings::SERVER_IDLE_TIMEOUT,
            ping_interval: settings::SERVER_PING_INTERVAL,
            ping_timeout: settings::SERVER_PING_TIMEOUT,
        }
    }
}

/// Serves one HBONE connection: handshakes, then hands every request to `handle` (spawned per
/// stream); a request that is not a usable CONNECT arrives with `authority: Err(why)`, for the
/// handler to answer 400 and count. When `drain` completes (the agent hands its work to a
/// successor), the connection is shut down gracefully: GOAWAY (h2 sends two, a PING apart, so
/// that no stream in flight is lost), the streams already open go on, the client opens its
/// next streams on a new connection. The same happens at `options.max_age`, when the client's
/// certificate expires and when no stream has been open for `options.idle_timeout`. A client
/// that stops reading, or is gone, is dropped ([`Options::ping_timeout`]). Returns when the
/// connection ends.
///
/// `gate` is awaited once the client has sent its first bytes, and what it yields is held until
/// the handshake is over (the caller's bound on handshakes in flight); the wait counts against the handshake
/// timeout. `admit` sees the client's certificate chain (already verified) before any stream
/// is served, and may take its time (the agent waits for its state to place the client's
/// identity on the node that issued it); `Err(why)` closes the connection.
pub async fn serve<F, Fut, A, AFut, G>(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    handle: F,
    drain: impl std::future::Future<Output = ()>,
    options: Options,
    gate: impl std::future::Future<Output = G>,
    admit: A,
) -> Result<(), Error>
where
    F: Fn(Request) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
    A: FnOnce(Vec<rustls::pki_types::CertificateDer<'static>>) -> AFut,
    AFut: std::future::Future<Output = Result<(), String>>,
{
    let remote = tcp.peer_addr().map_err(|source| Error::Connect {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let local = tcp.local_addr().map_err(|source| Error::Connect {
        addr: remote,
        source,
    })?;
    let _ = tcp.set_nodelay(true);
    let activity = liveness::Activity::new();
    let handshake = async {
        // A connect that never sends takes no handshake slot (nor any buffer) while it waits.
        // A peek: tokio may report the socket readable before anything arrived.
        tcp.peek(&mut [0u8; 1]).await.map_err(|source| Error::Tls {
            addr: remote,
            source,
        })?;
        let _permit = gate.await;
        let tls = record::accept(config, tcp)
            .await
            .map_err(|source| Error::Tls {
                addr: remote,
                source,
            })?;
        if tls.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(Error::Alpn { addr: remote });
        }
        let leaf = tls.peer_certificates().and_then(|c| c.first());
        let peer = leaf.and_then(tls::identity_of).ok_or_else(|| Error::Tls {
            addr: remote,
            source: std::io::Error::other("verified peer has no SPIFFE id"),
        })?;
        let peer_not_after = leaf.and_then(tls::not_after_of).unwrap_or(0);
        let chain = tls
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        let suite = tls.negotiated_cipher_suite().suite();
        let conn = h2::server::Builder::new()
            .initial_window_size(settings::STREAM_WINDOW)
            .initial_connection_window_size(settings::SERVER_CONNECTION_WINDOW)
            .max_frame_size(settings::MAX_FRAME)
            .max_concurrent_streams(settings::MAX_CONCURRENT_STREAMS)
            .max_send_buffer_size(settings::MAX_SEND_BUFFER)
            .max_concurrent_reset_streams(settings::MAX_CONCURRENT_RESET_STREAMS)
            .max_header_list_size(settings::MAX_HEADER_LIST)
            .handshake::<_, Bytes>(liveness::Watched::new(tls, activity.clone()))
            .await
            .map_err(|source| Error::H2 {
                addr: remote,
                source,
            })?;
        Ok((peer, peer_not_after, suite, conn, chain))
    };
    let (peer, peer_not_after, suite, mut conn, chain) =
        tokio::time::timeout(SERVER_HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| Error::Timeout { addr: remote })??;
    // No stream is served before the client is admitted (h2 holds what it sends meanwhile).
    admit(chain).await.map_err(|why| Error::Tls {
        addr: remote,
        source: std::io::Error::other(why),
    })?;
    debug!(%remote, %peer, peer_not_after, ?suite, "HBONE connection established");
    let peer = Arc::new(peer);
    let mut drain = std::pin::pin!(drain);
    let retire = tokio::time::sleep_until(super::retire_at(peer_not_after, options.max_age));
    let mut retire = std::pin::pin!(retire);
    let mut draining = false;
    let early_resets = Arc::new(EarlyResets::default());
    let mut calmed = false;
    let open = Arc::new(OpenStreams::default());
    let idle = tokio::time::sleep(options.idle_timeout);
    let mut idle = std::pin::pin!(idle);
    let unresponsive = liveness::unresponsive(
        conn.ping_pong(),
        activity,
        options.ping_interval,
        options.ping_timeout,
    );
    let mut unresponsive = std::pin::pin!(unresponsive);
    loop {
        // `accept` also drives the connection (the open streams' data): it runs until the
        // connection ends, draining or not.
        let next = tokio::select! {
            next = conn.accept() => next,
            () = early_resets.over.notified(), if !calmed => {
                calmed = true;
                tracing::warn!(%remote, %peer, resets = settings::MAX_EARLY_RESETS, "HBONE client reset its streams before they were answered, again and again (rapid reset): GOAWAY(ENHANCE_YOUR_CALM)");
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                continue;
            }
            () = &mut drain, if !draining => {
                draining = true;
                debug!(%remote, "draining: GOAWAY");
                conn.graceful_shutdown();
                continue;
            }
            // No new stream past the client's certificate or the connection's maximum age:
            // its next ones come on a new connection, with a current certificate.
            () = &mut retire, if !draining => {
                draining = true;
                debug!(%remote, %peer, peer_not_after, "HBONE connection retired (maximum age or the client's certificate expired): GOAWAY");
                conn.graceful_shutdown();
                continue;
            }
            () = &mut idle, if !draining => {
                match open.idle_since() {
                    Some(since) if since.elapsed() >= options.idle_timeout => {
                        draining = true;
                        debug!(%remote, %peer, idle = ?options.idle_timeout, "HBONE connection idle: GOAWAY");
                        conn.graceful_shutdown();
                    }
                    Some(since) => idle.as_mut().reset(since + options.idle_timeout),
                    None => idle.as_mut().reset(tokio::time::Instant::now() + options.idle_timeout),
                }
                continue;
            }
            // The client stopped reading (its streams' data piles up here), or is gone.
            // Dropping the connection frees what it holds (the streams' applications see a
            // reset).
            () = &mut unresponsive => {
                return Err(Error::Unresponsive { addr: remote, waited: options.ping_timeout });
            }
        };
        let (req, respond) = match next {
            None => break,
            Some(Ok(next)) => next,
            // Told to go away, the client may close as soon as it has no stream left, before
            // the server's final GOAWAY is out: an end, not a failure.
            Some(Err(e)) if draining && e.is_io() => {
                debug!(%remote, error = %e, "HBONE client closed after GOAWAY");
                break;
            }
            Some(Err(source)) => {
                return Err(Error::H2 {
                    addr: remote,
                    source,
                })
            }
        };
        let authority = connect::authority(&req);
        let forwarded = connect::forwarded(&req);
        let body = req.into_body();
        let stream = OpenStreams::open(&open);
        let work = handle(Request {
            peer: peer.clone(),
            local,
            remote,
            authority,
            forwarded,
            respond,
            body,
            early_resets: early_resets.clone(),
        });
        // The guard rides in the combinator's closure. An `async move { let _s = stream;
        // work.await }` block would keep `work` twice, as its captured value and as the value
        // it awaits: 1,176 bytes more per stream of the agent's task (`-Zprint-type-sizes`).
        tokio::spawn(futures::FutureExt::map(work, move |()| drop(stream)));
    }
    Ok(())
}

/// The streams of a connection that are being served, and since when none is.
#[derive(Debug)]
struct OpenStreams {
    /// (open streams, when the last one ended or the connection was established).
    state: std::sync::Mutex<(usize, tokio::time::Instant)>,
}

impl Default for OpenStreams {
    fn default() -> Self {
        Self {
            state: std::sync::Mutex::new((0, tokio::time::Instant::now())),
        }
    }
}

impl OpenStreams {
    fn open(this: &Arc<Self>) -> OpenStream {
        this.lock().0 += 1;
        OpenStream(this.clone())
    }

    /// Since when no stream is open; `None` while one is.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        let (open, since) = *self.lock();
        (open == 0).then_some(since)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, tokio::time::Instant)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A stream being served; dropped when its work ends.
#[derive(Debug)]
struct OpenStream(Arc<OpenStreams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.0 -= 1;
        if state.0 == 0 {
            state.1 = tokio::time::Instant::now();
        }
    }
}
