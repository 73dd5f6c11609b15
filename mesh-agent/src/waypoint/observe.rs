//! What the waypoint reports about a request once its response has ended (or the client went
//! away): Istio's request metrics and one access-log line.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tracing::info;

use super::{
    proxy::{flags, service_host, Downstream, LocalReason, Record, RespBody, Waypoint},
    replay::BoxError,
    telemetry::RequestLabels,
};

/// A request body that counts its bytes.
pub(super) struct Counted {
    pub(super) inner: Incoming,
    pub(super) bytes: Arc<AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes
                    .fetch_add(u64::try_from(data.len()).unwrap_or(0), Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response on its way to the client: its bytes are counted, and when it ends (or the
/// client goes away) the request's metrics and log line are written.
pub(super) fn observe(
    wp: &Arc<Waypoint>,
    down: &Arc<Downstream>,
    record: Record,
    response: Response<RespBody>,
) -> Response<RespBody> {
    let status = response.status();
    let local = response.extensions().get::<LocalReason>().cloned();
    let flag = response
        .headers()
        .get("x-mesh-response-flags")
        .and_then(|v| v.to_str().ok())
        .map(|f| match f {
            "NR" => flags::NO_ROUTE,
            "UH" => flags::NO_HEALTHY,
            "UF" => flags::CONNECT_FAILURE,
            "UR" => flags::RESET,
            "UO" => flags::OVERFLOW,
            "UT" => flags::TIMEOUT,
            "URX" => flags::BUDGET,
            "DPE" => flags::BAD_REQUEST,
            "RBAC" => flags::DENIED,
            _ => flags::NONE,
        })
        .unwrap_or(flags::NONE);
    let (mut parts, body) = response.into_parts();
    parts.headers.remove("x-mesh-response-flags");
    let grpc_status = parts
        .headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let finish = Finish {
        wp: wp.clone(),
        down: down.clone(),
        record,
        status,
        flag,
        local: local.and_then(|l| l.0.to_str().ok().map(str::to_owned)),
        grpc_status,
        bytes: 0,
    };
    Response::from_parts(
        parts,
        Observed {
            inner: body,
            finish: Some(finish),
        }
        .boxed(),
    )
}

pub(super) struct Finish {
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    record: Record,
    status: StatusCode,
    flag: &'static str,
    local: Option<String>,
    grpc_status: Option<String>,
    bytes: u64,
}

impl Finish {
    fn done(self, complete: bool) {
        let Finish {
            wp,
            down,
            record,
            status,
            flag,
            local,
            grpc_status,
            bytes,
        } = self;
        let duration = record.started.elapsed();
        let (src_ns, src_name) = down
            .workload
            .as_ref()
            .map_or((down.identity.namespace.clone(), String::new()), |w| {
                (w.namespace.clone(), w.name.clone())
            });
        let dst = record.destination.as_ref();
        let destination_principal = dst.map_or_else(String::new, |w| {
            format!(
                "spiffe://{}/ns/{}/sa/{}",
                wp.trust_domain, w.namespace, w.service_account
            )
        });
        let (svc_ns, svc_name) = down
            .service
            .split_once('/')
            .map_or((String::new(), down.service.clone()), |(a, b)| {
                (a.to_owned(), b.to_owned())
            });
        let canonical = |w: Option<&crate::state::Workload>| {
            w.map_or_else(Default::default, |w| {
                (
                    w.canonical_service().to_owned(),
                    w.canonical_revision().to_owned(),
                )
            })
        };
        let (src_service, src_revision) = canonical(down.workload.as_deref());
        let (dst_service, dst_revision) = canonical(dst.map(|w| &**w));
        let labels = RequestLabels {
            reporter: "waypoint",
            source_workload: src_name.clone(),
            source_app: src_service.clone(),
            source_canonical_service: src_service,
            source_version: src_revision.clone(),
            source_canonical_revision: src_revision,
            source_workload_namespace: src_ns,
            source_principal: down.identity.to_string(),
            destination_workload: dst.map_or_else(String::new, |w| w.name.clone()),
            destination_app: dst_service.clone(),
            destination_canonical_service: dst_service,
            destination_version: dst_revision.clone(),
            destination_canonical_revision: dst_revision,
            destination_workload_namespace: dst.map_or_else(String::new, |w| w.namespace.clone()),
            destination_principal,
            destination_service: service_host(&down.service),
            destination_service_name: svc_name,
            destination_service_namespace: svc_ns,
            request_protocol: if record.grpc { "grpc" } else { "http" },
            response_code: status.as_u16(),
            grpc_response_status: grpc_status.clone().unwrap_or_default(),
            response_flags: flag,
            connection_security_policy: "mutual_tls",
        };
        let ms = duration.as_secs_f64() * 1000.0;
        wp.metrics.requests.get_or_create(&labels).inc();
        wp.metrics.duration.get_or_create(&labels).observe(ms);
        #[allow(clippy::cast_precision_loss)]
        {
            wp.metrics
                .request_bytes
                .get_or_create(&labels)
                .observe(record.request_bytes.load(Ordering::Relaxed) as f64);
            wp.metrics
                .response_bytes
                .get_or_create(&labels)
                .observe(bytes as f64);
        }
        info!(
            target: "access",
            method = %record.method,
            path = %record.path,
            host = %record.host,
            status = status.as_u16(),
            flags = flag,
            grpc_status = grpc_status.as_deref().unwrap_or(""),
            source = %down.identity,
            source_addr = %down.addr,
            service = %down.service,
            route = %record.route,
            backend = %record.backend,
            endpoint = %record.endpoint.map_or_else(String::new, |e| e.to_string()),
            tries = record.tries,
            policy = %record.policy,
            request_bytes = record.request_bytes.load(Ordering::Relaxed),
            response_bytes = bytes,
            duration_ms = duration.as_millis(),
            trace_id = %record.trace.trace_id(),
            complete,
            why = local.as_deref().unwrap_or(""),
            "request"
        );
    }
}

/// A response body that reports its end.
pub(super) struct Observed {
    inner: RespBody,
    finish: Option<Finish>,
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(f) = self.finish.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        f.bytes += u64::try_from(data.len()).unwrap_or(0);
                    }
                    if let Some(status) = frame
                        .trailers_ref()
                        .and_then(|t| t.get("grpc-status"))
                        .and_then(|v| v.to_str().ok())
                    {
                        f.grpc_status = Some(status.to_owned());
                    }
                }
                if self.inner.is_end_stream() {
                    if let Some(f) = self.finish.take() {
                        f.done(true);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = self.finish.take() {
                    f.done(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = self.finish.take() {
                    f.done(false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            let complete = self.inner.is_end_stream();
            f.done(complete);
        }
    }
}
