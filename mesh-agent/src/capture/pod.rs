//! One captured pod: its in-pod listeners, its entries in the kernel maps, and its programs'
//! links, pinned so that they outlive the agent.
//!
//! Capture order makes every redirect land on a listener: listeners first, then map entries,
//! then links. A pod whose links were pinned by a previous agent is adopted in the same order:
//! its connections are refused (no listener) until the new listeners are registered, then
//! served. Release runs in reverse: map entries go first (the programs stop redirecting at
//! once), then the pins (the links detach), then the listeners stop accepting after taking what
//! is already queued. Connections already proxied are separate tasks and keep running.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use mesh_common::{listener, ListenerKey, PodAddr, PodConfig};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    ebpf::Loaded,
    listeners::{Listeners, Opened},
    mapped_words,
    pins::{self, Layout, PinnedPod, Target},
    Error,
};
use crate::{
    identity::SpiffeId,
    proxy::{self, PodState, Stop},
    state::Workload,
    sys::Netns,
};

/// Where pods are captured: what every capture needs besides the pod.
#[derive(Debug)]
pub struct Env<'a> {
    pub layout: &'a Layout,
    pub cgroup_root: &'a Path,
    /// The agent's own cgroup: a pod whose cgroup contains it is never captured (the programs
    /// would redirect the agent's own connections).
    pub agent_cgroup: &'a Path,
    pub inputs: &'a Arc<proxy::Inputs>,
}

/// How a pod came to be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Captured now: links attached and pinned.
    Captured,
    /// Its pinned links were all in place: taken over.
    Adopted,
    /// Its pinned links were taken over, some of them attached again.
    Reattached,
}

/// A pod the agent captures and serves.
#[derive(Debug)]
pub struct CapturedPod {
    pub workload: Arc<Workload>,
    identity: SpiffeId,
    scope: u32,
    netns_cookie: u64,
    pin_dir: PathBuf,
    listeners: Listeners,
    listener_keys: Vec<ListenerKey>,
    /// Tells the accept loops how to stop.
    stop: watch::Sender<Stop>,
    proxy: Arc<proxy::Pod>,
}

/// The kernel side of a pod being captured: opened once, used by every step.
struct Handles {
    cgroup: File,
    netns: Arc<Netns>,
}

impl CapturedPod {
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    pub fn scope(&self) -> u32 {
        self.scope
    }

    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// The proxy's view of the pod (for same-node delivery).
    pub fn proxy(&self) -> &Arc<proxy::Pod> {
        &self.proxy
    }

    /// Whether `w` is still the same pod sandbox (same network namespace and cgroup); other
    /// changes are applied in place by [`CapturedPod::update`].
    pub fn same_sandbox(&self, w: &Workload) -> bool {
        self.workload.netns == w.netns && self.workload.cgroup == w.cgroup
    }

    /// Captures `workload`: with the listeners handed over by a previous agent (`received`) or
    /// new ones, adopting the links pinned for its network namespace (by a previous agent, or
    /// by an attempt that could not serve it) or attaching new ones. `scope` gives the pod's
    /// exclusion scope for a netns cookie (the one already in the maps, or a new one).
    pub fn capture(
        loaded: &mut Loaded,
        env: &Env<'_>,
        workload: Arc<Workload>,
        received: Option<Opened>,
        scope: impl FnOnce(u64) -> u32,
    ) -> Result<(Self, Outcome), Error> {
        let pod = workload.key();
        let handles = open_handles(env, &workload)?;
        let opened = match received {
            Some(opened) => opened,
            None => Opened::open(&pod, &handles.netns, &env.inputs.home)?,
        };
        let netns_cookie = opened.netns_cookie;
        let (identity, server_tls) = identity(env.inputs, &workload)?;
        let listeners = opened.register(&pod)?;
        let scope = scope(netns_cookie);
        let pinned = env.layout.find(netns_cookie)?;
        let pin_dir = pinned
            .clone()
            .unwrap_or_else(|| env.layout.pod_dir(netns_cookie, &pod));
        let (stop, stopped) = watch::channel(Stop::Running);
        let ctx = Arc::new(proxy::Pod::new(
            handles.netns.clone(),
            netns_cookie,
            PodState {
                workload: workload.clone(),
                identity: identity.clone(),
                server_tls,
            },
            &env.inputs.metrics,
        ));
        let mut captured = Self {
            workload,
            identity,
            scope,
            netns_cookie,
            pin_dir,
            listeners,
            listener_keys: Vec::new(),
            stop,
            proxy: ctx.clone(),
        };
        captured.install_entries(loaded)?;
        let target = Target {
            pod: &pod,
            cgroup: &handles.cgroup,
            netns: &handles.netns,
        };
        let outcome = match pinned {
            Some(_) => match pins::adopt(loaded, &captured.pin_dir, &target)? {
                a if a.reattached > 0 => Outcome::Reattached,
                _ => Outcome::Adopted,
            },
            None => {
                pins::attach_all(loaded, &captured.pin_dir, &target)?;
                Outcome::Captured
            }
        };
        for (kind, l) in captured.listeners.all() {
            proxy::spawn_listener(l, kind, ctx.clone(), env.inputs.clone(), stopped.clone());
        }
        Ok((captured, outcome))
    }

