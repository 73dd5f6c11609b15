//! [`TlsStream`]: the record layer on the socket, as `AsyncRead + AsyncWrite` for HTTP/2. Reads
//! fill the reader's buffer straight from the socket; writes seal into the writer's buffer and
//! send it; key updates go through rustls's `KernelConnection`; idle buffers are freed.

use std::{
    fmt,
    future::Future as _,
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf as _, Bytes};
use rustls::{kernel::KernelConnection, pki_types::CertificateDer, SupportedCipherSuite};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};

use super::{
    cipher::Protection,
    content,
    handshake::Established,
    read::{Event, Reader},
    write::{Writer, KEY_UPDATE_AFTER},
    Error, Kernel, IDLE_RELEASE, MAX_KEY_UPDATES_IN_A_ROW,
};

/// A TLS 1.3 connection after the handshake: the negotiated parameters, and the record layer as
/// `AsyncRead + AsyncWrite` for HTTP/2.
pub struct TlsStream {
    pub(super) tcp: TcpStream,
    kernel: Kernel,
    alpn: Option<Vec<u8>>,
    peer_certificates: Option<Vec<CertificateDer<'static>>>,
    /// Application data rustls decrypted during the handshake, served first.
    pub(super) early: Bytes,
    pub(super) reader: Reader,
    writer: Writer,
    /// Records under one of our keys before we update it (tests lower it).
    key_update_after: u64,
    /// Key updates: ours (sent) and the peer's (received).
    pub(super) key_updates_sent: u64,
    pub(super) key_updates_received: u64,
    /// The peer's key updates since it last sent application data.
    key_updates_in_a_row: u8,
    idle: Idle,
    /// The first TLS error; every later call fails with it.
    failed: Option<Error>,
    /// A socket error met while sending what was already sealed (and so reported written), or
    /// a KeyUpdate answer: every later write, flush or shutdown fails with it.
    write_error: Option<(io::ErrorKind, String)>,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .field("suite", &self.kernel.suite().suite())
            .field("alpn", &self.alpn.as_deref().map(String::from_utf8_lossy))
            .field("key_updates_sent", &self.key_updates_sent)
            .field("key_updates_received", &self.key_updates_received)
            .field("reader", &self.reader)
            .field("writer", &self.writer)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Release of idle buffers: armed when a read finds nothing to do, it frees the buffers once
/// a whole [`IDLE_RELEASE`] passes without traffic.
#[derive(Debug, Default)]
struct Idle {
    timer: Option<Pin<Box<Sleep>>>,
    /// Traffic since the timer was (re)armed.
    busy: bool,
}

impl TlsStream {
    pub(super) fn new<D>(
        tcp: TcpStream,
        established: Established<D>,
        kernel: impl FnOnce(KernelConnection<D>) -> Kernel,
    ) -> Result<Self, Error> {
        let Established {
            secrets,
            kernel: conn,
            alpn,
            peer_certificates,
            buffered,
            plaintext,
            peer_closed,
        } = established;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(Self {
            tcp,
            kernel: kernel(conn),
            alpn,
            peer_certificates,
            early: Bytes::from(plaintext),
            reader: Reader::new(Protection::new(rx_seq, &rx)?, buffered, peer_closed),
            writer: Writer::new(Protection::new(tx_seq, &tx)?),
            key_update_after: KEY_UPDATE_AFTER,
            key_updates_sent: 0,
            key_updates_received: 0,
            key_updates_in_a_row: 0,
            idle: Idle::default(),
            failed: None,
            write_error: None,
        })
    }

    /// Keeps a socket error of the write side for the next write, flush or shutdown (the
    /// first one is kept).
    fn defer_write_error(&mut self, e: &io::Error) {
        self.write_error
            .get_or_insert_with(|| (e.kind(), e.to_string()));
    }

    /// The deferred write error, if there is one.
    fn write_error(&self) -> Option<io::Error> {
        self.write_error
            .as_ref()
            .map(|(kind, message)| io::Error::new(*kind, message.clone()))
    }

    /// The ALPN protocol the handshake agreed on.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The certificate chain the peer presented (verified by the handshake), leaf first.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certificates.as_deref()
    }

