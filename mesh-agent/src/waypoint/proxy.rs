//! One request through the waypoint, in order: its path and host put in their one form
//! (`normalize`), L7 authorization with the client's mTLS identity, the HTTPRoute rule it takes
//! (`routes`), the rule's filters, a backend by weight, then tries: an endpoint by the power of
//! two choices over peak-EWMA latency, skipping ejected ones, within the backend's limits, each
//! try within its timeout, retried on a connect failure, a reset, 502/503/504 and configured
//! statuses while the retry budget allows, the whole within the request timeout. Each concern
//! is one step below; each answer the waypoint makes itself names why in its log line and its
//! response flag.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Incoming;
use rand::Rng as _;

use super::{
    balance,
    breaker::{self, Outlier},
    budget::Budget,
    config::HttpConfig,
    httproute::{Filter, HttpRoute, Rule},
    normalize,
    replay::{BoxError, ReplayBody},
    routes::{self, PathMatch},
    table::Table,
    telemetry::{self, Trace},
    upstream::{Upstream, Version},
};
use crate::{
    identity::SpiffeId,
    state::{Snapshot, Store, Workload},
};

/// The response body the waypoint sends: an endpoint's, observed, or its own.
pub type RespBody = BoxBody<Bytes, BoxError>;

/// What the waypoint shares across requests.
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub trust_domain: String,
    pub store: Arc<Store>,
    pub routes: ArcSwap<Table>,
    pub upstream: Upstream,
    pub metrics: telemetry::Metrics,
    pub http: HttpConfig,
    backends: Mutex<HashMap<String, Arc<BackendState>>>,
    /// The waypoint's start: the clock of budgets, balancers and outlier detection.
    epoch: Instant,
}

impl std::fmt::Debug for Waypoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waypoint")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Per backend service: its retry budget, balancer, limits and outlier detection.
pub(super) struct BackendState {
    pub(super) budget: Mutex<Budget>,
    pub(super) ewma: Mutex<HashMap<SocketAddr, balance::PeakEwma>>,
    pub(super) outlier: Mutex<Outlier>,
    pub(super) requests: Arc<tokio::sync::Semaphore>,
    pub(super) pending: breaker::Gate,
    /// Connections to the service's endpoints (HTTP connections, opaque streams).
    pub(super) connections: breaker::Gate,
}

/// The downstream connection a request came on.
#[derive(Debug)]
pub struct Downstream {
    /// The client's identity, from its verified certificate (never from a header).
    pub identity: Arc<SpiffeId>,
    /// The client's address (its pod's: the node proxy dials from inside the pod).
    pub addr: SocketAddr,
    /// The client's workload when the state places its identity at that address.
    pub workload: Option<Arc<Workload>>,
    /// The service port the client asked for (`vip:port`) and its service `namespace/name`.
    pub authority: SocketAddr,
    pub service: String,
    pub version: Version,
}

/// Envoy's response flags, as Istio's metrics carry them.
pub(super) mod flags {
    pub const NONE: &str = "-";
    /// No route matched.
    pub const NO_ROUTE: &str = "NR";
    /// No healthy endpoint.
    pub const NO_HEALTHY: &str = "UH";
    /// Connecting to the endpoint failed.
    pub const CONNECT_FAILURE: &str = "UF";
    /// The endpoint reset the request.
    pub const RESET: &str = "UR";
    /// A backend's limits.
    pub const OVERFLOW: &str = "UO";
    /// A timeout.
    pub const TIMEOUT: &str = "UT";
    /// Retries stopped by the budget.
    pub const BUDGET: &str = "URX";
    /// The request itself was refused (400).
    pub const BAD_REQUEST: &str = "DPE";
    /// Denied by policy.
    pub const DENIED: &str = "RBAC";
}

