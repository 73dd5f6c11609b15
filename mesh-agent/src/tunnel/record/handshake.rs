//! The handshake: rustls's unbuffered API driven over the socket until the connection may send
//! and receive application data, then converted into its traffic secrets and the
//! [`KernelConnection`] that computes the next secrets on key updates.

use std::io;

use rustls::{
    client::{ClientConnectionData, UnbufferedClientConnection},
    kernel::KernelConnection,
    pki_types::CertificateDer,
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{ConnectionState, EncodeError, EncodeTlsData, UnbufferedStatus},
    ExtractedSecrets,
};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::{read::READ_MIN, Error, MAX_HANDSHAKE_MESSAGE};

/// The largest amount of unprocessed handshake bytes held at once: a handshake message of the
/// largest size rustls accepts, in records of the largest size.
const HANDSHAKE_BUFFER_MAX: usize = MAX_HANDSHAKE_MESSAGE + 8 * READ_MIN;

/// What the two sides of an unbuffered connection share, for one handshake driver.
pub(super) trait Unbuffered: Send {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn is_handshaking(&self) -> bool;
    fn alpn_protocol(&self) -> Option<&[u8]>;
    fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]>;
    #[cfg_attr(not(feature = "rustls-records"), allow(dead_code))]
    fn suite(&self) -> Option<rustls::SupportedCipherSuite>;
    fn into_kernel(self)
        -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
}

macro_rules! unbuffered {
    ($conn:ty, $data:ty) => {
        impl Unbuffered for $conn {
            type Data = $data;

            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }

            fn is_handshaking(&self) -> bool {
                (**self).is_handshaking()
            }

            fn alpn_protocol(&self) -> Option<&[u8]> {
                (**self).alpn_protocol()
            }

            fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
                (**self).peer_certificates()
            }

            fn suite(&self) -> Option<rustls::SupportedCipherSuite> {
                (**self).negotiated_cipher_suite()
            }

            fn into_kernel(
                self,
            ) -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error> {
                self.dangerous_into_kernel_connection()
            }
        }
    };
}

unbuffered!(UnbufferedClientConnection, ClientConnectionData);
unbuffered!(UnbufferedServerConnection, ServerConnectionData);

/// A finished handshake, ready for the record layer.
pub(super) struct Established<Data> {
    pub(super) secrets: ExtractedSecrets,
    pub(super) kernel: KernelConnection<Data>,
    pub(super) alpn: Option<Vec<u8>>,
    pub(super) peer_certificates: Option<Vec<CertificateDer<'static>>>,
    /// Bytes read past the last record rustls processed: the start of the record stream.
    pub(super) buffered: Vec<u8>,
    /// Application data rustls decrypted along with the peer's last handshake records.
    pub(super) plaintext: Vec<u8>,
    /// The peer sent close_notify along with its last handshake records.
    pub(super) peer_closed: bool,
}

/// A rustls error as tokio-rustls reports it: the `rustls::Error` inside an `InvalidData`
/// `io::Error`, so callers can tell which check failed.
pub(super) fn rustls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Drives `conn` through the handshake over `tcp` and hands the connection over to the record
/// layer as its traffic secrets and key schedule.
pub(super) async fn drive<C: Unbuffered>(
    conn: C,
    tcp: &mut TcpStream,
) -> io::Result<Established<C::Data>> {
    let Handshaken {
        conn,
        buffered,
        plaintext,
        peer_closed,
    } = handshake(conn, tcp).await?;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let peer_certificates = conn.peer_certificates().map(<[_]>::to_vec);
    let (secrets, kernel) = conn.into_kernel().map_err(rustls_io)?;
    Ok(Established {
        secrets,
        kernel,
        alpn,
        peer_certificates,
        buffered,
        plaintext,
        peer_closed,
    })
}

/// A rustls connection whose handshake is done, with what arrived after it.
pub(super) struct Handshaken<C> {
    pub(super) conn: C,
    /// Bytes read past the last record rustls processed: the start of the record stream.
    pub(super) buffered: Vec<u8>,
    /// Application data rustls decrypted along with the peer's last handshake records.
    pub(super) plaintext: Vec<u8>,
    /// The peer sent close_notify along with its last handshake records.
    pub(super) peer_closed: bool,
}

