//! The workload API: the node agent's Unix socket on which a waypoint's pod fetches the
//! certificate of its own identity (a waypoint terminates and originates HBONE itself, so it
//! holds its identity, where captured pods never do). Only a waypoint's pod of this node gets
//! one, and only its own: the caller is known by the kernel (`SO_PEERCRED`: its process, then
//! that process's cgroup), never by what it says, and the state must place a waypoint pod of
//! this node in that cgroup ([`attest`]). The leaf is signed by this node's issuer, as the
//! leaves of captured pods are, so verifiers accept it only for identities the state places on
//! this node.
//!
//! One request per connection: the client sends one line (`{"version":1}`), the agent answers
//! one JSON line, [`Answer`]. `mesh-agent ca fetch` is the client (and the waypoint's).

use std::{
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{info, warn};

use crate::{
    identity::{CertManager, SpiffeId},
    pods::sandbox,
    state::{Snapshot, Store, Workload},
};

/// The longest request line read.
const MAX_REQUEST: u64 = 1024;
/// How long a request may take to arrive once connected.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// The caller's certificate.
    Certificate(Certificate),
    /// Why not.
    Refused(String),
}

/// A workload's certificate, as PEM.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Certificate {
    /// The SPIFFE id the certificate names.
    pub identity: String,
    /// The leaf, then its chain up to (not including) the root.
    pub certificate_chain: String,
    /// The leaf's private key (PKCS#8).
    pub private_key: String,
    /// The roots to verify peers with.
    pub trust_bundle: String,
    /// Seconds since the epoch when the leaf expires.
    pub not_after: u64,
    /// Seconds since the epoch when to fetch a new one (half-way through its life).
    pub renew_at: u64,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// `mesh_workload_certificates_total{result}`: requests answered, by result (`issued`,
/// `refused`).
pub type Requests = Family<ResultLabel, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabel {
    result: &'static str,
}

/// What the server needs.
#[derive(Clone)]
pub struct Context {
    pub store: Arc<Store>,
    pub certs: Arc<CertManager>,
    /// This node's name.
    pub node: String,
    /// The cgroup v2 mount: `/proc/PID/cgroup` paths are relative to it.
    pub cgroup2: PathBuf,
    /// The kubelet's cgroup root (pods named by UID are found below it).
    pub kubelet_root: PathBuf,
    pub requests: Requests,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("node", &self.node)
            .field("cgroup2", &self.cgroup2)
            .field("kubelet_root", &self.kubelet_root)
            .finish_non_exhaustive()
    }
}

/// The waypoint pod of node `node` whose cgroup holds `cgroup` (a caller's, absolute): its
/// workload's own cgroup (the state file's), or the pod cgroup of its UID under the kubelet's
/// layouts. Errors say why not, for the caller and the log.
pub fn attest(
    snap: &Snapshot,
    node: &str,
    cgroup: &Path,
    kubelet_root: &Path,
) -> Result<Arc<Workload>, String> {
    let mut pod_of_node = None;
    for w in snap.workloads.values().filter(|w| w.node == node) {
        let dir = if w.cgroup.as_os_str().is_empty() {
            match w
                .uid
                .as_deref()
                .and_then(|uid| sandbox::pod_cgroup(kubelet_root, uid))
            {
                Some(dir) => dir,
                None => continue,
            }
        } else {
            w.cgroup.clone()
        };
        if cgroup.starts_with(&dir) {
            if w.is_waypoint() {
                return Ok(w.clone());
            }
            pod_of_node = Some(w.key());
        }
    }
    Err(match pod_of_node {
        Some(key) => format!(
            "pod {key} is not a waypoint's pod (label {}={}): only waypoints hold their identity",
            crate::state::ROLE_LABEL,
            crate::state::ROLE_WAYPOINT
        ),
        None => format!(
            "the caller (cgroup {}) is no pod of node {node} in the mesh state",
            cgroup.display()
        ),
    })
}

/// Binds the socket at `path` (replacing a stale one), readable and writable by all: which
/// caller gets what is decided by [`attest`], not by who may connect.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::sys::unix::bind(path, 0o666)
}

/// Serves requests until the runtime ends.
pub async fn serve(listener: UnixListener, ctx: Context) {
    crate::sys::unix::serve_each(
        listener,
        "workload API request",
        || false,
        move |stream| {
            let ctx = ctx.clone();
            async move { one(stream, &ctx).await }
        },
    )
    .await;
}

async fn one(stream: UnixStream, ctx: &Context) -> std::io::Result<()> {
    // Who is calling, as the kernel recorded it when the caller connected.
    let pid = stream.peer_cred()?.pid();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::other("no request within 5 s"))??;
    let answer = answer(ctx, pid);
    let result = match &answer {
        Answer::Certificate(c) => {
            info!(pid = ?pid, identity = %c.identity, "workload certificate issued");
            "issued"
        }
        Answer::Refused(why) => {
            warn!(pid = ?pid, reason = %why, "workload certificate refused");
            "refused"
        }
    };
    ctx.requests.get_or_create(&ResultLabel { result }).inc();
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

fn answer(ctx: &Context, pid: Option<i32>) -> Answer {
    let Some(pid) = pid.filter(|p| *p > 0) else {
        return Answer::Refused("the caller's process is unknown".into());
    };
    let cgroup = match process_cgroup(pid) {
        Ok(relative) => ctx.cgroup2.join(relative.trim_start_matches('/')),
        Err(e) => return Answer::Refused(format!("the caller's cgroup: {e}")),
    };
    let snap = ctx.store.load();
    let workload = match attest(&snap, &ctx.node, &cgroup, &ctx.kubelet_root) {
        Ok(w) => w,
        Err(why) => return Answer::Refused(why),
    };
    drop(snap);
    let id = match SpiffeId::new(
        ctx.certs.trust_domain(),
        &workload.namespace,
        &workload.service_account,
    ) {
        Ok(id) => id,
        Err(e) => return Answer::Refused(format!("pod {}: {e}", workload.key())),
    };
    match ctx.certs.issue_pem(&id) {
        Ok(issued) => Answer::Certificate(Certificate {
            identity: id.to_string(),
            certificate_chain: issued.chain,
            private_key: issued.key,
            trust_bundle: ctx.certs.bundle_pem(),
            not_after: unix_secs(issued.not_after),
            renew_at: unix_secs(issued.renew_at),
        }),
        Err(e) => Answer::Refused(format!("issuing {id}: {e}")),
    }
}

/// The cgroup v2 path of process `pid`, relative to the cgroup v2 mount (`0::/path`).
fn process_cgroup(pid: i32) -> Result<String, String> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| format!("{path} has no cgroup v2 line"))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Errors of [`fetch`].
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach the agent's workload API at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the workload API at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the workload API at {path} answered what is not an answer: {message}")]
    Answer { path: PathBuf, message: String },
    #[error("the agent refused: {0}")]
    Refused(String),
}

/// Fetches this process's certificate from the agent's workload API at `path`.
pub fn fetch(path: &Path) -> Result<Certificate, FetchError> {
    let io = |source| FetchError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| FetchError::Connect {
            path: path.to_owned(),
            source,
        })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    stream.write_all(b"{\"version\":1}\n").map_err(io)?;
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(io)?;
    match serde_json::from_str::<Answer>(&line) {
        Ok(Answer::Certificate(c)) => Ok(c),
        Ok(Answer::Refused(why)) => Err(FetchError::Refused(why)),
        Err(e) => Err(FetchError::Answer {
            path: path.to_owned(),
            message: format!("{e}: {:?}", line.trim()),
        }),
    }
}

#[cfg(test)]
mod tests;
