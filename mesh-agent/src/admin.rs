//! The agent's HTTP endpoints: `/metrics` (Prometheus) and `/healthz/ready`. Both listeners
//! serve both paths; each is bound where the configuration says (metrics and readiness are
//! scraped and probed from outside the node namespace, the admin port comes later on loopback).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
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
    not_ready: Mutex<Option<String>>,
}

impl Readiness {
    pub fn new(reason: &str) -> Self {
        Self {
            not_ready: Mutex::new(Some(reason.into())),
        }
    }

    pub fn set(&self, not_ready: Option<String>) {
        *self.not_ready.lock().unwrap_or_else(|e| e.into_inner()) = not_ready;
    }

    fn get(&self) -> Option<String> {
        self.not_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Binds a listener and serves it in the background.
pub async fn serve(
    addr: SocketAddr,
    what: &'static str,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> Result<(), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, what, source })?;
    tokio::spawn(
        async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
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
    Ok(())
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