    /// The cipher suite the handshake agreed on.
    pub fn negotiated_cipher_suite(&self) -> SupportedCipherSuite {
        self.kernel.suite()
    }

    /// Bytes of memory held by the record buffers (none once idle).
    #[cfg(test)]
    pub(super) fn buffer_capacity(&self) -> usize {
        self.reader.capacity() + self.writer.capacity() + self.early.len()
    }

    /// Updates our key after this many records instead of [`KEY_UPDATE_AFTER`].
    #[cfg(test)]
    pub(super) fn set_key_update_after(&mut self, records: u64) {
        self.key_update_after = records;
        self.writer.set_key_update_after(records);
    }

    /// Records a TLS error: sends the matching fatal alert (best effort, without waiting) and
    /// makes every later call fail the same way.
    fn fail(&mut self, e: Error) -> io::Error {
        if let Some(alert) = e.alert() {
            if !self.writer.is_closed()
                && self
                    .writer
                    .seal_control(content::ALERT, &[2, u8::from(alert)])
                    .is_ok()
            {
                let _ = self.try_drain();
            }
        }
        self.failed = Some(e.clone());
        e.into()
    }

    /// Writes pending ciphertext as far as the socket takes it now, without waiting. The read
    /// side sends this way: registering for writability there would take the place of a
    /// writing task's waker (the socket keeps one per direction) when the stream is split.
    fn try_drain(&mut self) -> io::Result<()> {
        while !self.writer.pending().is_empty() {
            match self.tcp.try_write(self.writer.pending()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.writer.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Queues a KeyUpdate under our current key, then switches to the next one.
    pub(super) fn update_tx_key(&mut self) -> Result<(), Error> {
        self.writer.seal_key_update()?;
        let (seq, secrets) = self.kernel.update_tx().map_err(Error::KeyUpdate)?;
        self.writer
            .rekey(Protection::new(seq, &secrets)?, self.key_update_after);
        self.key_updates_sent += 1;
        Ok(())
    }

    /// Handles what the reader found that is not application data.
    fn handle(&mut self, event: Event) -> Result<(), Error> {
        match event {
            Event::KeyUpdate { update_requested } => {
                self.key_updates_in_a_row = self.key_updates_in_a_row.saturating_add(1);
                if self.key_updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
                    return Err(Error::TooManyKeyUpdates);
                }
                let (seq, secrets) = self.kernel.update_rx().map_err(Error::KeyUpdate)?;
                self.reader.rekey(Protection::new(seq, &secrets)?);
                self.key_updates_received += 1;
                // Our answer leaves from poll_read, or with the next write or flush.
                let answer = update_requested
                    && !self.writer.is_closed()
                    && !self.writer.key_update_unsent();
                if answer {
                    self.update_tx_key()?;
                }
                Ok(())
            }
            Event::NewSessionTicket(ticket) => self.kernel.new_session_ticket(&ticket),
            Event::Data | Event::Closed | Event::NeedMore => Ok(()),
        }
    }

    /// Writes pending ciphertext until none is left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.writer.pending().is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, self.writer.pending()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.writer.advance(n);
            self.idle.busy = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads the socket into the reader's buffer: `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Readiness first: an idle connection waits without holding a buffer.
        ready!(self.tcp.poll_read_ready(cx))?;
        let buf = self.reader.read_space();
        let spare = buf.capacity() - buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.tcp),
            cx,
            buf
        ))?;
        self.reader.note_read(n, spare);
        self.idle.busy = true;
        Poll::Ready(Ok(n))
    }

    /// Fills `dst` with application data, reading the socket only when nothing is buffered.
    fn poll_read_records(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<Result<(), ReadError>> {
        let before = dst.filled().len();
        loop {
            match self.reader.next_event()? {
                Event::Data => {
                    self.key_updates_in_a_row = 0;
                    let data = self.reader.plaintext();
                    let n = data.len().min(dst.remaining());
                    dst.put_slice(&data[..n]);
                    self.reader.consume(n);
                    if dst.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Event::Closed => return Poll::Ready(Ok(())),
                Event::NeedMore if dst.filled().len() > before => return Poll::Ready(Ok(())),
                Event::NeedMore => match self.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(match self.reader.buffered() {
                            0 => Error::MissingCloseNotify,
                            buffered => Error::Truncated { buffered },
                        }
                        .into()));
                    }
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(ReadError::Io(e))),
                    Poll::Pending => {
                        self.poll_idle(cx);
                        return Poll::Pending;
                    }
                },
                event => {
                    self.handle(event)?;
                    // A KeyUpdate answer leaves now if the socket takes it, else with the next
                    // write, flush or read; a write error shows there too.
                    if self.writer.key_update_unsent() {
                        let _ = self.try_drain();
                    }
                }
            }
        }
    }

    /// Frees the buffers once the connection has been idle for [`IDLE_RELEASE`]; called when a
    /// read is about to wait, so the timer wakes the reading task.
    fn poll_idle(&mut self, cx: &mut Context<'_>) {
        let holding = self.reader.capacity() + self.writer.capacity() > 0;
        let empty = self.reader.buffered() == 0 && self.writer.pending().is_empty();
        if !holding || !empty {
            self.idle.timer = None;
            return;
        }
        if self.idle.timer.is_none() {
            self.idle.busy = false;
        }
        let timer = self
            .idle
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(IDLE_RELEASE)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return;
            }
            if !self.idle.busy {
                break;
            }
            // Traffic since the timer was armed: wait another full period.
            self.idle.busy = false;
            timer.as_mut().reset(Instant::now() + IDLE_RELEASE);
        }
        self.reader.release_if_empty();
        self.writer.release_if_empty();
        self.idle.timer = None;
    }
}

