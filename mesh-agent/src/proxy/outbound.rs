//! Outbound: a pod's connection redirected to its 127.0.0.1:15001.

use std::net::SocketAddr;

use mesh_common::{family, ConnKey};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::{connect_in_pod, copy, reset, Error, Inputs, Pod};
use crate::{capture::mapped_words, metrics::RouteLabels, state::Destination};

pub async fn proxy(
    stream: TcpStream,
    client: SocketAddr,
    pod: &Pod,
    inputs: &Inputs,
) -> Result<(u64, u64), Error> {
    let orig = original_destination(client, pod, inputs)?;
    tracing::Span::current().record("orig_dst", tracing::field::display(orig));
    let snap = inputs.store.load();
    let (target, route) = match snap.resolve(orig) {
        Destination::Service { service, endpoint } => {
            debug!(%service, "service resolved");
            (endpoint, "service")
        }
        Destination::NoEndpoints { service } => {
            reset(stream);
            return Err(Error::NoEndpoints { service });
        }
        Destination::Passthrough(addr) => (addr, "passthrough"),
    };
    drop(snap);
    tracing::Span::current().record("endpoint", tracing::field::display(target));
    inputs
        .metrics
        .routes
        .get_or_create(&RouteLabels {
            namespace: pod.workload.namespace.clone(),
            workload: pod.workload.name.clone(),
            route,
        })
        .inc();
    if target.ip().is_loopback() {
        reset(stream);
        return Err(Error::Loop { addr: target });
    }
    let upstream = match connect_upstream(pod, inputs, target).await {
        Ok(upstream) => upstream,
        Err(e) => {
            reset(stream);
            return Err(e);
        }
    };
    info!(route, "connection proxied");
    copy::bidirectional(stream, upstream, &pod.outbound)
        .await
        .map_err(|source| Error::Connect {
            addr: target,
            source,
        })
}

/// The seam where HBONE goes: for now a plain TCP connection from the pod's namespace.
async fn connect_upstream(
    pod: &Pod,
    inputs: &Inputs,
    target: SocketAddr,
) -> Result<TcpStream, Error> {
    connect_in_pod(pod, &inputs.home, target).await
}

fn original_destination(
    client: SocketAddr,
    pod: &Pod,
    inputs: &Inputs,
) -> Result<SocketAddr, Error> {
    let ip = mapped_words(client.ip());
    let key = ConnKey {
        netns_cookie: pod.netns_cookie,
        ip,
        port: client.port(),
        family: if client.ip().to_canonical().is_ipv4() {
            family::INET
        } else {
            family::INET6
        },
        _pad: 0,
    };
    let orig = inputs
        .orig_dst
        .take(&key)
        .map_err(Error::OrigDstMap)?
        .ok_or(Error::NoOrigDst { client })?;
    let bytes: Vec<u8> = orig.ip.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&bytes);
    let v6 = std::net::Ipv6Addr::from(octets);
    let ip = if orig.family == family::INET {
        v6.to_canonical()
    } else {
        std::net::IpAddr::V6(v6)
    };
    Ok(SocketAddr::new(ip, orig.port))
}
