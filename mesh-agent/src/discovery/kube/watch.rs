//! The watchers: one kube-rs `watcher` per kind (resumable watches; a relist after 410 Gone or
//! a connection that cannot resume; retries with backoff after any error), whose events one
//! applier task turns into state changes ([`super::applier`]). Nothing is cached beyond what
//! the conversion needs: a pod becomes a workload (addresses, namespace, name, service account,
//! node, labels) as it arrives, and the object is dropped.

use std::{
    pin::pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use ::kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        events::{Event as KubeEvent, EventType, Recorder, Reporter as KubeReporter},
        reflector::{self, reflector},
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Client, Resource, ResourceExt,
};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, ObjectReference, Pod, Service},
    discovery::v1::EndpointSlice,
};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn, Instrument};

use super::{
    applier::{Applier, Kind},
    Error, Rules, Skip,
};
use crate::{config::KubeConfig, state::Store};

/// One object of any watched kind.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Policy(Box<DynamicObject>),
}

impl Object {
    /// `namespace/name`, or the name of a namespace.
    pub fn key(&self) -> String {
        let (ns, name) = match self {
            Object::Namespace(o) => (None, o.name_any()),
            Object::Pod(o) => (o.namespace(), o.name_any()),
            Object::Service(o) => (o.namespace(), o.name_any()),
            Object::EndpointSlice(o) => (o.namespace(), o.name_any()),
            Object::Policy(o) => (o.namespace(), o.name_any()),
        };
        match ns {
            Some(ns) => format!("{ns}/{name}"),
            None => name,
        }
    }

    /// A reference to the object, for Events about it.
    pub fn reference(&self) -> ObjectReference {
        match self {
            Object::Namespace(o) => o.object_ref(&()),
            Object::Pod(o) => o.object_ref(&()),
            Object::Service(o) => o.object_ref(&()),
            Object::EndpointSlice(o) => o.object_ref(&()),
            Object::Policy(o) => o.object_ref(&policy_resource()),
        }
    }
}

/// Istio's `security.istio.io/v1` AuthorizationPolicy.
pub fn policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

/// The source's metrics (registered with the agent's registry by [`Metrics::new`]).
#[derive(Debug, Clone)]
pub struct Metrics {
    agent: Arc<crate::metrics::Metrics>,
    rejected: Family<KindLabel, Counter>,
    skipped: Family<ReasonLabel, Counter>,
    watch_errors: Family<KindLabel, Counter>,
    relists: Family<KindLabel, Counter>,
    age: Gauge,
    /// Milliseconds since `started` at the last event.
    last_event_ms: Arc<AtomicU64>,
    started: Instant,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl Metrics {
    pub fn new(agent: Arc<crate::metrics::Metrics>) -> Self {
        let m = Self {
            agent,
            rejected: Family::default(),
            skipped: Family::default(),
            watch_errors: Family::default(),
            relists: Family::default(),
            age: Gauge::default(),
            last_event_ms: Arc::default(),
            started: Instant::now(),
        };
        let a = &m.agent;
        a.register(
            "mesh_kube_objects_rejected",
            "Kubernetes objects the mesh could not take (invalid, or in conflict with the state), by kind; each skipped, logged and reported as an Event",
            m.rejected.clone(),
        );
        a.register(
            "mesh_kube_pods_skipped",
            "Pods that are not workloads of the mesh (host_network, opted_out, no_address, finished), once per pod",
            m.skipped.clone(),
        );
        a.register(
            "mesh_kube_watch_errors",
            "Errors of the Kubernetes watches (lost connections, refused requests), by kind; the watch retries with backoff and the state in force keeps serving",
            m.watch_errors.clone(),
        );
        a.register(
            "mesh_kube_relists",
            "Full lists of a kind (the first, then after 410 Gone or a watch that could not resume)",
            m.relists.clone(),
        );
        a.register(
            "mesh_kube_state_age_seconds",
            "Seconds since the last event or list from the Kubernetes API",
            m.age.clone(),
        );
        m
    }

    pub fn agent(&self) -> &crate::metrics::Metrics {
        &self.agent
    }

    pub fn rejected(&self, kind: Kind) {
        self.rejected
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn skipped(&self, why: Skip) {
        self.skipped
            .get_or_create(&ReasonLabel {
                reason: why.as_str(),
            })
            .inc();
    }

    pub fn relist(&self, kind: Kind) {
        self.relists
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    fn watch_error(&self, kind: Kind) {
        self.watch_error_of(kind.as_str());
    }

    /// A watch error of a kind the applier does not handle (`HTTPRoute`).
    pub(super) fn watch_error_of(&self, kind: &'static str) {
        self.watch_errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// A full list of a kind the applier does not handle (`HTTPRoute`).
    pub(super) fn relist_of(&self, kind: &'static str) {
        self.relists.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn policies_invalid(&self, n: usize) {
        self.agent
            .policy
            .policies_invalid
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An event arrived: the state's age starts again from 0.
    pub fn touched(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_event_ms.store(ms, Ordering::Relaxed);
        self.age.set(0);
    }

    fn update_age(&self) {
        let now = self.started.elapsed().as_millis();
        let last = u128::from(self.last_event_ms.load(Ordering::Relaxed));
        let secs = now.saturating_sub(last) / 1000;
        self.age.set(i64::try_from(secs).unwrap_or(i64::MAX));
    }
}

/// Reports objects the mesh cannot take as Kubernetes Events on them (best effort: a failure
/// to report is logged at debug level, never retried).
#[derive(Clone)]
pub struct Reporter(Option<Arc<Recorder>>);

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reporter")
    }
}

impl Reporter {
    /// Reports nothing (tests without an API server; a waypoint, whose node agents report).
    pub fn none() -> Self {
        Self(None)
    }

    fn new(client: Client, node: &str) -> Self {
        let reporter = KubeReporter {
            controller: "mesh-agent".into(),
            instance: Some(node.to_owned()),
        };
        Self(Some(Arc::new(Recorder::new(client, reporter))))
    }

    pub fn report(&self, message: &str, reference: ObjectReference) {
        let Some(recorder) = self.0.clone() else {
            return;
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "InvalidForMesh".into(),
            // The API caps an Event's note at 1 KiB.
            note: Some(message.chars().take(1000).collect()),
            action: "Convert".into(),
            secondary: None,
        };
        tokio::spawn(
            async move {
                if let Err(e) = recorder.publish(&event, &reference).await {
                    debug!(error = %e, "cannot report an Event on the object");
                }
            }
            .in_current_span(),
        );
    }
}

/// A Kubernetes client from the agent's configuration: the kubeconfig file it names, else the
/// in-cluster configuration.
pub async fn client(config: &KubeConfig) -> Result<Client, Error> {
    let client_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = ::kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Client(format!("{}: {e}", path.display())))?;
            ::kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| Error::Client(format!("{}: {e}", path.display())))?
        }
        None => ::kube::Config::incluster().map_err(|e| Error::Client(e.to_string()))?,
    };
    Client::try_from(client_config).map_err(|e| Error::Client(e.to_string()))
}

