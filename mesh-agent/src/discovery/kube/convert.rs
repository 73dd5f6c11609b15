//! Kubernetes objects into state objects: the one place where the API's Namespaces, Pods,
//! Services, EndpointSlices and Istio AuthorizationPolicies become what the file source
//! produces too (`state::Namespace`, `state::Workload`, `state::Service`, `policy::Policy`).
//! Each conversion is a `TryFrom`; an error names the object (`Pod shop/api-1`) and the field
//! (`status.podIPs[1].ip`).
//!
//! Rules (docs/kubernetes.md):
//! - a namespace is meshed when it has the enablement label (`kube.enabled_label` =
//!   `kube.enabled_value`, default `mesh-agent/enabled=true`), or
//!   `istio.io/dataplane-mode=ambient` when `kube.accept_istio_ambient` is set;
//! - a pod is a workload once it has addresses and until it has finished; hostNetwork pods and
//!   pods labelled `<enabled_label>=false` are not workloads of the mesh (never captured; traffic
//!   to them is plain TCP). A pod object does not say where its network namespace and cgroup
//!   are: those stay empty, and the node's pod lifecycle manager finds them for its own pods;
//! - a Service's endpoints are the ready endpoints of its EndpointSlices (several merged), each
//!   with the port its slice gives for the service port's name (named target ports are
//!   resolved per pod by the EndpointSlice controller). Headless and ExternalName services have
//!   no VIP and are not services of the state;
//! - an AuthorizationPolicy is checked as the state file's are (`discovery::policies`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use ::kube::core::DynamicObject;
use k8s_openapi::{
    api::{
        core::v1::{Namespace as KubeNamespace, Pod, Service as KubeService},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{Error, ObjectName};
use crate::{
    config::{CaptureExclusions, KubeConfig},
    discovery::policies,
    policy::{Invalid, Policy},
    state::{self, PortMapping, Workload},
};

/// The namespace label Istio ambient's users put on the namespaces it captures.
pub const ISTIO_DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The label of an EndpointSlice that names its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The namespace label that names its waypoint (the service of the namespace whose pods are
/// the waypoint), as Istio's `istio.io/use-waypoint`.
pub const WAYPOINT_LABEL: &str = "mesh-agent/waypoint";

/// What decides enablement: the agent's `kube` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The enablement label's key (namespaces; pods opt out with it set to `false`).
    pub label: String,
    /// The value that enables a namespace.
    pub value: String,
    /// `istio.io/dataplane-mode=ambient` enables a namespace too.
    pub istio_ambient: bool,
}

impl From<&KubeConfig> for Rules {
    fn from(c: &KubeConfig) -> Self {
        Self {
            label: c.enabled_label.clone(),
            value: c.enabled_value.clone(),
            istio_ambient: c.accept_istio_ambient,
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Self::from(&KubeConfig::default())
    }
}

impl Rules {
    fn namespace_enabled(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.get(&self.label) == Some(&self.value)
            || (self.istio_ambient
                && labels.get(ISTIO_DATAPLANE_MODE).map(String::as_str) == Some("ambient"))
    }

    fn pod_opted_out(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.get(&self.label).map(String::as_str) == Some("false")
    }
}

/// The object's name from its metadata; an object without a name is invalid.
fn object_name(kind: &'static str, meta: &ObjectMeta) -> Result<ObjectName, Error> {
    let namespace = meta.namespace.clone().unwrap_or_default();
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => Ok(ObjectName {
            kind,
            namespace,
            name: name.to_owned(),
        }),
        _ => Err(Error::Invalid {
            object: ObjectName {
                kind,
                namespace,
                name: "(unnamed)".into(),
            },
            field: "metadata.name".into(),
            message: "missing".into(),
        }),
    }
}

fn invalid(object: &ObjectName, field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Invalid {
        object: object.clone(),
        field: field.into(),
        message: message.into(),
    }
}

/// An address as the API writes it, never as IPv4-mapped IPv6 (a second name for an IPv4
/// address).
fn parse_ip(object: &ObjectName, field: &str, text: &str) -> Result<IpAddr, Error> {
    let ip: IpAddr = text
        .parse()
        .map_err(|_| invalid(object, field, format!("{text:?} is not an IP address")))?;
    if let IpAddr::V6(v6) = ip {
        if let Some(v4) = v6.to_ipv4_mapped() {
            return Err(invalid(
                object,
                field,
                format!("{text} is an IPv4-mapped IPv6 address (of {v4})"),
            ));
        }
    }
    Ok(ip)
}

fn parse_port(object: &ObjectName, field: &str, port: i32) -> Result<u16, Error> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(object, field, format!("{port} is not a port (1 to 65535)")))
}

