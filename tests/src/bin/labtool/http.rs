//! HTTP for the waypoint's tests: a server that names itself and reports what it received (and
//! can fail or stall on purpose), a client that sends N requests and tallies the answers, and a
//! server-speaks-first banner server with its client. The bench's load: `http_load`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::say;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[arg(long)]
    port: u16,
    /// The name this server answers with (`x-served-by` and the body).
    #[arg(long)]
    name: String,
    /// Answer 503 to every Nth request (1: every request).
    #[arg(long)]
    fail_every: Option<u64>,
    /// Wait this long before answering.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Answer with a body of this many bytes (`.` repeated) instead of the JSON report: the
    /// same answer on every path, whatever headers a proxy added (for `http-load`).
    #[arg(long)]
    body_bytes: Option<usize>,
    /// Print `request METHOD PATH host=H body_bytes=N` for each request.
    #[arg(long)]
    log: bool,
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `port`: each answer is a JSON object with
/// the server's name, the request's method, path, and headers; `x-served-by: NAME`.
pub fn serve(args: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", args.port)).await?;
        say(&format!("listening {}", listener.local_addr()?));
        let fixed = args.body_bytes.map(|n| Bytes::from(vec![b'.'; n]));
        let args = Arc::new((args, fixed));
        let count = Arc::new(AtomicU64::new(0));
        loop {
            let (tcp, _) = listener.accept().await?;
            let (args, count) = (args.clone(), count.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 3];
                let h2 = matches!(tcp.peek(&mut first).await, Ok(3)) && &first == b"PRI";
                let service = service_fn(move |req| answer(args.clone(), count.clone(), req));
                let io = TokioIo::new(tcp);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    })
}

/// One answer; `args.1` is the fixed body of `--body-bytes`.
async fn answer(
    args: Arc<(ServeArgs, Option<Bytes>)>,
    count: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = count.fetch_add(1, Ordering::Relaxed) + 1;
    let (parts, body) = req.into_parts();
    let received = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let (args, fixed) = &*args;
    if args.log {
        let host = parts
            .headers
            .get("host")
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .or_else(|| parts.uri.authority().map(ToString::to_string))
            .unwrap_or_default();
        say(&format!(
            "request {} {} host={host} body_bytes={received}",
            parts.method,
            parts.uri.path()
        ));
    }
    if args.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
    }
    let failing = args
        .fail_every
        .is_some_and(|every| every > 0 && n.is_multiple_of(every));
    let body = match fixed {
        Some(body) => body.clone(),
        None => {
            let headers: BTreeMap<String, String> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let report = serde_json::json!({
                "name": args.name,
                "method": parts.method.as_str(),
                "path": parts.uri.path_and_query().map_or("", |p| p.as_str()),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body_bytes": received,
            });
            Bytes::from(report.to_string())
        }
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut()
        .insert("x-served-by", args.name.parse().expect("a header value"));
    if failing {
        *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
    }
    Ok(r)
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// Server address (a service's `vip:port`).
    #[arg(long)]
    to: SocketAddr,
    /// The Host header (`:authority` with --h2).
    #[arg(long, default_value = "service")]
    host: String,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "GET")]
    method: String,
    /// `name: value`, repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Requests, one after another on one connection (a new one when the server closes it).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// HTTP/2 with prior knowledge.
    #[arg(long)]
    h2: bool,
    /// Send a body of this many bytes (`x` repeated) with each request.
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
}

/// Sends `count` requests and prints one JSON line: answers by status and by `x-served-by`,
/// the first answer's body, failures.
pub fn get(args: GetArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
        let mut served: BTreeMap<String, u64> = BTreeMap::new();
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut first_body: Option<String> = None;
        let mut first_headers: BTreeMap<String, String> = BTreeMap::new();
        let mut sender: Option<Sender> = None;
        for _ in 0..args.count {
            if sender.as_ref().is_none_or(Sender::closed) {
                sender = match connect(args.to, args.h2).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        *errors.entry(format!("connect: {e}")).or_default() += 1;
                        continue;
                    }
                };
            }
            let Some(s) = sender.as_mut() else { continue };
            let mut req = Request::builder().method(args.method.as_str());
            req = if args.h2 {
                req.uri(format!("http://{}{}", args.host, args.path))
            } else {
                req.uri(args.path.as_str())
                    .header("host", args.host.as_str())
            };
            for h in &args.headers {
                let (name, value) = h
                    .split_once(':')
                    .with_context(|| format!("--header {h:?}: use 'name: value'"))?;
                req = req.header(name.trim(), value.trim());
            }
            let req = req.body(Full::new(Bytes::from(vec![b'x'; args.body_bytes])))?;
            match s.send(req).await {
                Ok((status, by, body, headers)) => {
                    *statuses.entry(status).or_default() += 1;
                    *served.entry(by).or_default() += 1;
                    if first_body.is_none() {
                        first_body = Some(body);
                        first_headers = headers;
                    }
                }
                Err(e) => {
                    *errors.entry(e.to_string()).or_default() += 1;
                    sender = None;
                }
            }
        }
        let line = serde_json::json!({
            "statuses": statuses,
            "served": served,
            "errors": errors,
            "first_body": first_body,
            "first_headers": first_headers,
        });
        say(&line.to_string());
        Ok(())
    })
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

type Answer = (u16, String, String, BTreeMap<String, String>);

impl Sender {
    fn closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Answer> {
        let response = match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = response.status().as_u16();
        let headers: BTreeMap<String, String> = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let by = headers.get("x-served-by").cloned().unwrap_or_default();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((
            status,
            by,
            String::from_utf8_lossy(&body).into_owned(),
            headers,
        ))
    }
}

async fn connect(to: SocketAddr, h2: bool) -> Result<Sender> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(to))
        .await
        .context("connect timed out")??;
    let io = TokioIo::new(tcp);
    Ok(if h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Sender::H1(s)
    })
}

#[derive(clap::Args, Debug)]
pub struct BannerArgs {
    #[arg(long)]
    port: u16,
    /// The line the server sends first.
    #[arg(long)]
    text: String,
}

/// A server-speaks-first server: sends its banner line on accept, then echoes.
pub fn banner(args: BannerArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", args.port)).await?;
        say(&format!("listening {}", listener.local_addr()?));
        let text = Arc::new(format!("{}\r\n", args.text));
        loop {
            let (mut tcp, _) = listener.accept().await?;
            let text = text.clone();
            tokio::spawn(async move {
                if tcp.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

#[derive(clap::Args, Debug)]
pub struct ReadBannerArgs {
    #[arg(long)]
    to: SocketAddr,
    /// Give up after this long.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

/// Connects, sends nothing, prints `banner <line> after_ms=<ms>` or fails.
pub fn read_banner(args: ReadBannerArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let started = std::time::Instant::now();
        let limit = Duration::from_millis(args.timeout_ms);
        let mut tcp = tokio::time::timeout(limit, tokio::net::TcpStream::connect(args.to))
            .await
            .context("connect timed out")??;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            let n =
                tokio::time::timeout(limit.saturating_sub(started.elapsed()), tcp.read(&mut byte))
                    .await
                    .context("no banner in time")??;
            if n == 0 {
                bail!("closed before a banner");
            }
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        say(&format!(
            "banner {} after_ms={}",
            String::from_utf8_lossy(&line).trim_end(),
            started.elapsed().as_millis()
        ));
        Ok(())
    })
}