    /// Closes a pod that cannot be served (its listeners, identity or TLS failed): its map
    /// entries and pinned links are put in place (or kept) without listeners, so that its
    /// connections are refused rather than passed, until a later attempt serves it. Returns
    /// its pins.
    pub fn close(
        loaded: &mut Loaded,
        env: &Env<'_>,
        workload: &Workload,
        scope: impl FnOnce(u64) -> u32,
    ) -> Result<PinnedPod, Error> {
        let pod = workload.key();
        let handles = open_handles(env, workload)?;
        let netns_cookie =
            crate::sys::netns_cookie_of(&handles.netns, &env.inputs.home).map_err(|source| {
                Error::Netns {
                    pod: pod.clone(),
                    path: workload.netns.clone(),
                    source,
                }
            })?;
        let scope = scope(netns_cookie);
        install_pod_entries(loaded, netns_cookie, scope, workload)?;
        let target = Target {
            pod: &pod,
            cgroup: &handles.cgroup,
            netns: &handles.netns,
        };
        let dir = match env.layout.find(netns_cookie)? {
            Some(dir) => {
                pins::adopt(loaded, &dir, &target)?;
                dir
            }
            None => {
                let dir = env.layout.pod_dir(netns_cookie, &pod);
                pins::attach_all(loaded, &dir, &target)?;
                dir
            }
        };
        Ok(PinnedPod {
            dir,
            netns_cookie,
            key: pod,
        })
    }

    /// Listener entries (so that sk_lookup finds a listener before anything steers to it),
    /// exclusions, then the pod and address entries (from now on its connects are redirected).
    fn install_entries(&mut self, loaded: &mut Loaded) -> Result<(), Error> {
        for ip in self.workload.ips.clone() {
            self.insert_listener_keys(loaded, ip)?;
        }
        install_pod_entries(loaded, self.netns_cookie, self.scope, &self.workload)
    }

    fn insert_listener_keys(&mut self, loaded: &mut Loaded, ip: IpAddr) -> Result<(), Error> {
        let Some((inbound, hbone)) = self.listeners.inbound_for(ip) else {
            return Err(Error::Listener {
                pod: self.workload.key(),
                addr: std::net::SocketAddr::new(ip, 0),
                source: std::io::Error::other(
                    "the pod has an IPv6 address but no IPv6 loopback for the agent's listeners",
                ),
            });
        };
        for (kind, sock) in [
            (listener::INBOUND_PLAINTEXT, inbound),
            (listener::HBONE, hbone),
        ] {
            let key = ListenerKey {
                ip: mapped_words(ip),
                kind,
            };
            loaded
                .listeners
                .insert(key, sock.as_raw_fd(), 0)
                .map_err(map_err(mesh_common::maps::LISTENERS))?;
            if !self.listener_keys.contains(&key) {
                self.listener_keys.push(key);
            }
        }
        Ok(())
    }

