//! The lab's waypoints: for each `waypoints` entry of the topology, `mesh-agent waypoint` runs
//! in every pod its service selects, as a pod's process (its network namespace and cgroup:
//! the node agent's workload API knows it by that cgroup), detached like the agents, with its
//! configuration, log and pid in the run dir. Teardown ends them with their pods' cgroups.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{layout::Layout, sys, topology::Topology};

/// The configuration file of the waypoint running in `ns/pod`.
pub(crate) fn config_path(layout: &Layout, ns: &str, pod: &str) -> PathBuf {
    layout.run_dir.join(format!("waypoint-{ns}-{pod}.yaml"))
}

/// Its log.
pub(crate) fn log_path(layout: &Layout, ns: &str, pod: &str) -> PathBuf {
    layout.run_dir.join(format!("waypoint-{ns}-{pod}.log"))
}

/// The pods that run waypoints: those the waypoint services of the topology select, with the
/// waypoint's name.
pub(crate) fn pods(topology: &Topology) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for w in &topology.waypoints {
        let Some(service) = topology
            .services
            .iter()
            .find(|s| s.namespace == w.namespace && s.name == w.name)
        else {
            continue;
        };
        for pod in topology.pods.iter().filter(|p| {
            p.namespace == w.namespace
                && service
                    .selector
                    .iter()
                    .all(|(k, v)| p.labels.get(k) == Some(v))
        }) {
            out.push((pod.namespace.clone(), pod.name.clone(), w.name.clone()));
        }
    }
    out
}

/// What [`start`] starts.
pub(crate) struct Start<'a> {
    pub ns: &'a str,
    pub pod: &'a str,
    /// The waypoint's name (its service).
    pub name: &'a str,
    pub bin: &'a Path,
    /// The Kubernetes mode's kubeconfig (`discovery: kube`); the state file otherwise.
    pub kubeconfig: Option<&'a Path>,
}

/// Starts a waypoint and waits until it serves.
pub(crate) fn start(layout: &Layout, start: Start<'_>, timeout: Duration) -> Result<u32> {
    let Start {
        ns,
        pod: pod_name,
        name,
        bin,
        kubeconfig,
    } = start;
    let pod = layout
        .pods
        .iter()
        .find(|p| p.namespace == ns && p.name == pod_name)
        .with_context(|| format!("no pod {ns}/{pod_name}"))?;
    let config = config_path(layout, ns, pod_name);
    let source = match kubeconfig {
        Some(path) => format!(
            "discovery: kube\nkube: {{kubeconfig: {}}}\n",
            path.display()
        ),
        None => format!(
            "state_file: {}\nstate_poll_interval_ms: 100\n",
            layout.state_path().display()
        ),
    };
    sys::write_atomic(
        &config,
        format!(
            "namespace: {ns}\nname: {name}\n{source}identity: {{workload_socket: {}}}\n",
            layout.workload_socket(&pod.node).display()
        )
        .as_bytes(),
    )?;
    let log_path = log_path(layout, ns, pod_name);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let log_err = log.try_clone().context("duplicating the log handle")?;
    let mut cmd = Command::new(bin);
    cmd.args(["waypoint", "--config"]).arg(&config);
    if std::env::var_os("MESH_LOG").is_none() {
        cmd.env("MESH_LOG", "info");
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
    sys::enter(
        &mut cmd,
        sys::Enter {
            cgroup: Some(&pod.process_cgroup),
            netns: Some(&pod.netns),
            setsid: true,
        },
    )?;
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the waypoint in {ns}/{pod_name}"))?;
    let pid = child.id();
    sys::write_atomic(
        &layout.run_dir.join(format!("waypoint-{ns}-{pod_name}.pid")),
        format!("{pid}\n").as_bytes(),
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("waypoint serving") {
            // Reaped by whoever tears the lab down (the pod's cgroup is killed).
            std::mem::forget(child);
            return Ok(pid);
        }
        if let Some(status) = child.try_wait().context("waiting on the waypoint")? {
            bail!(
                "the waypoint in {ns}/{pod_name} exited ({status}); {}:\n{text}",
                log_path.display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the waypoint in {ns}/{pod_name} did not serve within {timeout:?}; {}:\n{text}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
