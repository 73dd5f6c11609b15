//! The file source: the mesh state as YAML (docs/formats.md), polled for changes. An invalid
//! file is rejected with an error naming the entry and field, and the last good state keeps
//! serving.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use tracing::{error, info};

use super::Error;
use crate::{
    config::CaptureExclusions,
    metrics::Metrics,
    state::{ServicePort, Snapshot, Store, Workload},
};

/// The state file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub capture: CaptureExclusions,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePortSpec {
    pub port: u16,
    pub target_port: u16,
}

fn default_service_account() -> String {
    "default".into()
}

impl TryFrom<StateFile> for Snapshot {
    type Error = String;

    fn try_from(file: StateFile) -> Result<Self, String> {
        let mut snap = Snapshot::default();
        for (i, ns) in file.namespaces.iter().enumerate() {
            if ns.name.is_empty() {
                return Err(format!("namespaces[{i}].name is empty"));
            }
            if snap
                .namespaces
                .insert(ns.name.clone(), ns.enabled)
                .is_some()
            {
                return Err(format!(
                    "namespaces[{i}]: namespace {} is listed twice",
                    ns.name
                ));
            }
        }
        let mut names = HashSet::new();
        let mut ips = HashMap::new();
        for (i, w) in file.workloads.into_iter().enumerate() {
            let key = format!("{}/{}", w.namespace, w.name);
            let at = format!("workloads[{i}] ({key})");
            if w.name.is_empty() || w.namespace.is_empty() {
                return Err(format!(
                    "workloads[{i}]: name and namespace must not be empty"
                ));
            }
            if !names.insert(key.clone()) {
                return Err(format!("{at}: listed twice"));
            }
            if w.ips.is_empty() {
                return Err(format!("{at}.ips: a workload needs at least one address"));
            }
            for ip in &w.ips {
                if let Some(other) = ips.insert(*ip, key.clone()) {
                    return Err(format!("{at}.ips: {ip} is also the address of {other}"));
                }
            }
            if !w.netns.is_absolute() {
                return Err(format!(
                    "{at}.netns: {} is not an absolute path",
                    w.netns.display()
                ));
            }
            if !w.cgroup.is_absolute() {
                return Err(format!(
                    "{at}.cgroup: {} is not an absolute path",
                    w.cgroup.display()
                ));
            }
            w.capture
                .validate()
                .map_err(|e| format!("{at}.capture.{e}"))?;
            let workload = Arc::new(Workload {
                namespace: w.namespace,
                name: w.name,
                service_account: w.service_account,
                node: w.node,
                ips: w.ips,
                netns: w.netns,
                cgroup: w.cgroup,
                labels: w.labels,
                capture: w.capture,
            });
            for ip in &workload.ips {
                snap.workloads_by_ip.insert(*ip, workload.clone());
            }
            snap.workloads.push(workload);
        }
        for (i, s) in file.services.iter().enumerate() {
            let key = format!("{}/{}", s.namespace, s.name);
            let at = format!("services[{i}] ({key})");
            if s.vips.is_empty() {
                return Err(format!("{at}.vips: a service needs at least one address"));
            }
            for (j, p) in s.ports.iter().enumerate() {
                if p.port == 0 || p.target_port == 0 {
                    return Err(format!("{at}.ports[{j}]: port 0 is not a valid port"));
                }
                let endpoints: Vec<SocketAddr> = snap
                    .workloads
                    .iter()
                    .filter(|w| w.namespace == s.namespace && selects(&s.selector, &w.labels))
                    .flat_map(|w| w.ips.iter().map(|ip| SocketAddr::new(*ip, p.target_port)))
                    .collect();
                for vip in &s.vips {
                    let vip_port = SocketAddr::new(*vip, p.port);
                    let port = Arc::new(ServicePort::new(key.clone(), endpoints.clone()));
                    if let Some(other) = snap.services.insert(vip_port, port) {
                        return Err(format!(
                            "{at}: {vip_port} is also a port of {}",
                            other.service
                        ));
                    }
                }
            }
        }
        Ok(snap)
    }
}

/// An empty selector selects nothing (as a Kubernetes Service without selector).
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Parses state file text.
pub fn parse(path: &Path, text: &str) -> Result<Snapshot, Error> {
    let file: StateFile = serde_yaml::from_str(text).map_err(|source| Error::Parse {
        path: path.to_owned(),
        source,
    })?;
    Snapshot::try_from(file).map_err(|message| Error::Invalid {
        path: path.to_owned(),
        message,
    })
}

