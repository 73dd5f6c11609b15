//! `mesh-labtool hbone`: a test client for an agent's HBONE endpoint. It presents the given
//! certificate, prints the server's SPIFFE id, sends the requests in order on one HTTP/2
//! connection and prints each response, then echoes data through every accepted stream to show
//! the connection still works. It does not verify the server (tests check what it prints).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

/// Arguments of `mesh-labtool hbone`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The HBONE endpoint, `<pod ip>:15008`.
    #[arg(long)]
    to: SocketAddr,
    /// Client certificate chain (PEM); none: connect without a client certificate.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Requests, each `METHOD AUTHORITY` (e.g. `CONNECT 10.240.2.2:8080`); `-` as the
    /// authority sends none.
    #[arg(long = "request")]
    requests: Vec<String>,
    /// Bytes to echo through each stream answered 200.
    #[arg(long, default_value_t = 65536)]
    echo_bytes: usize,
    /// Instead of echoing: advertise the largest flow-control windows, stop reading the
    /// connection, then send one byte on every stream answered 200 (a `flood` server starts
    /// writing on it), print `stalled N` and wait until stdin closes: a client that makes the
    /// server hold what it cannot deliver.
    #[arg(long)]
    stall: bool,
}

/// A connection whose reads stop for good once `paused` is set.
struct Pausable {
    tcp: tokio::net::TcpStream,
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl tokio::io::AsyncRead for Pausable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Pausable {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

pub fn run(args: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: Args) -> Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(read_certs(cert)?, read_key(key)?)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tcp = Pausable {
        tcp: tokio::net::TcpStream::connect(args.to)
            .await
            .with_context(|| format!("connecting to {}", args.to))?,
        paused: paused.clone(),
    };
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(args.to.ip().into()), tcp)
        .await;
    let tls = match tls {
        Ok(tls) => tls,
        Err(e) => {
            println!("tls_error {e}");
            return Ok(());
        }
    };
    let server_id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(uri_san);
    println!("server_identity {}", server_id.as_deref().unwrap_or("none"));
    let mut h2 = h2::client::Builder::new();
    if args.stall {
        const LARGEST_WINDOW: u32 = (1 << 31) - 1;
        h2.initial_window_size(LARGEST_WINDOW)
            .initial_connection_window_size(LARGEST_WINDOW);
    }
    let (client, connection) = match h2.handshake(tls).await {
        Ok(parts) => parts,
        Err(e) => {
            // TLS 1.3 reports a rejected client certificate only when the client reads.
            println!("tls_error {e}");
            return Ok(());
        }
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            println!("connection_error {e}");
        }
    });
    let mut open = Vec::new();
    for (i, request) in args.requests.iter().enumerate() {
        let (method, authority) = request
            .split_once(' ')
            .with_context(|| format!("request {request:?} is not METHOD AUTHORITY"))?;
        let uri = if authority == "-" {
            "/".to_owned()
        } else {
            authority.to_owned()
        };
        let req = http::Request::builder().method(method).uri(uri).body(())?;
        let mut client = match client.clone().ready().await {
            Ok(c) => c,
            Err(e) => {
                println!("response {i} error={e}");
                continue;
            }
        };
        let (response, send) = match client.send_request(req, false) {
            Ok(parts) => parts,
            Err(e) => {
                println!("response {i} error={e}");
                continue;
            }
        };
        match response.await {
            Ok(resp) => {
                println!("response {i} status={}", resp.status().as_u16());
                if resp.status() == http::StatusCode::OK {
                    open.push((i, send, resp.into_body()));
                }
            }
            Err(e) => println!("response {i} error={e}"),
        }
    }
    if args.stall {
        paused.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut held = Vec::new();
        for (_, mut send, recv) in open {
            send.send_data(Bytes::from_static(b"g"), false)?;
            held.push((send, recv));
        }
        println!("stalled {}", held.len());
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut tokio::io::sink()).await;
        return Ok(());
    }
    for (i, send, recv) in open {
        match echo(send, recv, args.echo_bytes).await {
            Ok(()) => println!("echo {i} ok bytes={}", args.echo_bytes),
            Err(e) => println!("echo {i} failed: {e:#}"),
        }
    }
    Ok(())
}

/// Sends `n` bytes and END_STREAM, reads the echo to its end and compares.
async fn echo(mut send: SendStream<Bytes>, mut recv: RecvStream, n: usize) -> Result<()> {
    let data: Bytes = (0..n).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
    let mut rest = data.clone();
    while !rest.is_empty() {
        send.reserve_capacity(rest.len());
        let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
            .await
            .context("stream closed")??;
        send.send_data(rest.split_to(granted.min(rest.len())), false)?;
    }
    send.send_data(Bytes::new(), true)?;
    let mut got = Vec::with_capacity(n);
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        recv.flow_control().release_capacity(chunk.len())?;
        got.extend_from_slice(&chunk);
    }
    if got != data {
        bail!("echo differs: sent {n} bytes, got {}", got.len());
    }
    Ok(())
}

fn read_certs(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<_, _>>()?)
}

fn read_key(path: &PathBuf) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())?
        .with_context(|| format!("no key in {}", path.display()))
}

fn uri_san(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
        _ => None,
    })
}

/// Accepts any server certificate: this tool tests the server, it does not trust it.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