impl Waypoint {
    pub fn new(
        namespace: String,
        name: String,
        trust_domain: String,
        store: Arc<Store>,
        upstream: Upstream,
        metrics: telemetry::Metrics,
        http: HttpConfig,
    ) -> Self {
        Self {
            namespace,
            name,
            trust_domain,
            store,
            routes: ArcSwap::from_pointee(Table::default()),
            upstream,
            metrics,
            http,
            backends: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    /// The workload at `endpoint` and the identity it must present, when it is a workload of
    /// the mesh (requests go over HBONE only, never to an endpoint outside the mesh).
    pub(super) fn endpoint_identity(
        &self,
        snap: &Snapshot,
        endpoint: SocketAddr,
    ) -> Option<(Arc<Workload>, SpiffeId)> {
        let workload = snap.meshed_workload(endpoint.ip())?.clone();
        let id = SpiffeId::new(
            &self.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
        .ok()?;
        Some((workload, id))
    }

    pub(super) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub(super) fn backend(&self, service: &str) -> Arc<BackendState> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        backends
            .entry(service.to_owned())
            .or_insert_with(|| {
                Arc::new(BackendState {
                    budget: Mutex::new(Budget::new(self.http.retries.budget.settings())),
                    ewma: Mutex::new(HashMap::new()),
                    outlier: Mutex::new(Outlier::new(self.http.outlier.clone())),
                    requests: Arc::new(tokio::sync::Semaphore::new(self.http.limits.max_requests)),
                    pending: breaker::Gate::new(self.http.limits.max_pending),
                    connections: breaker::Gate::new(self.http.limits.max_connections),
                })
            })
            .clone()
    }
}

/// What one request's log line and metrics say; filled as it goes.
pub(super) struct Record {
    pub(super) started: Instant,
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) host: String,
    pub(super) trace: Trace,
    pub(super) grpc: bool,
    pub(super) route: String,
    pub(super) backend: String,
    pub(super) endpoint: Option<SocketAddr>,
    pub(super) destination: Option<Arc<Workload>>,
    pub(super) tries: u32,
    pub(super) policy: String,
    pub(super) request_bytes: Arc<AtomicU64>,
}

/// Handles one request (never fails: errors are answered).
pub async fn handle(
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, std::convert::Infallible> {
    let trace =
        Trace::continue_or_start(req.headers().get("traceparent").map(HeaderValue::as_bytes));
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let mut record = Record {
        started: Instant::now(),
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(String::new, |p| p.as_str().to_owned()),
        host: String::new(),
        trace,
        grpc,
        route: String::new(),
        backend: String::new(),
        endpoint: None,
        destination: None,
        tries: 0,
        policy: String::new(),
        request_bytes: Arc::new(AtomicU64::new(0)),
    };
    let response = match proxy(&wp, &down, req, &mut record).await {
        Ok(response) => response,
        Err(local) => local.into_response(),
    };
    Ok(super::observe::observe(&wp, &down, record, response))
}

/// An answer the waypoint makes itself: status, response flag, why.
pub(super) struct Local {
    pub(super) status: StatusCode,
    pub(super) flag: &'static str,
    pub(super) why: String,
    pub(super) location: Option<String>,
}

impl Local {
    pub(super) fn new(status: StatusCode, flag: &'static str, why: impl Into<String>) -> Self {
        Local {
            status,
            flag,
            why: why.into(),
            location: None,
        }
    }

    pub(super) fn into_response(self) -> Response<RespBody> {
        let body = match self.status {
            StatusCode::FORBIDDEN => "RBAC: access denied\n".to_owned(),
            s if s.is_redirection() => String::new(),
            _ => format!("{}\n", self.why),
        };
        let mut r = Response::new(full(body));
        *r.status_mut() = self.status;
        if let Some(location) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            r.headers_mut().insert(header::LOCATION, location);
        }
        r.headers_mut()
            .insert("x-mesh-response-flags", HeaderValue::from_static(self.flag));
        if !self.why.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&self.why) {
                r.extensions_mut().insert(LocalReason(v));
            }
        }
        r
    }
}

/// Why the waypoint answered itself (for the log line).
#[derive(Clone)]
pub(super) struct LocalReason(pub(super) HeaderValue);

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

