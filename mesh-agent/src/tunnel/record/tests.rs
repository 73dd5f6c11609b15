//! The record layer on real sockets, against rustls's own record layer (tokio-rustls, or a
//! rustls connection driven by hand) as the independent peer: interoperability both ways, large
//! full-duplex transfers with half-close, key updates from either side, closure, alerts,
//! malformed records, application data sent along with a Finished, and idle buffers.

use std::{net::Ipv4Addr, sync::Arc};

use rustls::{
    crypto::{ring::cipher_suite, CryptoProvider},
    pki_types::ServerName,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    AlertDescription, CipherSuite, ClientConnection, Connection, ServerConnection,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{accept, connect, testing::Rng, TlsStream, IDLE_RELEASE};
use crate::tunnel::{
    tests::{api, within, Ca, TD},
    tls,
};

type RustlsServer = tokio_rustls::server::TlsStream<TcpStream>;
type RustlsClient = tokio_rustls::client::TlsStream<TcpStream>;

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connect"), server.expect("accept").0)
}

fn name() -> ServerName<'static> {
    ServerName::IpAddress(Ipv4Addr::LOCALHOST.into())
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// Our client against a tokio-rustls server with `config`.
async fn ours_to_rustls(ca: &Ca, config: Arc<rustls::ServerConfig>) -> (TlsStream, RustlsServer) {
    let (c, s) = tcp_pair().await;
    let handshakes = async {
        tokio::join!(
            connect(ca.client_config(api()), name(), c),
            TlsAcceptor::from(config).accept(s)
        )
    };
    let (ours, theirs) = within("handshakes", handshakes).await;
    (
        ours.expect("our client handshake"),
        theirs.expect("rustls server handshake"),
    )
}

/// A tokio-rustls client against our server.
async fn rustls_to_ours(ca: &Ca) -> (TlsStream, RustlsClient) {
    let (c, s) = tcp_pair().await;
    let config = ca.client_config(api());
    let handshakes = async {
        tokio::join!(
            accept(ca.server_config(), s),
            TlsConnector::from(config).connect(name(), c)
        )
    };
    let (ours, theirs) = within("handshakes", handshakes).await;
    (
        ours.expect("our server handshake"),
        theirs.expect("rustls client handshake"),
    )
}

/// Our client against our server.
async fn our_pair(ca: &Ca) -> (TlsStream, TlsStream) {
    let (c, s) = tcp_pair().await;
    let handshakes = async {
        tokio::join!(
            connect(ca.client_config(api()), name(), c),
            accept(ca.server_config(), s)
        )
    };
    let (client, server) = within("handshakes", handshakes).await;
    (client.expect("client"), server.expect("server"))
}

/// Sends `data` in uneven writes (tiny ones, frame-sized ones, large ones), then shuts down.
async fn send(w: &mut (impl AsyncWrite + Unpin), data: &[u8], seed: u64) {
    let mut rng = Rng::new(seed);
    let mut rest = data;
    while !rest.is_empty() {
        let len = match rng.below(4) {
            0 => 1 + rng.below(16),
            1 => 9,
            2 => 1 + rng.below(70_000),
            _ => 1 + rng.below(1 << 20),
        };
        let (now, later) = rest.split_at(len.min(rest.len()));
        w.write_all(now).await.expect("write");
        rest = later;
    }
    w.shutdown().await.expect("shutdown");
}

async fn receive(r: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.expect("read to EOF");
    got
}

/// Both directions at once, each ending with a half-close; every byte is checked. Returns
/// `a` for inspection.
async fn exchange<A: AsyncRead + AsyncWrite + Send + Unpin>(
    a: A,
    b: impl AsyncRead + AsyncWrite + Send,
    a_to_b: usize,
    b_to_a: usize,
) -> A {
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (up, down) = (pattern(a_to_b, 1), pattern(b_to_a, 2));
    let all = async {
        tokio::join!(
            send(&mut aw, &up, 3),
            send(&mut bw, &down, 4),
            receive(&mut br),
            receive(&mut ar)
        )
    };
    let ((), (), at_b, at_a) = within("exchange", all).await;
    assert!(
        at_b == up,
        "a to b: {} of {} bytes, or different",
        at_b.len(),
        up.len()
    );
    assert!(
        at_a == down,
        "b to a: {} of {} bytes, or different",
        at_a.len(),
        down.len()
    );
    ar.unsplit(aw)
}

