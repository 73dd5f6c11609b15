//! Inbound plaintext: a connection to the pod's address that sk_lookup steered to the pod's
//! inbound listener. The accepted socket's local address is the original destination.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpStream;
use tracing::debug;

use super::{
    authz::{self, Peer},
    connect_for, connect_in_pod, copy,
    live::{Conn, Meter, Side, Transport},
    reset,
    telemetry::{Party, Reporter, Security, TcpLabels},
    Direction, Error, Inputs, Pod,
};
use crate::{identity::SpiffeId, state::Workload, tunnel};

/// A plaintext connection from `peer`: authorized on its address alone (it has no identity),
/// reset when denied.
pub async fn proxy(
    stream: TcpStream,
    peer: SocketAddr,
    pod: &Pod,
    inputs: &Inputs,
    conn: &Conn,
) -> Result<(u64, u64), Error> {
    let Ok(dst) = stream.local_addr() else {
        reset(stream);
        return Err(Error::Socket(std::io::Error::other(
            "the accepted socket has no local address",
        )));
    };
    // sk_lookup never steers the agent's ports; a connection to one here would loop.
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    tracing::Span::current().record("dst", tracing::field::display(dst));
    if !pod.state().workload.ips.contains(&dst.ip()) {
        reset(stream);
        return Err(Error::Loop { addr: dst });
    }
    let peer = Peer {
        identity: None,
        src: peer.ip().to_canonical(),
    };
    conn.set_transport(Transport::Plaintext);
    deliver(stream, peer, pod, dst, inputs, (conn, None)).await
}

/// What the state says is at `ip`, when that agrees with the identity `ip` proved (if any): a
/// workload of another namespace or service account is not named as the source.
fn source_workload(
    inputs: &Inputs,
    ip: IpAddr,
    identity: Option<&SpiffeId>,
) -> Option<Arc<Workload>> {
    let w = inputs.store.load().workloads_by_ip.get(&ip)?.clone();
    match identity {
        Some(id) if w.namespace != id.namespace || w.service_account != id.service_account => None,
        _ => Some(w),
    }
}

/// What Istio's metrics say about a connection from `peer` to this pod.
fn labels(inputs: &Inputs, pod: &Pod, peer: &Peer) -> TcpLabels {
    let identity = peer.identity.as_deref();
    let source = source_workload(inputs, peer.src, identity);
    let state = pod.state();
    TcpLabels::new(
        Reporter::Destination,
        &Party {
            workload: source.as_deref(),
            principal: identity,
        },
        &Party {
            workload: Some(&state.workload),
            principal: Some(&state.identity),
        },
        None,
        if identity.is_some() {
            Security::MutualTls
        } else {
            Security::None
        },
    )
}

/// Decides `client`'s connection from `peer` (reset when denied), then connects it to the
/// application at `dst` from inside the pod and copies both ways while the grant holds; never
/// to an agent port (a loop). For inbound the pod's side is the application: bytes it sends are
/// "sent". `conns`: this connection, and the source pod's (with the pod) when it is one of
/// this agent's.
async fn deliver(
    client: TcpStream,
    peer: Peer,
    pod: &Pod,
    dst: SocketAddr,
    inputs: &Inputs,
    conns: (&Conn, Option<(&Conn, &Pod)>),
) -> Result<(u64, u64), Error> {
    if mesh_common::ports::RESERVED.contains(&dst.port()) {
        reset(client);
        return Err(Error::Loop { addr: dst });
    }
    conns.0.set_dst(dst);
    conns.0.report.know(labels(inputs, pod, &peer));
    // The application sees the client's address (`delivery.preserve_client_address`).
    let from = peer.src;
    let grant = match authz::authorize(pod, inputs, peer, dst, conns.0) {
        Ok(grant) => grant,
        Err(denied) => {
            reset(client);
            return Err(denied);
        }
    };
    let (client, app) = connect_for(client, pod, &inputs.home, dst, Some(from)).await?;
    for conn in [Some(conns.0), conns.1.map(|(c, _)| c)]
        .into_iter()
        .flatten()
    {
        conn.report.established(&inputs.metrics.istio);
    }
    debug!("connection delivered");
    let meter = Meter {
        side: Side::new(
            conns.0,
            pod.counters(Direction::Inbound),
            Direction::Inbound,
        ),
        mirror: conns
            .1
            .map(|(c, src)| Side::new(c, src.counters(Direction::Outbound), Direction::Outbound)),
    };
    let copy = Box::pin(copy::bidirectional(
        app,
        client,
        |n| meter.from_pod(n),
        |n| meter.to_pod(n),
    ));
    authz::enforce(pod, inputs, grant, copy).await
}

