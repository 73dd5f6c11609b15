//! What `mesh-agent check` creates in the kernel's file systems, named after the check's
//! process (`mesh-check-<pid>-<n>`; bpffs refuses names with a dot, so it cannot be hidden): a
//! pin directory on bpffs next to the agent's, and an empty cgroup under the cgroup v2 mount. [`Scratch::remove`] removes
//! both and says so; dropping a `Scratch` that was not removed (an early return, a panic)
//! removes them too.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use tracing::warn;

use super::{nearest_existing, Error, BPF_FS_MAGIC};
use crate::sys;

/// Tells apart the scratch of checks that run at once in one process (tests).
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// The check's pin directory and cgroup.
#[derive(Debug)]
pub(super) struct Scratch {
    name: String,
    dir: PathBuf,
    cgroup: Option<PathBuf>,
    removed: bool,
}

impl Scratch {
    /// Makes the pin directory next to `bpf_dir` (see [`base`]).
    pub fn create(bpf_dir: &Path) -> Result<Self, Error> {
        let on_bpffs = |p: &Path| sys::fs_magic(p).is_ok_and(|m| m == BPF_FS_MAGIC);
        let base = base(bpf_dir, on_bpffs).ok_or_else(|| Error::NoBpffs {
            path: bpf_dir.to_owned(),
        })?;
        let name = format!(
            "{}{}-{}",
            PREFIX,
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let dir = base.join(&name);
        std::fs::create_dir(&dir).map_err(|source| Error::Scratch {
            path: dir.clone(),
            what: "pin directory",
            source,
        })?;
        Ok(Self {
            name,
            dir,
            cgroup: None,
            removed: false,
        })
    }

    /// The pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the check's cgroup, an empty child of the cgroup v2 mount `root`, and opens it.
    pub fn cgroup(&mut self, root: &Path) -> Result<File, Error> {
        let path = root.join(&self.name);
        let err = |source| Error::Scratch {
            path: path.clone(),
            what: "cgroup",
            source,
        };
        std::fs::create_dir(&path).map_err(err)?;
        self.cgroup = Some(path.clone());
        File::open(&path).map_err(err)
    }

    /// Removes the pin directory with every pin in it (maps and links: a link whose pin goes
    /// and whose descriptors are closed detaches), then the cgroup. Says what it removed.
    pub fn remove(&mut self) -> Result<String, Error> {
        self.removed = true;
        let dir = std::fs::remove_dir_all(&self.dir).map_err(|source| Error::Cleanup {
            path: self.dir.clone(),
            source,
        });
        let cgroup = match &self.cgroup {
            None => Ok(String::new()),
            Some(path) => std::fs::remove_dir(path)
                .map(|()| format!(" and the cgroup {}", path.display()))
                .map_err(|source| Error::Cleanup {
                    path: path.clone(),
                    source,
                }),
        };
        let cgroup = cgroup?;
        dir?;
        Ok(format!(
            "removed the pin directory {}{cgroup}",
            self.dir.display()
        ))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = self.remove() {
                warn!(error = %e, "the check could not clean up after itself");
            }
        }
    }
}

/// The start of the scratch names.
pub(super) const PREFIX: &str = "mesh-check-";

/// Where the pin directory goes: next to `bpf_dir`, in the nearest existing ancestor of its
/// parent, when that is on bpffs; else in the nearest existing ancestor of `bpf_dir` itself (a
/// `bpf_dir` that is the mount point of a bpffs, like /sys/fs/bpf); else nowhere.
pub(super) fn base(bpf_dir: &Path, on_bpffs: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let beside = bpf_dir.parent().map(nearest_existing);
    let within = nearest_existing(bpf_dir);
    beside
        .into_iter()
        .chain([within])
        .find(|p| !p.as_os_str().is_empty() && on_bpffs(p))
}
