//! Finding a pod's sandbox (its cgroup v2 directory and network namespace) when the state names
//! the pod by UID instead of giving the paths, as a Kubernetes pod object does:
//!
//! - the **cgroup** from the UID, under the kubelet's layouts: the `cgroupfs` driver's
//!   `kubepods[/burstable|/besteffort]/pod<uid>` and the `systemd` driver's
//!   `kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_with_underscores>.slice`;
//! - the **network namespace** from the CNI plugin's ADD (the runtime names it), or else from
//!   a process of the pod (any process below its cgroup): the named namespace file with the
//!   same inode in one of the netns directories, so that the path outlives the process.
//!
//! A pod whose sandbox the CNI plugin reported deleted is not running: it is not looked for
//! until its next ADD (or until it leaves the state).

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::state::Workload;

/// Where the kubelet's pod cgroups are looked for, below its cgroup root.
const CGROUPFS: [&str; 3] = ["kubepods", "kubepods/burstable", "kubepods/besteffort"];
const SYSTEMD: [(&str, &str); 3] = [
    ("kubepods.slice", "kubepods-pod"),
    (
        "kubepods.slice/kubepods-burstable.slice",
        "kubepods-burstable-pod",
    ),
    (
        "kubepods.slice/kubepods-besteffort.slice",
        "kubepods-besteffort-pod",
    ),
];

/// A sandbox the CNI plugin reported (ADD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniSandbox {
    /// `namespace/name` of the pod.
    pub key: String,
    /// The pod's UID, when the runtime passed it (`K8S_POD_UID`).
    pub uid: Option<String>,
    /// The network namespace the runtime made (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The sandbox's container id (`CNI_CONTAINERID`).
    pub container_id: String,
}

/// Why a pod's sandbox is not known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// The CNI plugin reported its sandbox deleted: nothing to capture until the next ADD.
    NotRunning,
    /// No process runs in its cgroup yet (and the CNI plugin has not reported its sandbox):
    /// nothing can open a socket in it, so there is nothing to capture yet. Looked for again
    /// at every retry; the CNI plugin's ADD captures it before its containers start.
    NotStarted,
    /// Looked for and not found (a pod that should run here): the message says what is
    /// missing.
    Missing(String),
}

/// The sandboxes found so far, and those the CNI plugin reported.
#[derive(Debug)]
pub struct Sandboxes {
    cgroup_root: PathBuf,
    netns_dirs: Vec<PathBuf>,
    /// Reported by the CNI plugin, by pod key.
    cni: HashMap<String, CniSandbox>,
    /// Reported deleted by the CNI plugin (DEL), by pod key.
    deleted: HashSet<String>,
    /// Resolved workloads by pod key: the state's workload, and the same with the paths.
    resolved: HashMap<String, (Arc<Workload>, Arc<Workload>)>,
}

impl Sandboxes {
    /// Sandboxes looked for under `cgroup_root` (the kubelet's cgroup root: the cgroup v2
    /// mount unless configured) and in `netns_dirs`.
    pub fn new(cgroup_root: PathBuf, netns_dirs: Vec<PathBuf>) -> Self {
        Self {
            cgroup_root,
            netns_dirs,
            cni: HashMap::new(),
            deleted: HashSet::new(),
            resolved: HashMap::new(),
        }
    }

    /// `w` with its sandbox's paths: `w` itself when the state gives them, else the cgroup
    /// from its UID and the network namespace from the CNI plugin or a process of the pod.
    /// A pod resolved before keeps its sandbox while its UID and namespace file stay.
    pub fn resolve(&mut self, w: &Arc<Workload>) -> Result<Arc<Workload>, Unresolved> {
        if !w.netns.as_os_str().is_empty() {
            return Ok(w.clone());
        }
        let key = w.key();
        if self.deleted.contains(&key) {
            return Err(Unresolved::NotRunning);
        }
        let uid = w.uid.as_deref().unwrap_or_default();
        let cni = self
            .cni
            .get(&key)
            .filter(|c| c.uid.as_deref().is_none_or(|u| u == uid));
        if let Some((source, effective)) = self.resolved.get(&key) {
            let same_sandbox = source.uid == w.uid
                && cni.is_none_or(|c| c.netns == effective.netns)
                && effective.netns.exists()
                && effective.cgroup.is_dir();
            if same_sandbox {
                if Arc::ptr_eq(source, w) {
                    return Ok(effective.clone());
                }
                let effective = Arc::new(with_paths(w, &effective.netns, &effective.cgroup));
                self.resolved.insert(key, (w.clone(), effective.clone()));
                return Ok(effective);
            }
        }
        let cgroup = pod_cgroup(&self.cgroup_root, uid).ok_or_else(|| {
            Unresolved::Missing(format!(
                "no cgroup for pod uid {uid} under {} (looked for the kubelet's cgroupfs and \
                 systemd layouts: kubepods/.../pod<uid>, kubepods.slice/.../kubepods-...-pod<uid>.slice)",
                self.cgroup_root.display()
            ))
        })?;
        let netns = match cni {
            Some(c) => self.visible(&c.netns).ok_or_else(|| {
                Unresolved::Missing(format!(
                    "the network namespace {} the CNI plugin reported is not visible to the \
                     agent (nor under {})",
                    c.netns.display(),
                    self.dirs()
                ))
            })?,
            None => netns_of_cgroup(&cgroup, &self.netns_dirs)
                .map_err(Unresolved::Missing)?
                .ok_or(Unresolved::NotStarted)?,
        };
        let effective = Arc::new(with_paths(w, &netns, &cgroup));
        self.resolved.insert(key, (w.clone(), effective.clone()));
        Ok(effective)
    }