/// TCP is the protocol when none is given; only TCP is captured and proxied.
fn is_tcp(protocol: Option<&String>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

impl TryFrom<(&KubeNamespace, &Rules)> for state::Namespace {
    type Error = Error;

    fn try_from((ns, rules): (&KubeNamespace, &Rules)) -> Result<Self, Error> {
        let object = object_name("Namespace", &ns.metadata)?;
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        let waypoint = labels.get(WAYPOINT_LABEL).cloned();
        if let Some(waypoint) = &waypoint {
            crate::state::validate::waypoint_name(waypoint).map_err(|p| {
                invalid(
                    &object,
                    format!("metadata.labels[\"{WAYPOINT_LABEL}\"]"),
                    p.message,
                )
            })?;
        }
        Ok(state::Namespace {
            name: object.name,
            enabled: rules.namespace_enabled(&labels),
            waypoint,
        })
    }
}

/// What a pod is to the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// A workload: it has addresses and runs.
    Workload(Box<Workload>),
    /// Not a workload (removed from the state if it was one).
    Skipped(Skip),
}

/// Why a pod is not a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// `spec.hostNetwork`: the node's own network namespace, never captured.
    HostNetwork,
    /// Labelled `<enabled_label>=false`.
    OptedOut,
    /// No address yet (not scheduled, or its sandbox not up).
    NoAddress,
    /// `Succeeded` or `Failed`: its containers are gone, its address may be reused.
    Finished,
}

impl Skip {
    /// For logs and the `reason` label of `mesh_kube_pods_skipped_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::HostNetwork => "host_network",
            Skip::OptedOut => "opted_out",
            Skip::NoAddress => "no_address",
            Skip::Finished => "finished",
        }
    }
}

impl TryFrom<(&Pod, &Rules)> for PodState {
    type Error = Error;

    fn try_from((pod, rules): (&Pod, &Rules)) -> Result<Self, Error> {
        let object = object_name("Pod", &pod.metadata)?;
        if object.namespace.is_empty() {
            return Err(invalid(&object, "metadata.namespace", "missing"));
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.host_network) == Some(true) {
            return Ok(PodState::Skipped(Skip::HostNetwork));
        }
        if rules.pod_opted_out(&labels) {
            return Ok(PodState::Skipped(Skip::OptedOut));
        }
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return Ok(PodState::Skipped(Skip::Finished));
        }
        let mut ips = Vec::new();
        match status.and_then(|s| s.pod_ips.as_ref()) {
            Some(pod_ips) if !pod_ips.is_empty() => {
                for (i, p) in pod_ips.iter().enumerate() {
                    let field = format!("status.podIPs[{i}].ip");
                    let ip = parse_ip(&object, &field, &p.ip)?;
                    if ips.contains(&ip) {
                        return Err(invalid(&object, field, format!("{ip} is listed twice")));
                    }
                    ips.push(ip);
                }
            }
            _ => {
                if let Some(ip) = status
                    .and_then(|s| s.pod_ip.as_deref())
                    .filter(|s| !s.is_empty())
                {
                    ips.push(parse_ip(&object, "status.podIP", ip)?);
                }
            }
        }
        if ips.is_empty() {
            return Ok(PodState::Skipped(Skip::NoAddress));
        }
        let node = spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid(&object, "spec.nodeName", "missing on a pod with addresses"))?;
        let service_account = spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        // The node finds a pod's sandbox from its UID (`pods::sandbox`).
        let uid = pod
            .metadata
            .uid
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| invalid(&object, "metadata.uid", "missing"))?;
        Ok(PodState::Workload(Box::new(Workload {
            namespace: object.namespace,
            name: object.name,
            service_account,
            node,
            ips,
            netns: PathBuf::new(),
            cgroup: PathBuf::new(),
            uid: Some(uid),
            labels,
            capture: CaptureExclusions::default(),
        })))
    }
}

