//! The waypoint's connections as byte streams, for hyper (through `hyper_util::rt::TokioIo`):
//! [`H2Io`] is one HBONE CONNECT stream as `AsyncRead + AsyncWrite`, with the tunnel's
//! semantics (`tunnel::stream`): DATA is sent only within the peer's flow-control window, one
//! write at most what the window grants (nothing is buffered beyond it); received capacity is
//! released as the reader takes the bytes; END_STREAM is a write shutdown one way and EOF the
//! other; a reset is `ConnectionReset`, never an EOF the application could take for a complete
//! transfer. [`Rewind`] gives back the bytes read to sniff a connection's protocol.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One HBONE CONNECT stream as a byte stream. Dropped without a shutdown, it resets the
/// stream (RST_STREAM CANCEL): the peer sees an error, not an end.
#[derive(Debug)]
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The rest of the DATA frame being read.
    unread: Bytes,
    /// END_STREAM was sent.
    shut: bool,
}

impl H2Io {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Io {
            send,
            recv,
            unread: Bytes::new(),
            shut: false,
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.unread = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                // END_STREAM: EOF.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        // The peer may send as much again. This fails only if the stream is gone, which the
        // next read reports.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    /// Sends at most the capacity h2 grants the stream (the peer's window, bounded by h2's
    /// send buffer), waiting for some when there is none. The capacity asked for and not
    /// granted yet stays asked for: the caller's next write (the rest of its buffer) finds it.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of an HBONE stream",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut granted = this.send.capacity();
        if granted == 0 {
            this.send.reserve_capacity(buf.len());
            granted = match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                // Reset (by the peer, or the connection failed): we have not ended it.
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "HBONE stream reset by the peer",
                    )))
                }
            };
        }
        let n = granted.min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(|e| send_error(&mut this.send, cx, e))?;
        Poll::Ready(Ok(n))
    }

    /// DATA frames are written out by the connection's task: nothing to flush here.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends END_STREAM (once): the peer reads EOF, and may still write. A stream already
    /// reset is ended as it is: this succeeds, as a TCP shutdown does after the peer closed
    /// (h2 resets a stream its peer dropped after its own shutdown, so that is an ordinary
    /// end of a connection, not an error worth a log line).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            if let Err(e) = this.send.send_data(Bytes::new(), true) {
                if !matches!(this.send.poll_reset(cx), Poll::Ready(Ok(_))) {
                    return Poll::Ready(Err(h2_io(e)));
                }
            }
            this.shut = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for H2Io {
    /// h2 resets a stream whose handles are all dropped before it closed, but the server's
    /// `SendResponse` may outlive this; reset here so that an abort is never seen as an end.
    /// After a shutdown h2 resets it only if the peer is still sending.
    fn drop(&mut self) {
        if !self.shut {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

/// A failed send: h2 says only that the stream cannot send; a reset says why.
fn send_error(send: &mut SendStream<Bytes>, cx: &mut Context<'_>, e: h2::Error) -> io::Error {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("HBONE stream reset: {reason}"),
        ),
        _ => h2_io(e),
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_reset() || e.is_go_away() {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// A connection whose first bytes were read (to sniff its protocol) and are read again:
/// reads return `prefix`, then the connection; writes go to the connection.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt as _, Full};
    use hyper::{body::Incoming, service::service_fn};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// What must outlive the streams: the client's handle (the connection lives as long as it
    /// does) and the server's `SendResponse` (kept, so that h2 does not reset a dropped
    /// stream by itself: `H2Io` must).
    type Keep = (
        h2::client::SendRequest<Bytes>,
        h2::server::SendResponse<Bytes>,
    );

    /// The two ends of one CONNECT stream over an in-memory HTTP/2 connection.
    async fn pair() -> (H2Io, H2Io, Keep) {
        let (a, b) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.expect("server handshake");
            let (request, mut respond) = conn
                .accept()
                .await
                .expect("a stream")
                .expect("a good stream");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("response headers");
            // Drives the connection.
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (H2Io::new(send, request.into_body()), respond)
        });
        let (client, conn) = h2::client::handshake(a).await.expect("client handshake");
        tokio::spawn(conn);
        let mut client = client.ready().await.expect("client ready");
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.7:8080")
            .body(())
            .expect("request");
        let (response, send) = client.send_request(request, false).expect("send request");
        let response = response.await.expect("response");
        assert_eq!(response.status(), http::StatusCode::OK);
        let (server, respond) = server.await.expect("server task");
        (
            H2Io::new(send, response.into_body()),
            server,
            (client, respond),
        )
    }

    /// Fails the test, rather than hanging it, if `f` does not finish (the clock is paused:
    /// a stall fails at once).
    async fn deadline<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("stalled")
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..=250u8).cycle().take(len).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_cross_both_ways_beyond_the_window() {
        let (mut client, mut server, _h) = pair().await;
        // 1 MiB each way, 16 times the default window: the writer goes on only as the reader
        // releases capacity.
        let up = payload(1 << 20);
        let down: Vec<u8> = up.iter().rev().copied().collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            client.write_all(&up2).await.expect("client write");
            client.shutdown().await.expect("client shutdown");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("client read");
            got
        });
        let mut got = Vec::new();
        deadline(server.read_to_end(&mut got))
            .await
            .expect("server read");
        assert!(got == up, "upstream bytes differ ({} read)", got.len());
        server.write_all(&down2).await.expect("server write");
        server.shutdown().await.expect("server shutdown");
        let got = deadline(client_side).await.expect("client task");
        assert!(got == down, "downstream bytes differ ({} read)", got.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_sends_at_most_the_window_and_a_frame_is_read_in_parts() {
        let (mut client, mut server, _h) = pair().await;
        let big = payload(1 << 20);
        let n = deadline(client.write(&big)).await.expect("write");
        assert!((1..=65_535).contains(&n), "one write sent {n} bytes");
        // The rest of a DATA frame is kept for the next read.
        let mut part = [0; 10];
        deadline(server.read_exact(&mut part)).await.expect("read");
        assert_eq!(part[..], big[..10]);
        deadline(server.read_exact(&mut part)).await.expect("read");
        assert_eq!(part[..], big[10..20]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_is_eof_and_the_other_way_stays_open() {
        let (mut client, mut server, _h) = pair().await;
        client.write_all(b"ping").await.expect("write");
        client.shutdown().await.expect("shutdown");
        client
            .shutdown()
            .await
            .expect("a second shutdown is a no-op");
        let err = client
            .write_all(b"more")
            .await
            .expect_err("write after shutdown");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        let mut got = Vec::new();
        deadline(server.read_to_end(&mut got)).await.expect("read");
        assert_eq!(got, b"ping");
        server
            .write_all(b"pong")
            .await
            .expect("write after the peer's shutdown");
        server.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        deadline(client.read_to_end(&mut got)).await.expect("read");
        assert_eq!(got, b"pong");
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_without_shutdown_the_peer_reads_a_reset() {
        let (mut client, server, _h) = pair().await;
        drop(server);
        let mut got = Vec::new();
        let err = deadline(client.read_to_end(&mut got))
            .await
            .expect_err("a reset, not EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let err = deadline(client.write_all(b"x")).await.expect_err("write");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_speaks_http1_over_a_stream() {
        let (client, server, _h) = pair().await;
        let served = tokio::spawn(async move {
            let service = service_fn(|request: hyper::Request<Incoming>| async move {
                let path = request.uri().path().to_owned();
                let body = request.into_body().collect().await?.to_bytes();
                let answer = format!("{path} {}", body.len());
                Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(answer))))
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await
        });
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .expect("client handshake");
        let client_conn = tokio::spawn(conn);
        for len in [0, 200_000] {
            let request = hyper::Request::post("/upload")
                .header(http::header::HOST, "svc.ns")
                .body(Full::new(Bytes::from(payload(len))))
                .expect("request");
            let response = deadline(sender.send_request(request))
                .await
                .expect("response");
            assert_eq!(response.status(), http::StatusCode::OK);
            let body = deadline(response.into_body().collect())
                .await
                .expect("response body")
                .to_bytes();
            assert_eq!(body, format!("/upload {len}"));
        }
        drop(sender);
        deadline(client_conn)
            .await
            .expect("client task")
            .expect("client connection");
        deadline(served)
            .await
            .expect("server task")
            .expect("the server sees the client's close as an end");
    }

    #[tokio::test]
    async fn rewind_reads_the_prefix_then_the_connection() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut io = Rewind::new(Bytes::from_static(b"GET "), a);
        b.write_all(b"/ HTTP/1.1\r\n").await.expect("write");
        drop(b);
        let mut first = [0; 2];
        io.read_exact(&mut first).await.expect("read");
        assert_eq!(&first, b"GE", "part of the prefix");
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b"T / HTTP/1.1\r\n");

        // Writes go to the connection.
        let (a, mut b) = tokio::io::duplex(1024);
        let mut io = Rewind::new(Bytes::from_static(b"x"), a);
        io.write_all(b"reply").await.expect("write");
        io.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"reply");
    }
}
