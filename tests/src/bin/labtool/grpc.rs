//! gRPC for the waypoint's tests, with tonic (an implementation independent of the waypoint's
//! own HTTP/2 code) and a raw-bytes codec, so no protobuf build step: a server that echoes
//! (`/mesh.lab.Echo/Unary`) and streams (`/mesh.lab.Echo/Stream`), ending with a non-OK status
//! on request, and a client that reports the messages, the status and where it came from.
//!
//! Both sides speak HTTP/2 through hyper directly (tonic's transport is not built): the server
//! hands each request to `tonic::server::Grpc`, the client gives `tonic::client::Grpc` a hyper
//! connection as its service.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::{ready, Future, Ready},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::{Buf as _, BufMut as _, Bytes};
use hyper::{body::Incoming, client::conn::http2::SendRequest, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::tokio_stream,
    metadata::{MetadataMap, MetadataValue},
    server::{ServerStreamingService, UnaryService},
    Code, Status,
};

use super::say;

/// The unary method: answers `NAME: MESSAGE`.
const UNARY: &str = "/mesh.lab.Echo/Unary";
/// The server-streaming method: the request is `COUNT:MESSAGE`, the answer COUNT messages
/// `NAME: MESSAGE #i`.
const STREAM: &str = "/mesh.lab.Echo/Stream";
/// The message that makes either method end with [`FAIL_CODE`] (after its COUNT messages, for
/// the stream).
const FAIL: &str = "fail";
/// The status a failing call ends with.
const FAIL_CODE: Code = Code::FailedPrecondition;
/// The metadata naming the server.
const SERVED_BY: &str = "x-served-by";
/// How long a call may take, all told.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages as they are: the bytes of the gRPC frame.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[arg(long)]
    port: u16,
    /// The name this server answers with (`x-served-by` and each message).
    #[arg(long)]
    name: String,
}