    /// Applies what changed about the pod in the same sandbox: exclusions, addresses, service
    /// account (a new identity for new connections). Its capture never lapses meanwhile.
    pub fn update(
        &mut self,
        loaded: &mut Loaded,
        w: &Arc<Workload>,
        inputs: &proxy::Inputs,
    ) -> Result<(), Error> {
        if Arc::ptr_eq(&self.workload, w) || *self.workload == **w {
            return Ok(());
        }
        if self.workload.capture != w.capture {
            loaded.sync_exclusions(self.scope, &w.capture)?;
        }
        if self.workload.ips != w.ips {
            let config = PodConfig {
                scope: self.scope,
                flags: 0,
            };
            for ip in &w.ips {
                self.insert_listener_keys(loaded, *ip)?;
                insert_pod_addr(loaded, *ip, config)?;
            }
            let gone: Vec<IpAddr> = self
                .workload
                .ips
                .iter()
                .filter(|ip| !w.ips.contains(ip))
                .copied()
                .collect();
            for ip in gone {
                remove_addr(loaded, ip, self.scope);
                let words = mapped_words(ip);
                self.listener_keys.retain(|k| {
                    let keep = k.ip != words;
                    if !keep {
                        let _ = loaded.listeners.remove(k);
                    }
                    keep
                });
            }
        }
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

    /// Undoes everything `capture` did; logs (does not fail on) individual errors.
    pub fn release(self, loaded: &mut Loaded) {
        let pod = self.workload.key();
        // The links detach with their pins: connects stop being redirected, inbound stops
        // being steered. First, so that no connection meets the programs without the pod's
        // entries (sk_lookup would drop it as an unlisted address).
        if let Err(e) = pins::release(&self.pin_dir) {
            warn!(%pod, error = %e, "release: removing the pinned links failed");
        }
        for ip in &self.workload.ips {
            remove_addr(loaded, *ip, self.scope);
        }
        if let Err(e) = loaded.pods.remove(&self.netns_cookie) {
            warn!(%pod, error = %e, "release: removing the pod entry failed");
        }
        for key in &self.listener_keys {
            if let Err(e) = loaded.listeners.remove(key) {
                warn!(%pod, error = %e, "release: removing a listener entry failed");
            }
        }
        if let Err(e) = loaded.sync_exclusions(self.scope, &Default::default()) {
            warn!(%pod, error = %e, "release: removing the exclusions failed");
        }
        // Accept loops take what is queued, then stop; established connections continue.
        self.stop.send_replace(Stop::Release);
        debug!(%pod, "released");
    }

    /// Stops serving without touching the kernel: the accept loops stop at once (what is queued
    /// stays for the agent that took the listeners over), capture stays in place.
    pub fn relinquish(self) {
        self.stop.send_replace(Stop::Handover);
    }
}

fn open_handles(env: &Env<'_>, w: &Workload) -> Result<Handles, Error> {
    let pod = w.key();
    if !w.cgroup.starts_with(env.cgroup_root) {
        return Err(Error::CgroupOutside {
            pod,
            path: w.cgroup.clone(),
            root: env.cgroup_root.to_owned(),
        });
    }
    if env.agent_cgroup.starts_with(&w.cgroup) {
        return Err(Error::AgentCgroup {
            pod,
            path: w.cgroup.clone(),
        });
    }
    let cgroup = File::open(&w.cgroup).map_err(|source| Error::Cgroup {
        pod: pod.clone(),
        path: w.cgroup.clone(),
        source,
    })?;
    let netns = Arc::new(Netns::open(&w.netns).map_err(|source| Error::Netns {
        pod,
        path: w.netns.clone(),
        source,
    })?);
    Ok(Handles { cgroup, netns })
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

/// Exclusions, then `MESH_PODS` and `MESH_POD_ADDRS`: after this the programs capture the pod.
fn install_pod_entries(
    loaded: &mut Loaded,
    netns_cookie: u64,
    scope: u32,
    w: &Workload,
) -> Result<(), Error> {
    let config = PodConfig { scope, flags: 0 };
    loaded.sync_exclusions(scope, &w.capture)?;
    loaded
        .pods
        .insert(netns_cookie, config, 0)
        .map_err(map_err(mesh_common::maps::PODS))?;
    for ip in &w.ips {
        insert_pod_addr(loaded, *ip, config)?;
    }
    Ok(())
}

/// Marks `ip` as a captured pod's address, with the pod's config (`sk_lookup` reads it).
fn insert_pod_addr(loaded: &mut Loaded, ip: IpAddr, config: PodConfig) -> Result<(), Error> {
    loaded
        .pod_addrs
        .insert(
            PodAddr {
                ip: mapped_words(ip),
            },
            config,
            0,
        )
        .map_err(map_err(mesh_common::maps::POD_ADDRS))
}

/// Removes an address entry if it is still this scope's (another pod may hold it now).
fn remove_addr(loaded: &mut Loaded, ip: IpAddr, scope: u32) {
    let key = PodAddr {
        ip: mapped_words(ip),
    };
    if loaded
        .pod_addrs
        .get(&key, 0)
        .is_ok_and(|c| c.scope == scope)
    {
        if let Err(e) = loaded.pod_addrs.remove(&key) {
            warn!(%ip, error = %e, "removing a pod address entry failed");
        }
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |e| Error::Map {
        map,
        message: super::chain(&e),
    }
}
