//! The traffic phase through rustls's unbuffered API instead of our record layer: the other
//! side of the A/B that issue 15 asked for (build feature `rustls-records`; docs/performance.md,
//! "The record layer against rustls"). Same handshake, same [`TlsStream`] interface; records
//! are framed, sealed and opened by rustls. It is not for production: the default build does
//! not contain it.
//!
//! rustls 0.23's unbuffered reader decrypts a record in the input buffer, then copies its
//! plaintext into a new `Vec` it hands out (`ReadTraffic::next_record`), so every record
//! received costs an allocation and a copy more than our reader; its writer encrypts one slice
//! at a time, so HTTP/2's frame header and payload are gathered first into one buffer (as
//! rustls's buffered API does) to keep one record per frame.

use std::{
    fmt,
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
};

use rustls::{
    client::UnbufferedClientConnection,
    pki_types::CertificateDer,
    server::UnbufferedServerConnection,
    unbuffered::{ConnectionState, EncryptError, ReadTraffic, UnbufferedStatus, WriteTraffic},
    SupportedCipherSuite,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    handshake::{encode, rustls_io, Handshaken, Unbuffered},
    read::READ_MIN,
    Error, HEADER_LEN, MAX_CIPHERTEXT, MAX_PLAINTEXT,
};

/// Plaintext gathered and sealed per write: 16 full records, as our writer.
const WRITE_BATCH: usize = 16 * MAX_PLAINTEXT;

/// A TLS 1.3 connection after the handshake whose records rustls protects.
pub struct TlsStream(Side);

enum Side {
    Client(Traffic<UnbufferedClientConnection>),
    Server(Traffic<UnbufferedServerConnection>),
}

macro_rules! each {
    ($self:expr, $t:ident => $body:expr) => {
        match $self {
            TlsStream(Side::Client($t)) => $body,
            TlsStream(Side::Server($t)) => $body,
        }
    };
}

impl TlsStream {
    pub(super) fn client(tcp: TcpStream, h: Handshaken<UnbufferedClientConnection>) -> Self {
        TlsStream(Side::Client(Traffic::new(tcp, h)))
    }

    pub(super) fn server(tcp: TcpStream, h: Handshaken<UnbufferedServerConnection>) -> Self {
        TlsStream(Side::Server(Traffic::new(tcp, h)))
    }

    /// The ALPN protocol the handshake agreed on.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        each!(self, t => t.conn.alpn_protocol())
    }

    /// The certificate chain the peer presented (verified by the handshake), leaf first.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        each!(self, t => t.conn.peer_certificates())
    }

    /// The cipher suite the handshake agreed on.
    pub fn negotiated_cipher_suite(&self) -> SupportedCipherSuite {
        each!(self, t => t.suite)
    }
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        each!(self, t => f
            .debug_struct("TlsStream")
            .field("tcp", &t.tcp)
            .field("suite", &t.suite.suite())
            .field("records", &"rustls")
            .field("peer_closed", &t.peer_closed)
            .finish_non_exhaustive())
    }
}

/// One side's connection in the traffic phase.
struct Traffic<C> {
    tcp: TcpStream,
    conn: C,
    suite: SupportedCipherSuite,
    /// Ciphertext received: `incoming[start..]` is not processed yet.
    incoming: Vec<u8>,
    start: usize,
    /// Plaintext rustls handed out, not read yet: `plaintext[read..]`.
    plaintext: Vec<u8>,
    read: usize,
    /// Ciphertext to send: `outgoing[sent..]`.
    outgoing: Vec<u8>,
    sent: usize,
    /// Plaintext of a vectored write, gathered before it is sealed.
    gather: Vec<u8>,
    peer_closed: bool,
    closed: bool,
    /// The first failure; every later call fails with it.
    failed: Option<(io::ErrorKind, String)>,
}

/// What processing the buffered records found.
enum Processed {
    /// Every complete record is processed: more input is needed to go on.
    NeedMore,
    /// The peer sent close_notify.
    PeerClosed,
}