#[tokio::test]
async fn our_client_and_a_rustls_server_exchange_both_ways_with_half_close() {
    let ca = Ca::new(TD);
    let (ours, theirs) = ours_to_rustls(&ca, ca.server_config()).await;
    assert_eq!(ours.alpn_protocol(), Some(tls::ALPN_H2));
    let leaf = ours.peer_certificates().and_then(|c| c.first());
    assert_eq!(leaf.and_then(tls::identity_of), Some(api()));
    exchange(ours, theirs, 6 << 20, 5 << 20).await;
}

#[tokio::test]
async fn a_rustls_client_and_our_server_exchange_both_ways_with_half_close() {
    let ca = Ca::new(TD);
    let (ours, theirs) = rustls_to_ours(&ca).await;
    assert_eq!(ours.alpn_protocol(), Some(tls::ALPN_H2));
    let leaf = ours.peer_certificates().and_then(|c| c.first());
    assert!(leaf.and_then(tls::identity_of).is_some(), "client identity");
    exchange(ours, theirs, 5 << 20, 6 << 20).await;
}

#[tokio::test]
async fn our_client_and_our_server_exchange_both_ways() {
    let ca = Ca::new(TD);
    let (client, server) = our_pair(&ca).await;
    let suite = client.negotiated_cipher_suite().suite();
    assert_eq!(suite, CipherSuite::TLS13_AES_128_GCM_SHA256);
    exchange(client, server, 3 << 20, 3 << 20).await;
}

/// Presents one certificate, whatever the client asks.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[tokio::test]
async fn aes_256_gcm_works_too() {
    let ca = Ca::new(TD);
    let provider = CryptoProvider {
        cipher_suites: vec![cipher_suite::TLS13_AES_256_GCM_SHA384],
        ..(*tls::provider()).clone()
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(ca.leaf(&api()).load().certified_key())));
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let (ours, theirs) = ours_to_rustls(&ca, Arc::new(config)).await;
    let suite = ours.negotiated_cipher_suite().suite();
    assert_eq!(suite, CipherSuite::TLS13_AES_256_GCM_SHA384);
    exchange(ours, theirs, 1 << 20, 1 << 20).await;
}

#[tokio::test]
async fn key_updates_requested_by_a_rustls_peer_mid_transfer() {
    let ca = Ca::new(TD);
    let (mut ours, mut peer) = rustls_to_ours(&ca).await;
    let (data, reply) = (pattern(2 << 20, 5), pattern(1 << 20, 6));
    let peer_side = async {
        for chunk in data.chunks(256 << 10) {
            // KeyUpdate(update_requested), sent ahead of the chunk.
            peer.get_mut().1.refresh_traffic_keys().expect("key update");
            peer.write_all(chunk).await.expect("peer write");
        }
        peer.flush().await.expect("peer flush");
        receive(&mut peer).await
    };
    let our_side = async {
        let mut got = vec![0; data.len()];
        ours.read_exact(&mut got).await.expect("our read");
        ours.write_all(&reply).await.expect("our write");
        ours.shutdown().await.expect("our shutdown");
        got
    };
    let (back, got) = within("transfer", async { tokio::join!(peer_side, our_side) }).await;
    assert!(got == data, "data across the peer's key updates");
    assert!(back == reply, "our data after answering them");
    assert_eq!(ours.key_updates_received, 8);
    // One answer per request, or fewer if requests came while an answer was still unsent.
    assert!((1..=8).contains(&ours.key_updates_sent), "{ours:?}");
}

