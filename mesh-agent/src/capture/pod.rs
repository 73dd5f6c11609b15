//! One captured pod: its in-pod listeners, its entries in the kernel maps, and the program
//! attachments on its cgroup and network namespace.
//!
//! Capture order makes every redirect land on a listener: listeners first, then map entries,
//! then attachments. Release runs in reverse: map entries go first (the programs stop
//! redirecting at once), then attachments, then the listeners stop accepting after taking what
//! is already queued. Connections already proxied are separate tasks and keep running.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    sync::Arc,
};

use aya::programs::{
    cgroup_sock_addr::CgroupSockAddrLinkId, sk_lookup::SkLookupLinkId, sock_ops::SockOpsLinkId,
    CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
};
use mesh_common::{listener, ports, programs, ListenerKey, PodAddr, PodConfig};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{ebpf::Loaded, mapped_words, Error};
use crate::{proxy, state::Workload, sys::Netns};

#[derive(Debug, Default)]
struct Links {
    connect4: Option<CgroupSockAddrLinkId>,
    connect6: Option<CgroupSockAddrLinkId>,
    sock_ops: Option<SockOpsLinkId>,
    sk_lookup: Option<SkLookupLinkId>,
}

/// A pod the agent has captured.
#[derive(Debug)]
pub struct CapturedPod {
    pub workload: Arc<Workload>,
    identity: crate::identity::SpiffeId,
    scope: u32,
    netns_cookie: u64,
    links: Links,
    listener_keys: Vec<ListenerKey>,
    /// Tells the accept loops to drain and stop.
    stop: watch::Sender<bool>,
    /// What the proxy knows of the pod (listeners, counters, TLS); `None` until captured.
    proxy: Option<Arc<proxy::Pod>>,
}

impl CapturedPod {
    pub fn identity(&self) -> &crate::identity::SpiffeId {
        &self.identity
    }

    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// The proxy's view of the pod (for same-node delivery).
    pub fn proxy(&self) -> Option<&Arc<proxy::Pod>> {
        self.proxy.as_ref()
    }

    /// Whether the workload still attaches the same way (same namespace file, cgroup, addresses,
    /// identity).
    pub fn same_attachment(&self, w: &Workload) -> bool {
        self.workload.netns == w.netns
            && self.workload.cgroup == w.cgroup
            && self.workload.ips == w.ips
    }

