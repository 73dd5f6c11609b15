//! `sockops`: when a redirected connection becomes established on the client side, move its
//! original destination from the cookie-keyed pending map to a map keyed by the client's
//! address in the pod's network namespace, which is what the agent sees as the peer of the
//! accepted socket. ACTIVE_ESTABLISHED fires while the client processes the SYN-ACK, before it
//! sends the final ACK, so the entry exists before the agent can accept the connection.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext as _,
};
use mesh_common::{family, ConnKey, Reason};

use crate::maps::{count, is_v4_mapped, v4_mapped, ORIG_DST, PENDING};

const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const AF_INET: u32 = 2;

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let reason = match try_sock_ops(&ctx) {
            Ok(reason) | Err(reason) => reason,
        };
        count(reason);
    }
    1
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<Reason, Reason> {
    // SAFETY: valid sock_ops context for the helpers.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = PENDING.get_ptr(cookie) else {
        return Ok(Reason::SockOpsNotRedirected);
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    let orig = unsafe { *orig };
    let _ = PENDING.remove(cookie);
    let ops = ctx.ops;
    let fam = crate::ctx_field!(ops, family);
    let ip4 = crate::ctx_field!(ops, local_ip4);
    let ip6 = crate::ctx_ip6!(ops, local_ip6);
    let local_port = crate::ctx_field!(ops, local_port);
    let ip = if fam == AF_INET { v4_mapped(ip4) } else { ip6 };
    let key = ConnKey {
        // SAFETY: valid sock_ops context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ip,
        // local_port is in host byte order in bpf_sock_ops.
        port: local_port as u16,
        family: if is_v4_mapped(&ip) {
            family::INET
        } else {
            family::INET6
        },
        _pad: 0,
    };
    ORIG_DST
        .insert(key, orig, 0)
        .map_err(|_| Reason::SockOpsErrOrigDstFull)?;
    Ok(Reason::SockOpsRecorded)
}
