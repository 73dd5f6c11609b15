//! Gateway API's HTTPRoute (`gateway.networking.k8s.io/v1`, standard channel) as the waypoint
//! reads it, and its one conversion into what the waypoint matches and does ([`convert`]):
//! the Kubernetes source and the state file both go through it. A route the waypoint cannot
//! honour whole is rejected whole, with an error naming the route and the field
//! (`shop/api: spec.rules[0].matches[1].path.value: ...`): a field it does not know (the
//! experimental channel's, say), a filter it does not implement, a value out of the
//! specification's bounds. It is never half applied.

use std::time::Duration;

use serde::Deserialize;

use super::{
    normalize,
    routes::{self, Match, PathMatch, ValueMatch},
};

/// The specification's bounds (maxItems) on the lists the waypoint reads.
const MAX_PARENT_REFS: usize = 32;
const MAX_HOSTNAMES: usize = 16;
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
const MAX_HEADERS: usize = 16;
const MAX_FILTERS: usize = 16;
const MAX_BACKENDS: usize = 16;

/// `spec` of an HTTPRoute.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// A parent: for a waypoint (GAMMA), a Service of the route's namespace.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub section_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRefSpec>,
    pub timeouts: Option<TimeoutsSpec>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchSpec {
    pub path: Option<PathSpec>,
    #[serde(default)]
    pub headers: Vec<ValueSpec>,
    #[serde(default)]
    pub query_params: Vec<ValueSpec>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathSpec {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueSpec {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifierSpec>,
    pub response_header_modifier: Option<HeaderModifierSpec>,
    pub request_redirect: Option<RedirectSpec>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<RewriteSpec>,
    pub request_mirror: Option<MirrorSpec>,
    pub extension_ref: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifierSpec {
    #[serde(default)]
    pub set: Vec<HeaderValueSpec>,
    #[serde(default)]
    pub add: Vec<HeaderValueSpec>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderValueSpec {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedirectSpec {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifierSpec>,
    pub port: Option<u16>,
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteSpec {
    pub hostname: Option<String>,
    pub path: Option<PathModifierSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifierSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorSpec {
    pub backend_ref: BackendObjectRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendObjectRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRefSpec {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub weight: Option<i64>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsSpec {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// A Service of the route's namespace, by name and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub name: String,
    pub port: u16,
}

/// A header change: set (replace), add (append), remove.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderChanges {
    /// Names lowercased.
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// A path change of a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathChange {
    Full(String),
    /// Replaces the matched `PathPrefix` (only with one).
    Prefix(String),
}

/// A filter, as the waypoint applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    RequestHeaders(HeaderChanges),
    ResponseHeaders(HeaderChanges),
    Redirect {
        scheme: Option<String>,
        hostname: Option<String>,
        path: Option<PathChange>,
        port: Option<u16>,
        /// 301 or 302 (the default).
        status: u16,
    },
    Rewrite {
        hostname: Option<String>,
        path: Option<PathChange>,
    },
    Mirror(ServiceRef),
}

/// A weighted backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub service: ServiceRef,
    /// 0 to 1,000,000; a weight of 0 takes no requests.
    pub weight: u32,
}

/// A rule as the waypoint applies it; its matches are in [`routes::Rule`].
#[derive(Debug, Clone, Default)]
pub struct Rule {
    pub matches: routes::Rule,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    /// The whole request, retries included.
    pub request_timeout: Option<Duration>,
    /// Each try.
    pub backend_timeout: Option<Duration>,
}

/// A converted HTTPRoute.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    pub namespace: String,
    pub name: String,
    /// The services (of its namespace) it is attached to, each with its port if it names one.
    pub parents: Vec<(String, Option<u16>)>,
    /// Lowercased; empty: every host.
    pub hostnames: Vec<String>,
    pub rules: Vec<Rule>,
    /// For matching, in the same order as `rules`.
    pub matching: std::sync::Arc<routes::Route>,
}

/// Why a route is rejected: which route and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HTTPRoute {route}: {field}: {message}")]
pub struct Rejected {
    pub route: String,
    pub field: String,
    pub message: String,
}

/// Reads an HTTPRoute `spec` from JSON (the API object's, or the state file's), naming the field
/// of any error.
pub fn parse_spec(route: &str, spec: serde_json::Value) -> Result<Spec, Rejected> {
    serde_path_to_error::deserialize(spec).map_err(|e| Rejected {
        route: route.to_owned(),
        field: format!("spec.{}", e.path()),
        message: e.inner().to_string(),
    })
}

/// Converts HTTPRoute `namespace/name` (created at `created`, seconds since the epoch; `None`
/// from the state file).
pub fn convert(
    namespace: &str,
    name: &str,
    created: Option<u64>,
    spec: &Spec,
) -> Result<HttpRoute, Rejected> {
    let key = format!("{namespace}/{name}");
    let err = |field: String, message: String| Rejected {
        route: key.clone(),
        field,
        message,
    };
    bounded("spec.parentRefs", spec.parent_refs.len(), MAX_PARENT_REFS)
        .map_err(|(f, m)| err(f, m))?;
    bounded("spec.hostnames", spec.hostnames.len(), MAX_HOSTNAMES).map_err(|(f, m)| err(f, m))?;
    bounded("spec.rules", spec.rules.len(), MAX_RULES).map_err(|(f, m)| err(f, m))?;
    if spec.parent_refs.is_empty() {
        return Err(err(
            "spec.parentRefs".into(),
            "no parent: a waypoint's route is attached to a Service".into(),
        ));
    }
    let mut parents = Vec::new();
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let f = format!("spec.parentRefs[{i}]");
        core_service(p.group.as_deref(), p.kind.as_deref())
            .map_err(|m| err(format!("{f}.kind"), m))?;
        if p.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return Err(err(
                format!("{f}.namespace"),
                "a Service of another namespace: a waypoint serves its own namespace".into(),
            ));
        }
        if p.section_name.is_some() {
            return Err(err(
                format!("{f}.sectionName"),
                "not supported for a Service parent (use port)".into(),
            ));
        }
        parents.push((p.name.clone(), p.port));
    }
    let mut hostnames = Vec::new();
    for (i, h) in spec.hostnames.iter().enumerate() {
        let host =
            normalize::host(h).map_err(|e| err(format!("spec.hostnames[{i}]"), e.to_string()))?;
        hostnames.push(host);
    }
    let mut rules = Vec::new();
    let mut matching = Vec::new();
    for (r, rule) in spec.rules.iter().enumerate() {
        let f = format!("spec.rules[{r}]");
        let converted = convert_rule(&f, namespace, rule).map_err(|(field, m)| err(field, m))?;
        matching.push(converted.matches.clone());
        rules.push(converted);
    }
    if rules.is_empty() {
        // The specification's default: one rule, every request, no backend (500).
        rules.push(Rule::default());
        matching.push(routes::Rule::default());
    }
    Ok(HttpRoute {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        parents,
        hostnames,
        matching: std::sync::Arc::new(routes::Route {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            created,
            rules: matching,
        }),
        rules,
    })
}

type FieldError = (String, String);

fn bounded(field: &str, len: usize, max: usize) -> Result<(), FieldError> {
    if len > max {
        return Err((field.to_owned(), format!("{len} entries, at most {max}")));
    }
    Ok(())
}

/// A reference to a core Service (group `""`, kind `Service`, the defaults).
fn core_service(group: Option<&str>, kind: Option<&str>) -> Result<(), String> {
    match (group.unwrap_or(""), kind.unwrap_or("Service")) {
        ("", "Service") => Ok(()),
        (g, k) => Err(format!(
            "{k} of group {g:?}: only a core Service is supported"
        )),
    }
}

fn convert_rule(f: &str, namespace: &str, rule: &RuleSpec) -> Result<Rule, FieldError> {
    bounded(&format!("{f}.matches"), rule.matches.len(), MAX_MATCHES)?;
    bounded(&format!("{f}.filters"), rule.filters.len(), MAX_FILTERS)?;
    bounded(
        &format!("{f}.backendRefs"),
        rule.backend_refs.len(),
        MAX_BACKENDS,
    )?;
    let mut matches = Vec::new();
    for (m, spec) in rule.matches.iter().enumerate() {
        matches.push(convert_match(&format!("{f}.matches[{m}]"), spec)?);
    }
    let prefix_match = rule.matches.is_empty()
        || matches
            .iter()
            .all(|m| matches!(m.path, PathMatch::Prefix(_)));
    let mut filters = Vec::new();
    for (i, spec) in rule.filters.iter().enumerate() {
        filters.push(convert_filter(
            &format!("{f}.filters[{i}]"),
            namespace,
            spec,
            prefix_match,
        )?);
    }
    let mut backends = Vec::new();
    for (i, b) in rule.backend_refs.iter().enumerate() {
        let bf = format!("{f}.backendRefs[{i}]");
        if !b.filters.is_empty() {
            return Err((
                format!("{bf}.filters"),
                "filters on a backend are not supported (put them on the rule)".into(),
            ));
        }
        let service = service_ref(
            &bf,
            namespace,
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
        )?;
        let weight = match b.weight.unwrap_or(1) {
            w @ 0..=1_000_000 => u32::try_from(w).unwrap_or(0),
            w => return Err((format!("{bf}.weight"), format!("{w} is not in 0..=1000000"))),
        };
        backends.push(Backend { service, weight });
    }
    let (mut request_timeout, mut backend_timeout) = (None, None);
    if let Some(t) = &rule.timeouts {
        if let Some(d) = &t.request {
            request_timeout = duration(d).map_err(|m| (format!("{f}.timeouts.request"), m))?;
        }
        if let Some(d) = &t.backend_request {
            backend_timeout =
                duration(d).map_err(|m| (format!("{f}.timeouts.backendRequest"), m))?;
        }
        if let (Some(req), Some(backend)) = (request_timeout, backend_timeout) {
            if backend > req {
                return Err((
                    format!("{f}.timeouts.backendRequest"),
                    format!("{backend:?} is longer than the request timeout {req:?}"),
                ));
            }
        }
    }
    Ok(Rule {
        matches: routes::Rule { matches },
        filters,
        backends,
        request_timeout,
        backend_timeout,
    })
}

fn service_ref(
    f: &str,
    namespace: &str,
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    ns: Option<&str>,
    port: Option<u16>,
) -> Result<ServiceRef, FieldError> {
    core_service(group, kind).map_err(|m| (format!("{f}.kind"), m))?;
    if ns.is_some_and(|n| n != namespace) {
        return Err((
            format!("{f}.namespace"),
            "a Service of another namespace (a ReferenceGrant would be needed): not supported"
                .into(),
        ));
    }
    match port {
        Some(p) if p > 0 => Ok(ServiceRef {
            name: name.to_owned(),
            port: p,
        }),
        _ => Err((format!("{f}.port"), "a Service backend needs a port".into())),
    }
}

fn convert_match(f: &str, spec: &MatchSpec) -> Result<Match, FieldError> {
    let path = match &spec.path {
        None => PathMatch::Prefix(String::new()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            let field = format!("{f}.path.value");
            match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => PathMatch::Exact(normal_path(&field, &value)?),
                "PathPrefix" => {
                    let normal = normal_path(&field, &value)?;
                    PathMatch::Prefix(normal.trim_end_matches('/').to_owned())
                }
                "RegularExpression" => {
                    PathMatch::Regex(routes::regex(&value).map_err(|m| (field, m))?)
                }
                other => {
                    return Err((
                        format!("{f}.path.type"),
                        format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
                    ))
                }
            }
        }
    };
    bounded(&format!("{f}.headers"), spec.headers.len(), MAX_HEADERS)?;
    bounded(
        &format!("{f}.queryParams"),
        spec.query_params.len(),
        MAX_HEADERS,
    )?;
    let mut headers = Vec::new();
    for (i, h) in spec.headers.iter().enumerate() {
        let hf = format!("{f}.headers[{i}]");
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            (
                format!("{hf}.name"),
                format!("{:?} is not a header name", h.name),
            )
        })?;
        if headers
            .iter()
            .any(|(n, _): &(String, ValueMatch)| n == name.as_str())
        {
            return Err((format!("{hf}.name"), format!("{name} is matched twice")));
        }
        headers.push((name.as_str().to_owned(), value_match(&hf, h)?));
    }
    let mut query = Vec::new();
    for (i, q) in spec.query_params.iter().enumerate() {
        let qf = format!("{f}.queryParams[{i}]");
        if q.name.is_empty() {
            return Err((format!("{qf}.name"), "empty".into()));
        }
        if query
            .iter()
            .any(|(n, _): &(String, ValueMatch)| *n == q.name)
        {
            return Err((format!("{qf}.name"), format!("{} is matched twice", q.name)));
        }
        query.push((q.name.clone(), value_match(&qf, q)?));
    }
    let method = match &spec.method {
        None => None,
        Some(m) => match m.as_str() {
            "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
            | "PATCH" => Some(
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|e| (format!("{f}.method"), e.to_string()))?,
            ),
            other => {
                return Err((
                    format!("{f}.method"),
                    format!("{other:?} is not an HTTP method the specification lists"),
                ))
            }
        },
    };
    Ok(Match {
        path,
        headers,
        query,
        method,
    })
}