    pub fn capture(
        loaded: &mut Loaded,
        workload: Arc<Workload>,
        scope: u32,
        cgroup_root: &Path,
        inputs: &Arc<proxy::Inputs>,
    ) -> Result<Self, Error> {
        let pod = workload.key();
        if !workload.cgroup.starts_with(cgroup_root) {
            return Err(Error::CgroupOutside {
                pod,
                path: workload.cgroup.clone(),
                root: cgroup_root.to_owned(),
            });
        }
        let cgroup = File::open(&workload.cgroup).map_err(|source| Error::Cgroup {
            pod: pod.clone(),
            path: workload.cgroup.clone(),
            source,
        })?;
        let netns = Arc::new(Netns::open(&workload.netns).map_err(|source| Error::Netns {
            pod: pod.clone(),
            path: workload.netns.clone(),
            source,
        })?);
        let identity_err = |source| Error::Identity {
            pod: pod.clone(),
            source,
        };
        let identity = crate::identity::SpiffeId::new(
            inputs.certs.trust_domain(),
            &workload.namespace,
            &workload.service_account,
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
        let listeners = open_listeners(&pod, &netns, &inputs.home, &workload.ips)?;
        let netns_cookie = crate::sys::netns_cookie(std::os::fd::AsFd::as_fd(&listeners.outbound4))
            .map_err(|source| Error::Listener {
                pod: pod.clone(),
                addr: local(&listeners.outbound4),
                source,
            })?;
        let (stop, stopped) = watch::channel(false);
        let mut captured = Self {
            workload: workload.clone(),
            identity: identity.clone(),
            scope,
            netns_cookie,
            links: Links::default(),
            listener_keys: Vec::new(),
            stop,
            proxy: None,
        };
        if let Err(e) = captured.install(loaded, &cgroup, &netns, &listeners) {
            captured.release(loaded);
            return Err(e);
        }
        let ctx = Arc::new(proxy::Pod::new(
            workload,
            netns,
            netns_cookie,
            identity,
            server_tls,
            &inputs.metrics,
        ));
        let groups = [
            (
                proxy::Listener::Outbound,
                [Some(listeners.outbound4), listeners.outbound6],
            ),
            (
                proxy::Listener::Inbound,
                [listeners.inbound4, listeners.inbound6],
            ),
            (proxy::Listener::Hbone, [listeners.hbone4, listeners.hbone6]),
        ];
        for (kind, group) in groups {
            for l in group.into_iter().flatten() {
                proxy::spawn_listener(l, kind, ctx.clone(), inputs.clone(), stopped.clone());
            }
        }
        captured.proxy = Some(ctx);
        Ok(captured)
    }

    fn install(
        &mut self,
        loaded: &mut Loaded,
        cgroup: &File,
        netns: &Netns,
        l: &Listeners,
    ) -> Result<(), Error> {
        let pod = self.workload.key();
        let map_err = |map: &'static str| {
            move |e: aya::maps::MapError| Error::Map {
                map,
                message: e.to_string(),
            }
        };
        let per_ip = self.workload.ips.iter().flat_map(|ip| {
            let (plain, hbone) = match ip {
                IpAddr::V4(_) => (l.inbound4.as_ref(), l.hbone4.as_ref()),
                IpAddr::V6(_) => (l.inbound6.as_ref(), l.hbone6.as_ref()),
            };
            [
                (*ip, listener::INBOUND_PLAINTEXT, plain),
                (*ip, listener::HBONE, hbone),
            ]
        });
        for (ip, kind, sock) in per_ip {
            let Some(sock) = sock else { continue };
            let key = ListenerKey {
                ip: mapped_words(ip),
                kind,
            };
            loaded
                .listeners
                .insert(key, sock.as_raw_fd(), 0)
                .map_err(map_err(mesh_common::maps::LISTENERS))?;
            self.listener_keys.push(key);
        }
        let config = PodConfig {
            scope: self.scope,
            flags: 0,
        };
        loaded.set_exclusions(self.scope, &self.workload.capture, true)?;
        loaded
            .pods
            .insert(self.netns_cookie, config, 0)
            .map_err(map_err(mesh_common::maps::PODS))?;
        for ip in &self.workload.ips {
            loaded
                .pod_addrs
                .insert(
                    PodAddr {
                        ip: mapped_words(*ip),
                    },
                    config,
                    0,
                )
                .map_err(map_err(mesh_common::maps::POD_ADDRS))?;
        }
        let attach_err = |program: &'static str| {
            let pod = pod.clone();
            move |e: aya::programs::ProgramError| Error::Attach {
                pod,
                program,
                message: super::chain(&e),
            }
        };
        let p: &mut SkLookup = loaded
            .program(programs::SK_LOOKUP)?
            .try_into()
            .map_err(attach_err(programs::SK_LOOKUP))?;
        self.links.sk_lookup = Some(p.attach(netns).map_err(attach_err(programs::SK_LOOKUP))?);
        // Cgroup BPF links always coexist with other programs (multi-attach); the link API
        // takes no flags, which is what `Single` passes.
        let mode = CgroupAttachMode::Single;
        let p: &mut SockOps = loaded
            .program(programs::SOCK_OPS)?
            .try_into()
            .map_err(attach_err(programs::SOCK_OPS))?;
        self.links.sock_ops = Some(
            p.attach(cgroup, mode)
                .map_err(attach_err(programs::SOCK_OPS))?,
        );
        let p: &mut CgroupSockAddr = loaded
            .program(programs::CONNECT6)?
            .try_into()
            .map_err(attach_err(programs::CONNECT6))?;
        self.links.connect6 = Some(
            p.attach(cgroup, mode)
                .map_err(attach_err(programs::CONNECT6))?,
        );
        let p: &mut CgroupSockAddr = loaded
            .program(programs::CONNECT4)?
            .try_into()
            .map_err(attach_err(programs::CONNECT4))?;
        self.links.connect4 = Some(
            p.attach(cgroup, mode)
                .map_err(attach_err(programs::CONNECT4))?,
        );
        Ok(())
    }

    /// Applies changed per-pod exclusions in place.
    pub fn update_exclusions(
        &mut self,
        loaded: &mut Loaded,
        w: &Arc<Workload>,
    ) -> Result<(), Error> {
        if self.workload.capture == w.capture {
            return Ok(());
        }
        loaded.set_exclusions(self.scope, &self.workload.capture, false)?;
        loaded.set_exclusions(self.scope, &w.capture, true)?;
        self.workload = w.clone();
        Ok(())
    }

    /// Undoes everything `capture` did; logs (does not fail on) individual errors.
    pub fn release(mut self, loaded: &mut Loaded) {
        let pod = self.workload.key();
        let warn_err = |what: &str, e: &dyn std::fmt::Display| warn!(%pod, what, error = %e, "release step failed");
        for ip in &self.workload.ips {
            if let Err(e) = loaded.pod_addrs.remove(&PodAddr {
                ip: mapped_words(*ip),
            }) {
                warn_err("pod address entry", &e);
            }
        }
        if let Err(e) = loaded.pods.remove(&self.netns_cookie) {
            warn_err("pod entry", &e);
        }
        // Detach in reverse order of attachment: connects stop being redirected first.
        let links = std::mem::take(&mut self.links);
        macro_rules! detach {
            ($id:expr, $name:expr, $ty:ty) => {
                if let Some(id) = $id {
                    let res = loaded
                        .program($name)
                        .map_err(|e| e.to_string())
                        .and_then(|p| {
                            <&mut $ty>::try_from(p)
                                .and_then(|p| p.detach(id))
                                .map_err(|e| super::chain(&e))
                        });
                    if let Err(e) = res {
                        warn_err($name, &e);
                    }
                }
            };
        }
        detach!(links.connect4, programs::CONNECT4, CgroupSockAddr);
        detach!(links.connect6, programs::CONNECT6, CgroupSockAddr);
        detach!(links.sock_ops, programs::SOCK_OPS, SockOps);
        detach!(links.sk_lookup, programs::SK_LOOKUP, SkLookup);
        for key in &self.listener_keys {
            if let Err(e) = loaded.listeners.remove(key) {
                warn_err("listener entry", &e);
            }
        }
        if let Err(e) = loaded.set_exclusions(self.scope, &self.workload.capture, false) {
            warn_err("exclusions", &e);
        }
        // Accept loops take what is queued, then stop; established connections continue.
        let _ = self.stop.send(true);
        debug!(%pod, "released");
    }
}

