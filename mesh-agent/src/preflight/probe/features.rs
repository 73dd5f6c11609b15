//! The kernel features the data path relies on, what the check says of each when it is
//! missing, and the checks of those that need no program (the links' are in `links`).

use std::{
    net::{IpAddr, Ipv4Addr, TcpListener},
    os::fd::{AsFd as _, AsRawFd as _},
};

use mesh_common::{family, listener, maps, ConnKey, ListenerKey};

use super::{Error, Report};
use crate::{
    capture::{
        self,
        ebpf::{Loaded, OrigDstMap},
        mapped_words,
    },
    sys::{self, Netns},
};

/// A kernel feature the data path relies on: what `mesh-agent check` says when it is missing.
#[derive(Debug)]
pub struct Feature {
    /// The check's name, after `feature `.
    pub name: &'static str,
    /// What it is.
    pub what: &'static str,
    /// The Linux release that introduced it.
    pub since: &'static str,
    /// What the agent uses it for.
    pub used_for: &'static str,
}

impl Feature {
    /// The name of its check.
    pub fn check(&self) -> String {
        format!("feature {}", self.name)
    }

    pub(super) fn missing(&'static self, detail: impl Into<String>) -> Error {
        Error::Feature {
            feature: self,
            detail: detail.into(),
        }
    }
}

pub static CGROUP_LINKS: Feature = Feature {
    name: "cgroup links",
    what: "cgroup/connect4, cgroup/connect6 and sockops programs attached to a cgroup through bpf \
           links (BPF_LINK_CREATE)",
    since: "5.7",
    used_for: "capturing each pod's connections, attached to its cgroup",
};

pub static SK_LOOKUP: Feature = Feature {
    name: "sk_lookup",
    what: "an sk_lookup program attached to a network namespace through a bpf link",
    since: "5.9",
    used_for: "steering each pod's inbound connections to the agent's listeners in the pod",
};

pub static LINK_PINNING: Feature = Feature {
    name: "link pinning",
    what: "bpf links pinned on the bpf file system and opened again from their pins \
           (BPF_OBJ_PIN, BPF_OBJ_GET)",
    since: "5.7",
    used_for: "keeping each pod captured while no agent runs, and adopting its links after a \
               restart or an upgrade",
};

pub static LINK_UPDATE: Feature = Feature {
    name: "link update",
    what: "the program of a cgroup or network namespace link replaced in place \
           (BPF_LINK_UPDATE; 5.7 for cgroup links)",
    since: "5.8",
    used_for: "an upgraded agent taking over each pod's pinned links without a moment uncaptured",
};

pub static SOCKHASH_LISTENERS: Feature = Feature {
    name: "sockhash listeners",
    what: "a listening TCP socket stored in a SOCKHASH map",
    since: "5.7",
    used_for: "sk_lookup finding the agent's in-pod inbound listeners (MESH_LISTENERS)",
};

pub static NETNS_COOKIE: Feature = Feature {
    name: "SO_NETNS_COOKIE",
    what: "a socket's network namespace cookie read with getsockopt(SO_NETNS_COOKIE)",
    since: "5.14",
    used_for: "knowing each pod by the cookie its programs see (bpf_get_netns_cookie), the key \
               of its entries in MESH_PODS and MESH_ORIG_DST",
};

pub static LOOKUP_AND_DELETE: Feature = Feature {
    name: "lookup-and-delete",
    what: "an entry read and removed in one call on an LRU hash map \
           (BPF_MAP_LOOKUP_AND_DELETE_ELEM)",
    since: "5.14",
    used_for: "taking the original destination of each redirected connection from MESH_ORIG_DST",
};

/// Every feature, in the order they are checked.
pub static FEATURES: [&Feature; 7] = [
    &CGROUP_LINKS,
    &SK_LOOKUP,
    &LINK_PINNING,
    &LINK_UPDATE,
    &SOCKHASH_LISTENERS,
    &NETNS_COOKIE,
    &LOOKUP_AND_DELETE,
];

