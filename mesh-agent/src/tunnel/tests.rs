//! In-process tests of HBONE: real rustls and h2 over loopback TCP, with a CA built in memory
//! for each test (root -> node intermediate -> leaves). No mocks; waits have deadlines.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use h2::{client::SendRequest, RecvStream, SendStream};
use http::{Method, StatusCode};
use prometheus_client::metrics::family::Family;
use rustls::{
    client::ResolvesClientCert,
    pki_types::{CertificateDer, ServerName},
    sign::CertifiedKey,
    AlertDescription, CertificateError, PeerIncompatible, SignatureScheme,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::TlsConnector;

use super::{
    client::{Pool, PoolConfig, PoolKey, PoolMetrics, Stream},
    server::{self, Request},
    stream, tls, Error,
};
use crate::identity::{CertManager, Issuer, Leaf, SpiffeId, TrustBundle};

const DAY: Duration = Duration::from_secs(86_400);
const DEADLINE: Duration = Duration::from_secs(20);
pub(super) const TD: &str = "cluster.local";
const FORWARDED_FOR: &str = "10.1.0.5:40000";

pub(super) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("no result within {DEADLINE:?}: {what}"))
}

fn id(td: &str, ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td, ns, sa).unwrap_or_else(|e| panic!("test id: {e}"))
}

pub(super) fn api() -> SpiffeId {
    id(TD, "shop", "api")
}

fn client_id() -> SpiffeId {
    id(TD, "shop", "client")
}

fn handle(leaf: Leaf) -> Arc<ArcSwap<Leaf>> {
    Arc::new(ArcSwap::from_pointee(leaf))
}

/// A root and one node intermediate.
pub(super) struct Ca {
    root: Issuer,
    node: Issuer,
}

impl Ca {
    pub(super) fn new(td: &str) -> Ca {
        let root = Issuer::generate_root(td, 10 * DAY).expect("root CA");
        let node = root.issue_intermediate("node-1", DAY).expect("node CA");
        Ca { root, node }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::from_roots(vec![self.root.root_cert_der().expect("root DER")])
    }

    pub(super) fn leaf(&self, id: &SpiffeId) -> Arc<ArcSwap<Leaf>> {
        handle(self.node.issue_leaf(id, DAY).expect("leaf"))
    }

    pub(super) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        tls::server_config(self.bundle(), TD.into(), self.leaf(&api())).expect("server config")
    }

    pub(super) fn client_config(&self, expected: SpiffeId) -> Arc<rustls::ClientConfig> {
        tls::client_config(self.bundle(), self.leaf(&client_id()), vec![expected], None)
            .expect("client config")
    }
}