async fn proxy(
    wp: &Arc<Waypoint>,
    down: &Downstream,
    req: Request<Incoming>,
    record: &mut Record,
) -> Result<Response<RespBody>, Local> {
    let (mut parts, body) = req.into_parts();
    // One form for routing and authorization.
    let target = normalize::target(&record.path).map_err(|e| {
        Local::new(
            StatusCode::BAD_REQUEST,
            flags::BAD_REQUEST,
            format!("request target: {e}"),
        )
    })?;
    let raw_host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let host = match raw_host {
        Some(h) => normalize::host(&h).map_err(|e| {
            Local::new(
                StatusCode::BAD_REQUEST,
                flags::BAD_REQUEST,
                format!("host: {e}"),
            )
        })?,
        None => service_host(&down.service),
    };
    record.host.clone_from(&host);
    record.path = target.to_string();
    let snap = wp.store.load();
    super::authz::authorize(wp, down, &snap, &parts, &target, &host, record)?;

    // The rule.
    let table = wp.routes.load();
    let port = down.authority.port();
    let (rule, matched_prefix): (std::borrow::Cow<'_, Rule>, Option<String>) =
        if table.has_routes(&down.service, port) {
            let candidates = table.candidates(&down.service, port, &host);
            let request = routes::Request {
                method: &parts.method,
                path: &target.path,
                query: target.query.as_deref(),
                headers: &parts.headers,
            };
            let selected = routes::select(&candidates.matching, &request).ok_or_else(|| {
                Local::new(
                    StatusCode::NOT_FOUND,
                    flags::NO_ROUTE,
                    format!("no HTTPRoute rule of {} matches", down.service),
                )
            })?;
            let route: &Arc<HttpRoute> = candidates
                .route_of(&selected)
                .ok_or_else(|| Local::new(StatusCode::NOT_FOUND, flags::NO_ROUTE, "route gone"))?;
            record.route = format!("{}/{}#{}", route.namespace, route.name, selected.rule);
            let rule = route.rules[selected.rule].clone();
            let prefix = rule
                .matches
                .matches
                .get(selected.matched)
                .and_then(|m| match &m.path {
                    PathMatch::Prefix(p) => Some(p.clone()),
                    _ => None,
                });
            (std::borrow::Cow::Owned(rule), prefix)
        } else {
            // No route: the service itself.
            let (ns, name) = down.service.split_once('/').unwrap_or(("", &down.service));
            let rule = Rule {
                backends: vec![super::httproute::Backend {
                    service: super::httproute::ServiceRef {
                        name: name.to_owned(),
                        port,
                    },
                    weight: 1,
                }],
                ..Rule::default()
            };
            debug_assert_eq!(ns, wp.namespace);
            (std::borrow::Cow::Owned(rule), None)
        };

    // Filters.
    let mut path = target.path.clone();
    let mut upstream_host = host.clone();
    let mut response_headers = Vec::new();
    let mut mirrors = Vec::new();
    for filter in &rule.filters {
        match filter {
            Filter::RequestHeaders(changes) => {
                super::filters::apply_headers(&mut parts.headers, changes)
            }
            Filter::ResponseHeaders(changes) => response_headers.push(changes.clone()),
            Filter::Redirect {
                scheme,
                hostname,
                path: new_path,
                port,
                status,
            } => {
                let scheme = scheme.as_deref().unwrap_or("http");
                let host = hostname.as_deref().unwrap_or(&host);
                let default_port = if scheme == "https" { 443 } else { 80 };
                let port = port.filter(|p| *p != default_port);
                let path = match new_path {
                    Some(change) => {
                        super::filters::replace_path(&path, change, matched_prefix.as_deref())
                    }
                    None => path.clone(),
                };
                let mut location = format!("{scheme}://{host}");
                if let Some(p) = port {
                    location.push_str(&format!(":{p}"));
                }
                location.push_str(&path);
                if let Some(q) = &target.query {
                    location.push('?');
                    location.push_str(q);
                }
                let mut local = Local::new(
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND),
                    flags::NONE,
                    "redirect",
                );
                local.location = Some(location);
                return Err(local);
            }
            Filter::Rewrite {
                hostname,
                path: new_path,
            } => {
                if let Some(h) = hostname {
                    upstream_host.clone_from(h);
                }
                if let Some(change) = new_path {
                    path = super::filters::replace_path(&path, change, matched_prefix.as_deref());
                }
            }
            Filter::Mirror(service) => mirrors.push(service.clone()),
        }
    }
    let path_and_query = match &target.query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };

    // The backend.
    let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
    let chosen = balance::weighted(&weights, rand::rng().random()).ok_or_else(|| {
        Local::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            flags::NO_ROUTE,
            "the rule has no backend with a weight",
        )
    })?;
    let backend = &rule.backends[chosen].service;
    let backend_key = format!("{}/{}", wp.namespace, backend.name);
    record.backend = format!("{backend_key}:{}", backend.port);
    let endpoints = endpoints_of(&snap, &backend_key, backend.port).ok_or_else(|| {
        Local::new(
            StatusCode::SERVICE_UNAVAILABLE,
            flags::NO_HEALTHY,
            format!("backend {backend_key}:{} has no endpoint", backend.port),
        )
    })?;

    // The request as each try sends it.
    super::filters::sanitize(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(&record.trace.header()) {
        parts.headers.insert("traceparent", v);
    }
    let counted = super::observe::Counted {
        inner: body,
        bytes: record.request_bytes.clone(),
    };
    let body = ReplayBody::new(counted, wp.http.retries.max_buffered_body);
    let template = Template {
        method: parts.method.clone(),
        path_and_query,
        host: upstream_host,
        headers: parts.headers,
        version: down.version,
    };
    // Mirrors replay the recording of the body (once it has been read whole).
    let mirror_body = if mirrors.is_empty() {
        None
    } else {
        body.try_clone()
    };
    let state = wp.backend(&backend_key);
    let timeouts = Timeouts {
        request: rule
            .request_timeout
            .or_else(|| millis(wp.http.request_timeout_ms)),
        per_try: rule
            .backend_timeout
            .or_else(|| millis(wp.http.retries.per_try_timeout_ms)),
    };
    let tries = super::tries::tries(
        wp,
        down,
        &snap,
        &state,
        &backend_key,
        &endpoints,
        &template,
        body,
        timeouts,
        record,
    );
    let answered = match timeouts.request {
        Some(t) => tokio::time::timeout(t, tries).await.unwrap_or_else(|_| {
            Err(Local::new(
                StatusCode::GATEWAY_TIMEOUT,
                flags::TIMEOUT,
                format!("request timeout ({t:?}) passed"),
            ))
        }),
        None => tries.await,
    };
    for service in &mirrors {
        match mirror_body
            .as_ref()
            .filter(|b| b.whole())
            .and_then(ReplayBody::try_clone)
        {
            Some(body) => mirror(wp, &snap, &template, service, down, body),
            None => tracing::debug!(
                mirror = %service.name,
                "not mirrored: the request body was not read whole within max_buffered_body"
            ),
        }
    }
    let mut response = answered?;
    for changes in &response_headers {
        super::filters::apply_headers(response.headers_mut(), changes);
    }
    Ok(response)
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub(super) request: Option<Duration>,
    pub(super) per_try: Option<Duration>,
}

