//! The tries of a request: within its backend's limits, each to an endpoint chosen by the power
//! of two choices over peak-EWMA latency (ejected endpoints skipped), each within its timeout,
//! retried with backoff while the retry budget allows; and streams that are not HTTP, proxied
//! as bytes.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{Response, StatusCode};
use http_body_util::BodyExt as _;
use rand::Rng as _;
use tracing::{info, warn};

use super::{
    balance,
    proxy::{
        flags, BackendState, Downstream, Local, Record, RespBody, Template, Timeouts, Waypoint,
    },
    replay::{BoxError, ReplayBody},
    telemetry, upstream,
};
use crate::state::Snapshot;

/// The tries of one request, within its backend's limits.
#[allow(clippy::too_many_arguments)]
pub(super) async fn tries(
    wp: &Waypoint,
    down: &Downstream,
    snap: &Snapshot,
    state: &BackendState,
    backend: &str,
    endpoints: &[SocketAddr],
    template: &Template,
    body: ReplayBody,
    timeouts: Timeouts,
    record: &mut Record,
) -> Result<Response<RespBody>, Local> {
    // Limits: a request slot now, or a pending place while one frees up.
    let overflow_at = |limit: &str| {
        wp.metrics
            .overflows
            .get_or_create(&telemetry::ServiceLabels {
                service: backend.to_owned(),
            })
            .inc();
        Local::new(
            StatusCode::SERVICE_UNAVAILABLE,
            flags::OVERFLOW,
            format!("{backend}: over its {limit} limit"),
        )
    };
    let overflow = || overflow_at("concurrent request");
    let _slot = match state.requests.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            let Some(_pending) = state.pending.try_acquire() else {
                return Err(overflow());
            };
            state
                .requests
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| overflow())?
        }
    };
    state
        .budget
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .deposit(wp.now());
    let retry = &wp.http.retries;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut body = Some(body);
    // The last try's outcome: what the client gets when no retry follows (an endpoint's own
    // answer as it came, headers and body).
    let mut last: Option<Result<Response<hyper::body::Incoming>, Local>> = None;
    for attempt in 0..=retry.attempts {
        if attempt > 0 {
            // The body must be whole to be sent again, and the budget must allow a retry.
            let Some(again) = body.as_ref().and_then(ReplayBody::try_clone) else {
                break;
            };
            let allowed = state
                .budget
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_withdraw(wp.now());
            let result = if allowed { "sent" } else { "budget_exhausted" };
            wp.metrics
                .retries
                .get_or_create(&telemetry::RetryLabels {
                    service: backend.to_owned(),
                    result,
                })
                .inc();
            if !allowed {
                match last.as_mut() {
                    Some(Ok(response)) => {
                        response.headers_mut().insert(
                            "x-mesh-response-flags",
                            http::HeaderValue::from_static(flags::BUDGET),
                        );
                    }
                    Some(Err(l)) => l.flag = flags::BUDGET,
                    None => {}
                }
                break;
            }
            let cap = retry
                .backoff_base_ms
                .saturating_mul(1 << attempt.min(16))
                .min(retry.backoff_max_ms);
            let backoff = Duration::from_millis(rand::rng().random_range(0..=cap));
            tokio::time::sleep(backoff).await;
            body = Some(again);
        }
        let Some(endpoint) = pick(wp, state, endpoints, &tried) else {
            return Err(Local::new(
                StatusCode::SERVICE_UNAVAILABLE,
                flags::NO_HEALTHY,
                format!("{backend}: no healthy endpoint"),
            ));
        };
        tried.push(endpoint);
        record.tries = attempt + 1;
        record.endpoint = Some(endpoint);
        let Some((workload, expected)) = wp.endpoint_identity(snap, endpoint) else {
            // Fail closed: an endpoint outside the mesh would get the request in plaintext.
            last = Some(Err(Local::new(
                StatusCode::SERVICE_UNAVAILABLE,
                flags::NO_HEALTHY,
                format!("endpoint {endpoint} of {backend} is not a workload of the mesh"),
            )));
            continue;
        };
        record.destination = Some(workload.clone());
        // This try's body: the original the first time, a replay after.
        let this_body = match attempt {
            0 => {
                let first = body.take().expect("the body");
                // Keep a handle that can replay what the first try reads.
                body = first.try_clone();
                first
            }
            _ => {
                let again = body.take().expect("the body");
                body = again.try_clone();
                again
            }
        };
        let Some(req) = template.request(this_body) else {
            return Err(Local::new(
                StatusCode::BAD_REQUEST,
                flags::BAD_REQUEST,
                "the request cannot be rebuilt for the endpoint",
            ));
        };
        let started = wp.now();
        state
            .ewma
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(endpoint)
            .or_insert_with(|| balance::PeakEwma::new(started))
            .start();
        let send = wp.upstream.send(
            template.version,
            endpoint,
            &workload,
            &expected,
            down.addr,
            &state.connections,
            req,
        );
        let outcome = match timeouts.per_try {
            Some(t) => tokio::time::timeout(t, send).await.ok(),
            None => Some(send.await),
        };
        let now = wp.now();
        if let Some(e) = state
            .ewma
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&endpoint)
        {
            e.end(now.saturating_sub(started), now);
        }
        let (failed, retriable, result) = match outcome {
            Some(Ok(response)) => {
                let status = response.status();
                let failed = status.is_server_error();
                let retriable = matches!(status.as_u16(), 502..=504)
                    || retry.on_status.contains(&status.as_u16());
                (failed, retriable, Ok(response))
            }
            Some(Err(upstream::Error::Connect { message, .. })) => (
                true,
                true,
                Err(Local::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    flags::CONNECT_FAILURE,
                    format!("connecting to {endpoint}: {message}"),
                )),
            ),
            Some(Err(upstream::Error::Overflow { .. })) => {
                // Nothing was sent, and another try would meet the same limit.
                return Err(overflow_at("connection"));
            }
            Some(Err(upstream::Error::Reset { source, .. })) => (
                true,
                true,
                Err(Local::new(
                    StatusCode::BAD_GATEWAY,
                    flags::RESET,
                    format!("{endpoint}: {source}"),
                )),
            ),
            None => (
                true,
                true,
                Err(Local::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    flags::TIMEOUT,
                    format!("{endpoint}: no response within the per-try timeout"),
                )),
            ),
        };
        let ejection = state
            .outlier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_result(endpoint, failed, now, endpoints.len());
        if let Some(e) = ejection {
            warn!(service = backend, endpoint = %e.endpoint, times = e.times, for_ms = e.until.saturating_sub(now).as_millis(), "endpoint ejected after consecutive failures");
            wp.metrics
                .ejections
                .get_or_create(&telemetry::ServiceLabels {
                    service: backend.to_owned(),
                })
                .inc();
        }
        match result {
            Ok(response) if !(retriable && attempt < retry.attempts) => {
                return Ok(response.map(|b| b.map_err(BoxError::from).boxed()));
            }
            // To be retried: kept for the client in case no retry follows.
            other => last = Some(other),
        }
    }
    match last {
        Some(Ok(response)) => Ok(response.map(|b| b.map_err(BoxError::from).boxed())),
        Some(Err(local)) => Err(local),
        None => Err(Local::new(
            StatusCode::SERVICE_UNAVAILABLE,
            flags::NO_HEALTHY,
            format!("{backend}: no try was made"),
        )),
    }
}

