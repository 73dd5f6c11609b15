//! TLS for HBONE connections, split as kTLS splits it: rustls makes the handshake (its
//! unbuffered API) and hands over the traffic secrets; this module protects the TLS 1.3
//! records itself with ring's AES-GCM, decrypting in place in one large input buffer and
//! encrypting straight into one large output buffer (docs/hbone.md, "Record layer").
//!
//! `handshake` drives rustls, `cipher` seals and opens one record, `read` and `write` are the
//! two halves of the record stream without I/O, and `conn`'s [`TlsStream`] puts them on the
//! socket.

pub mod bench;
mod cipher;
mod conn;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzzing;
mod handshake;
mod read;
#[cfg(feature = "rustls-records")]
mod rustls_traffic;
#[cfg(test)]
mod testing;
mod write;

use std::{io, sync::Arc, time::Duration};

use rustls::{
    client::{ClientConnectionData, UnbufferedClientConnection},
    kernel::KernelConnection,
    pki_types::ServerName,
    server::{ServerConnectionData, UnbufferedServerConnection},
    AlertDescription, ConnectionTrafficSecrets, SupportedCipherSuite,
};
use tokio::net::TcpStream;

#[cfg(not(feature = "rustls-records"))]
pub use self::conn::TlsStream;
#[cfg(feature = "rustls-records")]
pub use self::rustls_traffic::TlsStream;

/// Record header: content type, legacy version, length.
const HEADER_LEN: usize = 5;
/// Largest plaintext of one record.
const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest inner plaintext: content plus content type (RFC 8446 §5.4).
const MAX_INNER_PLAINTEXT: usize = MAX_PLAINTEXT + 1;
/// Largest ciphertext of one record (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Largest post-handshake message accepted (a NewSessionTicket is a few hundred bytes).
const MAX_HANDSHAKE_MESSAGE: usize = 64 << 10;
/// Key updates from the peer in a row without application data between them before the peer
/// is cut off (rustls's limit): each one costs a key derivation.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;
/// Buffers of a connection without traffic for this long are freed.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// TLS content types.
mod content {
    pub(super) const ALERT: u8 = 21;
    pub(super) const HANDSHAKE: u8 = 22;
    pub(super) const APPLICATION_DATA: u8 = 23;
}

/// Errors of the record layer, worded for the operator reading the log. They reach callers as
/// `io::Error`s (kind `InvalidData`, or `UnexpectedEof` for truncation) carrying this value.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    #[error("TLS: peer sent alert {0:?} ({code})", code = u8::from(*.0))]
    AlertReceived(AlertDescription),
    #[error("TLS: record too large: {len} bytes of ciphertext, the limit is {MAX_CIPHERTEXT}")]
    RecordTooLarge { len: usize },
    #[error(
        "TLS: record too short: {len} bytes of ciphertext cannot hold a tag and a content type"
    )]
    RecordTooShort { len: usize },
    #[error(
        "TLS: record too large: {len} bytes of inner plaintext, the limit is {MAX_INNER_PLAINTEXT}"
    )]
    PlaintextTooLarge { len: usize },
    #[error("TLS: bad_record_mac: a record failed authentication (corrupted in transit, or not sent with this connection's keys)")]
    BadRecordMac,
    #[error("TLS: unexpected record type {0} after the handshake: only application_data (23) is allowed")]
    UnexpectedRecordType(u8),
    #[error("TLS: record version {0:#06x} after the handshake: TLS 1.3 records carry 0x0303")]
    BadRecordVersion(u16),
    #[error("TLS: record without a content type (all-zero inner plaintext)")]
    MissingContentType,
    #[error("TLS: unexpected content type {0} in an encrypted record")]
    UnexpectedContentType(u8),
    #[error("TLS: malformed alert: {len} bytes instead of 2")]
    MalformedAlert { len: usize },
    #[error("TLS: unexpected handshake message (type {0}) after the handshake")]
    UnexpectedHandshake(u8),
    #[error("TLS: handshake message too large: {len} bytes, the limit is {MAX_HANDSHAKE_MESSAGE}")]
    HandshakeTooLarge { len: usize },
    #[error("TLS: empty handshake record")]
    EmptyHandshakeRecord,
    #[error("TLS: record of content type {0} inside a fragmented handshake message")]
    Interleaved(u8),
    #[error("TLS: malformed KeyUpdate message")]
    MalformedKeyUpdate,
    #[error("TLS: KeyUpdate not at the end of its record")]
    KeyUpdateNotAligned,
    #[error("TLS: key update failed: {0}")]
    KeyUpdate(rustls::Error),
    #[error("TLS: NewSessionTicket rejected: {0}")]
    SessionTicket(rustls::Error),
    #[error("TLS: the negotiated cipher suite is not supported by the record layer (only TLS13_AES_128_GCM_SHA256 and TLS13_AES_256_GCM_SHA384 are)")]
    UnsupportedCipherSuite,
    #[error("TLS: traffic key material of the wrong size")]
    BadKeyMaterial,
    #[error("TLS: record sequence numbers exhausted")]
    SequenceExhausted,
    #[error("TLS: record encryption failed")]
    Seal,
    #[error("TLS: more than {MAX_KEY_UPDATES_IN_A_ROW} KeyUpdates without application data between them")]
    TooManyKeyUpdates,
    #[error("TLS: too many empty records in a row")]
    TooManyEmptyRecords,
    #[error("TLS: peer closed the connection without close_notify")]
    MissingCloseNotify,
    #[error("TLS: connection closed in the middle of a record ({buffered} bytes of it received)")]
    Truncated { buffered: usize },
    #[error("TLS: write after close_notify")]
    WriteAfterClose,
    #[error("TLS handshake: peer closed the connection")]
    HandshakeEof,
    #[error("TLS handshake: unexpected rustls state: {0}")]
    HandshakeState(&'static str),
    #[error("TLS handshake: {len} bytes received that rustls could not process yet")]
    HandshakeStalled { len: usize },
}

