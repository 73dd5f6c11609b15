//! HBONE: TCP streams tunnelled as HTTP/2 CONNECT over mutual TLS between node agents, wire
//! compatible with Istio ambient's ztunnel (docs/hbone.md).
//!
//! `server` terminates HBONE on a pod's port 15008 (`connect` judges its CONNECT requests);
//! `client` keeps a pool of HBONE connections and opens one CONNECT stream per proxied TCP
//! connection; `liveness` tells both when the peer is gone; `stream` copies between a TCP
//! socket and an HTTP/2 stream; `tls` holds the TLS configurations and SPIFFE verification;
//! `record` makes the handshake with rustls and then protects the TLS records itself.

pub mod client;
pub mod connect;
pub mod liveness;
// With rustls-records, our own traffic path is built but not used.
#[cfg_attr(feature = "rustls-records", allow(dead_code, unused_imports))]
pub mod record;
pub mod server;
pub mod stream;
pub mod tls;

use std::{net::SocketAddr, time::Duration};

/// HTTP/2 settings, chosen to match ztunnel and measured in docs/hbone.md.
pub mod settings {
    /// Streams one HBONE connection carries at once (server SETTINGS).
    pub const MAX_CONCURRENT_STREAMS: u32 = 200;
    /// Per-stream receive window: 4 MiB keeps one stream from stalling on a fast path.
    pub const STREAM_WINDOW: u32 = 4 << 20;
    /// Client connection window: 16 MiB, so several busy streams share a connection.
    pub const CLIENT_CONNECTION_WINDOW: u32 = 16 << 20;
    /// Server connection window.
    pub const SERVER_CONNECTION_WINDOW: u32 = 16 << 20;
    /// Largest DATA frame: 1 MiB, fewer frames per byte.
    pub const MAX_FRAME: u32 = 1 << 20;
    /// Send buffer per stream before backpressure: what a client that stops reading can make
    /// the server hold per stream (its streams × this, until it is found unresponsive:
    /// [`super::liveness`]).
    pub const MAX_SEND_BUFFER: usize = 256 << 10;
    /// Reset streams remembered; bounds the cost of reset floods.
    pub const MAX_CONCURRENT_RESET_STREAMS: usize = 64;
    /// Streams of one connection the client may reset before they are answered (after h2
    /// accepted them; h2 itself bounds those reset before); one more and the connection is
    /// closed with GOAWAY(ENHANCE_YOUR_CALM).
    pub const MAX_EARLY_RESETS: u32 = 100;
    /// Largest header list the server takes (SETTINGS_MAX_HEADER_LIST_SIZE): a CONNECT carries
    /// a few short headers; a larger block is refused before it costs memory.
    pub const MAX_HEADER_LIST: u32 = 16 << 10;
    /// Client: a server that shows no sign of life this long (it took none of our bytes, sent
    /// none) is sent a PING, unless our bytes already wait on it; after `PING_TIMEOUT` more
    /// without a sign or an answer the connection is dropped ([`super::liveness`]).
    pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
    pub const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
    /// Server: an HBONE connection with no open stream for this long is closed (GOAWAY); well
    /// above the client pool's idle time, so that clients close their own first.
    pub const SERVER_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
    /// Server: as [`PING_INTERVAL`], for clients.
    pub const SERVER_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
    /// Server: as [`PING_TIMEOUT`], for clients.
    pub const SERVER_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
}

/// When a connection stops taking new streams: at `max_age` from now, or when the peer's
/// certificate expires (`peer_not_after`, Unix seconds), whichever comes first.
pub fn retire_at(peer_not_after: i64, max_age: Duration) -> tokio::time::Instant {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let left = u64::try_from(peer_not_after)
        .unwrap_or(0)
        .saturating_sub(now_unix);
    tokio::time::Instant::now() + max_age.min(Duration::from_secs(left))
}

/// How long a TLS + HTTP/2 handshake may take (client side).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take over its handshake with our server: a connection that stalls it
/// holds memory and a descriptor, so it is cut sooner.
pub const SERVER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of HBONE, worded for the operator reading the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("HBONE connect to {addr} failed: {source} (is port 15008 reachable between nodes?)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HBONE connect to {addr} timed out: is port 15008 reachable between nodes?")]
    Timeout { addr: SocketAddr },
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("HBONE peer {addr} took nothing we sent and answered no PING for {waited:?} after a quiet interval: it reads nothing, connection dropped")]
    Unresponsive { addr: SocketAddr, waited: Duration },
    #[error("HBONE peer {addr} did not negotiate ALPN h2")]
    Alpn { addr: SocketAddr },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("HBONE CONNECT to {authority} via {addr} answered {status}")]
    Status {
        addr: SocketAddr,
        authority: SocketAddr,
        status: http::StatusCode,
    },
    #[error("cannot build a CONNECT request for {authority}: {message}")]
    BadAuthority {
        authority: SocketAddr,
        message: String,
    },
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::Error),
}

#[cfg(test)]
mod tests;
