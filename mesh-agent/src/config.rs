//! The agent's own configuration (`mesh-agent node --config FILE`): typed, with defaults,
//! validated on load, serialisable for dumps. docs/formats.md documents every field.

use std::{net::SocketAddr, path::PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Errors loading the agent configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the agent configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid agent configuration {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid agent configuration {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The agent configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name; the agent captures the workloads whose `node` equals it.
    pub node: String,
    /// Where the mesh state comes from: the state file (default) or the Kubernetes API.
    #[serde(default)]
    pub discovery: DiscoverySource,
    /// The mesh state file, watched for changes (required with `discovery: file`).
    #[serde(default)]
    pub state_file: PathBuf,
    /// The Kubernetes source (`discovery: kube`).
    #[serde(default)]
    pub kube: KubeConfig,
    /// Where programs and maps are pinned; default `/sys/fs/bpf/mesh/<node>`.
    #[serde(default)]
    pub bpf_dir: Option<PathBuf>,
    /// Prometheus metrics listener.
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// Readiness listener.
    #[serde(default = "default_readiness_addr")]
    pub readiness_addr: SocketAddr,
    /// The admin endpoint (`/logging`, `/healthz/ready`, ...): loopback only.
    #[serde(default = "default_admin_addr")]
    pub admin_addr: SocketAddr,
    /// How often the state file is checked for changes, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub state_poll_interval_ms: u64,
    /// Exclusions for every captured pod of this node.
    #[serde(default)]
    pub capture: CaptureExclusions,
    /// Workload identity and mTLS.
    pub identity: IdentityConfig,
    /// The HBONE client pool.
    #[serde(default)]
    pub hbone: HboneConfig,
    /// Authorization policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Restarts and upgrades.
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// Finding the sandboxes of pods the state names by UID, and the CNI plugin.
    #[serde(default)]
    pub pods: PodsConfig,
    /// How connections are delivered to a captured pod's application.
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

/// How the agent connects to a captured pod's application for an inbound connection (HBONE,
/// plaintext, or same-node).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Connect from the original client's address, as the direct path does (default), so the
    /// application and its logs see the real client and TIME_WAIT is spread per client; each
    /// captured pod gets a routing rule and table for the answers (docs/capture.md, "The
    /// client's address"). `false`: connect from the pod's own address.
    #[serde(default = "yes")]
    pub preserve_client_address: bool,
}

fn yes() -> bool {
    true
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            preserve_client_address: true,
        }
    }
}

/// How the node finds the cgroup and network namespace of a pod the state names by UID
/// (`pods::sandbox`), and where the CNI plugin reaches the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PodsConfig {
    /// The kubelet's cgroup root, below which `kubepods` (cgroupfs driver) or `kubepods.slice`
    /// (systemd driver) holds the pod cgroups; default: the cgroup v2 mount.
    #[serde(default)]
    pub kubelet_cgroup_root: Option<PathBuf>,
    /// Directories of named network namespaces (the runtime's, as the agent sees them): a
    /// pod's namespace found from one of its processes is named by its file here.
    #[serde(default = "default_netns_dirs")]
    pub netns_dirs: Vec<PathBuf>,
    /// The Unix socket the CNI plugin (`mesh-agent cni`) asks the agent on; none by default
    /// (no CNI plugin). Its directory also holds `meshed-namespaces`, which the plugin reads
    /// when the agent does not answer.
    #[serde(default)]
    pub cni_socket: Option<PathBuf>,
    /// The node's CNI configuration directory, as the agent sees it: when set (with
    /// `cni_socket`), the agent checks every 2 s that the plugin is in the primary conflist and
    /// puts it back when the primary CNI rewrote it.
    #[serde(default)]
    pub cni_conf_dir: Option<PathBuf>,
}

fn default_netns_dirs() -> Vec<PathBuf> {
    vec![PathBuf::from("/run/netns"), PathBuf::from("/var/run/netns")]
}

