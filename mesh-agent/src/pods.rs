//! The pod lifecycle manager: owns each pod of this node from capture to release. It decides
//! which pods are captured (the state's pods of this node in enabled namespaces), captures them
//! (`capture`: listeners, map entries, pinned links), gives them their identity and TLS
//! (`identity`), serves them (`proxy`: the accept loops), applies in place what changes about a
//! pod (addresses, exclusions, service account and so identity), and releases them without
//! breaking the connections already established through the agent. It adopts what an earlier
//! agent pinned, takes over the listeners a running agent hands over, and closes (connections
//! refused, never passed) a pod it cannot serve.

pub mod cni;
pub mod inspect;
pub mod metrics;
pub mod sandbox;
mod served;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use self::{sandbox::Sandboxes, served::ServedPod};
use crate::{
    admin::Readiness,
    capture::{
        self, ebpf,
        listeners::{Listeners, Opened},
        pins::{self, PinnedPod},
        pod::{Env, Outcome},
    },
    metrics::{ChangeLabels, PodLabels},
    proxy,
    state::{Store, Workload},
};

/// Why a pod could not be served. Messages name the pod and what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Capture(#[from] capture::Error),
    #[error("pod {pod}: no workload certificate: {source}")]
    Identity {
        pod: String,
        source: crate::identity::Error,
    },
    #[error("pod {pod}: TLS configuration: {message}")]
    Tls { pod: String, message: String },
}

/// The pods of this node, each from capture to release: captured, served, updated in place and
/// released as the state says.
#[derive(Debug)]
pub struct Manager {
    loaded: ebpf::Loaded,
    layout: pins::Layout,
    node: String,
    cgroup_root: PathBuf,
    agent_cgroup: PathBuf,
    inputs: Arc<proxy::Inputs>,
    /// Served pods, by `namespace/name`.
    pods: BTreeMap<String, ServedPod>,
    /// Pods whose capture is pinned but that no listener serves: pinned by an earlier agent
    /// and not adopted yet, or closed because they could not be served. Their connections are
    /// refused until they are served; released when they leave the state.
    pinned: Vec<PinnedPod>,
    /// Listeners handed over by the agent this one took over from, by netns cookie, until the
    /// pod they serve is captured.
    received: HashMap<u64, Opened>,
    /// The exclusion scope of each netns cookie in `MESH_PODS`.
    scopes: HashMap<u64, u32>,
    next_scope: u32,
    /// The first reconcile reports what this agent found pinned.
    first: bool,
    /// The sandboxes of pods the state names by UID.
    sandboxes: Sandboxes,
    /// CNI requests waiting for their pod to be captured.
    pending: Vec<cni::Pending>,
    /// Where the meshed namespaces are written for the CNI plugin (`pods.cni_socket`'s
    /// directory), and what was written last.
    cni_dir: Option<PathBuf>,
    meshed_written: Option<Vec<String>>,
    /// Pods whose sandbox has not started, as logged.
    not_started: std::collections::BTreeSet<String>,
    /// This node's pods as the API has them (the Kubernetes source), for CNI ADDs of pods the
    /// state does not have yet.
    node_pods: Option<Arc<dyn cni::NodePods>>,
    /// Pods the CNI plugin added that the state does not have yet, with the plugin's
    /// addresses (until the state has them).
    cni_workloads: BTreeMap<String, Arc<Workload>>,
}

/// What a reconcile did, for the log line of the first one (an agent taking over pinned state)
/// and for the metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub captured: usize,
    pub adopted: usize,
    pub reattached: usize,
    pub closed: usize,
    pub released: usize,
    /// Pods that could not be served, with why.
    pub failed: BTreeMap<String, String>,
    /// Pods named by UID whose sandbox has no process yet (looked for again at every retry).
    pub not_started: Vec<String>,
}

/// What the manager knows of its node.
#[derive(Debug)]
pub struct NodeSetup {
    /// The node's name: the state's pods of this node are captured.
    pub name: String,
    /// The cgroup v2 mount.
    pub cgroup_root: PathBuf,
    /// Where the sandboxes of pods named by UID are found.
    pub sandboxes: Sandboxes,
    /// The CNI socket's directory (the meshed namespaces are written there), if the CNI
    /// plugin is used.
    pub cni_dir: Option<PathBuf>,
}

