//! Checks at start that the agent can do its job, with a precise message when it cannot.

use std::path::{Path, PathBuf};

use crate::sys;

/// What is missing for the agent to run.
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
    #[error(
        "kernel {release} is too old: the agent needs Linux 5.17 or newer (sk_lookup and its \
         ingress interface, 5.17; SO_NETNS_COOKIE, bpf_get_netns_cookie in sock_ops, map \
         lookup-and-delete)"
    )]
    Kernel { release: String },
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Runs every check; returns the cgroup v2 mount point.
pub fn check(bpf_dir: &Path) -> Result<PathBuf, Error> {
    check_kernel()?;
    check_capabilities()?;
    let cgroup2 = cgroup2_mount()?.ok_or(Error::NoCgroup2)?;
    // The pin directory may not exist yet; its nearest existing ancestor must be on bpffs.
    let mut probe = bpf_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    match sys::fs_magic(&probe) {
        Ok(BPF_FS_MAGIC) => Ok(cgroup2),
        _ => Err(Error::NoBpffs { path: probe }),
    }
}

fn check_kernel() -> Result<(), Error> {
    let release =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|source| Error::Io {
            what: "/proc/sys/kernel/osrelease".into(),
            source,
        })?;
    let release = release.trim().to_owned();
    if kernel_at_least(&release, (5, 17)) {
        Ok(())
    } else {
        Err(Error::Kernel { release })
    }
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

fn check_capabilities() -> Result<(), Error> {
    if sys::euid() == 0 {
        return Ok(());
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
        Ok(())
    } else {
        Err(Error::Capabilities {
            missing: missing.join(", "),
        })
    }
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
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
                    32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("6.18.44-fc-v769", (5, 15)));
        assert!(kernel_at_least("5.15.0", (5, 15)));
        assert!(!kernel_at_least("5.10.200-generic", (5, 15)));
        assert!(!kernel_at_least("garbage", (5, 15)));
    }
}
