//! The one form of a request's path and host, computed once, before routing and before L7
//! authorization, so that both judge the same thing and no spelling of a path reaches the
//! application as something a rule did not see. Istio shipped this bypass class as CVEs
//! (`//admin`, `%2F`, `..` past a DENY on `/admin`); the table test below is that class.
//!
//! The path (RFC 3986, the origin form of a request target):
//! - percent-encodings are checked (two hex digits) and written with uppercase hex;
//! - those of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded (`/%61dmin` is
//!   `/admin`);
//! - an encoded slash or backslash (`%2F`, `%5C`) and a raw backslash become `/` (the slash
//!   Istio's `DECODE_AND_MERGE_SLASHES` decodes: applications and their frameworks often do);
//! - runs of slashes become one (`//admin` is `/admin`);
//! - dot segments are removed (`/./admin`, `/x/../admin` and `/%2e%2e/admin` are `/admin`;
//!   nothing climbs above the root);
//! - letters keep their case: path matching is case-sensitive (Gateway API; `/Admin` is not
//!   `/admin`), hex digits of the remaining percent-encodings are not.
//!
//! Refused (the request gets 400, never a guess): a target that is not origin form (no leading
//! `/`: `*`, absolute form), a fragment, a bad percent-encoding, an encoded NUL, and any byte
//! that is not a visible ASCII character (controls, spaces, raw non-ASCII).
//!
//! The query is kept apart, as sent (checked for the same bytes). The host is lowercased and
//! loses its port and a trailing dot.

use std::fmt;

/// A request target in its one form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The normalised path: starts with `/`, no empty, `.` or `..` segments.
    pub path: String,
    /// The query (without `?`), as sent.
    pub query: Option<String>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.query {
            Some(q) => write!(f, "{}?{q}", self.path),
            None => f.write_str(&self.path),
        }
    }
}

/// Why a request target or host is refused (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the request target is not a path (origin form, starting with '/')")]
    NotOriginForm,
    #[error("the request target has a fragment ('#')")]
    Fragment,
    #[error("bad percent-encoding at byte {0}")]
    BadPercent(usize),
    #[error("an encoded NUL (%00) at byte {0}")]
    EncodedNul(usize),
    #[error("byte {at} ({byte:#04x}) is not a visible ASCII character")]
    BadByte { at: usize, byte: u8 },
    #[error("the host is empty or not a host name or address")]
    BadHost,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Visible ASCII: what a request target may hold (RFC 9112 forbids the rest).