    /// Records a sandbox the CNI plugin added (replacing an earlier one of the same pod).
    pub fn cni_add(&mut self, sandbox: CniSandbox) {
        self.deleted.remove(&sandbox.key);
        self.resolved.remove(&sandbox.key);
        self.cni.insert(sandbox.key.clone(), sandbox);
    }

    /// Records that the CNI plugin deleted the sandbox of `key` (with `container_id`, when the
    /// runtime named it: a DEL of an older sandbox of the same pod changes nothing).
    pub fn cni_del(&mut self, key: &str, container_id: &str) -> bool {
        if let Some(c) = self.cni.get(key) {
            if !container_id.is_empty() && c.container_id != container_id {
                return false;
            }
        }
        self.cni.remove(key);
        self.resolved.remove(key);
        self.deleted.insert(key.to_owned());
        true
    }

    /// Forgets what was found or deleted of pods not in `keep` (pods that left the state).
    /// Sandboxes the CNI plugin added are kept: their pod may not be in the state yet.
    pub fn retain(&mut self, keep: &HashSet<String>) {
        self.deleted.retain(|k| keep.contains(k));
        self.resolved.retain(|k, _| keep.contains(k));
    }

    /// The path under which the agent sees a namespace file the runtime named (the same file
    /// name in a netns directory when the runtime's directory is mounted elsewhere).
    fn visible(&self, netns: &Path) -> Option<PathBuf> {
        if netns.exists() {
            return Some(netns.to_owned());
        }
        let name = netns.file_name()?;
        self.netns_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.exists())
    }

    fn dirs(&self) -> String {
        self.netns_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn with_paths(w: &Workload, netns: &Path, cgroup: &Path) -> Workload {
    Workload {
        netns: netns.to_owned(),
        cgroup: cgroup.to_owned(),
        ..w.clone()
    }
}

/// `dir` itself when it is a cgroup v2 directory, else its `unified` subdirectory when that is
/// one (the hybrid layout's cgroup v2 mount below `/sys/fs/cgroup`), else `dir`.
pub fn cgroup2_dir(dir: &Path) -> PathBuf {
    let unified = dir.join("unified");
    if !dir.join("cgroup.controllers").exists() && unified.join("cgroup.controllers").exists() {
        unified
    } else {
        dir.to_owned()
    }
}

/// The pod-level cgroup of `uid` under the kubelet's cgroupfs or systemd layout, if it exists.
pub fn pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    // A UID is a UUID: anything else could walk out of the root.
    if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return None;
    }
    let cgroupfs = CGROUPFS
        .iter()
        .map(|dir| root.join(dir).join(format!("pod{uid}")));
    let underscored = uid.replace('-', "_");
    let systemd = SYSTEMD
        .iter()
        .map(|(dir, prefix)| root.join(dir).join(format!("{prefix}{underscored}.slice")));
    cgroupfs.chain(systemd).find(|p| p.is_dir())
}

/// The network namespace of the processes below `cgroup`: the file in `netns_dirs` with the
/// same inode as the first process's `/proc/PID/ns/net`, else that `/proc` path; `None` when
/// no process runs there.
pub fn netns_of_cgroup(cgroup: &Path, netns_dirs: &[PathBuf]) -> Result<Option<PathBuf>, String> {
    let Some(pid) = first_pid(cgroup) else {
        return Ok(None);
    };
    let proc_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let meta = std::fs::metadata(&proc_path).map_err(|e| {
        format!(
            "reading the network namespace of process {pid} of {}: {e} (the agent needs \
             CAP_SYS_PTRACE to read other users' processes)",
            cgroup.display()
        )
    })?;
    let named = netns_dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev())
        });
    Ok(Some(named.unwrap_or(proc_path)))
}

