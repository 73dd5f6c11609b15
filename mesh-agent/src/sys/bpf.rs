//! bpf(2) commands aya does not wrap: reading and removing one map entry in one call (on a map
//! whose key and value sizes were checked), opening
//! a pinned object, and inspecting and updating links (which pin the programs to a pod).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use super::socklen;

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `bpf_link_type` values the agent creates.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_NETNS: u32 = 5;

/// Issues one bpf(2) command with an attribute struct laid out as the kernel's `bpf_attr`
/// member for that command.
///
/// # Safety
/// `attr` must be the kernel's layout for `cmd`, and every pointer in it must refer to live
/// memory of the size the command expects (for the duration of the call).
unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<libc::c_long> {
    // SAFETY: guaranteed by the caller; the kernel reads at most `size_of::<A>()` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const A, socklen::<A>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A map whose key and value sizes were checked against `K` and `V` when it was opened, so that
/// reading entries into a `V` never lets the kernel write past it.
#[derive(Debug)]
pub struct TakeMap<K, V> {
    fd: OwnedFd,
    types: std::marker::PhantomData<fn(&K) -> V>,
}

impl<K: aya::Pod, V: aya::Pod + Default> TakeMap<K, V> {
    /// Checks the map's key and value sizes (`BPF_OBJ_GET_INFO_BY_FD`) and keeps a descriptor.
    pub fn new(map: BorrowedFd<'_>) -> io::Result<Self> {
        let (key_size, value_size) = map_sizes(map)?;
        let (k, v) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
        if key_size as usize != k || value_size as usize != v {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "map has {key_size}-byte keys and {value_size}-byte values, not {k} and {v}"
                ),
            ));
        }
        Ok(Self {
            fd: map.try_clone_to_owned()?,
            types: std::marker::PhantomData,
        })
    }

    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on a hash map (Linux 5.14): reads and removes an entry
    /// in one syscall, so the per-connection cost of recovering an original destination is one
    /// call. Returns `Ok(None)` when the key is absent.
    pub fn take(&self, key: &K) -> io::Result<Option<V>> {
        #[repr(C)]
        struct Attr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut value = V::default();
        let attr = Attr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: (key as *const K) as u64,
            value: (&raw mut value) as u64,
            flags: 0,
        };
        // SAFETY: `attr` is bpf_attr's map element layout; the key and value pointers refer to
        // live values whose sizes `new` checked against the map's, and `V: Pod` takes any bytes.
        match unsafe { bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr) } {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A map's key and value sizes (`struct bpf_map_info`: type, id, key_size, value_size, ...).
fn map_sizes(map: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let info = info_words(map)?;
    Ok((info[2], info[3]))
}

/// `BPF_OBJ_GET`: opens a pinned object (map, program or link) by its bpffs path.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: bpf_attr's object layout; the path is a live NUL-terminated string.
    let fd = unsafe { bpf(BPF_OBJ_GET, &attr) }?;
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("bad descriptor"))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What a link is attached to, from `BPF_OBJ_GET_INFO_BY_FD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup link: the cgroup's id (the inode number of its cgroup v2 directory); `None`
    /// once the cgroup is gone (the kernel detached the link).
    Cgroup(Option<u64>),
    /// A network namespace link: the namespace's inode number; `None` once it is gone.
    Netns(Option<u32>),
    /// Another kind of link (not one the agent makes).
    Other(u32),
}

/// A link's id, program id and target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    pub target: LinkTarget,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-byte aligned union at
    // offset 16 (word 4) whose cgroup member is { u64 cgroup_id; u32 attach_type } and whose
    // netns member is { u32 netns_ino; u32 attach_type }.
    let w = info_words(link)?;
    let target = match w[0] {
        BPF_LINK_TYPE_CGROUP => {
            // The u64 as the kernel wrote it, in the host's byte order.
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&w[4].to_ne_bytes());
            bytes[4..].copy_from_slice(&w[5].to_ne_bytes());
            let cgroup_id = u64::from_ne_bytes(bytes);
            LinkTarget::Cgroup(Some(cgroup_id).filter(|id| *id != 0))
        }
        BPF_LINK_TYPE_NETNS => LinkTarget::Netns(Some(w[4]).filter(|ino| *ino != 0)),
        other => LinkTarget::Other(other),
    };
    Ok(LinkInfo {
        id: w[1],
        prog_id: w[2],
        target,
    })
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a program: its id (`struct bpf_prog_info`: type, id, ...).
pub fn prog_id(program: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(info_words(program)?[1])
}

/// What the kernel says of a map (`struct bpf_map_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    /// `bpf_map_type`.
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub max_entries: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a map.
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let w = info_words(map)?;
    Ok(MapInfo {
        map_type: w[0],
        id: w[1],
        key_size: w[2],
        max_entries: w[4],
    })
}

/// The first words of an object's info (`struct bpf_prog_info`, `bpf_map_info` or
/// `bpf_link_info`; the kernel copies what fits).
fn info_words(fd: BorrowedFd<'_>) -> io::Result<[u32; 24]> {
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u32; 24];
    let attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: socklen::<[u32; 24]>(),
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: bpf_attr's info layout; `info` is live, zeroed and as long as info_len says.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) }?;
    Ok(info)
}

/// Counts a map's entries by walking its keys (`BPF_MAP_GET_NEXT_KEY`), stopping at `limit`
/// steps (a hash map whose entries change during the walk may restart it). Not for arrays
/// (always full) or maps without keys to walk (socket storage).
pub fn count_entries(map: BorrowedFd<'_>, key_size: u32, limit: usize) -> io::Result<usize> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let size = key_size as usize;
    if size == 0 || size > 512 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unexpected key size {key_size}"),
        ));
    }
    let (mut key, mut next) = (vec![0u8; size], vec![0u8; size]);
    let mut count = 0;
    let mut first = true;
    while count < limit {
        let attr = Attr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: bpf_attr's map element layout; `key` and `next` are live buffers of the
        // map's key size (a null key asks for the first one).
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &attr) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(count)
}

/// `BPF_LINK_UPDATE`: atomically replaces the program of a link (cgroup links since Linux 5.7,
/// network namespace links since 5.8): the hook never runs without a program in between.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf_attr's link_update layout; no pointers.
    unsafe { bpf(BPF_LINK_UPDATE, &attr) }.map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    /// A new hash map with `key`- and `value`-byte entries (needs CAP_BPF), or `None`.
    fn hash_map(key: u32, value: u32) -> Option<OwnedFd> {
        #[repr(C)]
        struct Attr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
        }
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_HASH: u32 = 1;
        let attr = Attr {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: key,
            value_size: value,
            max_entries: 4,
        };
        // SAFETY: bpf_attr's map-create layout (the kernel zero-extends what follows).
        let fd = unsafe { bpf(BPF_MAP_CREATE, &attr) }.ok()?;
        let fd = i32::try_from(fd).ok()?;
        // SAFETY: a new descriptor the call returned, owned by nobody else.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    #[test]
    fn take_maps_check_the_sizes_of_keys_and_values() {
        let Some(map) = hash_map(8, 4) else {
            eprintln!("SKIPPED: cannot create a BPF map (not root)");
            return;
        };
        let e = TakeMap::<u64, u64>::new(map.as_fd()).expect_err("8-byte values on a 4-byte map");
        assert!(e.to_string().contains("4-byte values"), "{e}");
        TakeMap::<u32, u32>::new(map.as_fd()).expect_err("4-byte keys on an 8-byte map");
        let take = TakeMap::<u64, u32>::new(map.as_fd()).expect("matching sizes");
        assert_eq!(take.take(&7).expect("lookup"), None);
    }
}
