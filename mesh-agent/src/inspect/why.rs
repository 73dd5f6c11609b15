//! `/why` and `mesh-agent inspect why SRC DST:PORT`: would a connection from pod SRC to pod
//! (or service) DST on PORT be captured, how would it be routed, and would it be allowed? The
//! answer comes from the live state and this node's capture, through the same functions the
//! data path runs (`proxy::route::route`, `policy::evaluate`): it never drifts from what a
//! connection would meet.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::dump::{capture_of, policies_of};
use crate::{
    config::CaptureExclusions,
    identity::SpiffeId,
    pods::inspect::CaptureView,
    policy,
    proxy::route::{self, Route, Via},
    state::{Snapshot, Workload},
};

/// The question: `src` and `dst` as `namespace/name`, and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub src: (String, String),
    pub dst: (String, String),
    pub port: u16,
}

impl Question {
    /// Parses `NAMESPACE/POD` and `NAMESPACE/NAME:PORT`.
    pub fn parse(src: &str, dst: &str) -> Result<Self, String> {
        let name = |s: &str, what: &str| -> Result<(String, String), String> {
            match s.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Ok((ns.to_owned(), name.to_owned()))
                }
                _ => Err(format!("{what} {s:?} is not NAMESPACE/NAME")),
            }
        };
        let (dst_name, port) = dst
            .rsplit_once(':')
            .ok_or_else(|| format!("destination {dst:?} has no port: give NAMESPACE/NAME:PORT"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("destination port {port:?} is not a port (1-65535)"))?;
        Ok(Self {
            src: name(src, "source")?,
            dst: name(dst_name, "destination")?,
            port,
        })
    }
}

/// What the answering agent knows of itself.
#[derive(Debug)]
pub struct Here<'a> {
    pub node: &'a str,
    pub trust_domain: &'a str,
    pub same_node_fast_path: bool,
    /// The node-wide capture exclusions.
    pub global: &'a CaptureExclusions,
    pub capture: &'a CaptureView,
}

/// The answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// `allowed`, `denied`, `refused` (the mesh refuses it before any policy: no endpoints, no
    /// waypoint, a source it cannot serve) or `not_captured` (it leaves without the mesh).
    pub verdict: &'static str,
    /// One sentence, the reason first.
    pub summary: String,
    pub source: End,
    pub destination: End,
    pub capture: Step,
    pub route: Option<RouteStep>,
    pub policy: Option<PolicyStep>,
}

/// One end of the connection.
#[derive(Debug, Clone, Serialize)]
pub struct End {
    pub name: String,
    /// `pod` or `service`.
    pub kind: &'static str,
    pub node: Option<String>,
    pub address: IpAddr,
    /// The destination's port (none for the source).
    pub port: Option<u16>,
    pub identity: Option<String>,
    pub meshed: bool,
}

/// A step's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub ok: bool,
    pub why: String,
}

/// How a captured connection is routed.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStep {
    /// `service` or `direct`.
    pub via: &'static str,
    pub service: Option<String>,
    /// `hbone`, `local` (same node, no tunnel), `waypoint`, `plaintext`, or `refused`.
    pub transport: &'static str,
    pub endpoint: Option<SocketAddr>,
    /// The workload at the endpoint and the identity it must prove.
    pub peer: Option<String>,
    pub peer_identity: Option<String>,
    pub why: String,
}

/// The destination's L4 authorization.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStep {
    /// The workload whose policies decide.
    pub workload: String,
    /// The identity the destination sees (`None`: plaintext).
    pub identity: Option<String>,
    pub source_address: IpAddr,
    pub allowed: bool,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub reason: &'static str,
    /// The policies in force on the destination, by action.
    pub in_force: std::collections::BTreeMap<&'static str, Vec<String>>,
}

fn find<'a>(
    snap: &'a Snapshot,
    (ns, name): &(String, String),
) -> Option<&'a std::sync::Arc<Workload>> {
    snap.workloads.get(format!("{ns}/{name}").as_str())
}

/// An address of `w` of the family of `like` (else its first).
fn address_of(w: &Workload, like: Option<IpAddr>) -> Option<IpAddr> {
    (w.ips.iter())
        .find(|ip| like.is_none_or(|l| l.is_ipv4() == ip.is_ipv4()))
        .or(w.ips.first())
        .copied()
}

fn identity_of(here: &Here<'_>, w: &Workload) -> Option<SpiffeId> {
    SpiffeId::new(here.trust_domain, &w.namespace, &w.service_account).ok()
}

fn meshed(snap: &Snapshot, w: &Workload) -> bool {
    snap.namespace_enabled(&w.namespace) && !w.is_waypoint()
}

