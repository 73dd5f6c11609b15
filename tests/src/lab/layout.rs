//! Names, addresses and paths of one lab, derived from its id and topology (pure, no I/O).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use super::topology::{CaptureExclusions, CgroupDriver, Topology};

/// Prefix of every network namespace the lab creates: `mlab-<id>-...`.
pub(crate) const NETNS_PREFIX: &str = "mlab-";
/// Directory holding the run directories of all labs.
pub(crate) const RUN_ROOT: &str = "/run/mesh-lab";
/// Directory holding the bpffs directories of all labs.
pub(crate) const BPF_ROOT: &str = "/sys/fs/bpf/mesh-lab";
/// Directory (under the cgroup2 mount) holding the cgroups of all labs.
pub(crate) const CGROUP_DIR: &str = "mesh-lab";
/// Where network namespaces created with `ip netns add` live.
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// Agent Prometheus port.
pub const METRICS_PORT: u16 = 15020;
/// Agent readiness port.
pub const READINESS_PORT: u16 = 15021;

/// A node of a running lab: a network namespace with one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Node {
    /// Node name from the topology.
    pub name: String,
    /// 1-based position in the topology.
    pub index: u8,
    /// Address on the underlay bridge, `10.240.0.<index>`.
    pub underlay_ip: Ipv4Addr,
    /// The /24 holding this node's pods, `10.240.<index>.0`.
    pub pod_subnet: Ipv4Addr,
    /// Network namespace name, `mlab-<id>-<node>`.
    pub netns_name: String,
    /// Network namespace file, `/run/netns/mlab-<id>-<node>`.
    pub netns: PathBuf,
    /// The agent's cgroup directory.
    pub agent_cgroup: PathBuf,
    /// The agent's bpffs directory.
    pub bpf_dir: PathBuf,
}

/// A pod of a running lab: a network namespace plus a cgroup, wired to its node by a veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pod {
    /// Namespace (Kubernetes sense) of the pod.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Node the pod runs on.
    pub node: String,
    /// Service account.
    pub service_account: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The pod's own capture exclusions, if any.
    pub capture: Option<CaptureExclusions>,
    /// The pod's address, `10.240.<node index>.<j + 2>`.
    pub ip: Ipv4Addr,
    /// Network namespace name, `mlab-<id>-<ns>-<pod>`.
    pub netns_name: String,
    /// Network namespace file, `/run/netns/mlab-<id>-<ns>-<pod>`.
    pub netns: PathBuf,
    /// cgroup v2 directory, `<cgroup2>/mesh-lab/<id>/<ns>-<pod>`; for a kubelet-style pod, its
    /// pod-level cgroup under `<cgroup2>/mesh-lab/<id>/kubepods...`.
    pub cgroup: PathBuf,
    /// Where the pod's processes run: `cgroup`, or a container cgroup below it for a
    /// kubelet-style pod.
    pub process_cgroup: PathBuf,
    /// The pod's UID (kubelet-style pods; the state names them by it).
    pub uid: Option<String>,
    /// Name of the node-side veth (`p<j>`), inside the node's netns.
    pub host_veth: String,
}

impl Pod {
    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Everything a lab's id and topology determine.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub id: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub underlay_netns_name: String,
    pub run_dir: PathBuf,
    pub cgroup_dir: PathBuf,
    pub bpf_dir: PathBuf,
    pub state_file: PathBuf,
}

impl Layout {
    /// Derives the layout; the topology must be valid (at most 99 nodes, 253 pods per node).
    pub fn new(id: &str, topology: &Topology, cgroup2: &Path) -> Layout {
        let cgroup_dir = cgroup2.join(CGROUP_DIR).join(id);
        let bpf_dir = Path::new(BPF_ROOT).join(id);
        let netns = |name: &str| Path::new(NETNS_DIR).join(name);
        let nodes: Vec<Node> = topology
            .nodes
            .iter()
            .zip(1u8..)
            .map(|(name, index)| {
                let netns_name = format!("{NETNS_PREFIX}{id}-{name}");
                Node {
                    name: name.clone(),
                    index,
                    underlay_ip: Ipv4Addr::new(10, 240, 0, index),
                    pod_subnet: Ipv4Addr::new(10, 240, index, 0),
                    netns: netns(&netns_name),
                    netns_name,
                    agent_cgroup: cgroup_dir.join(format!("agent-{name}")),
                    bpf_dir: bpf_dir.join(name),
                }
            })
            .collect();
        let mut next_host: BTreeMap<&str, u8> = BTreeMap::new();
        let pods = topology
            .pods
            .iter()
            .filter_map(|spec| {
                let node = nodes.iter().find(|n| n.name == spec.node)?;
                let j = next_host.entry(&spec.node).or_insert(0);
                let host = *j + 2;
                let host_veth = format!("p{j}");
                *j += 1;
                let netns_name = format!("{NETNS_PREFIX}{id}-{}-{}", spec.namespace, spec.name);
                let (cgroup, process_cgroup, uid) = match spec.kubelet {
                    None => {
                        let dir = cgroup_dir.join(format!("{}-{}", spec.namespace, spec.name));
                        (dir.clone(), dir, None)
                    }
                    Some(driver) => {
                        let uid = pod_uid(id, &spec.namespace, &spec.name);
                        let (pod, container) = kubelet_cgroups(&cgroup_dir, driver, &uid);
                        (pod, container, Some(uid))
                    }
                };
                Some(Pod {
                    namespace: spec.namespace.clone(),
                    name: spec.name.clone(),
                    node: spec.node.clone(),
                    service_account: spec.service_account.clone(),
                    labels: spec.labels.clone(),
                    capture: spec.capture.clone(),
                    ip: Ipv4Addr::new(10, 240, node.index, host),
                    netns: netns(&netns_name),
                    netns_name,
                    cgroup,
                    process_cgroup,
                    uid,
                    host_veth,
                })
            })
            .collect();
        Layout {
            id: id.to_owned(),
            nodes,
            pods,
            underlay_netns_name: format!("{NETNS_PREFIX}{id}-underlay"),
            run_dir: Path::new(RUN_ROOT).join(id),
            state_file: Path::new(RUN_ROOT).join(id).join("state.yaml"),
            cgroup_dir,
            bpf_dir,
        }
    }

