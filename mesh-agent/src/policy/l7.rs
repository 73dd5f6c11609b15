//! The L7 attributes of a rule, checked value by value: `hosts`, `methods`, `paths` and
//! `request.headers[...]` conditions, in the forms the waypoint matches them in.
//!
//! Paths and hosts are compared with the request's normalised path and host
//! ([`crate::waypoint::normalize`]), so a policy value must already be in that form: one that
//! is not (`/a//b`, `/%61dmin`, `a.example:8080`) could never match as written, which in a
//! DENY is a hole. It is refused, saying what it would be (as `waypoint::httproute` does for
//! route paths).

use http::HeaderName;

use super::Pattern;
use crate::waypoint::normalize;

/// `*`, `abc*`, `*abc` or `abc`, as Istio's string matches; no other `*`.
pub(super) fn wildcard(s: &str) -> Result<Pattern, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s == "*" {
        return Ok(Pattern::Any);
    }
    let (p, body) = if let Some(rest) = s.strip_prefix('*') {
        (Pattern::Suffix(rest.to_owned()), rest)
    } else if let Some(rest) = s.strip_suffix('*') {
        (Pattern::Prefix(rest.to_owned()), rest)
    } else {
        (Pattern::Exact(s.to_owned()), s)
    };
    if body.contains('*') {
        return Err(format!(
            "{s:?}: a `*` may only stand alone, at the start or at the end"
        ));
    }
    Ok(p)
}

/// A value with its `*` replaced by `filler` (a prefix gets it at the end, a suffix at the
/// start), so that the whole can be normalised as a request's would be.
fn probe(p: &Pattern, filler: &str) -> Option<String> {
    match p {
        Pattern::Any => None,
        Pattern::Exact(s) => Some(s.clone()),
        Pattern::Prefix(s) => Some(format!("{s}{filler}")),
        Pattern::Suffix(s) => Some(format!("{filler}{s}")),
    }
}

/// What `normal` (the normalised probe) says the value would be, `*` put back; `None` when
/// normalising ate the filler (the value can never match).
fn would_be(p: &Pattern, normal: &str, filler: &str) -> Option<String> {
    match p {
        Pattern::Any => None,
        Pattern::Exact(_) => Some(normal.to_owned()),
        Pattern::Prefix(_) => normal.strip_suffix(filler).map(|s| format!("{s}*")),
        Pattern::Suffix(_) => normal.strip_prefix(filler).map(|s| format!("*{s}")),
    }
}

fn not_normal(value: &str, would: Option<String>) -> String {
    match would {
        Some(w) => {
            format!("{value:?} is not in the form requests are matched in (it would be {w:?})")
        }
        None => format!(
            "{value:?} is not in the form requests are matched in, and in that form no request \
             can match it"
        ),
    }
}

/// `hosts[i]`: lowercased (hosts match case-insensitively); the host of a request is matched
/// without its port and trailing dot, so a value with either is refused.
pub(super) fn host(s: &String) -> Result<Pattern, String> {
    let lower = s.to_ascii_lowercase();
    let p = wildcard(&lower)?;
    // `x`: a label character, so that `*.example` checks as `x.example`.
    let Some(probe) = probe(&p, "x") else {
        return Ok(p);
    };
    let normal = normalize::host(&probe).map_err(|_| {
        format!("{s:?} is not a host name or address (a `*` may stand for its start or its end)")
    })?;
    if normal != probe {
        return Err(format!(
            "{}: requests are matched on their host without its port",
            not_normal(s, would_be(&p, &normal, "x"))
        ));
    }
    Ok(p)
}

/// `methods[i]`: an HTTP method, matched exactly (methods are case-sensitive).
pub(super) fn method(s: &String) -> Result<String, String> {
    if s.contains('*') {
        return Err(format!(
            "{s:?}: methods are matched exactly, without wildcards (leave methods out to match \
             any)"
        ));
    }
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'+-.^_`|~".contains(&b);
    if s.is_empty() || !s.bytes().all(token) {
        return Err(format!("{s:?} is not an HTTP method"));
    }
    if s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "{s:?} is not {:?}: methods are case-sensitive, and matched exactly",
            s.to_ascii_uppercase()
        ));
    }
    Ok(s.clone())
}

/// `paths[i]`: exact, `/prefix/*`, `*.suffix` or `*`, in the normal form of request paths.
/// Istio's path templates (`{*}`, `{**}`) are refused.
pub(super) fn path(s: &String) -> Result<Pattern, String> {
    if s.contains("{*}") || s.contains("{**}") {
        return Err(format!(
            "{s:?}: path templates ({{*}}, {{**}}) are not supported: use a prefix (/api/*), a \
             suffix (*.js) or an exact path"
        ));
    }
    let p = wildcard(s)?;
    // `/x` before a suffix: a whole segment, so that `*.js` checks as `/x.js`; `x` after a
    // prefix, so that `/api/*` checks as `/api/x`.
    let filler = if matches!(p, Pattern::Suffix(_)) {
        "/x"
    } else {
        "x"
    };
    let Some(probe) = probe(&p, filler) else {
        return Ok(p);
    };
    let target = normalize::target(&probe).map_err(|e| format!("{s:?}: {e}"))?;
    if target.query.is_some() {
        return Err(format!(
            "{s:?} has a query ('?'): paths are matched without the query"
        ));
    }
    let normal = if probe.ends_with('/') && !target.path.ends_with('/') {
        format!("{}/", target.path)
    } else {
        target.path
    };
    if normal != probe {
        return Err(not_normal(s, would_be(&p, &normal, filler)));
    }
    Ok(p)
}

/// The header of a `request.headers[<name>]` key, lowercase; `None` for another key.
pub(super) fn header_key(key: &str) -> Option<Result<HeaderName, String>> {
    let name = key.strip_prefix("request.headers[")?;
    let Some(name) = name.strip_suffix(']') else {
        return Some(Err(format!(
            "condition key {key:?} is not request.headers[<name>]"
        )));
    };
    Some(if name.is_empty() {
        Err(format!("condition key {key:?} names no header"))
    } else if name.starts_with(':') {
        Err(format!(
            "condition key {key:?}: pseudo-headers are not headers here: use \
             to.operation.hosts, methods or paths"
        ))
    } else if name.eq_ignore_ascii_case("host") {
        Err(format!(
            "condition key {key:?}: HTTP/2 requests have no Host header: use to.operation.hosts"
        ))
    } else {
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("condition key {key:?}: {name:?} is not a header name"))
    })
}

/// A value of a `request.headers[...]` condition: exact, `abc*`, `*abc`, or `*` (the header is
/// there, whatever its value); case-sensitive.
pub(super) fn header_value(s: &String) -> Result<Pattern, String> {
    if let Some(b) = s
        .bytes()
        .find(|b| !(*b == b'\t' || (0x20..0x7f).contains(b)))
    {
        return Err(format!(
            "{s:?}: byte {b:#04x} is not a visible ASCII character"
        ));
    }
    wildcard(s)
}
