//! The node proxy's outbound decision as data: [`route`] answers, from the state alone, how a
//! captured connection to an original destination leaves the node. It does no I/O; the
//! outbound proxy carries the answer out, and the table tests below pin it down.

use std::{net::SocketAddr, sync::Arc};

use crate::state::{Destination, Snapshot, Workload};

/// Where the connection comes from, as far as the decision needs it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The node of the proxy deciding (the source pod's node).
    pub node: &'a str,
    /// Whether a meshed destination on this node is handed over directly
    /// (`hbone.same_node_fast_path`) rather than through HBONE.
    pub same_node_fast_path: bool,
}

/// How the destination was named: through a service's VIP, or directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A service port, `namespace/name`, resolved to one of its endpoints.
    Service(String),
    /// An address that is no service's: the destination as it is.
    Direct,
}

impl Via {
    /// The `route` label of `mesh_outbound_routes_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Via::Service(_) => "service",
            Via::Direct => "direct",
        }
    }
}

/// How the connection leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not a destination of the mesh: a plain TCP connection from the pod's own namespace.
    Plaintext { endpoint: SocketAddr },
    /// A meshed pod of this node: handed to its inbound side without a tunnel (when this agent
    /// serves it; over HBONE otherwise).
    SameNode {
        endpoint: SocketAddr,
        workload: Arc<Workload>,
    },
    /// A meshed pod: HBONE to its address, expecting its workload's identity.
    Hbone {
        endpoint: SocketAddr,
        workload: Arc<Workload>,
    },
    /// A service of a namespace with a waypoint: HBONE to one of the waypoint's pods
    /// (`endpoint`, its port 15008), expecting the waypoint's identity, asking for the
    /// original destination (`authority`, the service's `vip:port`); the waypoint picks the
    /// service's endpoint. Never straight to an endpoint, also on the same node.
    Waypoint {
        endpoint: SocketAddr,
        workload: Arc<Workload>,
        authority: SocketAddr,
    },
    /// A service of a namespace whose waypoint has no pod in the mesh (or no service): refused,
    /// never sent around it.
    NoWaypoint { service: String, waypoint: String },
    /// A service without endpoints: refused.
    NoEndpoints { service: String },
    /// An address that would come back to this agent (loopback, unspecified): refused.
    Loop { endpoint: SocketAddr },
}

/// The decision: how the destination was named and how the connection leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub via: Via,
    pub route: Route,
}

/// Decides how a connection from `source` to `orig` leaves: a service port resolves to one of
/// its endpoints; a meshed endpoint is reached over HBONE (or handed over on the same node); the
/// rest goes out in plaintext, except addresses that would loop back to this agent.
pub fn route(snap: &Snapshot, source: &Source<'_>, orig: SocketAddr) -> Decision {
    decide(snap, source, orig, Snapshot::resolve)
}

/// [`route`] without taking a service's endpoint: what the next connection would meet, for an
/// inspection (`/why`), which must not move the round robin.
pub fn explain(snap: &Snapshot, source: &Source<'_>, orig: SocketAddr) -> Decision {
    decide(snap, source, orig, Snapshot::resolve_peek)
}

/// How a service port is resolved: taking its next endpoint, or looking at it.
type Resolve = fn(&Snapshot, SocketAddr) -> Destination;

fn decide(snap: &Snapshot, source: &Source<'_>, orig: SocketAddr, resolve: Resolve) -> Decision {
    let (via, endpoint) = match resolve(snap, orig) {
        Destination::Service { service, endpoint } => {
            match through_waypoint(snap, &service, orig, resolve) {
                Some(route) => {
                    return Decision {
                        via: Via::Service(service),
                        route,
                    }
                }
                None => (Via::Service(service), endpoint),
            }
        }
        Destination::NoEndpoints { service } => {
            let route = through_waypoint(snap, &service, orig, resolve).unwrap_or_else(|| {
                Route::NoEndpoints {
                    service: service.clone(),
                }
            });
            return Decision {
                via: Via::Service(service),
                route,
            };
        }
        Destination::Passthrough(addr) => (Via::Direct, addr),
    };
    // Loopback or unspecified (0.0.0.0, ::: the local host) would come back to this agent.
    let ip = endpoint.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return Decision {
            via,
            route: Route::Loop { endpoint },
        };
    }
    let route = match snap.meshed_workload(endpoint.ip()) {
        Some(w) if source.same_node_fast_path && w.node == source.node => Route::SameNode {
            endpoint,
            workload: w.clone(),
        },
        Some(w) => Route::Hbone {
            endpoint,
            workload: w.clone(),
        },
        None => Route::Plaintext { endpoint },
    };
    Decision { via, route }
}