    pub fn state_path(&self) -> &Path {
        &self.state_file
    }

    /// The lab's certificate authority files (root, node intermediates).
    pub fn ca_dir(&self) -> PathBuf {
        self.run_dir.join("ca")
    }

    pub fn agent_config_path(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("agent-{node}.yaml"))
    }

    /// The log of the `generation`th agent started for `node` (restarts and upgrades start
    /// new ones): `agent-<node>.log`, then `agent-<node>.<generation>.log`.
    pub fn agent_log_path_of(&self, node: &str, generation: u32) -> PathBuf {
        if generation <= 1 {
            self.run_dir.join(format!("agent-{node}.log"))
        } else {
            self.run_dir.join(format!("agent-{node}.{generation}.log"))
        }
    }

    /// The pids of `node`'s agents, one per line, the current one last.
    pub fn agent_pid_path(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("agent-{node}.pid"))
    }

    /// The handover socket of `node`'s agents.
    pub fn handover_socket(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("handover-{node}.sock"))
    }

    /// The CNI socket of `node`'s agent (in a directory of its own: the agent writes the
    /// meshed namespaces beside it).
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("cni-{node}")).join("cni.sock")
    }

    /// The workload API socket of `node`'s agent (a waypoint's pod fetches its certificate).
    pub fn workload_socket(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("workload-{node}.sock"))
    }

    /// The CNI configuration directory of `node` (a conflist naming the plugin).
    pub fn cni_conf_dir(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("cni-{node}")).join("net.d")
    }

    /// Where `lab upgrade` keeps the agent binaries it starts (a copy each, so that a rebuild
    /// never touches a running binary).
    pub fn bin_dir(&self) -> PathBuf {
        self.run_dir.join("bin")
    }
}

/// A UID (UUID-shaped, stable for a lab id and pod) for a kubelet-style pod.
fn pod_uid(id: &str, namespace: &str, name: &str) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (id, namespace, name).hash(&mut h);
    let a = h.finish();
    "uid".hash(&mut h);
    let b = h.finish();
    let hex = format!("{a:016x}{b:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The pod-level and container cgroups of a kubelet-style pod, below the lab's cgroup
/// directory (which the lab's agents take as the kubelet's cgroup root).
fn kubelet_cgroups(root: &Path, driver: CgroupDriver, uid: &str) -> (PathBuf, PathBuf) {
    match driver {
        CgroupDriver::Cgroupfs => {
            let pod = root.join("kubepods/besteffort").join(format!("pod{uid}"));
            (pod.clone(), pod.join("app"))
        }
        CgroupDriver::Systemd => {
            let pod = root
                .join("kubepods.slice/kubepods-besteffort.slice")
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                ));
            (pod.clone(), pod.join("cri-containerd-app.scope"))
        }
    }
}

/// Checks a caller-chosen lab id: it becomes part of netns, cgroup and directory names.
pub(crate) fn check_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty()
        || id.len() > 12
        || !id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        anyhow::bail!("lab id {id:?}: use 1-12 lowercase letters and digits");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_addresses() {
        let layout = Layout::new("ab12", &Topology::default(), Path::new("/cg"));
        let pod = |name: &str| {
            layout
                .pods
                .iter()
                .find(|p| p.full_name() == name)
                .expect("pod exists")
                .clone()
        };
        assert_eq!(layout.nodes[1].underlay_ip, Ipv4Addr::new(10, 240, 0, 2));
        assert_eq!(pod("shop/client").ip, Ipv4Addr::new(10, 240, 1, 2));
        assert_eq!(pod("shop/db").ip, Ipv4Addr::new(10, 240, 1, 3));
        assert_eq!(pod("legacy/client").ip, Ipv4Addr::new(10, 240, 1, 4));
        assert_eq!(pod("shop/api").ip, Ipv4Addr::new(10, 240, 2, 2));
        assert_eq!(pod("legacy/server").host_veth, "p1");
        assert_eq!(
            pod("shop/db").netns,
            Path::new("/run/netns/mlab-ab12-shop-db")
        );
        assert_eq!(
            pod("shop/db").cgroup,
            Path::new("/cg/mesh-lab/ab12/shop-db")
        );
        assert_eq!(
            layout.nodes[0].bpf_dir,
            Path::new("/sys/fs/bpf/mesh-lab/ab12/n1")
        );
    }

    #[test]
    fn ids() {
        assert!(check_id("dev").is_ok());
        assert!(check_id("a-b").is_err());
        assert!(check_id("").is_err());
    }
}