impl Default for PodsConfig {
    fn default() -> Self {
        Self {
            kubelet_cgroup_root: None,
            netns_dirs: default_netns_dirs(),
            cni_socket: None,
            cni_conf_dir: None,
        }
    }
}

/// Where the mesh state comes from.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiscoverySource {
    /// The YAML state file (`state_file`), polled for changes.
    #[default]
    File,
    /// The Kubernetes API: Namespaces, Pods, Services, EndpointSlices and Istio
    /// AuthorizationPolicies, watched (`discovery::kube`).
    Kube,
}

/// The Kubernetes source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubeConfig {
    /// A kubeconfig file; default: the in-cluster configuration (the pod's service account,
    /// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`).
    pub kubeconfig: Option<PathBuf>,
    /// The namespace label that enables the mesh for a namespace, and a pod label with the
    /// same key and the value `false` takes a pod out of it.
    pub enabled_label: String,
    /// The label's value that enables the mesh.
    pub enabled_value: String,
    /// Namespaces labelled `istio.io/dataplane-mode=ambient` are meshed too (for clusters
    /// migrating from Istio ambient).
    pub accept_istio_ambient: bool,
}

impl Default for KubeConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            enabled_label: "mesh-agent/enabled".into(),
            enabled_value: "true".into(),
            accept_istio_ambient: false,
        }
    }
}

/// How the agent hands over to a successor and stops.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// The Unix socket over which a new agent of this node takes the listening sockets over
    /// from the running one (and `mesh-agent node --uninstall` reaches it); default
    /// `/run/mesh-agent/<node>/handover.sock`. Both agents must see the same path (in
    /// Kubernetes, a hostPath).
    #[serde(default)]
    pub handover_socket: Option<PathBuf>,
    /// How long an agent that has handed over (or was told to stop) keeps serving its
    /// established connections, in seconds; connections still open then are reset. Default
    /// 300 (5 minutes).
    #[serde(default = "default_drain_secs")]
    pub drain_timeout_secs: u64,
}

fn default_drain_secs() -> u64 {
    300
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            handover_socket: None,
            drain_timeout_secs: default_drain_secs(),
        }
    }
}

/// Authorization policy settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The namespace whose policies apply to the workloads of every namespace (Istio's root
    /// namespace). Default `mesh-system`.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
}

fn default_root_namespace() -> String {
    crate::state::DEFAULT_ROOT_NAMESPACE.to_owned()
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            root_namespace: default_root_namespace(),
        }
    }
}

/// The HBONE client pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HboneConfig {
    /// HBONE connections per (source identity, destination pod) that concurrent streams are
    /// spread over: each connection is encrypted by one task, so one connection caps a node
    /// pair at one core. Default: one per core, at most four.
    #[serde(default = "crate::tunnel::client::default_max_conns")]
    pub connections_per_peer: usize,
    /// Traffic between two pods this agent captures stays on the node: the agent, which holds
    /// both identities, connects the source straight to the destination pod instead of
    /// tunnelling to itself through HBONE (the bytes never leave the node's kernel). `false`
    /// sends same-node traffic through HBONE as well.
    #[serde(default = "default_true")]
    pub same_node_fast_path: bool,
    /// An HBONE connection takes no new stream after this many seconds (nor after its peer's
    /// certificate expires): the server sends GOAWAY, the client opens a new connection, with
    /// current certificates. Streams already open go on. Default 3600; 60 to 604800.
    #[serde(default = "default_max_connection_age_secs")]
    pub max_connection_age_secs: u64,
    /// The HBONE server of every captured pod (port 15008).
    #[serde(default)]
    pub server: HboneServerConfig,
}