/// Reading and writing from two tasks (a split stream): key update answers queued by the
/// reading task must not take the writing task's place in waiting for the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_halves_in_two_tasks_with_key_updates() {
    let ca = Ca::new(TD);
    let (ours, mut peer) = ours_to_rustls(&ca, ca.server_config()).await;
    let (mut r, mut w) = tokio::io::split(ours);
    let (data, reply) = (pattern(1 << 20, 13), pattern(8 << 20, 14));
    let expected = data.clone();
    let reading = tokio::spawn(async move { (receive(&mut r).await, r) });
    let sent = reply.clone();
    // Blocks on a full socket while the peer sends below without reading.
    let writing = tokio::spawn(async move {
        send(&mut w, &sent, 15).await;
        w
    });
    for chunk in data.chunks(128 << 10) {
        peer.get_mut().1.refresh_traffic_keys().expect("key update");
        peer.write_all(chunk).await.expect("peer write");
    }
    peer.shutdown().await.expect("peer close_notify");
    let back = within("peer read", receive(&mut peer)).await;
    assert!(back == reply, "{} of {} bytes", back.len(), reply.len());
    let (got, r) = within("reading task", reading).await.expect("task");
    assert!(got == expected, "{} of {} bytes", got.len(), expected.len());
    let w = within("writing task", writing).await.expect("task");
    let ours = r.unsplit(w);
    assert_eq!(ours.key_updates_received, 8, "{ours:?}");
}

#[tokio::test]
async fn our_own_key_updates_are_followed_by_a_rustls_peer() {
    let ca = Ca::new(TD);
    let (mut ours, theirs) = ours_to_rustls(&ca, ca.server_config()).await;
    ours.set_key_update_after(3);
    let ours = exchange(ours, theirs, 2 << 20, 1 << 20).await;
    // 128 full records and the smaller ones, two of them per key.
    assert!(ours.key_updates_sent >= 64, "{ours:?}");
}

#[tokio::test]
async fn a_flood_of_key_updates_is_cut_off() {
    let ca = Ca::new(TD);
    let (mut client, mut server) = our_pair(&ca).await;
    // 32 in a row are fine; data between them resets the count.
    for _ in 0..32 {
        client.update_tx_key().expect("key update");
    }
    client.write_all(b"data").await.expect("write");
    for _ in 0..32 {
        client.update_tx_key().expect("key update");
    }
    client.write_all(b" more").await.expect("write");
    client.flush().await.expect("flush");
    let mut got = [0u8; 9];
    within("read", server.read_exact(&mut got))
        .await
        .expect("read");
    assert_eq!(&got, b"data more");
    for _ in 0..33 {
        client.update_tx_key().expect("key update");
    }
    client.flush().await.expect("flush");
    let err = within("read", server.read(&mut got))
        .await
        .expect_err("the 33rd is refused");
    assert!(
        err.to_string()
            .contains("KeyUpdates without application data"),
        "{err}"
    );
    assert_eq!(server.key_updates_received, 64 + 32);
}

#[tokio::test]
async fn close_notify_is_eof_and_the_other_direction_stays_open() {
    let ca = Ca::new(TD);
    let (mut ours, mut peer) = rustls_to_ours(&ca).await;
    peer.write_all(b"last words").await.expect("peer write");
    peer.get_mut().1.send_close_notify();
    peer.flush().await.expect("peer flush");
    let got = within("our read", receive(&mut ours)).await;
    assert_eq!(got, b"last words");
    let mut more = [0u8; 8];
    let n = within("read after EOF", ours.read(&mut more)).await;
    assert_eq!(n.expect("EOF again"), 0);
    ours.write_all(b"half-close: still writing")
        .await
        .expect("write after the peer closed");
    ours.shutdown().await.expect("our close_notify");
    assert_eq!(
        within("peer read", receive(&mut peer)).await,
        b"half-close: still writing"
    );
}

#[tokio::test]
async fn eof_without_close_notify_is_an_error() {
    let ca = Ca::new(TD);
    let (mut ours, mut peer) = rustls_to_ours(&ca).await;
    peer.write_all(b"cut").await.expect("peer write");
    peer.flush().await.expect("peer flush");
    // A TCP FIN, no close_notify: a truncation attack looks like this.
    peer.get_mut().0.shutdown().await.expect("TCP shutdown");
    let mut got = Vec::new();
    let err = within("our read", ours.read_to_end(&mut got))
        .await
        .expect_err("EOF without close_notify");
    assert_eq!(got, b"cut");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(err.to_string().contains("without close_notify"), "{err}");
}

/// Writes raw bytes on the socket under a tokio-rustls stream.
async fn raw_to_ours(peer: &mut RustlsClient, bytes: &[u8]) {
    peer.get_mut().0.write_all(bytes).await.expect("raw write");
}