fn millis(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// What each try sends.
pub(super) struct Template {
    pub(super) method: Method,
    pub(super) path_and_query: String,
    pub(super) host: String,
    pub(super) headers: HeaderMap,
    pub(super) version: Version,
}

impl Template {
    pub(super) fn request(&self, body: ReplayBody) -> Option<Request<ReplayBody>> {
        let uri = match self.version {
            Version::Http1 => self.path_and_query.clone(),
            Version::Http2 => format!("http://{}{}", self.host, self.path_and_query),
        };
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(uri)
            .body(body)
            .ok()?;
        *req.headers_mut() = self.headers.clone();
        match self.version {
            Version::Http1 => {
                req.headers_mut()
                    .insert(header::HOST, HeaderValue::from_str(&self.host).ok()?);
            }
            Version::Http2 => {
                req.headers_mut().remove(header::HOST);
                *req.version_mut() = http::Version::HTTP_2;
            }
        }
        Some(req)
    }
}

/// Sends a copy of the request (its body replayed) to `service`, with `-shadow` added to its
/// host as Envoy does, and forgets it.
fn mirror(
    wp: &Arc<Waypoint>,
    snap: &Snapshot,
    template: &Template,
    service: &super::httproute::ServiceRef,
    down: &Downstream,
    body: ReplayBody,
) {
    let key = format!("{}/{}", wp.namespace, service.name);
    let Some(endpoints) = endpoints_of(snap, &key, service.port) else {
        return;
    };
    let Some(&endpoint) = endpoints.get(rand::rng().random_range(0..endpoints.len())) else {
        return;
    };
    let Some((workload, expected)) = wp.endpoint_identity(snap, endpoint) else {
        return;
    };
    let Some(mut req) = template.request(body) else {
        return;
    };
    let host = format!("{}-shadow", template.host);
    if let Ok(v) = HeaderValue::from_str(&host) {
        req.headers_mut().insert(header::HOST, v);
    }
    let wp = wp.clone();
    let (version, client) = (template.version, down.addr);
    // The mirror's answer is discarded; the request does not wait for it.
    tokio::spawn(async move {
        let backend = wp.backend(&key);
        let send = wp.upstream.send(
            version,
            endpoint,
            &workload,
            &expected,
            client,
            &backend.connections,
            req,
        );
        let _ = tokio::time::timeout(MIRROR_TIMEOUT, send).await;
    });
}

/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoints of `service`'s port `port` (`namespace/name`), from the state.
pub(super) fn endpoints_of(snap: &Snapshot, service: &str, port: u16) -> Option<Vec<SocketAddr>> {
    let def = snap.service(service)?;
    def.vips.iter().find_map(|vip| {
        snap.services
            .get(&SocketAddr::new(*vip, port))
            .filter(|p| !p.endpoints.is_empty())
            .map(|p| p.endpoints.clone())
    })
}

/// `name.namespace.svc.cluster.local` of `namespace/name`.
pub(super) fn service_host(service: &str) -> String {
    match service.split_once('/') {
        Some((ns, name)) => crate::state::service_host(ns, name),
        None => service.to_owned(),
    }
}