/// The test server's admission of a client, from its certificate chain.
type Admit = Arc<dyn Fn(&[CertificateDer<'static>]) -> Result<(), String> + Send + Sync>;

fn admit_all() -> Admit {
    Arc::new(|_: &[CertificateDer<'static>]| Ok(()))
}

/// What the test's inbound proxy saw of a CONNECT.
#[derive(Debug)]
struct Seen {
    peer: SpiffeId,
    authority: Result<SocketAddr, &'static str>,
    forwarded: Option<String>,
}

/// An HBONE server on a loopback port, every connection served by `server::serve` with
/// [`proxy`]; what the handler saw, copy results and `serve` results come out of the channels.
struct Server {
    addr: SocketAddr,
    /// Set to true: every connection drains (GOAWAY), as when the agent hands over.
    drain: tokio::sync::watch::Sender<bool>,
    seen: mpsc::UnboundedReceiver<Seen>,
    copied: mpsc::UnboundedReceiver<io::Result<(u64, u64)>>,
    ended: mpsc::UnboundedReceiver<Result<(), Error>>,
}

impl Server {
    async fn start(config: Arc<rustls::ServerConfig>) -> Server {
        Server::start_aged(config, DAY).await
    }

    /// A server whose connections take new streams for `max_age` only.
    async fn start_aged(config: Arc<rustls::ServerConfig>, max_age: Duration) -> Server {
        Server::start_with(config, server::Options::with_max_age(max_age), admit_all()).await
    }

    /// A server that admits a client only when `admit` says so.
    async fn start_with(
        config: Arc<rustls::ServerConfig>,
        options: server::Options,
        admit: Admit,
    ) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind HBONE");
        Server::start_listening(listener, config, options, admit)
    }

    /// A server on `listener`, as [`Server::start_with`].
    fn start_listening(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        options: server::Options,
        admit: Admit,
    ) -> Server {
        let addr = listener.local_addr().expect("HBONE address");
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (copied_tx, copied) = mpsc::unbounded_channel();
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let (drain, draining) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (config, seen, copied) = (config.clone(), seen_tx.clone(), copied_tx.clone());
                let ended = ended_tx.clone();
                let mut draining = draining.clone();
                let admit = admit.clone();
                tokio::spawn(async move {
                    let handler = move |req| proxy(req, seen.clone(), copied.clone());
                    let drain = async move {
                        if draining.wait_for(|d| *d).await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    let admitted =
                        move |chain: Vec<CertificateDer<'static>>| async move { admit(&chain) };
                    let served = server::serve(
                        tcp,
                        config,
                        handler,
                        drain,
                        options,
                        std::future::ready(()),
                        admitted,
                    );
                    let _ = ended.send(served.await);
                });
            }
        });
        Server {
            addr,
            drain,
            seen,
            copied,
            ended,
        }
    }

    async fn next_seen(&mut self) -> Seen {
        within("CONNECT at the server", self.seen.recv())
            .await
            .expect("server gone")
    }

    async fn next_end(&mut self) -> Result<(), Error> {
        within("serve to return", self.ended.recv())
            .await
            .expect("server gone")
    }
}

/// The inbound proxy of the tests: 400 for an unusable authority (as the agent's proxy
/// does), else connects to the authority and copies.
async fn proxy(
    req: Request,
    seen: mpsc::UnboundedSender<Seen>,
    copied: mpsc::UnboundedSender<io::Result<(u64, u64)>>,
) {
    let _ = seen.send(Seen {
        peer: (*req.peer).clone(),
        authority: req.authority,
        forwarded: req.forwarded.clone(),
    });
    let Ok(dst) = req.authority else {
        return req.reject(StatusCode::BAD_REQUEST);
    };
    let Ok(tcp) = TcpStream::connect(dst).await else {
        return req.reject(StatusCode::SERVICE_UNAVAILABLE);
    };
    if let Ok((send, recv)) = req.accept() {
        let _ = copied.send(stream::copy(tcp, send, recv, |_| {}, |_| {}).await);
    }
}

/// A TCP echo server. With `after_eof` it answers only once the client half-closed, so every
/// byte of the answer proves that half-close crossed the tunnel.
async fn echo_server(after_eof: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.into_split();
                if after_eof {
                    let mut all = Vec::new();
                    if rd.read_to_end(&mut all).await.is_ok() {
                        let _ = wr.write_all(&all).await;
                    }
                } else {
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                }
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

/// A CA, an HBONE server presenting `api` (trusting the CA's root, trust domain `TD`) and an
/// echo server behind it.
struct Mesh {
    ca: Ca,
    server: Server,
    echo: SocketAddr,
}

impl Mesh {
    async fn up() -> Mesh {
        let ca = Ca::new(TD);
        let server = Server::start(ca.server_config()).await;
        Mesh {
            ca,
            server,
            echo: echo_server(false).await,
        }
    }

    async fn open(&self, pool: &Pool) -> Result<Stream, Error> {
        let config = self.ca.client_config(api());
        open(pool, &key(self.server.addr), config, self.echo).await
    }
}

fn key(dst: SocketAddr) -> PoolKey {
    PoolKey {
        src: client_id(),
        src_pod: 1,
        dst,
        expected: api(),
    }
}

fn new_pool(max_streams: usize, idle: Duration) -> (Arc<Pool>, PoolMetrics) {
    spreading_pool(max_streams, 1, idle)
}

fn spreading_pool(
    max_streams: usize,
    max_conns: usize,
    idle: Duration,
) -> (Arc<Pool>, PoolMetrics) {
    let metrics = PoolMetrics::default();
    let config = PoolConfig {
        max_streams,
        max_conns,
        idle,
        max_age: DAY,
    };
    (Pool::new(config, metrics.clone()), metrics)
}

async fn open(
    pool: &Pool,
    key: &PoolKey,
    config: Arc<rustls::ClientConfig>,
    authority: SocketAddr,
) -> Result<Stream, Error> {
    let dst = key.dst;
    let forwarded = FORWARDED_FOR.parse().expect("forwarded address");
    let dial = move || TcpStream::connect(dst);
    let open = pool.open(key, || Ok(config.clone()), dial, authority, forwarded, None);
    within("Pool::open", open).await
}

/// Sends `data` on an HTTP/2 stream and reads the same number of bytes back.
async fn h2_echo(send: &mut SendStream<Bytes>, recv: &mut RecvStream, data: &[u8]) {
    send.send_data(Bytes::copy_from_slice(data), false)
        .expect("send DATA");
    let mut got = Vec::new();
    while got.len() < data.len() {
        let chunk = within("echoed DATA", recv.data())
            .await
            .expect("stream ended before the echo")
            .expect("echoed DATA");
        recv.flow_control()
            .release_capacity(chunk.len())
            .expect("release capacity");
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, data, "echo differs");
}

async fn tls_connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    let name = ServerName::IpAddress(addr.ip().into());
    let handshake = TlsConnector::from(Arc::new(config)).connect(name, tcp);
    within("TLS handshake", handshake).await
}

/// A TLS + HTTP/2 client connection made by hand; returns the request handle and the
/// certificate chain the server presented.
async fn h2_connect(
    addr: SocketAddr,
    config: &rustls::ClientConfig,
) -> (SendRequest<Bytes>, Vec<CertificateDer<'static>>) {
    let tls = tls_connect(addr, config.clone())
        .await
        .expect("TLS handshake");
    let (_, session) = tls.get_ref();
    let certs = session.peer_certificates().expect("chain").to_vec();
    let (send, conn) = within("h2 handshake", h2::client::handshake(tls))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    (send, certs)
}

/// Sends a request with an open body; returns the status and the stream.
async fn request(
    send: &mut SendRequest<Bytes>,
    method: Method,
    uri: &str,
) -> Result<(StatusCode, SendStream<Bytes>, RecvStream), h2::Error> {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("request");
    let mut ready = within("h2 ready", send.clone().ready()).await?;
    let (response, body) = ready.send_request(req, false)?;
    let response = within("response", response).await?;
    Ok((response.status(), body, response.into_body()))
}

/// The rustls error inside an `Error::Tls` (tokio-rustls keeps it as the io::Error's inner).
fn rustls_error(e: &Error) -> &rustls::Error {
    match e {
        Error::Tls { source, .. } => io_rustls_error(source),
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

fn io_rustls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref())
        .unwrap_or_else(|| panic!("expected a rustls error inside {e:?}"))
}

/// Opens through a pool with a client config the server should refuse; returns the client's
/// and the server's errors.
async fn refused(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
) -> (Error, Error) {
    let mut server = Server::start(server_config).await;
    let (pool, _) = new_pool(200, DAY);
    let echo = echo_server(false).await;
    let client = open(&pool, &key(server.addr), client_config, echo)
        .await
        .expect_err("the handshake should be refused");
    let server = server.next_end().await.expect_err("serve should fail");
    (client, server)
}

/// The client's view of a refused handshake: TLS 1.3 clients finish before the server checks
/// their certificate, so the alert arrives after the handshake, through the record layer, on
/// the HTTP/2 connection (as text: h2 keeps only the message of an I/O error).
fn assert_client_alert(client: &Error, alert: AlertDescription) {
    let text = client.to_string();
    let code = u8::from(alert);
    // rustls words it its own way where it reads the records (feature rustls-records).
    let expected = if cfg!(feature = "rustls-records") {
        format!("received fatal alert: {alert:?}")
    } else {
        format!("TLS: peer sent alert {alert:?} ({code})")
    };
    assert!(
        text.contains(&expected),
        "client should see alert {alert:?}, got: {text}"
    );
}

#[tokio::test]
async fn tunnels_one_mebibyte_both_ways_with_half_close() {
    let ca = Ca::new(TD);
    let mut server = Server::start(ca.server_config()).await;
    let echo = echo_server(true).await;
    let (pool, _) = new_pool(200, DAY);
    let stream = open(&pool, &key(server.addr), ca.client_config(api()), echo)
        .await
        .expect("HBONE CONNECT");
    let seen = server.next_seen().await;
    assert_eq!(
        seen.peer,
        client_id(),
        "server must see the client's identity"
    );
    assert_eq!(seen.authority, Ok(echo), "authority");
    assert_eq!(seen.forwarded.as_deref(), Some("for=\"10.1.0.5:40000\""));

    // The application's socket, bridged to the tunnel stream as the outbound proxy does.
    let bridge = TcpListener::bind("127.0.0.1:0").await.expect("bind bridge");
    let app = TcpStream::connect(bridge.local_addr().expect("bridge address"))
        .await
        .expect("connect bridge");
    let (side, _) = bridge.accept().await.expect("accept bridge");
    let Stream { send, recv, .. } = stream;
    let client_copy = tokio::spawn(stream::copy(side, send, recv, |_| {}, |_| {}));

    // The echo server answers only after EOF: every byte back follows our END_STREAM.
    let data: Vec<u8> = (0..251u8).cycle().take(1 << 20).collect();
    let (mut rd, mut wr) = app.into_split();
    let write = async {
        wr.write_all(&data).await.expect("write to the tunnel");
        wr.shutdown().await.expect("half-close");
    };
    let read = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.expect("read the echo");
        got
    };
    let ((), got) = within("1 MiB echo", async { tokio::join!(write, read) }).await;
    assert_eq!(got.len(), data.len(), "echo length");
    assert!(got == data, "echo differs from what was sent");

    let n = 1u64 << 20;
    let client = within("client copy", client_copy).await.expect("task");
    assert_eq!(client.expect("client copy"), (n, n), "client copy counts");
    let copied = within("server copy", server.copied.recv())
        .await
        .expect("copied");
    assert_eq!(copied.expect("server copy"), (n, n), "server copy counts");
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let ca = Ca::new(TD);
    let db = id(TD, "shop", "db");
    let (client, server) = refused(ca.server_config(), ca.client_config(db)).await;
    assert!(matches!(client, Error::Tls { .. }), "client: {client:?}");
    assert_eq!(
        rustls_error(&client),
        &rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    );
    assert!(client.to_string().contains("certificate"), "{client}");
    let alert = rustls::Error::AlertReceived(AlertDescription::AccessDenied);
    assert_eq!(rustls_error(&server), &alert, "server: {server}");
}