/// Drives `conn` through the handshake over `tcp`. On failure the alert rustls queued (if any)
/// is sent before the error is returned, so the peer learns why.
pub(super) async fn handshake<C: Unbuffered>(
    mut conn: C,
    tcp: &mut TcpStream,
) -> io::Result<Handshaken<C>> {
    // No buffer before the peer sends something: a connection that never does (thousands of
    // idle connects) costs no more than its socket.
    let mut incoming: Vec<u8> = Vec::new();
    let mut outgoing: Vec<u8> = Vec::new();
    let mut plaintext: Vec<u8> = Vec::new();
    let mut peer_closed = false;
    loop {
        // One record at a time: rustls must stop at the end of the handshake. A record after
        // the peer's Finished (in the same flight) is ours to read: were rustls to process a
        // KeyUpdate there, it would answer it into a queue the hand-over drops, and change
        // our key with no KeyUpdate on the wire.
        let end = first_record_end(&incoming);
        // More records are buffered behind this one: take them before reading the socket.
        let more_buffered = end < incoming.len();
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..end]);
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                incoming.drain(..discard.min(incoming.len()));
                send_alert(&mut conn, &mut incoming, tcp).await;
                return Err(rustls_io(e));
            }
        };
        let mut need_input = false;
        let mut may_write = false;
        match state {
            ConnectionState::EncodeTlsData(mut data) => encode(&mut data, &mut outgoing)?,
            ConnectionState::TransmitTlsData(transmit) => {
                tcp.write_all(&outgoing).await?;
                outgoing = Vec::new();
                transmit.done();
            }
            ConnectionState::BlockedHandshake => need_input = true,
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(rustls_io)?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
            }
            ConnectionState::PeerClosed => peer_closed = true,
            ConnectionState::WriteTraffic(_) => may_write = true,
            ConnectionState::Closed => return Err(Error::HandshakeState("closed").into()),
            _ => return Err(Error::HandshakeState("early data, which HBONE does not use").into()),
        }
        incoming.drain(..discard.min(incoming.len()));
        if may_write {
            // A server may send from its Finished on (0.5-RTT), before the client's Finished
            // arrives: the handshake is done only when both directions are keyed.
            if !conn.is_handshaking() {
                break;
            }
            need_input = true;
        }
        if need_input && !more_buffered {
            if peer_closed {
                return Err(Error::HandshakeEof.into());
            }
            if incoming.len() >= HANDSHAKE_BUFFER_MAX {
                let len = incoming.len();
                return Err(Error::HandshakeStalled { len }.into());
            }
            if read_more(tcp, &mut incoming).await? == 0 {
                return Err(Error::HandshakeEof.into());
            }
        }
    }
    Ok(Handshaken {
        conn,
        buffered: incoming,
        plaintext,
        peer_closed,
    })
}

/// Reads what the peer sent into `incoming`, taking buffer space only once there is something
/// to read: a first flight (a ClientHello, a certificate chain) fits [`FIRST_READ`]; later reads
/// take [`READ_MIN`].
async fn read_more(tcp: &mut TcpStream, incoming: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        tcp.readable().await?;
        let want = if incoming.capacity() == 0 {
            FIRST_READ
        } else {
            READ_MIN
        };
        if incoming.capacity() - incoming.len() < want / 2 {
            incoming.reserve(want);
        }
        match tcp.try_read_buf(incoming) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            read => return read,
        }
    }
}

/// The first read of a handshake: enough for a ClientHello or a server's whole first flight.
const FIRST_READ: usize = 4 << 10;

/// The end of the first complete TLS record in `buf` (5-byte header: type, version, length),
/// or the whole buffer when none is complete (rustls then asks for more).
fn first_record_end(buf: &[u8]) -> usize {
    match buf {
        [_, _, _, hi, lo, ..] => {
            let end = 5 + usize::from(u16::from_be_bytes([*hi, *lo]));
            if end <= buf.len() {
                end
            } else {
                buf.len()
            }
        }
        _ => buf.len(),
    }
}

/// Encodes the handshake (or alert) record rustls has ready at the end of `out`.
pub(super) fn encode<Data>(
    data: &mut EncodeTlsData<'_, Data>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let used = out.len();
    out.resize(used + READ_MIN, 0);
    let n = match data.encode(&mut out[used..]) {
        Ok(n) => n,
        // Retried with the size rustls asks for (a large certificate chain).
        Err(EncodeError::InsufficientSize(e)) => {
            out.resize(used + e.required_size, 0);
            data.encode(&mut out[used..])
                .map_err(|e| io::Error::other(format!("TLS handshake: {e}")))?
        }
        Err(e) => return Err(io::Error::other(format!("TLS handshake: {e}"))),
    };
    out.truncate(used + n);
    Ok(())
}

/// Sends what rustls queued after a failed step (the fatal alert), best effort. rustls must
/// see the same input buffer again (its handshake reassembly points into it).
async fn send_alert<C: Unbuffered>(conn: &mut C, incoming: &mut Vec<u8>, tcp: &mut TcpStream) {
    let mut out = Vec::new();
    // The alert is one record; the bound only guards against a state that never settles.
    for _ in 0..8 {
        let UnbufferedStatus { discard, state } = conn.process(incoming);
        let more = match state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => encode(&mut data, &mut out).is_ok(),
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done();
                false
            }
            _ => false,
        };
        incoming.drain(..discard.min(incoming.len()));
        if !more {
            break;
        }
    }
    if !out.is_empty() {
        let _ = tcp.write_all(&out).await;
    }
}
