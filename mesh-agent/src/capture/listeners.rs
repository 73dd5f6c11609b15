//! The agent's listeners inside one pod's network namespace: outbound (15001), inbound
//! plaintext (15006) and HBONE (15008), on 127.0.0.1 and, where the pod has IPv6 loopback, on
//! [::1]. Opened by the agent (a thread enters the pod's namespace with `setns`), or received
//! from the agent it takes over from: the same sockets, so nothing queued on them is lost.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use mesh_common::ports;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use super::Error;
use crate::sys::Netns;

/// The in-pod listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// 127.0.0.1:15001: redirected outbound connections.
    Outbound,
    /// 127.0.0.1:15006: plaintext inbound connections.
    Inbound,
    /// 127.0.0.1:15008: HBONE connections (mTLS, many streams each).
    Hbone,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::Inbound => "inbound",
            Listener::Hbone => "hbone",
        }
    }
}

/// One pod's listeners, shared with their accept loops.
#[derive(Debug, Clone)]
pub struct Listeners {
    pub outbound4: Arc<TcpListener>,
    pub inbound4: Arc<TcpListener>,
    pub hbone4: Arc<TcpListener>,
    /// The IPv6 twins, where the pod has `[::1]` (without it no IPv6 connection can be made,
    /// so there is nothing to capture).
    pub v6: Option<[Arc<TcpListener>; 3]>,
}

/// Listeners before they are registered with the runtime (opened, or received from another
/// agent), with the netns cookie they share.
#[derive(Debug)]
pub struct Opened {
    pub netns_cookie: u64,
    sockets: Vec<(Listener, bool, std::net::TcpListener)>,
}

impl Opened {
    /// Opens the listeners inside `netns`.
    pub fn open(pod: &str, netns: &Netns, home: &Netns) -> Result<Opened, Error> {
        let listen_err = |addr: SocketAddr| {
            move |source| Error::Listener {
                pod: pod.to_owned(),
                addr,
                source,
            }
        };
        let sockets = netns
            .run(home, || {
                let mut sockets = Vec::with_capacity(6);
                for (kind, port) in KINDS {
                    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
                    sockets.push((kind, false, listen(addr).map_err(listen_err(addr))?));
                }
                for (kind, port) in KINDS {
                    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
                    match listen(addr) {
                        Ok(l) => sockets.push((kind, true, l)),
                        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => break,
                        Err(e) => return Err(listen_err(addr)(e)),
                    }
                }
                Ok(sockets)
            })
            .map_err(|source| Error::Netns {
                pod: pod.to_owned(),
                path: "setns".into(),
                source,
            })??;
        let first = &sockets[0].2;
        let netns_cookie =
            crate::sys::netns_cookie(first.as_fd()).map_err(|source| Error::Listener {
                pod: pod.to_owned(),
                addr: local(first),
                source,
            })?;
        Ok(Opened {
            netns_cookie,
            sockets,
        })
    }

    /// Listening sockets received from another agent, checked with the kernel (never taken
    /// on its word): each must be a listening TCP socket on one of the in-pod addresses, all
    /// in one network namespace, with the IPv4 three present.
    pub fn from_fds(fds: Vec<OwnedFd>) -> Result<Opened, String> {
        let mut sockets = Vec::with_capacity(fds.len());
        let mut cookie = None;
        for fd in fds {
            let socket = Socket::from(fd);
            if !socket.is_listener().unwrap_or(false) {
                return Err("a descriptor is not a listening socket".into());
            }
            let addr = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or("a descriptor is not an IP socket")?;
            let this = crate::sys::netns_cookie(socket.as_fd())
                .map_err(|e| format!("reading the netns cookie of {addr}: {e}"))?;
            if *cookie.get_or_insert(this) != this {
                return Err("listeners of different network namespaces".into());
            }
            let kind = KINDS
                .iter()
                .find(|(_, port)| *port == addr.port())
                .map(|(kind, _)| *kind)
                .filter(|_| addr.ip().is_loopback())
                .ok_or_else(|| format!("{addr} is not an in-pod listener address"))?;
            sockets.push((kind, addr.is_ipv6(), std::net::TcpListener::from(socket)));
        }
        let netns_cookie = cookie.ok_or("no listeners")?;
        for (kind, _) in KINDS {
            if !sockets.iter().any(|(k, v6, _)| *k == kind && !v6) {
                return Err(format!("no IPv4 {} listener", kind.as_str()));
            }
        }
        Ok(Opened {
            netns_cookie,
            sockets,
        })
    }