#[tokio::test]
async fn server_refuses_a_client_of_another_trust_domain() {
    let ca = Ca::new(TD);
    let other = Ca::new("other.domain");
    let stranger = other.leaf(&id("other.domain", "x", "y"));
    let client_config =
        tls::client_config(ca.bundle(), stranger, vec![api()], None).expect("client config");

    // Its root unknown to the server: an unknown issuer.
    let (client, server) = refused(ca.server_config(), client_config.clone()).await;
    let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
    assert_eq!(rustls_error(&server), &unknown, "server: {server}");
    assert_client_alert(&client, AlertDescription::UnknownCA);

    // Its root trusted (a federated bundle), its trust domain still not ours.
    let roots = [&ca.root, &other.root].map(|r| r.root_cert_der().expect("root"));
    let both = TrustBundle::from_roots(roots.to_vec());
    let server_config =
        tls::server_config(both, TD.into(), ca.leaf(&api())).expect("server config");
    let (client, server) = refused(server_config, client_config).await;
    let denied = CertificateError::ApplicationVerificationFailure;
    let denied = rustls::Error::InvalidCertificate(denied);
    assert_eq!(rustls_error(&server), &denied, "server: {server}");
    assert_client_alert(&client, AlertDescription::AccessDenied);
}

#[tokio::test]
async fn server_refuses_a_client_of_an_untrusted_root_of_the_same_domain() {
    let ca = Ca::new(TD);
    let rogue = Ca::new(TD);
    let client_config =
        tls::client_config(ca.bundle(), rogue.leaf(&client_id()), vec![api()], None)
            .expect("client config");
    let (client, server) = refused(ca.server_config(), client_config).await;
    let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
    assert_eq!(rustls_error(&server), &unknown, "server: {server}");
    assert_client_alert(&client, AlertDescription::UnknownCA);
}

#[tokio::test]
async fn server_refuses_an_expired_client_certificate() {
    let ca = Ca::new(TD);
    let past = SystemTime::now() - Duration::from_secs(7200);
    let expired = (ca.node)
        .issue_leaf_at(&client_id(), Duration::from_secs(60), past)
        .expect("expired leaf");
    assert!(
        expired.not_after < SystemTime::now(),
        "leaf should be expired"
    );
    let client_config =
        tls::client_config(ca.bundle(), handle(expired), vec![api()], None).expect("client config");
    let (client, server) = refused(ca.server_config(), client_config).await;
    let expired = rustls::Error::InvalidCertificate(CertificateError::Expired);
    assert_eq!(rustls_error(&server), &expired, "server: {server}");
    assert_client_alert(&client, AlertDescription::CertificateExpired);
}

/// What `ClientConfig::with_no_client_auth` installs: no certificate to offer.
#[derive(Debug)]
struct NoCert;

