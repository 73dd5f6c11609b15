//! The ABI between the mesh's eBPF programs and the agent.
//!
//! Everything that both sides must agree on lives here and only here: program and map names,
//! map key and value layouts, counter reason codes and the agent's ports. Structs are
//! `#[repr(C)]`, `Copy` and free of implicit padding (explicit `_pad` fields instead), so the
//! kernel and user views of a map entry are byte-identical.
//!
//! Addresses are stored as in the kernel's context structs: IPv4 as a `u32` in network byte
//! order, IPv6 as four `u32` words in network byte order, and IPv4 inside IPv6 fields as a
//! v4-mapped address (`::ffff:a.b.c.d`). Ports are stored in host byte order everywhere in these
//! maps; each program converts from whatever order its context field uses.
#![no_std]

/// Ports of the agent, identical to Istio ambient's so tooling and HBONE peers interoperate.
/// The mark of the sockets a node agent delivers connections to a captured pod's application
/// from (the client's address, `IP_TRANSPARENT`); the pod's return path routes packets
/// carrying it back over `lo` (mesh-agent `capture::return_path`).
pub const DELIVERY_MARK: u32 = 0x4d53_0001;

pub mod ports {
    /// Outbound listener inside each captured pod (`127.0.0.1` and `[::1]`).
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext listener inside each captured pod (reached through `sk_lookup`).
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// HBONE (mTLS HTTP/2 CONNECT) listener.
    pub const HBONE: u16 = 15008;
    /// Prometheus metrics.
    pub const METRICS: u16 = 15020;
    /// Readiness.
    pub const READINESS: u16 = 15021;
    /// Admin (loopback only).
    pub const ADMIN: u16 = 15000;
    /// Ports owned by the agent: never steered to the inbound listener and never proxied to,
    /// so that a connection can never loop through the agent.
    pub const RESERVED: [u16; 6] = [
        OUTBOUND,
        INBOUND_PLAINTEXT,
        HBONE,
        METRICS,
        READINESS,
        ADMIN,
    ];
}

/// Names of the programs in the eBPF object (`bpftool prog list` shows them; prefix `mesh_`).
pub mod programs {
    /// `cgroup/connect4`: redirects IPv4 TCP connects of captured pods.
    pub const CONNECT4: &str = "mesh_connect4";
    /// `cgroup/connect6`: redirects IPv6 TCP connects of captured pods.
    pub const CONNECT6: &str = "mesh_connect6";
    /// `sockops`: records the original destination under the client's address once connected.
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    /// `sk_lookup`: steers inbound TCP to the agent's inbound listener of the pod.
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// All programs, for pinning and inspection.
    pub const ALL: [&str; 4] = [CONNECT4, CONNECT6, SOCK_OPS, SK_LOOKUP];
}

/// Names of the maps in the eBPF object.
pub mod maps {
    /// `SkStorage<OrigDst>` (a BTF map): the original destination on the client socket itself,
    /// set by connect4/6, read and freed by sock_ops once the connection is established.
    pub const SK_ORIG: &str = "MESH_SK_ORIG";
    /// `LruHashMap<ConnKey, OrigDst>`: set by sock_ops, read (and deleted) by the agent.
    pub const ORIG_DST: &str = "MESH_ORIG_DST";
    /// `HashMap<u64 netns cookie, PodConfig>`: captured pods, written by the agent.
    pub const PODS: &str = "MESH_PODS";
    /// `HashMap<PortKey, u8>`: excluded ports, global (scope 0) and per pod.
    pub const EXCLUDED_PORTS: &str = "MESH_EXCLUDED_PORTS";
    /// `LpmTrie<CidrKey, u8>`: excluded outbound destination CIDRs, global and per pod.
    pub const EXCLUDED_CIDRS: &str = "MESH_EXCLUDED_CIDRS";
    /// `HashMap<PodAddr, PodConfig>`: captured pods by address, for `sk_lookup` (which cannot
    /// read its network namespace's cookie).
    pub const POD_ADDRS: &str = "MESH_POD_ADDRS";
    /// `SockHash<ListenerKey>`: the agent's in-pod inbound listeners, for `sk_lookup`.
    pub const LISTENERS: &str = "MESH_LISTENERS";
    /// `PerCpuArray<u64>` indexed by [`crate::Reason`].
    pub const COUNTERS: &str = "MESH_COUNTERS";
    /// All maps, for pinning and inspection.
    pub const ALL: [&str; 8] = [
        SK_ORIG,
        ORIG_DST,
        PODS,
        POD_ADDRS,
        EXCLUDED_PORTS,
        EXCLUDED_CIDRS,
        LISTENERS,
        COUNTERS,
    ];
}

