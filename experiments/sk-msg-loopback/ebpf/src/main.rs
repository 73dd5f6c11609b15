//! The experiment's programs: sock_ops puts every established TCP socket of the cgroup whose
//! local or remote port is PORT into SOCKS, keyed by its 4-tuple; sk_msg, attached to SOCKS,
//! redirects each message a socket in SOCKS sends to the ingress queue of its peer socket
//! (the other end of the same loopback connection), so it never crosses the TCP stack. With
//! CONFIG[0] = 1 only what the server's sockets send is redirected (one direction), the rest
//! goes through TCP as before. Only for this experiment: the agent does not load these.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_NOEXIST},
    macros::{map, sk_msg, sock_ops},
    maps::{PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Key {
    local_ip: u32,
    remote_ip: u32,
    local_port: u32,
    remote_port: u32,
}

#[map]
static SOCKS: SockHash<Key> = SockHash::with_max_entries(65536, 0);

/// 0: inserted, 1: insert failed, 2: redirected, 3: sent through TCP.
#[map]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

/// [0]: 1 to redirect only what the server's sockets send (the agent's side in the mesh).
#[map]
static CONFIG: aya_ebpf::maps::Array<u32> = aya_ebpf::maps::Array::with_max_entries(1, 0);

/// The port the experiment's echo server listens on.
const PORT: u32 = 7100;

#[inline(always)]
fn count(i: u32) {
    if let Some(p) = COUNTS.get_ptr_mut(i) {
        unsafe { *p += 1 };
    }
}

macro_rules! field {
    ($ptr:expr, $($f:tt)+) => {{
        let ptr = $ptr;
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ptr).$($f)+)) }
    }};
}

#[sock_ops]
pub fn skmsg_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    // 4: ACTIVE_ESTABLISHED (the connecting side), 5: PASSIVE_ESTABLISHED (the accepted side).
    if op != 4 && op != 5 {
        return 1;
    }
    let ops = ctx.ops;
    let family = field!(ops, family);
    if family != 2 {
        return 1;
    }
    // local_port: host byte order; remote_port: network byte order in the upper 16 bits.
    let local_port = field!(ops, local_port);
    let remote_port = u16::from_be((field!(ops, remote_port) >> 16) as u16) as u32;
    if local_port != PORT && remote_port != PORT {
        return 1;
    }
    let mut key = Key {
        local_ip: field!(ops, local_ip4),
        remote_ip: field!(ops, remote_ip4),
        local_port,
        remote_port,
    };
    match SOCKS.update(&mut key, unsafe { &mut *ops }, BPF_NOEXIST as u64) {
        Ok(()) => count(0),
        Err(_) => count(1),
    }
    1
}

#[sk_msg]
pub fn skmsg_redirect(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    let local_port = field!(msg, local_port);
    let remote_port = u16::from_be((field!(msg, remote_port) >> 16) as u16) as u32;
    if CONFIG.get(0).copied() == Some(1) && local_port != PORT {
        count(3);
        return 1;
    }
    // The peer's key: its local end is this socket's remote end.
    let mut peer = Key {
        local_ip: field!(msg, remote_ip4),
        remote_ip: field!(msg, local_ip4),
        local_port: remote_port,
        remote_port: local_port,
    };
    // SK_PASS (1) when the peer is in SOCKS: the message goes to its ingress queue; otherwise
    // the helper returns SK_DROP and sets no redirect, and passing sends it through TCP.
    if SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == 1 {
        count(2);
    } else {
        count(3);
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
