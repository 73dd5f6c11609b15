//! One captured pod, its kernel side: its in-pod listeners, its entries in the kernel maps, and
//! its programs' links, pinned so that they outlive the agent. Serving it (identity, proxy) is
//! the pod lifecycle manager's part (`crate::pods`).
//!
//! Capture order makes every redirect land on a listener: listeners first, then map entries,
//! then links. A pod whose links were pinned by a previous agent is adopted in the same order:
//! its connections are refused (no listener) until the new listeners are registered, then
//! served. Release runs in reverse: map entries go first (the programs stop redirecting at
//! once), then the pins (the links detach), then the listeners stop accepting after taking what
//! is already queued (the lifecycle manager stops the accept loops). Connections already
//! proxied are separate tasks and keep running.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use mesh_common::{listener, ListenerKey, PodAddr, PodConfig};
use tracing::{debug, warn};

use super::{
    ebpf::Loaded,
    listeners::{Listeners, Opened},
    mapped_words,
    pins::{self, Layout, PinnedPod, Target},
    Error,
};
use crate::{state::Workload, sys::Netns};

/// Where pods are captured: what every capture needs besides the pod.
#[derive(Debug)]
pub struct Env<'a> {
    pub layout: &'a Layout,
    pub cgroup_root: &'a Path,
    /// The agent's own cgroup: a pod whose cgroup contains it is never captured (the programs
    /// would redirect the agent's own connections).
    pub agent_cgroup: &'a Path,
    /// The agent's own network namespace, where threads return after opening pod sockets.
    pub home: &'a Netns,
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

/// A pod's sandbox opened and its listeners ready (opened, or received from a previous agent),
/// before anything of it is in the kernel maps.
#[derive(Debug)]
pub struct Prepared {
    workload: Arc<Workload>,
    handles: Handles,
    opened: Opened,
}

/// The kernel side of a captured pod.
#[derive(Debug)]
pub struct CapturedPod {
    workload: Arc<Workload>,
    scope: u32,
    netns_cookie: u64,
    netns: Arc<Netns>,
    pin_dir: PathBuf,
    listeners: Listeners,
    listener_keys: Vec<ListenerKey>,
}

/// The kernel side of a pod being captured: opened once, used by every step.
#[derive(Debug)]
struct Handles {
    cgroup: File,
    netns: Arc<Netns>,
}

impl Prepared {
    /// Opens `workload`'s cgroup and network namespace, and its listeners there (or takes
    /// those a previous agent handed over, `received`).
    pub fn open(
        env: &Env<'_>,
        workload: Arc<Workload>,
        received: Option<Opened>,
    ) -> Result<Self, Error> {
        let handles = open_handles(env, &workload)?;
        let opened = match received {
            Some(opened) => opened,
            None => Opened::open(&workload.key(), &handles.netns, env.home)?,
        };
        Ok(Self {
            workload,
            handles,
            opened,
        })
    }

    /// Registers the listeners, puts the pod in the kernel maps and attaches its programs
    /// (adopting the links pinned for its network namespace, by a previous agent or by an
    /// attempt that could not serve it). `scope` gives the pod's exclusion scope for its netns
    /// cookie (the one already in the maps, or a new one).
    pub fn attach(
        self,
        loaded: &mut Loaded,
        env: &Env<'_>,
        scope: impl FnOnce(u64) -> u32,
    ) -> Result<(CapturedPod, Outcome), Error> {
        let pod = self.workload.key();
        let netns_cookie = self.opened.netns_cookie;
        let listeners = self.opened.register(&pod)?;
        let scope = scope(netns_cookie);
        let pinned = env.layout.find(netns_cookie)?;
        let pin_dir = pinned
            .clone()
            .unwrap_or_else(|| env.layout.pod_dir(netns_cookie, &pod));
        let mut captured = CapturedPod {
            workload: self.workload,
            scope,
            netns_cookie,
            netns: self.handles.netns.clone(),
            pin_dir,
            listeners,
            listener_keys: Vec::new(),
        };
        captured.install_entries(loaded)?;
        let target = Target {
            pod: &pod,
            cgroup: &self.handles.cgroup,
            netns: &self.handles.netns,
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
        Ok((captured, outcome))
    }
}

/// Closes a pod that cannot be served (its listeners, identity or TLS failed): its map entries
/// and pinned links are put in place (or kept) without listeners, so that its connections are
/// refused rather than passed, until a later attempt serves it. Returns its pins.
pub fn close(
    loaded: &mut Loaded,
    env: &Env<'_>,
    workload: &Workload,
    scope: impl FnOnce(u64) -> u32,
) -> Result<PinnedPod, Error> {
    let pod = workload.key();
    let handles = open_handles(env, workload)?;
    let netns_cookie =
        crate::sys::netns_cookie_of(&handles.netns, env.home).map_err(|source| Error::Netns {
            pod: pod.clone(),
            path: workload.netns.clone(),
            source,
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

impl CapturedPod {
    pub fn workload(&self) -> &Arc<Workload> {
        &self.workload
    }

    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// The directory of its pinned links.
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// The pod's network namespace, open for the pod's life.
    pub fn netns(&self) -> &Arc<Netns> {
        &self.netns
    }

    pub fn scope(&self) -> u32 {
        self.scope
    }

    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// Whether `w` is still the same pod sandbox (same network namespace and cgroup); other
    /// changes are applied in place by [`CapturedPod::update`].
    pub fn same_sandbox(&self, w: &Workload) -> bool {
        self.workload.netns == w.netns && self.workload.cgroup == w.cgroup
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

    /// Applies what changed about the pod in the same sandbox to the kernel: exclusions and
    /// addresses. Its capture never lapses meanwhile.
    pub fn update(&mut self, loaded: &mut Loaded, w: &Arc<Workload>) -> Result<(), Error> {
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
        self.workload = w.clone();
        Ok(())
    }

    /// Undoes everything [`Prepared::attach`] did; logs (does not fail on) individual errors.
    /// The listeners are left to their accept loops, which the caller stops.
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
        debug!(%pod, "released from the kernel");
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