/// A read failure: a TLS error (fatal, answered with an alert) or a socket error.
enum ReadError {
    Tls(Error),
    Io(io::Error),
}

impl From<Error> for ReadError {
    fn from(e: Error) -> Self {
        ReadError::Tls(e)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = &this.failed {
            return Poll::Ready(Err(e.clone().into()));
        }
        if dst.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.early.is_empty() {
            let n = this.early.len().min(dst.remaining());
            dst.put_slice(&this.early[..n]);
            this.early.advance(n);
            if this.early.is_empty() {
                this.early = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        // A KeyUpdate answer the read side queued leaves as soon as the socket takes it, even
        // if the application does not write. If the socket refuses it, that is the write
        // side's error: what was received is still read.
        if this.writer.key_update_unsent() && this.write_error.is_none() {
            if let Err(e) = this.try_drain() {
                this.defer_write_error(&e);
            }
        }
        let before = dst.filled().len();
        match this.poll_read_records(cx, dst) {
            Poll::Ready(Err(ReadError::Tls(e))) => {
                let e = this.fail(e);
                // Data that came before the failure is delivered; the error comes next call.
                if dst.filled().len() > before {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(e))
                }
            }
            Poll::Ready(Err(ReadError::Io(e))) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                this.idle.busy = true;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Encrypts up to 16 full records of `bufs` (coalescing HTTP/2's frame headers with their
    /// payload) into the output buffer, once the previous batch is on its way; the bytes count
    /// as written as soon as they are encrypted.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = &this.failed {
            return Poll::Ready(Err(e.clone().into()));
        }
        if let Some(e) = this.write_error() {
            return Poll::Ready(Err(e));
        }
        if this.writer.is_closed() {
            return Poll::Ready(Err(Error::WriteAfterClose.into()));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_drain(cx))?;
        let sealed = (|| {
            if this.writer.needs_key_update() {
                this.update_tx_key()?;
            }
            this.writer.seal_data(bufs)
        })();
        let n = match sealed {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(this.fail(e))),
        };
        this.idle.busy = true;
        // Start sending now; what the socket does not take waits for the next write or flush.
        // The `n` bytes are sealed, so they are written as far as the caller is concerned: a
        // socket error now is reported by the next call, not instead of them.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            this.defer_write_error(&e);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.write_error() {
            return Poll::Ready(Err(e));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// Sends close_notify, then shuts the socket's write half.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.write_error() {
            return Poll::Ready(Err(e));
        }
        if this.failed.is_none() {
            if let Err(e) = this.writer.close() {
                return Poll::Ready(Err(this.fail(e)));
            }
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
