//! The agent's HTTP endpoints: `/metrics` (Prometheus) and `/healthz/ready` on each listener;
//! each is bound where the configuration says (metrics and readiness are scraped and probed
//! from outside the node namespace). The admin listener (`admin_addr`, loopback only) also
//! serves what changes or reveals the agent: `/logging`, and, from the node agent,
//! `/config_dump`, `/connections` and `/why` (the [`Inspect`] it is given once running).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn, Instrument as _};

use crate::metrics::Metrics;

/// Errors starting the endpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr} for {what}: {source} (is another agent running in this network namespace?)")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
}

/// Readiness: `None` when ready, else why not.
#[derive(Debug)]
pub struct Readiness {
    not_ready: watch::Sender<Option<String>>,
}

impl Readiness {
    pub fn new(reason: &str) -> Self {
        Self {
            not_ready: watch::Sender::new(Some(reason.into())),
        }
    }

    pub fn set(&self, not_ready: Option<String>) {
        self.not_ready.send_if_modified(|current| {
            let changed = *current != not_ready;
            *current = not_ready;
            changed
        });
    }

    /// `None` when ready, else why not.
    pub fn get(&self) -> Option<String> {
        self.not_ready.borrow().clone()
    }

    /// Waits until ready.
    pub async fn wait_ready(&self) {
        let mut rx = self.not_ready.subscribe();
        // The sender lives in `self`: the channel cannot close while we wait.
        let _ = rx.wait_for(Option::is_none).await;
    }
}

/// What the node agent answers on its admin endpoint beyond metrics, readiness and logging
/// (`crate::inspect`). A seam: the admin endpoint serves the waypoint too, which has none.
pub trait Inspect: Send + Sync + std::fmt::Debug {
    /// `GET /config_dump`: the effective configuration and what the agent holds, as JSON.
    fn config_dump(&self) -> BoxFuture<'_, Result<serde_json::Value, String>>;
    /// `GET /connections`: the connections being served, as JSON.
    fn connections(&self) -> serde_json::Value;
    /// `GET /why?src=NS/POD&dst=NS/NAME:PORT`: whether that connection would be captured,
    /// routed and allowed, from the live state. `Err`: the question names something unknown.
    fn why(&self, src: &str, dst: &str) -> BoxFuture<'_, Result<serde_json::Value, String>>;
}

/// A boxed future of an [`Inspect`] answer.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The node's [`Inspect`], set once the agent runs (the endpoints are served before).
pub type Inspector = Arc<std::sync::OnceLock<Arc<dyn Inspect>>>;

/// One of the agent's HTTP listeners (metrics, readiness), kept so that it can be handed over.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub what: &'static str,
    pub listener: Arc<TcpListener>,
}

/// Binds a listener (reusing the address, as a restarted agent must).
pub fn bind(addr: SocketAddr, what: &'static str) -> Result<std::net::TcpListener, Error> {
    let bind = || -> std::io::Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(128)?;
        Ok(socket.into())
    };
    bind().map_err(|source| Error::Bind { addr, what, source })
}

/// What one endpoint allows its clients (a scrape or a probe takes milliseconds; a client that
/// holds connections open must not cost the agent memory or descriptors).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request's headers must arrive within this.
    pub header_read: Duration,
    /// A connection is closed after this, whatever it does.
    pub connection: Duration,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read: Duration::from_secs(5),
            connection: Duration::from_secs(30),
            max_connections: 64,
        }
    }
}

/// Serves a listener in the background until `stop` turns true (the listener was handed over).
pub fn serve(
    listener: std::net::TcpListener,
    what: &'static str,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    inspector: Inspector,
    stop: watch::Receiver<bool>,
) -> Result<Endpoint, Error> {
    serve_with(
        listener,
        what,
        Served {
            metrics,
            readiness,
            inspector,
        },
        stop,
        Limits::default(),
    )
}

/// What an endpoint answers from.
#[derive(Debug, Clone)]
pub struct Served {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub inspector: Inspector,
}

