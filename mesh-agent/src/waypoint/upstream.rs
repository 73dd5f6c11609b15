//! The waypoint's connections to endpoints: HBONE with the waypoint's own identity (the
//! destination's L4 policy sees the waypoint), then HTTP over the CONNECT stream in the protocol
//! the client spoke. HTTP/1.1 connections are kept for reuse (a connection carries one request
//! at a time); an HTTP/2 connection carries every request to its endpoint at once.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use hyper::{body::Incoming, client::conn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::{
    breaker::{Gate, Permit},
    io::H2Io,
    replay::ReplayBody,
};
use crate::{
    identity::{Leaf, SpiffeId, TrustBundle},
    state::Workload,
    tunnel::{self, client::PoolKey},
};

/// The HTTP version spoken with an endpoint: the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

/// Why a try failed before a response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made (HBONE or the HTTP handshake): nothing reached the endpoint.
    #[error("connecting to {endpoint}: {message}")]
    Connect {
        endpoint: SocketAddr,
        message: String,
    },
    /// A new connection would pass the backend's `max_connections`: nothing was sent.
    #[error("{endpoint}: the backend's connection limit is reached")]
    Overflow { endpoint: SocketAddr },
    /// The request was sent, and the connection or stream failed before the response.
    #[error("request to {endpoint} failed: {source}")]
    Reset {
        endpoint: SocketAddr,
        source: hyper::Error,
    },
}

/// Client TLS configurations by (expected identity, its node).
type TlsConfigs = HashMap<(SpiffeId, String), Arc<rustls::ClientConfig>>;

/// An HTTP/1.1 connection and its place under its backend's connection limit.
type Idle = (conn::http1::SendRequest<ReplayBody>, Permit);

/// HTTP/1.1 connections kept idle per endpoint, at most.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// The waypoint's side of its endpoints.
pub struct Upstream {
    pool: Arc<tunnel::client::Pool>,
    leaf: Arc<ArcSwap<Leaf>>,
    bundle: Arc<ArcSwap<TrustBundle>>,
    /// Client TLS configurations by (expected identity, its node), built on first use; cleared
    /// when the trust bundle changes.
    tls: Mutex<(usize, TlsConfigs)>,
    /// Idle HTTP/1.1 connections by endpoint, each with its place under its backend's
    /// connection limit (released when the connection is dropped).
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    http2: Mutex<HashMap<SocketAddr, conn::http2::SendRequest<ReplayBody>>>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(
        pool: Arc<tunnel::client::Pool>,
        leaf: Arc<ArcSwap<Leaf>>,
        bundle: Arc<ArcSwap<TrustBundle>>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            leaf,
            bundle,
            tls: Mutex::new((0, HashMap::new())),
            idle: Mutex::new(HashMap::new()),
            http2: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    fn client_tls(
        &self,
        expected: &SpiffeId,
        node: &str,
    ) -> Result<Arc<rustls::ClientConfig>, tunnel::Error> {
        let bundle = self.bundle.load_full();
        let generation = Arc::as_ptr(&bundle) as usize;
        let mut cache = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 != generation {
            *cache = (generation, HashMap::new());
        }
        let key = (expected.clone(), node.to_owned());
        if let Some(c) = cache.1.get(&key) {
            return Ok(c.clone());
        }
        let config = tunnel::tls::client_config(
            (*bundle).clone(),
            self.leaf.clone(),
            vec![expected.clone()],
            Some(node.to_owned()),
        )
        .map_err(tunnel::Error::TlsConfig)?;
        cache.1.insert(key, config.clone());
        Ok(config)
    }

    /// A CONNECT stream to `endpoint` (the workload's address and target port) through its
    /// node's HBONE server, expecting the workload's identity.
    pub async fn stream(
        &self,
        endpoint: SocketAddr,
        workload: &Workload,
        expected: &SpiffeId,
        client: SocketAddr,
    ) -> Result<H2Io, Error> {
        let failed = |message: String| Error::Connect { endpoint, message };
        let dst = SocketAddr::new(endpoint.ip(), mesh_common::ports::HBONE);
        let key = PoolKey {
            src: self.leaf.load().id.clone(),
            src_pod: 0,
            dst,
            expected: expected.clone(),
        };
        let open = self.pool.open(
            &key,
            || self.client_tls(expected, &workload.node),
            || tokio::net::TcpStream::connect(dst),
            endpoint,
            client,
            None,
        );
        let stream = tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| failed(format!("timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| failed(e.to_string()))?;
        Ok(H2Io::new(stream.send, stream.recv))
    }

    /// Sends `req` to `endpoint` over a reused or new connection; a new connection takes a
    /// place of `connections` (the backend's `max_connections`) for as long as it lives.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        version: Version,
        endpoint: SocketAddr,
        workload: &Workload,
        expected: &SpiffeId,
        client: SocketAddr,
        connections: &Gate,
        req: Request<ReplayBody>,
    ) -> Result<Response<Incoming>, Error> {
        match version {
            Version::Http1 => {
                let (mut sender, place) = match self.checkout(endpoint) {
                    Some(idle) => idle,
                    None => {
                        let place = self
                            .place(connections)
                            .ok_or(Error::Overflow { endpoint })?;
                        let sender = self
                            .connect_http1(endpoint, workload, expected, client)
                            .await?;
                        (sender, place)
                    }
                };
                let result = sender.send_request(req).await;
                // Ready again once the response has been read: kept for the next request,
                // with its place under the backend's connection limit.
                self.checkin(endpoint, (sender, place));
                result.map_err(|source| Error::Reset { endpoint, source })
            }
            Version::Http2 => {
                let mut sender = self
                    .http2_sender(endpoint, workload, expected, client, connections)
                    .await?;
                sender
                    .send_request(req)
                    .await
                    .map_err(|source| Error::Reset { endpoint, source })
            }
        }
    }

    fn checkout(&self, endpoint: SocketAddr) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&endpoint)?;
        list.retain(|(s, _)| !s.is_closed());
        let ready = list.iter().position(|(s, _)| s.is_ready())?;
        Some(list.swap_remove(ready))
    }

