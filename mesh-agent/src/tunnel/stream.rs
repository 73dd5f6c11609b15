//! Copying between a TCP socket and an HTTP/2 stream, both ways at once. TCP EOF becomes an
//! empty DATA frame with END_STREAM; END_STREAM from the peer becomes a TCP write shutdown, so
//! half-close crosses the tunnel. DATA is sent only within the peer's flow-control window and
//! received capacity is released as bytes are written out.
//!
//! Memory: a connection holds no read buffer while it is idle. A buffer is taken only once the
//! socket is readable and is given up as soon as the socket has nothing more; its size adapts,
//! from [`FIRST_READ`] up to [`MAX_READ`] while reads keep filling it (a bulk transfer), so a
//! request/response connection never holds more than a small buffer and a bulk one moves large
//! DATA frames. The bytes read become the DATA frame without another copy.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

/// First read of a burst: enough for a typical request or response in one DATA frame.
pub const FIRST_READ: usize = 16 << 10;
/// Largest read (and DATA frame) once a transfer keeps filling the buffer.
pub const MAX_READ: usize = 256 << 10;

/// Copies until both directions end; returns (bytes TCP to HTTP/2, bytes HTTP/2 to TCP), which
/// `up_moved` and `down_moved` are also told as they move.
///
/// An abnormal end resets the other side: a stream reset by the peer (or a failed tunnel)
/// resets the TCP connection, never ends it with a FIN the application could take for a
/// complete transfer; a TCP error resets the stream (RST_STREAM CANCEL). FIN comes only from
/// END_STREAM, END_STREAM only from FIN.
pub async fn copy(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    recv: RecvStream,
    up_moved: impl Fn(u64),
    down_moved: impl Fn(u64),
) -> io::Result<(u64, u64)> {
    let (rd, wr) = tcp.split();
    let result = tokio::try_join!(up(rd, &mut send, up_moved), down(recv, wr, down_moved));
    if result.is_err() {
        // Nothing better to do if this fails: the close is then an ordinary one.
        let _ = crate::sys::set_linger_zero(std::os::fd::AsFd::as_fd(&tcp));
        send.send_reset(h2::Reason::CANCEL);
    }
    result
}

/// TCP to HTTP/2.
async fn up(
    mut rd: tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    moved: impl Fn(u64),
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut burst = Burst {
        size: FIRST_READ,
        buf: BytesMut::new(),
    };
    loop {
        let n = std::future::poll_fn(|cx| burst.poll_read(&mut rd, cx)).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += n as u64;
        let chunk = burst.take(n);
        send_all(send, chunk).await?;
        moved(n as u64);
    }
}

/// The read buffer of a burst of reads: taken once the socket is readable, given up when it
/// runs dry.
struct Burst {
    /// The next read's size: [`FIRST_READ`], doubled up to [`MAX_READ`] by reads that fill it.
    size: usize,
    /// Only held during a burst.
    buf: BytesMut,
}

impl Burst {
    /// Reads what the socket has, into a buffer taken only once it is readable. Polled with the
    /// task's own context, never a no-op one: `Pending` is the socket's (it has nothing more,
    /// and its readiness now wakes this task) or the runtime's (the task has spent its budget
    /// of operations for this turn and is woken to go on at the next). Either way the task
    /// gives up its turn; it must not go back to `readable()`, which ignores the budget and
    /// would answer at once, in a loop that never yields.
    fn poll_read(
        &mut self,
        rd: &mut tokio::net::tcp::ReadHalf<'_>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let polled = match rd.as_ref().poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {
                if self.buf.capacity() - self.buf.len() < self.size / 2 {
                    self.buf.reserve(self.size);
                }
                // A read that does not fill the buffer marks the socket drained (edge-triggered
                // epoll): a request costs one read, not a read and a second one that would block.
                tokio_util::io::poll_read_buf(Pin::new(rd), cx, &mut self.buf)
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        };
        // Out of budget is not idle: the burst goes on at the task's next turn.
        if polled.is_pending() && tokio::task::coop::has_budget_remaining() {
            // Idle again: give the buffer back and start the next burst small.
            self.buf = BytesMut::new();
            self.size = FIRST_READ;
        }
        polled
    }

    /// The `n` bytes just read, as a DATA payload; a read that filled the buffer grows the next.
    fn take(&mut self, n: usize) -> Bytes {
        if n >= self.size && self.size < MAX_READ {
            self.size = (self.size * 2).min(MAX_READ);
        }
        self.buf.split().freeze()
    }
}

/// Sends one chunk as DATA frames within the peer's flow-control window.
async fn send_all(send: &mut SendStream<Bytes>, mut chunk: Bytes) -> io::Result<()> {
    while !chunk.is_empty() {
        send.reserve_capacity(chunk.len());
        let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
            .await
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed by the peer")
            })?
            .map_err(h2_io)?;
        let part = chunk.split_to(granted.min(chunk.len()));
        send.send_data(part, false).map_err(h2_io)?;
    }
    Ok(())
}

/// HTTP/2 to TCP.
async fn down(
    mut recv: RecvStream,
    mut wr: tokio::net::tcp::WriteHalf<'_>,
    moved: impl Fn(u64),
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_io)?;
        let n = data.len();
        wr.write_all(&data).await?;
        total += n as u64;
        moved(n as u64);
        recv.flow_control().release_capacity(n).map_err(h2_io)?;
    }
    wr.shutdown().await?;
    Ok(total)
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}
