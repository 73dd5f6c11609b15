//! The return path inside a pod for connections the agent delivers from the client's address
//! (`delivery.preserve_client_address`, docs/capture.md "The client's address").
//!
//! The agent connects to the application from the original client's address: a socket in the
//! pod's namespace with `IP_TRANSPARENT`, bound to the client's address and to the pod's `lo`,
//! carrying [`MARK`]. For the application's answers to come back to that socket instead of
//! leaving the pod towards the client, the pod gets, once, when it is captured:
//! - `net.ipv4.tcp_fwmark_accept=1`: a connection the application accepts carries the mark of
//!   its SYN (which only the agent's sockets set: marks do not cross the pod's veth), so every
//!   packet it sends back is marked;
//! - a rule (priority [`RULE_PRIORITY`], before the main table) sending marked packets to table
//!   [`TABLE`], whose one route is `local 0.0.0.0/0 dev lo` (and `local ::/0 dev lo` when the
//!   pod has an IPv6 address): they are delivered inside the pod, over `lo`, to the agent.
//!
//! They stay when the pod is released, so that connections delivered before keep working;
//! they match nothing else (no other packet carries the mark) and go with the pod's network
//! namespace. Installing is idempotent: an adopting or upgraded agent installs them again.

use std::io::{self, Write as _};

use crate::sys::{
    netlink::{attr_u32, Netlink},
    Netns,
};

/// The mark of the agent's delivery sockets, and the rule's mask (all bits: the mark is the
/// agent's alone inside the pod).
pub const MARK: u32 = mesh_common::DELIVERY_MARK;
/// The routing table of the return path (a number the kernel and CNIs leave free inside pods).
pub const TABLE: u32 = 15_006;
/// The rule's priority: after the `local` table (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 15_006;

/// Installs the return path in `netns` (rule and route for IPv4, and for IPv6 when `ipv6`),
/// from a thread that returns to `home`. Idempotent.
pub fn install(netns: &Netns, home: &Netns, ipv6: bool) -> io::Result<()> {
    netns.run(home, || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sys/net/ipv4/tcp_fwmark_accept")
            .and_then(|mut f| f.write_all(b"1"))
            .map_err(|e| context(e, "setting net.ipv4.tcp_fwmark_accept in the pod"))?;
        let nl = Netlink::open().map_err(|e| context(e, "opening a netlink socket"))?;
        let mut families = vec![AF_INET];
        if ipv6 {
            families.push(AF_INET6);
        }
        for family in families {
            nl.create(rule(family))
                .map_err(|e| context(e, "adding the return path's rule"))?;
            nl.create(route(family))
                .map_err(|e| context(e, "adding the return path's route"))?;
        }
        Ok(())
    })?
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

// Constants of linux/socket.h, linux/rtnetlink.h and linux/fib_rules.h.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_TABLE_UNSPEC: u8 = 0;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const LOOPBACK_IFINDEX: u32 = 1;

/// `RTM_NEWRULE`: `fwmark MARK/0xffffffff lookup TABLE pref RULE_PRIORITY`.
fn rule(family: u8) -> (u16, Vec<u8>) {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action; flags.
    let mut body = vec![family, 0, 0, 0, RT_TABLE_UNSPEC, 0, 0, FR_ACT_TO_TBL];
    body.extend_from_slice(&0u32.to_ne_bytes());
    attr_u32(&mut body, FRA_PRIORITY, RULE_PRIORITY);
    attr_u32(&mut body, FRA_FWMARK, MARK);
    attr_u32(&mut body, FRA_FWMASK, u32::MAX);
    attr_u32(&mut body, FRA_TABLE, TABLE);
    (RTM_NEWRULE, body)
}

/// `RTM_NEWROUTE`: `local 0.0.0.0/0 dev lo table TABLE` (or `::/0`).
fn route(family: u8) -> (u16, Vec<u8>) {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type; flags.
    let mut body = vec![
        family,
        0,
        0,
        0,
        RT_TABLE_UNSPEC,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    attr_u32(&mut body, RTA_TABLE, TABLE);
    attr_u32(&mut body, RTA_OIF, LOOPBACK_IFINDEX);
    (RTM_NEWROUTE, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_hold_the_header_and_their_attributes() {
        // fib_rule_hdr + four u32 attributes; rtmsg + two.
        assert_eq!(i32::from(AF_INET), libc::AF_INET);
        assert_eq!(i32::from(AF_INET6), libc::AF_INET6);
        assert_eq!(rule(AF_INET).0, RTM_NEWRULE);
        assert_eq!(rule(AF_INET).1.len(), 12 + 4 * 8);
        assert_eq!(route(AF_INET6), (RTM_NEWROUTE, route(AF_INET6).1));
        assert_eq!(route(AF_INET6).1.len(), 12 + 2 * 8);
        assert_eq!(route(AF_INET6).1[0], AF_INET6);
    }
}
