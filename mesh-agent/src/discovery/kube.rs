//! The Kubernetes source: the mesh state from the API server (docs/kubernetes.md, "Discovery
//! from the Kubernetes API").
//!
//! `convert` is the one place where Kubernetes objects become state objects (`TryFrom`, errors
//! naming the object and the field); `watch` runs one kube-rs watcher per kind and turns each
//! event into an incremental [`crate::state::Changes`]. Invalid policies go through the rules
//! every source shares (`discovery::policies`). `routes`: a waypoint's HTTPRoutes and their
//! status.

mod applier;
pub mod convert;
pub mod routes;
#[cfg(test)]
mod tests;
pub mod watch;

use std::fmt;

pub use convert::{PodState, PolicyObject, Rules, ServiceDef, Skip, SliceDef};
pub use routes::{run_routes, Waypoint};
pub use watch::{client, run, run_mesh, NodePodsStore, Running, Synced};

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An object that cannot become part of the state: skipped, the rest goes on.
    #[error("{object}: {field}: {message}")]
    Invalid {
        object: ObjectName,
        /// The field path in the object (`status.podIPs[1].ip`).
        field: String,
        message: String,
    },
    #[error(
        "cannot configure the Kubernetes client: {0}; in a pod, check the service account \
         token mount and KUBERNETES_SERVICE_HOST; elsewhere, set kube.kubeconfig"
    )]
    Client(String),
}

/// An object's name in errors and logs: `Pod shop/api-1`, `Namespace shop`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub kind: &'static str,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

impl ObjectName {
    /// `namespace/name` (the name alone when cluster-scoped): how the state keys the object.
    pub fn key(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key())
    }
}