/// The in-pod listeners, opened inside the pod's network namespace.
struct Listeners {
    outbound4: std::net::TcpListener,
    outbound6: Option<std::net::TcpListener>,
    inbound4: Option<std::net::TcpListener>,
    inbound6: Option<std::net::TcpListener>,
    hbone4: Option<std::net::TcpListener>,
    hbone6: Option<std::net::TcpListener>,
}

fn open_listeners(
    pod: &str,
    netns: &Netns,
    home: &Netns,
    ips: &[IpAddr],
) -> Result<Listeners, Error> {
    let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let listen_err = |addr: SocketAddr| {
        move |source| Error::Listener {
            pod: pod.to_owned(),
            addr,
            source,
        }
    };
    let out4 = SocketAddr::new(lo4, ports::OUTBOUND);
    let in4 = SocketAddr::new(lo4, ports::INBOUND_PLAINTEXT);
    let out6 = SocketAddr::new(lo6, ports::OUTBOUND);
    let in6 = SocketAddr::new(lo6, ports::INBOUND_PLAINTEXT);
    let hb4 = SocketAddr::new(lo4, ports::HBONE);
    let hb6 = SocketAddr::new(lo6, ports::HBONE);
    let has_v4 = ips.iter().any(IpAddr::is_ipv4);
    let has_v6 = ips.iter().any(IpAddr::is_ipv6);
    netns
        .run(home, || {
            let outbound4 = listen(out4).map_err(listen_err(out4))?;
            let inbound4 = has_v4
                .then(|| listen(in4).map_err(listen_err(in4)))
                .transpose()?;
            // IPv6 loopback exists only where IPv6 is enabled in the pod; without it no IPv6
            // connection can be made, so there is nothing to capture.
            let outbound6 = match listen(out6) {
                Ok(l) => Some(l),
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => None,
                Err(e) => return Err(listen_err(out6)(e)),
            };
            let inbound6 = has_v6
                .then(|| listen(in6).map_err(listen_err(in6)))
                .transpose()?;
            let hbone4 = has_v4
                .then(|| listen(hb4).map_err(listen_err(hb4)))
                .transpose()?;
            let hbone6 = has_v6
                .then(|| listen(hb6).map_err(listen_err(hb6)))
                .transpose()?;
            Ok(Listeners {
                outbound4,
                outbound6,
                inbound4,
                inbound6,
                hbone4,
                hbone6,
            })
        })
        .map_err(|source| Error::Netns {
            pod: pod.to_owned(),
            path: "setns".into(),
            source,
        })?
}

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn local(l: &std::net::TcpListener) -> SocketAddr {
    l.local_addr()
        .unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
}