/// Becomes `true` once every watcher has delivered its first full list.
pub type Synced = watch::Receiver<bool>;

/// The running source.
#[derive(Debug, Clone)]
pub struct Running {
    /// `true` once every watcher has delivered its first full list.
    pub synced: Synced,
    /// This node's pods as the API has them, in full (UID, containers, status): for the node's
    /// pod lifecycle manager, which the pod objects of the state do not serve (a workload
    /// carries only what the data path needs). Ready once listed (`synced`).
    pub node_pods: reflector::Store<Pod>,
    /// The source's metrics, for the watchers started beside it (a waypoint's HTTPRoutes).
    pub metrics: Metrics,
}

/// Starts the watchers and the applier, which fill `store`. Runs until the runtime ends.
pub fn run(
    client: Client,
    node: &str,
    rules: Rules,
    store: Arc<Store>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Running {
    let reporter = Reporter::new(client.clone(), node);
    start(
        client,
        Some(node),
        rules,
        store,
        Metrics::new(metrics),
        reporter,
    )
}

/// The same watchers for a process without a node (a waypoint): the mesh state alone, without
/// this node's pods ([`Running::node_pods`] stays empty). It reports no Events: the node agents
/// report the objects they cannot take, once each.
pub fn run_mesh(
    client: Client,
    rules: Rules,
    store: Arc<Store>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Running {
    start(
        client,
        None,
        rules,
        store,
        Metrics::new(metrics),
        Reporter::none(),
    )
}

fn start(
    client: Client,
    node: Option<&str>,
    rules: Rules,
    store: Arc<Store>,
    metrics: Metrics,
    reporter: Reporter,
) -> Running {
    let (synced_tx, synced) = watch::channel(false);
    let (tx, mut rx) = mpsc::channel::<(Kind, Event<Object>)>(1024);
    let config = watcher::Config::default();
    spawn_watch(
        Api::<Namespace>::all(client.clone()),
        Kind::Namespace,
        |o| Object::Namespace(Box::new(o)),
        &tx,
        &metrics,
    );
    spawn_watch(
        Api::<Pod>::all(client.clone()),
        Kind::Pod,
        |o| Object::Pod(Box::new(o)),
        &tx,
        &metrics,
    );
    spawn_watch(
        Api::<Service>::all(client.clone()),
        Kind::Service,
        |o| Object::Service(Box::new(o)),
        &tx,
        &metrics,
    );
    spawn_watch(
        Api::<EndpointSlice>::all(client.clone()),
        Kind::EndpointSlice,
        |o| Object::EndpointSlice(Box::new(o)),
        &tx,
        &metrics,
    );
    // This node's pods in full, through a field selector, for the lifecycle manager.
    let (node_pods, writer) = reflector::store();
    if let Some(node) = node {
        spawn_stream(
            reflector(
                writer,
                watcher(
                    Api::<Pod>::all(client.clone()),
                    watcher::Config::default().fields(&format!("spec.nodeName={node}")),
                ),
            ),
            Kind::NodePod,
            |o| Object::Pod(Box::new(o)),
            tx.clone(),
            metrics.clone(),
        );
    }
    let policies: Api<DynamicObject> = Api::all_with(client, &policy_resource());
    spawn_stream(
        watcher(policies, config),
        Kind::AuthorizationPolicy,
        |o| Object::Policy(Box::new(o)),
        tx,
        metrics.clone(),
    );
    let mut applier = Applier::new(rules, store, metrics.clone(), reporter);
    if node.is_none() {
        applier.without_node_pods();
    }
    let running_metrics = metrics.clone();
    tokio::spawn(
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    next = rx.recv() => {
                        let Some((kind, event)) = next else { return };
                        applier.handle(kind, event);
                        if !*synced_tx.borrow() && applier.synced() {
                            synced_tx.send_replace(true);
                        }
                    }
                    _ = tick.tick() => metrics.update_age(),
                }
            }
        }
        .in_current_span(),
    );
    Running {
        synced,
        node_pods,
        metrics: running_metrics,
    }
}