    fn checkin(&self, endpoint: SocketAddr, (sender, place): Idle) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(endpoint).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((sender, place));
        }
    }

    /// A place for a new connection under `connections`: free, or freed by closing an idle
    /// connection of the same backend (to any of its endpoints).
    fn place(&self, connections: &Gate) -> Option<Permit> {
        if let Some(place) = connections.try_acquire() {
            return Some(place);
        }
        let evicted = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.values_mut().find_map(|list| {
                list.iter()
                    .position(|(_, p)| p.of(connections))
                    .map(|i| list.swap_remove(i))
            })
        };
        // Dropping it closes the connection and gives its place back.
        drop(evicted?);
        connections.try_acquire()
    }

    async fn connect_http1(
        &self,
        endpoint: SocketAddr,
        workload: &Workload,
        expected: &SpiffeId,
        client: SocketAddr,
    ) -> Result<conn::http1::SendRequest<ReplayBody>, Error> {
        let io = self.stream(endpoint, workload, expected, client).await?;
        let (sender, connection) = conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(handshake_failed(endpoint))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%endpoint, error = %e, "HTTP/1.1 connection to an endpoint ended");
            }
        });
        Ok(sender)
    }

    async fn http2_sender(
        &self,
        endpoint: SocketAddr,
        workload: &Workload,
        expected: &SpiffeId,
        client: SocketAddr,
        connections: &Gate,
    ) -> Result<conn::http2::SendRequest<ReplayBody>, Error> {
        let existing = self
            .http2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&endpoint)
            .filter(|s| !s.is_closed())
            .cloned();
        if let Some(mut s) = existing {
            if s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        let place = connections
            .try_acquire()
            .ok_or(Error::Overflow { endpoint })?;
        let io = self.stream(endpoint, workload, expected, client).await?;
        let (sender, connection) = conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(handshake_failed(endpoint))?;
        tokio::spawn(async move {
            let _place = place;
            if let Err(e) = connection.await {
                debug!(%endpoint, error = %e, "HTTP/2 connection to an endpoint ended");
            }
        });
        self.http2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(endpoint, sender.clone());
        Ok(sender)
    }
}

/// An HTTP handshake with `endpoint` that failed: nothing was sent (a connect failure).
fn handshake_failed(endpoint: SocketAddr) -> impl FnOnce(hyper::Error) -> Error {
    move |e| Error::Connect {
        endpoint,
        message: e.to_string(),
    }
}
