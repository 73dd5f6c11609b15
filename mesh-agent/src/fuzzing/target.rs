//! The `request_target` target: a request's path and host as a client writes them, put in
//! their one form by the waypoint's normalisation ([`crate::waypoint::normalize`]), which
//! routing and L7 authorization both match against.
//!
//! Input: the first byte's low bit picks the host (1) or the request target (0); the rest, as
//! UTF-8 (other inputs are skipped: HTTP hands over text), is the value.
//!
//! Checked: nothing panics; a normalised path starts with `/`, has no empty, `.` or `..`
//! segment, holds only visible ASCII, and its percent-encodings are uppercase and never of an
//! unreserved character, a slash, a backslash or NUL; normalising it again changes nothing (so
//! no second decoding can reveal another path); a normalised host is lowercase and stable too.

use crate::waypoint::normalize;

/// The `request_target` target.
pub fn request_target(input: &[u8]) {
    let Some((&which, rest)) = input.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if which & 1 == 1 {
        if let Ok(h) = normalize::host(text) {
            assert_eq!(h, h.to_ascii_lowercase(), "{text:?}");
            assert_eq!(normalize::host(&h).as_deref(), Ok(h.as_str()), "{text:?}");
        }
        return;
    }
    let Ok(t) = normalize::target(text) else {
        return;
    };
    let path = &t.path;
    assert!(path.starts_with('/'), "{text:?} -> {path:?}");
    assert!(!path.contains("//"), "{text:?} -> {path:?}");
    for segment in path.split('/').skip(1) {
        assert!(segment != "." && segment != "..", "{text:?} -> {path:?}");
    }
    let b = path.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        assert!((0x21..=0x7e).contains(&c), "{text:?} -> {path:?}");
        assert_ne!(c, b'\\', "{text:?} -> {path:?}");
        if c == b'%' {
            let hex = &path[i + 1..i + 3];
            assert!(
                hex.bytes()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h)),
                "{text:?} -> {path:?}"
            );
            let byte = u8::from_str_radix(hex, 16).unwrap_or(0);
            assert!(
                !(byte.is_ascii_alphanumeric()
                    || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\' | 0)),
                "{text:?} -> {path:?}"
            );
        }
    }
    let again = normalize::target(path).map(|t| t.path);
    assert_eq!(again.as_deref(), Ok(path.as_str()), "{text:?}");
}