/// Bounds on what HBONE clients may make the agent hold (every captured pod's port 15008,
/// counted for the agent as a whole). A peer is a client address: a node, or a pod that
/// connects to another pod's port 15008 itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HboneServerConfig {
    /// Inbound HBONE connections at once; past it a new one is closed at once (counted).
    pub max_connections: usize,
    /// Inbound HBONE connections at once from one peer address.
    pub max_connections_per_peer: usize,
    /// TLS handshakes in flight; a client waits for a slot (within the 5 s handshake timeout)
    /// once it has sent its first bytes (a connect that sends nothing takes none).
    pub max_handshakes: usize,
    /// TLS handshakes in flight from one peer address.
    pub max_handshakes_per_peer: usize,
    /// Connects to applications in flight for HBONE streams; a stream waits for a slot
    /// (within the connect timeout).
    pub max_connects_in_flight: usize,
    /// An HBONE connection without an open stream for this long is closed (GOAWAY).
    pub idle_timeout_secs: u64,
    /// A client that showed nothing this long (took none of our bytes, sent none while ours
    /// waited on it) is PINGed.
    pub ping_interval_secs: u64,
    /// ... and dropped when it then shows nothing (nor answers) this long more: it reads
    /// nothing it is sent, and its streams' data piles up in the agent.
    pub ping_timeout_secs: u64,
}

impl Default for HboneServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_connections_per_peer: 1024,
            max_handshakes: 256,
            max_handshakes_per_peer: 32,
            max_connects_in_flight: 1024,
            idle_timeout_secs: crate::tunnel::settings::SERVER_IDLE_TIMEOUT.as_secs(),
            ping_interval_secs: crate::tunnel::settings::SERVER_PING_INTERVAL.as_secs(),
            ping_timeout_secs: crate::tunnel::settings::SERVER_PING_TIMEOUT.as_secs(),
        }
    }
}

impl HboneServerConfig {
    fn validate(&self) -> Result<(), String> {
        let ranges: [(&str, u64, u64, u64); 8] = [
            ("max_connections", self.max_connections as u64, 1, 1_000_000),
            (
                "max_connections_per_peer",
                self.max_connections_per_peer as u64,
                1,
                self.max_connections as u64,
            ),
            ("max_handshakes", self.max_handshakes as u64, 1, 65_536),
            (
                "max_handshakes_per_peer",
                self.max_handshakes_per_peer as u64,
                1,
                self.max_handshakes as u64,
            ),
            (
                "max_connects_in_flight",
                self.max_connects_in_flight as u64,
                1,
                65_536,
            ),
            ("idle_timeout_secs", self.idle_timeout_secs, 1, 86_400),
            ("ping_interval_secs", self.ping_interval_secs, 1, 3600),
            ("ping_timeout_secs", self.ping_timeout_secs, 1, 600),
        ];
        for (name, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(format!(
                    "`hbone.server.{name}` is {value}: use {min} to {max}"
                ));
            }
        }
        Ok(())
    }

    /// How the server treats connections.
    pub fn options(&self, max_age: std::time::Duration) -> crate::tunnel::server::Options {
        use std::time::Duration;
        crate::tunnel::server::Options {
            max_age,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            ping_interval: Duration::from_secs(self.ping_interval_secs),
            ping_timeout: Duration::from_secs(self.ping_timeout_secs),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_max_connection_age_secs() -> u64 {
    3600
}

impl HboneConfig {
    /// How long an HBONE connection takes new streams.
    pub fn max_connection_age(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.max_connection_age_secs)
    }
}

impl Default for HboneConfig {
    fn default() -> Self {
        Self {
            connections_per_peer: crate::tunnel::client::default_max_conns(),
            same_node_fast_path: true,
            max_connection_age_secs: default_max_connection_age_secs(),
            server: HboneServerConfig::default(),
        }
    }
}

/// Where the node's certificate authority and the trust bundle come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// SPIFFE trust domain.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The node's issuer certificate (PEM; the node intermediate from `mesh-agent ca
    /// issue-node`, or an operator's CA), followed by its chain up to the root.
    pub issuer_cert: PathBuf,
    /// The issuer's private key (PEM).
    pub issuer_key: PathBuf,
    /// Trusted roots (PEM, one or more for root rotation).
    pub trust_bundle: PathBuf,
    /// Lifetime of workload certificates, in seconds; they are renewed at half-life.
    #[serde(default = "default_leaf_lifetime")]
    pub leaf_lifetime_secs: u64,
    /// The workload API's Unix socket, on which a waypoint's pod of this node fetches the
    /// certificate of its own identity (`workload_api`); none by default.
    #[serde(default)]
    pub workload_socket: Option<PathBuf>,
}

