//! Maps, load-time globals and small helpers shared by the programs. Layouts and names come
//! from `mesh_common`.

use aya_ebpf::{
    macros::{btf_map, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
    Global,
};
use mesh_common::{
    sizes, CidrKey, ConnKey, ListenerKey, OrigDst, PodAddr, PodConfig, PortKey, Reason,
    GLOBAL_SCOPE,
};

/// The outbound listener port, host byte order.
#[unsafe(no_mangle)]
pub static MESH_OUTBOUND_PORT: Global<u16> = Global::new(mesh_common::ports::OUTBOUND);

/// `MESH_SK_ORIG`: socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`) holding the original
/// destination of a redirected connect on the client socket itself, from connect4/6 until
/// sock_ops sees the connection established. It lives and dies with its socket and is charged
/// to it: a pod's connects that never complete hold nothing in a map other pods share, and
/// nothing can evict another pod's entry. A BTF map (aya-ebpf's `btf_maps::SkStorage` works
/// only in sock_addr programs and cannot be pinned), pinned by name like the others, so that
/// programs of two agents (an upgrade) share it.
#[repr(C)]
pub struct SkOrigMap {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const OrigDst,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    pinning: *const [i32; LIBBPF_PIN_BY_NAME],
}

// SAFETY: the fields are placeholders the loader reads from BTF; nothing dereferences them.
unsafe impl Sync for SkOrigMap {}

const LIBBPF_PIN_BY_NAME: usize = 1;

#[btf_map(name = "MESH_SK_ORIG")]
pub static SK_ORIG: SkOrigMap = SkOrigMap {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
    pinning: core::ptr::null(),
};

impl SkOrigMap {
    /// The map as the helpers take it.
    #[inline(always)]
    pub fn as_ptr(&'static self) -> *mut core::ffi::c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }

    /// The original destination stored on socket `sk`, if any.
    ///
    /// # Safety
    /// `sk` must be a socket pointer the verifier accepts for `bpf_sk_storage_get`.
    #[inline(always)]
    pub unsafe fn get(&'static self, sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<OrigDst> {
        // SAFETY: a valid map and socket; no value to create.
        let ptr = unsafe {
            aya_ebpf::helpers::bpf_sk_storage_get(
                self.as_ptr(),
                sk.cast(),
                core::ptr::null_mut(),
                0,
            )
        }
        .cast::<OrigDst>();
        // SAFETY: a non-null result points at this socket's value.
        (!ptr.is_null()).then(|| unsafe { core::ptr::read_volatile(ptr) })
    }

    /// Stores `orig` on socket `sk` (replacing what a previous connect of it stored); `false`
    /// when the kernel cannot allocate it.
    ///
    /// # Safety
    /// `sk` must be a socket pointer the verifier accepts for `bpf_sk_storage_get`.
    #[inline(always)]
    pub unsafe fn set(&'static self, sk: *mut aya_ebpf::bindings::bpf_sock, orig: OrigDst) -> bool {
        let mut init = orig;
        // SAFETY: a valid map and socket; `init` is copied by the helper when it creates.
        let ptr = unsafe {
            aya_ebpf::helpers::bpf_sk_storage_get(
                self.as_ptr(),
                sk.cast(),
                core::ptr::from_mut(&mut init).cast(),
                u64::from(aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE),
            )
        }
        .cast::<OrigDst>();
        if ptr.is_null() {
            return false;
        }
        // An existing value (the socket connected before) is overwritten; field by field, so
        // that LLVM cannot merge the stores into wider ones than the value allows.
        // SAFETY: a non-null result points at this socket's value.
        unsafe {
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*ptr).ip), orig.ip);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*ptr).port), orig.port);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*ptr).family), orig.family);
        }
        true
    }

    /// Frees the storage of socket `sk` (its connection is established: the value has moved on).
    ///
    /// # Safety
    /// `sk` must be a socket pointer the verifier accepts for `bpf_sk_storage_delete`.
    #[inline(always)]
    pub unsafe fn delete(&'static self, sk: *mut aya_ebpf::bindings::bpf_sock) {
        // SAFETY: a valid map and socket.
        let _ = unsafe { aya_ebpf::helpers::bpf_sk_storage_delete(self.as_ptr(), sk.cast()) };
    }
}

#[map(name = "MESH_ORIG_DST")]
pub static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(sizes::ORIG_DST, 0);

#[map(name = "MESH_PODS")]
pub static PODS: HashMap<u64, PodConfig> = HashMap::pinned(sizes::PODS, 0);

