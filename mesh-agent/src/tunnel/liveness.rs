//! Whether the peer of an HBONE connection is still there. It shows it is by taking what we
//! send once our bytes had to wait on it (its TCP accepts them, so its application reads
//! them; a write our own socket buffer takes at once shows nothing, a dead peer's takes it
//! too), by sending us bytes while none of ours wait on it, or by answering a PING. Both ends drop a peer that shows nothing
//! for a while: a dead peer, or one that stopped reading and keeps our buffers full (what it
//! sends meanwhile proves nothing).
//!
//! A PING alone is no judge of a busy connection. h2 sends a PONG (or its own PING) only once
//! its write buffer is flushed (`FramedWrite::poll_ready` wants the I/O flushed, which the TLS
//! layer's buffered records are not while the socket is full) and reads no frame meanwhile
//! (`Connection::poll2` calls `poll_ready` before `poll_next`); `poll_complete` meanwhile
//! refills the buffer with DATA as soon as it has room. During a bulk transfer to a slow peer
//! the PONG so waits as long as the transfer; and two ends that each wait to send a PING or a
//! PONG read nothing from each other at all, which no timer resolves. So a PING is sent only
//! when the peer has shown nothing for an interval and none of our bytes wait on it (then the
//! wait is the question already asked, and a PING would only queue behind it), and the peer is
//! given up only when, for a whole timeout after that, it showed nothing either.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// What the connection's transport tells about the peer: recorded by [`Watched`], read by
/// [`unresponsive`].
#[derive(Clone, Debug)]
pub struct Activity(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// Origin of `shown_at`.
    epoch: Instant,
    /// When the peer last showed it is there (nanoseconds after `epoch`).
    shown_at: AtomicU64,
    /// Our bytes wait on the peer: the last write or flush could not complete.
    waiting: AtomicBool,
}

impl Activity {
    pub fn new() -> Self {
        Self(Arc::new(Shared {
            epoch: Instant::now(),
            shown_at: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        }))
    }

    fn shown(&self) {
        let ns = u64::try_from(self.0.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.shown_at.store(ns, Ordering::Relaxed);
    }

    /// When the peer last showed it is there.
    fn shown_at(&self) -> Instant {
        self.0.epoch + Duration::from_nanos(self.0.shown_at.load(Ordering::Relaxed))
    }

    fn waiting(&self) -> bool {
        self.0.waiting.load(Ordering::Relaxed)
    }

    fn set_waiting(&self, waiting: bool) {
        self.0.waiting.store(waiting, Ordering::Relaxed);
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// The connection's transport (TLS), recording in an [`Activity`] what the peer does with our
/// bytes and whether it sends any.
#[derive(Debug)]
pub struct Watched<T> {
    io: T,
    activity: Activity,
}

impl<T> Watched<T> {
    pub fn new(io: T, activity: Activity) -> Self {
        Self { io, activity }
    }

    /// A write that completes shows the peer only if an earlier one had to wait: then the
    /// peer took bytes. One that completes at once says nothing of the peer (our own socket
    /// buffer took it: a dead peer's does too, until it is full).
    fn note_write(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match &polled {
            Poll::Ready(Ok(n)) if *n > 0 && self.activity.waiting() => {
                self.activity.set_waiting(false);
                self.activity.shown();
            }
            Poll::Pending => self.activity.set_waiting(true),
            Poll::Ready(_) => {}
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        // A peer that does not read what waits for it may still send: that shows nothing.
        if buf.filled().len() > before && !self.activity.waiting() {
            self.activity.shown();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note_write(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note_write(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        match &polled {
            // All we wrote is on its way: what was waiting has been taken.
            Poll::Ready(Ok(())) => {
                if self.activity.waiting() {
                    self.activity.set_waiting(false);
                    self.activity.shown();
                }
            }
            Poll::Pending => self.activity.set_waiting(true),
            Poll::Ready(Err(_)) => {}
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Completes when the peer is unresponsive: once it has shown nothing for `interval`, it went
/// on showing nothing, nor answered the PING sent then (if none of our bytes were waiting on
/// it), for `timeout`. Pends forever once the connection has ended (its end is the
/// connection's to tell).
pub async fn unresponsive(
    ping_pong: Option<h2::PingPong>,
    activity: Activity,
    interval: Duration,
    timeout: Duration,
) {
    match ping_pong {
        Some(ping_pong) => judge(ping_pong, &activity, interval, timeout).await,
        None => std::future::pending().await,
    }
}

/// A PING and its answer (the seam for tests).
trait Ping {
    /// Sends a PING and waits for its PONG; `false` when the connection has ended.
    fn ping(&mut self) -> impl std::future::Future<Output = bool> + Send + '_;
}

impl Ping for h2::PingPong {
    async fn ping(&mut self) -> bool {
        h2::PingPong::ping(self, h2::Ping::opaque()).await.is_ok()
    }
}

/// [`unresponsive`], asking with `pinger`.
async fn judge(mut pinger: impl Ping, activity: &Activity, interval: Duration, timeout: Duration) {
    loop {
        // A whole interval in which the peer showed nothing.
        let mut since = Instant::now();
        loop {
            tokio::time::sleep_until(since + interval).await;
            // Give the connection (another branch of the caller's select!, or another task) a
            // turn first: on a node that was stalled, the timer fires before the connection
            // has read what the peer did meanwhile.
            tokio::task::yield_now().await;
            let shown = activity.shown_at();
            if shown <= since {
                break;
            }
            since = shown;
        }
        let ask = !activity.waiting();
        let mut pong = std::pin::pin!(async {
            match ask {
                true => pinger.ping().await,
                false => std::future::pending().await,
            }
        });
        let mut since = Instant::now();
        loop {
            tokio::select! {
                answered = &mut pong => match answered {
                    true => break,
                    false => return std::future::pending().await,
                },
                () = tokio::time::sleep_until(since + timeout) => {
                    tokio::task::yield_now().await;
                    let shown = activity.shown_at();
                    if shown <= since {
                        return;
                    }
                    since = shown;
                    // A PING sent is answered before the next one (h2 has one at a time).
                    if !ask {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