fn spawn_watch<K>(
    api: Api<K>,
    kind: Kind,
    wrap: fn(K) -> Object,
    tx: &mpsc::Sender<(Kind, Event<Object>)>,
    metrics: &Metrics,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    spawn_stream(
        watcher(api, watcher::Config::default()),
        kind,
        wrap,
        tx.clone(),
        metrics.clone(),
    );
}

/// Forwards one watcher's events (its errors retried with kube-rs's default backoff).
fn spawn_stream<K, S>(
    stream: S,
    kind: Kind,
    wrap: fn(K) -> Object,
    tx: mpsc::Sender<(Kind, Event<Object>)>,
    metrics: Metrics,
) where
    K: Send + 'static,
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(
        async move {
            let mut stream = pin!(stream.default_backoff());
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => {
                        let event = match event {
                            Event::Apply(o) => Event::Apply(wrap(o)),
                            Event::Delete(o) => Event::Delete(wrap(o)),
                            Event::Init => Event::Init,
                            Event::InitApply(o) => Event::InitApply(wrap(o)),
                            Event::InitDone => Event::InitDone,
                        };
                        if tx.send((kind, event)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        metrics.watch_error(kind);
                        warn!(kind = kind.as_str(), error = %e, "watch failed; retrying, the state in force keeps serving");
                    }
                }
            }
        }
        .in_current_span(),
    );
}

/// This node's pods ([`Running::node_pods`]) as the pod lifecycle manager asks for them: a pod
/// whose sandbox the CNI plugin is adding, converted as if the API had its addresses already.
#[derive(Debug, Clone)]
pub struct NodePodsStore {
    pub pods: reflector::Store<Pod>,
    pub rules: super::Rules,
}

impl crate::pods::cni::NodePods for NodePodsStore {
    fn with_addresses(
        &self,
        namespace: &str,
        name: &str,
        ips: &[std::net::IpAddr],
    ) -> crate::pods::cni::NodePod {
        use crate::pods::cni::NodePod;
        let Some(pod) = self
            .pods
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(namespace))
        else {
            return NodePod::Unknown;
        };
        if ips.is_empty() {
            return NodePod::Unknown;
        }
        let mut pod = (*pod).clone();
        let status = pod.status.get_or_insert_with(Default::default);
        status.pod_ip = None;
        status.pod_ips = Some(
            ips.iter()
                .map(|ip| k8s_openapi::api::core::v1::PodIP { ip: ip.to_string() })
                .collect(),
        );
        match super::PodState::try_from((&pod, &self.rules)) {
            Ok(super::PodState::Workload(w)) => NodePod::Workload(w),
            Ok(super::PodState::Skipped(_)) => NodePod::NotMeshed,
            Err(_) => NodePod::Unknown,
        }
    }
}