/// Names of the load-time globals (`EbpfLoader::override_global`).
pub mod globals {
    /// `u16`: the outbound listener port (host order).
    pub const OUTBOUND_PORT: &str = "MESH_OUTBOUND_PORT";
}

/// Version of this ABI: the map layouts and meanings above and below, and the pin layout of
/// [`pins`]. Pinned state outlives the agent process, so an agent only adopts pins of its own
/// ABI version; any change to a layout, a map, a reason or the pin layout bumps it (the
/// `abi_fingerprint_is_recorded` test fails until it is bumped).
pub const ABI_VERSION: u32 = 3;

/// How the agent lays out what it pins under its bpffs directory (`bpf_dir`): everything of
/// one ABI version lives in [`pins::ABI_DIR`]; maps and programs by their names directly in it;
/// the links that attach the programs to one pod in [`pins::PODS_DIR`]`/<pod dir>/<program>`.
pub mod pins {
    /// The directory of this ABI version under `bpf_dir` (`v` + [`crate::ABI_VERSION`]).
    pub const ABI_DIR: &str = "v3";
    /// The directory (under [`ABI_DIR`]) with one directory of link pins per captured pod.
    pub const PODS_DIR: &str = "pods";
    /// Separates the fields of a pod directory's name: `<netns cookie>_<namespace>_<name>`
    /// (Kubernetes names cannot contain it, so the name parses back).
    pub const POD_DIR_SEPARATOR: char = '_';
}

/// Map sizes. LRU maps bound kernel memory under connection churn.
pub mod sizes {
    /// Established redirected connections not yet accepted by the agent.
    pub const ORIG_DST: u32 = 65_536;
    /// Captured pods per node.
    pub const PODS: u32 = 4_096;
    /// Excluded port entries (global plus per pod).
    pub const EXCLUDED_PORTS: u32 = 16_384;
    /// Excluded CIDR entries (global plus per pod).
    pub const EXCLUDED_CIDRS: u32 = 16_384;
    /// Captured pod addresses per node.
    pub const POD_ADDRS: u32 = 8_192;
    /// Listener sockets (pod addresses times kinds).
    pub const LISTENERS: u32 = 8_192;
}

/// Address family of an [`OrigDst`] or a [`ConnKey`].
pub mod family {
    /// IPv4 (`AF_INET`).
    pub const INET: u16 = 2;
    /// IPv6 (`AF_INET6`).
    pub const INET6: u16 = 10;
}

/// Direction of an excluded port in [`PortKey`].
pub mod direction {
    /// Connections the pod opens.
    pub const OUTBOUND: u8 = 0;
    /// Connections to the pod.
    pub const INBOUND: u8 = 1;
}

/// The scope id of global exclusions; pods get scope ids from 1.
pub const GLOBAL_SCOPE: u32 = 0;

/// The destination a captured connection was heading to before the redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv6 address, or the v4-mapped form of an IPv4 address; network byte order words.
    pub ip: [u32; 4],
    /// Destination port, host byte order.
    pub port: u16,
    /// [`family::INET`] or [`family::INET6`]: the family the application connected with.
    pub family: u16,
}

/// Key of [`maps::ORIG_DST`]: the client side of a redirected connection, as the agent sees it
/// as the peer address of the accepted socket, inside one pod's network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// Client address, v4-mapped for IPv4; network byte order words.
    pub ip: [u32; 4],
    /// Client port, host byte order.
    pub port: u16,
    /// [`family::INET`] or [`family::INET6`] of the client socket.
    pub family: u16,
    /// Zero.
    pub _pad: u32,
}

/// Value of [`maps::PODS`]: one captured pod, keyed by its network namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    /// Scope id of the pod's own exclusions in [`PortKey`] and [`CidrKey`] (never 0).
    pub scope: u32,
    /// Reserved flags, zero.
    pub flags: u32,
}

/// Key of [`maps::EXCLUDED_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// [`GLOBAL_SCOPE`] or a pod's [`PodConfig::scope`].
    pub scope: u32,
    /// Port, host byte order.
    pub port: u16,
    /// [`direction::OUTBOUND`] or [`direction::INBOUND`].
    pub direction: u8,
    /// Zero.
    pub _pad: u8,
}