impl ResolvesClientCert for NoCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn server_refuses_a_client_without_certificate_with_alert_116() {
    let ca = Ca::new(TD);
    let mut server = Server::start(ca.server_config()).await;
    // The real client config (same provider, TLS 1.3, ALPN h2, SPIFFE check of the server)
    // without a client certificate.
    let mut config = (*ca.client_config(api())).clone();
    config.client_auth_cert_resolver = Arc::new(NoCert);
    let mut tls = tls_connect(server.addr, config)
        .await
        .expect("a TLS 1.3 client finishes before the server judges its certificate");
    let err = within("alert", tls.read(&mut [0u8; 1]))
        .await
        .expect_err("the server must refuse");
    let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
    assert_eq!(
        io_rustls_error(&err),
        &alert,
        "certificate_required expected"
    );
    assert_eq!(u8::from(AlertDescription::CertificateRequired), 116);
    let server = server.next_end().await.expect_err("serve should fail");
    assert_eq!(
        rustls_error(&server),
        &rustls::Error::NoCertificatesPresented
    );
}

/// A minimal TLS 1.2 ClientHello (no supported_versions extension), written by hand: the
/// rustls build here has no `tls12` feature, so no rustls client can speak TLS 1.2.
fn tls12_client_hello() -> Vec<u8> {
    let u16be = |n: usize| u16::try_from(n).expect("length").to_be_bytes();
    let mut body = vec![0x03, 0x03]; // client_version TLS 1.2
    body.extend([0x5a; 32]); // random
    body.push(0); // no session id
    body.extend([0x00, 0x02, 0xc0, 0x2b]); // TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    body.extend([0x01, 0x00]); // null compression
    let ext = [
        0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d, // supported_groups: x25519
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
        0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03, // signature_algorithms: ecdsa p256
        0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2', // ALPN: h2
    ];
    body.extend(u16be(ext.len()));
    body.extend(ext);
    let len = u32::try_from(body.len()).expect("length").to_be_bytes();
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(u16be(body.len() + 4));
    record.extend([0x01, len[1], len[2], len[3]]); // ClientHello
    record.extend(body);
    record
}

#[tokio::test]
async fn server_refuses_tls12() {
    let ca = Ca::new(TD);
    let mut server = Server::start(ca.server_config()).await;
    let mut tcp = TcpStream::connect(server.addr).await.expect("TCP connect");
    tcp.write_all(&tls12_client_hello())
        .await
        .expect("send ClientHello");
    let mut answer = Vec::new();
    within("answer", tcp.read_to_end(&mut answer))
        .await
        .expect("read answer");
    // One plaintext alert record: fatal (2), protocol_version (70).
    assert_eq!(answer.len(), 7, "one alert record: {answer:02x?}");
    assert_eq!(answer[0], 0x15, "alert record: {answer:02x?}");
    assert_eq!(
        answer[5..],
        [2, u8::from(AlertDescription::ProtocolVersion)]
    );
    let server = server.next_end().await.expect_err("serve should fail");
    let why = PeerIncompatible::SupportedVersionsExtensionRequired;
    assert_eq!(rustls_error(&server), &rustls::Error::PeerIncompatible(why));
}

#[tokio::test]
async fn alpn_other_than_h2_is_refused() {
    let ca = Ca::new(TD);

    // Offering only http/1.1: rustls refuses in the handshake (no_application_protocol, 120).
    let mut server = Server::start(ca.server_config()).await;
    let mut config = (*ca.client_config(api())).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let err = tls_connect(server.addr, config)
        .await
        .expect_err("http/1.1 must be refused");
    let alert = rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol);
    assert_eq!(io_rustls_error(&err), &alert);
    let end = server.next_end().await.expect_err("serve should fail");
    assert_eq!(rustls_error(&end), &rustls::Error::NoApplicationProtocol);

    // Offering no ALPN at all: the handshake completes without a protocol, then both ends
    // refuse with Error::Alpn (the server closes without an alert).
    let mut config = (*ca.client_config(api())).clone();
    config.alpn_protocols.clear();
    let (client, server) = refused(ca.server_config(), Arc::new(config)).await;
    assert!(matches!(client, Error::Alpn { .. }), "client: {client:?}");
    assert!(matches!(server, Error::Alpn { .. }), "server: {server:?}");
}

/// Polls for a state the pool reaches on its own timer; the deadline bounds the wait.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

const IDLE: Duration = Duration::from_millis(200);

#[tokio::test]
async fn pool_reuses_connections_and_expires_idle_ones() {
    let mesh = Mesh::up().await;
    let (pool, metrics) = new_pool(200, IDLE);
    let mut a = mesh.open(&pool).await.expect("open a");
    let mut b = mesh.open(&pool).await.expect("open b");
    assert_eq!(
        a.conn_id, b.conn_id,
        "the second stream should share the connection"
    );
    assert_eq!(metrics.connections_opened.get(), 1);
    assert_eq!(metrics.connections.get(), 1);
    assert_eq!(metrics.streams_opened.get(), 2);
    h2_echo(&mut a.send, &mut a.recv, b"stream a").await;
    h2_echo(&mut b.send, &mut b.recv, b"stream b").await;
    drop((a, b));
    wait_for("idle expiry", || metrics.connections.get() == 0).await;

    let (pool, metrics) = new_pool(1, IDLE);
    let mut a = mesh.open(&pool).await.expect("open a");
    let mut b = mesh.open(&pool).await.expect("open b");
    assert_ne!(
        a.conn_id, b.conn_id,
        "a full connection must not take another stream"
    );
    assert_eq!(metrics.connections_opened.get(), 2);
    assert_eq!(metrics.connections.get(), 2);
    h2_echo(&mut a.send, &mut a.recv, b"stream a").await;
    h2_echo(&mut b.send, &mut b.recv, b"stream b").await;
    drop((a, b));
    wait_for("idle expiry", || metrics.connections.get() == 0).await;
    let mut c = mesh.open(&pool).await.expect("open c");
    assert_eq!(
        metrics.connections_opened.get(),
        3,
        "expired connections are not reused"
    );
    h2_echo(&mut c.send, &mut c.recv, b"stream c").await;
}

