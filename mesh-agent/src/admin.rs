//! The agent's HTTP endpoints: `/metrics` (Prometheus) and `/healthz/ready`. Both listeners
//! serve both paths; each is bound where the configuration says (metrics and readiness are
//! scraped and probed from outside the node namespace, the admin port comes later on loopback).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
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

/// Serves a listener in the background until `stop` turns true (the listener was handed over).
pub fn serve(
    listener: std::net::TcpListener,
    what: &'static str,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
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
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (metrics, readiness) = (metrics.clone(), readiness.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let response = handle(&req, &metrics, &readiness);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    if let Err(e) = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        debug!(%peer, error = %e, "admin connection ended with an error");
                    }
                });
            }
        }
        .instrument(tracing::info_span!("admin", %addr, what)),
    );
    Ok(endpoint)
}

fn handle<B>(req: &Request<B>, metrics: &Metrics, readiness: &Readiness) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/metrics" => match metrics.encode() {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics failed: {e}\n"),
            ),
        },
        "/healthz/ready" => match readiness.get() {
            None => (StatusCode::OK, "ready\n".into()),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /metrics or /healthz/ready\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
