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
    let (via, endpoint) = match snap.resolve(orig) {
        Destination::Service { service, endpoint } => (Via::Service(service), endpoint),
        Destination::NoEndpoints { service } => {
            return Decision {
                via: Via::Service(service.clone()),
                route: Route::NoEndpoints { service },
            }
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::IpAddr};

    use super::*;
    use crate::state::{Changes, Namespace, PortMapping, Service};

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

    /// shop (meshed): client and api-1 on n1, api-2 on n2; legacy (not meshed): server on n2.
    /// Services: shop/api (both api pods), shop/empty (no endpoint), shop/local (api-1 only),
    /// legacy/server.
    fn snapshot() -> Snapshot {
        let service = |ns: &str, name: &str, vip: &str, app: &str| Service {
            namespace: ns.into(),
            name: name.into(),
            vips: vec![vip.parse().expect("vip")],
            ports: vec![PortMapping {
                port: 80,
                target_port: 8080,
            }],
            selector: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            endpoints: None,
        };
        let (snap, _) = Snapshot::default()
            .apply(Changes {
                namespaces: vec![
                    Namespace {
                        name: "shop".into(),
                        enabled: true,
                    },
                    Namespace {
                        name: "legacy".into(),
                        enabled: false,
                    },
                ],
                workloads: vec![
                    workload("shop", "client", "n1", "10.0.1.2"),
                    workload("shop", "api-1", "n1", "10.0.1.3"),
                    workload("shop", "api-2", "n2", "10.0.2.2"),
                    workload("legacy", "server", "n2", "10.0.2.3"),
                ],
                services: vec![
                    service("shop", "api", "10.96.0.10", "api-2"),
                    service("shop", "empty", "10.96.0.11", "nobody"),
                    service("shop", "local", "10.96.0.12", "api-1"),
                    service("legacy", "server", "10.96.0.13", "server"),
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