fn default_trust_domain() -> String {
    crate::identity::DEFAULT_TRUST_DOMAIN.into()
}

fn default_leaf_lifetime() -> u64 {
    24 * 3600
}

/// Ports and CIDRs the capture leaves alone. Used globally (agent config) and per pod (state).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaptureExclusions {
    /// Destination ports of outbound connections that are not redirected.
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination CIDRs of outbound connections that are not redirected.
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Ports of the pod that inbound connections reach directly, without the agent.
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
}

// Loopback unless configured: the node's own address (in Kubernetes, status.hostIP from the
// downward API) is what Prometheus and the kubelet reach; all addresses would expose them to
// every network the node is on.
fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], mesh_common::ports::METRICS))
}

fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], mesh_common::ports::ADMIN))
}

fn default_readiness_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], mesh_common::ports::READINESS))
}

fn default_poll_ms() -> u64 {
    500
}

/// Replaces each `${NAME}` (NAME: upper-case letters, digits and `_`) with the value `var`
/// gives, so that one file serves every node of a DaemonSet (`node: ${MESH_NODE_NAME}` from the
/// downward API). A variable that is not set is an error naming it; `$` elsewhere, and comment
/// lines (first non-blank character `#`), are kept as they are.
pub fn expand(text: &str, var: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
        } else {
            expand_line(line, &var, &mut out)?;
        }
    }
    Ok(out)
}

fn expand_line(
    line: &str,
    var: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), String> {
    let mut rest = line;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        if name.is_empty() || !after[name_len..].starts_with('}') {
            out.push_str("${");
            rest = after;
            continue;
        }
        let value = var(name).ok_or_else(|| {
            format!("${{{name}}} is used but the environment variable {name} is not set")
        })?;
        out.push_str(&value);
        rest = &after[name_len + 1..];
    }
    out.push_str(rest);
    Ok(())
}