/// Data of an LPM trie key of [`maps::EXCLUDED_CIDRS`] (the trie adds the prefix length in
/// front). The prefix length counts the 32 bits of `scope` followed by the address bits, so one
/// trie holds every scope; IPv4 CIDRs are stored v4-mapped (prefix 32 + 96 + len).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrKey {
    /// [`GLOBAL_SCOPE`] or a pod's scope id, big-endian so that it forms the prefix.
    pub scope_be: u32,
    /// Address words, network byte order, v4-mapped for IPv4.
    pub ip: [u32; 4],
}

/// Key of [`maps::POD_ADDRS`]: one address of a captured pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodAddr {
    /// Address words, network byte order, v4-mapped for IPv4.
    pub ip: [u32; 4],
}

/// Key of [`maps::LISTENERS`]: the inbound listener that serves one pod address. Pod addresses
/// are unique on a node, so the address identifies the pod (and its network namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// Pod address words, network byte order, v4-mapped for IPv4.
    pub ip: [u32; 4],
    /// Listener kind: [`listener::INBOUND_PLAINTEXT`] or [`listener::HBONE`].
    pub kind: u32,
}

/// Kinds of in-pod listeners in [`ListenerKey`].
pub mod listener {
    /// The plaintext inbound listener (port 15006): every pod port that is not reserved or
    /// excluded.
    pub const INBOUND_PLAINTEXT: u32 = 0;
    /// The HBONE listener (port 15008): connections to the pod's port 15008.
    pub const HBONE: u32 = 1;
}

/// Reasons counted in [`maps::COUNTERS`]; the index is the discriminant.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// connect: redirected to the outbound listener.
    ConnectRedirected = 0,
    /// connect: not TCP.
    ConnectSkipNotTcp = 1,
    /// connect: loopback destination.
    ConnectSkipLoopback = 2,
    /// connect: the network namespace is not a captured pod.
    ConnectSkipNotCaptured = 3,
    /// connect: excluded destination port.
    ConnectSkipExcludedPort = 4,
    /// connect: excluded destination CIDR.
    ConnectSkipExcludedCidr = 5,
    /// connect: the kernel could not allocate the socket's storage for its original
    /// destination: the connect fails with EPERM (fail closed: a captured connection never
    /// goes direct).
    ConnectErrStorage = 6,
    /// sock_ops: original destination recorded for the agent.
    SockOpsRecorded = 7,
    /// sock_ops: an established connection that was not redirected by us.
    SockOpsNotRedirected = 8,
    /// sock_ops: the original destination map refused the entry (the agent resets the
    /// connection: it cannot tell where it was going).
    SockOpsErrOrigDstFull = 9,
    /// sk_lookup: steered to the pod's inbound listener (plaintext or HBONE).
    LookupSteered = 10,
    /// sk_lookup: loopback or pod-local source (includes the agent's own delivery).
    LookupSkipLocal = 11,
    /// sk_lookup: destination port excluded from capture (global or the pod's exclusions).
    LookupSkipExcludedPort = 12,
    /// sk_lookup: a local address of a captured pod that the state does not list (a
    /// secondary or IPv6 link-local address): dropped, never passed around the agent (the
    /// program is attached only to captured pods' network namespaces).
    LookupDropUnlistedAddress = 13,
    /// sk_lookup: the pod is captured but no agent listener serves it (no agent runs, or
    /// it has not opened the pod's listeners yet): refused (fail closed).
    LookupErrNoListener = 14,
    /// sk_lookup: `bpf_sk_assign` failed: refused (fail closed).
    LookupErrAssign = 15,
    /// sk_lookup: not TCP.
    LookupSkipNotTcp = 16,
    /// sk_lookup: one of the agent's ports other than HBONE (15000, 15001, 15006, 15020,
    /// 15021) on the pod's address: dropped, never passed to whatever listens there.
    LookupDropReservedPort = 17,
}

impl Reason {
    /// Number of reasons; the size of [`maps::COUNTERS`].
    pub const COUNT: u32 = 18;