/// Serves gRPC (HTTP/2 with prior knowledge) on `port`.
pub fn serve(args: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", args.port)).await?;
        say(&format!("listening {}", listener.local_addr()?));
        let name: Arc<str> = args.name.into();
        loop {
            let (tcp, _) = listener.accept().await?;
            let name = name.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let name = name.clone();
                    async move { Ok::<_, Infallible>(dispatch(name, req).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

async fn dispatch(
    name: Arc<str>,
    req: http::Request<Incoming>,
) -> http::Response<tonic::body::Body> {
    let mut grpc = tonic::server::Grpc::new(Raw);
    match req.uri().path() {
        UNARY => grpc.unary(Echo(name), req).await,
        STREAM => grpc.server_streaming(Echo(name), req).await,
        other => Status::unimplemented(format!("no method {other}")).into_http(),
    }
}

/// Both methods, answering as the server `0`.
struct Echo(Arc<str>);

impl Echo {
    fn metadata(&self) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        if let Ok(value) = MetadataValue::try_from(&*self.0) {
            metadata.insert(SERVED_BY, value);
        }
        metadata
    }

    fn failure(&self) -> Status {
        Status::with_metadata(
            FAIL_CODE,
            format!("{} refuses: told to {FAIL}", self.0),
            self.metadata(),
        )
    }

    fn answer<T>(&self, message: T) -> tonic::Response<T> {
        let mut response = tonic::Response::new(message);
        *response.metadata_mut() = self.metadata();
        response
    }
}

impl UnaryService<Bytes> for Echo {
    type Response = Bytes;
    type Future = Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let text = String::from_utf8_lossy(request.get_ref());
        ready(if text == FAIL {
            Err(self.failure())
        } else {
            Ok(self.answer(Bytes::from(format!("{}: {text}", self.0))))
        })
    }
}

type Messages = tokio_stream::Iter<std::vec::IntoIter<Result<Bytes, Status>>>;

impl ServerStreamingService<Bytes> for Echo {
    type Response = Bytes;
    type ResponseStream = Messages;
    type Future = Ready<Result<tonic::Response<Messages>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let text = String::from_utf8_lossy(request.get_ref());
        let Some((count, text)) = text
            .split_once(':')
            .and_then(|(n, t)| Some((n.parse::<u32>().ok()?, t)))
        else {
            return ready(Err(Status::invalid_argument(
                "the request is COUNT:MESSAGE",
            )));
        };
        let mut messages: Vec<Result<Bytes, Status>> = (1..=count)
            .map(|i| Ok(Bytes::from(format!("{}: {text} #{i}", self.0))))
            .collect();
        if text == FAIL {
            messages.push(Err(self.failure()));
        }
        ready(Ok(self.answer(tokio_stream::iter(messages))))
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Method {
    Unary,
    Stream,
}

#[derive(clap::Args, Debug)]
pub struct CallArgs {
    /// Server address (a service's `vip:port`).
    #[arg(long)]
    to: SocketAddr,
    /// The `:authority`.
    #[arg(long, default_value = "service")]
    host: String,
    #[arg(long, value_enum)]
    method: Method,
    /// The message; `fail` makes the call end with a non-OK status.
    #[arg(long, default_value = "hello")]
    message: String,
    /// Messages the stream asks for.
    #[arg(long, default_value_t = 3)]
    count: u32,
}

/// One call; prints one JSON line: `messages`, `grpc_status` and `grpc_message`, `status_in`
/// (`trailers`, `headers` for a trailers-only response, `none` when no status came),
/// `served_by`, the response's `headers` and `trailers` metadata, and `error` when the call
/// failed below gRPC.
pub fn call(args: CallArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let outcome = tokio::time::timeout(CALL_TIMEOUT, exchange(&args))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no end of the call after {CALL_TIMEOUT:?}")));
        let line = match outcome {
            Ok(outcome) => outcome.json(),
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        };
        say(&line.to_string());
        Ok(())
    })
}

#[derive(Default)]
struct Outcome {
    messages: Vec<String>,
    status: Option<(i32, String)>,
    status_in: &'static str,
    headers: BTreeMap<String, String>,
    trailers: BTreeMap<String, String>,
}

impl Outcome {
    fn json(self) -> serde_json::Value {
        let served_by = self
            .headers
            .get(SERVED_BY)
            .or_else(|| self.trailers.get(SERVED_BY))
            .cloned();
        serde_json::json!({
            "messages": self.messages,
            "grpc_status": self.status.as_ref().map(|s| s.0),
            "grpc_message": self.status.as_ref().map(|s| s.1.clone()),
            "status_in": self.status_in,
            "served_by": served_by,
            "headers": self.headers,
            "trailers": self.trailers,
            "error": null,
        })
    }
}

async fn exchange(args: &CallArgs) -> Result<Outcome> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(args.to),
    )
    .await
    .context("connect timed out")??;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let origin: http::Uri = format!("http://{}", args.host)
        .parse()
        .with_context(|| format!("--host {}", args.host))?;
    let mut grpc = tonic::client::Grpc::with_origin(H2(send), origin);
    grpc.ready().await.context("the connection is not ready")?;
    let (path, payload) = match args.method {
        Method::Unary => (UNARY, args.message.clone()),
        Method::Stream => (STREAM, format!("{}:{}", args.count, args.message)),
    };
    // Both methods through the streaming client: a unary call is the same on the wire, and the
    // streaming client gives the trailers as they came.
    let response = grpc
        .server_streaming(
            tonic::Request::new(Bytes::from(payload)),
            http::uri::PathAndQuery::from_static(path),
            Raw,
        )
        .await;
    let mut outcome = Outcome::default();
    let mut stream = match response {
        Ok(response) => {
            outcome.headers = strings(response.metadata());
            response.into_inner()
        }
        Err(status) => {
            // A status in the response's headers (trailers-only), or no response at all.
            outcome.status = Some((i32::from(status.code()), status.message().to_owned()));
            outcome.status_in = "headers";
            outcome.headers = strings(status.metadata());
            return Ok(outcome);
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(message)) => outcome
                .messages
                .push(String::from_utf8_lossy(&message).into_owned()),
            Ok(None) => break,
            Err(status) => {
                // A non-OK status in the trailers (tonic keeps the rest of them with it).
                outcome.status = Some((i32::from(status.code()), status.message().to_owned()));
                outcome.status_in = "trailers";
                outcome.trailers = strings(status.metadata());
                return Ok(outcome);
            }
        }
    }
    let trailers = stream.trailers().await?.unwrap_or_default();
    outcome.trailers = strings(&trailers);
    outcome.status_in = "none";
    if let Some(code) = outcome.trailers.get("grpc-status") {
        let code = code
            .parse()
            .with_context(|| format!("grpc-status {code:?}"))?;
        let message = outcome
            .trailers
            .get("grpc-message")
            .cloned()
            .unwrap_or_default();
        outcome.status = Some((code, message));
        outcome.status_in = "trailers";
    }
    Ok(outcome)
}

fn strings(metadata: &MetadataMap) -> BTreeMap<String, String> {
    metadata
        .clone()
        .into_headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// A hyper HTTP/2 connection as the tower service tonic's client calls.
#[derive(Clone)]
struct H2(SendRequest<tonic::body::Body>);

type Responding = Pin<Box<dyn Future<Output = hyper::Result<http::Response<Incoming>>> + Send>>;

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Responding;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Responding {
        Box::pin(self.0.send_request(request))
    }
}
