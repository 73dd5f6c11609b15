//! Network plumbing: the underlay bridge, node and pod namespaces, veth pairs, routes.
//!
//! ```text
//!  underlay netns: br0 ── v1 ══ eth0 (n1, 10.240.0.1/24) ── p0 ══ eth0 (pod 10.240.1.2/32)
//!                     └── v2 ══ eth0 (n2, 10.240.0.2/24) ── p0 ══ eth0 (pod 10.240.2.2/32)
//! ```
//! Pods route everything to their node (`default dev eth0`); the node answers ARP for every
//! address (proxy_arp on `p<j>`) and routes: `<pod>/32 dev p<j>` for its own pods and
//! `10.240.<k>.0/24 via 10.240.0.<k>` for the pods of node k.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use super::{
    layout::{Layout, NETNS_DIR},
    sys,
};

/// Runs `ip <args>` and fails with the command line and its stderr.
fn ip(args: &[&str]) -> Result<()> {
    sys::run(Command::new("ip").args(args))
}

/// Runs `ip -n <netns> <args>`.
fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Creates a network namespace (`ip netns add`, which makes /run/netns/NAME).
fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])
}

/// Names of all network namespaces in /run/netns.
pub(crate) fn list_netns() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("listing {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Deletes a network namespace; succeeds if it is already gone.
pub(crate) fn del_netns(name: &str) -> Result<()> {
    match ip(&["netns", "del", name]) {
        Ok(()) => Ok(()),
        Err(_) if !Path::new(NETNS_DIR).join(name).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Builds the whole network of `layout`. On error the caller tears down by netns prefix.
pub(crate) fn build(layout: &Layout) -> Result<()> {
    let underlay = layout.underlay_netns_name.as_str();
    add_netns(underlay)?;
    ip_in(underlay, &["link", "set", "lo", "up"])?;
    ip_in(underlay, &["link", "add", "br0", "type", "bridge"])?;
    ip_in(underlay, &["link", "set", "br0", "up"])?;

    for node in &layout.nodes {
        let ns = node.netns_name.as_str();
        let uplink = format!("v{}", node.index);
        add_netns(ns)?;
        ip_in(
            underlay,
            &[
                "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        ip_in(underlay, &["link", "set", &uplink, "master", "br0", "up"])?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
        ip_in(
            ns,
            &[
                "addr",
                "add",
                &format!("{}/24", node.underlay_ip),
                "dev",
                "eth0",
            ],
        )?;
        ip_in(ns, &["link", "set", "eth0", "up"])?;
        sys::sysctl(&node.netns, "net.ipv4.ip_forward", "1")
            .with_context(|| format!("enabling forwarding on node {}", node.name))?;
        for other in layout.nodes.iter().filter(|o| o.index != node.index) {
            let subnet = format!("{}/24", other.pod_subnet);
            ip_in(
                ns,
                &[
                    "route",
                    "add",
                    &subnet,
                    "via",
                    &other.underlay_ip.to_string(),
                ],
            )?;
        }
    }

    for pod in &layout.pods {
        let node = layout
            .nodes
            .iter()
            .find(|n| n.name == pod.node)
            .with_context(|| format!("pod {} is on unknown node {}", pod.full_name(), pod.node))?;
        let (ns, pod_ns, veth) = (
            node.netns_name.as_str(),
            pod.netns_name.as_str(),
            pod.host_veth.as_str(),
        );
        add_netns(pod_ns)?;
        ip_in(
            ns,
            &[
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod_ns,
            ],
        )?;
        ip_in(ns, &["link", "set", veth, "up"])?;
        sys::sysctl(&node.netns, &format!("net.ipv4.conf.{veth}.proxy_arp"), "1")
            .with_context(|| format!("enabling proxy ARP towards pod {}", pod.full_name()))?;
        // Proxy ARP answers after proxy_delay (0.8 s by default): every first connection to a
        // new neighbour would wait that long.
        sys::sysctl(
            &node.netns,
            &format!("net.ipv4.neigh.{veth}.proxy_delay"),
            "0",
        )
        .with_context(|| {
            format!(
                "disabling the proxy ARP delay towards pod {}",
                pod.full_name()
            )
        })?;
        ip_in(
            ns,
            &["route", "add", &format!("{}/32", pod.ip), "dev", veth],
        )?;
        ip_in(pod_ns, &["link", "set", "lo", "up"])?;
        ip_in(
            pod_ns,
            &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
        )?;
        ip_in(pod_ns, &["link", "set", "eth0", "up"])?;
        ip_in(
            pod_ns,
            &["route", "add", "default", "dev", "eth0", "scope", "link"],
        )?;
    }
    Ok(())
}
