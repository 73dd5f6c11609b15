//! The manager's side of the CNI plugin and of pods named by UID: finding each pod's sandbox
//! before a reconcile, answering the plugin's requests once they are done, and keeping the
//! list of meshed namespaces the plugin reads when the agent does not answer.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{
    sandbox::{CniSandbox, Unresolved},
    Changes, Manager,
};
use crate::{
    cni::{Reply, Request, Verb, MESHED_NAMESPACES},
    metrics::PodLabels,
    state::{Snapshot, Workload},
};

/// How long an ADD may wait for its pod to be captured: the pod may not be in the state yet
/// (the API's view lags the runtime), or its capture may be retried meanwhile.
const ADD_DEADLINE: Duration = Duration::from_secs(25);

/// An ADD waiting for its pod.
#[derive(Debug)]
pub(super) struct Pending {
    key: String,
    netns: PathBuf,
    ips: Vec<IpAddr>,
    reply: oneshot::Sender<Reply>,
    deadline: Instant,
}

/// The pods of this node as the API has them, whole (`discovery::kube`'s node pod reflector):
/// a pod whose sandbox the CNI plugin is adding has no address in the API yet, so it is not a
/// workload of the state until its ADD has returned. The manager captures it meanwhile from
/// this, with the addresses of the primary plugin's result.
pub trait NodePods: Send + Sync + std::fmt::Debug {
    /// What pod `namespace/name` of this node is to the mesh once it has `ips`.
    fn with_addresses(&self, namespace: &str, name: &str, ips: &[IpAddr]) -> NodePod;
}

/// What a pod of this node is to the mesh ([`NodePods::with_addresses`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePod {
    /// A workload of the mesh (its namespace meshed or not: the state decides that).
    Workload(Box<Workload>),
    /// Never captured (host network, opted out, finished).
    NotMeshed,
    /// Not known (yet) to this node.
    Unknown,
}

impl Pending {
    /// Whether any is waiting (the manager then wakes up to answer it by its deadline).
    pub(super) fn deadline(pending: &[Pending]) -> Option<Instant> {
        pending.iter().map(|p| p.deadline).min()
    }
}

impl Manager {
    /// The pods of this node to serve, with their sandboxes: a pod named by UID gets its
    /// cgroup and network namespace here. One whose sandbox cannot be found is a failure (a
    /// log line, the capture failure metric, readiness) unless it is served already (it keeps
    /// its sandbox) or the CNI plugin reported it deleted (it is not running).
    pub(super) fn resolve(
        &mut self,
        snap: &Snapshot,
        changes: &mut Changes,
    ) -> BTreeMap<String, Arc<Workload>> {
        let mut desired = BTreeMap::new();
        let mut on_node: Vec<Arc<Workload>> = snap.captured_on(&self.node).cloned().collect();
        // Pods the CNI plugin is adding that the state does not have yet (no address in the
        // API before their ADD returns), while their namespace is meshed.
        self.cni_workloads.retain(|key, w| {
            snap.namespace_enabled(&w.namespace) && !snap.workloads.contains_key(key.as_str())
        });
        on_node.extend(self.cni_workloads.values().cloned());
        let keep = on_node.iter().map(|w| w.key()).collect();
        self.sandboxes.retain(&keep);
        for w in on_node {
            let key = w.key();
            match self.sandboxes.resolve(&w) {
                Ok(effective) => {
                    desired.insert(key, effective);
                }
                Err(Unresolved::NotRunning) => {}
                Err(Unresolved::NotStarted) => {
                    if self.not_started.insert(key.clone()) {
                        info!(pod = %key, "pod has no running sandbox yet: captured by the CNI plugin's ADD, or found at a retry once a process runs in it");
                    }
                    changes.not_started.push(key);
                }
                Err(Unresolved::Missing(why)) => {
                    if let Some(served) = self.pods.get(&key) {
                        desired.insert(key, served.workload().clone());
                        continue;
                    }
                    error!(pod = %key, error = %why, "pod sandbox not found; will retry");
                    self.inputs
                        .metrics
                        .capture
                        .capture_failures
                        .get_or_create(&PodLabels {
                            namespace: w.namespace.clone(),
                            workload: w.name.clone(),
                        })
                        .inc();
                    changes.failed.insert(key, why);
                }
            }
        }
        self.not_started.retain(|k| changes.not_started.contains(k));
        desired
    }

