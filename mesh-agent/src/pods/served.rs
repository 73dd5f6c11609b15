//! A pod the agent serves: its kernel side (`capture::pod::CapturedPod`), its identity and the
//! TLS of its HBONE listener, and the proxy's accept loops on its listeners.

use std::sync::Arc;

use tokio::sync::watch;

use super::Error;
use crate::{
    capture::{
        ebpf::Loaded,
        listeners::{Listeners, Opened},
        pod::{CapturedPod, Env, Outcome, Prepared},
    },
    identity::SpiffeId,
    proxy::{self, PodState, Stop},
    state::Workload,
};

/// A captured pod and what serves it.
#[derive(Debug)]
pub struct ServedPod {
    kernel: CapturedPod,
    /// The workload as last applied whole (kernel side, identity and proxy).
    workload: Arc<Workload>,
    identity: SpiffeId,
    /// Tells the accept loops how to stop.
    stop: watch::Sender<Stop>,
    proxy: Arc<proxy::Pod>,
}

impl ServedPod {
    /// Captures `workload` (with the listeners handed over by a previous agent, `received`, or
    /// new ones), gives it its identity and serves its listeners. `scope` gives the pod's
    /// exclusion scope for a netns cookie.
    pub fn capture(
        loaded: &mut Loaded,
        env: &Env<'_>,
        inputs: &Arc<proxy::Inputs>,
        workload: Arc<Workload>,
        received: Option<Opened>,
        scope: impl FnOnce(u64) -> u32,
    ) -> Result<(Self, Outcome), Error> {
        let prepared = Prepared::open(env, workload.clone(), received)?;
        let (identity, server_tls) = identity(inputs, &workload)?;
        let (kernel, outcome) = prepared.attach(loaded, env, scope)?;
        let client_address = inputs.preserve_client_address && return_path(inputs, &kernel);
        let (stop, stopped) = watch::channel(Stop::Running);
        let proxy = Arc::new(proxy::Pod::new(
            kernel.netns().clone(),
            kernel.netns_cookie(),
            PodState {
                workload: workload.clone(),
                identity: identity.clone(),
                server_tls,
            },
            &inputs.metrics,
            client_address,
        ));
        for (kind, l) in kernel.listeners().all() {
            proxy::spawn_listener(l, kind, proxy.clone(), inputs.clone(), stopped.clone());
        }
        let served = Self {
            kernel,
            workload,
            identity,
            stop,
            proxy,
        };
        Ok((served, outcome))
    }

    pub fn workload(&self) -> &Arc<Workload> {
        &self.workload
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn netns_cookie(&self) -> u64 {
        self.kernel.netns_cookie()
    }

    pub fn scope(&self) -> u32 {
        self.kernel.scope()
    }

    pub fn listeners(&self) -> &Listeners {
        self.kernel.listeners()
    }

    /// Its kernel side.
    pub fn kernel(&self) -> &CapturedPod {
        &self.kernel
    }

    /// The proxy's view of the pod (for same-node delivery).
    pub fn proxy(&self) -> &Arc<proxy::Pod> {
        &self.proxy
    }

    /// Whether `w` is still the same pod sandbox; other changes are applied in place by
    /// [`ServedPod::update`].
    pub fn same_sandbox(&self, w: &Workload) -> bool {
        self.kernel.same_sandbox(w)
    }

    /// Applies what changed about the pod in the same sandbox: exclusions and addresses in the
    /// kernel, then its service account (a new identity for new connections). Its capture
    /// never lapses meanwhile.
    pub fn update(
        &mut self,
        loaded: &mut Loaded,
        w: &Arc<Workload>,
        inputs: &proxy::Inputs,
    ) -> Result<(), Error> {
        if Arc::ptr_eq(&self.workload, w) || *self.workload == **w {
            return Ok(());
        }
        self.kernel.update(loaded, w)?;
        let server_tls = if self.workload.service_account == w.service_account {
            self.proxy.state().server_tls.clone()
        } else {
            let (identity, server_tls) = identity(inputs, w)?;
            tracing::info!(pod = %w.key(), from = %self.identity, to = %identity, "service account changed: new connections carry the new identity");
            self.identity = identity;
            server_tls
        };
        self.proxy.set_state(PodState {
            workload: w.clone(),
            identity: self.identity.clone(),
            server_tls,
        });
        self.workload = w.clone();
        Ok(())
    }

    /// Takes the pod out of the kernel, then lets the accept loops take what is queued and
    /// stop; established connections continue. Its per-pod series leave `metrics`.
    pub fn release(self, loaded: &mut Loaded, metrics: &crate::metrics::Metrics) {
        self.kernel.release(loaded);
        self.stop.send_replace(Stop::Release);
        self.proxy.remove_series(metrics);
    }

    /// Stops serving without touching the kernel: the accept loops stop at once (what is queued
    /// stays for the agent that took the listeners over), capture stays in place.
    pub fn relinquish(self) {
        self.stop.send_replace(Stop::Handover);
    }
}

/// Installs the pod's return path (`capture::return_path`); whether it is in place. Without
/// it the pod is still served, its connections delivered from its own address: the client's
/// address is a convenience for the application, not a security property.
fn return_path(inputs: &proxy::Inputs, kernel: &CapturedPod) -> bool {
    let w = kernel.workload();
    let ipv6 = w.ips.iter().any(std::net::IpAddr::is_ipv6);
    match crate::capture::return_path::install(kernel.netns(), &inputs.home, ipv6) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(pod = %w.key(), error = %e, "cannot deliver connections from the client's address: the pod sees its own address as their source");
            inputs.metrics.capture.return_path_failures.inc();
            false
        }
    }
}

/// The pod's SPIFFE id and the TLS configuration of its HBONE listener (its certificate is
/// minted now if this node has none for the service account yet).
fn identity(
    inputs: &proxy::Inputs,
    w: &Workload,
) -> Result<(SpiffeId, Arc<rustls::ServerConfig>), Error> {
    let pod = w.key();
    let identity_err = |source| Error::Identity {
        pod: pod.clone(),
        source,
    };
    let identity = SpiffeId::new(
        inputs.certs.trust_domain(),
        &w.namespace,
        &w.service_account,
    )
    .map_err(identity_err)?;
    let leaf = inputs.certs.get(&identity).map_err(identity_err)?;
    let server_tls = crate::tunnel::tls::server_config(
        inputs.certs.bundle().clone(),
        inputs.certs.trust_domain().to_owned(),
        leaf,
    )
    .map_err(|e| Error::Tls {
        pod: pod.clone(),
        message: e.to_string(),
    })?;
    Ok((identity, server_tls))
}