/// The route through the waypoint of service `service`'s namespace, if the namespace is meshed
/// and has one (and `service` is not the waypoint's own service).
fn through_waypoint(
    snap: &Snapshot,
    service: &str,
    orig: SocketAddr,
    resolve: Resolve,
) -> Option<Route> {
    let (namespace, name) = service.split_once('/')?;
    if !snap.namespace_enabled(namespace) {
        return None;
    }
    let waypoint = snap.waypoint_of(namespace)?;
    if waypoint == name {
        return None;
    }
    let key = format!("{namespace}/{waypoint}");
    let found = snap.service(&key).and_then(|def| {
        def.vips.iter().find_map(|vip| {
            match resolve(snap, SocketAddr::new(*vip, mesh_common::ports::HBONE)) {
                Destination::Service { endpoint, .. } => snap
                    .meshed_workload(endpoint.ip())
                    .map(|w| (endpoint, w.clone())),
                _ => None,
            }
        })
    });
    Some(match found {
        Some((endpoint, workload)) => Route::Waypoint {
            endpoint,
            workload,
            authority: orig,
        },
        None => Route::NoWaypoint {
            service: service.to_owned(),
            waypoint: key,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::IpAddr};

    use super::*;
    use crate::state::{Changes, Namespace, PortMapping, Service, ROLE_LABEL, ROLE_WAYPOINT};

    fn workload(ns: &str, name: &str, node: &str, ip: &str) -> Workload {
        Workload {
            namespace: ns.into(),
            name: name.into(),
            service_account: "default".into(),
            node: node.into(),
            ips: vec![ip.parse().expect("ip")],
            netns: format!("/run/netns/{name}").into(),
            cgroup: format!("/cg/{name}").into(),
            uid: None,
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            capture: Default::default(),
        }
    }

    /// shop (meshed): client and api-1 on n1, api-2 on n2; legacy (not meshed): server on n2;
    /// web (meshed, waypoint `waypoint`): the waypoint on n2, app on n1; broken (meshed, its
    /// waypoint `missing` does not exist) and unmeshed (not meshed, waypoint named): app on n1.
    /// Services: shop/api (api-2), shop/empty (no endpoint), shop/local (api-1),
    /// legacy/server, web/waypoint (port 15008), web/app, web/empty, broken/app, unmeshed/app.
    fn snapshot() -> Snapshot {
        let service = |ns: &str, name: &str, vip: &str, app: &str| Service {
            namespace: ns.into(),
            name: name.into(),
            vips: vec![vip.parse().expect("vip")],
            ports: vec![PortMapping {
                port: 80,
                target_port: 8080,
                protocol: Default::default(),
            }],
            selector: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            endpoints: None,
        };
        let waypoint_service = Service {
            ports: vec![PortMapping {
                port: 15008,
                target_port: 15008,
                protocol: Default::default(),
            }],
            ..service("web", "waypoint", "10.96.0.20", "waypoint")
        };
        let (snap, _) = Snapshot::default()
            .apply(Changes {
                namespaces: vec![
                    Namespace {
                        name: "shop".into(),
                        enabled: true,
                        waypoint: None,
                    },
                    Namespace {
                        name: "legacy".into(),
                        enabled: false,
                        waypoint: None,
                    },
                    Namespace {
                        name: "web".into(),
                        enabled: true,
                        waypoint: Some("waypoint".into()),
                    },
                    Namespace {
                        name: "broken".into(),
                        enabled: true,
                        waypoint: Some("missing".into()),
                    },
                    Namespace {
                        name: "unmeshed".into(),
                        enabled: false,
                        waypoint: Some("waypoint".into()),
                    },
                ],
                workloads: vec![
                    workload("shop", "client", "n1", "10.0.1.2"),
                    workload("shop", "api-1", "n1", "10.0.1.3"),
                    workload("shop", "api-2", "n2", "10.0.2.2"),
                    workload("legacy", "server", "n2", "10.0.2.3"),
                    Workload {
                        labels: BTreeMap::from([
                            ("app".to_owned(), "waypoint".to_owned()),
                            (ROLE_LABEL.to_owned(), ROLE_WAYPOINT.to_owned()),
                        ]),
                        ..workload("web", "waypoint", "n2", "10.0.2.4")
                    },
                    workload("web", "app", "n1", "10.0.1.5"),
                    workload("broken", "app", "n1", "10.0.1.6"),
                    workload("unmeshed", "app", "n1", "10.0.1.7"),
                ],
                services: vec![
                    service("shop", "api", "10.96.0.10", "api-2"),
                    service("shop", "empty", "10.96.0.11", "nobody"),
                    service("shop", "local", "10.96.0.12", "api-1"),
                    service("legacy", "server", "10.96.0.13", "server"),
                    waypoint_service,
                    service("web", "app", "10.96.0.21", "app"),
                    service("web", "empty", "10.96.0.22", "nobody"),
                    service("broken", "app", "10.96.0.23", "app"),
                    service("unmeshed", "app", "10.96.0.24", "app"),
                ],
                ..Changes::default()
            })
            .expect("a valid state");
        snap
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// The route's kind and endpoint, for the table.
    fn shape(route: &Route) -> (&'static str, Option<SocketAddr>, Option<String>) {
        match route {
            Route::Plaintext { endpoint } => ("plaintext", Some(*endpoint), None),
            Route::SameNode { endpoint, workload } => {
                ("same-node", Some(*endpoint), Some(workload.key()))
            }
            Route::Hbone { endpoint, workload } => ("hbone", Some(*endpoint), Some(workload.key())),
            Route::Waypoint {
                endpoint, workload, ..
            } => ("waypoint", Some(*endpoint), Some(workload.key())),
            Route::NoWaypoint { waypoint, .. } => ("no-waypoint", None, Some(waypoint.clone())),
            Route::NoEndpoints { service } => ("no-endpoints", None, Some(service.clone())),
            Route::Loop { endpoint } => ("loop", Some(*endpoint), None),
        }
    }

    /// (source, original destination, via, route, endpoint, workload or service)
    type Row<'a> = (
        &'a Source<'a>,
        &'a str,
        Via,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
    );

    #[test]
    fn the_outbound_decision_table() {
        let snap = snapshot();
        let n1 = Source {
            node: "n1",
            same_node_fast_path: true,
        };
        let n1_no_fast_path = Source {
            node: "n1",
            same_node_fast_path: false,
        };
        let n2 = Source {
            node: "n2",
            same_node_fast_path: true,
        };
        let shop_api = || Via::Service("shop/api".into());
        #[rustfmt::skip]
        let table: &[Row] = &[
            // A service VIP resolves to its endpoint; meshed and elsewhere: HBONE.
            (&n1, "10.96.0.10:80", shop_api(), "hbone", Some("10.0.2.2:8080"), Some("shop/api-2")),
            // The same service seen from the endpoint's node: handed over directly.
            (&n2, "10.96.0.10:80", shop_api(), "same-node", Some("10.0.2.2:8080"), Some("shop/api-2")),
            // A meshed pod of this node, by VIP or directly ...
            (&n1, "10.96.0.12:80", Via::Service("shop/local".into()), "same-node", Some("10.0.1.3:8080"), Some("shop/api-1")),
            (&n1, "10.0.1.3:8080", Via::Direct, "same-node", Some("10.0.1.3:8080"), Some("shop/api-1")),
            // ... over HBONE when the fast path is off.
            (&n1_no_fast_path, "10.0.1.3:8080", Via::Direct, "hbone", Some("10.0.1.3:8080"), Some("shop/api-1")),
            // A meshed pod elsewhere, directly.
            (&n1, "10.0.2.2:9000", Via::Direct, "hbone", Some("10.0.2.2:9000"), Some("shop/api-2")),
            // Not meshed (its namespace is not): plaintext, by VIP or directly.
            (&n1, "10.96.0.13:80", Via::Service("legacy/server".into()), "plaintext", Some("10.0.2.3:8080"), None),
            (&n1, "10.0.2.3:8080", Via::Direct, "plaintext", Some("10.0.2.3:8080"), None),
            // Outside the mesh altogether: plaintext.
            (&n1, "192.0.2.7:443", Via::Direct, "plaintext", Some("192.0.2.7:443"), None),
            // A VIP port the service does not have is no service's.
            (&n1, "10.96.0.10:81", Via::Direct, "plaintext", Some("10.96.0.10:81"), None),
            // A service without endpoints is refused.
            (&n1, "10.96.0.11:80", Via::Service("shop/empty".into()), "no-endpoints", None, Some("shop/empty")),
            // A service of a namespace with a waypoint: HBONE to the waypoint, from any node,
            // also with no endpoint of its own (the waypoint answers), fast path or not.
            (&n1, "10.96.0.21:80", Via::Service("web/app".into()), "waypoint", Some("10.0.2.4:15008"), Some("web/waypoint")),
            (&n2, "10.96.0.21:80", Via::Service("web/app".into()), "waypoint", Some("10.0.2.4:15008"), Some("web/waypoint")),
            (&n1_no_fast_path, "10.96.0.21:80", Via::Service("web/app".into()), "waypoint", Some("10.0.2.4:15008"), Some("web/waypoint")),
            (&n1, "10.96.0.22:80", Via::Service("web/empty".into()), "waypoint", Some("10.0.2.4:15008"), Some("web/waypoint")),
            // The waypoint's own service, and the namespace's pods by address: not through it.
            (&n1, "10.96.0.20:15008", Via::Service("web/waypoint".into()), "hbone", Some("10.0.2.4:15008"), Some("web/waypoint")),
            (&n1, "10.0.1.5:8080", Via::Direct, "same-node", Some("10.0.1.5:8080"), Some("web/app")),
            // A waypoint that does not exist: refused, never sent around it.
            (&n1, "10.96.0.23:80", Via::Service("broken/app".into()), "no-waypoint", None, Some("broken/missing")),
            // A namespace not meshed has no waypoint in effect.
            (&n1, "10.96.0.24:80", Via::Service("unmeshed/app".into()), "plaintext", Some("10.0.1.7:8080"), None),
            // Addresses that would loop back to the agent are refused.
            (&n1, "127.0.0.1:15001", Via::Direct, "loop", Some("127.0.0.1:15001"), None),
            (&n1, "0.0.0.0:80", Via::Direct, "loop", Some("0.0.0.0:80"), None),
            (&n1, "[::ffff:127.0.0.1]:80", Via::Direct, "loop", Some("[::ffff:127.0.0.1]:80"), None),
            (&n1, "[::]:80", Via::Direct, "loop", Some("[::]:80"), None),
        ];
        for (source, orig, via, kind, endpoint, named) in table {
            let decision = route(&snap, source, addr(orig));
            let (got_kind, got_endpoint, got_named) = shape(&decision.route);
            assert_eq!(
                (&decision.via, got_kind, got_endpoint, got_named.as_deref()),
                (via, *kind, endpoint.map(addr), *named),
                "{} -> {orig}",
                source.node
            );
        }
    }

    #[test]
    fn a_namespace_meshed_later_changes_the_route() {
        let snap = snapshot();
        let n1 = Source {
            node: "n1",
            same_node_fast_path: true,
        };
        let server: SocketAddr = addr("10.0.2.3:8080");
        assert!(matches!(
            route(&snap, &n1, server).route,
            Route::Plaintext { .. }
        ));
        let (snap, _) = snap
            .apply(Changes {
                namespaces: vec![Namespace {
                    name: "legacy".into(),
                    enabled: true,
                    waypoint: None,
                }],
                ..Changes::default()
            })
            .expect("valid");
        match route(&snap, &n1, server).route {
            Route::Hbone { workload, .. } => {
                assert_eq!(
                    workload.ips,
                    vec!["10.0.2.3".parse::<IpAddr>().expect("ip")]
                )
            }
            other => panic!("legacy/server meshed, yet {other:?}"),
        }
    }
}