/// The pod listeners of a running agent, for the agent that takes over.
#[derive(Debug)]
pub struct HandoverPod {
    pub key: String,
    pub listeners: Listeners,
}

/// Requests to the capture task from the agent's lifecycle (handover, uninstall).
#[derive(Debug)]
pub enum Command {
    /// Stop changing capture (a successor is taking over) and report every served pod's
    /// listeners.
    Freeze(oneshot::Sender<Vec<HandoverPod>>),
    /// The successor gave up: keep capture in line with the state again.
    Thaw,
    /// The successor took over: stop accepting at once and end, leaving capture in place.
    Relinquish(oneshot::Sender<()>),
    /// Release every pod and remove every pin (an orderly uninstall), then end.
    Uninstall(oneshot::Sender<Changes>),
    /// A request of the CNI plugin: answered once the pod is captured (ADD), released (DEL)
    /// or checked (CHECK).
    Cni(crate::cni::Request, oneshot::Sender<crate::cni::Reply>),
    /// The capture state, for the admin endpoint (not answered while frozen for a handover).
    Inspect(oneshot::Sender<inspect::CaptureView>),
}

impl Manager {
    /// A manager of the pods captured with `loaded`, with the control maps and pins an earlier agent left (adopted
    /// or released by the first [`Manager::reconcile`]) and the listeners a running agent
    /// handed over (`received`).
    pub fn new(
        loaded: ebpf::Loaded,
        layout: pins::Layout,
        inputs: Arc<proxy::Inputs>,
        received: Vec<Opened>,
        node: NodeSetup,
    ) -> Result<Self, capture::Error> {
        let pinned = layout.list()?;
        let inventory = loaded.inventory();
        let scopes: HashMap<u64, u32> = inventory
            .pods
            .iter()
            .map(|(cookie, config)| (*cookie, config.scope))
            .collect();
        let next_scope = scopes
            .values()
            .max()
            .map_or(1, |s| s.wrapping_add(1).max(1));
        let NodeSetup {
            name: node,
            cgroup_root,
            sandboxes,
            cni_dir,
        } = node;
        let agent_cgroup = capture::own_cgroup(&cgroup_root);
        Ok(Self {
            loaded,
            layout,
            node,
            cgroup_root,
            agent_cgroup,
            inputs,
            pods: BTreeMap::new(),
            pinned,
            received: received.into_iter().map(|o| (o.netns_cookie, o)).collect(),
            scopes,
            next_scope,
            first: true,
            sandboxes,
            pending: Vec::new(),
            cni_dir,
            meshed_written: None,
            not_started: Default::default(),
            node_pods: None,
            cni_workloads: BTreeMap::new(),
        })
    }

    /// Gives the manager this node's pods as the API has them (the Kubernetes source), so that
    /// a CNI ADD is served before the pod's address reaches the API.
    pub fn set_node_pods(&mut self, node_pods: Arc<dyn cni::NodePods>) {
        self.node_pods = Some(node_pods);
    }