/// What the peer reads after we refused its input: the alert we sent.
async fn peer_sees_alert(peer: &mut RustlsClient, alert: AlertDescription) {
    let err = within("peer read", peer.read(&mut [0u8; 16]))
        .await
        .expect_err("the peer must get our alert");
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(inner, Some(&rustls::Error::AlertReceived(alert)), "{err}");
}

#[tokio::test]
async fn malformed_records_are_errors_answered_with_alerts() {
    let ca = Ca::new(TD);
    let cases: [(&[u8], &str, AlertDescription); 5] = [
        (
            &[
                23, 3, 3, 0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                20,
            ],
            "bad_record_mac",
            AlertDescription::BadRecordMac,
        ),
        // Refused from its header, before the 18 KiB body it announces.
        (
            &[23, 3, 3, 0x48, 0x01],
            "record too large",
            AlertDescription::RecordOverflow,
        ),
        (
            &[20, 3, 3, 0, 1, 1],
            "unexpected record type 20",
            AlertDescription::UnexpectedMessage,
        ),
        (
            &[23, 3, 3, 0, 3, 0, 0, 0],
            "record too short",
            AlertDescription::DecodeError,
        ),
        // Refused from its header too: a TLS 1.2 (0x0301) record version.
        (
            &[23, 3, 1, 0x40, 0x00],
            "record version 0x0301",
            AlertDescription::UnexpectedMessage,
        ),
    ];
    for (bytes, message, alert) in cases {
        let (mut ours, mut peer) = rustls_to_ours(&ca).await;
        peer.write_all(b"fine").await.expect("peer write");
        peer.flush().await.expect("peer flush");
        raw_to_ours(&mut peer, bytes).await;
        let mut got = Vec::new();
        let err = within("our read", ours.read_to_end(&mut got))
            .await
            .expect_err(message);
        assert_eq!(got, b"fine", "{message}: data before the bad record");
        assert!(err.to_string().contains(message), "{message}: {err}");
        peer_sees_alert(&mut peer, alert).await;
        // The connection is dead both ways.
        let again = ours.read(&mut [0u8; 4]).await.expect_err("read again");
        assert!(again.to_string().contains(message), "{again}");
        let write = ours.write_all(b"x").await.expect_err("write after failure");
        assert!(write.to_string().contains(message), "{write}");
    }
}

#[tokio::test]
async fn a_fatal_alert_from_the_peer_is_an_error_naming_it() {
    let ca = Ca::new(TD);
    let (mut ours, mut peer) = rustls_to_ours(&ca).await;
    // A record the peer cannot authenticate: it answers with bad_record_mac.
    ours.tcp
        .write_all(&[
            23, 3, 3, 0, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ])
        .await
        .expect("raw write");
    let err = within("peer read", peer.read(&mut [0u8; 4]))
        .await
        .expect_err("the peer refuses the record");
    assert!(err.to_string().contains("decrypt"), "{err}");
    let err = within("our read", ours.read(&mut [0u8; 4]))
        .await
        .expect_err("the alert is an error");
    assert_eq!(err.to_string(), "TLS: peer sent alert BadRecordMac (20)");
}

#[test]
fn chacha20_is_refused_with_a_clear_error() {
    let secrets = rustls::ConnectionTrafficSecrets::Chacha20Poly1305 {
        key: rustls::crypto::cipher::AeadKey::from([1; 32]),
        iv: rustls::crypto::cipher::Iv::from([2; 12]),
    };
    let err = super::cipher::Protection::new(0, &secrets).expect_err("only AES-GCM");
    assert!(err.to_string().contains("not supported"), "{err}");
    assert!(
        err.to_string().contains("TLS13_AES_128_GCM_SHA256"),
        "{err}"
    );
}

/// Everything a hand-driven rustls connection wants to send, in one socket write.
async fn flush_tls(conn: &mut Connection, tcp: &mut TcpStream) {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    tcp.write_all(&out).await.expect("send");
}

/// One socket read into a hand-driven rustls connection.
async fn read_tls(conn: &mut Connection, tcp: &mut TcpStream) {
    let mut buf = vec![0; 64 << 10];
    let n = within("read", tcp.read(&mut buf)).await.expect("read");
    assert!(n > 0, "the peer closed during the handshake");
    conn.read_tls(&mut &buf[..n]).expect("read_tls");
    conn.process_new_packets().expect("process");
}

