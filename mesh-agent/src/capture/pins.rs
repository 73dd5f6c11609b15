//! The pinned capture state under the agent's bpffs directory, which outlives the agent
//! process: while no agent runs, the programs stay attached to every captured pod and refuse
//! its connections (there is no listener to redirect them to), so the mesh fails closed.
//!
//! ```text
//! <bpf_dir>/v3/                     pins::ABI_DIR: everything of this eBPF ABI version
//!   MESH_PODS, MESH_POD_ADDRS, ...  maps (by name)
//!   mesh_connect4, ...              programs (by name; the newest agent's)
//!   pods/<cookie>_<ns>_<name>/      one directory per captured pod: its netns cookie and name
//!     mesh_connect4 mesh_connect6 mesh_sock_ops mesh_sk_lookup    the links (by program)
//! ```
//!
//! The agent holds no link descriptor: a pin is the only reference to a link, so removing the
//! pin detaches it. Links are created with aya and inspected or updated with bpf(2)
//! (`sys::bpf`): a new agent replaces the programs of links it adopts in one atomic update
//! each, so a pod is never without its programs.

use std::{
    fs::File,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, LinkError},
    CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
};
use mesh_common::{pins, programs};
use tracing::{info, warn};

use super::{ebpf::Loaded, Error};
use crate::sys::{
    bpf::{self, LinkTarget},
    Netns,
};

/// The pin directories of one agent.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `<bpf_dir>/v<ABI>`: maps and programs.
    pub abi_dir: PathBuf,
    /// `<abi_dir>/pods`: one directory of links per captured pod.
    pub pods_dir: PathBuf,
}

/// A pod whose links are pinned, as found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedPod {
    pub dir: PathBuf,
    pub netns_cookie: u64,
    /// `namespace/name` from the directory name (for logs).
    pub key: String,
}

impl Layout {
    pub fn new(bpf_dir: &Path) -> Self {
        let abi_dir = bpf_dir.join(pins::ABI_DIR);
        Self {
            pods_dir: abi_dir.join(pins::PODS_DIR),
            abi_dir,
        }
    }

    /// Creates the directories. Pins of an older agent that pinned no links (maps and programs
    /// directly in `bpf_dir`) are removed; pinned state of another ABI version with captured
    /// pods is an error that says what to do: this agent cannot read it, and removing it would
    /// open every pod it captures.
    pub fn prepare(&self, bpf_dir: &Path) -> Result<(), Error> {
        let mkdir = |dir: &Path| {
            std::fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.to_owned(),
                source,
            })
        };
        mkdir(bpf_dir)?;
        let entries = std::fs::read_dir(bpf_dir).map_err(|source| Error::PinDir {
            path: bpf_dir.to_owned(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir && (name.starts_with("MESH_") || name.starts_with("mesh_")) {
                // An agent before pinned links (ABI 0) left its maps and programs here; no pod
                // depends on them once that agent is gone.
                std::fs::remove_file(&path).map_err(|source| Error::PinDir {
                    path: path.clone(),
                    source,
                })?;
                info!(pin = %path.display(), "removed a pin of an agent that predates pinned capture");
            } else if is_dir && name != pins::ABI_DIR && is_abi_dir(&name) {
                let pods = path.join(pins::PODS_DIR);
                let captured = std::fs::read_dir(&pods).map_or(0, |d| d.count());
                if captured > 0 {
                    return Err(Error::ForeignAbi {
                        dir: path,
                        pods: captured,
                        ours: pins::ABI_DIR,
                    });
                }
                std::fs::remove_dir_all(&path).map_err(|source| Error::PinDir {
                    path: path.clone(),
                    source,
                })?;
                info!(dir = %path.display(), "removed the empty pin directory of another eBPF ABI version");
            }
        }
        mkdir(&self.pods_dir)
    }

    /// The directory of a pod's links.
    pub fn pod_dir(&self, netns_cookie: u64, key: &str) -> PathBuf {
        let sep = pins::POD_DIR_SEPARATOR;
        let name: String = key
            .chars()
            .map(|c| if c == '/' { sep } else { c })
            .collect();
        self.pods_dir.join(format!("{netns_cookie}{sep}{name}"))
    }

    /// The link directory of the pod with this netns cookie, if there is one.
    pub fn find(&self, netns_cookie: u64) -> Result<Option<PathBuf>, Error> {
        Ok(self
            .list()?
            .into_iter()
            .find(|p| p.netns_cookie == netns_cookie)
            .map(|p| p.dir))
    }

    /// The pods with pinned links. A directory whose name does not parse is reported with
    /// cookie 0 (it is released: nothing can match it).
    pub fn list(&self) -> Result<Vec<PinnedPod>, Error> {
        let entries = match std::fs::read_dir(&self.pods_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::PinDir {
                    path: self.pods_dir.clone(),
                    source,
                })
            }
        };
        let mut pods: Vec<PinnedPod> = entries
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (netns_cookie, key) = parse_pod_dir(&name).unwrap_or((0, name));
                PinnedPod {
                    dir: e.path(),
                    netns_cookie,
                    key,
                }
            })
            .collect();
        pods.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok(pods)
    }
}