impl Config {
    /// Reads and validates a configuration file; `${NAME}` is replaced by the environment
    /// variable `NAME` first ([`expand`]).
    pub fn load(path: &std::path::Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let text =
            expand(&text, |name| std::env::var(name).ok()).map_err(|message| Error::Invalid {
                path: path.to_owned(),
                message,
            })?;
        let config: Config = serde_yaml::from_str(&text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate().map_err(|message| Error::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.node.is_empty() {
            return Err("`node` must not be empty".into());
        }
        match self.discovery {
            DiscoverySource::File if self.state_file.as_os_str().is_empty() => {
                return Err("`state_file` is required with `discovery: file`".into());
            }
            DiscoverySource::Kube
                if self.kube.enabled_label.is_empty() || self.kube.enabled_value.is_empty() =>
            {
                return Err(
                    "`kube.enabled_label` and `kube.enabled_value` must not be empty".into(),
                );
            }
            _ => {}
        }
        let root = &self.policy.root_namespace;
        if root.is_empty() || root.contains('/') {
            return Err(format!(
                "`policy.root_namespace` {root:?} is not a namespace name"
            ));
        }
        if !(10..=60_000).contains(&self.state_poll_interval_ms) {
            return Err(format!(
                "`state_poll_interval_ms` is {}: use 10 to 60000",
                self.state_poll_interval_ms
            ));
        }
        if !(10..=366 * 24 * 3600).contains(&self.identity.leaf_lifetime_secs) {
            return Err(format!(
                "`identity.leaf_lifetime_secs` is {}: use 10 s to one year",
                self.identity.leaf_lifetime_secs
            ));
        }
        if !(1..=64).contains(&self.hbone.connections_per_peer) {
            return Err(format!(
                "`hbone.connections_per_peer` is {}: use 1 to 64",
                self.hbone.connections_per_peer
            ));
        }
        if !(60..=7 * 24 * 3600).contains(&self.hbone.max_connection_age_secs) {
            return Err(format!(
                "`hbone.max_connection_age_secs` is {}: use 60 to 604800",
                self.hbone.max_connection_age_secs
            ));
        }
        self.hbone.server.validate()?;
        if !self.admin_addr.ip().is_loopback() {
            return Err(format!(
                "`admin_addr` is {}: the admin endpoint changes the agent (its log filter) and \
                 shows its state, so it listens on a loopback address only (127.0.0.1 or ::1)",
                self.admin_addr
            ));
        }
        if [self.metrics_addr, self.readiness_addr].contains(&self.admin_addr) {
            return Err(format!(
                "`admin_addr` {} is also the metrics or readiness address: give it its own",
                self.admin_addr
            ));
        }
        if self.lifecycle.drain_timeout_secs > 24 * 3600 {
            return Err(format!(
                "`lifecycle.drain_timeout_secs` is {}: use 0 to 86400",
                self.lifecycle.drain_timeout_secs
            ));
        }
        if let Some(path) = &self.lifecycle.handover_socket {
            if !path.is_absolute() || path.as_os_str().len() > 100 {
                return Err(format!(
                    "`lifecycle.handover_socket` {} must be an absolute path of at most 100 bytes",
                    path.display()
                ));
            }
        }
        self.capture.validate().map_err(|e| format!("capture.{e}"))
    }

    /// The handover socket.
    pub fn handover_socket(&self) -> PathBuf {
        self.lifecycle.handover_socket.clone().unwrap_or_else(|| {
            PathBuf::from("/run/mesh-agent")
                .join(&self.node)
                .join("handover.sock")
        })
    }

    /// How long to drain.
    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lifecycle.drain_timeout_secs)
    }

    /// The directory for pins.
    pub fn bpf_dir(&self) -> PathBuf {
        self.bpf_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh").join(&self.node))
    }
}

