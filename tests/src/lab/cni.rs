//! The container runtime's side of the CNI plugin: `mesh-agent cni` run exactly as a runtime
//! runs a chained plugin (`CNI_*` environment, the network configuration with the primary
//! plugin's `prevResult` on stdin). The lab's own network plays the primary plugin (`bridge` in
//! the node's conflist): the pod's interface and address exist before the chain runs.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{agent::agent_bin, layout::Pod, Lab};

/// The conflist the lab writes on each node, as `mesh-agent cni install` leaves it.
pub(crate) const CONFLIST: &str = "10-lab.conflist";

/// What one run of the plugin printed, and its exit status.
#[derive(Debug, Clone)]
pub struct CniRun {
    /// The exit status (`-1` when a signal ended it).
    pub status: i32,
    /// Its stdout: the result (or the error object) in JSON.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl CniRun {
    /// The stdout as JSON; panics naming what it printed if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

impl std::fmt::Display for CniRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}: {} {}",
            self.status,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// The primary plugin's result for `pod`, as the runtime passes it to a chained plugin.
fn prev_result(pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.netns}],
        "ips": [{"address": format!("{}/24", pod.ip), "interface": 0}],
    })
}

/// The container id the lab's runtime gives `pod`'s sandbox (a runtime's is 64 hex digits).
pub(crate) fn sandbox_id(pod: &Pod) -> String {
    format!("sandbox-{}", pod.uid.as_deref().unwrap_or(&pod.netns_name))
}

impl Lab {
    /// Runs `mesh-agent cni` for `pod` (`ns/name`) with `command` (ADD, DEL, CHECK, VERSION)
    /// and sandbox `container`, as a container runtime runs the chained plugin configured in
    /// the pod's node's conflist. An error only when the plugin could not be run; its own
    /// failures are in the returned exit status and JSON.
    pub fn cni(&self, command: &str, pod: &str, container: &str) -> Result<CniRun> {
        let p = self
            .find_pod(pod)
            .with_context(|| format!("lab {} has no pod {pod:?}", self.id()))?;
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": "lab-pod-network",
            "type": "mesh-agent-cni",
            "socket": self.cni_socket(&p.node),
            "prevResult": prev_result(p),
        });
        let mut child = Command::new(agent_bin())
            .arg("cni")
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", &p.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
                     K8S_POD_INFRA_CONTAINER_ID={container};K8S_POD_UID={}",
                    p.namespace,
                    p.name,
                    p.uid.as_deref().unwrap_or_default()
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} cni", agent_bin().display()))?;
        child
            .stdin
            .take()
            .context("the plugin's stdin")?
            .write_all(conf.to_string().as_bytes())
            .context("writing the network configuration to the plugin")?;
        let out = child.wait_with_output().context("running the CNI plugin")?;
        Ok(CniRun {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs the chain of `pod`'s node conflist after its primary plugin (the lab's own network)
    /// for `command`; fails with the plugin's answer unless it succeeds.
    pub(crate) fn cni_chain(&self, command: &str, pod: &Pod) -> Result<()> {
        let path = self.cni_conf_dir(&pod.node).join(CONFLIST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let conflist: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let plugins = conflist["plugins"].as_array().cloned().unwrap_or_default();
        for plugin in plugins.iter().skip(1) {
            match plugin["type"].as_str() {
                Some("mesh-agent-cni") => {
                    let ran = self.cni(command, &pod.full_name(), &sandbox_id(pod))?;
                    if ran.status != 0 {
                        bail!(
                            "CNI {command} of pod {} failed (mesh-agent-cni, {ran})",
                            pod.full_name()
                        );
                    }
                }
                other => bail!(
                    "{}: the lab runs no CNI plugin of type {other:?}",
                    path.display()
                ),
            }
        }
        Ok(())
    }
}