/// Loads the file once (the agent refuses to start on an invalid first state).
pub fn load(path: &Path) -> Result<(Snapshot, Vec<u8>), Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let snap = parse(path, &String::from_utf8_lossy(&bytes))?;
    Ok((snap, bytes))
}

/// Polls the file and applies each valid change; an invalid change is logged and counted once
/// per distinct content, and the last good state stays in force.
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    mut last: Vec<u8>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_bad: Option<Vec<u8>> = None;
    loop {
        tick.tick().await;
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(source) => {
                if last_bad.as_deref() != Some(&[]) {
                    error!(error = %Error::Read { path: path.clone(), source }, "keeping the last good state");
                    metrics
                        .state_reloads
                        .get_or_create(&crate::metrics::Result::error())
                        .inc();
                    last_bad = Some(Vec::new());
                }
                continue;
            }
        };
        if bytes == last || last_bad.as_ref() == Some(&bytes) {
            continue;
        }
        match parse(&path, &String::from_utf8_lossy(&bytes)) {
            Ok(snap) => {
                info!(path = %path.display(), workloads = snap.workloads.len(), services = snap.services.len(), "state reloaded");
                store.replace(snap);
                metrics
                    .state_reloads
                    .get_or_create(&crate::metrics::Result::ok())
                    .inc();
                last = bytes;
                last_bad = None;
            }
            Err(e) => {
                error!(error = %e, "state change rejected; keeping the last good state");
                metrics
                    .state_reloads
                    .get_or_create(&crate::metrics::Result::error())
                    .inc();
                last_bad = Some(bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
namespaces: [{name: shop, enabled: true}, {name: legacy}]
workloads:
  - {name: api, namespace: shop, node: n2, ips: [10.240.2.2], netns: /run/netns/a, cgroup: /cg/a, labels: {app: api}}
  - {name: api2, namespace: shop, node: n1, ips: [10.240.1.9], netns: /run/netns/b, cgroup: /cg/b, labels: {app: api}}
  - {name: client, namespace: legacy, node: n1, ips: [10.240.1.3], netns: /run/netns/c, cgroup: /cg/c, labels: {app: api}}
services:
  - {name: api, namespace: shop, vips: [10.240.100.10], ports: [{port: 80, target_port: 8080}], selector: {app: api}}
"#;

    fn parse_str(text: &str) -> Result<Snapshot, String> {
        parse(Path::new("state.yaml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_and_selects_endpoints_in_the_service_namespace() {
        let snap = parse_str(GOOD).expect("valid");
        assert!(snap.namespace_enabled("shop"));
        assert!(!snap.namespace_enabled("legacy"));
        assert!(!snap.namespace_enabled("unknown"));
        let vip: SocketAddr = "10.240.100.10:80".parse().expect("addr");
        let port = snap.services.get(&vip).expect("service port");
        let eps: Vec<String> = port.endpoints.iter().map(|e| e.to_string()).collect();
        assert_eq!(eps, ["10.240.2.2:8080", "10.240.1.9:8080"]);
        let on_n1: Vec<String> = snap.captured_on("n1").map(|w| w.key()).collect();
        assert_eq!(on_n1, ["shop/api2"]);
        assert_eq!(snap.workloads[0].service_account, "default");
    }

    #[test]
    fn errors_name_the_entry_and_field() {
        let cases = [
            (GOOD.replace("ips: [10.240.1.3]", "ips: [10.240.2.2]"), "workloads[2] (legacy/client).ips: 10.240.2.2 is also the address of shop/api"),
            (GOOD.replace("netns: /run/netns/b", "netns: rel/b"), "workloads[1] (shop/api2).netns"),
            (GOOD.replace("target_port: 8080", "target_port: 0"), "services[0] (shop/api).ports[0]"),
            (GOOD.replace("ips: [10.240.2.2]", "ips: [10.240.2.300]"), "ips"),
            (GOOD.replace("labels: {app: api}}", "labels: {app: api}, colour: red}"), "colour"),
            (GOOD.replace("ips: [10.240.1.9]", "ips: []"), "workloads[1] (shop/api2).ips"),
            (format!("{GOOD}\n  - {{name: api, namespace: shop, vips: [10.240.100.10], ports: [{{port: 80, target_port: 1}}]}}"), "10.240.100.10:80 is also a port of shop/api"),
        ];
        for (text, want) in cases {
            let err = parse_str(&text).expect_err(want);
            assert!(err.contains(want), "error {err:?} should contain {want:?}");
        }
    }
}
