//! A waypoint's HTTPRoutes from the API (`gateway.networking.k8s.io/v1`, its own namespace
//! only): each route goes through the conversion the state file's go through
//! (`waypoint::httproute::parse_spec` and `convert`, the API's `creationTimestamp` as its age),
//! and the whole list to the caller's `apply` (the waypoint's `table::Settled`: each route judged
//! on its own, the last good version kept). Then the route's status, as GAMMA implementations
//! report it ([`status`]), written through the status subresource when it changes, by the
//! waypoint the namespace names only.

pub mod status;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    pin::pin,
    sync::Arc,
};

use ::kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::{
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Client, ResourceExt,
};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use super::{watch::Metrics, Running, Synced};
use crate::{
    state::Store,
    waypoint::httproute::{self, HttpRoute, Rejected},
};

/// The kind in metrics and logs.
const KIND: &str = "HTTPRoute";

/// Gateway API's `gateway.networking.k8s.io/v1` HTTPRoute.
pub fn httproute_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", KIND),
        "httproutes",
    )
}

/// Which waypoint watches: its namespace and name (the name the namespace's
/// `mesh-agent/waypoint` label must give for it to write status).
#[derive(Debug, Clone)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
}

/// Starts the HTTPRoute watcher of `waypoint`'s namespace beside the mesh's watchers
/// (`mesh`, from [`super::run_mesh`], which fill `store`). `apply` gets every route of the
/// namespace attached to a Service, converted or rejected, after the first full list and at
/// each change of a route's `spec` (not at status changes). The returned [`Synced`] turns
/// `true` once the first list has been applied.
pub fn run_routes<F>(
    client: Client,
    waypoint: Waypoint,
    store: Arc<Store>,
    mesh: &Running,
    apply: F,
) -> Synced
where
    F: FnMut(Vec<Result<HttpRoute, Rejected>>) + Send + 'static,
{
    let (synced_tx, synced) = watch::channel(false);
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, &waypoint.namespace, &httproute_resource());
    let task = Task {
        api,
        waypoint,
        store,
        metrics: mesh.metrics.clone(),
        apply,
        objects: BTreeMap::new(),
        relisting: None,
        applied: None,
        verdicts: HashMap::new(),
        good: HashSet::new(),
        written: HashMap::new(),
    };
    tokio::spawn(task.run(mesh.synced.clone(), synced_tx).in_current_span());
    synced
}

/// What a route was when last converted: its spec and age.
type Fingerprint = (String, Option<u64>);

struct Task<F> {
    api: Api<DynamicObject>,
    waypoint: Waypoint,
    store: Arc<Store>,
    metrics: Metrics,
    apply: F,
    /// The namespace's routes by name, as last listed or watched.
    objects: BTreeMap<String, DynamicObject>,
    /// During a relist: the routes delivered since `Init`.
    relisting: Option<BTreeMap<String, DynamicObject>>,
    /// What was last given to `apply` (`None`: nothing yet).
    applied: Option<BTreeMap<String, Fingerprint>>,
    /// Each route's conversion error, if any, from the last conversion.
    verdicts: HashMap<String, Option<Rejected>>,
    /// Routes with a good version in force.
    good: HashSet<String>,
    /// The last status written per route: the resourceVersion it was written over and the
    /// parents written, so that a change seen again before its own watch event is not sent
    /// twice.
    written: HashMap<String, (Option<String>, Vec<Value>)>,
}

