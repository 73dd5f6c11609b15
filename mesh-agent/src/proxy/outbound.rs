//! Outbound: a pod's connection redirected to its 127.0.0.1:15001.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use mesh_common::{family, ports, ConnKey};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    connect_for, copy,
    live::{Conn, Meter, Side, Transport},
    pod_socket, reset,
    route::{self, Route, Via},
    telemetry::{Party, Reporter, Security, TcpLabels},
    Direction, Error, Inputs, Pod,
};
use crate::{
    capture::mapped_words,
    identity::SpiffeId,
    tunnel::{self, client::PoolKey},
};

pub async fn proxy(
    stream: TcpStream,
    client: SocketAddr,
    pod: &Pod,
    inputs: &Inputs,
    conn: &Conn,
) -> Result<(u64, u64), Error> {
    let report = &conn.report;
    let orig = original_destination(client, pod, inputs)?;
    tracing::Span::current().record("orig_dst", tracing::field::display(orig));
    conn.set_dst(orig);
    let snap = inputs.store.load();
    let source = route::Source {
        node: &inputs.node,
        same_node_fast_path: inputs.same_node_fast_path,
    };
    let decision = route::route(&snap, &source, orig);
    drop(snap);
    if let Via::Service(service) = &decision.via {
        debug!(%service, "service resolved");
    }
    // The workload itself (a reference count), not copies of its strings: this runs per
    // connection.
    // `hbone`: where the HBONE connection goes, if it goes (the endpoint's port 15008, or the
    // waypoint's), and the authority it asks for (the endpoint, or the original service port).
    let mut hbone = None;
    let (target, peer, local) = match decision.route {
        Route::NoEndpoints { service } => {
            reset(stream);
            return Err(Error::NoEndpoints { service });
        }
        Route::NoWaypoint { service, waypoint } => {
            reset(stream);
            return Err(Error::NoWaypoint { service, waypoint });
        }
        Route::Waypoint {
            endpoint,
            workload,
            authority,
        } => {
            hbone = Some((endpoint, authority));
            (endpoint, Some(workload), None)
        }
        Route::Loop { endpoint } => {
            reset(stream);
            return Err(Error::Loop { addr: endpoint });
        }
        Route::Plaintext { endpoint } => (endpoint, None, None),
        Route::Hbone { endpoint, workload } => (endpoint, Some(workload), None),
        // Handed over directly when this agent serves the pod (it may not yet): HBONE otherwise.
        Route::SameNode { endpoint, workload } => {
            let local = inputs.local.load().get(&endpoint.ip()).cloned();
            (endpoint, Some(workload), local)
        }
    };
    let transport = match (&local, &peer, &hbone) {
        (Some(_), _, _) => Transport::Local,
        (None, Some(_), Some(_)) => Transport::Waypoint,
        (None, Some(_), None) => Transport::Hbone,
        (None, None, _) => Transport::Plaintext,
    };
    let span = tracing::Span::current();
    span.record("endpoint", tracing::field::display(target));
    span.record("route", decision.via.label());
    span.record("transport", transport.as_str());
    conn.set_route(target, transport);
    pod.routes.inc(
        &inputs.metrics.proxy,
        decision.via.label(),
        transport.as_str(),
    );
    // The identity the destination must prove (or, on this node, has).
    let expected = match (&local, &peer) {
        (Some(dst), _) => Some(dst.state().identity.clone()),
        (None, Some(peer)) => Some(SpiffeId::new(
            inputs.certs.trust_domain(),
            &peer.namespace,
            &peer.service_account,
        )?),
        (None, None) => None,
    };
    {
        let state = pod.state();
        let service = match &decision.via {
            Via::Service(service) => Some(service.as_str()),
            Via::Direct => None,
        };
        report.know(TcpLabels::new(
            Reporter::Source,
            &Party {
                workload: Some(&state.workload),
                principal: Some(&state.identity),
            },
            &Party {
                workload: peer.as_deref(),
                principal: expected.as_ref(),
            },
            service,
            match transport {
                Transport::Plaintext => Security::None,
                _ => Security::MutualTls,
            },
        ));
    }
    if let Some(dst) = local {
        span.record(
            "peer_identity",
            tracing::field::display(&dst.state().identity),
        );
        debug!("connection proxied");
        return Box::pin(super::inbound::deliver_local(
            stream, pod, &dst, target, inputs, conn,
        ))
        .await;
    }
    match (peer, expected) {
        (Some(peer), Some(expected)) => {
            span.record("peer_identity", tracing::field::display(&expected));
            // What the client has already sent travels with the CONNECT request. Never waited
            // for: a server-speaks-first protocol sends nothing first.
            let initial = initial_bytes(&stream);
            let sent_first = initial.as_ref().map_or(0, |b| b.len() as u64);
            // Boxed: opening a stream may dial and handshake, a future of many KiB that would
            // otherwise stay allocated for the whole life of the connection.
            let (dst, authority) =
                hbone.unwrap_or((SocketAddr::new(target.ip(), ports::HBONE), target));
            let opened = open_hbone(
                client,
                pod,
                inputs,
                (dst, authority),
                (expected, &peer.node),
                initial,
            );
            let tunnel = match Box::pin(opened).await {
                Ok(tunnel) => tunnel,
                Err(e) => {
                    reset(stream);
                    return Err(e);
                }
            };
            span.record("hbone_conn", tunnel.conn_id);
            report.established(&inputs.metrics.istio);
            debug!("connection proxied");
            // Boxed, as the plaintext copy below: only the branch taken stays allocated.
            let meter = Meter {
                side: Side::new(conn, pod.counters(Direction::Outbound), Direction::Outbound),
                mirror: None,
            };
            meter.from_pod(sent_first);
            let copy = Box::pin(tunnel::stream::copy(
                stream,
                tunnel.send,
                tunnel.recv,
                |n| meter.from_pod(n),
                |n| meter.to_pod(n),
            ));
            let (sent, received) = copy.await.map_err(Error::Stream)?;
            Ok((sent + sent_first, received))
        }
        // Outside the mesh. Not kept in the connection's future across its awaits.
        (peer, expected) => {
            drop((peer, expected));
            let (stream, upstream) = connect_for(stream, pod, &inputs.home, target, None).await?;
            report.established(&inputs.metrics.istio);
            debug!("connection proxied");
            let meter = Meter {
                side: Side::new(conn, pod.counters(Direction::Outbound), Direction::Outbound),
                mirror: None,
            };
            Box::pin(copy::bidirectional(
                stream,
                upstream,
                |n| meter.from_pod(n),
                |n| meter.to_pod(n),
            ))
            .await
            .map_err(Error::Stream)
        }
    }
}

