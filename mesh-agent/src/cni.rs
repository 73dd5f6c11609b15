//! The chained CNI plugin (`mesh-agent cni`, CNI spec 1.0) and the agent's side of it.
//!
//! A container runtime runs the plugin after the primary CNI plugin has set up a pod's network
//! (ADD), when it tears it down (DEL), and to verify it (CHECK). The plugin asks the node agent
//! over a Unix socket (`pods.cni_socket`) and answers the runtime only once the agent has
//! answered: ADD returns after the pod is captured (programs attached, listeners open), so no
//! container of the pod can open a socket before its capture. The primary plugin's result
//! (`prevResult`) is passed through unchanged.
//!
//! With the agent unreachable, ADD fails for pods of meshed namespaces (the kubelet retries)
//! and succeeds untouched for all others, as the `meshed-namespaces` file the agent keeps next
//! to its socket says; without that file (no agent has run since boot) it fails for every pod
//! outside `exclude_namespaces`. Fail closed: a pod of a meshed namespace never starts
//! uncaptured.

pub mod install;
pub mod plugin;
pub mod server;

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The file, next to the agent's CNI socket, listing the meshed namespaces one per line.
pub const MESHED_NAMESPACES: &str = "meshed-namespaces";

/// The name of the plugin (its `type` in a conflist, and its binary in the CNI bin dir).
pub const PLUGIN_TYPE: &str = "mesh-agent-cni";

/// The default socket, as the DaemonSet mounts it.
pub const DEFAULT_SOCKET: &str = "/run/mesh-agent/cni.sock";

/// The largest request or reply line.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What the plugin asks the agent: one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub command: Verb,
    /// The pod (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`).
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: Option<String>,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (may be empty on DEL).
    #[serde(default)]
    pub netns: PathBuf,
    /// The pod's addresses from the primary plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl Request {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The CNI operations the agent takes part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Add,
    Del,
    Check,
}

/// The agent's answer: one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// ADD, CHECK: the pod is captured and served.
    Captured,
    /// The pod is not of the mesh (its namespace is not meshed, it opted out, or it is not
    /// a pod of this node): nothing to do.
    NotMeshed,
    /// DEL: the pod's capture is released (or there was none).
    Released,
    /// The pod should be captured and is not: why.
    Failed(String),
}
