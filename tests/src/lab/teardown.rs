//! Tearing a lab down (by id, tolerant of half-built labs) and sweeping leftovers of dead labs.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, Context, Result};

use super::{
    agent::AgentProcess,
    layout::{BPF_ROOT, CGROUP_DIR, NETNS_PREFIX, RUN_ROOT},
    net, sys,
};

/// How long agents get after SIGTERM (they exit once their connections have ended).
const AGENT_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long agents get after the second signal (exit at once) before SIGKILL.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed cgroup may take to empty before rmdir gives up.
const CGROUP_EMPTY_TIMEOUT: Duration = Duration::from_secs(10);
/// A run dir without an owner file younger than this may be a lab being created right now.
const OWNERLESS_GRACE: Duration = Duration::from_secs(60);

/// Removes everything of lab `id`: agents (ours, and any pid recorded in the run dir that is still
/// a mesh-agent), processes in its cgroups, its network namespaces, cgroups, bpffs and run dirs.
/// Keeps going after errors and reports them all at the end. Returns what it removed.
pub(crate) fn teardown(id: &str, agents: &mut Vec<AgentProcess>) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    let run_dir = Path::new(RUN_ROOT).join(id);

    // 1. Agents: SIGTERM (they exit once idle), then a second signal (they exit at once,
    //    resetting what is still open), then SIGKILL. Capture stays pinned until step 5.
    for recorded in recorded_agents(&run_dir) {
        if !agents.iter().any(|a| a.pid == recorded.pid) {
            agents.push(recorded);
        }
    }
    for (signal, grace) in [
        (libc::SIGTERM, AGENT_IDLE_TIMEOUT),
        (libc::SIGINT, AGENT_STOP_TIMEOUT),
    ] {
        for agent in agents.iter_mut() {
            if agent.running() {
                if let Err(e) = sys::kill(agent.pid, signal) {
                    errors.push(format!(
                        "signal {signal} to agent of node {} (pid {}): {e}",
                        agent.node, agent.pid
                    ));
                }
            }
        }
        let deadline = Instant::now() + grace;
        for agent in agents.iter_mut() {
            sys::poll_until(deadline.saturating_duration_since(Instant::now()), || {
                !agent.running()
            });
        }
    }
    for agent in agents.iter_mut() {
        if agent.running() {
            errors.push(format!(
                "agent of node {} (pid {}) ignored SIGTERM and SIGINT; killed it",
                agent.node, agent.pid
            ));
            // Best effort: it may have exited in between.
            let _ = sys::kill(agent.pid, libc::SIGKILL);
            sys::poll_until(Duration::from_secs(5), || !agent.running());
        }
        removed.push(format!("agent of node {} (pid {})", agent.node, agent.pid));
    }
    agents.clear();

    // 2. Whatever still runs in the lab's cgroups (pod processes, agent helpers).
    let cgroup_dir = sys::cgroup2_mount()
        .ok()
        .map(|m| m.join(CGROUP_DIR).join(id));
    if let Some(dir) = cgroup_dir.as_ref().filter(|d| d.exists()) {
        if let Err(e) = std::fs::write(dir.join("cgroup.kill"), "1") {
            errors.push(format!(
                "killing the processes of cgroup {}: {e}",
                dir.display()
            ));
        }
    }

    // 3. Network namespaces.
    match net::list_netns() {
        Ok(names) => {
            let prefix = format!("{NETNS_PREFIX}{id}-");
            for name in names.into_iter().filter(|n| n.starts_with(&prefix)) {
                match net::del_netns(&name) {
                    Ok(()) => removed.push(format!("netns {name}")),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }

    // 4. cgroups, once empty.
    if let Some(dir) = cgroup_dir.filter(|d| d.exists()) {
        match remove_cgroup_tree(&dir, Instant::now() + CGROUP_EMPTY_TIMEOUT) {
            Ok(()) => removed.push(format!("cgroup {}", dir.display())),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }

    // 5. bpffs pins and the run dir (last: its existence marks the lab as alive for sweep).
    for dir in [Path::new(BPF_ROOT).join(id), run_dir] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(dir.display().to_string()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
        }
    }

    if errors.is_empty() {
        Ok(removed)
    } else {
        Err(anyhow!("tearing down lab {id}: {}", errors.join("; ")))
    }
}

/// Agents recorded in `agent-<node>.pid` files of a run dir (every generation, in order).
pub(crate) fn recorded_agents(run_dir: &Path) -> Vec<AgentProcess> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut agents = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(node) = name
            .strip_prefix("agent-")
            .and_then(|n| n.strip_suffix(".pid"))
        else {
            continue;
        };
        let pids = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for (i, pid) in pids
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .enumerate()
        {
            agents.push(AgentProcess {
                node: node.to_owned(),
                pid,
                generation: u32::try_from(i + 1).unwrap_or(u32::MAX),
                child: None,
            });
        }
    }
    agents
}