/// A route's path in the form requests are matched in: a path that normalises to something
/// else could never match as written, and is refused rather than guessed at.
fn normal_path(field: &str, value: &str) -> Result<String, FieldError> {
    let target = normalize::target(value).map_err(|e| (field.to_owned(), e.to_string()))?;
    if target.query.is_some() {
        return Err((field.to_owned(), "a path, not a query".into()));
    }
    let normal = if value.ends_with('/') && !target.path.ends_with('/') {
        format!("{}/", target.path)
    } else {
        target.path
    };
    if normal != value {
        return Err((
            field.to_owned(),
            format!(
                "{value:?} is not in the form requests are matched in (it would be {normal:?})"
            ),
        ));
    }
    Ok(normal)
}

fn value_match(f: &str, v: &ValueSpec) -> Result<ValueMatch, FieldError> {
    match v.kind.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(ValueMatch::Exact(v.value.clone())),
        "RegularExpression" => routes::regex(&v.value)
            .map(ValueMatch::Regex)
            .map_err(|m| (format!("{f}.value"), m)),
        other => Err((
            format!("{f}.type"),
            format!("{other:?} is not Exact or RegularExpression"),
        )),
    }
}

fn header_changes(f: &str, spec: &HeaderModifierSpec) -> Result<HeaderChanges, FieldError> {
    let name = |field: String, n: &str| {
        http::HeaderName::from_bytes(n.as_bytes())
            .map(|h| h.as_str().to_owned())
            .map_err(|_| (field, format!("{n:?} is not a header name")))
    };
    let value = |field: String, v: &str| {
        http::HeaderValue::from_str(v)
            .map(|_| v.to_owned())
            .map_err(|_| (field, "not a valid header value".to_owned()))
    };
    let mut changes = HeaderChanges::default();
    for (i, h) in spec.set.iter().enumerate() {
        changes.set.push((
            name(format!("{f}.set[{i}].name"), &h.name)?,
            value(format!("{f}.set[{i}].value"), &h.value)?,
        ));
    }
    for (i, h) in spec.add.iter().enumerate() {
        changes.add.push((
            name(format!("{f}.add[{i}].name"), &h.name)?,
            value(format!("{f}.add[{i}].value"), &h.value)?,
        ));
    }
    for (i, n) in spec.remove.iter().enumerate() {
        changes.remove.push(name(format!("{f}.remove[{i}]"), n)?);
    }
    Ok(changes)
}

