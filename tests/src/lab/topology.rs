//! The lab topology (nodes, namespaces, pods, services) and the addresses and names derived from it.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The embedded default topology (`tests/topologies/default.yaml`).
pub const DEFAULT_TOPOLOGY_YAML: &str = include_str!("../../topologies/default.yaml");

/// Most nodes a lab may have: node `i` owns `10.240.<i>.0/24` and `10.240.100.0/24` holds the VIPs.
const MAX_NODES: usize = 99;
/// Most pods per node: pod `j` gets host part `j + 2`, and 255 is the broadcast address.
const MAX_PODS_PER_NODE: usize = 253;

/// What a lab is made of, as read from a topology YAML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Node names, in order: node `i` (1-based) gets underlay address `10.240.0.<i>`.
    pub nodes: Vec<String>,
    /// Namespaces and whether the mesh captures their pods.
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    /// Pods: one network namespace and one cgroup each.
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// Services: a VIP with ports, selecting pods of its namespace by labels.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Namespaces with a waypoint: `name` is a service of `namespace` (port 15008) whose pods
    /// run `mesh-agent waypoint` (the state file's `waypoints`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoints: Vec<WaypointSpec>,
}

/// A namespace's waypoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaypointSpec {
    /// The namespace.
    pub namespace: String,
    /// Its waypoint's service.
    pub name: String,
}

/// A namespace of the topology.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Namespace name.
    pub name: String,
    /// Whether the pods of this namespace are captured by the mesh.
    pub enabled: bool,
}

/// A pod of the topology.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// Namespace the pod lives in.
    pub namespace: String,
    /// Pod name, unique within its namespace.
    pub name: String,
    /// Node the pod runs on.
    pub node: String,
    /// Service account (the pod's identity); `default` when absent.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Labels, matched by service selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's own capture exclusions, copied into the state file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureExclusions>,
    /// A pod laid out as the kubelet lays pods out with this cgroup driver: its cgroup is
    /// `kubepods...` below the lab's cgroup directory (the agents' kubelet cgroup root), its
    /// processes run in a container cgroup below it, and the state names it by UID only (no
    /// netns or cgroup): the agent finds its sandbox itself, or is told by the CNI plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubelet: Option<CgroupDriver>,
}

