//! Whether this node can run the agent, with a precise message for whatever it cannot do.
//!
//! Two depths. [`check`] is the agent's start: privileges, a cgroup v2 mount and bpffs, fast;
//! the agent's own load of its programs is then the verifier's verdict. [`run`] is `mesh-agent
//! check` (and the kernel part of `mesh-agent inspect check`): the same checks, then [`probe`]
//! loads every program and map of the embedded object into the running kernel and uses each
//! kernel feature the data path relies on, once, the way the agent uses it, in scratch pins, a
//! temporary cgroup and a private network namespace that it removes afterwards. The kernel
//! release is advisory in both: what loads and works is the verdict.

pub mod probe;
mod report;
mod scratch;

use std::path::{Path, PathBuf};

use tracing::warn;

pub use self::report::{Check, Outcome, Report};
use crate::sys;

/// The oldest kernel the data path is known to run on, `(major, minor)`. Advisory only: below
/// it `mesh-agent check` and the agent's start say so, and the checks that load and use what
/// the agent needs decide. The one place to change when an older kernel is proven to work.
pub const MIN_KERNEL: (u32, u32) = (5, 17);
/// What sets [`MIN_KERNEL`] (docs/kernels.md has the kernels tried).
pub const MIN_KERNEL_BECAUSE: &str = "sk_lookup's ingress_ifindex, which mesh_sk_lookup reads \
     to tell the agent's delivery to a pod from traffic that came from outside";

/// What is missing or broken for the agent to run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "missing capabilities {missing}: run the agent as root or grant CAP_BPF, CAP_NET_ADMIN \
         and CAP_SYS_ADMIN (setns into pod network namespaces needs CAP_SYS_ADMIN)"
    )]
    Capabilities { missing: String },
    #[error(
        "no cgroup v2 file system is mounted (looked for fstype cgroup2 in /proc/self/mountinfo): \
         mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`, and mount it into the agent's pod"
    )]
    NoCgroup2,
    #[error(
        "{path} is not on a bpf file system: mount one (`mount -t bpf bpf /sys/fs/bpf`) and make \
         it visible to the agent (a hostPath volume in Kubernetes)"
    )]
    NoBpffs { path: PathBuf },
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Capture(#[from] crate::capture::Error),
    #[error("the eBPF object did not load: {0}")]
    Object(String),
    #[error(
        "the kernel cannot create map {map}, a {map_type} ({since}): {source}; the object's \
         maps are created together, so none of its programs could load"
    )]
    MapCreate {
        map: String,
        map_type: String,
        /// Which kernel introduced the map type.
        since: String,
        source: std::io::Error,
    },
    #[error(
        "the kernel's verifier rejected program {program} ({hook}, since Linux {since}); its \
         last lines say why:\n{log}"
    )]
    Verifier {
        program: &'static str,
        hook: &'static str,
        since: &'static str,
        log: String,
    },
    #[error(
        "{} (Linux {} and later) does not work here: {detail}. The agent needs it for {}",
        .feature.what, .feature.since, .feature.used_for
    )]
    Feature {
        feature: &'static probe::Feature,
        detail: String,
    },
    #[error(
        "cannot create {path}, the check's temporary {what}: {source} (the check needs \
         the privileges of the agent)"
    )]
    Scratch {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "the check's own network namespace, {what}: {source} (the agent enters pods' network \
         namespaces and opens sockets there, which needs CAP_SYS_ADMIN)"
    )]
    Netns {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot remove {path} after the check: {source}: remove it by hand")]
    Cleanup {
        path: PathBuf,
        source: std::io::Error,
    },
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The agent's start: privileges, cgroup v2 and bpffs (the kernel release only warns). Returns
/// the cgroup v2 mount point. Loads nothing: the agent's own load is the verifier's verdict.
pub fn check(bpf_dir: &Path) -> Result<PathBuf, Error> {
    if let Some(advice) = kernel_advice(&kernel_release()?) {
        warn!("{advice}; run `mesh-agent check` to prove this kernel");
    }
    check_capabilities()?;
    let cgroup2 = cgroup2_mount()?.ok_or(Error::NoCgroup2)?;
    bpffs(bpf_dir)?;
    Ok(cgroup2)
}

/// `mesh-agent check`: every check, each reported, with the probe of the eBPF `object` (none:
/// this build embeds none) into the running kernel. Nothing of a running agent is touched.
pub fn run(bpf_dir: &Path, object: Option<&[u8]>) -> Report {
    let mut report = Report::default();
    match kernel_release() {
        Ok(release) => {
            let line = format!("{release} ({})", std::env::consts::ARCH);
            let (major, minor) = MIN_KERNEL;
            match kernel_advice(&release) {
                None => report.ok(
                    "kernel",
                    format!("{line}: Linux {major}.{minor} or newer, as the data path needs"),
                ),
                Some(advice) => report.warn("kernel", format!("{line}: {advice}")),
            }
        }
        Err(e) => report.fail("kernel", e),
    };
    let privileged = match check_capabilities() {
        Ok(detail) => report.ok("capabilities", detail),
        Err(e) => report.fail("capabilities", e),
    };
    let cgroup2 = match cgroup2_mount() {
        Ok(Some(mount)) => {
            report.ok("cgroup v2", format!("mounted at {}", mount.display()));
            Some(mount)
        }
        Ok(None) => {
            report.fail("cgroup v2", Error::NoCgroup2);
            None
        }
        Err(e) => {
            report.fail("cgroup v2", e);
            None
        }
    };
    let on_bpffs = match bpffs(bpf_dir) {
        Ok(at) if at == bpf_dir => {
            report.ok("bpffs", format!("{} is on a bpf file system", at.display()))
        }
        Ok(at) => report.ok(
            "bpffs",
            format!(
                "{} would be made on the bpf file system at {}",
                bpf_dir.display(),
                at.display()
            ),
        ),
        Err(e) => report.fail("bpffs", e),
    };
    match object {
        _ if !(privileged && on_bpffs) => report.skip(
            "eBPF",
            "programs, maps and kernel features not checked: they need the privileges and the \
             bpf file system above",
        ),
        None => {
            report.fail("eBPF", Error::Capture(crate::capture::Error::NoObject));
        }
        Some(object) => probe::run(object, bpf_dir, cgroup2.as_deref(), &mut report),
    }
    report
}

fn kernel_release() -> Result<String, Error> {
    let release =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|source| Error::Io {
            what: "/proc/sys/kernel/osrelease".into(),
            source,
        })?;
    Ok(release.trim().to_owned())
}