#[tokio::test]
async fn pool_closes_the_connections_it_expires() {
    let mut mesh = Mesh::up().await;
    let (pool, metrics) = new_pool(200, IDLE);
    let mut a = mesh.open(&pool).await.expect("open");
    h2_echo(&mut a.send, &mut a.recv, b"hello").await;
    drop(a);
    wait_for("idle expiry", || metrics.connections.get() == 0).await;
    // Once the pool lets go of the connection, h2 closes it and the server's serve returns.
    let end = tokio::time::timeout(Duration::from_secs(5), mesh.server.ended.recv()).await;
    let end = end.expect("the expired HBONE connection is still open 5 s after its expiry");
    end.expect("server gone").expect("serve should end cleanly");
}

/// Opens `n` streams at once, from as many tasks.
async fn burst(mesh: &Arc<Mesh>, pool: &Arc<Pool>, n: usize) -> Vec<Stream> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (pool, mesh) = (pool.clone(), mesh.clone());
        tasks.spawn(async move { mesh.open(&pool).await.expect("open") });
    }
    within("burst", tasks.join_all()).await
}

#[tokio::test]
async fn pool_burst_shares_one_new_connection() {
    let mesh = Arc::new(Mesh::up().await);
    let (pool, metrics) = new_pool(200, DAY);
    let streams = burst(&mesh, &pool, 8).await;
    assert_eq!(
        metrics.connections_opened.get(),
        1,
        "one handshake for the burst"
    );
    assert!(streams.iter().all(|s| s.conn_id == streams[0].conn_id));
}

#[tokio::test]
async fn pool_spreads_concurrent_streams_over_max_conns_connections() {
    let mesh = Arc::new(Mesh::up().await);
    let (pool, metrics) = spreading_pool(200, 2, DAY);
    let mut a = mesh.open(&pool).await.expect("open a");
    // `a` is busy: the next stream gets a connection of its own.
    let mut b = mesh.open(&pool).await.expect("open b");
    assert_ne!(a.conn_id, b.conn_id, "a busy connection: spread");
    // Both connections are busy and the key has its two: the least loaded one is shared.
    let mut c = mesh.open(&pool).await.expect("open c");
    assert!(c.conn_id == a.conn_id || c.conn_id == b.conn_id);
    assert_eq!(metrics.connections_opened.get(), 2);
    for s in [&mut a, &mut b, &mut c] {
        h2_echo(&mut s.send, &mut s.recv, b"spread").await;
    }
    drop((a, b, c));
    // Idle again: a new stream reuses a connection instead of dialling.
    let _d = mesh.open(&pool).await.expect("open d");
    assert_eq!(metrics.connections_opened.get(), 2);

    // A burst from cold: at most two handshakes, however many streams.
    let (pool, metrics) = spreading_pool(200, 2, DAY);
    let streams = burst(&mesh, &pool, 8).await;
    assert_eq!(
        metrics.connections_opened.get(),
        2,
        "one handshake per allowed connection"
    );
    assert_eq!(streams.len(), 8);
}

#[tokio::test]
async fn pool_sends_initial_bytes_with_the_request() {
    let mesh = Mesh::up().await;
    let (pool, _metrics) = new_pool(200, DAY);
    let config = mesh.ca.client_config(api());
    let dst = mesh.server.addr;
    let forwarded = FORWARDED_FOR.parse().expect("forwarded address");
    let key = key(dst);
    let open = pool.open(
        &key,
        || Ok(config.clone()),
        move || TcpStream::connect(dst),
        mesh.echo,
        forwarded,
        Some(Bytes::from_static(b"first bytes")),
    );
    let mut stream = within("Pool::open", open).await.expect("open");
    // The echo of the initial bytes comes back before anything else is sent.
    let mut got = Vec::new();
    while got.len() < b"first bytes".len() {
        let chunk = within("echo", stream.recv.data())
            .await
            .expect("stream ended")
            .expect("DATA");
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"first bytes");
    h2_echo(&mut stream.send, &mut stream.recv, b"then more").await;
}

#[tokio::test]
async fn malformed_requests_do_not_disturb_other_streams() {
    let Mesh {
        ca,
        mut server,
        echo,
    } = Mesh::up().await;
    let (mut conn, _) = h2_connect(server.addr, &ca.client_config(api())).await;
    let (status, mut send, mut recv) = request(&mut conn, Method::CONNECT, &echo.to_string())
        .await
        .expect("good CONNECT");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.next_seen().await.authority, Ok(echo));
    h2_echo(&mut send, &mut recv, b"before").await;

    for (method, uri, why) in [
        (Method::GET, "http://127.0.0.1:1/", "not a CONNECT request"),
        (Method::CONNECT, "notanip:80", "authority is not ip:port"),
        (Method::CONNECT, "10.0.0.1:0", "port 0"),
    ] {
        let answer = request(&mut conn, method, uri).await;
        assert_eq!(answer.expect(uri).0, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(server.next_seen().await.authority, Err(why), "{uri}");
    }
    // No :authority: h2's server resets the stream (PROTOCOL_ERROR) before server.rs sees it.
    let err = request(&mut conn, Method::CONNECT, "/")
        .await
        .expect_err("no authority");
    let protocol_error = Some(h2::Reason::PROTOCOL_ERROR);
    assert!(
        err.is_reset() && err.is_remote() && err.reason() == protocol_error,
        "a stream reset, not a connection error: {err:?}"
    );

    h2_echo(&mut send, &mut recv, b"after the malformed requests").await;
    let (status, mut send2, mut recv2) = request(&mut conn, Method::CONNECT, &echo.to_string())
        .await
        .expect("another good CONNECT on the same connection");
    assert_eq!(status, StatusCode::OK);
    h2_echo(&mut send2, &mut recv2, b"second").await;
    assert!(
        server.ended.try_recv().is_err(),
        "the connection must stay up"
    );

    // Through the pool, a refused CONNECT is an Error::Status.
    let (pool, _) = new_pool(200, DAY);
    let port0 = "10.0.0.1:0".parse().expect("address");
    let err = open(&pool, &key(server.addr), ca.client_config(api()), port0).await;
    let err = err.expect_err("port 0 is refused");
    let status = matches!(
        err,
        Error::Status {
            status: StatusCode::BAD_REQUEST,
            ..
        }
    );
    assert!(status, "{err:?}");
}