impl Error {
    /// The fatal alert we send the peer for this error, if any.
    fn alert(&self) -> Option<AlertDescription> {
        Some(match self {
            Error::BadRecordMac => AlertDescription::BadRecordMac,
            Error::RecordTooLarge { .. } | Error::PlaintextTooLarge { .. } => {
                AlertDescription::RecordOverflow
            }
            Error::UnexpectedRecordType(_)
            | Error::BadRecordVersion(_)
            | Error::MissingContentType
            | Error::UnexpectedContentType(_)
            | Error::UnexpectedHandshake(_)
            | Error::EmptyHandshakeRecord
            | Error::Interleaved(_)
            | Error::KeyUpdateNotAligned
            | Error::TooManyKeyUpdates
            | Error::TooManyEmptyRecords => AlertDescription::UnexpectedMessage,
            Error::RecordTooShort { .. }
            | Error::MalformedAlert { .. }
            | Error::MalformedKeyUpdate
            | Error::HandshakeTooLarge { .. }
            | Error::SessionTicket(_) => AlertDescription::DecodeError,
            Error::KeyUpdate(_)
            | Error::UnsupportedCipherSuite
            | Error::BadKeyMaterial
            | Error::SequenceExhausted
            | Error::Seal => AlertDescription::InternalError,
            Error::AlertReceived(_)
            | Error::MissingCloseNotify
            | Error::Truncated { .. }
            | Error::WriteAfterClose
            | Error::HandshakeEof
            | Error::HandshakeState(_)
            | Error::HandshakeStalled { .. } => return None,
        })
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        let kind = match e {
            Error::MissingCloseNotify | Error::Truncated { .. } | Error::HandshakeEof => {
                io::ErrorKind::UnexpectedEof
            }
            Error::WriteAfterClose => io::ErrorKind::BrokenPipe,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// Handshakes as a client over `tcp`, verifying the server as `config` says.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    mut tcp: TcpStream,
) -> io::Result<TlsStream> {
    let conn = UnbufferedClientConnection::new(config, name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    #[cfg(feature = "rustls-records")]
    {
        let handshaken = handshake::handshake(conn, &mut tcp).await?;
        Ok(TlsStream::client(tcp, handshaken))
    }
    #[cfg(not(feature = "rustls-records"))]
    {
        let established = handshake::drive(conn, &mut tcp).await?;
        TlsStream::new(tcp, established, Kernel::Client).map_err(io::Error::from)
    }
}

/// Handshakes as a server over `tcp`, verifying the client as `config` says.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    mut tcp: TcpStream,
) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    #[cfg(feature = "rustls-records")]
    {
        let handshaken = handshake::handshake(conn, &mut tcp).await?;
        Ok(TlsStream::server(tcp, handshaken))
    }
    #[cfg(not(feature = "rustls-records"))]
    {
        let established = handshake::drive(conn, &mut tcp).await?;
        TlsStream::new(tcp, established, Kernel::Server).map_err(io::Error::from)
    }
}

/// What rustls keeps after the handshake: the key schedule, for key updates.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    /// A NewSessionTicket: validated and stored by rustls on a client (where resumption is
    /// disabled, as in HBONE, it is dropped); servers never receive one.
    fn new_session_ticket(&mut self, payload: &[u8]) -> Result<(), Error> {
        match self {
            Kernel::Client(k) => k
                .handle_new_session_ticket(payload)
                .map_err(Error::SessionTicket),
            Kernel::Server(_) => Err(Error::UnexpectedHandshake(4)),
        }
    }
}

// Our record layer's own tests (its internals); the tunnel's tests run on either path.
#[cfg(all(test, not(feature = "rustls-records")))]
mod tests;