/// A process of the cgroup tree at `dir` (itself first, then its descendants).
fn first_pid(dir: &Path) -> Option<u32> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
        return Some(pid);
    }
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| first_pid(&e.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b4f7a6e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";

    fn workload(uid: &str) -> Arc<Workload> {
        Arc::new(Workload {
            namespace: "shop".into(),
            name: "api".into(),
            service_account: "api".into(),
            node: "n1".into(),
            ips: vec!["10.0.0.2".parse().expect("address")],
            netns: PathBuf::new(),
            cgroup: PathBuf::new(),
            uid: Some(uid.into()),
            labels: Default::default(),
            capture: Default::default(),
        })
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-sandbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temporary directory");
        dir
    }

    #[test]
    fn the_pod_cgroup_is_found_under_both_kubelet_drivers() {
        for (layout, dir) in [
            ("cgroupfs", format!("kubepods/besteffort/pod{UID}")),
            ("cgroupfs", format!("kubepods/pod{UID}")),
            (
                "systemd",
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                    UID.replace('-', "_")
                ),
            ),
            (
                "systemd",
                format!("kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_")),
            ),
        ] {
            let root = tempdir(layout);
            std::fs::create_dir_all(root.join(&dir)).expect("creating the pod cgroup");
            assert_eq!(
                pod_cgroup(&root, UID),
                Some(root.join(&dir)),
                "{layout}: {dir}"
            );
            assert_eq!(
                pod_cgroup(&root, "0b4f7a6e-0000"),
                None,
                "{layout}: another uid"
            );
            std::fs::remove_dir_all(&root).expect("cleaning up");
        }
    }

    #[test]
    fn the_cgroup2_directory_is_found_in_both_layouts() {
        let Ok(Some(mount)) = crate::preflight::cgroup2_mount() else {
            return;
        };
        assert_eq!(cgroup2_dir(&mount), mount, "the mount itself");
        if mount.ends_with("unified") {
            let parent = mount.parent().expect("a parent");
            assert_eq!(
                cgroup2_dir(parent),
                mount,
                "hybrid layout: its unified directory"
            );
        }
        let plain = tempdir("not-cgroup");
        assert_eq!(cgroup2_dir(&plain), plain, "neither: unchanged");
        std::fs::remove_dir_all(&plain).expect("cleaning up");
    }

    #[test]
    fn a_uid_that_is_not_a_uuid_is_never_a_path() {
        let root = tempdir("traversal");
        std::fs::create_dir_all(root.join("kubepods/pod../x")).expect("mkdir");
        for uid in ["../x", "", "a/b", ".."] {
            assert_eq!(pod_cgroup(&root, uid), None, "{uid:?}");
        }
        std::fs::remove_dir_all(&root).expect("cleaning up");
    }

    #[test]
    fn a_pod_the_cni_plugin_deleted_is_not_running_until_its_next_add() {
        let root = tempdir("cni");
        let cgroup = root.join(format!("kubepods/pod{UID}"));
        std::fs::create_dir_all(&cgroup).expect("creating the pod cgroup");
        let netns = root.join("netns-a");
        std::fs::write(&netns, "").expect("a stand-in namespace file");
        let mut sandboxes = Sandboxes::new(root.clone(), vec![]);
        let w = workload(UID);
        let add = CniSandbox {
            key: "shop/api".into(),
            uid: Some(UID.into()),
            netns: netns.clone(),
            container_id: "c1".into(),
        };
        sandboxes.cni_add(add.clone());
        let resolved = sandboxes
            .resolve(&w)
            .expect("resolved from the CNI sandbox");
        assert_eq!(
            (resolved.netns.clone(), resolved.cgroup.clone()),
            (netns.clone(), cgroup)
        );
        assert!(Arc::ptr_eq(
            &resolved,
            &sandboxes.resolve(&w).expect("cached")
        ));
        assert!(
            !sandboxes.cni_del("shop/api", "c0"),
            "a DEL of an older sandbox"
        );
        assert!(sandboxes.cni_del("shop/api", "c1"));
        assert_eq!(sandboxes.resolve(&w), Err(Unresolved::NotRunning));
        sandboxes.cni_add(add);
        assert!(sandboxes.resolve(&w).is_ok());
        // A CNI sandbox of another pod with the same name is not this one's.
        let other = workload("0b4f7a6e-1c2d-4e5f-8a9b-ffffffffffff");
        assert!(matches!(
            sandboxes.resolve(&other),
            Err(Unresolved::Missing(_))
        ));
        std::fs::remove_dir_all(&root).expect("cleaning up");
    }

    #[test]
    fn without_cni_the_namespace_comes_from_a_process_of_the_pod() {
        let root = tempdir("procs");
        let cgroup = root.join(format!("kubepods/pod{UID}"));
        std::fs::create_dir_all(cgroup.join("container")).expect("creating the cgroups");
        std::fs::write(cgroup.join("cgroup.procs"), "").expect("no process in the pod cgroup");
        let me = std::process::id();
        std::fs::write(cgroup.join("container/cgroup.procs"), format!("{me}\n"))
            .expect("a process in the container cgroup");
        let found = netns_of_cgroup(&cgroup, &[])
            .expect("readable")
            .expect("found from this process");
        assert_eq!(found, PathBuf::from(format!("/proc/{me}/ns/net")));
        std::fs::remove_file(cgroup.join("container/cgroup.procs")).expect("rm");
        std::fs::write(cgroup.join("container/cgroup.procs"), "").expect("empty");
        assert_eq!(netns_of_cgroup(&cgroup, &[]), Ok(None), "no process left");
        let mut sandboxes = Sandboxes::new(root.clone(), vec![]);
        assert_eq!(
            sandboxes.resolve(&workload(UID)),
            Err(Unresolved::NotStarted)
        );
        std::fs::remove_dir_all(&root).expect("cleaning up");
    }
}