fn is_abi_dir(name: &str) -> bool {
    name.strip_prefix('v')
        .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

/// `<cookie>_<ns>_<name>` back to the cookie and `ns/name`.
fn parse_pod_dir(name: &str) -> Option<(u64, String)> {
    let sep = pins::POD_DIR_SEPARATOR;
    let (cookie, rest) = name.split_once(sep)?;
    let cookie = cookie.parse().ok()?;
    let key = match rest.split_once(sep) {
        Some((ns, pod)) => format!("{ns}/{pod}"),
        None => rest.to_owned(),
    };
    Some((cookie, key))
}

/// Where a pod's links must point: its cgroup and network namespace.
#[derive(Debug)]
pub struct Target<'a> {
    pub pod: &'a str,
    pub cgroup: &'a File,
    pub netns: &'a Netns,
}

/// What adopting a pod's pinned links found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Links that were missing or no longer attached to the pod, attached again.
    pub reattached: usize,
}

/// The programs in the order they are attached: sk_lookup first (inbound), connect last, so
/// that no connect is redirected before the rest is in place.
pub const ORDER: [&str; 4] = [
    programs::SK_LOOKUP,
    programs::SOCK_OPS,
    programs::CONNECT6,
    programs::CONNECT4,
];

/// Attaches every program to the pod and pins each link in `dir` (created here). A link whose
/// pin fails is detached at once (its only descriptor is dropped).
pub fn attach_all(loaded: &mut Loaded, dir: &Path, target: &Target<'_>) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    for program in ORDER {
        attach(loaded, dir, program, target)?;
    }
    Ok(())
}

/// Takes over the pinned links of a pod: each one still attached where the pod is gets this
/// agent's program (an atomic replacement); a missing or detached one is attached again.
pub fn adopt(loaded: &mut Loaded, dir: &Path, target: &Target<'_>) -> Result<Adopted, Error> {
    let cgroup_id = target.cgroup.metadata().map(|m| m.ino()).ok();
    let netns_ino = target.netns.inode().ok();
    let mut adopted = Adopted::default();
    for program in ORDER {
        let pin = dir.join(program);
        let link = match bpf::obj_get(&pin) {
            Ok(fd) => Some(fd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(pod = target.pod, pin = %pin.display(), error = %e, "cannot open a pinned link; attaching it again");
                None
            }
        };
        let usable = link.as_ref().is_some_and(|fd| {
            bpf::link_info(fd.as_fd()).is_ok_and(|i| attached_to(i.target, cgroup_id, netns_ino))
        });
        match link {
            Some(fd) if usable => {
                let prog = loaded.program(program)?.fd().map_err(|e| Error::Attach {
                    pod: target.pod.to_owned(),
                    program,
                    message: super::chain(&e),
                })?;
                bpf::link_update(fd.as_fd(), prog.as_fd()).map_err(|e| Error::Attach {
                    pod: target.pod.to_owned(),
                    program,
                    message: format!(
                        "replacing the program of the pinned link {}: {e}",
                        pin.display()
                    ),
                })?;
            }
            _ => {
                // Gone, detached (its cgroup or namespace went away) or attached elsewhere.
                drop(link);
                remove_pin(&pin)?;
                attach(loaded, dir, program, target)?;
                adopted.reattached += 1;
            }
        }
    }
    Ok(adopted)
}

/// Whether a link's target is the pod's cgroup (`cgroup_id`, its directory's inode) or network
/// namespace (`netns_ino`).
pub fn attached_to(target: LinkTarget, cgroup_id: Option<u64>, netns_ino: Option<u64>) -> bool {
    match target {
        LinkTarget::Cgroup(Some(id)) => Some(id) == cgroup_id,
        LinkTarget::Netns(Some(ino)) => Some(u64::from(ino)) == netns_ino,
        _ => false,
    }
}