/// A Service as the state needs it, before its endpoints (from EndpointSlices) are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs`; empty for a headless or ExternalName service.
    pub vips: Vec<IpAddr>,
    /// The TCP ports.
    pub ports: Vec<ServicePortDef>,
}

/// One TCP port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortDef {
    /// `name` (empty when the service has one unnamed port): EndpointSlice ports carry it.
    pub name: String,
    pub port: u16,
    /// A numeric `targetPort`; the port itself when it is named or absent (the endpoints
    /// carry the resolved ports).
    pub target_port: u16,
    /// From `appProtocol` or the name.
    pub protocol: state::Protocol,
}

impl TryFrom<&KubeService> for ServiceDef {
    type Error = Error;

    fn try_from(svc: &KubeService) -> Result<Self, Error> {
        let object = object_name("Service", &svc.metadata)?;
        let spec = svc.spec.clone().unwrap_or_default();
        let mut vips = Vec::new();
        if spec.type_.as_deref() != Some("ExternalName") {
            let (field, ips) = match spec.cluster_ips.filter(|ips| !ips.is_empty()) {
                Some(ips) => ("spec.clusterIPs", ips),
                None => ("spec.clusterIP", spec.cluster_ip.into_iter().collect()),
            };
            for (i, ip) in ips.iter().enumerate() {
                if ip == "None" || ip.is_empty() {
                    continue;
                }
                let field = if field == "spec.clusterIP" {
                    field.to_owned()
                } else {
                    format!("{field}[{i}]")
                };
                let vip = parse_ip(&object, &field, ip)?;
                if vips.contains(&vip) {
                    return Err(invalid(&object, field, format!("{vip} is listed twice")));
                }
                vips.push(vip);
            }
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.unwrap_or_default().iter().enumerate() {
            if !is_tcp(p.protocol.as_ref()) {
                continue;
            }
            let port = parse_port(&object, &format!("spec.ports[{i}].port"), p.port)?;
            let target_port = match &p.target_port {
                Some(IntOrString::Int(t)) => {
                    parse_port(&object, &format!("spec.ports[{i}].targetPort"), *t)?
                }
                Some(IntOrString::String(name)) if name.is_empty() => {
                    return Err(invalid(
                        &object,
                        format!("spec.ports[{i}].targetPort"),
                        "an empty port name",
                    ));
                }
                _ => port,
            };
            if ports.iter().any(|q: &ServicePortDef| q.port == port) {
                return Err(invalid(
                    &object,
                    format!("spec.ports[{i}].port"),
                    format!("TCP port {port} is listed twice"),
                ));
            }
            let name = p.name.clone().unwrap_or_default();
            ports.push(ServicePortDef {
                protocol: state::Protocol::declared(p.app_protocol.as_deref(), &name),
                name,
                port,
                target_port,
            });
        }
        Ok(ServiceDef {
            namespace: object.namespace,
            name: object.name,
            vips,
            ports,
        })
    }
}

impl ServiceDef {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The state's service, with the ready endpoints of `slices` (those of this service):
    /// `None` when it has no VIP or no TCP port (nothing connects to it through a VIP).
    pub fn to_state<'a>(
        &self,
        slices: impl IntoIterator<Item = &'a SliceDef>,
    ) -> Option<state::Service> {
        if self.vips.is_empty() || self.ports.is_empty() {
            return None;
        }
        let slices: Vec<&SliceDef> = slices.into_iter().collect();
        let mut endpoints = BTreeMap::new();
        for p in &self.ports {
            let mut addrs: Vec<SocketAddr> = slices
                .iter()
                .flat_map(|s| {
                    s.ports
                        .iter()
                        .filter(|(name, _)| *name == p.name)
                        .flat_map(|(_, port)| s.ready.iter().map(|ip| SocketAddr::new(*ip, *port)))
                })
                .collect();
            addrs.sort_unstable();
            addrs.dedup();
            endpoints.insert(p.port, addrs);
        }
        Some(state::Service {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            vips: self.vips.clone(),
            ports: self
                .ports
                .iter()
                .map(|p| PortMapping {
                    port: p.port,
                    target_port: p.target_port,
                    protocol: p.protocol,
                })
                .collect(),
            selector: BTreeMap::new(),
            endpoints: Some(endpoints),
        })
    }
}