/// A hand-driven rustls client against our server, its handshake done but its Finished still
/// queued (not sent); our server's accept runs in a task.
async fn client_with_its_finished_queued(
    ca: &Ca,
) -> (
    Connection,
    TcpStream,
    tokio::task::JoinHandle<std::io::Result<TlsStream>>,
) {
    let (mut c, s) = tcp_pair().await;
    let server = tokio::spawn(accept(ca.server_config(), s));
    let client = ClientConnection::new(ca.client_config(api()), name()).expect("client");
    let mut conn = Connection::Client(client);
    flush_tls(&mut conn, &mut c).await;
    while conn.is_handshaking() {
        read_tls(&mut conn, &mut c).await;
    }
    (conn, c, server)
}

#[tokio::test]
async fn application_data_in_the_segment_of_the_client_finished_is_kept() {
    let ca = Ca::new(TD);
    for len in [1200, 40_000] {
        let (mut conn, mut c, server) = client_with_its_finished_queued(&ca).await;
        // The client Finished is queued, not sent: the data joins it in one write.
        let data = pattern(len, 11);
        std::io::Write::write_all(&mut conn.writer(), &data).expect("plaintext");
        conn.send_close_notify();
        flush_tls(&mut conn, &mut c).await;
        let mut ours = within("accept", server)
            .await
            .expect("task")
            .expect("our server handshake");
        // rustls stops at the Finished: what came with it is left for our reader.
        assert!(ours.early.is_empty(), "{len} bytes");
        assert!(ours.reader.buffered() > 0, "{len} bytes");
        let got = within("our read", receive(&mut ours)).await;
        assert!(got == data, "{len} bytes: got {}", got.len());
    }
}

#[tokio::test]
async fn application_data_in_the_segment_of_the_server_finished_is_kept() {
    let ca = Ca::new(TD);
    let (c, mut s) = tcp_pair().await;
    let client = tokio::spawn(connect(ca.client_config(api()), name(), c));
    // A rustls server sends 0.5-RTT data only without client authentication.
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(ca.leaf(&api()).load().certified_key())));
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    config.send_half_rtt_data = true;
    let server = ServerConnection::new(Arc::new(config)).expect("server");
    let mut conn = Connection::Server(server);
    read_tls(&mut conn, &mut s).await;
    // 0.5-RTT data: after the server Finished, before the client's.
    std::io::Write::write_all(&mut conn.writer(), b"half an RTT early").expect("plaintext");
    flush_tls(&mut conn, &mut s).await;
    while conn.is_handshaking() {
        read_tls(&mut conn, &mut s).await;
    }
    let mut ours = within("connect", client)
        .await
        .expect("task")
        .expect("our client handshake");
    assert!(
        !ours.early.is_empty(),
        "rustls decrypted data with the Finished"
    );
    let mut got = [0u8; 17];
    within("our read", ours.read_exact(&mut got))
        .await
        .expect("read");
    assert_eq!(&got, b"half an RTT early");
}

#[tokio::test(start_paused = true)]
async fn idle_connections_release_their_buffers() {
    let ca = Ca::new(TD);
    let (mut ours, mut peer) = rustls_to_ours(&ca).await;
    let data = pattern(1 << 20, 12);
    let transfer = async {
        let peer_side = async {
            peer.write_all(&data).await.expect("peer write");
            peer.flush().await.expect("peer flush");
            let mut back = vec![0; data.len()];
            peer.read_exact(&mut back).await.expect("peer read");
            back
        };
        let our_side = async {
            let mut got = vec![0; data.len()];
            ours.read_exact(&mut got).await.expect("our read");
            ours.write_all(&got).await.expect("our write");
            ours.flush().await.expect("our flush");
        };
        tokio::join!(peer_side, our_side).0
    };
    assert!(within("transfer", transfer).await == data);
    assert!(
        ours.buffer_capacity() >= 16 << 10,
        "traffic needed buffers: {ours:?}"
    );
    // Nothing arrives: the waiting read frees the buffers after IDLE_RELEASE.
    let idle = tokio::time::timeout(3 * IDLE_RELEASE, ours.read(&mut [0u8; 64])).await;
    assert!(idle.is_err(), "nothing to read");
    assert_eq!(ours.buffer_capacity(), 0, "{ours:?}");
    // And the connection works on.
    peer.write_all(b"again").await.expect("peer write");
    peer.flush().await.expect("peer flush");
    let mut got = [0u8; 5];
    within("read", ours.read_exact(&mut got))
        .await
        .expect("read");
    assert_eq!(&got, b"again");
}