fn visible(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// Normalises a request target (`/a/b?q`).
pub fn target(raw: &str) -> Result<Target, Refused> {
    let bytes = raw.as_bytes();
    if let Some((at, &byte)) = bytes.iter().enumerate().find(|(_, b)| !visible(**b)) {
        return Err(Refused::BadByte { at, byte });
    }
    if raw.contains('#') {
        return Err(Refused::Fragment);
    }
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if !path.starts_with('/') {
        return Err(Refused::NotOriginForm);
    }
    if let Some(q) = query {
        check_percent(q, path.len() + 1)?;
    }
    Ok(Target {
        path: normalize_path(path)?,
        query: query.map(str::to_owned),
    })
}

/// Checks that every `%` of `s` (at `offset` in the target) starts two hex digits.
fn check_percent(s: &str, offset: usize) -> Result<(), Refused> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(_), Some(_)) => i += 3,
                _ => return Err(Refused::BadPercent(offset + i)),
            }
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// The path's one form: decoded where harmless, slashes unified and merged, dot segments
/// removed.
fn normalize_path(path: &str) -> Result<String, Refused> {
    // 1. Percent-decoding of unreserved characters and slashes; the rest re-encoded in
    //    uppercase. Segments are split on the decoded slashes.
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(Refused::BadPercent(i));
                };
                let byte = hi << 4 | lo;
                match byte {
                    0 => return Err(Refused::EncodedNul(i)),
                    b'/' | b'\\' => decoded.push('/'),
                    _ if unreserved(byte) => decoded.push(char::from(byte)),
                    _ => {
                        decoded.push('%');
                        decoded.push_str(&format!("{byte:02X}"));
                    }
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            other => {
                decoded.push(char::from(other));
                i += 1;
            }
        }
    }
    // 2. Merged slashes and removed dot segments (RFC 3986 5.2.4, over whole segments).
    let mut out: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    // A trailing slash (or a trailing dot segment, which names the directory) is kept.
    let trailing = decoded.len() > 1
        && (decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/.."));
    let mut normal = String::with_capacity(decoded.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if normal.is_empty() || trailing {
        normal.push('/');
    }
    Ok(normal)
}

/// A request's host (`:authority` or `Host`) for matching: lowercased, without its port and a
/// trailing dot; its labels non-empty. An IPv6 literal keeps its brackets.
pub fn host(raw: &str) -> Result<String, Refused> {
    let raw = raw.trim();
    if raw.starts_with('[') {
        // An IPv6 literal: [v6] or [v6]:port.
        let end = raw.find(']').ok_or(Refused::BadHost)?;
        let rest = &raw[end + 1..];
        if !(rest.is_empty() || rest.strip_prefix(':').is_some_and(valid_port)) {
            return Err(Refused::BadHost);
        }
        let inside = &raw[1..end];
        let ok = !inside.is_empty()
            && inside
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !ok {
            return Err(Refused::BadHost);
        }
        return Ok(raw[..=end].to_ascii_lowercase());
    }
    // A name or an IPv4 address: name or name:port, the name without ':' or brackets.
    let name = match raw.rsplit_once(':') {
        Some((name, port)) if valid_port(port) => name,
        Some(_) => return Err(Refused::BadHost),
        None => raw,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    // Labels of letters, digits, '-' and '_', none empty (no leading dot, no '..').
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    });
    if !ok {
        return Err(Refused::BadHost);
    }
    Ok(name.to_ascii_lowercase())
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_admin_is_admin() {
        // The bypasses of a DENY on /admin (issue 14, test 6), and their neighbours.
        #[rustfmt::skip]
        let cases = [
            ("/admin", "/admin"),
            ("//admin", "/admin"),
            ("///admin//", "/admin/"),
            ("/%61dmin", "/admin"),
            ("/%61%64%6D%69%6E", "/admin"),
            ("/./admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/x/./../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/x/%2E%2E/admin", "/admin"),
            ("/x%2F..%2Fadmin", "/admin"),
            ("/%2Fadmin", "/admin"),
            ("/%2fadmin", "/admin"),
            ("/%5Cadmin", "/admin"),
            ("/\\admin", "/admin"),
            ("/x\\..\\admin", "/admin"),
            ("/admin/.", "/admin/"),
            ("/admin/x/..", "/admin/"),
            // Case: path letters keep theirs (matching is case-sensitive); hex digits do not.
            ("/Admin", "/Admin"),
            ("/%41dmin", "/Admin"),
            ("/a%3fb", "/a%3Fb"),
            ("/a%3Fb", "/a%3Fb"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            // Reserved characters stay encoded; nothing else changes.
            ("/a%20b", "/a%20b"),
            ("/a;b=c", "/a;b=c"),
            ("/", "/"),
            ("/.", "/"),
            ("/..", "/"),
        ];
        for (raw, want) in cases {
            assert_eq!(target(raw).map(|t| t.path), Ok(want.to_owned()), "{raw}");
        }
    }

    #[test]
    fn the_query_is_kept_apart_as_sent() {
        let t = target("/x/../search?q=%2F..%2Fadmin&x").expect("valid");
        assert_eq!(t.path, "/search");
        assert_eq!(t.query.as_deref(), Some("q=%2F..%2Fadmin&x"));
        assert_eq!(t.to_string(), "/search?q=%2F..%2Fadmin&x");
        assert_eq!(target("/a?").expect("valid").query.as_deref(), Some(""));
    }

    #[test]
    fn what_cannot_be_understood_is_refused() {
        #[rustfmt::skip]
        let cases = [
            ("*", Refused::NotOriginForm),
            ("http://evil/admin", Refused::NotOriginForm),
            ("admin", Refused::NotOriginForm),
            ("", Refused::NotOriginForm),
            ("/admin#x", Refused::Fragment),
            ("/%zzadmin", Refused::BadPercent(1)),
            ("/a%2", Refused::BadPercent(2)),
            ("/a%", Refused::BadPercent(2)),
            ("/a?b=%g1", Refused::BadPercent(5)),
            ("/%00admin", Refused::EncodedNul(1)),
            ("/ad min", Refused::BadByte { at: 3, byte: b' ' }),
            ("/admin\u{0}", Refused::BadByte { at: 6, byte: 0 }),
            ("/admin\t", Refused::BadByte { at: 6, byte: b'\t' }),
            ("/adm\u{e9}n", Refused::BadByte { at: 4, byte: 0xc3 }),
        ];
        for (raw, want) in cases {
            assert_eq!(target(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn hosts_match_without_case_port_or_trailing_dot() {
        #[rustfmt::skip]
        let cases = [
            ("api.shop.svc.cluster.local", Ok("api.shop.svc.cluster.local")),
            ("API.Shop.svc.cluster.local.", Ok("api.shop.svc.cluster.local")),
            ("api:8080", Ok("api")),
            ("10.96.0.10:80", Ok("10.96.0.10")),
            ("[fd00::10]:80", Ok("[fd00::10]")),
            ("[FD00::10]", Ok("[fd00::10]")),
            ("api:80x", Err(Refused::BadHost)),
            ("api:", Err(Refused::BadHost)),
            ("", Err(Refused::BadHost)),
            ("evil host", Err(Refused::BadHost)),
            ("a/b", Err(Refused::BadHost)),
            ("[fd00::10", Err(Refused::BadHost)),
            ("[evil]", Err(Refused::BadHost)),
            ("[]", Err(Refused::BadHost)),
            // Found by the fuzzer: a colon inside a name (taken for a name, then not).
            ("ster.local.:8cluster.local.:8080", Err(Refused::BadHost)),
            ("a:b:80", Err(Refused::BadHost)),
            // Found by the fuzzer: dots alone (a name of empty labels).
            ("..", Err(Refused::BadHost)),
            (".", Err(Refused::BadHost)),
            (".api", Err(Refused::BadHost)),
            ("api..shop", Err(Refused::BadHost)),
        ];
        for (raw, want) in cases {
            assert_eq!(host(raw), want.map(str::to_owned), "{raw:?}");
        }
    }
}
