//! Capture, the kernel side of a pod: the eBPF programs (loaded and pinned once), attached per
//! pod (cgroup + network namespace) with the pod's entries in the kernel maps, and the agent's
//! in-pod listeners. Which pods are captured, and serving them, is the pod lifecycle manager's
//! part (`crate::pods`); capture knows nothing of the proxy.

pub mod ebpf;
pub mod inspect;
pub mod listeners;
pub mod pins;
pub mod pod;
pub mod return_path;

use std::{
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
};

use tracing::info;

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
    #[error(
        "this mesh-agent was built without its eBPF programs (cargo feature `ebpf` off): it \
         cannot capture; build it with `cargo xtask build`"
    )]
    NoObject,
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
    #[error("pod {pod}: attaching {program} failed: {message}")]
    Attach {
        pod: String,
        program: &'static str,
        message: String,
    },
    #[error(
        "pod {pod}: its cgroup {path} contains this agent: the agent never captures itself (run \
         the agent in a cgroup of its own)"
    )]
    AgentCgroup { pod: String, path: PathBuf },
    #[error(
        "{dir} holds the capture of {pods} pods pinned by an agent of another eBPF ABI version \
         (this agent is {ours}): it cannot adopt them, and removing them would open those pods. \
         Finish that agent's work first: run its `mesh-agent node --uninstall`, or release the \
         pods (disable their namespaces) with it, then start this one"
    )]
    ForeignAbi {
        dir: PathBuf,
        pods: usize,
        ours: &'static str,
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

/// The agent's own cgroup v2 directory (`/proc/self/cgroup`, the `0::` line).
pub fn own_cgroup(root: &Path) -> PathBuf {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| root.join(p.trim_start_matches('/')))
        })
        .unwrap_or_else(|| root.to_owned())
}

/// Releases every pod pinned under `bpf_dir` without a running agent (an orderly uninstall
/// when no agent runs): links detach with their pins; the maps go with the directory.
pub fn uninstall_pins(bpf_dir: &Path) -> Result<usize, Error> {
    let layout = pins::Layout::new(bpf_dir);
    let pods = layout.list()?;
    for p in &pods {
        pins::release(&p.dir)?;
        info!(pod = %p.key, netns_cookie = p.netns_cookie, "pinned pod released (uninstall)");
    }
    match std::fs::remove_dir_all(&layout.abi_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::PinDir {
                path: layout.abi_dir.clone(),
                source,
            })
        }
    }
    info!(dir = %layout.abi_dir.display(), released = pods.len(), "uninstall: pins removed");
    Ok(pods.len())
}
