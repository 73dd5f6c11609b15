//! The files a lab writes for its agents: the mesh state and one agent config per node
//! (formats in docs/formats.md).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    layout::{Layout, METRICS_PORT, READINESS_PORT},
    sys,
    topology::{CaptureExclusions, NamespaceSpec, ServicePort, Topology},
    Lab,
};

/// How often the agents check the state file, in the lab.
const STATE_POLL_INTERVAL_MS: u64 = 100;

/// The mesh state file.
#[derive(Debug, Serialize)]
struct State<'a> {
    namespaces: &'a [NamespaceSpec],
    workloads: Vec<Workload<'a>>,
    services: Vec<Service<'a>>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    waypoints: &'a [super::topology::WaypointSpec],
}

#[derive(Debug, Serialize)]
struct Workload<'a> {
    name: &'a str,
    namespace: &'a str,
    service_account: &'a str,
    node: &'a str,
    ips: [Ipv4Addr; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<&'a std::path::Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a std::path::Path>,
    /// Kubelet-style pods are named by UID only.
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    labels: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    capture: Option<&'a CaptureExclusions>,
}

#[derive(Debug, Serialize)]
struct Service<'a> {
    name: &'a str,
    namespace: &'a str,
    vips: [Ipv4Addr; 1],
    ports: &'a [ServicePort],
    selector: &'a BTreeMap<String, String>,
}

/// The lab's SPIFFE trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// One agent's configuration file.
#[derive(Debug, Serialize)]
struct AgentConfig<'a> {
    node: &'a str,
    state_file: &'a std::path::Path,
    bpf_dir: &'a std::path::Path,
    metrics_addr: SocketAddr,
    readiness_addr: SocketAddr,
    state_poll_interval_ms: u64,
    capture: &'a CaptureExclusions,
    identity: Identity,
    hbone: Hbone<'a>,
    lifecycle: Lifecycle,
    pods: Pods,
}

/// The `pods` block of an agent config: the lab's cgroup directory stands for the kubelet's
/// cgroup root, and the CNI socket is in the node's run directory.
#[derive(Debug, Serialize)]
struct Pods {
    kubelet_cgroup_root: std::path::PathBuf,
    netns_dirs: [&'static str; 1],
    cni_socket: std::path::PathBuf,
    cni_conf_dir: std::path::PathBuf,
}

/// The `lifecycle` block of an agent config.
#[derive(Debug, Serialize)]
struct Lifecycle {
    handover_socket: std::path::PathBuf,
    drain_timeout_secs: u64,
}

/// The `hbone` block of an agent config.
#[derive(Debug, Serialize)]
struct Hbone<'a> {
    same_node_fast_path: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    server: &'a BTreeMap<String, u64>,
}

/// The `identity` block of an agent config: the node's intermediate CA made by `up`.
#[derive(Debug, Serialize)]
struct Identity {
    trust_domain: &'static str,
    issuer_cert: std::path::PathBuf,
    issuer_key: std::path::PathBuf,
    trust_bundle: std::path::PathBuf,
    leaf_lifetime_secs: u64,
    workload_socket: std::path::PathBuf,
}

/// The initial state file of a lab, as YAML.
pub(crate) fn state_yaml(layout: &Layout, topology: &Topology) -> Result<String> {
    let state = State {
        namespaces: &topology.namespaces,
        workloads: layout
            .pods
            .iter()
            .map(|pod| Workload {
                name: &pod.name,
                namespace: &pod.namespace,
                service_account: &pod.service_account,
                node: &pod.node,
                ips: [pod.ip],
                netns: pod.uid.is_none().then_some(pod.netns.as_path()),
                cgroup: pod.uid.is_none().then_some(pod.cgroup.as_path()),
                uid: pod.uid.as_deref(),
                labels: &pod.labels,
                capture: pod.capture.as_ref(),
            })
            .collect(),
        services: topology
            .services
            .iter()
            .map(|svc| Service {
                name: &svc.name,
                namespace: &svc.namespace,
                vips: [svc.vip],
                ports: &svc.ports,
                selector: &svc.selector,
            })
            .collect(),
        waypoints: &topology.waypoints,
    };
    serde_yaml::to_string(&state).context("serialising the mesh state")
}

/// The agent configuration of node `node`, as YAML.
pub(crate) fn agent_config_yaml(
    layout: &Layout,
    node: &str,
    capture: &CaptureExclusions,
    leaf_lifetime_secs: u64,
    same_node_fast_path: bool,
    drain_timeout_secs: u64,
    hbone_server: &BTreeMap<String, u64>,
) -> Result<String> {
    let bpf_dir = layout
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.bpf_dir.as_path())
        .with_context(|| format!("no node {node} in the lab"))?;
    let config = AgentConfig {
        node,
        state_file: layout.state_path(),
        bpf_dir,
        metrics_addr: SocketAddr::from(([0, 0, 0, 0], METRICS_PORT)),
        readiness_addr: SocketAddr::from(([0, 0, 0, 0], READINESS_PORT)),
        state_poll_interval_ms: STATE_POLL_INTERVAL_MS,
        capture,
        identity: Identity {
            trust_domain: TRUST_DOMAIN,
            issuer_cert: layout.ca_dir().join(format!("{node}-cert.pem")),
            issuer_key: layout.ca_dir().join(format!("{node}-key.pem")),
            trust_bundle: layout.ca_dir().join("root-cert.pem"),
            leaf_lifetime_secs,
            workload_socket: layout.workload_socket(node),
        },
        hbone: Hbone {
            same_node_fast_path,
            server: hbone_server,
        },
        lifecycle: Lifecycle {
            handover_socket: layout.handover_socket(node),
            drain_timeout_secs,
        },
        pods: Pods {
            kubelet_cgroup_root: layout.cgroup_dir.clone(),
            netns_dirs: [super::layout::NETNS_DIR],
            cni_socket: layout.cni_socket(node),
            cni_conf_dir: layout.cni_conf_dir(node),
        },
    };
    serde_yaml::to_string(&config).context("serialising an agent config")
}