/// A stream that is not HTTP: proxied as bytes to an endpoint of the service it named (a
/// connect failure is tried on another endpoint), with one log line.
pub async fn opaque<T>(wp: &Arc<Waypoint>, down: &Downstream, mut io: T) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    let snap = wp.store.load();
    let endpoints = snap
        .services
        .get(&down.authority)
        .map(|p| p.endpoints.clone())
        .unwrap_or_default();
    if let Err(why) = super::authz::authorize_opaque(wp, down, &snap) {
        info!(
            target: "access",
            protocol = "tcp",
            source = %down.identity,
            source_addr = %down.addr,
            service = %down.service,
            why = %why,
            "connection refused"
        );
        return Err(why);
    }
    let state = wp.backend(&down.service);
    let mut tried = Vec::new();
    for _ in 0..=wp.http.retries.attempts {
        let Some(endpoint) = pick(wp, &state, &endpoints, &tried) else {
            break;
        };
        tried.push(endpoint);
        // Never to an endpoint outside the mesh (it would get the bytes in plaintext).
        let Some((workload, expected)) = wp.endpoint_identity(&snap, endpoint) else {
            continue;
        };
        let Some(_place) = state.connections.try_acquire() else {
            info!(
                target: "access",
                protocol = "tcp",
                source = %down.identity,
                service = %down.service,
                flags = flags::OVERFLOW,
                "connection refused: the backend's connection limit is reached"
            );
            return Err(format!("{}: over its connection limit", down.service));
        };
        match wp
            .upstream
            .stream(endpoint, &workload, &expected, down.addr)
            .await
        {
            Ok(mut up) => {
                let copied = tokio::io::copy_bidirectional(&mut io, &mut up).await;
                let (sent, received) = copied.as_ref().map_or((0, 0), |c| *c);
                info!(
                    target: "access",
                    protocol = "tcp",
                    source = %down.identity,
                    source_addr = %down.addr,
                    service = %down.service,
                    endpoint = %endpoint,
                    sent,
                    received,
                    duration_ms = started.elapsed().as_millis(),
                    error = copied.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                    "connection"
                );
                return copied.map(|_| ()).map_err(|e| e.to_string());
            }
            Err(e) => warn!(error = %e, "connecting an opaque stream failed"),
        }
    }
    info!(
        target: "access",
        protocol = "tcp",
        source = %down.identity,
        service = %down.service,
        tried = tried.len(),
        "connection refused: no endpoint could be reached"
    );
    Err(format!("{}: no endpoint could be reached", down.service))
}

