//! What the kernel holds for capture, read back for the admin endpoint (`/config_dump`) and
//! `mesh-agent inspect ebpf|workload|check`: the pinned programs and their ids, each map's
//! fill, and each pod's links: pinned, attached to that pod's cgroup or network namespace, and
//! running this agent's program. Read from the kernel at each request, never from what the
//! agent believes it did: a link detached or unpinned by hand shows as such.

use std::{
    collections::HashMap,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use mesh_common::{maps, programs};
use serde::Serialize;

use super::pins::{Layout, ORDER};
use crate::sys::bpf::{self, LinkTarget};

/// `bpf_map_type` values whose entries are not walked: arrays (always full) and socket
/// storage (no keys to walk); and those that evict instead of filling up (LRU).
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
const BPF_MAP_TYPE_SK_STORAGE: u32 = 24;

/// A pinned program.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramView {
    pub name: &'static str,
    pub pin: PathBuf,
    /// The kernel's program id (`bpftool prog show id N`); `None` when the pin cannot be read.
    pub id: Option<u32>,
    pub problem: Option<String>,
}

/// A pinned map and how full it is.
#[derive(Debug, Clone, Serialize)]
pub struct MapView {
    pub name: &'static str,
    pub id: Option<u32>,
    pub max_entries: Option<u32>,
    /// Entries now (arrays: their size), approximate while the map changes (a walk restarts
    /// when the key it stands on is removed), at most `max_entries`; `None` when not counted.
    pub entries: Option<usize>,
    /// The map evicts its oldest entries when full (LRU) instead of refusing new ones.
    pub evicts: bool,
    pub problem: Option<String>,
}

/// One of a pod's links.
#[derive(Debug, Clone, Serialize)]
pub struct LinkView {
    pub program: &'static str,
    pub pin: PathBuf,
    pub link_id: Option<u32>,
    /// The program the link runs.
    pub prog_id: Option<u32>,
    /// Pinned, attached to this pod's cgroup (network namespace for sk_lookup) and running
    /// this agent's program.
    pub attached: bool,
    /// Why not, when not.
    pub problem: Option<String>,
}

/// The programs pinned in `layout`.
pub fn programs(layout: &Layout) -> Vec<ProgramView> {
    programs::ALL
        .iter()
        .map(|&name| {
            let pin = layout.abi_dir.join(name);
            let id = bpf::obj_get(&pin).and_then(|fd| bpf::prog_id(fd.as_fd()));
            ProgramView {
                name,
                id: id.as_ref().ok().copied(),
                problem: id
                    .err()
                    .map(|e| format!("cannot read {}: {e}", pin.display())),
                pin,
            }
        })
        .collect()
}

/// The maps pinned in `layout`, with their fill: up to one system call per entry (a blocking
/// walk; call it where blocking is allowed).
pub fn maps(layout: &Layout) -> Vec<MapView> {
    maps::ALL
        .iter()
        .map(|&name| {
            let pin = layout.abi_dir.join(name);
            let read = || -> std::io::Result<(bpf::MapInfo, Option<usize>)> {
                let fd = bpf::obj_get(&pin)?;
                let info = bpf::map_info(fd.as_fd())?;
                let entries = match info.map_type {
                    BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY => {
                        Some(info.max_entries as usize)
                    }
                    BPF_MAP_TYPE_SK_STORAGE => None,
                    _ => Some(bpf::count_entries(
                        fd.as_fd(),
                        info.key_size,
                        info.max_entries as usize,
                    )?),
                };
                Ok((info, entries))
            };
            match read() {
                Ok((info, entries)) => MapView {
                    name,
                    id: Some(info.id),
                    max_entries: Some(info.max_entries),
                    entries,
                    evicts: matches!(
                        info.map_type,
                        BPF_MAP_TYPE_LRU_HASH | BPF_MAP_TYPE_LRU_PERCPU_HASH
                    ),
                    problem: None,
                },
                Err(e) => MapView {
                    name,
                    id: None,
                    max_entries: None,
                    entries: None,
                    evicts: false,
                    problem: Some(format!("cannot read {}: {e}", pin.display())),
                },
            }
        })
        .collect()
}

/// The links pinned in a pod's directory `dir`, checked against the pod's cgroup (directory)
/// and network namespace inode, and against the programs this agent loaded (`programs`).
pub fn links(
    dir: &Path,
    cgroup: &Path,
    netns_ino: Option<u64>,
    programs: &[ProgramView],
) -> Vec<LinkView> {
    use std::os::unix::fs::MetadataExt as _;
    let cgroup_id = std::fs::metadata(cgroup).map(|m| m.ino()).ok();
    let loaded: HashMap<&str, u32> = programs
        .iter()
        .filter_map(|p| Some((p.name, p.id?)))
        .collect();
    ORDER
        .iter()
        .map(|&program| {
            let pin = dir.join(program);
            let mut view = LinkView {
                program,
                pin: pin.clone(),
                link_id: None,
                prog_id: None,
                attached: false,
                problem: None,
            };
            let info = match bpf::obj_get(&pin).and_then(|fd| bpf::link_info(fd.as_fd())) {
                Ok(info) => info,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    view.problem = Some(format!(
                        "no link pinned at {}: the program is not attached to the pod",
                        pin.display()
                    ));
                    return view;
                }
                Err(e) => {
                    view.problem = Some(format!("cannot read the link {}: {e}", pin.display()));
                    return view;
                }
            };
            view.link_id = Some(info.id);
            view.prog_id = Some(info.prog_id);
            let here = super::pins::attached_to(info.target, cgroup_id, netns_ino);
            view.problem = match (here, loaded.get(program)) {
                (false, _) => Some(match info.target {
                    LinkTarget::Cgroup(None) | LinkTarget::Netns(None) => format!(
                        "link {} is detached (its target is gone, or it was detached by hand)",
                        info.id
                    ),
                    _ => format!("link {} is attached elsewhere, not to this pod", info.id),
                }),
                (true, Some(id)) if *id != info.prog_id => Some(format!(
                    "link {} runs program {}, not this agent's {program} ({id})",
                    info.id, info.prog_id
                )),
                (true, None) => Some(format!(
                    "link {} runs program {}, and this agent's {program} cannot be read",
                    info.id, info.prog_id
                )),
                (true, Some(_)) => None,
            };
            view.attached = view.problem.is_none();
            view
        })
        .collect()
}
