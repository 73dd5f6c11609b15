//! The HBONE CONNECT request as the server judges it, pure and I/O-free: the address a request
//! names ([`authority`]), its informational `forwarded` header ([`forwarded`]), and where a
//! stream naming that address may go on the pod the tunnel reached ([`target`]). Everything in
//! a request is untrusted input: only the verified peer certificate says who the client is,
//! and the authority only selects a port of this pod (the fuzz target `connect_request` drives
//! these functions).

use std::net::{IpAddr, SocketAddr};

use http::{Method, Request};

/// The address a request's `:authority` names: only a CONNECT to `ip:port` (port not 0) is
/// usable; `Err` says why another request is not (the server answers it 400).
pub fn authority<B>(req: &Request<B>) -> Result<SocketAddr, &'static str> {
    match req.uri().authority() {
        _ if req.method() != Method::CONNECT => Err("not a CONNECT request"),
        None => Err("no :authority"),
        Some(a) => a
            .as_str()
            .parse::<SocketAddr>()
            .map_err(|_| "authority is not ip:port")
            .and_then(|addr| {
                if addr.port() == 0 {
                    Err("port 0")
                } else {
                    Ok(addr)
                }
            }),
    }
}

/// The `forwarded` header, when it is text; informational only (logged).
pub fn forwarded<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Why a stream's authority cannot be served on the pod the tunnel reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The authority's address is not the address the tunnel reached, or not one of the pod's.
    NotThePod,
    /// The authority names one of the agent's own ports (a loop).
    AgentPort,
}

/// Where a stream whose authority is `authority` connects, on the pod with addresses
/// `pod_ips` that the HBONE connection reached at `local`: the authority must name that very
/// address (one of the pod's own), and a port that is not the agent's. The connection goes to
/// the local address, never to one taken from the request.
pub fn target(
    authority: SocketAddr,
    local: SocketAddr,
    pod_ips: &[IpAddr],
) -> Result<SocketAddr, Refusal> {
    let local = local.ip().to_canonical();
    let target = authority.ip().to_canonical();
    if target != local || !pod_ips.contains(&target) {
        return Err(Refusal::NotThePod);
    }
    if mesh_common::ports::RESERVED.contains(&authority.port()) {
        return Err(Refusal::AgentPort);
    }
    Ok(SocketAddr::new(local, authority.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, authority: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(
                http::Uri::builder()
                    .authority(authority)
                    .build()
                    .expect("uri"),
            )
            .body(())
            .expect("request")
    }

    #[test]
    fn authority_is_a_connect_to_ip_and_port() {
        for (method, written, want) in [
            ("CONNECT", "10.0.0.7:8080", Ok("10.0.0.7:8080")),
            ("CONNECT", "[fd00::7]:80", Ok("[fd00::7]:80")),
            ("GET", "10.0.0.7:8080", Err("not a CONNECT request")),
            ("CONNECT", "10.0.0.7:0", Err("port 0")),
            ("CONNECT", "api.shop:80", Err("authority is not ip:port")),
            ("CONNECT", "10.0.0.7", Err("authority is not ip:port")),
            (
                "CONNECT",
                "user@10.0.0.7:80",
                Err("authority is not ip:port"),
            ),
        ] {
            let want = want.map(|a| a.parse::<SocketAddr>().expect("addr"));
            assert_eq!(
                authority(&request(method, written)),
                want,
                "{method} {written}"
            );
        }
    }

    #[test]
    fn target_is_the_local_address_of_the_pod_on_a_port_not_the_agents() {
        let ips: [IpAddr; 2] = [[10, 0, 0, 7].into(), "fd00::7".parse().expect("ip")];
        let local: SocketAddr = "10.0.0.7:15008".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:15008".parse().expect("addr");
        for (authority, local, want) in [
            ("10.0.0.7:8080", local, Ok("10.0.0.7:8080")),
            ("[::ffff:10.0.0.7]:8080", local, Ok("10.0.0.7:8080")),
            ("10.0.0.7:8080", mapped, Ok("10.0.0.7:8080")),
            ("10.0.0.8:8080", local, Err(Refusal::NotThePod)),
            // The pod's other address, but not the one the tunnel reached.
            ("[fd00::7]:8080", local, Err(Refusal::NotThePod)),
            ("10.0.0.7:15006", local, Err(Refusal::AgentPort)),
            ("10.0.0.7:15008", local, Err(Refusal::AgentPort)),
        ] {
            let authority = authority.parse().expect("addr");
            let want = want.map(|a| a.parse::<SocketAddr>().expect("addr"));
            assert_eq!(
                target(authority, local, &ips),
                want,
                "{authority} at {local}"
            );
        }
        // A local address that is not the pod's (cannot happen through sk_lookup): refused.
        let other: SocketAddr = "10.0.0.9:15008".parse().expect("addr");
        let authority = "10.0.0.9:8080".parse().expect("addr");
        assert_eq!(target(authority, other, &ips), Err(Refusal::NotThePod));
    }
}