impl<F> Task<F>
where
    F: FnMut(Vec<Result<HttpRoute, Rejected>>) + Send + 'static,
{
    async fn run(mut self, mut mesh_synced: Synced, synced_tx: watch::Sender<bool>) {
        let stream = watcher(self.api.clone(), watcher::Config::default()).default_backoff();
        let mut stream = pin!(stream);
        let mut changes = self.store.subscribe();
        let mut mesh_running = true;
        let mut listed = false;
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    None => return,
                    Some(Ok(event)) => {
                        self.metrics.touched();
                        listed |= self.event(event);
                    }
                    Some(Err(e)) => {
                        self.metrics.watch_error_of(KIND);
                        warn!(kind = KIND, error = %e, "watch failed; retrying, the routes in force keep serving");
                        continue;
                    }
                },
                _ = changes.changed() => {}
                changed = mesh_synced.changed(), if mesh_running => {
                    mesh_running = changed.is_ok();
                }
            }
            if !listed {
                continue;
            }
            self.convert();
            synced_tx.send_if_modified(|s| !std::mem::replace(s, true));
            if *mesh_synced.borrow() {
                self.write_statuses().await;
            }
        }
    }

    /// Takes one watch event; `true` once a full list has been delivered.
    fn event(&mut self, event: Event<DynamicObject>) -> bool {
        match event {
            Event::Init => {
                self.metrics.relist_of(KIND);
                self.relisting = Some(BTreeMap::new());
            }
            Event::InitApply(o) => {
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(o.name_any(), o);
            }
            Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                return true;
            }
            Event::Apply(o) => {
                self.objects.insert(o.name_any(), o);
            }
            Event::Delete(o) => {
                self.objects.remove(&o.name_any());
            }
        }
        self.applied.is_some()
    }

    /// Converts the routes and hands them to `apply`, if a spec changed since the last time.
    fn convert(&mut self) {
        let ns = self.waypoint.namespace.clone();
        let mut fingerprints = BTreeMap::new();
        let mut specs = Vec::new();
        for (name, o) in &self.objects {
            let spec = o.data.get("spec").cloned().unwrap_or_else(|| json!({}));
            if status::service_parents(&spec).is_empty() {
                continue; // not a waypoint's route (a Gateway's)
            }
            let created = o
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| u64::try_from(t.0.as_second()).ok());
            fingerprints.insert(name.clone(), (spec.to_string(), created));
            specs.push((name.clone(), spec, created));
        }
        if self.applied.as_ref() == Some(&fingerprints) {
            return;
        }
        let mut converted = Vec::new();
        let mut verdicts = HashMap::new();
        for (name, spec, created) in specs {
            let key = format!("{ns}/{name}");
            let route = httproute::parse_spec(&key, spec)
                .and_then(|spec| httproute::convert(&ns, &name, created, &spec));
            match &route {
                Ok(_) => {
                    self.good.insert(name.clone());
                    verdicts.insert(name, None);
                }
                Err(e) => {
                    verdicts.insert(name, Some(e.clone()));
                }
            }
            converted.push(route);
        }
        self.good.retain(|name| verdicts.contains_key(name));
        self.verdicts = verdicts;
        self.applied = Some(fingerprints);
        (self.apply)(converted);
    }

    /// Writes the status of each route whose status says something else, if the namespace
    /// names this waypoint (one writer per namespace: its replicas write the same content).
    async fn write_statuses(&mut self) {
        let snapshot = self.store.load();
        let ns = &self.waypoint.namespace;
        if snapshot.waypoint_of(ns) != Some(self.waypoint.name.as_str()) {
            return;
        }
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let now = k8s_openapi::jiff::Timestamp::from_second(now)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let mut patches = Vec::new();
        for (name, o) in &self.objects {
            let Some(rejected) = self.verdicts.get(name) else {
                continue; // not a waypoint's route
            };
            let spec = o.data.get("spec").cloned().unwrap_or_else(|| json!({}));
            let verdict = status::Verdict {
                rejected: rejected.as_ref(),
                kept: rejected.is_some() && self.good.contains(name),
            };
            let desired = status::desired(ns, &spec, o.metadata.generation, verdict, |svc| {
                snapshot.service(&format!("{ns}/{svc}")).is_some()
            });
            let Some(parents) = status::merge(o.data.get("status"), desired, &now) else {
                continue;
            };
            let version = o.metadata.resource_version.clone();
            let sent = self.written.get(name);
            if sent.is_some_and(|(v, p)| *v == version && *p == parents) {
                continue;
            }
            patches.push((name.clone(), version, parents));
        }
        for (name, version, parents) in patches {
            // The resourceVersion makes the patch conditional: a route changed meanwhile
            // (by its owner or another controller) is judged again at its watch event.
            let patch = json!({
                "metadata": {"resourceVersion": version},
                "status": {"parents": parents},
            });
            let params = PatchParams::default();
            match self
                .api
                .patch_status(&name, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(route = %format!("{ns}/{name}"), "HTTPRoute status written");
                    self.written.insert(name, (version, parents));
                }
                Err(::kube::Error::Api(e)) if e.code == 409 => {
                    debug!(route = %format!("{ns}/{name}"), "HTTPRoute changed meanwhile; its status is written at its next event");
                }
                Err(e) => {
                    warn!(route = %format!("{ns}/{name}"), error = %e, "cannot write the HTTPRoute's status: does the waypoint's Role grant patch on httproutes/status?");
                }
            }
        }
        self.written
            .retain(|name, _| self.objects.contains_key(name));
    }
}