#[map(name = "MESH_POD_ADDRS")]
pub static POD_ADDRS: HashMap<PodAddr, PodConfig> = HashMap::pinned(sizes::POD_ADDRS, 0);

#[map(name = "MESH_EXCLUDED_PORTS")]
pub static EXCLUDED_PORTS: HashMap<PortKey, u8> = HashMap::pinned(sizes::EXCLUDED_PORTS, 0);

/// `BPF_F_NO_PREALLOC` is mandatory for LPM tries.
#[map(name = "MESH_EXCLUDED_CIDRS")]
pub static EXCLUDED_CIDRS: LpmTrie<CidrKey, u8> =
    LpmTrie::pinned(sizes::EXCLUDED_CIDRS, BPF_F_NO_PREALLOC);

#[map(name = "MESH_LISTENERS")]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(sizes::LISTENERS, 0);

#[map(name = "MESH_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

const BPF_F_NO_PREALLOC: u32 = 1;

/// Reads one context field with its own load. The verifier only accepts context accesses at
/// constant offsets; volatile loads keep LLVM from turning a branch between two fields into a
/// computed offset (or merging loads).
#[macro_export]
macro_rules! ctx_field {
    ($ptr:expr, $($field:tt)+) => {{
        let ptr = $ptr;
        // SAFETY: the context pointer is valid for the whole program run.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ptr).$($field)+)) }
    }};
}

/// Reads a four-word address field of a context, one volatile load per word.
#[macro_export]
macro_rules! ctx_ip6 {
    ($ptr:expr, $field:ident) => {
        [
            $crate::ctx_field!($ptr, $field[0]),
            $crate::ctx_field!($ptr, $field[1]),
            $crate::ctx_field!($ptr, $field[2]),
            $crate::ctx_field!($ptr, $field[3]),
        ]
    };
}

/// Counts one event. Per-CPU, so a plain increment is race-free (no atomics on this target).
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(ptr) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer is this CPU's slot of a live map entry; programs on one CPU do
        // not preempt each other.
        unsafe { *ptr += 1 };
    }
}

/// The v4-mapped IPv6 form (`::ffff:a.b.c.d`) of an IPv4 address in network byte order.
#[inline(always)]
pub fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, 0xffff_u32.to_be(), ip4_be]
}

/// Whether an IPv4 address (network byte order) is in 127.0.0.0/8 or is 0.0.0.0.
#[inline(always)]
pub fn is_loopback4(ip4_be: u32) -> bool {
    // The first octet is the lowest-addressed byte of the network-order word. 0.0.0.0 is the
    // local host too (a connect to it reaches this namespace's own listeners).
    ip4_be.to_ne_bytes()[0] == 127 || ip4_be == 0
}

/// Whether an IPv6 address (network byte order words) is `::1`, `::` or v4-mapped loopback.
#[inline(always)]
pub fn is_loopback6(ip: &[u32; 4]) -> bool {
    // `::1`, or `::` (the local host, as 0.0.0.0).
    let loop6 = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 1u32.to_be() || ip[3] == 0);
    loop6 || (is_v4_mapped(ip) && is_loopback4(ip[3]))
}

/// Whether an IPv6 address is v4-mapped.
#[inline(always)]
pub fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffff_u32.to_be()
}

/// Whether `port` is excluded for `direction`, globally or for the pod's scope.
#[inline(always)]
pub fn port_excluded(scope: u32, port: u16, direction: u8) -> bool {
    let global = PortKey {
        scope: GLOBAL_SCOPE,
        port,
        direction,
        _pad: 0,
    };
    let pod = PortKey {
        scope,
        port,
        direction,
        _pad: 0,
    };
    EXCLUDED_PORTS.get_ptr(global).is_some() || EXCLUDED_PORTS.get_ptr(pod).is_some()
}

/// Whether a destination (v4-mapped or IPv6) is in an excluded CIDR, globally or for the pod.
#[inline(always)]
pub fn cidr_excluded(scope: u32, ip: [u32; 4]) -> bool {
    // Full-length keys: the trie finds the longest stored prefix that covers them.
    let global = Key::new(
        160,
        CidrKey {
            scope_be: GLOBAL_SCOPE.to_be(),
            ip,
        },
    );
    let pod = Key::new(
        160,
        CidrKey {
            scope_be: scope.to_be(),
            ip,
        },
    );
    EXCLUDED_CIDRS.get(&global).is_some() || EXCLUDED_CIDRS.get(&pod).is_some()
}