/// The same-node fast path: `client`, a connection of `src` (a pod this agent captures) to
/// `target` in `dst` (another one), delivered straight to the destination application from
/// inside its network namespace. This is the HBONE server's delivery (`hbone_stream`) without
/// the tunnel: the agent knows the source identity because the connection came in on the
/// source pod's own listener, the very knowledge the certificate it mints for that pod
/// carries, and the bytes never leave the node's kernel. The destination pod gets its inbound
/// counters and its own log line, with the source identity, as for an HBONE stream.
pub async fn deliver_local(
    client: TcpStream,
    src: &Pod,
    dst: &Pod,
    target: SocketAddr,
    inputs: &Inputs,
    source_conn: &Conn,
) -> Result<(u64, u64), Error> {
    use tracing::Instrument as _;
    let source = src.state();
    let span = tracing::info_span!(
        "inbound",
        pod = %dst.key,
        src = %source.workload.ips.first().map_or_else(String::new, ToString::to_string),
        identity = %source.identity,
        dst = %target,
        local = true,
        decision = tracing::field::Empty,
        policy = tracing::field::Empty,
        rule = tracing::field::Empty,
        audit = tracing::field::Empty
    );
    // The source pod's address of the destination's family: what the application sees.
    let src_ip = (source.workload.ips.iter())
        .find(|ip| ip.is_ipv4() == target.is_ipv4())
        .or(source.workload.ips.first())
        .copied()
        .unwrap_or(target.ip());
    let peer = Peer {
        identity: Some(std::sync::Arc::new(source.identity.clone())),
        src: src_ip,
    };
    let conn = (inputs.connections).open(
        super::Direction::Inbound,
        &dst.shared_key,
        SocketAddr::new(src_ip, source_conn.src().port()),
    );
    conn.set_transport(Transport::Local);
    let work = std::pin::pin!(deliver(
        client,
        peer,
        dst,
        target,
        inputs,
        (&conn, Some((source_conn, src)))
    ));
    match super::account(super::Direction::Inbound, dst, inputs, &conn, work)
        .instrument(span)
        .await
    {
        // The destination's "sent" is what the source received.
        Ok((app_sent, app_received)) => Ok((app_received, app_sent)),
        Err(flags) => Err(Error::LocalDelivery {
            pod: dst.key.clone(),
            flags,
        }),
    }
}