/// A CONNECT stream for `authority` through a pooled HBONE connection to `dst` (the target
/// pod's port 15008, or its waypoint's), authenticated as this pod and accepting only the
/// `expected` server identity, issued by `node`, the server's node (or by a central CA).
async fn open_hbone(
    client: SocketAddr,
    pod: &Pod,
    inputs: &Inputs,
    (dst, authority): (SocketAddr, SocketAddr),
    (expected, node): (SpiffeId, &str),
    initial: Option<bytes::Bytes>,
) -> Result<tunnel::client::Stream, Error> {
    let state = pod.state();
    let key = PoolKey {
        src: state.identity.clone(),
        src_pod: pod.netns_cookie,
        dst,
        expected,
    };
    let dst = key.dst;
    let tls = || {
        let leaf = inputs.certs.get(&key.src)?;
        Ok(tunnel::tls::client_config(
            inputs.certs.bundle().clone(),
            leaf,
            vec![key.expected.clone()],
            Some(node.to_owned()),
        )?)
    };
    // The HBONE connection leaves from the pod's namespace, with the pod's address.
    let dial = || async move {
        let socket = pod_socket(pod, &inputs.home, dst)?;
        tokio::time::timeout(super::CONNECT_TIMEOUT, socket.connect(dst))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    };
    let forwarded_for = SocketAddr::new(
        state.workload.ips.first().copied().unwrap_or(client.ip()),
        client.port(),
    );
    Ok(inputs
        .pool
        .open(&key, tls, dial, authority, forwarded_for, initial)
        .await?)
}

/// Bytes the client has already sent (up to one first read), without waiting for any. Read
/// from the socket directly: the runtime has not seen the new socket's readiness yet.
fn initial_bytes(stream: &TcpStream) -> Option<bytes::Bytes> {
    use std::io::Read as _;
    let mut buf = vec![0u8; tunnel::stream::FIRST_READ];
    match (&*socket2::SockRef::from(stream)).read(&mut buf) {
        Ok(n) if n > 0 => {
            buf.truncate(n);
            Some(buf.into())
        }
        // Nothing yet, EOF (the copy sees it next) or an error (the copy reports it).
        _ => None,
    }
}

fn original_destination(
    client: SocketAddr,
    pod: &Pod,
    inputs: &Inputs,
) -> Result<SocketAddr, Error> {
    let key = ConnKey {
        netns_cookie: pod.netns_cookie,
        ip: mapped_words(client.ip()),
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
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(orig.ip) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    let ip = if orig.family == family::INET {
        v6.to_canonical()
    } else {
        IpAddr::V6(v6)
    };
    Ok(SocketAddr::new(ip, orig.port))
}
