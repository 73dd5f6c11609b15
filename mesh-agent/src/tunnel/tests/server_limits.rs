//! The server's hold on idle and silent clients: idle connections are closed, a client that
//! stops reading is dropped once its PING goes unanswered.

use std::{
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::*;

fn options(idle: Duration, ping_interval: Duration, ping_timeout: Duration) -> server::Options {
    server::Options {
        max_age: DAY,
        idle_timeout: idle,
        ping_interval,
        ping_timeout,
    }
}

/// A TCP stream whose reads stop for good once `paused` is set: a client that no longer reads
/// what the server sends.
struct Pausable {
    tcp: TcpStream,
    paused: Arc<AtomicBool>,
}

impl AsyncRead for Pausable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.paused.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Pausable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// An HBONE client connection whose reads can be stopped.
async fn pausable_connect(
    addr: SocketAddr,
    config: &rustls::ClientConfig,
) -> (SendRequest<Bytes>, Arc<AtomicBool>) {
    let paused = Arc::new(AtomicBool::new(false));
    let tcp = Pausable {
        tcp: TcpStream::connect(addr).await.expect("TCP connect"),
        paused: paused.clone(),
    };
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = within(
        "TLS handshake",
        TlsConnector::from(Arc::new(config.clone())).connect(name, tcp),
    )
    .await
    .expect("TLS handshake");
    let (send, conn) = within("h2 handshake", h2::client::handshake(tls))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    (send, paused)
}

#[tokio::test]
async fn a_connection_without_streams_is_closed_once_idle_and_one_with_a_stream_is_not() {
    let ca = Ca::new(TD);
    let idle = Duration::from_millis(300);
    let mut server =
        Server::start_with(ca.server_config(), options(idle, DAY, DAY), admit_all()).await;
    let echo = echo_server(false).await;
    let config = ca.client_config(api());

    // No stream ever: GOAWAY once idle, and the connection ends.
    let (_idle_client, _) = h2_connect(server.addr, &config).await;
    server
        .next_end()
        .await
        .expect("an idle connection ends cleanly");

    // A stream open for several idle periods keeps its connection.
    let (mut client, _) = h2_connect(server.addr, &config).await;
    let (status, mut send, mut recv) = request(&mut client, Method::CONNECT, &echo.to_string())
        .await
        .expect("CONNECT");
    assert_eq!(status, StatusCode::OK);
    let opened = std::time::Instant::now();
    wait_for("three idle periods", || opened.elapsed() > 3 * idle).await;
    h2_echo(&mut send, &mut recv, b"still open").await;
    assert!(
        server.ended.try_recv().is_err(),
        "a connection with an open stream was closed as idle"
    );
    // Its stream ends: the connection is idle from then on, and ends in turn.
    send.send_data(Bytes::new(), true).expect("END_STREAM");
    while let Some(data) = within("the stream's end", recv.data()).await {
        data.expect("data");
    }
    server
        .next_end()
        .await
        .expect("the connection ends cleanly once idle");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_when_a_ping_goes_unanswered() {
    let ca = Ca::new(TD);
    let (interval, timeout) = (Duration::from_millis(100), Duration::from_millis(400));
    let mut server = Server::start_with(
        ca.server_config(),
        options(DAY, interval, timeout),
        admit_all(),
    )
    .await;
    let echo = echo_server(false).await;
    let config = ca.client_config(api());
    let (mut reading, _) = pausable_connect(server.addr, &config).await;
    let (mut silent, paused) = pausable_connect(server.addr, &config).await;
    let mut streams = Vec::new();
    for client in [&mut reading, &mut silent] {
        let (status, mut send, mut recv) = request(client, Method::CONNECT, &echo.to_string())
            .await
            .expect("CONNECT");
        assert_eq!(status, StatusCode::OK);
        h2_echo(&mut send, &mut recv, b"hello").await;
        streams.push((send, recv));
    }

    paused.store(true, Ordering::SeqCst);
    let ended = server.next_end().await;
    assert!(
        matches!(ended, Err(Error::Unresponsive { waited, .. }) if waited == timeout),
        "{ended:?}"
    );
    // The client that reads answered every PING meanwhile and is still served.
    let (send, recv) = &mut streams[0];
    h2_echo(send, recv, b"still served").await;
    assert!(
        server.ended.try_recv().is_err(),
        "a client that reads was dropped too"
    );
}
