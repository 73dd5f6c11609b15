//! `sk_lookup`, attached to each captured pod's network namespace (and only to those): steer
//! inbound TCP for the pod's address to the agent's in-pod inbound listener, except what
//! arrives on the pod's loopback device (connections made inside the pod: the agent's own
//! delivery to the application, which connects from the client's address over `lo`), local
//! sources (the pod's own address), loopback addresses, and excluded ports. Port 15008 (HBONE) goes to the pod's HBONE
//! listener; the agent's other ports, and local addresses the state does not list (a secondary
//! or link-local address), are dropped. A captured pod without a listener (no agent runs, or
//! it has not opened the pod's listeners yet) is refused too: SK_DROP makes the socket lookup
//! fail, and TCP answers the SYN with a reset. Nothing non-loopback reaches a captured pod
//! around the agent.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{direction, listener, ports, ListenerKey, PodAddr, Reason};

use crate::maps::{
    count, is_loopback4, is_loopback6, port_excluded, v4_mapped, LISTENERS, POD_ADDRS,
};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    match try_sk_lookup(&ctx) {
        Ok(reason) => {
            count(reason);
            SK_PASS
        }
        Err(reason) => {
            count(reason);
            SK_DROP
        }
    }
}

/// `Ok`: pass (steered, or left to the normal lookup). `Err`: drop.
fn try_sk_lookup(ctx: &SkLookupContext) -> Result<Reason, Reason> {
    let lk = ctx.lookup;
    if crate::ctx_field!(lk, protocol) != IPPROTO_TCP {
        return Ok(Reason::LookupSkipNotTcp);
    }
    let (local, remote, loopback) = if crate::ctx_field!(lk, family) == AF_INET {
        let local4 = crate::ctx_field!(lk, local_ip4);
        (
            v4_mapped(local4),
            v4_mapped(crate::ctx_field!(lk, remote_ip4)),
            is_loopback4(local4),
        )
    } else {
        let local6 = crate::ctx_ip6!(lk, local_ip6);
        (
            local6,
            crate::ctx_ip6!(lk, remote_ip6),
            is_loopback6(&local6),
        )
    };
    // Only a socket inside the pod's own namespace sends over its `lo`: the agent's delivery,
    // which connects from the client's address (docs/capture.md, "The client's address"), or
    // a process of the pod connecting to the pod's own address. Nothing from outside the pod
    // arrives there.
    if loopback || local == remote || crate::ctx_field!(lk, ingress_ifindex) == LOOPBACK_IFINDEX {
        return Ok(Reason::LookupSkipLocal);
    }
    let Some(pod) = POD_ADDRS.get_ptr(PodAddr { ip: local }) else {
        return Err(Reason::LookupDropUnlistedAddress);
    };
    // SAFETY: pointer from a successful lookup, read once.
    let scope = unsafe { (*pod).scope };
    // local_port is in host byte order in bpf_sk_lookup.
    let port = crate::ctx_field!(lk, local_port) as u16;
    // Port 15008 is HBONE and goes to the pod's HBONE listener; the agent's other ports are
    // dropped (steered, a connection could loop through the agent; passed, it would reach
    // whatever listens there with no decision). Exclusions cannot name them (the agent's
    // configuration and the state reject it).
    let kind = if port == ports::HBONE {
        listener::HBONE
    } else if is_reserved(port) {
        return Err(Reason::LookupDropReservedPort);
    } else if port_excluded(scope, port, direction::INBOUND) {
        return Ok(Reason::LookupSkipExcludedPort);
    } else {
        listener::INBOUND_PLAINTEXT
    };
    let key = ListenerKey { ip: local, kind };
    match LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => Ok(Reason::LookupSteered),
        // -ENOENT: no listener registered for this pod.
        Err(-2) => Err(Reason::LookupErrNoListener),
        Err(_) => Err(Reason::LookupErrAssign),
    }
}

#[inline(always)]
fn is_reserved(port: u16) -> bool {
    let mut i = 0;
    while i < ports::RESERVED.len() {
        if ports::RESERVED[i] == port {
            return true;
        }
        i += 1;
    }
    false
}