#[tokio::test]
async fn pool_sends_a_bare_connect() {
    let ca = Ca::new(TD);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let config = ca.server_config();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .expect("TLS");
        let mut conn = h2::server::handshake(tls).await.expect("h2");
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            let _ = tx.send((
                req.method().clone(),
                req.uri().clone(),
                req.headers().clone(),
            ));
            let _ = respond.send_response(http::Response::new(()), false);
        }
    });
    let (pool, _) = new_pool(200, DAY);
    let authority = "10.0.0.7:8080".parse().expect("address");
    let _stream = open(&pool, &key(addr), ca.client_config(api()), authority)
        .await
        .expect("CONNECT");
    let (method, uri, headers) = within("request", rx.recv()).await.expect("request");
    assert_eq!(method, Method::CONNECT);
    // h2's server resets a CONNECT with :scheme or :path, so reaching here already proves
    // they were absent; the URI it rebuilt holds the authority alone.
    assert_eq!(uri.scheme(), None, "{uri:?}");
    assert_eq!(uri.path_and_query(), None, "{uri:?}");
    assert_eq!(uri.authority().map(|a| a.as_str()), Some("10.0.0.7:8080"));
    assert_eq!(headers["forwarded"], "for=\"10.1.0.5:40000\"");
}

fn unix(t: SystemTime) -> i64 {
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    i64::try_from(secs).expect("seconds")
}

#[tokio::test]
async fn rotation_keeps_streams_and_new_connections_get_the_new_certificate() {
    let ca = Ca::new(TD);
    let node2 = ca.root.issue_intermediate("node-2", DAY).expect("node CA");
    let lifetime = Duration::from_secs(4);
    let bundle = ca.bundle();
    let manager = CertManager::new(ca.node, bundle.clone(), lifetime, Family::default());
    let current = manager.get(&api()).expect("server leaf");
    let config = tls::server_config(bundle.clone(), TD.into(), current.clone()).expect("config");
    let mut server = Server::start(config).await;
    let echo = echo_server(false).await;
    let client_leaf = handle(node2.issue_leaf(&client_id(), DAY).expect("client leaf"));
    let client = tls::client_config(bundle, client_leaf, vec![api()], None).expect("client config");

    let old = current.load_full();
    let (mut conn, certs) = h2_connect(server.addr, &client).await;
    assert_eq!(certs[0], old.chain[0], "first connection: the first leaf");
    let (_, mut send, mut recv) = request(&mut conn, Method::CONNECT, &echo.to_string())
        .await
        .expect("CONNECT");
    h2_echo(&mut send, &mut recv, b"before rotation").await;

    let new = Arc::new(node2.issue_leaf(&api(), lifetime).expect("new leaf"));
    assert_ne!(new.chain[0], old.chain[0]);
    current.store(new.clone());
    h2_echo(&mut send, &mut recv, b"after rotation").await;

    let (mut conn2, certs) = h2_connect(server.addr, &client).await;
    assert_eq!(certs[0], new.chain[0], "new connection: the new leaf");
    assert_eq!(&certs[1], node2.cert_der(), "with its own chain");
    assert_eq!(tls::not_after_of(&certs[0]), Some(unix(new.not_after)));
    let (_, mut send2, mut recv2) = request(&mut conn2, Method::CONNECT, &echo.to_string())
        .await
        .expect("CONNECT on the new connection");
    h2_echo(&mut send2, &mut recv2, b"new connection").await;
    h2_echo(&mut send, &mut recv, b"old stream still fine").await;

    let (pool, _) = new_pool(200, DAY);
    let mut s = open(&pool, &key(server.addr), client, echo)
        .await
        .expect("pool");
    h2_echo(&mut s.send, &mut s.recv, b"pool").await;
    for _ in 0..3 {
        assert_eq!(server.next_seen().await.peer, client_id());
    }
}

