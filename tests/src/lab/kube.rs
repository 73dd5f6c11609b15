//! The lab's Kubernetes mode (`LabOptions::kube`, `cargo xtask lab up --kube`): KMock's API
//! emulator (an independent in-memory Kubernetes API, PyPI `kmock`, launched by
//! `mesh-agent/tests/kube_emulator.py`) serves the lab's namespaces, pods and services, and the
//! agents learn the mesh from it (`discovery: kube`). The emulator runs inside node n1's network
//! namespace on n1's underlay address, so that every node's agent reaches it, and in a cgroup of
//! the lab, so that teardown ends it with the rest. Every pod is laid out as the kubelet lays
//! pods out; the API names it by UID.

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
        let n1 = self
            .layout
            .nodes
            .first()
            .context("the lab has no node")?
            .name
            .clone();
        let out = self
            .try_command(&n1, "curl")?
            .args(["-sS", "--fail-with-body", "-X", method, "-H"])
            .arg(format!("Content-Type: {content_type}"))
            .arg("--data-binary")
            .arg(body.to_string())
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
        Ok(())
    }

    /// Creates an object (`path`: its collection).
    pub fn kube_create(&self, path: &str, object: Value) -> Result<()> {
        self.kube_call("POST", path, "application/json", &object)
    }

    /// Merge-patches an object.
    pub fn kube_patch(&self, path: &str, patch: Value) -> Result<()> {
        self.kube_call("PATCH", path, "application/merge-patch+json", &patch)
    }

    /// Sets a label on a namespace (`mesh-agent/enabled=true` meshes it).
    pub fn label_namespace(&self, namespace: &str, key: &str, value: &str) -> Result<()> {
        self.kube_patch(
            &format!("/api/v1/namespaces/{namespace}"),
            json!({"metadata": {"labels": {key: value}}}),
        )
    }

    /// The topology as API objects, as a cluster's API server would hold them: namespaces
    /// (meshed ones labelled `mesh-agent/enabled=true`), pods by UID with their addresses (as
    /// their kubelet reported them), services with one EndpointSlice of the pods they select.
    pub(crate) fn publish(&self) -> Result<()> {
        for ns in &self.topology.namespaces {
            let labels = if ns.enabled {
                json!({"mesh-agent/enabled": "true"})
            } else {
                json!({})
            };
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
                       "status": {"phase": "Running", "podIP": p.ip.to_string(),
                                  "podIPs": [{"ip": p.ip.to_string()}]}}),
            )?;
        }
        for svc in &self.topology.services {
            let ports: Vec<Value> = svc
                .ports
                .iter()
                .map(|p| {
                    json!({"name": format!("p{}", p.port), "port": p.port,
                                "targetPort": p.target_port, "protocol": "TCP"})
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
}