/// Reading and changing the state file of a running lab.
impl Lab {
    /// The current mesh state; panics if it cannot be read.
    pub fn read_state(&self) -> serde_yaml::Value {
        match self.try_read_state() {
            Ok(state) => state,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// The current mesh state, or why it cannot be read.
    pub fn try_read_state(&self) -> Result<serde_yaml::Value> {
        let path = self.layout.state_path();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading mesh state {}", path.display()))?;
        serde_yaml::from_str(&text)
            .with_context(|| format!("parsing mesh state {}", path.display()))
    }

    /// Replaces the mesh state atomically; panics on failure.
    pub fn write_state(&self, v: &serde_yaml::Value) {
        let path = self.layout.state_path();
        let result = serde_yaml::to_string(v)
            .context("serialising the mesh state")
            .and_then(|text| sys::write_atomic(path, text.as_bytes()));
        if let Err(e) = result {
            panic!("writing mesh state {}: {e:#}", path.display());
        }
    }

    /// Sets `enabled` of namespace `ns` in the state file (adding the namespace if missing).
    pub fn set_namespace_enabled(&self, ns: &str, enabled: bool) {
        let mut state = self.read_state();
        let Some(list) = state
            .get_mut("namespaces")
            .and_then(|v| v.as_sequence_mut())
        else {
            panic!(
                "mesh state {} has no `namespaces` list",
                self.layout.state_path().display()
            );
        };
        match list
            .iter_mut()
            .find(|n| n.get("name").and_then(|v| v.as_str()) == Some(ns))
        {
            Some(entry) => entry["enabled"] = serde_yaml::Value::Bool(enabled),
            None => {
                let mut entry = serde_yaml::Mapping::new();
                entry.insert("name".into(), ns.into());
                entry.insert("enabled".into(), enabled.into());
                list.push(entry.into());
            }
        }
        self.write_state(&state);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn state_file_matches_the_documented_format() {
        let topology = Topology::default();
        let layout = Layout::new("ab12", &topology, Path::new("/sys/fs/cgroup/unified"));
        let yaml = state_yaml(&layout, &topology).expect("serialises");
        let v: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("parses");
        let w = &v["workloads"][0];
        assert_eq!(w["name"].as_str(), Some("client"));
        assert_eq!(w["ips"][0].as_str(), Some("10.240.1.2"));
        assert_eq!(
            w["netns"].as_str(),
            Some("/run/netns/mlab-ab12-shop-client")
        );
        assert_eq!(
            w["cgroup"].as_str(),
            Some("/sys/fs/cgroup/unified/mesh-lab/ab12/shop-client")
        );
        assert_eq!(w["labels"]["app"].as_str(), Some("client"));
        assert!(w.get("capture").is_none());
        assert_eq!(v["namespaces"][1]["enabled"].as_bool(), Some(false));
        assert_eq!(v["services"][0]["vips"][0].as_str(), Some("10.240.100.10"));
        assert_eq!(
            v["services"][0]["ports"][0]["target_port"].as_u64(),
            Some(8080)
        );
    }

    #[test]
    fn agent_config_matches_the_documented_format() {
        let topology = Topology::default();
        let layout = Layout::new("ab12", &topology, Path::new("/cg"));
        let capture = CaptureExclusions {
            exclude_outbound_ports: vec![22],
            ..Default::default()
        };
        let yaml = agent_config_yaml(&layout, "n2", &capture, 3600, false, 30, &BTreeMap::new())
            .expect("serialises");
        let v: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("parses");
        assert_eq!(v["node"].as_str(), Some("n2"));
        assert_eq!(
            v["lifecycle"]["handover_socket"].as_str(),
            Some("/run/mesh-lab/ab12/handover-n2.sock")
        );
        assert_eq!(v["lifecycle"]["drain_timeout_secs"].as_u64(), Some(30));
        assert_eq!(
            v["state_file"].as_str(),
            Some("/run/mesh-lab/ab12/state.yaml")
        );
        assert_eq!(v["bpf_dir"].as_str(), Some("/sys/fs/bpf/mesh-lab/ab12/n2"));
        assert_eq!(v["metrics_addr"].as_str(), Some("0.0.0.0:15020"));
        assert_eq!(v["readiness_addr"].as_str(), Some("0.0.0.0:15021"));
        assert_eq!(v["state_poll_interval_ms"].as_u64(), Some(100));
        assert_eq!(v["capture"]["exclude_outbound_ports"][0].as_u64(), Some(22));
        assert_eq!(v["hbone"]["same_node_fast_path"].as_bool(), Some(false));
    }
}