    /// Captures, adopts, updates and releases pods to match the current state.
    pub fn reconcile(&mut self) -> Changes {
        let snap = self.inputs.store.load();
        self.write_meshed(&snap);
        let mut changes = Changes::default();
        let desired = self.resolve(&snap, &mut changes);
        drop(snap);
        // Served pods that left the state, or whose sandbox is another one now.
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, pod)| desired.get(*key).is_none_or(|w| !pod.same_sandbox(w)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(pod) = self.pods.remove(&key) {
                self.scopes.remove(&pod.netns_cookie());
                pod.release(&mut self.loaded, &self.inputs.metrics);
                info!(pod = %key, "pod released");
                changes.released += 1;
            }
        }
        // Pinned pods that are not (or no longer) a desired pod's sandbox.
        let mut cookies: HashMap<String, Option<u64>> = HashMap::new();
        let mut keep = Vec::new();
        let mut released_pinned = false;
        for p in std::mem::take(&mut self.pinned) {
            let wanted = desired.get(&p.key).is_some_and(|w| {
                !self.pods.contains_key(&p.key)
                    && self.cookie_of(&mut cookies, w) == Some(p.netns_cookie)
            });
            if wanted {
                keep.push(p);
                continue;
            }
            match pins::release(&p.dir) {
                Ok(()) => {
                    info!(pod = %p.key, netns_cookie = p.netns_cookie, "pinned pod released (no longer in the state)");
                    self.scopes.remove(&p.netns_cookie);
                    changes.released += 1;
                    released_pinned = true;
                }
                Err(e) => {
                    error!(pod = %p.key, error = %e, "releasing a pinned pod failed; will retry");
                    keep.push(p);
                }
            }
        }
        self.pinned = keep;
        for (key, workload) in &desired {
            if let Some(pod) = self.pods.get_mut(key) {
                if let Err(e) = pod.update(&mut self.loaded, workload, &self.inputs) {
                    error!(pod = %key, error = %e, "updating the pod in place failed; will retry");
                    changes.failed.insert(key.clone(), e.to_string());
                }
                continue;
            }
            self.capture_one(key, workload, &mut cookies, &mut changes);
        }
        // Listeners handed over for pods that are gone: the giver stops accepting on them.
        self.received.clear();
        if self.first || released_pinned {
            self.sweep(&desired);
        }
        self.count(&changes);
        if std::mem::take(&mut self.first) {
            info!(
                captured = changes.captured,
                adopted = changes.adopted,
                reattached = changes.reattached,
                closed = changes.closed,
                released = changes.released,
                failed = changes.failed.len(),
                "capture reconciled with what was pinned"
            );
        }
        self.publish_local();
        // Certificates are kept only for identities of pods still captured here.
        let keep = self.pods.values().map(|p| p.identity().clone()).collect();
        self.inputs.certs.retain(&keep);
        self.answer_pending(&changes);
        changes
    }

    fn capture_one(
        &mut self,
        key: &str,
        workload: &Arc<Workload>,
        cookies: &mut HashMap<String, Option<u64>>,
        changes: &mut Changes,
    ) {
        let received = if self.received.is_empty() {
            None
        } else {
            self.cookie_of(cookies, workload)
                .and_then(|c| self.received.remove(&c))
        };
        let env = Env {
            layout: &self.layout,
            cgroup_root: &self.cgroup_root,
            agent_cgroup: &self.agent_cgroup,
            home: &self.inputs.home,
        };
        let (scopes, next) = (&mut self.scopes, &mut self.next_scope);
        let mut scope = |cookie: u64| {
            *scopes.entry(cookie).or_insert_with(|| {
                let s = *next;
                *next = next.wrapping_add(1).max(1);
                s
            })
        };
        match ServedPod::capture(
            &mut self.loaded,
            &env,
            &self.inputs,
            workload.clone(),
            received,
            &mut scope,
        ) {
            Ok((pod, outcome)) => {
                let cookie = pod.netns_cookie();
                let how = match outcome {
                    Outcome::Captured => {
                        changes.captured += 1;
                        "pod captured"
                    }
                    Outcome::Adopted => {
                        changes.adopted += 1;
                        "pod adopted"
                    }
                    Outcome::Reattached => {
                        changes.reattached += 1;
                        "pod adopted, links attached again"
                    }
                };
                info!(pod = %key, ips = ?workload.ips, netns_cookie = cookie, scope = pod.scope(), "{how}");
                self.pinned.retain(|p| p.netns_cookie != cookie);
                self.pods.insert(key.to_owned(), pod);
            }
            Err(e) => {
                error!(pod = %key, error = %e, "pod capture failed; will retry");
                self.inputs
                    .metrics
                    .capture
                    .capture_failures
                    .get_or_create(&PodLabels {
                        namespace: workload.namespace.clone(),
                        workload: workload.name.clone(),
                    })
                    .inc();
                changes.failed.insert(key.to_owned(), e.to_string());
                // Refused rather than passed until it can be served.
                match capture::pod::close(&mut self.loaded, &env, workload, &mut scope) {
                    Ok(p) => {
                        if !self.pinned.iter().any(|q| q.netns_cookie == p.netns_cookie) {
                            warn!(pod = %key, "pod closed: its connections are refused until it can be served");
                            changes.closed += 1;
                            self.pinned.push(p);
                        }
                    }
                    Err(e) => {
                        error!(pod = %key, error = %e, "the pod can neither be served nor closed")
                    }
                }
            }
        }
    }

    /// The netns cookie of a workload's sandbox (cached per reconcile); `None` when its
    /// network namespace cannot be opened (the pod is gone).
    fn cookie_of(&self, cache: &mut HashMap<String, Option<u64>>, w: &Workload) -> Option<u64> {
        *cache.entry(w.key()).or_insert_with(|| {
            let netns = crate::sys::Netns::open(&w.netns).ok()?;
            crate::sys::netns_cookie_of(&netns, &self.inputs.home).ok()
        })
    }

    /// Removes map entries no live pod owns (left by an earlier agent or a released pin).
    fn sweep(&mut self, desired: &BTreeMap<String, Arc<Workload>>) {
        let mut live = ebpf::Live::default();
        let mut add = |cookie: u64, scope: u32, ips: &[IpAddr]| {
            live.cookies.insert(cookie);
            live.scopes.insert(scope);
            for ip in ips {
                live.addrs.insert(capture::mapped_words(*ip), scope);
            }
        };
        for pod in self.pods.values() {
            add(pod.netns_cookie(), pod.scope(), &pod.workload().ips);
        }
        for p in &self.pinned {
            if let Some(scope) = self.scopes.get(&p.netns_cookie) {
                let ips = desired
                    .get(&p.key)
                    .map(|w| w.ips.clone())
                    .unwrap_or_default();
                add(p.netns_cookie, *scope, &ips);
            }
        }
        match self.loaded.sweep(&live) {
            Ok(swept) if swept != ebpf::Swept::default() => {
                info!(?swept, "removed map entries that belong to no captured pod")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "sweeping stale map entries failed"),
        }
        self.scopes
            .retain(|cookie, _| live.cookies.contains(cookie));
    }

    fn count(&self, c: &Changes) {
        let m = &self.inputs.metrics;
        for (change, n) in [
            ("captured", c.captured),
            ("adopted", c.adopted),
            ("reattached", c.reattached),
            ("closed", c.closed),
            ("released", c.released),
        ] {
            if n > 0 {
                m.capture
                    .capture_changes
                    .get_or_create(&ChangeLabels { change })
                    .inc_by(n as u64);
            }
        }
        m.capture
            .captured_pods
            .set(i64::try_from(self.pods.len()).unwrap_or(i64::MAX));
        m.capture
            .closed_pods
            .set(i64::try_from(self.pinned.len()).unwrap_or(i64::MAX));
    }

    /// What a successor needs to take over: every served pod's listeners.
    pub fn handover(&self) -> Vec<HandoverPod> {
        self.pods
            .iter()
            .map(|(key, pod)| HandoverPod {
                key: key.clone(),
                listeners: pod.listeners().clone(),
            })
            .collect()
    }

    /// Stops serving every pod (a successor serves them now); capture stays in place.
    pub fn relinquish(mut self) {
        for (_, pod) in std::mem::take(&mut self.pods) {
            pod.relinquish();
        }
    }

    /// Releases every pod and removes every pin of this ABI version (an orderly uninstall).
    pub fn uninstall(mut self) -> Changes {
        let mut changes = Changes::default();
        for (key, pod) in std::mem::take(&mut self.pods) {
            pod.release(&mut self.loaded, &self.inputs.metrics);
            info!(pod = %key, "pod released (uninstall)");
            changes.released += 1;
        }
        for p in std::mem::take(&mut self.pinned) {
            match pins::release(&p.dir) {
                Ok(()) => {
                    info!(pod = %p.key, "pinned pod released (uninstall)");
                    changes.released += 1;
                }
                Err(e) => {
                    error!(pod = %p.key, error = %e, "uninstall: releasing a pinned pod failed");
                    changes.failed.insert(p.key, e.to_string());
                }
            }
        }
        if let Err(e) = self.loaded.sweep(&ebpf::Live::default()) {
            warn!(error = %e, "uninstall: clearing the maps failed");
        }
        self.publish_local();
        match std::fs::remove_dir_all(&self.layout.abi_dir) {
            Ok(()) => info!(dir = %self.layout.abi_dir.display(), "uninstall: pins removed"),
            Err(e) => {
                error!(dir = %self.layout.abi_dir.display(), error = %e, "uninstall: removing the pins failed");
                changes
                    .failed
                    .insert(self.layout.abi_dir.display().to_string(), e.to_string());
            }
        }
        changes
    }

    /// Tells the proxy which pods are captured here, by address (same-node delivery).
    fn publish_local(&self) {
        let local = self
            .pods
            .values()
            .flat_map(|p| {
                p.workload()
                    .ips
                    .iter()
                    .map(move |ip| (*ip, p.proxy().clone()))
            })
            .collect();
        self.inputs.local.store(Arc::new(local));
    }
}