    /// Answers a CNI request (or keeps an ADD until its pod is served).
    pub fn cni(&mut self, request: Request, reply: oneshot::Sender<Reply>) {
        let key = request.key();
        let snap = self.inputs.store.load();
        let meshed = snap.namespace_enabled(&request.namespace)
            && snap
                .workloads
                .get(key.as_str())
                .is_none_or(|w| w.node == self.node && !w.is_waypoint());
        drop(snap);
        match request.command {
            Verb::Add
                if !meshed
                    || self.look_up_node_pod(&key, &request.ips) == Some(NodePod::NotMeshed) =>
            {
                let _ = reply.send(Reply::NotMeshed);
            }
            Verb::Add => {
                self.sandboxes.cni_add(CniSandbox {
                    key: key.clone(),
                    uid: request.uid.clone(),
                    netns: request.netns.clone(),
                    container_id: request.container_id.clone(),
                });
                self.pending.push(Pending {
                    key,
                    netns: request.netns,
                    ips: request.ips,
                    reply,
                    deadline: Instant::now() + ADD_DEADLINE,
                });
                self.reconcile();
            }
            Verb::Del => {
                self.cni_workloads.remove(&key);
                if self.sandboxes.cni_del(&key, &request.container_id) {
                    self.reconcile();
                }
                let _ = reply.send(Reply::Released);
            }
            Verb::Check => {
                let answer = if !meshed {
                    Reply::NotMeshed
                } else if self.pods.contains_key(&key) {
                    Reply::Captured
                } else {
                    Reply::Failed(format!("pod {key} is not captured by this node's agent"))
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Answers the ADDs whose pod is served now, and fails those past their deadline with
    /// what stands in the way.
    pub(super) fn answer_pending(&mut self, changes: &Changes) {
        let now = Instant::now();
        // An ADD whose pod the node pods did not know yet: looked up again (captured at the
        // next reconcile, which the manager's retry brings).
        let unknown: Vec<(String, Vec<IpAddr>)> = self
            .pending
            .iter()
            .filter(|p| !self.pods.contains_key(&p.key) && !self.cni_workloads.contains_key(&p.key))
            .map(|p| (p.key.clone(), p.ips.clone()))
            .collect();
        for (key, ips) in unknown {
            self.look_up_node_pod(&key, &ips);
        }
        for p in std::mem::take(&mut self.pending) {
            let served = self.pods.get(&p.key).is_some_and(|s| {
                s.workload().netns == p.netns
                    || s.workload().netns.file_name() == p.netns.file_name()
            });
            if served {
                let _ = p.reply.send(Reply::Captured);
            } else if now >= p.deadline || p.reply.is_closed() {
                let why = changes.failed.get(&p.key).cloned().unwrap_or_else(|| {
                    format!(
                        "pod {} is not in the mesh state of node {} (is the agent's view of the \
                         API behind, or is the pod not scheduled here?)",
                        p.key, self.node
                    )
                });
                warn!(pod = %p.key, error = %why, "CNI ADD failed: the pod was not captured in time");
                let _ = p.reply.send(Reply::Failed(why));
            } else {
                self.pending.push(p);
            }
        }
    }

    /// Looks pod `key` up in the node pods (when the source has them) if the state does not
    /// have it, keeping it as a workload to capture with `ips`; `None` without node pods or
    /// when the state has the pod.
    fn look_up_node_pod(&mut self, key: &str, ips: &[IpAddr]) -> Option<NodePod> {
        let node_pods = self.node_pods.clone()?;
        if self.inputs.store.load().workloads.contains_key(key) {
            return None;
        }
        let (namespace, name) = key.split_once('/')?;
        let found = node_pods.with_addresses(namespace, name, ips);
        match &found {
            // A waypoint's pod speaks HBONE itself: never captured.
            NodePod::Workload(w) if w.is_waypoint() => return Some(NodePod::NotMeshed),
            NodePod::Workload(w) if w.node == self.node => {
                self.cni_workloads
                    .insert(key.to_owned(), Arc::new((**w).clone()));
            }
            NodePod::Workload(_) => return Some(NodePod::NotMeshed),
            NodePod::NotMeshed | NodePod::Unknown => {}
        }
        Some(found)
    }

    /// Writes the meshed namespaces (one per line) beside the CNI socket when they changed.
    pub(super) fn write_meshed(&mut self, snap: &Snapshot) {
        let Some(dir) = &self.cni_dir else { return };
        let mut meshed: Vec<String> = snap
            .namespaces
            .iter()
            .filter(|(_, enabled)| **enabled)
            .map(|(name, _)| name.clone())
            .collect();
        meshed.sort();
        if self.meshed_written.as_ref() == Some(&meshed) {
            return;
        }
        let path = dir.join(MESHED_NAMESPACES);
        let tmp = dir.join(format!(".{MESHED_NAMESPACES}.tmp"));
        let text: String = meshed.iter().map(|n| format!("{n}\n")).collect();
        match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            Ok(()) => {
                info!(path = %path.display(), namespaces = meshed.len(), "meshed namespaces written for the CNI plugin");
                self.meshed_written = Some(meshed);
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, "writing the meshed namespaces for the CNI plugin failed; will retry")
            }
        }
    }
}