fn path_change(
    f: &str,
    spec: &PathModifierSpec,
    prefix_match: bool,
) -> Result<PathChange, FieldError> {
    match spec.kind.as_str() {
        "ReplaceFullPath" => match &spec.replace_full_path {
            Some(p) => Ok(PathChange::Full(normal_path(
                &format!("{f}.replaceFullPath"),
                p,
            )?)),
            None => Err((format!("{f}.replaceFullPath"), "missing".into())),
        },
        "ReplacePrefixMatch" => {
            if !prefix_match {
                return Err((
                    format!("{f}.type"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix".into(),
                ));
            }
            match &spec.replace_prefix_match {
                Some(p) => Ok(PathChange::Prefix(normal_path(
                    &format!("{f}.replacePrefixMatch"),
                    p,
                )?)),
                None => Err((format!("{f}.replacePrefixMatch"), "missing".into())),
            }
        }
        other => Err((
            format!("{f}.type"),
            format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
        )),
    }
}

fn convert_filter(
    f: &str,
    namespace: &str,
    spec: &FilterSpec,
    prefix_match: bool,
) -> Result<Filter, FieldError> {
    let missing = |field: &str| (format!("{f}.{field}"), "missing for this type".to_owned());
    match spec.kind.as_str() {
        "RequestHeaderModifier" => spec
            .request_header_modifier
            .as_ref()
            .ok_or_else(|| missing("requestHeaderModifier"))
            .and_then(|m| header_changes(&format!("{f}.requestHeaderModifier"), m))
            .map(Filter::RequestHeaders),
        "ResponseHeaderModifier" => spec
            .response_header_modifier
            .as_ref()
            .ok_or_else(|| missing("responseHeaderModifier"))
            .and_then(|m| header_changes(&format!("{f}.responseHeaderModifier"), m))
            .map(Filter::ResponseHeaders),
        "RequestRedirect" => {
            let r = spec
                .request_redirect
                .as_ref()
                .ok_or_else(|| missing("requestRedirect"))?;
            let rf = format!("{f}.requestRedirect");
            if let Some(s) = &r.scheme {
                if s != "http" && s != "https" {
                    return Err((
                        format!("{rf}.scheme"),
                        format!("{s:?} is not http or https"),
                    ));
                }
            }
            let hostname = match &r.hostname {
                Some(h) => Some(
                    normalize::host(h).map_err(|e| (format!("{rf}.hostname"), e.to_string()))?,
                ),
                None => None,
            };
            let path = match &r.path {
                Some(p) => Some(path_change(&format!("{rf}.path"), p, prefix_match)?),
                None => None,
            };
            let status = match r.status_code.unwrap_or(302) {
                s @ (301 | 302) => s,
                s => return Err((format!("{rf}.statusCode"), format!("{s} is not 301 or 302"))),
            };
            Ok(Filter::Redirect {
                scheme: r.scheme.clone(),
                hostname,
                path,
                port: r.port,
                status,
            })
        }
        "URLRewrite" => {
            let r = spec
                .url_rewrite
                .as_ref()
                .ok_or_else(|| missing("urlRewrite"))?;
            let rf = format!("{f}.urlRewrite");
            let hostname = match &r.hostname {
                Some(h) => Some(
                    normalize::host(h).map_err(|e| (format!("{rf}.hostname"), e.to_string()))?,
                ),
                None => None,
            };
            let path = match &r.path {
                Some(p) => Some(path_change(&format!("{rf}.path"), p, prefix_match)?),
                None => None,
            };
            Ok(Filter::Rewrite { hostname, path })
        }
        "RequestMirror" => {
            let m = spec
                .request_mirror
                .as_ref()
                .ok_or_else(|| missing("requestMirror"))?;
            let b = &m.backend_ref;
            service_ref(
                &format!("{f}.requestMirror.backendRef"),
                namespace,
                b.group.as_deref(),
                b.kind.as_deref(),
                &b.name,
                b.namespace.as_deref(),
                b.port,
            )
            .map(Filter::Mirror)
        }
        "ExtensionRef" => Err((
            format!("{f}.type"),
            "ExtensionRef filters are not supported".into(),
        )),
        other => Err((
            format!("{f}.type"),
            format!("{other:?} is not a filter type of the standard channel"),
        )),
    }
}

/// A Gateway API duration (`1h`, `10s`, `500ms`, `1m30s`: 1 to 4 parts of up to 5 digits
/// with `h`, `m`, `s` or `ms`); `0s` is no timeout.
fn duration(text: &str) -> Result<Option<Duration>, String> {
    let bad = || format!("{text:?} is not a duration (e.g. 10s, 1m30s, 500ms)");
    let mut total = Duration::ZERO;
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(n * 3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else {
            return Err(bad());
        };
        total += unit;
        rest = &rest[len..];
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok((!total.is_zero()).then_some(total))
}

#[cfg(test)]
mod tests;