/// Answers `q` from `snap` and this node's capture.
pub fn answer(snap: &Snapshot, here: &Here<'_>, q: &Question) -> Result<Answer, String> {
    let src = find(snap, &q.src).ok_or_else(|| {
        format!(
            "no workload {}/{} in the state (a pod's name, as `inspect workloads` lists it)",
            q.src.0, q.src.1
        )
    })?;
    let src_ip = address_of(src, None)
        .ok_or_else(|| format!("workload {} has no address yet", src.key()))?;
    let src_identity = identity_of(here, src);
    let (destination, dst_pod) = match find(snap, &q.dst) {
        Some(w) => {
            let ip = address_of(w, Some(src_ip))
                .ok_or_else(|| format!("workload {} has no address yet", w.key()))?;
            (
                End {
                    name: w.key(),
                    kind: "pod",
                    node: Some(w.node.clone()),
                    address: ip,
                    port: Some(q.port),
                    identity: identity_of(here, w).map(|id| id.to_string()),
                    meshed: meshed(snap, w),
                },
                Some(w.clone()),
            )
        }
        None => {
            let key = format!("{}/{}", q.dst.0, q.dst.1);
            let service = snap
                .service(&key)
                .ok_or_else(|| format!("no pod or service {key} in the state"))?;
            if !service.ports.iter().any(|p| p.port == q.port) {
                return Err(format!(
                    "service {key} has no port {} (it has {})",
                    q.port,
                    service
                        .ports
                        .iter()
                        .map(|p| p.port.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            let vip = (service.vips.iter())
                .find(|v| v.is_ipv4() == src_ip.is_ipv4())
                .or(service.vips.first())
                .copied()
                .ok_or_else(|| format!("service {key} has no address"))?;
            (
                End {
                    name: key,
                    kind: "service",
                    node: None,
                    address: vip,
                    port: Some(q.port),
                    identity: None,
                    meshed: snap.namespace_enabled(&q.dst.0),
                },
                None,
            )
        }
    };
    let source = End {
        name: src.key(),
        kind: "pod",
        node: Some(src.node.clone()),
        address: src_ip,
        port: None,
        identity: src_identity.as_ref().map(ToString::to_string),
        meshed: meshed(snap, src),
    };
    let dst_addr = SocketAddr::new(destination.address, q.port);
    let mut answer = Answer {
        verdict: "allowed",
        summary: String::new(),
        source,
        destination,
        capture: Step {
            ok: true,
            why: String::new(),
        },
        route: None,
        policy: None,
    };

    // 1. Capture of the source's connection.
    let excluded = excluded(here.global, src, dst_addr);
    let captured = if !meshed(snap, src) {
        Err(if src.is_waypoint() {
            "the source is a waypoint pod: it speaks HBONE itself".to_owned()
        } else {
            format!("namespace {} is not in the mesh", src.namespace)
        })
    } else if let Some(why) = excluded {
        Err(why)
    } else if src.node == here.node {
        let (c, links) = capture_of(snap, here.capture, src);
        // Of a degraded pod, only the links this connection meets matter: the connect
        // program of its family redirects it, sock_ops records where it was going.
        let connect = if dst_addr.is_ipv4() {
            mesh_common::programs::CONNECT4
        } else {
            mesh_common::programs::CONNECT6
        };
        let broken = |program: &str| {
            (links.iter())
                .find(|l| l.program == program && !l.attached)
                .map(|l| {
                    format!(
                        "{program}: {}",
                        l.problem.as_deref().unwrap_or("not attached")
                    )
                })
        };
        let refused = |answer: &mut Answer, why: String| {
            answer.capture = Step {
                ok: false,
                why: why.clone(),
            };
            answer.verdict = "refused";
            answer.summary = format!("refused: {why}");
        };
        match c.state {
            "captured" => Ok(format!("captured by this agent, node {}'s", here.node)),
            // Without the CNI plugin a pod runs before it is captured; its connections pass.
            "pending" => Err(format!("not captured yet: {}", c.why)),
            "refused" | "waiting" => {
                refused(
                    &mut answer,
                    format!(
                        "the source {} is in the mesh and not served yet: {}",
                        src.key(),
                        c.why
                    ),
                );
                return Ok(answer);
            }
            _ => match (broken(connect), broken(mesh_common::programs::SOCK_OPS)) {
                (Some(why), _) => Err(format!("capture is not intact: {why}")),
                (None, Some(why)) => {
                    refused(
                        &mut answer,
                        format!(
                            "the agent cannot learn where the connection was going ({why}): it \
                             refuses it"
                        ),
                    );
                    return Ok(answer);
                }
                (None, None) => Ok(format!(
                    "captured by this agent, node {}'s (the pod's capture is degraded, not on \
                     this connection's path: {})",
                    here.node, c.why
                )),
            },
        }
    } else {
        Ok(format!(
            "captured by node {}'s agent, as the state says (that agent holds its capture)",
            src.node
        ))
    };
    let how = match captured {
        Ok(why) => {
            answer.capture = Step { ok: true, why };
            routed(snap, here, src, dst_addr, &mut answer)
        }
        Err(why) => {
            answer.capture = Step {
                ok: false,
                why: why.clone(),
            };
            answer.verdict = "not_captured";
            // It leaves as the pod sent it: in plaintext, from the pod's address. A service's
            // address is not resolved by the mesh then; where kube-proxy sends it to an
            // endpoint, that pod's side decides (the one a connection would get next here).
            let endpoint = match snap.resolve_peek(dst_addr) {
                crate::state::Destination::Service { endpoint, .. } => endpoint,
                _ => dst_addr,
            };
            let dst = dst_pod
                .clone()
                .or_else(|| snap.workloads_by_ip.get(&endpoint.ip()).cloned());
            match dst.filter(|w| meshed(snap, w)) {
                Some(w) => match inbound_bypass(snap, here, &w, endpoint) {
                    Some(bypass) => {
                        answer.summary = format!(
                            "not captured ({why}), and {bypass}: it reaches {} directly, no \
                             policy decides",
                            w.key()
                        );
                        None
                    }
                    None => Some((w, None, src_ip, endpoint)),
                },
                None => {
                    answer.summary = format!(
                        "not captured ({why}): it leaves in plaintext, and the destination is \
                         not in the mesh: no mesh policy applies"
                    );
                    None
                }
            }
        }
    };
    // 2. The destination's L4 policy.
    if let Some((w, identity, from, endpoint)) = how {
        let selected = snap.authorization(&w.key());
        let decision = policy::evaluate(
            selected.map(|s| &**s),
            &policy::Conn {
                identity: identity.as_ref(),
                src: from,
                dst: endpoint.ip(),
                port: endpoint.port(),
            },
        );
        let step = PolicyStep {
            workload: w.key(),
            identity: identity.as_ref().map(ToString::to_string),
            source_address: from,
            allowed: decision.allowed,
            policy: decision.policy.as_deref().map(str::to_owned),
            rule: decision.rule,
            reason: decision.reason.as_str(),
            in_force: policies_of(snap, &w.key()),
        };
        let who = match &identity {
            Some(id) => format!("as {id}"),
            None => format!("in plaintext from {from}"),
        };
        let by = match &step.policy {
            Some(p) => format!(
                "policy {p}{} ({})",
                step.rule.map(|r| format!(" rule {r}")).unwrap_or_default(),
                step.reason
            ),
            None => format!("no policy ({})", step.reason),
        };
        let capture_note = if answer.verdict == "not_captured" {
            format!(
                "not captured ({}), reaches {} ",
                answer.capture.why,
                w.key()
            )
        } else {
            format!("reaches {} ", w.key())
        };
        if decision.allowed {
            if answer.verdict != "not_captured" {
                answer.verdict = "allowed";
            }
            answer.summary = format!("{capture_note}{who}: allowed by {by}");
        } else {
            answer.verdict = "denied";
            answer.summary = format!("{capture_note}{who}: denied by {by}");
        }
        answer.policy = Some(step);
    }
    Ok(answer)
}

/// Why a plaintext connection to `endpoint` of `w` would reach the application without the
/// agent, if it would: the port excluded from inbound capture (the pod's own exclusions; the
/// node's too when it is this one), or, on this node, the pod's sk_lookup not attached.
fn inbound_bypass(
    snap: &Snapshot,
    here: &Here<'_>,
    w: &Workload,
    endpoint: SocketAddr,
) -> Option<String> {
    let port = endpoint.port();
    if w.capture.exclude_inbound_ports.contains(&port) {
        return Some(format!(
            "port {port} is excluded from its inbound capture (the pod's exclude_inbound_ports)"
        ));
    }
    if w.node != here.node {
        return None;
    }
    if here.global.exclude_inbound_ports.contains(&port) {
        return Some(format!(
            "port {port} is excluded from inbound capture (the node's exclude_inbound_ports)"
        ));
    }
    let (_, links) = capture_of(snap, here.capture, w);
    (links.iter())
        .find(|l| l.program == mesh_common::programs::SK_LOOKUP && !l.attached)
        .map(|l| {
            format!(
                "its {} is not attached ({})",
                l.program,
                l.problem.as_deref().unwrap_or("?")
            )
        })
}

/// Whether the source's own or the node's exclusions leave `dst` uncaptured.
fn excluded(global: &CaptureExclusions, src: &Workload, dst: SocketAddr) -> Option<String> {
    for (ex, whose) in [(global, "the node's"), (&src.capture, "the pod's")] {
        if ex.exclude_outbound_ports.contains(&dst.port()) {
            return Some(format!(
                "port {} is excluded from capture ({whose} exclude_outbound_ports)",
                dst.port()
            ));
        }
        if let Some(net) = ex
            .exclude_outbound_cidrs
            .iter()
            .find(|n| n.contains(&dst.ip()))
        {
            return Some(format!(
                "{} is excluded from capture ({whose} exclude_outbound_cidrs {net})",
                dst.ip()
            ));
        }
    }
    None
}

/// Routes a captured connection as the outbound proxy would; returns what decides it at the
/// destination (workload, identity seen, source address, endpoint), or `None` when the route
/// ends it (refused, outside the mesh, through a waypoint).
fn routed(
    snap: &Snapshot,
    here: &Here<'_>,
    src: &Workload,
    dst: SocketAddr,
    answer: &mut Answer,
) -> Option<(
    std::sync::Arc<Workload>,
    Option<SpiffeId>,
    IpAddr,
    SocketAddr,
)> {
    let source = route::Source {
        node: &src.node,
        same_node_fast_path: here.same_node_fast_path,
    };
    let decision = route::explain(snap, &source, dst);
    let service = match &decision.via {
        Via::Service(s) => Some(s.clone()),
        Via::Direct => None,
    };
    let mut step = RouteStep {
        via: decision.via.label(),
        service,
        transport: "refused",
        endpoint: None,
        peer: None,
        peer_identity: None,
        why: String::new(),
    };
    let src_ip = answer.source.address;
    let identity = identity_of(here, src);
    let mut refuse = |step: &mut RouteStep, why: String| {
        step.why = why.clone();
        answer.verdict = "refused";
        answer.summary = format!("refused by the mesh before any policy: {why}");
    };
    let decides = match decision.route {
        Route::NoEndpoints { service } => {
            refuse(&mut step, format!("service {service} has no endpoints"));
            None
        }
        Route::NoWaypoint { service, waypoint } => {
            refuse(
                &mut step,
                format!("service {service} goes through waypoint {waypoint}, which has no pod in the mesh"),
            );
            None
        }
        Route::Loop { endpoint } => {
            refuse(
                &mut step,
                format!("{endpoint} would loop back to the agent"),
            );
            None
        }
        Route::Plaintext { endpoint } => {
            step.transport = "plaintext";
            step.endpoint = Some(endpoint);
            step.why = "the destination is not in the mesh: it leaves in plaintext".into();
            answer.verdict = "allowed";
            answer.summary = format!(
                "captured, and {endpoint} is not in the mesh: it leaves in plaintext, no mesh policy applies"
            );
            None
        }
        Route::Waypoint {
            endpoint,
            workload,
            authority,
        } => {
            step.transport = "waypoint";
            step.endpoint = Some(endpoint);
            step.peer = Some(workload.key());
            step.peer_identity = identity_of(here, &workload).map(|id| id.to_string());
            step.why = format!(
                "the service's namespace has a waypoint: HBONE to {} for {authority}; its L7 routes and policies decide the request",
                workload.key()
            );
            answer.verdict = "allowed";
            answer.summary = format!(
                "captured and sent over HBONE to waypoint {}, whose L7 routes and policies decide",
                workload.key()
            );
            None
        }
        Route::Hbone { endpoint, workload } | Route::SameNode { endpoint, workload } => {
            let same_node = workload.node == src.node && here.same_node_fast_path;
            // This agent hands it over only when it serves the destination; a destination it
            // holds closed refuses it, one it has not taken yet gets it over HBONE.
            let local = if same_node && workload.node == here.node {
                let (c, _) = capture_of(snap, here.capture, &workload);
                if c.state == "refused" || c.state == "waiting" {
                    refuse(
                        &mut step,
                        format!(
                            "{} is on this node and not served: {}",
                            workload.key(),
                            c.why
                        ),
                    );
                    answer.route = Some(step);
                    return None;
                }
                c.state != "pending"
            } else {
                same_node
            };
            step.transport = if local { "local" } else { "hbone" };
            step.endpoint = Some(endpoint);
            step.peer = Some(workload.key());
            step.peer_identity = identity_of(here, &workload).map(|id| id.to_string());
            step.why = if local {
                format!(
                    "{} is on the same node: delivered without a tunnel",
                    workload.key()
                )
            } else {
                format!(
                    "HBONE (mTLS) to {} on node {}",
                    workload.key(),
                    workload.node
                )
            };
            Some((workload, identity, src_ip, endpoint))
        }
    };
    answer.route = Some(step);
    decides
}

#[cfg(test)]
mod tests;