/// Keeps the pods of this node in line with the state, and answers the agent lifecycle's
/// commands. Readiness turns
/// true after a reconcile that serves every pod; failed pods are retried every `retry`.
pub async fn run(
    mut capture: Manager,
    store: Arc<Store>,
    readiness: Arc<Readiness>,
    retry: Duration,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut changes = store.subscribe();
    'reconcile: loop {
        let Changes {
            failed,
            not_started,
            ..
        } = capture.reconcile();
        if failed.is_empty() {
            readiness.set(None);
        } else {
            let why = failed
                .iter()
                .map(|(k, e)| format!("{k}: {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            readiness.set(Some(format!("pods not served: {why}")));
        }
        // Failed pods are retried; CNI requests waiting for their pod are answered by their
        // deadline.
        let pending = cni::Pending::deadline(&capture.pending);
        let mut wait_retry = std::pin::pin!(async {
            match (failed.is_empty() && not_started.is_empty(), pending) {
                (true, None) => std::future::pending::<()>().await,
                // A pending ADD's pod may reach the node pods meanwhile: looked for again.
                (true, Some(at)) => {
                    tokio::time::sleep_until(at.min(std::time::Instant::now() + retry).into()).await
                }
                (false, _) => tokio::time::sleep(retry).await,
            }
        });
        // An inspection changes nothing: answered without a reconcile, waiting on.
        let command = loop {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break 'reconcile } else { continue 'reconcile },
                () = &mut wait_retry => continue 'reconcile,
                command = commands.recv() => match command {
                    // Not for an asker that gave up waiting.
                    Some(Command::Inspect(reply)) if reply.is_closed() => {}
                    Some(Command::Inspect(reply)) => {
                        let _ = reply.send(capture.inspect(&failed, &not_started));
                    }
                    other => break other,
                },
            }
        };
        match command {
            None => break,
            Some(Command::Thaw) => {}
            Some(Command::Cni(request, reply)) => capture.cni(request, reply),
            // Answered in the loop above; never here.
            Some(Command::Inspect(reply)) => {
                let _ = reply.send(capture.inspect(&failed, &not_started));
            }
            Some(Command::Freeze(reply)) => {
                let _ = reply.send(capture.handover());
                info!("capture frozen: a successor is taking over");
                match frozen(&mut commands).await {
                    Some(Command::Relinquish(reply)) => {
                        capture.relinquish();
                        info!("listeners handed over: this agent no longer accepts connections");
                        let _ = reply.send(());
                        return;
                    }
                    Some(Command::Uninstall(reply)) => {
                        let _ = reply.send(capture.uninstall());
                        return;
                    }
                    _ => info!("handover abandoned: capture follows the state again"),
                }
            }
            Some(Command::Relinquish(reply)) => {
                capture.relinquish();
                let _ = reply.send(());
                return;
            }
            Some(Command::Uninstall(reply)) => {
                let _ = reply.send(capture.uninstall());
                return;
            }
        }
    }
}

/// Waits, changing nothing, for the end of a handover.
async fn frozen(commands: &mut mpsc::Receiver<Command>) -> Option<Command> {
    loop {
        match commands.recv().await {
            Some(Command::Freeze(reply)) => {
                // Only one successor at a time; a second one gets nothing.
                drop(reply);
            }
            Some(Command::Inspect(reply)) => {
                // The admin endpoint says capture is handing over.
                drop(reply);
            }
            Some(Command::Cni(request, reply)) => {
                // Capture is frozen: the successor answers (the runtime tries again).
                let _ = reply.send(crate::cni::Reply::Failed(format!(
                    "the agent of this node is handing over to its successor: try pod {} again",
                    request.key()
                )));
            }
            other => return other,
        }
    }
}