impl CaptureExclusions {
    /// Rejects port 0, and inbound exclusions of the agent's ports (inbound to them is never
    /// passed: docs/capture.md); returns the field name with the problem.
    pub fn validate(&self) -> Result<(), String> {
        for (field, ports) in [
            ("exclude_outbound_ports", &self.exclude_outbound_ports),
            ("exclude_inbound_ports", &self.exclude_inbound_ports),
        ] {
            if ports.contains(&0) {
                return Err(format!("{field}: port 0 is not a valid port"));
            }
        }
        if let Some(port) = self
            .exclude_inbound_ports
            .iter()
            .find(|p| mesh_common::ports::RESERVED.contains(p))
        {
            return Err(format!(
                "exclude_inbound_ports: port {port} is one of the agent's ports ({:?}), which \
                 a captured pod never receives around the agent; it cannot be excluded",
                mesh_common::ports::RESERVED
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// The DaemonSet's configuration (deploy/) is one this agent loads.
    #[test]
    fn the_deployed_configurations_load() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        for file in ["base/agent.yaml", "overlays/istio-migration/agent.yaml"] {
            let text = std::fs::read_to_string(root.join(file)).expect("reading deploy/");
            let env = |name: &str| match name {
                "MESH_NODE_NAME" => Some("node-1".to_owned()),
                "MESH_HOST_IP" => Some("10.0.0.1".to_owned()),
                _ => None,
            };
            let text = super::expand(&text, env).unwrap_or_else(|e| panic!("{file}: {e}"));
            let config: super::Config =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
            config
                .validate()
                .unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
            assert_eq!(config.discovery, super::DiscoverySource::Kube, "{file}");
            assert_eq!(config.node, "node-1");
        }
    }

    #[test]
    fn variables_are_expanded_and_a_missing_one_is_named() {
        let env = |name: &str| match name {
            "MESH_NODE_NAME" => Some("node-7".to_owned()),
            "MESH_HOST_IP" => Some("10.0.0.7".to_owned()),
            _ => None,
        };
        assert_eq!(
            super::expand(
                "node: ${MESH_NODE_NAME}\naddr: ${MESH_HOST_IP}:15020 $x ${lower} $",
                env
            ),
            Ok("node: node-7\naddr: 10.0.0.7:15020 $x ${lower} $".to_owned())
        );
        assert_eq!(
            super::expand("node: ${MESH_NODE}", env),
            Err("${MESH_NODE} is used but the environment variable MESH_NODE is not set".into())
        );
    }

    use super::*;

    const ID: &str = "identity: {issuer_cert: /c.pem, issuer_key: /k.pem, trust_bundle: /r.pem}\n";

    fn parse(yaml: &str) -> Result<Config, String> {
        let yaml = if yaml.contains("identity") {
            yaml.to_owned()
        } else {
            format!("{yaml}{ID}")
        };
        let yaml = yaml.as_str();
        let c: Config = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_apply() {
        let c = parse(&format!("node: n1\nstate_file: /s.yaml\n{ID}")).expect("valid");
        assert_eq!(c.identity.trust_domain, "cluster.local");
        assert_eq!(c.identity.leaf_lifetime_secs, 86400);
        assert_eq!(c.metrics_addr, "127.0.0.1:15020".parse().expect("addr"));
        assert_eq!(c.readiness_addr, "127.0.0.1:15021".parse().expect("addr"));
        assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().expect("addr"));
        assert_eq!(c.bpf_dir(), PathBuf::from("/sys/fs/bpf/mesh/n1"));
        assert_eq!(c.state_poll_interval_ms, 500);
        assert_eq!(
            c.handover_socket(),
            PathBuf::from("/run/mesh-agent/n1/handover.sock")
        );
        assert_eq!(c.drain_timeout(), std::time::Duration::from_secs(300));
    }

    #[test]
    fn the_admin_endpoint_is_loopback_only() {
        let e = parse("node: n1\nstate_file: /s\nadmin_addr: 0.0.0.0:15000\n")
            .expect_err("all addresses");
        assert!(
            e.contains("`admin_addr` is 0.0.0.0:15000") && e.contains("loopback"),
            "{e}"
        );
        let e = parse("node: n1\nstate_file: /s\nadmin_addr: 10.0.0.7:15000\n")
            .expect_err("the node's address");
        assert!(e.contains("loopback"), "{e}");
        let e = parse("node: n1\nstate_file: /s\nadmin_addr: 127.0.0.1:15020\n")
            .expect_err("the metrics address");
        assert!(e.contains("its own"), "{e}");
        let c = parse("node: n1\nstate_file: /s\nadmin_addr: \"[::1]:15001\"\n").expect("::1");
        assert_eq!(c.admin_addr, "[::1]:15001".parse().expect("addr"));
    }

    #[test]
    fn bad_input_names_the_field() {
        let e = parse("node: n1\nstate_file: /s\nbogus: 1\n").expect_err("unknown field");
        assert!(e.starts_with("unknown field `bogus`"), "{e}");
        let e =
            parse("node: n1\nstate_file: /s\ncapture: {exclude_outbound_cidrs: [10.0.0.0/33]}\n")
                .expect_err("bad cidr");
        assert!(
            e.starts_with("capture.exclude_outbound_cidrs[0]: invalid IP address syntax"),
            "{e}"
        );
        let e = parse("node: n1\nstate_file: /s\ncapture: {exclude_inbound_ports: [0]}\n")
            .expect_err("port 0");
        assert!(e.contains("exclude_inbound_ports"), "{e}");
        let e = parse("node: ''\nstate_file: /s\n").expect_err("empty node");
        assert!(e.contains("`node` must not be empty"), "{e}");
        let e = parse("node: n1\nstate_file: /s\nidentity: {issuer_cert: /c, issuer_key: /k, trust_bundle: /r, leaf_lifetime_secs: 5}\n")
            .expect_err("short lifetime");
        assert!(e.contains("leaf_lifetime_secs"), "{e}");
        let e = parse("node: n1\nstate_file: /s\nhbone: {connections_per_peer: 0}\n")
            .expect_err("no connections");
        assert!(e.contains("hbone.connections_per_peer"), "{e}");
        let e = parse("node: n1\nstate_file: /s\nhbone: {server: {max_handshakes: 8, max_handshakes_per_peer: 9}}\n")
            .expect_err("per peer above total");
        assert!(
            e.contains("`hbone.server.max_handshakes_per_peer` is 9: use 1 to 8"),
            "{e}"
        );
        let e = parse("node: n1\nstate_file: /s\nhbone: {server: {ping_timeout_secs: 0}}\n")
            .expect_err("no ping timeout");
        assert!(e.contains("`hbone.server.ping_timeout_secs` is 0"), "{e}");
        let e = parse("node: n1\nstate_file: /s\nhbone: {server: {max_streams: 5}}\n")
            .expect_err("unknown server field");
        assert!(e.contains("unknown field `max_streams`"), "{e}");
        let e = parse("node: n1\nstate_file: /s\nlifecycle: {handover_socket: rel.sock}\n")
            .expect_err("relative socket");
        assert!(e.contains("lifecycle.handover_socket"), "{e}");
        let e = parse("node: n1\nstate_file: /s\nlifecycle: {drain_timeout_secs: 100000}\n")
            .expect_err("long drain");
        assert!(e.contains("lifecycle.drain_timeout_secs"), "{e}");
        let e = parse("node: n1\nstate_file: /s\nidentity: {issuer_cert: /c}\n")
            .expect_err("missing key");
        assert!(e.contains("issuer_key"), "{e}");
    }

    #[test]
    fn the_source_is_the_file_or_the_kubernetes_api() {
        let c = parse("node: n1\nstate_file: /s\n").expect("valid");
        assert_eq!(c.discovery, DiscoverySource::File);
        assert_eq!(c.kube, KubeConfig::default());
        let e = parse("node: n1\n").expect_err("no state file");
        assert!(
            e.contains("`state_file` is required with `discovery: file`"),
            "{e}"
        );
        let c = parse("node: n1\ndiscovery: kube\nkube: {accept_istio_ambient: true}\n")
            .expect("valid");
        assert_eq!(c.discovery, DiscoverySource::Kube);
        assert!(c.kube.accept_istio_ambient);
        assert_eq!(c.kube.enabled_label, "mesh-agent/enabled");
        assert_eq!(c.kube.enabled_value, "true");
        assert_eq!(c.kube.kubeconfig, None);
        let e = parse("node: n1\ndiscovery: kube\nkube: {enabled_label: ''}\n")
            .expect_err("empty label");
        assert!(e.contains("kube.enabled_label"), "{e}");
        let e = parse("node: n1\ndiscovery: kube\nkube: {label: x}\n").expect_err("unknown");
        assert!(e.contains("unknown field `label`"), "{e}");
        let e = parse("node: n1\ndiscovery: etcd\n").expect_err("unknown source");
        assert!(e.contains("unknown variant `etcd`"), "{e}");
    }

    #[test]
    fn inbound_exclusions_cannot_name_the_agents_ports() {
        for port in mesh_common::ports::RESERVED {
            let e = parse(&format!(
                "node: n1\nstate_file: /s\ncapture: {{exclude_inbound_ports: [80, {port}]}}\n"
            ))
            .expect_err("a reserved port");
            assert!(
                e.contains(&format!(
                    "exclude_inbound_ports: port {port} is one of the agent's ports"
                )),
                "{e}"
            );
        }
        // Outbound, they are ordinary destination ports.
        parse("node: n1\nstate_file: /s\ncapture: {exclude_outbound_ports: [15008]}\n")
            .expect("outbound exclusion of 15008");
    }
}
