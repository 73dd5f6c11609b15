//! Capture: the eBPF programs attached per pod (cgroup + network namespace) and the agent's
//! in-pod listeners. The reconciler makes the set of captured pods follow the state: pods of
//! this node in enabled namespaces are captured; others are released without breaking the
//! connections already established through the agent.

pub mod ebpf;
mod pod;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tracing::{error, info, warn};

use crate::{admin::Readiness, metrics::PodLabels, proxy, state::Store};

/// Errors of capture. Messages name the pod and what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed: {0}")]
    Load(String),
    #[error("the eBPF object has no program {0}: was it built from this version (cargo xtask build-ebpf)?")]
    MissingProgram(&'static str),
    #[error(
        "the eBPF object has no map {0}: was it built from this version (cargo xtask build-ebpf)?"
    )]
    MissingMap(&'static str),
    #[error("the kernel rejected program {program}:\n{message}")]
    Verifier {
        program: &'static str,
        message: String,
    },
    #[error("cannot pin at {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("pod {pod}: cannot open its network namespace {path}: {source}")]
    Netns {
        pod: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {pod}: cannot open its cgroup {path}: {source} (is it a cgroup v2 directory?)")]
    Cgroup {
        pod: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {pod}: its cgroup {path} is not under the cgroup v2 mount {root}")]
    CgroupOutside {
        pod: String,
        path: PathBuf,
        root: PathBuf,
    },
    #[error("pod {pod}: cannot open the in-pod listener {addr}: {source}")]
    Listener {
        pod: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("pod {pod}: no workload certificate: {source}")]
    Identity {
        pod: String,
        source: crate::identity::Error,
    },
    #[error("pod {pod}: TLS configuration: {message}")]
    Tls { pod: String, message: String },
    #[error("pod {pod}: attaching {program} failed: {message}")]
    Attach {
        pod: String,
        program: &'static str,
        message: String,
    },
}

/// An error with its causes, `outer: inner: ...` (aya's errors keep the OS error as a source).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Network-order words of an IPv6 address, as the kernel context fields hold them.
pub fn words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
}

/// Words of an address, v4-mapped for IPv4.
pub fn mapped_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => words(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => words(v6),
    }
}

/// The captured pods of this node.
#[derive(Debug)]
pub struct Capture {
    loaded: ebpf::Loaded,
    node: String,
    cgroup_root: PathBuf,
    inputs: Arc<proxy::Inputs>,
    pods: BTreeMap<String, pod::CapturedPod>,
    next_scope: u32,
}

impl Capture {
    pub fn new(
        loaded: ebpf::Loaded,
        node: String,
        cgroup_root: PathBuf,
        inputs: Arc<proxy::Inputs>,
    ) -> Self {
        Self {
            loaded,
            node,
            cgroup_root,
            inputs,
            pods: BTreeMap::new(),
            next_scope: 1,
        }
    }

    /// Captures and releases pods to match the current state. Returns the pods that could not
    /// be captured, with why.
    pub fn reconcile(&mut self) -> BTreeMap<String, String> {
        let snap = self.inputs.store.load();
        let desired: BTreeMap<String, _> = snap
            .captured_on(&self.node)
            .map(|w| (w.key(), w.clone()))
            .collect();
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, pod)| desired.get(*key).is_none_or(|w| !pod.same_attachment(w)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(pod) = self.pods.remove(&key) {
                pod.release(&mut self.loaded);
                info!(pod = %key, "pod released");
            }
        }
        let mut failed = BTreeMap::new();
        for (key, workload) in desired {
            if let Some(pod) = self.pods.get_mut(&key) {
                if let Err(e) = pod.update_exclusions(&mut self.loaded, &workload) {
                    error!(pod = %key, error = %e, "updating exclusions failed");
                    failed.insert(key, e.to_string());
                }
                continue;
            }
            let scope = self.next_scope;
            self.next_scope = self.next_scope.wrapping_add(1).max(1);
            match pod::CapturedPod::capture(
                &mut self.loaded,
                workload,
                scope,
                &self.cgroup_root,
                &self.inputs,
            ) {
                Ok(pod) => {
                    info!(pod = %key, ips = ?pod.workload.ips, netns_cookie = pod.netns_cookie(), "pod captured");
                    self.pods.insert(key, pod);
                }
                Err(e) => {
                    error!(pod = %key, error = %e, "pod capture failed; will retry");
                    let (namespace, workload) = key.split_once('/').unwrap_or((&key, ""));
                    let labels = PodLabels {
                        namespace: namespace.into(),
                        workload: workload.into(),
                    };
                    self.inputs
                        .metrics
                        .capture_failures
                        .get_or_create(&labels)
                        .inc();
                    failed.insert(key, e.to_string());
                }
            }
        }
        self.inputs
            .metrics
            .captured_pods
            .set(i64::try_from(self.pods.len()).unwrap_or(i64::MAX));
        self.publish_local();
        // Certificates are kept only for identities of pods still captured here.
        let keep = self.pods.values().map(|p| p.identity().clone()).collect();
        self.inputs.certs.retain(&keep);
        failed
    }

    /// Releases every pod (agent shutdown).
    pub fn release_all(&mut self) {
        for (key, pod) in std::mem::take(&mut self.pods) {
            pod.release(&mut self.loaded);
            info!(pod = %key, "pod released");
        }
        self.publish_local();
    }

    /// Tells the proxy which pods are captured here, by address (same-node delivery).
    fn publish_local(&self) {
        let local = self
            .pods
            .values()
            .filter_map(|p| p.proxy())
            .flat_map(|p| p.workload.ips.iter().map(move |ip| (*ip, p.clone())))
            .collect();
        self.inputs.local.store(Arc::new(local));
    }
}

/// Keeps capture in line with the state until `shutdown` fires. Readiness turns true after the
/// first reconcile that captured every pod; failed pods are retried every `retry`.
pub async fn run(
    mut capture: Capture,
    store: Arc<Store>,
    readiness: Arc<Readiness>,
    retry: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = store.subscribe();
    loop {
        let failed = capture.reconcile();
        if failed.is_empty() {
            readiness.set(None);
        } else {
            let why = failed
                .iter()
                .map(|(k, e)| format!("{k}: {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            readiness.set(Some(format!("pods not captured: {why}")));
        }
        let wait_retry = async {
            if failed.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(retry).await;
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            () = wait_retry => {},
            _ = shutdown.changed() => break,
        }
    }
    warn!("capture stopping: releasing every pod");
    capture.release_all();
}
