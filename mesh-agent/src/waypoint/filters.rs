//! What HTTPRoute filters and the waypoint itself do to a request's path and headers.

use http::{header, HeaderMap, HeaderName, HeaderValue};

use super::httproute::{HeaderChanges, PathChange};

/// Replaces the path as a redirect or rewrite says.
pub(super) fn replace_path(
    path: &str,
    change: &PathChange,
    matched_prefix: Option<&str>,
) -> String {
    match change {
        PathChange::Full(p) => p.clone(),
        PathChange::Prefix(replacement) => {
            let prefix = matched_prefix.unwrap_or("");
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            let joined = format!("{replacement}{rest}");
            if joined.is_empty() {
                "/".to_owned()
            } else if !joined.starts_with('/') {
                format!("/{joined}")
            } else {
                joined
            }
        }
    }
}

pub(super) fn apply_headers(headers: &mut HeaderMap, changes: &HeaderChanges) {
    for name in &changes.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
    for (name, value) in &changes.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &changes.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    }
}

/// Hop-by-hop headers go (RFC 9110 7.6.1), and so does any client certificate header a client
/// made up (the endpoint learns nothing of identity from headers).
pub(super) fn sanitize(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "x-forwarded-client-cert",
    ] {
        headers.remove(n);
    }
    let trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::{super::httproute::PathChange, *};

    #[test]
    fn prefix_replacement_follows_the_specification() {
        let prefix = PathChange::Prefix;
        for (path, matched, replacement, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/bar", "/foo", "/", "/bar"),
            ("/foo", "/foo", "/", "/"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/anything", "", "/v2", "/v2/anything"),
        ] {
            assert_eq!(
                replace_path(path, &prefix(replacement.into()), Some(matched)),
                want,
                "{path} with {matched} -> {replacement}"
            );
        }
        assert_eq!(
            replace_path("/a", &PathChange::Full("/b".into()), None),
            "/b"
        );
    }

    #[test]
    fn hop_by_hop_and_client_certificate_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("By=spiffe://forged"),
        );
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        sanitize(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("x-forwarded-client-cert").is_none());
        assert_eq!(
            h.get("te").map(HeaderValue::as_bytes),
            Some(&b"trailers"[..])
        );
        assert!(h.get("x-kept").is_some());
    }
}