impl<C: Unbuffered> Traffic<C> {
    fn new(tcp: TcpStream, h: Handshaken<C>) -> Self {
        let suite = h
            .conn
            .suite()
            .expect("a finished handshake has a cipher suite");
        Self {
            tcp,
            conn: h.conn,
            suite,
            incoming: h.buffered,
            start: 0,
            plaintext: h.plaintext,
            read: 0,
            outgoing: Vec::new(),
            sent: 0,
            gather: Vec::new(),
            peer_closed: h.peer_closed,
            closed: false,
            failed: None,
        }
    }

    fn error(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, message)| io::Error::new(*kind, message.clone()))
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.failed.get_or_insert_with(|| (e.kind(), e.to_string()));
        e
    }

    /// Runs rustls over the buffered records: plaintext is moved to `plaintext`, handshake
    /// messages (a KeyUpdate answer) and alerts are encoded into `outgoing`.
    fn process(&mut self) -> io::Result<Processed> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process(&mut self.incoming[self.start..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.start += discard;
                    self.encode_pending();
                    return Err(rustls_io(e));
                }
            };
            let done = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    discard += take_plaintext(&mut traffic, &mut self.plaintext, &mut self.read)?;
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    encode(&mut data, &mut self.outgoing)?;
                    None
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // Sent with the next drain.
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Processed::PeerClosed),
                ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake => {
                    Some(if self.peer_closed {
                        Processed::PeerClosed
                    } else {
                        Processed::NeedMore
                    })
                }
                _ => return Err(Error::HandshakeState("early data after the handshake").into()),
            };
            self.start += discard;
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// Encodes what rustls queued after a failure (its fatal alert), best effort.
    fn encode_pending(&mut self) {
        for _ in 0..8 {
            let UnbufferedStatus { discard, state } =
                self.conn.process(&mut self.incoming[self.start..]);
            self.start += discard;
            match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    if encode(&mut data, &mut self.outgoing).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => return,
            }
        }
    }

    /// Reads the socket into `incoming`: `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        ready!(self.tcp.poll_read_ready(cx))?;
        if self.start > 0 {
            self.incoming.drain(..self.start);
            self.start = 0;
        }
        if self.incoming.capacity() - self.incoming.len() < READ_MIN / 2 {
            self.incoming.reserve(READ_MIN);
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.tcp),
            cx,
            &mut self.incoming
        ))?;
        Poll::Ready(Ok(n))
    }

    /// Writes pending ciphertext until none is left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes pending ciphertext as far as the socket takes it now, without waiting.
    fn try_drain(&mut self) -> io::Result<()> {
        while self.sent < self.outgoing.len() {
            match self.tcp.try_write(&self.outgoing[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.outgoing.clear();
        self.sent = 0;
        Ok(())
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, dst: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.error() {
            return Poll::Ready(Err(e));
        }
        loop {
            if self.read < self.plaintext.len() {
                let n = (self.plaintext.len() - self.read).min(dst.remaining());
                dst.put_slice(&self.plaintext[self.read..self.read + n]);
                self.read += n;
                return Poll::Ready(Ok(()));
            }
            let processed = match self.process() {
                Ok(processed) => processed,
                Err(e) => {
                    let _ = self.try_drain();
                    return Poll::Ready(Err(self.fail(e)));
                }
            };
            // A KeyUpdate answer leaves at once if the socket takes it.
            if self.sent < self.outgoing.len() {
                if let Err(e) = self.try_drain() {
                    return Poll::Ready(Err(self.fail(e)));
                }
            }
            if self.read < self.plaintext.len() {
                continue;
            }
            if let Processed::PeerClosed = processed {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    let buffered = self.incoming.len() - self.start;
                    let e: io::Error = match buffered {
                        0 => Error::MissingCloseNotify,
                        buffered => Error::Truncated { buffered },
                    }
                    .into();
                    return Poll::Ready(Err(self.fail(e)));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.error() {
            return Poll::Ready(Err(e));
        }
        if self.closed {
            return Poll::Ready(Err(Error::WriteAfterClose.into()));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        ready!(self.poll_drain(cx))?;
        // One slice is sealed as it is; several are gathered first, up to a batch.
        let mut gather = std::mem::take(&mut self.gather);
        let data: &[u8] = match bufs.iter().filter(|b| !b.is_empty()).count() {
            1 => {
                let b = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &b[..]);
                &b[..b.len().min(WRITE_BATCH)]
            }
            _ => {
                gather.clear();
                for b in bufs {
                    let take = b.len().min(WRITE_BATCH - gather.len());
                    gather.extend_from_slice(&b[..take]);
                    if gather.len() == WRITE_BATCH {
                        break;
                    }
                }
                &gather
            }
        };
        let sealed = self.seal(data);
        let n = data.len();
        self.gather = gather;
        if let Err(e) = sealed {
            return Poll::Ready(Err(self.fail(e)));
        }
        // What the socket does not take now waits for the next write or flush.
        if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
            self.fail(e);
        }
        Poll::Ready(Ok(n))
    }

    /// Seals `data` into `outgoing`.
    fn seal(&mut self, data: &[u8]) -> io::Result<()> {
        let records = data.len().div_ceil(MAX_PLAINTEXT).max(1);
        let need = data.len() + records * (HEADER_LEN + MAX_CIPHERTEXT - MAX_PLAINTEXT);
        let sealed = self.when_writable(|traffic, outgoing| {
            let used = outgoing.len();
            outgoing.resize(used + need, 0);
            let n = match traffic.encrypt(data, &mut outgoing[used..]) {
                Ok(n) => n,
                Err(EncryptError::InsufficientSize(e)) => {
                    outgoing.resize(used + e.required_size, 0);
                    traffic
                        .encrypt(data, &mut outgoing[used..])
                        .map_err(|e| io::Error::other(format!("TLS: {e}")))?
                }
                Err(e) => return Err(io::Error::other(format!("TLS: {e}"))),
            };
            outgoing.truncate(used + n);
            Ok(())
        })?;
        sealed.ok_or_else(|| Error::WriteAfterClose.into())
    }

    /// Processes what rustls must do before sending (a KeyUpdate answer to encode), then runs
    /// `write` with the connection's permission to send and `outgoing`; `None` once the
    /// connection is closed both ways.
    fn when_writable<R>(
        &mut self,
        mut write: impl FnMut(&mut WriteTraffic<'_, C::Data>, &mut Vec<u8>) -> io::Result<R>,
    ) -> io::Result<Option<R>> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process(&mut self.incoming[self.start..]);
            let written = match state.map_err(rustls_io)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    Some(write(&mut traffic, &mut self.outgoing)?)
                }
                ConnectionState::EncodeTlsData(mut tls) => {
                    encode(&mut tls, &mut self.outgoing)?;
                    None
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::ReadTraffic(mut traffic) => {
                    // Every complete record was processed by the last read; kept for the
                    // next one all the same.
                    discard += take_plaintext(&mut traffic, &mut self.plaintext, &mut self.read)?;
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                _ => {
                    self.start += discard;
                    return Ok(None);
                }
            };
            self.start += discard;
            if written.is_some() {
                return Ok(written);
            }
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.error() {
            return Poll::Ready(Err(e));
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.error() {
            return Poll::Ready(Err(e));
        }
        if !self.closed {
            self.closed = true;
            // Nothing to send when both sides have closed already.
            self.when_writable(|traffic, outgoing| {
                let used = outgoing.len();
                outgoing.resize(used + HEADER_LEN + 64, 0);
                let n = traffic
                    .queue_close_notify(&mut outgoing[used..])
                    .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
                outgoing.truncate(used + n);
                Ok(())
            })?;
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Moves the records rustls opened to the unread end of `plaintext` (`plaintext[read..]`
/// unread); returns the bytes of input rustls asks to discard beyond its status's.
fn take_plaintext<D>(
    traffic: &mut ReadTraffic<'_, '_, D>,
    plaintext: &mut Vec<u8>,
    read: &mut usize,
) -> io::Result<usize> {
    let mut discard = 0;
    while let Some(record) = traffic.next_record() {
        let record = record.map_err(rustls_io)?;
        discard += record.discard;
        if *read == plaintext.len() {
            plaintext.clear();
            *read = 0;
        }
        plaintext.extend_from_slice(record.payload);
    }
    Ok(discard)
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), t => t.poll_read(cx, dst))
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), t => t.poll_write_vectored(cx, &[IoSlice::new(buf)]))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), t => t.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), t => t.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), t => t.poll_shutdown(cx))
    }
}
