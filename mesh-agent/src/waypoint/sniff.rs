//! Which protocol a connection speaks, from the first bytes the client sent: HTTP/2 with prior
//! knowledge (its connection preface), HTTP/1.x (a request line), or something else, which the
//! waypoint proxies at L4. The caller waits for more bytes only while [`detect`] answers
//! [`Sniffed::NeedMore`], and only for a bounded time: a server-speaks-first protocol (SMTP,
//! MySQL, a banner) sends nothing first, and its connection must not stall. A protocol the
//! service declares (`appProtocol`, a port name) wins over sniffing.

/// The HTTP/2 connection preface (RFC 9113, 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest request line looked at: a client still sending its first line after this many
/// bytes is not taken for HTTP (the waypoint would not parse it either).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// HTTP/2 with prior knowledge.
    Http2,
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// Neither: proxied as bytes.
    Opaque,
    /// Too few bytes to tell.
    NeedMore,
}

/// A method token (RFC 9110: tchar), as servers accept them: uppercase letters here, which every
/// standard and registered method is, so that a binary protocol is not taken for HTTP by its
/// first byte alone.
fn method_byte(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'-' || b == b'_'
}

/// Tells the protocol from `first`, the bytes received so far.
pub fn detect(first: &[u8]) -> Sniffed {
    if first.is_empty() {
        return Sniffed::NeedMore;
    }
    // HTTP/2: the whole preface, or a prefix of it so far.
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Sniffed::Http2
        } else {
            Sniffed::NeedMore
        };
    }
    // HTTP/1.x: METHOD SP request-target SP HTTP/1.x CRLF.
    let method_len = first.iter().take_while(|b| method_byte(**b)).count();
    if method_len == first.len() {
        return if method_len <= 32 {
            Sniffed::NeedMore
        } else {
            Sniffed::Opaque
        };
    }
    if method_len == 0 || method_len > 32 || first[method_len] != b' ' {
        return Sniffed::Opaque;
    }
    let line_end = first.iter().position(|b| *b == b'\n');
    let Some(end) = line_end else {
        // The target must be visible ASCII while the line goes on.
        let rest = &first[method_len + 1..];
        if rest
            .iter()
            .any(|b| !(0x20..=0x7e).contains(b) && *b != b'\r')
        {
            return Sniffed::Opaque;
        }
        return if first.len() < MAX_REQUEST_LINE {
            Sniffed::NeedMore
        } else {
            Sniffed::Opaque
        };
    };
    let line = first[..end].strip_suffix(b"\r").unwrap_or(&first[..end]);
    match line.rsplit(|b| *b == b' ').next() {
        Some(b"HTTP/1.1" | b"HTTP/1.0") if line.len() > method_len + 1 + 9 => Sniffed::Http1,
        _ => Sniffed::Opaque,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_the_protocol() {
        #[rustfmt::skip]
        let cases: &[(&[u8], Sniffed)] = &[
            (b"", Sniffed::NeedMore),
            (H2_PREFACE, Sniffed::Http2),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", Sniffed::Http2),
            (b"PRI * HTTP/2", Sniffed::NeedMore),
            (b"P", Sniffed::NeedMore),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Sniffed::Http1),
            (b"GET / HTTP/1.1\r\n", Sniffed::Http1),
            (b"POST /api/v1/items?x=1 HTTP/1.0\r\n", Sniffed::Http1),
            (b"GET / HTTP/1.1\n", Sniffed::Http1),
            (b"DELETE /x HTTP/1.1\r\n", Sniffed::Http1),
            (b"M-SEARCH * HTTP/1.1\r\n", Sniffed::Http1),
            (b"GET /index.html HTTP/1.1", Sniffed::NeedMore),
            (b"GET", Sniffed::NeedMore),
            (b"GET ", Sniffed::NeedMore),
            // Not HTTP: TLS, a binary protocol, a lowercase command, HTTP/2 over TLS, junk.
            (b"\x16\x03\x01\x02\x00\x01", Sniffed::Opaque),
            (b"\x00\x00\x00\x01", Sniffed::Opaque),
            (b"get / HTTP/1.1\r\n", Sniffed::Opaque),
            (b"EHLO example.com\r\n", Sniffed::Opaque),
            (b"GET / HTTP/2.0\r\n", Sniffed::Opaque),
            (b"GET /\r\n", Sniffed::Opaque),
            (b"GET\t/ HTTP/1.1\r\n", Sniffed::Opaque),
            (b"GET /\x01 HTTP/1.1", Sniffed::Opaque),
            // An unknown method still sending its line: HTTP/1 may follow.
            (b"PRX * HTTP/2.0", Sniffed::NeedMore),
        ];
        for (first, want) in cases {
            assert_eq!(detect(first), *want, "{:?}", String::from_utf8_lossy(first));
        }
    }

    #[test]
    fn a_request_line_that_never_ends_is_not_waited_for() {
        let mut long = b"GET /".to_vec();
        long.resize(MAX_REQUEST_LINE - 1, b'a');
        assert_eq!(detect(&long), Sniffed::NeedMore);
        long.push(b'a');
        assert_eq!(detect(&long), Sniffed::Opaque);
        let method = vec![b'A'; 33];
        assert_eq!(detect(&method), Sniffed::Opaque);
    }
}