    /// Every reason, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::ConnectRedirected,
        Reason::ConnectSkipNotTcp,
        Reason::ConnectSkipLoopback,
        Reason::ConnectSkipNotCaptured,
        Reason::ConnectSkipExcludedPort,
        Reason::ConnectSkipExcludedCidr,
        Reason::ConnectErrStorage,
        Reason::SockOpsRecorded,
        Reason::SockOpsNotRedirected,
        Reason::SockOpsErrOrigDstFull,
        Reason::LookupSteered,
        Reason::LookupSkipLocal,
        Reason::LookupSkipExcludedPort,
        Reason::LookupDropUnlistedAddress,
        Reason::LookupErrNoListener,
        Reason::LookupErrAssign,
        Reason::LookupSkipNotTcp,
        Reason::LookupDropReservedPort,
    ];

    /// `(program, reason)` labels for the agent's metric.
    pub const fn labels(self) -> (&'static str, &'static str) {
        match self {
            Reason::ConnectRedirected => ("connect", "redirected"),
            Reason::ConnectSkipNotTcp => ("connect", "skip_not_tcp"),
            Reason::ConnectSkipLoopback => ("connect", "skip_loopback"),
            Reason::ConnectSkipNotCaptured => ("connect", "skip_not_captured"),
            Reason::ConnectSkipExcludedPort => ("connect", "skip_excluded_port"),
            Reason::ConnectSkipExcludedCidr => ("connect", "skip_excluded_cidr"),
            Reason::ConnectErrStorage => ("connect", "error_socket_storage"),
            Reason::SockOpsRecorded => ("sock_ops", "recorded"),
            Reason::SockOpsNotRedirected => ("sock_ops", "skip_not_redirected"),
            Reason::SockOpsErrOrigDstFull => ("sock_ops", "error_orig_dst_map_full"),
            Reason::LookupSteered => ("sk_lookup", "steered"),
            Reason::LookupSkipLocal => ("sk_lookup", "skip_local_source"),
            Reason::LookupSkipExcludedPort => ("sk_lookup", "skip_excluded_port"),
            Reason::LookupDropUnlistedAddress => ("sk_lookup", "drop_unlisted_address"),
            Reason::LookupErrNoListener => ("sk_lookup", "error_no_listener"),
            Reason::LookupErrAssign => ("sk_lookup", "error_assign"),
            Reason::LookupSkipNotTcp => ("sk_lookup", "skip_not_tcp"),
            Reason::LookupDropReservedPort => ("sk_lookup", "drop_reserved_port"),
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): the types are #[repr(C)], Copy, contain only integers and have no
    // implicit padding, so every bit pattern is valid and they can be copied to and from maps.
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::PodAddr {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<OrigDst>(), 16 + 2 + 2);
        assert_eq!(size_of::<ConnKey>(), 8 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<PodConfig>(), 8);
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(size_of::<CidrKey>(), 20);
        assert_eq!(size_of::<ListenerKey>(), 20);
        assert_eq!(size_of::<PodAddr>(), 16);
    }

    /// FNV-1a over everything [`ABI_VERSION`] covers.
    fn abi_fingerprint() -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes.iter().chain(&[0xff]) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for size in [
            size_of::<OrigDst>(),
            size_of::<ConnKey>(),
            size_of::<PodConfig>(),
            size_of::<PortKey>(),
            size_of::<CidrKey>(),
            size_of::<ListenerKey>(),
            size_of::<PodAddr>(),
        ] {
            eat(&size.to_le_bytes());
        }
        for n in [
            sizes::ORIG_DST,
            sizes::PODS,
            sizes::EXCLUDED_PORTS,
            sizes::EXCLUDED_CIDRS,
            sizes::POD_ADDRS,
            sizes::LISTENERS,
            listener::INBOUND_PLAINTEXT,
            listener::HBONE,
            GLOBAL_SCOPE,
        ] {
            eat(&n.to_le_bytes());
        }
        for name in maps::ALL.iter().chain(&programs::ALL) {
            eat(name.as_bytes());
        }
        eat(globals::OUTBOUND_PORT.as_bytes());
        eat(pins::ABI_DIR.as_bytes());
        eat(pins::PODS_DIR.as_bytes());
        for r in Reason::ALL {
            let (program, reason) = r.labels();
            eat(program.as_bytes());
            eat(reason.as_bytes());
        }
        h
    }

    #[test]
    fn abi_fingerprint_is_recorded() {
        // Changing a layout, a name, a size or a reason changes what pinned state means: bump
        // ABI_VERSION (and pins::ABI_DIR), then record the new fingerprint here.
        const RECORDED: (u32, u64) = (3, 5_468_834_615_120_971_992);
        assert_eq!(
            (ABI_VERSION, abi_fingerprint()),
            RECORDED,
            "the eBPF ABI changed: bump ABI_VERSION and pins::ABI_DIR, then record the new \
             (version, fingerprint)"
        );
    }

    #[test]
    fn abi_dir_names_the_version() {
        let mut buf = [0u8; 12];
        let digits = {
            let mut n = ABI_VERSION;
            let mut i = buf.len();
            loop {
                i -= 1;
                buf[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            &buf[i..]
        };
        assert_eq!(pins::ABI_DIR.as_bytes()[0], b'v');
        assert_eq!(&pins::ABI_DIR.as_bytes()[1..], digits);
    }

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