/// Removes a pod's link pins and their directory: the links detach (nothing else holds them).
pub fn release(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::PinDir {
            path: dir.to_owned(),
            source,
        }),
    }
}

fn remove_pin(pin: &Path) -> Result<(), Error> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::PinDir {
            path: pin.to_owned(),
            source,
        }),
    }
}

/// Attaches one program and pins its link as `dir/<program>`.
fn attach(
    loaded: &mut Loaded,
    dir: &Path,
    program: &'static str,
    target: &Target<'_>,
) -> Result<(), Error> {
    let link = attach_link(loaded, program, target)?;
    let pin = dir.join(program);
    // The pinned link's descriptor is dropped here: from now on the pin alone holds it.
    link.pin(&pin).map(drop).map_err(|e| Error::Attach {
        pod: target.pod.to_owned(),
        program,
        message: format!(
            "pinning the link at {}: {}",
            pin.display(),
            super::chain(&e)
        ),
    })
}

/// Attaches one program to the pod, its cgroup (its network namespace for sk_lookup), through
/// a bpf link. The returned link is the only reference to it: dropped unpinned, it detaches.
pub fn attach_link(
    loaded: &mut Loaded,
    program: &'static str,
    target: &Target<'_>,
) -> Result<FdLink, Error> {
    let chain = |e: &dyn std::error::Error| Error::Attach {
        pod: target.pod.to_owned(),
        program,
        message: super::chain(e),
    };
    // aya attaches to a cgroup without a link on kernels that have none for cgroups.
    let not_fd_link = |e: LinkError| match e {
        LinkError::InvalidLink => Error::Attach {
            pod: target.pod.to_owned(),
            program,
            message: "attached without a bpf link (BPF_PROG_ATTACH: the kernel has no bpf \
                      links for cgroups before Linux 5.7), which cannot be pinned"
                .into(),
        },
        e => chain(&e),
    };
    // Cgroup BPF links always coexist with other programs (multi-attach); the link API takes
    // no flags, which is what `Single` passes.
    let mode = CgroupAttachMode::Single;
    Ok(match program {
        programs::SK_LOOKUP => {
            let p: &mut SkLookup = loaded.program(program)?.try_into().map_err(|e| chain(&e))?;
            let id = p.attach(target.netns).map_err(|e| chain(&e))?;
            p.take_link(id).map_err(|e| chain(&e))?.into()
        }
        programs::SOCK_OPS => {
            let p: &mut SockOps = loaded.program(program)?.try_into().map_err(|e| chain(&e))?;
            let id = p.attach(target.cgroup, mode).map_err(|e| chain(&e))?;
            p.take_link(id)
                .map_err(|e| chain(&e))?
                .try_into()
                .map_err(not_fd_link)?
        }
        _ => {
            let p: &mut CgroupSockAddr =
                loaded.program(program)?.try_into().map_err(|e| chain(&e))?;
            let id = p.attach(target.cgroup, mode).map_err(|e| chain(&e))?;
            p.take_link(id)
                .map_err(|e| chain(&e))?
                .try_into()
                .map_err(not_fd_link)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dirs_name_the_cookie_and_the_pod() {
        let layout = Layout::new(Path::new("/sys/fs/bpf/mesh/n1"));
        let dir = layout.pod_dir(4097, "shop/client");
        assert_eq!(
            dir,
            Path::new("/sys/fs/bpf/mesh/n1")
                .join(pins::ABI_DIR)
                .join("pods/4097_shop_client")
        );
        let name = dir.file_name().and_then(|n| n.to_str()).expect("name");
        assert_eq!(parse_pod_dir(name), Some((4097, "shop/client".into())));
        assert_eq!(parse_pod_dir("x_shop_client"), None);
        assert_eq!(parse_pod_dir("12"), None);
        assert_eq!(
            parse_pod_dir("5_shop_a.b-c"),
            Some((5, "shop/a.b-c".into()))
        );
    }

    #[test]
    fn abi_dirs_are_recognised() {
        assert!(is_abi_dir("v1") && is_abi_dir("v12"));
        assert!(!is_abi_dir("v") && !is_abi_dir("pods") && !is_abi_dir("v1x"));
    }
}