/// [`serve`] with other limits.
pub fn serve_with(
    listener: std::net::TcpListener,
    what: &'static str,
    served: Served,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
) -> Result<Endpoint, Error> {
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        what,
        source,
    })?;
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map(Arc::new)
        .map_err(|source| Error::Bind { addr, what, source })?;
    let endpoint = Endpoint {
        what,
        listener: listener.clone(),
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio::spawn(
        async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        // Out of file descriptors and similar: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, max = limits.max_connections, "too many connections: closed");
                    drop(stream);
                    continue;
                };
                let served = served.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = service_fn(move |req| {
                        let served = served.clone();
                        async move { Ok::<_, Infallible>(handle(what, &req, &served).await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(limits.header_read)
                        .serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(limits.connection, conn).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "admin connection ended with an error")
                        }
                        Err(_) => debug!(%peer, "admin connection closed: open too long"),
                    }
                });
            }
        }
        .instrument(tracing::info_span!("admin", %addr, what)),
    );
    Ok(endpoint)
}

/// The name of the admin endpoint (`admin_addr`): the one that also serves `/logging`.
pub const ADMIN: &str = "admin";

/// `GET /logging`: the log filter in force. `POST /logging?level=FILTER`: replaces it (tracing's
/// filter syntax, as `MESH_LOG`); a filter that does not parse is refused with 400 and the one
/// in force stays.
fn logging<B>(req: &Request<B>) -> (StatusCode, String) {
    match *req.method() {
        http::Method::GET => match crate::logging::current() {
            Some(filter) => (StatusCode::OK, format!("{filter}\n")),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the log filter of this process cannot be changed\n".into(),
            ),
        },
        http::Method::POST | http::Method::PUT => {
            let level = query_value(req.uri().query().unwrap_or(""), "level");
            let Some(level) = level else {
                return (
                    StatusCode::BAD_REQUEST,
                    "give the filter as ?level=, e.g. POST /logging?level=info,mesh_agent::proxy=debug\n"
                        .into(),
                );
            };
            match crate::logging::set(&level) {
                Ok(()) => {
                    tracing::warn!(filter = %level, "log filter changed through the admin endpoint");
                    (StatusCode::OK, format!("log filter: {level}\n"))
                }
                Err(e) => (
                    StatusCode::BAD_REQUEST,
                    format!("{e}; the filter in force stays\n"),
                ),
            }
        }
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /logging, or POST /logging?level=FILTER\n".into(),
        ),
    }
}

/// The value of `key` in a query string, decoded (`%XX` escapes, `+`).
fn query_value(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// What `/metrics` is: prometheus-client encodes OpenMetrics text. Prometheus 3 refuses a
/// scrape without a content type it knows.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The JSON content type of the inspection endpoints.
const JSON: &str = "application/json";

/// `/config_dump`, `/connections` and `/why` (admin endpoint only): JSON, or why not.
async fn inspect<B>(req: &Request<B>, inspector: &Inspector) -> (StatusCode, &'static str, String) {
    let text = "text/plain; charset=utf-8";
    let Some(inspect) = inspector.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            "this process has no state to inspect (yet): the node agent answers once it runs\n"
                .into(),
        );
    };
    if req.method() != http::Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, text, "GET only\n".into());
    }
    let query = req.uri().query().unwrap_or("");
    let answer = match req.uri().path() {
        "/config_dump" => inspect.config_dump().await,
        "/connections" => Ok(inspect.connections()),
        _ => match (query_value(query, "src"), query_value(query, "dst")) {
            (Some(src), Some(dst)) => inspect.why(&src, &dst).await,
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    text,
                    "give both ends: /why?src=NAMESPACE/POD&dst=NAMESPACE/NAME:PORT\n".into(),
                )
            }
        },
    };
    match answer {
        Ok(json) => match serde_json::to_string_pretty(&json) {
            Ok(body) => (StatusCode::OK, JSON, body + "\n"),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                text,
                format!("encoding JSON failed: {e}\n"),
            ),
        },
        Err(why) => (StatusCode::BAD_REQUEST, text, format!("{why}\n")),
    }
}

