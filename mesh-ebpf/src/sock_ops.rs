//! `sockops`: when a redirected connection becomes established on the client side, move its
//! original destination from the client socket's own storage to a map keyed by the client's
//! address in the pod's network namespace, which is what the agent sees as the peer of the
//! accepted socket. ACTIVE_ESTABLISHED fires while the client processes the SYN-ACK, before it
//! sends the final ACK, so the entry exists before the agent can accept the connection.

use aya_ebpf::{
    helpers::bpf_get_netns_cookie, macros::sock_ops, programs::SockOpsContext, EbpfContext as _,
};
use mesh_common::{family, ConnKey, Reason};

use crate::maps::{count, is_v4_mapped, v4_mapped, ORIG_DST, SK_ORIG};

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
    let ops = ctx.ops;
    let sk = crate::ctx_field!(ops, __bindgen_anon_2.sk);
    if sk.is_null() {
        return Ok(Reason::SockOpsNotRedirected);
    }
    // SAFETY: the context's socket, checked for null, as bpf_sk_storage_get takes it.
    let Some(orig) = (unsafe { SK_ORIG.get(sk) }) else {
        return Ok(Reason::SockOpsNotRedirected);
    };
    // The value has moved on: free it now rather than with the socket.
    // SAFETY: as above.
    unsafe { SK_ORIG.delete(sk) };
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