/// One HBONE connection to this pod's port 15008: TLS with the pod's identity, then one
/// tunnelled connection per CONNECT stream. `accepted_while_draining`: see [`super::Drain`].
/// Made on the heap by a plain function: a caller that awaits it holds a pointer, never room
/// for the whole future (which a debug build would keep inline, across its other awaits).
pub fn serve_hbone(
    tcp: TcpStream,
    peer: SocketAddr,
    accepted_while_draining: bool,
    admitted: super::limits::Admitted,
    slot: super::limits::HandshakeSlot,
    pod: Arc<Pod>,
    inputs: Arc<Inputs>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        // The connection's slot (hbone.server limits) is held as long as it is served.
        let _admitted = admitted;
        use tracing::Instrument as _;
        let span = tracing::info_span!("hbone", pod = %pod.key, src = %peer);
        let handler = {
            let (pod, inputs) = (pod.clone(), inputs.clone());
            move |req: tunnel::server::Request| {
                let (pod, inputs) = (pod.clone(), inputs.clone());
                // The stream is a task of its own (spawned by the server): counted for draining.
                let token = inputs.tasks.token();
                let span = tracing::info_span!(
                    "inbound",
                    pod = %pod.key,
                    src = %req.remote,
                    identity = %req.peer,
                    dst = tracing::field::Empty,
                    forwarded = req.forwarded.as_deref().unwrap_or(""),
                    decision = tracing::field::Empty,
                    policy = tracing::field::Empty,
                    rule = tracing::field::Empty,
                    audit = tracing::field::Empty
                );
                async move {
                    let _token = token;
                    let conn = (inputs.connections).open(
                        super::Direction::Inbound,
                        &pod.shared_key,
                        req.remote,
                    );
                    let work = std::pin::pin!(hbone_stream(req, &pod, &inputs, &conn));
                    // Logged and counted by `account`.
                    let _ =
                        super::account(super::Direction::Inbound, &pod, &inputs, &conn, work).await;
                }
                .instrument(span)
            }
        };
        let server_tls = pod.state().server_tls.clone();
        let mut drain_state = inputs.drain.subscribe();
        let drain = async move {
            let goaway = |d: &super::Drain| match accepted_while_draining {
                false => *d != super::Drain::Serving,
                true => *d == super::Drain::Closing,
            };
            // A closed channel means the agent is going away without draining: nothing to do.
            if drain_state.wait_for(goaway).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let admit_client = {
            let inputs = inputs.clone();
            move |chain| async move { admit(&inputs, chain).await }
        };
        let result = tunnel::server::serve(
            tcp,
            server_tls,
            handler,
            drain,
            inputs.hbone_server,
            std::future::ready(slot),
            admit_client,
        )
        .instrument(span.clone())
        .await;
        if let Err(e) = result {
            let e = Error::Hbone(e);
            span.in_scope(|| tracing::warn!(error = %e, "HBONE connection failed"));
            pod.count_failure(&inputs.metrics, super::Direction::Inbound, &e);
        }
    })
}

/// How long an HBONE client whose identity the state does not (yet) place on the node that
/// issued it waits for the state to catch up (a pod just scheduled, a new service account, a
/// state that reached its node's agent first) before it is refused.
const PLACEMENT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Admits an HBONE client of this node's pods ([`admit_chain`] with the agent's state and
/// trust bundle).
async fn admit(
    inputs: &Inputs,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<(), String> {
    admit_chain(&inputs.store, inputs.certs.bundle(), chain).await
}

/// Admits an HBONE client: a leaf issued by a node (its issuer names the node) only when the
/// state places a workload of its namespace and service account on that node, now, within
/// [`crate::state::PLACEMENT_GRACE`], or within [`PLACEMENT_WAIT`] from now. Leaves from a
/// central CA are not bound to a node. The node agent's and the waypoint's HBONE servers both
/// admit their clients so.
pub async fn admit_chain(
    store: &crate::state::Store,
    bundle: &crate::identity::TrustBundle,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<(), String> {
    use crate::identity::Placement as _;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err("no client certificate".to_owned());
    };
    // The same verification as the handshake's, for the issuer it found.
    let (id, issuer) = crate::identity::verify_peer_issued(
        leaf,
        intermediates,
        bundle,
        rustls::pki_types::UnixTime::now(),
        crate::identity::PeerRole::Client,
    )
    .map_err(|e| e.to_string())?;
    let Some(node) = issuer else {
        return Ok(());
    };
    let mut changed = store.subscribe();
    let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
    loop {
        if store.may_issue(&node, &id) {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return Err(crate::identity::Error::PeerIssuedByAnotherNode {
                    identity: id.to_string(),
                    node,
                }
                .to_string())
            }
        }
    }
}

