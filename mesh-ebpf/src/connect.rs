//! `cgroup/connect4` and `cgroup/connect6`: redirect TCP connects of a captured pod to the
//! agent's outbound listener inside the pod's network namespace, and remember where they were
//! going on the socket itself (socket-local storage) until `sock_ops` sees the connection
//! established.

use core::ptr::{addr_of_mut, write_volatile};

use aya_ebpf::{
    helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext as _,
};
use mesh_common::{direction, family, OrigDst, Reason};

use crate::maps::{
    cidr_excluded, count, is_loopback4, is_loopback6, is_v4_mapped, port_excluded, v4_mapped,
    MESH_OUTBOUND_PORT, PODS, SK_ORIG,
};

const IPPROTO_TCP: u32 = 6;
/// Allow the connect (possibly rewritten).
const ALLOW: i32 = 1;
/// Fail the connect with EPERM.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_connect4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_connect6(&ctx))
}

/// A connect that should be redirected but cannot be is refused, never let through to its
/// original destination: a captured pod's traffic never leaves without the agent.
#[inline(always)]
fn verdict(result: Result<Reason, Reason>) -> i32 {
    match result {
        Ok(reason) => {
            count(reason);
            ALLOW
        }
        Err(reason) => {
            count(reason);
            REFUSE
        }
    }
}

/// `Ok(reason)`: decided (redirected or skipped by rule). `Err(reason)`: could not redirect.
fn try_connect4(ctx: &SockAddrContext) -> Result<Reason, Reason> {
    let sa = ctx.sock_addr;
    let dst_ip = crate::ctx_field!(sa, user_ip4);
    let dst_port = u16::from_be(crate::ctx_field!(sa, user_port) as u16);
    let protocol = crate::ctx_field!(sa, protocol);
    if let Some(skip) = should_skip(
        ctx,
        protocol,
        is_loopback4(dst_ip),
        v4_mapped(dst_ip),
        dst_port,
    ) {
        return Ok(skip);
    }
    remember(
        ctx,
        OrigDst {
            ip: v4_mapped(dst_ip),
            port: dst_port,
            family: family::INET,
        },
    )?;
    // Separate volatile stores: LLVM may otherwise merge them into one 8-byte store that the
    // verifier rejects for this context.
    // SAFETY: writes to context fields the verifier allows connect4 to rewrite.
    unsafe {
        write_volatile(
            addr_of_mut!((*sa).user_ip4),
            u32::from_ne_bytes([127, 0, 0, 1]),
        );
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(MESH_OUTBOUND_PORT.load().to_be()),
        );
    }
    Ok(Reason::ConnectRedirected)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<Reason, Reason> {
    let sa = ctx.sock_addr;
    let dst_ip = crate::ctx_ip6!(sa, user_ip6);
    let dst_port = u16::from_be(crate::ctx_field!(sa, user_port) as u16);
    let protocol = crate::ctx_field!(sa, protocol);
    if let Some(skip) = should_skip(ctx, protocol, is_loopback6(&dst_ip), dst_ip, dst_port) {
        return Ok(skip);
    }
    let mapped = is_v4_mapped(&dst_ip);
    let fam = if mapped { family::INET } else { family::INET6 };
    remember(
        ctx,
        OrigDst {
            ip: dst_ip,
            port: dst_port,
            family: fam,
        },
    )?;
    // A dual-stack socket heading to an IPv4 address goes to the IPv4 listener (::ffff:127.0.0.1),
    // a real IPv6 destination to the IPv6 listener ([::1]).
    let new_ip = if mapped {
        v4_mapped(u32::from_ne_bytes([127, 0, 0, 1]))
    } else {
        [0, 0, 0, 1u32.to_be()]
    };
    // SAFETY: as in try_connect4; one 4-byte store per word.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), new_ip[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), new_ip[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), new_ip[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), new_ip[3]);
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(MESH_OUTBOUND_PORT.load().to_be()),
        );
    }
    Ok(Reason::ConnectRedirected)
}

/// The rules that keep a connect away from the agent, in order of cost.
#[inline(always)]
fn should_skip(
    ctx: &SockAddrContext,
    protocol: u32,
    loopback: bool,
    dst_mapped: [u32; 4],
    dst_port: u16,
) -> Option<Reason> {
    if protocol != IPPROTO_TCP {
        return Some(Reason::ConnectSkipNotTcp);
    }
    if loopback {
        return Some(Reason::ConnectSkipLoopback);
    }
    // No exemption for the agent's own sockets: they are created in the agent's cgroup, which
    // is never a captured pod's (the agent refuses to capture a cgroup it runs in), so these
    // programs never see them. (An exemption by process id would let any process that gets
    // the agent's pid after the agent died go around capture.)
    // SAFETY: the context is a valid sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(pod) = PODS.get_ptr(netns) else {
        return Some(Reason::ConnectSkipNotCaptured);
    };
    // SAFETY: the pointer comes from a successful lookup; the value is read once, by copy.
    let scope = unsafe { (*pod).scope };
    if port_excluded(scope, dst_port, direction::OUTBOUND) {
        return Some(Reason::ConnectSkipExcludedPort);
    }
    if cidr_excluded(scope, dst_mapped) {
        return Some(Reason::ConnectSkipExcludedCidr);
    }
    None
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: OrigDst) -> Result<(), Reason> {
    // SAFETY: the context's socket, read at its constant offset.
    let sk = unsafe {
        core::ptr::read_volatile(core::ptr::addr_of!((*ctx.sock_addr).__bindgen_anon_1.sk))
    };
    // SAFETY: the socket of a sock_addr context, as bpf_sk_storage_get takes it.
    if unsafe { SK_ORIG.set(sk, orig) } {
        Ok(())
    } else {
        Err(Reason::ConnectErrStorage)
    }
}