/// An EndpointSlice as the state needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceDef {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (`kubernetes.io/service-name`); `None`: none (a slice managed
    /// by someone else, which no service's endpoints include).
    pub service: Option<String>,
    /// TCP ports: service port name (empty when unnamed) and the endpoints' port.
    pub ports: Vec<(String, u16)>,
    /// The first address of each ready endpoint (the addresses of one endpoint are one pod's,
    /// interchangeable; kube-proxy takes the first too). An `FQDN` slice has none.
    pub ready: Vec<IpAddr>,
}

impl SliceDef {
    /// `namespace/name` of its service, if it has one.
    pub fn service_key(&self) -> Option<String> {
        self.service
            .as_ref()
            .map(|s| format!("{}/{}", self.namespace, s))
    }
}

impl TryFrom<&EndpointSlice> for SliceDef {
    type Error = Error;

    fn try_from(slice: &EndpointSlice) -> Result<Self, Error> {
        let object = object_name("EndpointSlice", &slice.metadata)?;
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|s| !s.is_empty())
            .cloned();
        let mut ports = Vec::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            if !is_tcp(p.protocol.as_ref()) {
                continue;
            }
            let Some(port) = p.port else {
                // No port: "all ports", which a service port never maps to.
                continue;
            };
            let port = parse_port(&object, &format!("ports[{i}].port"), port)?;
            ports.push((p.name.clone().unwrap_or_default(), port));
        }
        let mut ready = Vec::new();
        if matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            for (i, e) in slice.endpoints.iter().enumerate() {
                let Some(first) = e.addresses.first() else {
                    return Err(invalid(
                        &object,
                        format!("endpoints[{i}].addresses"),
                        "an endpoint needs an address",
                    ));
                };
                let ip = parse_ip(&object, &format!("endpoints[{i}].addresses[0]"), first)?;
                if ip.is_ipv4() != (slice.address_type == "IPv4") {
                    return Err(invalid(
                        &object,
                        format!("endpoints[{i}].addresses[0]"),
                        format!(
                            "{ip} is not of the slice's addressType {}",
                            slice.address_type
                        ),
                    ));
                }
                // Absent means ready (the API's rule for an unknown state).
                let is_ready = e.conditions.as_ref().and_then(|c| c.ready) != Some(false);
                if is_ready {
                    ready.push(ip);
                }
            }
        }
        Ok(SliceDef {
            namespace: object.namespace,
            name: object.name,
            service,
            ports,
            ready,
        })
    }
}

/// An AuthorizationPolicy object: its key and the policy, or why it is invalid (what becomes
/// of an invalid one is `discovery::policies::settle`'s to decide).
#[derive(Debug, Clone)]
pub struct PolicyObject {
    /// `namespace/name`.
    pub key: String,
    pub policy: Result<Policy, Invalid>,
}

impl TryFrom<&DynamicObject> for PolicyObject {
    type Error = Error;

    fn try_from(obj: &DynamicObject) -> Result<Self, Error> {
        let object = object_name("AuthorizationPolicy", &obj.metadata)?;
        let value = serde_json::to_value(obj)
            .and_then(serde_json::from_value::<serde_yaml::Value>)
            .map_err(|e| invalid(&object, "", e.to_string()))?;
        let (key, policy) = policies::object(&object.to_string(), value)
            .map_err(|message| invalid(&object, "metadata", message))?;
        Ok(PolicyObject { key, policy })
    }
}