/// Removes a cgroup directory and its children (deepest first), retrying while they empty.
fn remove_cgroup_tree(dir: &Path, deadline: Instant) -> Result<()> {
    let children: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect(),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing cgroup {}", dir.display())),
    };
    for child in children {
        remove_cgroup_tree(&child, deadline)?;
    }
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                return Err(anyhow!(
                    "removing cgroup {}: {e}; processes still in it: [{}]",
                    dir.display(),
                    procs.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
        }
    }
}

/// The owner pid of a lab's run dir: `Some(0)` for a persistent lab, `None` if unreadable.
pub(crate) fn owner(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(run_dir.join("owner"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Removes the leftovers of labs whose owner process is dead (owner 0, a persistent lab, is kept),
/// and lab network namespaces, cgroups and bpffs directories whose run dir no longer exists.
/// Returns a description of everything removed.
pub fn sweep() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();

    for (id, run_dir) in subdirs(Path::new(RUN_ROOT)) {
        let dead = match owner(&run_dir) {
            Some(0) => false,
            Some(pid) => !sys::process_alive(pid),
            None => std::fs::metadata(&run_dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > OWNERLESS_GRACE),
        };
        if dead {
            match teardown(&id, &mut Vec::new()) {
                Ok(_) => removed.push(format!("lab {id} (its owner process is gone)")),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }

    let orphan = |id: &str| !Path::new(RUN_ROOT).join(id).exists();
    for name in net::list_netns()? {
        let Some(id) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if orphan(id) {
            match net::del_netns(&name) {
                Ok(()) => removed.push(format!("netns {name} (no run dir)")),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    if let Ok(mount) = sys::cgroup2_mount() {
        for (id, dir) in subdirs(&mount.join(CGROUP_DIR)) {
            if orphan(&id) {
                // Best effort: the rmdir below reports a cgroup that does not empty.
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
                match remove_cgroup_tree(&dir, Instant::now() + CGROUP_EMPTY_TIMEOUT) {
                    Ok(()) => removed.push(format!("cgroup {} (no run dir)", dir.display())),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
    }
    for (id, dir) in subdirs(Path::new(BPF_ROOT)) {
        if orphan(&id) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed.push(format!("{} (no run dir)", dir.display())),
                Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
            }
        }
    }

    // The shared parents, once no lab is left in them (rmdir fails on a non-empty one). Not
    // reported: they are created again by the next lab, not leftovers of a broken one.
    let mut roots = vec![PathBuf::from(RUN_ROOT), PathBuf::from(BPF_ROOT)];
    if let Ok(mount) = sys::cgroup2_mount() {
        roots.push(mount.join(CGROUP_DIR));
    }
    for root in roots {
        let _ = std::fs::remove_dir(root);
    }

    if errors.is_empty() {
        Ok(removed)
    } else {
        Err(anyhow!("sweeping lab leftovers: {}", errors.join("; ")))
    }
}

/// `(name, path)` of the subdirectories of `dir` (none if it does not exist).
fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect()
}