    /// Registers the sockets with the runtime (inside a Tokio runtime).
    pub fn register(self, pod: &str) -> Result<Listeners, Error> {
        let mut v4: Vec<Option<Arc<TcpListener>>> = vec![None, None, None];
        let mut v6: Vec<Option<Arc<TcpListener>>> = vec![None, None, None];
        for (kind, is_v6, l) in self.sockets {
            let addr = local(&l);
            l.set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
                .map(|l| {
                    let slot = KINDS.iter().position(|(k, _)| *k == kind).unwrap_or(0);
                    let family = if is_v6 { &mut v6 } else { &mut v4 };
                    family[slot] = Some(Arc::new(l));
                })
                .map_err(|source| Error::Listener {
                    pod: pod.to_owned(),
                    addr,
                    source,
                })?;
        }
        let missing = || Error::Listener {
            pod: pod.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            source: std::io::Error::other("an IPv4 listener is missing"),
        };
        let take = |v: &mut Vec<Option<Arc<TcpListener>>>, i: usize| v[i].take();
        let (o4, i4, h4) = (take(&mut v4, 0), take(&mut v4, 1), take(&mut v4, 2));
        let v6 = match (take(&mut v6, 0), take(&mut v6, 1), take(&mut v6, 2)) {
            (Some(o), Some(i), Some(h)) => Some([o, i, h]),
            _ => None,
        };
        Ok(Listeners {
            outbound4: o4.ok_or_else(missing)?,
            inbound4: i4.ok_or_else(missing)?,
            hbone4: h4.ok_or_else(missing)?,
            v6,
        })
    }
}

/// The kinds, in the order of [`Listeners`]' fields, with their ports.
const KINDS: [(Listener, u16); 3] = [
    (Listener::Outbound, ports::OUTBOUND),
    (Listener::Inbound, ports::INBOUND_PLAINTEXT),
    (Listener::Hbone, ports::HBONE),
];

impl Listeners {
    /// Every listener with its kind.
    pub fn all(&self) -> Vec<(Listener, Arc<TcpListener>)> {
        let mut all = vec![
            (Listener::Outbound, self.outbound4.clone()),
            (Listener::Inbound, self.inbound4.clone()),
            (Listener::Hbone, self.hbone4.clone()),
        ];
        if let Some([o, i, h]) = &self.v6 {
            all.push((Listener::Outbound, o.clone()));
            all.push((Listener::Inbound, i.clone()));
            all.push((Listener::Hbone, h.clone()));
        }
        all
    }

    /// The inbound plaintext and HBONE listeners that serve connections to `ip`.
    pub fn inbound_for(&self, ip: IpAddr) -> Option<(&TcpListener, &TcpListener)> {
        match ip {
            IpAddr::V4(_) => Some((&self.inbound4, &self.hbone4)),
            IpAddr::V6(_) => self.v6.as_ref().map(|[_, i, h]| (&**i, &**h)),
        }
    }

    /// The descriptors, for handing them over (the receiver gets duplicates).
    pub fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        let mut fds = vec![
            self.outbound4.as_fd(),
            self.inbound4.as_fd(),
            self.hbone4.as_fd(),
        ];
        if let Some(six) = &self.v6 {
            fds.extend(six.iter().map(|l| l.as_fd()));
        }
        fds
    }
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