#[tokio::test]
async fn a_draining_server_keeps_open_streams_and_new_ones_go_to_a_new_connection() {
    let mut mesh = Mesh::up().await;
    let (pool, metrics) = new_pool(100, DAY);
    let mut first = mesh.open(&pool).await.expect("first stream");
    h2_echo(&mut first.send, &mut first.recv, b"before the drain").await;
    mesh.server.drain.send_replace(true);
    // Streams opened from now on never fail: until the client has seen the GOAWAY they may
    // still go to the draining connection (the server takes them), then to a new one.
    let mut second = within("a stream on a new connection", async {
        loop {
            let mut stream = mesh.open(&pool).await.expect("a stream while draining");
            h2_echo(&mut stream.send, &mut stream.recv, b"while draining").await;
            if stream.conn_id != first.conn_id {
                break stream;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(metrics.connections_opened.get(), 2);
    h2_echo(&mut second.send, &mut second.recv, b"after").await;
    // The stream opened before the drain still carries data both ways.
    h2_echo(&mut first.send, &mut first.recv, b"still flowing").await;
    first
        .send
        .send_data(Bytes::new(), true)
        .expect("end of stream");
    drop(first);
    // With its last stream done, the drained connection ends cleanly.
    assert!(
        mesh.server.next_end().await.is_ok(),
        "serve ends without error"
    );
}

#[tokio::test]
async fn a_stream_refused_unprocessed_is_opened_again() {
    let ca = Ca::new(TD);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let config = ca.server_config();
    // A server (rustls and h2 by hand) that refuses its first stream with REFUSED_STREAM, as a
    // peer that cannot take it does, and echoes the next one.
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .expect("TLS");
        let mut conn = h2::server::handshake(tls).await.expect("h2");
        let mut first = true;
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            if std::mem::take(&mut first) {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            }
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .expect("200");
            let mut body = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(data)) = body.data().await {
                    let _ = body.flow_control().release_capacity(data.len());
                    if send.send_data(data, false).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let (pool, metrics) = new_pool(100, DAY);
    let echo = "127.0.0.1:9".parse().expect("authority");
    let mut stream = open(&pool, &key(addr), ca.client_config(api()), echo)
        .await
        .expect("opened on the second attempt");
    h2_echo(&mut stream.send, &mut stream.recv, b"after a refusal").await;
    assert_eq!(metrics.streams_retried.get(), 1);
    assert_eq!(metrics.streams_opened.get(), 2);
}

#[tokio::test]
async fn a_header_block_over_the_limit_ends_the_connection_before_the_handler() {
    let Mesh {
        ca,
        mut server,
        echo,
    } = Mesh::up().await;
    let (conn, _) = h2_connect(server.addr, &ca.client_config(api())).await;
    let req = http::Request::builder()
        .method(Method::CONNECT)
        .uri(echo.to_string())
        .header("x-padding", "a".repeat(64 << 10))
        .body(())
        .expect("request");
    let mut ready = within("h2 ready", conn.ready()).await.expect("ready");
    let answer = match ready.send_request(req, false) {
        Ok((response, _body)) => within("response", response).await.map(|r| r.status()),
        Err(e) => Err(e),
    };
    // h2 answers a header list this far over SETTINGS_MAX_HEADER_LIST_SIZE with
    // GOAWAY(ENHANCE_YOUR_CALM): the whole connection goes.
    let err = answer.expect_err("a 64 KiB header block was accepted");
    assert!(
        err.is_go_away() && err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM),
        "{err:?}"
    );
    let ended = within("the connection to end", server.ended.recv()).await;
    assert!(ended.is_some(), "the server connection did not end");
    assert!(
        server.seen.try_recv().is_err(),
        "the oversized request reached the handler"
    );
}

/// A pool of one connection per key whose connections take new streams for `max_age`.
fn aged_pool(max_age: Duration) -> (Arc<Pool>, PoolMetrics) {
    let metrics = PoolMetrics::default();
    let config = PoolConfig {
        max_streams: 100,
        max_conns: 1,
        idle: DAY,
        max_age,
    };
    (Pool::new(config, metrics.clone()), metrics)
}

#[tokio::test]
async fn a_connection_past_its_maximum_age_takes_no_new_stream_from_the_client() {
    let mesh = Mesh::up().await;
    let max_age = Duration::from_millis(300);
    let (pool, metrics) = aged_pool(max_age);
    let mut first = mesh.open(&pool).await.expect("first stream");
    // The connection is at least this old from here on.
    let born = std::time::Instant::now();
    h2_echo(&mut first.send, &mut first.recv, b"young").await;
    wait_for("the connection to pass its maximum age", || {
        born.elapsed() > max_age
    })
    .await;
    let mut second = mesh.open(&pool).await.expect("second stream");
    assert_ne!(
        second.conn_id, first.conn_id,
        "a new stream on an old connection"
    );
    assert_eq!(metrics.connections_opened.get(), 2);
    h2_echo(&mut second.send, &mut second.recv, b"new").await;
    // The old connection's stream goes on.
    h2_echo(&mut first.send, &mut first.recv, b"old, still flowing").await;
}

#[tokio::test]
async fn a_server_sends_goaway_at_the_maximum_age_and_open_streams_go_on() {
    let ca = Ca::new(TD);
    let max_age = Duration::from_millis(300);
    let server = Server::start_aged(ca.server_config(), max_age).await;
    let mesh = Mesh {
        ca,
        server,
        echo: echo_server(false).await,
    };
    let (pool, metrics) = new_pool(100, DAY);
    let mut first = mesh.open(&pool).await.expect("first stream");
    // The connection is at least this old from here on.
    let born = std::time::Instant::now();
    wait_for("the connection to pass its maximum age", || {
        born.elapsed() > max_age
    })
    .await;
    // After the server's GOAWAY the client opens its next stream on a new connection.
    let mut second = within("a stream on a new connection", async {
        loop {
            let mut stream = mesh.open(&pool).await.expect("a stream");
            h2_echo(&mut stream.send, &mut stream.recv, b"after").await;
            if stream.conn_id != first.conn_id {
                break stream;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(metrics.connections_opened.get() >= 2);
    h2_echo(&mut second.send, &mut second.recv, b"new").await;
    h2_echo(&mut first.send, &mut first.recv, b"old, still flowing").await;
}

#[test]
fn connections_retire_at_the_peer_certificates_expiry_or_their_maximum_age() {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let in_secs = |at: tokio::time::Instant| {
        at.saturating_duration_since(tokio::time::Instant::now())
            .as_secs_f64()
    };
    let not_after = i64::try_from(now + 5).expect("fits");
    // The certificate expires first.
    let at = in_secs(super::retire_at(not_after, DAY));
    assert!((3.0..=5.0).contains(&at), "{at}");
    // The maximum age comes first.
    let at = in_secs(super::retire_at(not_after, Duration::from_secs(1)));
    assert!((0.0..=1.0).contains(&at), "{at}");
    // An expired certificate: at once.
    assert_eq!(in_secs(super::retire_at(0, DAY)), 0.0);
}

/// Placement of the tests: node-1 may issue only shop/client.
#[derive(Debug)]
struct OnlyClientOnNode1;

impl crate::identity::Placement for OnlyClientOnNode1 {
    fn may_issue(&self, node: &str, id: &SpiffeId) -> bool {
        node == "node-1" && *id == client_id()
    }
}

#[tokio::test]
async fn a_server_admits_a_node_issued_client_only_from_the_node_that_runs_it() {
    use crate::identity::Placement as _;
    let ca = Ca::new(TD);
    let bundle = ca.bundle();
    // The agent's rule (proxy::inbound's admission), without the wait.
    let admit: Admit = Arc::new(move |chain: &[CertificateDer<'static>]| {
        let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
        let (id, node) = crate::identity::verify_peer_issued(
            leaf,
            rest,
            &bundle,
            rustls::pki_types::UnixTime::now(),
            crate::identity::PeerRole::Client,
        )
        .map_err(|e| e.to_string())?;
        match node {
            Some(node) if !OnlyClientOnNode1.may_issue(&node, &id) => Err(format!(
                "{id} was issued by node {node}, which runs no workload with that identity"
            )),
            _ => Ok(()),
        }
    });
    // shop/client from node-1, which runs it: served.
    let mut server = Server::start_with(
        ca.server_config(),
        server::Options::with_max_age(DAY),
        admit.clone(),
    )
    .await;
    let echo = echo_server(false).await;
    let (pool, _) = new_pool(200, DAY);
    let mut stream = open(&pool, &key(server.addr), ca.client_config(api()), echo)
        .await
        .expect("admitted");
    h2_echo(&mut stream.send, &mut stream.recv, b"placed").await;
    assert_eq!(server.next_seen().await.peer, client_id());
    // Another identity from node-1 (which does not run it): the connection is closed before
    // any stream is served.
    let mut server = Server::start_with(
        ca.server_config(),
        server::Options::with_max_age(DAY),
        admit,
    )
    .await;
    let impostor = tls::client_config(
        ca.bundle(),
        ca.leaf(&id(TD, "shop", "db")),
        vec![api()],
        None,
    )
    .expect("client config");
    let (pool, _) = new_pool(200, DAY);
    open(&pool, &key(server.addr), impostor, echo)
        .await
        .expect_err("not admitted");
    let ended = server.next_end().await.expect_err("serve refuses it");
    assert!(
        ended
            .to_string()
            .contains("was issued by node node-1, which runs no workload"),
        "{ended}"
    );
    assert!(server.seen.try_recv().is_err(), "a stream was served");
}

#[tokio::test]
async fn a_client_accepts_a_node_issued_server_only_from_the_destinations_node() {
    let ca = Ca::new(TD);
    let server = Server::start(ca.server_config()).await;
    let echo = echo_server(false).await;
    let (pool, _) = new_pool(200, DAY);
    let to = |node: &str| {
        tls::client_config(
            ca.bundle(),
            ca.leaf(&client_id()),
            vec![api()],
            Some(node.to_owned()),
        )
        .expect("client config")
    };
    // The server's leaf comes from node-1.
    let mut stream = open(&pool, &key(server.addr), to("node-1"), echo)
        .await
        .expect("the destination's node");
    h2_echo(&mut stream.send, &mut stream.recv, b"from its node").await;
    let (pool, _) = new_pool(200, DAY);
    let err = open(&pool, &key(server.addr), to("node-2"), echo)
        .await
        .expect_err("another node's leaf for the destination");
    let text = err.to_string();
    assert!(
        text.contains("PeerNotFromDestinationNode") && text.contains(r#"expected: "node-2""#),
        "{text}"
    );
}

#[tokio::test]
async fn streams_reset_before_they_are_answered_never_reach_the_application_and_a_flood_ends_in_goaway(
) {
    let ca = Ca::new(TD);
    let echo = echo_server(false).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Handlers started, finished, and those that reached the application.
    let counts: Arc<[std::sync::atomic::AtomicUsize; 3]> = Arc::default();
    let config = ca.server_config();
    let counted = counts.clone();
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let handler = move |mut req: Request| {
            let counts = counted.clone();
            counts[0].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                // An application that takes a moment to connect to (a backlog, another
                // namespace): the window a reset stream must not get through.
                let connect = async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    TcpStream::connect(echo).await
                };
                if let Some(Ok(_app)) = req.unless_reset(connect).await {
                    counts[2].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    req.reject(StatusCode::SERVICE_UNAVAILABLE);
                }
                counts[1].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        };
        let admitted = |_chain: Vec<CertificateDer<'static>>| async { Ok(()) };
        server::serve(
            tcp,
            config,
            handler,
            std::future::pending(),
            server::Options::with_max_age(DAY),
            std::future::ready(()),
            admitted,
        )
        .await
    });
    let (conn, _) = h2_connect(addr, &ca.client_config(api())).await;
    // Each stream is reset once the server has taken it (h2 itself closes a connection whose
    // streams are reset before it takes them).
    let mut refused = None;
    for i in 0..1000 {
        let req = http::Request::builder()
            .method(Method::CONNECT)
            .uri(echo.to_string())
            .body(())
            .expect("request");
        let sent = match conn.clone().ready().await {
            Ok(mut ready) => ready.send_request(req, false),
            Err(e) => Err(e),
        };
        let (_response, mut body) = match sent {
            Ok(stream) => stream,
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        let taken = || counts[0].load(std::sync::atomic::Ordering::SeqCst) > i;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !taken() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        body.send_reset(h2::Reason::CANCEL);
    }
    let ended = within("serve to end", served).await.expect("join");
    let calmed =
        |e: &h2::Error| e.is_go_away() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
    assert!(
        matches!(&ended, Err(Error::H2 { source, .. }) if calmed(source))
            || refused.as_ref().is_some_and(calmed),
        "server: {ended:?}; client: {refused:?}"
    );
    let load = |i: usize| counts[i].load(std::sync::atomic::Ordering::SeqCst);
    wait_for("every handler to finish", || load(1) == load(0)).await;
    let (started, reached) = (load(0), load(2));
    assert!(
        reached < 50,
        "{reached} of {started} reset streams reached the application"
    );
    assert!(started <= 110, "{started} streams taken before the GOAWAY");
}

mod server_limits;

mod bulk;