/// The kubelet's cgroup drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// `kubepods/besteffort/pod<uid>/<container>`.
    Cgroupfs,
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`.
    Systemd,
}

/// A service of the topology.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Namespace of the service (and of the pods it selects).
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// The virtual IP clients connect to.
    pub vip: Ipv4Addr,
    /// Service ports and the pod ports they map to.
    pub ports: Vec<ServicePort>,
    /// Labels a pod must carry to be an endpoint.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// One port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// Port on the VIP.
    pub port: u16,
    /// Port on the selected pods.
    pub target_port: u16,
    /// What the port speaks, declared (the state file's `protocol`, a Kubernetes Service
    /// port's `appProtocol`); none: a waypoint tells from the first bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AppProtocol>,
}

/// A declared protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (or HTTP/2 with prior knowledge).
    Http,
    /// HTTP/2 with prior knowledge (`kubernetes.io/h2c`).
    Http2,
    /// Not HTTP.
    Tcp,
}

impl AppProtocol {
    /// The Kubernetes `appProtocol` value.
    pub fn app_protocol(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "kubernetes.io/h2c",
            AppProtocol::Tcp => "tcp",
        }
    }
}

/// Traffic the mesh must not capture (globally in the agent config, or per pod in the state file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureExclusions {
    /// Destination ports never redirected.
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination CIDRs (such as `10.0.0.0/8`) never redirected.
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Pod ports never steered to the agent.
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl Default for Topology {
    /// The embedded `tests/topologies/default.yaml` (checked by a unit test).
    fn default() -> Self {
        Topology::from_yaml(DEFAULT_TOPOLOGY_YAML)
            .expect("the embedded tests/topologies/default.yaml is valid (unit-tested)")
    }
}

impl Topology {
    /// Parses and validates a topology from YAML text.
    pub fn from_yaml(text: &str) -> Result<Topology> {
        let topology: Topology = serde_yaml::from_str(text).context("parsing topology YAML")?;
        topology.validate()?;
        Ok(topology)
    }

    /// Reads, parses and validates a topology file.
    pub fn load(path: &Path) -> Result<Topology> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading topology file {}", path.display()))?;
        Topology::from_yaml(&text).with_context(|| format!("in topology file {}", path.display()))
    }

    /// Checks names (they become network namespace and cgroup names), references and sizes.
    pub fn validate(&self) -> Result<()> {
        if self.nodes.is_empty() {
            bail!("topology has no nodes");
        }
        if self.nodes.len() > MAX_NODES {
            bail!(
                "topology has {} nodes, at most {MAX_NODES} are supported",
                self.nodes.len()
            );
        }
        for (i, node) in self.nodes.iter().enumerate() {
            // No '-' in node names: `mlab-<id>-<node>` must never equal `mlab-<id>-<ns>-<pod>`.
            if node.is_empty()
                || !node
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            {
                bail!("node name {node:?}: use only lowercase letters and digits");
            }
            if node == "underlay" {
                bail!("node name \"underlay\" is reserved for the bridge namespace");
            }
            if self.nodes[..i].contains(node) {
                bail!("node {node} is listed twice");
            }
        }
        for ns in &self.namespaces {
            check_dns_label("namespace", &ns.name)?;
        }
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, pod) in self.pods.iter().enumerate() {
            check_dns_label("pod namespace", &pod.namespace)?;
            check_dns_label("pod name", &pod.name)?;
            if !self.nodes.contains(&pod.node) {
                bail!(
                    "pod {}/{}: node {} is not in `nodes`",
                    pod.namespace,
                    pod.name,
                    pod.node
                );
            }
            if self.pods[..i]
                .iter()
                .any(|p| p.namespace == pod.namespace && p.name == pod.name)
            {
                bail!("pod {}/{} is listed twice", pod.namespace, pod.name);
            }
            let count = per_node.entry(&pod.node).or_default();
            *count += 1;
            if *count > MAX_PODS_PER_NODE {
                bail!("node {} has more than {MAX_PODS_PER_NODE} pods", pod.node);
            }
        }
        for (i, svc) in self.services.iter().enumerate() {
            check_dns_label("service namespace", &svc.namespace)?;
            check_dns_label("service name", &svc.name)?;
            if self.services[..i]
                .iter()
                .any(|s| s.namespace == svc.namespace && s.name == svc.name)
            {
                bail!("service {}/{} is listed twice", svc.namespace, svc.name);
            }
        }
        for (i, w) in self.waypoints.iter().enumerate() {
            if !self.namespaces.iter().any(|ns| ns.name == w.namespace) {
                bail!(
                    "waypoint of {}: the namespace is not in `namespaces`",
                    w.namespace
                );
            }
            if !self.services.iter().any(|s| {
                s.namespace == w.namespace
                    && s.name == w.name
                    && s.ports.iter().any(|p| p.port == 15008)
            }) {
                bail!(
                    "waypoint {}/{}: no service {} with port 15008 in {}",
                    w.namespace,
                    w.name,
                    w.name,
                    w.namespace
                );
            }
            if self.waypoints[..i]
                .iter()
                .any(|o| o.namespace == w.namespace)
            {
                bail!("namespace {} has two waypoints", w.namespace);
            }
        }
        Ok(())
    }
}

fn check_dns_label(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("{what} {name:?}: use 1-63 lowercase letters, digits and inner '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_topology_parses() {
        let t = Topology::default();
        assert_eq!(t.nodes, ["n1", "n2"]);
        assert_eq!(t.pods.len(), 5);
        assert_eq!(t.services[0].vip, Ipv4Addr::new(10, 240, 100, 10));
        assert_eq!(t.pods[3].service_account, "default");
    }

    #[test]
    fn the_waypoint_topology_runs_shops_waypoint_in_its_pod() {
        let t = Topology::from_yaml(include_str!("../../topologies/waypoint.yaml"))
            .expect("valid topology");
        assert_eq!(
            crate::lab::waypoint::pods(&t),
            [(
                "shop".to_owned(),
                "waypoint".to_owned(),
                "waypoint".to_owned()
            )]
        );
        let broken = include_str!("../../topologies/waypoint.yaml").replace(
            "port: 15008, target_port: 15008",
            "port: 15009, target_port: 15008",
        );
        let e = Topology::from_yaml(&broken).expect_err("no port 15008");
        assert!(
            format!("{e:#}").contains("no service waypoint with port 15008"),
            "{e:#}"
        );
    }

    #[test]
    fn capture_block_is_optional_and_kept() {
        let t = Topology::from_yaml(
            "nodes: [a]\npods:\n  - {namespace: x, name: p, node: a, capture: {exclude_outbound_ports: [53]}}\n",
        )
        .expect("valid topology");
        let capture = t.pods[0].capture.as_ref().expect("capture kept");
        assert_eq!(capture.exclude_outbound_ports, [53]);
        assert!(capture.exclude_outbound_cidrs.is_empty());
    }

    #[test]
    fn rejects_bad_references_and_names() {
        for (yaml, needle) in [
            ("nodes: []", "no nodes"),
            ("nodes: [n-1]", "lowercase letters and digits"),
            (
                "nodes: [a]\npods: [{namespace: x, name: p, node: b}]",
                "not in `nodes`",
            ),
            (
                "nodes: [a]\npods: [{namespace: X, name: p, node: a}]",
                "pod namespace",
            ),
            ("nodes: [a, a]", "listed twice"),
        ] {
            let err = format!("{:#}", Topology::from_yaml(yaml).expect_err(yaml));
            assert!(err.contains(needle), "{yaml}: {err}");
        }
    }
}