/// One CONNECT stream: checks the authority, connects to the application, answers, copies.
async fn hbone_stream(
    mut req: tunnel::server::Request,
    pod: &Pod,
    inputs: &Inputs,
    conn: &Conn,
) -> Result<(u64, u64), Error> {
    use http::StatusCode;
    let report = &conn.report;
    let bad = |req: tunnel::server::Request, why: String| {
        let peer = (*req.peer).clone();
        req.reject(StatusCode::BAD_REQUEST);
        Err(Error::BadRequest { peer, why })
    };
    let authority = match req.authority {
        Ok(a) => a,
        Err(why) => return bad(req, why.to_owned()),
    };
    // The authority must name the pod the tunnel reached: the address the client connected to,
    // one of this pod's own. The connection goes to that address, never to one from the request.
    let dst = match tunnel::connect::target(authority, req.local, &pod.state().workload.ips) {
        Ok(dst) => dst,
        Err(tunnel::connect::Refusal::NotThePod) => {
            let local = req.local.ip().to_canonical();
            let target = authority.ip().to_canonical();
            let what = match inputs.store.load().workloads_by_ip.get(&target) {
                Some(w) if w.node == inputs.node => {
                    format!("another pod of node {} ({})", inputs.node, w.key())
                }
                Some(w) => format!("a pod of node {} ({})", w.node, w.key()),
                None => "not a workload".to_owned(),
            };
            return bad(
                req,
                format!(
                    "authority {authority} is not {} (the pod this tunnel reached at {local}): {what}",
                    pod.key
                ),
            );
        }
        Err(tunnel::connect::Refusal::AgentPort) => {
            return bad(req, format!("authority {authority} names an agent port"));
        }
    };
    tracing::Span::current().record("dst", tracing::field::display(dst));
    conn.set_dst(dst);
    conn.set_transport(Transport::Hbone);
    // Authorized before the application is connected: a denied client never reaches it.
    let from = req.remote.ip().to_canonical();
    let peer = Peer {
        identity: Some(req.peer.clone()),
        src: from,
    };
    report.know(labels(inputs, pod, &peer));
    let grant = match authz::authorize(pod, inputs, peer, dst, conn) {
        Ok(grant) => grant,
        Err(denied) => {
            req.reject(StatusCode::FORBIDDEN);
            return Err(denied);
        }
    };
    // Tied to the stream: a client that resets it meanwhile (rapid reset) gets no connection.
    // At most `hbone.server.max_connects_in_flight` at once, agent-wide.
    let connect = Box::pin(async {
        let Some(_slot) = inputs.limits.connect_slot(super::CONNECT_TIMEOUT).await else {
            return Err(Error::ConnectsInFlight { addr: dst });
        };
        connect_in_pod(pod, &inputs.home, dst, Some(from)).await
    });
    let app = match req.unless_reset(connect).await {
        Some(Ok(app)) => app,
        Some(Err(e)) => {
            req.reject(StatusCode::SERVICE_UNAVAILABLE);
            return Err(e);
        }
        None => {
            return Err(Error::EarlyReset {
                peer: (*req.peer).clone(),
            })
        }
    };
    let (send, recv) = req
        .accept()
        .map_err(|e| Error::Stream(std::io::Error::other(e)))?;
    report.established(&inputs.metrics.istio);
    debug!("connection delivered");
    // Boxed (as the connect above): an idle connection keeps only what it still awaits.
    let meter = Meter {
        side: Side::new(conn, pod.counters(Direction::Inbound), Direction::Inbound),
        mirror: None,
    };
    let copy = Box::pin(tunnel::stream::copy(
        app,
        send,
        recv,
        |n| meter.from_pod(n),
        |n| meter.to_pod(n),
    ));
    authz::enforce(pod, inputs, grant, copy).await
}
