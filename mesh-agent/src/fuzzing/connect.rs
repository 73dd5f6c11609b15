//! The `connect_request` target: a CONNECT request as HTTP/2 hands it to the HBONE server
//! (method, `:authority`, optionally `:scheme` and `:path`, headers), judged by the server's
//! own functions ([`crate::tunnel::connect`]) on a pod the tunnel reached.
//!
//! Input: a flags byte (the pod's addresses and the local address and port the tunnel
//! reached), the method and the authority (each a length and bytes), then headers (name and
//! value, each a length and bytes) to the end. What HTTP/2 itself refuses (a method, authority
//! or header that is not valid HTTP) never reaches the server and is skipped here too.
//!
//! Checked: nothing panics; a stream is served only for a CONNECT whose authority parses to
//! exactly the address the tunnel reached (one of the pod's own) and a port that is neither 0
//! nor the agent's, and it goes to the local address, never to one from the request.

use std::net::{IpAddr, SocketAddr};

use http::{uri, HeaderName, HeaderValue, Method, Request, Uri};

use super::Input;
use crate::tunnel::connect::{self, Refusal};

/// Pod addresses the flags pick from: IPv4, IPv6, and an IPv4-mapped form of the first.
const ADDRESSES: [&str; 4] = ["10.0.0.7", "fd00::7", "10.0.0.8", "::ffff:10.0.0.7"];

fn address(i: u8) -> IpAddr {
    ADDRESSES[usize::from(i) % ADDRESSES.len()]
        .parse()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// The `connect_request` target.
pub fn connect_request(input: &[u8]) {
    let mut input = Input(input);
    let Some(flags) = input.byte() else {
        return;
    };
    let pod_ips: Vec<IpAddr> = match flags & 3 {
        0 => vec![address(0)],
        1 => vec![address(0), address(1)],
        2 => vec![address(1)],
        _ => Vec::new(),
    };
    let local = SocketAddr::new(address(flags >> 2 & 3), 15008);
    let method = input.field();
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let Ok(authority) = uri::Authority::try_from(input.field()) else {
        return;
    };
    let mut parts = uri::Parts::default();
    parts.authority = Some(authority.clone());
    if flags & 0x10 != 0 {
        // An extended CONNECT (RFC 8441) or a request with every pseudo-header.
        parts.scheme = Some(uri::Scheme::HTTPS);
        parts.path_and_query = Some(uri::PathAndQuery::from_static("/"));
    }
    let Ok(uri) = Uri::from_parts(parts) else {
        return;
    };
    let mut request = Request::new(());
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    let mut forwarded = None;
    while !input.0.is_empty() {
        let (name, value) = (input.field(), input.field());
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        if name == "forwarded" && forwarded.is_none() {
            forwarded = Some(value.clone());
        }
        request.headers_mut().append(name, value);
    }

    // What the server makes of it.
    let judged = connect::authority(&request);
    let logged = connect::forwarded(&request);
    assert_eq!(
        logged.as_deref().map(str::as_bytes),
        forwarded
            .as_ref()
            .filter(|v| v.to_str().is_ok())
            .map(HeaderValue::as_bytes),
        "the forwarded header is the first one, as sent"
    );
    let Ok(named) = judged else {
        return;
    };
    assert_eq!(method, Method::CONNECT, "{method} accepted as a CONNECT");
    assert_ne!(named.port(), 0, "port 0 accepted");
    assert_eq!(
        authority.as_str().parse::<SocketAddr>().ok(),
        Some(named),
        "the authority is not the address it was read as"
    );
    // Where a stream naming it goes on this pod.
    let canonical = named.ip().to_canonical();
    match connect::target(named, local, &pod_ips) {
        Ok(dst) => {
            assert_eq!(
                dst.ip(),
                local.ip().to_canonical(),
                "not the address reached"
            );
            assert_eq!(dst.ip(), canonical, "not the address named");
            assert!(pod_ips.contains(&dst.ip()), "{dst} is not the pod's");
            assert_eq!(dst.port(), named.port());
            assert!(
                !mesh_common::ports::RESERVED.contains(&dst.port()),
                "{dst}: an agent port"
            );
        }
        Err(Refusal::NotThePod) => assert!(
            canonical != local.ip().to_canonical() || !pod_ips.contains(&canonical),
            "{named} refused on a pod that has it, reached at {local}"
        ),
        Err(Refusal::AgentPort) => assert!(
            mesh_common::ports::RESERVED.contains(&named.port()),
            "{named} refused as an agent port"
        ),
    }
}
