//! The rules every object of the state obeys, shared by the store and the sources so that an
//! object is judged the same whichever way it arrives. A rule returns a [`Problem`] that says
//! what is wrong and in which field; the caller says where the object is (`workloads[3]
//! (legacy/client)` in the state file, `workload (legacy/client)` for the store).
//!
//! Conflicts between objects (an address or a VIP port used twice) are decided by the caller's
//! `owner` function, which claims the address for the object being checked and returns the
//! object that already had it.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use super::{Service, Workload};

/// What is wrong with one object, displayed as the rest of a message after the object's
/// location: `.ips: 10.0.0.7 is also the address of shop/api`, or `: listed twice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field, relative to the object (`ips`, `ports[0]`, `capture.exclude_inbound_ports`);
    /// `None` when the object as a whole is at fault.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    fn new(field: Option<String>, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }

    fn field(field: &str, message: impl Into<String>) -> Self {
        Self::new(Some(field.to_owned()), message)
    }

    /// The object as a whole is at fault.
    pub fn whole(message: impl Into<String>) -> Self {
        Self::new(None, message)
    }

    /// The object is listed twice (in a file or in one change).
    pub fn listed_twice() -> Self {
        Self::new(None, "listed twice")
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, ".{field}: {}", self.message),
            None => write!(f, ": {}", self.message),
        }
    }
}

impl std::error::Error for Problem {}

/// An IPv4 address written as IPv4-mapped IPv6 (`::ffff:10.0.0.1`) would be a second name for
/// the same address, past the duplicate checks: it must be written as IPv4.
fn v4_mapped(field: &str, ip: IpAddr) -> Result<(), Problem> {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Err(Problem::field(
                field,
                format!("{ip} is an IPv4-mapped IPv6 address: write it as {v4}"),
            )),
            None => Ok(()),
        },
        IpAddr::V4(_) => Ok(()),
    }
}

/// A workload needs a name and a namespace (checked before anything else: without them the
/// workload has no key).
pub fn workload_name(w: &Workload) -> Result<(), Problem> {
    if w.name.is_empty() || w.namespace.is_empty() {
        return Err(Problem::new(None, "name and namespace must not be empty"));
    }
    Ok(())
}

/// The rules of a workload's fields, in order: at least one address, each address its own
/// (`owner` claims it and returns who had it), absolute netns and cgroup paths (or empty: not
/// known), valid exclusions.
pub fn workload(
    w: &Workload,
    mut owner: impl FnMut(IpAddr) -> Option<String>,
) -> Result<(), Problem> {
    if w.ips.is_empty() {
        return Err(Problem::field(
            "ips",
            "a workload needs at least one address",
        ));
    }
    for ip in &w.ips {
        v4_mapped("ips", *ip)?;
        if let Some(other) = owner(*ip) {
            return Err(Problem::field(
                "ips",
                format!("{ip} is also the address of {other}"),
            ));
        }
    }
    // Either both paths, or neither and a UID (the node finds the sandbox from it), or neither
    // for a waypoint's pod (never captured).
    let given = !w.netns.as_os_str().is_empty() || !w.cgroup.as_os_str().is_empty();
    if given {
        for (field, path) in [("netns", &w.netns), ("cgroup", &w.cgroup)] {
            if path.as_os_str().is_empty() {
                return Err(Problem::field(
                    field,
                    "missing: give both netns and cgroup, or neither and the pod's uid",
                ));
            }
            if !path.is_absolute() {
                return Err(Problem::field(
                    field,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
    } else if w.uid.as_deref().is_none_or(str::is_empty) && !w.is_waypoint() {
        return Err(Problem::field(
            "uid",
            "a workload without netns and cgroup needs the pod's uid (the node finds its \
             cgroup and network namespace from it)",
        ));
    }
    w.capture.validate().map_err(|e| match e.split_once(": ") {
        Some((field, message)) => Problem::field(&format!("capture.{field}"), message),
        None => Problem::field("capture", e),
    })
}

/// The rules of a service, in order: at least one VIP; explicit endpoints only without a
/// selector, with valid addresses and ports; then per port, no port 0 and each `vip:port` its
/// own (`owner` claims it and returns who had it).
pub fn service(
    s: &Service,
    mut owner: impl FnMut(SocketAddr) -> Option<String>,
) -> Result<(), Problem> {
    if s.vips.is_empty() {
        return Err(Problem::field(
            "vips",
            "a service needs at least one address",
        ));
    }
    for vip in &s.vips {
        v4_mapped("vips", *vip)?;
    }
    if let Some(endpoints) = &s.endpoints {
        if !s.selector.is_empty() {
            return Err(Problem::field(
                "selector",
                "a service with explicit endpoints has no selector",
            ));
        }
        for (port, addrs) in endpoints {
            for e in addrs {
                v4_mapped(&format!("endpoints[{port}]"), e.ip())?;
                if e.port() == 0 {
                    return Err(Problem::field(
                        &format!("endpoints[{port}]"),
                        format!("{e}: port 0 is not a valid port"),
                    ));
                }
            }
        }
    }
    for (j, p) in s.ports.iter().enumerate() {
        if p.port == 0 || p.target_port == 0 {
            return Err(Problem::field(
                &format!("ports[{j}]"),
                "port 0 is not a valid port",
            ));
        }
        for vip in &s.vips {
            let vip_port = SocketAddr::new(*vip, p.port);
            if let Some(other) = owner(vip_port) {
                return Err(Problem::new(
                    None,
                    format!("{vip_port} is also a port of {other}"),
                ));
            }
        }
    }
    Ok(())
}

/// A namespace needs a name.
/// A waypoint names a service of its namespace: a DNS label (RFC 1035, as Kubernetes service
/// names are).
pub fn waypoint_name(name: &str) -> Result<(), Problem> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Problem::field(
            "waypoint",
            format!(
                "{name:?} is not a service name (a DNS label: lowercase letters, digits and \
                 '-', starting with a letter, at most 63 characters)"
            ),
        ))
    }
}

pub fn namespace_name(name: &str) -> Result<(), Problem> {
    if name.is_empty() {
        return Err(Problem::new(None, "the name is empty"));
    }
    Ok(())
}