async fn handle<B>(what: &str, req: &Request<B>, served: &Served) -> Response<Full<Bytes>> {
    let mut content_type = "text/plain; charset=utf-8";
    let (status, body) = match req.uri().path() {
        // Changes the agent: on the admin endpoint only, which listens on loopback only.
        "/logging" if what == ADMIN => logging(req),
        // Reveal the agent's state: as `/logging`.
        "/config_dump" | "/connections" | "/why" if what == ADMIN => {
            let (status, kind, body) = inspect(req, &served.inspector).await;
            content_type = kind;
            (status, body)
        }
        "/metrics" => match served.metrics.encode() {
            Ok(text) => {
                content_type = METRICS_CONTENT_TYPE;
                (StatusCode::OK, text)
            }
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics failed: {e}\n"),
            ),
        },
        "/healthz/ready" => match served.readiness.get() {
            None => (StatusCode::OK, "ready\n".into()),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ if what == ADMIN => (
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz/ready, /logging, /config_dump, /connections or /why\n"
                .into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /metrics or /healthz/ready\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// An endpoint with `limits`, served until the returned sender is dropped.
    async fn endpoint(limits: Limits) -> (SocketAddr, watch::Sender<bool>) {
        endpoint_named("test", limits).await
    }

    /// [`endpoint`], called `what`.
    async fn endpoint_named(
        what: &'static str,
        limits: Limits,
    ) -> (SocketAddr, watch::Sender<bool>) {
        endpoint_inspected(what, limits, Inspector::default()).await
    }

    /// [`endpoint_named`], answering from `inspector`.
    async fn endpoint_inspected(
        what: &'static str,
        limits: Limits,
        inspector: Inspector,
    ) -> (SocketAddr, watch::Sender<bool>) {
        let listener = bind("127.0.0.1:0".parse().expect("addr"), what).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        serve_with(
            listener,
            what,
            Served {
                metrics: Arc::new(Metrics::new()),
                readiness: Arc::new(Readiness::new("starting")),
                inspector,
            },
            stopped,
            limits,
        )
        .expect("serve");
        (addr, stop)
    }

    /// Reads until the server closes (a FIN, or a reset: it closed with our request unread);
    /// the bytes read.
    async fn until_closed(conn: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut all))
            .await
            .expect("the endpoint did not close the connection");
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("read: {e}"),
        }
        all
    }

    /// `method path` on `addr`; the whole answer.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(
            format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        String::from_utf8(until_closed(&mut conn).await).expect("utf-8")
    }

    #[tokio::test]
    async fn the_log_filter_changes_on_the_admin_endpoint_only() {
        let applied = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = applied.clone();
        crate::logging::install("info".into(), move |f| {
            seen.lock().expect("lock").push(f.to_string());
            Ok(())
        });
        let (admin, _a) = endpoint_named(ADMIN, Limits::default()).await;
        let (metrics, _m) = endpoint_named("metrics", Limits::default()).await;
        assert!(request(metrics, "POST", "/logging?level=debug")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(request(metrics, "GET", "/logging")
            .await
            .starts_with("HTTP/1.1 404"));
        let answer = request(admin, "GET", "/logging").await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n\r\ninfo\n"),
            "{answer}"
        );
        let answer = request(
            admin,
            "POST",
            "/logging?level=info,mesh_agent%3A%3Aproxy%3Ddebug",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(request(admin, "GET", "/logging")
            .await
            .ends_with("\ninfo,mesh_agent::proxy=debug\n"));
        // A filter that does not parse: refused, naming it; the one in force stays.
        let answer = request(admin, "POST", "/logging?level=info,%5Bbad").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            answer.contains("\"info,[bad\" is not a log filter") && answer.contains("stays"),
            "{answer}"
        );
        assert!(request(admin, "GET", "/logging")
            .await
            .ends_with("\ninfo,mesh_agent::proxy=debug\n"));
        assert!(request(admin, "POST", "/logging")
            .await
            .starts_with("HTTP/1.1 400"));
        assert!(request(admin, "DELETE", "/logging")
            .await
            .starts_with("HTTP/1.1 405"));
        assert_eq!(
            applied.lock().expect("lock").len(),
            1,
            "only the good filter was applied"
        );
        // The rest is served on the admin endpoint too.
        assert!(request(admin, "GET", "/metrics")
            .await
            .starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn the_agents_state_is_revealed_on_the_admin_endpoint_only() {
        let (admin, _a) = endpoint_named(ADMIN, Limits::default()).await;
        let (metrics, _m) = endpoint_named("metrics", Limits::default()).await;
        for path in ["/config_dump", "/connections", "/why?src=a/b&dst=c/d:1"] {
            let answer = request(metrics, "GET", path).await;
            assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
            // This endpoint has no inspector (a waypoint's, or an agent not running yet).
            let answer = request(admin, "GET", path).await;
            assert!(
                answer.starts_with("HTTP/1.1 503") && answer.contains("no state to inspect"),
                "{path}: {answer}"
            );
        }
    }

    /// Answers as a node agent would, from fixed values.
    #[derive(Debug)]
    struct Fixed;

    impl Inspect for Fixed {
        fn config_dump(&self) -> BoxFuture<'_, Result<serde_json::Value, String>> {
            Box::pin(async { Ok(serde_json::json!({ "node": "n1" })) })
        }
        fn connections(&self) -> serde_json::Value {
            serde_json::json!({ "connections": [] })
        }
        fn why(&self, src: &str, dst: &str) -> BoxFuture<'_, Result<serde_json::Value, String>> {
            let asked = format!("{src} -> {dst}");
            Box::pin(async move {
                match asked.starts_with("shop/nobody") {
                    true => Err("no workload shop/nobody in the state".into()),
                    false => Ok(serde_json::json!({ "asked": asked })),
                }
            })
        }
    }

    #[tokio::test]
    async fn the_inspection_endpoints_answer_json_or_say_what_is_wrong() {
        let inspector = Inspector::default();
        inspector.set(Arc::new(Fixed)).expect("set once");
        let (admin, _a) = endpoint_inspected(ADMIN, Limits::default(), inspector).await;
        let answer = request(admin, "GET", "/config_dump").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/json\r\n"),
            "{answer}"
        );
        assert!(answer.contains("\"node\": \"n1\""), "{answer}");
        let answer = request(admin, "GET", "/why?src=shop%2Fclient&dst=shop%2Fdb%3A5432").await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("shop/client -> shop/db:5432"),
            "{answer}"
        );
        let answer = request(admin, "GET", "/why?src=shop/nobody&dst=shop/db:1").await;
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("no workload shop/nobody"),
            "{answer}"
        );
        let answer = request(admin, "GET", "/why?src=shop/client").await;
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("give both ends"),
            "{answer}"
        );
        let answer = request(admin, "POST", "/connections").await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    }

    #[test]
    fn query_values_are_decoded() {
        let level = |v: &str| query_value(&format!("x=1&level={v}"), "level");
        assert_eq!(level("a%3A%3Ab%3Ddebug+x").as_deref(), Some("a::b=debug x"));
        assert_eq!(
            level("%zz%4").as_deref(),
            Some("%zz%4"),
            "invalid escapes stay"
        );
        assert_eq!(level("%C3%A9é").as_deref(), Some("éé"));
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics_text() {
        let (addr, _serving) = endpoint(Limits::default()).await;
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let answer = String::from_utf8(until_closed(&mut conn).await).expect("utf-8");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains(&format!(
                "content-type: {}\r\n",
                METRICS_CONTENT_TYPE.to_ascii_lowercase()
            )),
            "{answer}"
        );
        assert!(answer.ends_with("# EOF\n"), "{answer}");
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_is_closed() {
        let (addr, _serving) = endpoint(Limits {
            header_read: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // Half a request line, then nothing.
        idle.write_all(b"GET /met").await.expect("write");
        let answer = until_closed(&mut idle).await;
        assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_the_rest_served() {
        let (addr, _serving) = endpoint(Limits {
            max_connections: 2,
            ..Limits::default()
        })
        .await;
        let connect = || tokio::net::TcpStream::connect(addr);
        let held = [connect().await.expect("1"), connect().await.expect("2")];
        let mut third = connect().await.expect("3");
        third
            .write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(until_closed(&mut third).await, b"", "served over the cap");
        drop(held);
        // Once the held ones are gone, requests are served again.
        let answer = loop {
            let mut conn = connect().await.expect("connect");
            conn.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .expect("write");
            let answer = until_closed(&mut conn).await;
            if !answer.is_empty() {
                break answer;
            }
        };
        assert!(answer.starts_with(b"HTTP/1.1 503"), "{answer:?}");
    }
}