/// What to say of a kernel release older than [`MIN_KERNEL`] (nothing for newer ones).
fn kernel_advice(release: &str) -> Option<String> {
    let (major, minor) = MIN_KERNEL;
    (!kernel_at_least(release, MIN_KERNEL)).then(|| {
        format!(
            "older than Linux {major}.{minor}, the oldest kernel the data path is known to run \
             on (what sets it: {MIN_KERNEL_BECAUSE}); loading and using what the agent needs \
             decides"
        )
    })
}

fn kernel_at_least(release: &str, (want_major, want_minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    let minor = parts
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    (major, minor) >= (want_major, want_minor)
}

/// The capabilities the agent needs, or which are missing. Says how they are held.
fn check_capabilities() -> Result<String, Error> {
    if sys::euid() == 0 {
        return Ok("running as root".into());
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| Error::Io {
        what: "/proc/self/status".into(),
        source,
    })?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| eff & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok("CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN are effective".into())
    } else {
        Err(Error::Capabilities {
            missing: missing.join(", "),
        })
    }
}

/// The nearest existing ancestor of `bpf_dir` (itself if it exists), which must be on bpffs:
/// the pin directory may not exist yet.
fn bpffs(bpf_dir: &Path) -> Result<PathBuf, Error> {
    let at = nearest_existing(bpf_dir);
    match sys::fs_magic(&at) {
        Ok(BPF_FS_MAGIC) => Ok(at),
        _ => Err(Error::NoBpffs { path: at }),
    }
}

/// `path` if it exists, else its nearest existing ancestor (`/` at worst; a relative path
/// that has none: the empty path, the current directory).
fn nearest_existing(path: &Path) -> PathBuf {
    let mut at = path.to_path_buf();
    while !at.exists() {
        if !at.pop() {
            break;
        }
    }
    at
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo (works for the
/// unified layout at /sys/fs/cgroup and the hybrid one at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Result<Option<PathBuf>, Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::Io {
        what: "/proc/self/mountinfo".into(),
        source,
    })?;
    Ok(parse_cgroup2_mount(&info))
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // fields: id parent major:minor root mount-point options [optional...] - fstype source ...
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests;