/// An endpoint for the next try: two drawn at random among the healthy ones not tried yet (or
/// tried, when no other is left), the less loaded by peak-EWMA latency takes it. When every
/// endpoint is ejected, all of them are candidates (a panic threshold of 100%: better a try
/// than certain failure).
pub(super) fn pick(
    wp: &Waypoint,
    state: &BackendState,
    endpoints: &[SocketAddr],
    tried: &[SocketAddr],
) -> Option<SocketAddr> {
    let now = wp.now();
    let healthy: Vec<SocketAddr> = {
        let outlier = state.outlier.lock().unwrap_or_else(|e| e.into_inner());
        let healthy: Vec<_> = endpoints
            .iter()
            .copied()
            .filter(|e| !outlier.is_ejected(*e, now))
            .collect();
        if healthy.is_empty() {
            endpoints.to_vec()
        } else {
            healthy
        }
    };
    let fresh: Vec<SocketAddr> = healthy
        .iter()
        .copied()
        .filter(|e| !tried.contains(e))
        .collect();
    let pool = if fresh.is_empty() { healthy } else { fresh };
    match pool.len() {
        0 => None,
        1 => Some(pool[0]),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let b = (a + rng.random_range(1..n)) % n;
            let ewma = state.ewma.lock().unwrap_or_else(|e| e.into_inner());
            let load = |e: &SocketAddr| ewma.get(e).map_or(0.0, balance::PeakEwma::load);
            let loads = [load(&pool[a]), load(&pool[b])];
            Some(if balance::two_choices(&loads, 0, 1) == 0 {
                pool[a]
            } else {
                pool[b]
            })
        }
    }
}