#[tokio::test]
async fn bytes_sealed_before_a_socket_error_count_as_written_and_the_error_comes_next() {
    use std::os::fd::AsFd as _;
    let ca = Ca::new(TD);
    let (mut ours, peer) = our_pair(&ca).await;
    // The peer's socket resets; our read sees it, so the next write meets it too.
    crate::sys::set_linger_zero(peer.tcp.as_fd()).expect("linger");
    drop(peer);
    let read = within("our read", ours.read(&mut [0u8; 16])).await;
    assert_eq!(
        read.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    // The bytes are sealed (taken): reported written. The socket's error comes with the next
    // call, and every one after it.
    let written = ours.write(b"sealed").await;
    assert_eq!(written.as_ref().ok(), Some(&6), "{written:?}");
    let flushed = ours.flush().await;
    assert!(flushed.is_err(), "{flushed:?}");
    assert!(ours.write(b"more").await.is_err());
}

#[tokio::test]
async fn a_key_update_request_in_the_flight_of_the_client_finished_is_answered() {
    let ca = Ca::new(TD);
    let (mut conn, mut c, server) = client_with_its_finished_queued(&ca).await;
    // The client Finished is queued, not sent: a KeyUpdate(update_requested) and data join it
    // in one write.
    conn.refresh_traffic_keys().expect("key update request");
    std::io::Write::write_all(&mut conn.writer(), b"after the key update").expect("plaintext");
    flush_tls(&mut conn, &mut c).await;
    let mut ours = within("accept", server)
        .await
        .expect("task")
        .expect("our server handshake");
    let mut got = [0u8; 20];
    within("our read", ours.read_exact(&mut got))
        .await
        .expect("read");
    assert_eq!(&got, b"after the key update");
    // Our answer (a KeyUpdate under our old key) must reach the client before data under the
    // new one, or the client cannot read us.
    ours.write_all(b"answer").await.expect("write");
    ours.flush().await.expect("flush");
    let mut answer = Vec::new();
    while answer.len() < 6 {
        read_tls(&mut conn, &mut c).await;
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut conn.reader(), &mut buf) {
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("the client cannot read us: {e}"),
        }
    }
    assert_eq!(answer, b"answer");
}

/// A KeyUpdate(update_requested) whose answer the socket refuses (our write side is shut):
/// what the peer sent is still read, and the refusal is the next write's error, never a failed
/// read that would lose the data.
#[tokio::test]
async fn a_key_update_answer_the_socket_refuses_fails_the_next_write_not_the_read() {
    let ca = Ca::new(TD);
    let (mut ours, mut peer) = rustls_to_ours(&ca).await;
    socket2::SockRef::from(&ours.tcp)
        .shutdown(std::net::Shutdown::Write)
        .expect("shut our sending side");
    // The KeyUpdate alone first: our read takes it (and queues the answer) with nothing to
    // return yet; the data comes in a later flight, so the answer is tried before it is read.
    peer.get_mut().1.refresh_traffic_keys().expect("key update");
    peer.flush().await.expect("peer flush");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while ours.key_updates_received == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key update never arrived"
        );
        let mut buf = [0u8; 1];
        let mut rb = tokio::io::ReadBuf::new(&mut buf);
        let polled = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::pin::Pin::new(&mut ours).poll_read(cx, &mut rb))
        })
        .await;
        assert!(polled.is_pending(), "{polled:?}");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    peer.write_all(b"after the key update")
        .await
        .expect("peer write");
    peer.flush().await.expect("peer flush");
    let mut got = [0u8; 20];
    within("our read", ours.read_exact(&mut got))
        .await
        .expect("the data behind the key update is read");
    assert_eq!(&got, b"after the key update");
    assert_eq!(ours.key_updates_received, 1);
    let written = async {
        ours.write_all(b"x").await?;
        ours.flush().await
    };
    let written = within("our write", written).await;
    assert_eq!(
        written.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::BrokenPipe),
        "{written:?}"
    );
}
