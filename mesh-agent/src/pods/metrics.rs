//! Capture's families, counted by the pod lifecycle manager: pods captured, closed and failed,
//! and what capture did to pods.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// `change` label of `mesh_capture_pod_changes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub change: &'static str,
}

/// Labels naming one pod.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub workload: String,
}

/// Capture's families.
#[derive(Debug, Default)]
pub struct Families {
    pub captured_pods: Gauge,
    pub capture_failures: Family<PodLabels, Counter>,
    /// Pods whose return path could not be installed (delivered from their own address).
    pub return_path_failures: Counter,
    /// Pods whose capture is in place but that no listener serves (refused until served).
    pub closed_pods: Gauge,
    /// What capture did to pods: captured, adopted, reattached, closed, released.
    pub capture_changes: Family<ChangeLabels, Counter>,
}

impl Families {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_captured_pods",
            "Pods of this node currently captured",
            self.captured_pods.clone(),
        );
        registry.register(
            "mesh_pod_capture_failures",
            "Failed attempts to capture a pod",
            self.capture_failures.clone(),
        );
        registry.register(
            "mesh_return_path_failures",
            "Pods served without their return path: connections reach the application from \
             the pod's own address instead of the client's",
            self.return_path_failures.clone(),
        );
        registry.register(
            "mesh_closed_pods",
            "Pods of this node whose capture is in place but that no listener serves: their \
             connections are refused until they are served",
            self.closed_pods.clone(),
        );
        registry.register(
            "mesh_capture_pod_changes",
            "What capture did to pods: captured (new), adopted (pinned by an earlier agent), \
             reattached (adopted, some links attached again), closed (captured without being \
             served), released",
            self.capture_changes.clone(),
        );
    }
}