/// A new network namespace, and a listening socket on its 127.0.0.1.
pub(super) fn private_netns() -> Result<(Netns, TcpListener), Error> {
    let err = |what| move |source| Error::Netns { what, source };
    let netns = Netns::private().map_err(err("creating it (unshare CLONE_NEWNET)"))?;
    let home = Netns::current().map_err(err("opening this thread's own"))?;
    let listener = netns
        .run(&home, || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .map_err(err("entering it (setns)"))?
        .map_err(err("listening on 127.0.0.1 in it"))?;
    Ok((netns, listener))
}

/// A listening socket in MESH_LISTENERS, as the agent registers a pod's listeners.
pub(super) fn sockhash(loaded: &mut Loaded, listener: &TcpListener, report: &mut Report) {
    let key = ListenerKey {
        ip: mapped_words(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        kind: listener::INBOUND_PLAINTEXT,
    };
    let map_err = |what: &str| {
        let what = format!("{what} {}", maps::LISTENERS);
        move |e: aya::maps::MapError| format!("{what}: {}", capture::chain(&e))
    };
    let done = loaded
        .listeners
        .insert(key, listener.as_raw_fd(), 0)
        .map_err(map_err("inserting into"))
        .and_then(|()| {
            loaded
                .listeners
                .remove(&key)
                .map_err(map_err("removing from"))
        });
    match done {
        Ok(()) => report.ok(
            SOCKHASH_LISTENERS.check(),
            format!(
                "a listening TCP socket stored in {} and removed",
                maps::LISTENERS
            ),
        ),
        Err(detail) => report.fail(
            SOCKHASH_LISTENERS.check(),
            SOCKHASH_LISTENERS.missing(detail),
        ),
    };
}

/// The netns cookie of the listener (in the check's namespace), as the agent reads a pod's.
pub(super) fn netns_cookie(listener: &TcpListener, report: &mut Report) -> Option<u64> {
    match sys::netns_cookie(listener.as_fd()) {
        Ok(cookie) => {
            report.ok(
                NETNS_COOKIE.check(),
                format!("cookie {cookie} read from a socket in a new network namespace"),
            );
            Some(cookie)
        }
        Err(e) => {
            report.fail(
                NETNS_COOKIE.check(),
                NETNS_COOKIE.missing(format!("getsockopt: {e}")),
            );
            None
        }
    }
}

/// A take from MESH_ORIG_DST, as the agent takes each accepted connection's original
/// destination: a key that is not there must answer absent.
pub(super) fn lookup_and_delete(
    orig_dst: &OrigDstMap,
    cookie: Option<u64>,
    listener: &TcpListener,
    report: &mut Report,
) {
    let key = ConnKey {
        netns_cookie: cookie.unwrap_or(0),
        ip: mapped_words(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        port: listener.local_addr().map_or(0, |a| a.port()),
        family: family::INET,
        _pad: 0,
    };
    let failed = match orig_dst.take(&key) {
        Ok(None) => {
            report.ok(
                LOOKUP_AND_DELETE.check(),
                format!(
                    "{} (an LRU hash map) answered absent for a missing key",
                    maps::ORIG_DST
                ),
            );
            return;
        }
        Ok(Some(found)) => format!("an empty {} returned an entry: {found:?}", maps::ORIG_DST),
        // ENOTSUPP (524): the kernel's own code for an operation a map type lacks.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
            ) =>
        {
            format!(
                "{} answered {e} instead of absent: this kernel cannot take an entry out of a \
                 hash map in one call",
                maps::ORIG_DST
            )
        }
        Err(e) => format!("{}: {e}", maps::ORIG_DST),
    };
    report.fail(LOOKUP_AND_DELETE.check(), LOOKUP_AND_DELETE.missing(failed));
}
