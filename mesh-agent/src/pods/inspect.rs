//! What the pod lifecycle manager tells the admin endpoint (`/config_dump`, `/why`): each pod of
//! this node it serves or holds closed, with its links as the kernel has them, the pods it
//! could not serve and why, and the programs. Answered by the capture task between two changes
//! ([`super::Command::Inspect`]), so it never sees a pod half captured; a few system calls per
//! pod (the maps' fill, which walks them, is read outside the task: `inspect::Node`).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::Serialize;

use super::Manager;
use crate::capture::inspect::{self, LinkView, ProgramView};

/// The capture state of this node.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureView {
    /// Pods served: captured, with listeners and identity.
    pub served: Vec<ServedView>,
    /// Pods whose capture is pinned and that no listener serves: their connections are
    /// refused (pinned by an earlier agent and not adopted yet, or not servable).
    pub closed: Vec<ClosedView>,
    /// Pods of this node the state says to capture that are not served, with why.
    pub failed: BTreeMap<String, String>,
    /// Pods named by UID whose sandbox has no process yet.
    pub not_started: Vec<String>,
    pub programs: Vec<ProgramView>,
}

/// A served pod.
#[derive(Debug, Clone, Serialize)]
pub struct ServedView {
    pub pod: String,
    pub ips: Vec<IpAddr>,
    pub identity: String,
    pub netns_cookie: u64,
    pub cgroup: PathBuf,
    /// Connections reach the application from the client's address.
    pub client_address: bool,
    pub links: Vec<LinkView>,
}

/// A pod held closed.
#[derive(Debug, Clone, Serialize)]
pub struct ClosedView {
    pub pod: String,
    pub netns_cookie: u64,
    pub pin_dir: PathBuf,
}

impl Manager {
    /// The capture state now; `failed` and `not_started` from the last reconcile.
    pub fn inspect(
        &self,
        failed: &BTreeMap<String, String>,
        not_started: &[String],
    ) -> CaptureView {
        let programs = inspect::programs(&self.layout);
        let served = self
            .pods
            .iter()
            .map(|(key, pod)| {
                let kernel = pod.kernel();
                let w = pod.workload();
                ServedView {
                    pod: key.clone(),
                    ips: w.ips.clone(),
                    identity: pod.identity().to_string(),
                    netns_cookie: pod.netns_cookie(),
                    cgroup: w.cgroup.clone(),
                    client_address: pod.proxy().client_address,
                    links: inspect::links(
                        kernel.pin_dir(),
                        &w.cgroup,
                        kernel.netns().inode().ok(),
                        &programs,
                    ),
                }
            })
            .collect();
        CaptureView {
            served,
            closed: self
                .pinned
                .iter()
                .map(|p| ClosedView {
                    pod: p.key.clone(),
                    netns_cookie: p.netns_cookie,
                    pin_dir: p.dir.clone(),
                })
                .collect(),
            failed: failed.clone(),
            not_started: not_started.to_vec(),
            programs,
        }
    }
}
