//! The agent's only unsafe code: entering (and, for `mesh-agent check`, creating) network
//! namespaces, socket options the standard library lacks, bpf(2) commands aya does not wrap
//! (`bpf`), and passing descriptors between agents (`fdpass`). Each block says why it is sound.
#![expect(
    unsafe_code,
    reason = "this module is the agent's designated home for unsafe code"
)]

pub mod bpf;
pub mod fdpass;
pub mod netlink;
pub mod unix;

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

/// A network namespace the agent can run code in, held open by file descriptor.
#[derive(Debug)]
pub struct Netns {
    file: File,
}

impl Netns {
    /// Opens a network namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// A new, empty network namespace, held by this descriptor alone: it goes away once the
    /// descriptor and the sockets opened in it are closed. Created by a short-lived thread of
    /// its own (`unshare(CLONE_NEWNET)`), so that no other thread ever runs in it.
    pub fn private() -> io::Result<Self> {
        std::thread::Builder::new()
            .name("netns-new".into())
            .spawn(|| {
                // SAFETY: unshare takes no pointers; it moves only the calling thread (this
                // one, which ends right after opening the namespace) into a new namespace.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Self::current()
            })?
            .join()
            .map_err(|_| io::Error::other("the thread creating a network namespace panicked"))?
    }

    /// The namespace's inode number (what network-namespace BPF links report).
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(self.file.metadata()?.ino())
    }

    /// Runs `f` on the calling thread while it is inside this namespace, then returns the
    /// thread to `home`. Sockets created by `f` belong to this namespace for their whole life.
    /// If the thread cannot return home the process aborts: a worker thread left in a pod's
    /// namespace would silently open later sockets there.
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(self.file.as_fd())?;
        // Back home when `f` returns, and also when it panics: a thread left in a pod's
        // namespace would open the agent's next sockets there.
        let _home = Return(home);
        Ok(f())
    }
}

/// Returns the calling thread to `.0` when dropped; aborts the process if it cannot.
struct Return<'a>(&'a Netns);

impl Drop for Return<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.file.as_fd()) {
            eprintln!("fatal: cannot return a thread to the agent's network namespace: {e}");
            std::process::abort();
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns takes a valid open fd (borrowed for the call) and a namespace type; it only
    // changes the calling thread's namespace.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the cookie of the network namespace a socket belongs to,
/// the same value `bpf_get_netns_cookie()` returns inside the kernel.
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = socklen::<u64>();
    // SAFETY: the buffer is a live u64 and `len` holds its exact size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The cookie of a network namespace: a throwaway socket is created inside it.
pub fn netns_cookie_of(netns: &Netns, home: &Netns) -> io::Result<u64> {
    let socket = netns.run(home, || {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
    })??;
    netns_cookie(socket.as_fd())
}

/// Sets `SO_LINGER` to zero so that dropping the socket sends a reset, which is how a refused
/// or failed proxied connection is reported to the client.
pub fn set_linger_zero(socket: BorrowedFd<'_>) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value is a live `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            socklen::<libc::linger>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: a socket bound to an address without a port gets its port at
/// connect time, chosen for its destination (so one address can hold a port range per
/// destination instead of one for all).
pub fn set_bind_address_no_port(socket: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(socket, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT)
}

/// `IPV6_TRANSPARENT`: an IPv6 socket may bind an address the namespace does not have.
pub fn set_ipv6_transparent(socket: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(socket, libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
}

/// Sets an `int` socket option to 1.
fn set_int_option(socket: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the option value is a live `int` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const one).cast(),
            socklen::<libc::c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The size of a small fixed struct as a socket-option or bpf(2) attribute length.
#[expect(
    clippy::cast_possible_truncation,
    reason = "only used for structs of a few bytes"
)]
pub(crate) const fn socklen<T>() -> libc::socklen_t {
    std::mem::size_of::<T>() as libc::socklen_t
}

/// `statfs(2)` file system magic of a path.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statfs writes into a zeroed, properly sized struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc == 0 {
        Ok(st.f_type)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises the limit on open files: every proxied connection holds two sockets and, while it
/// carries data, two pipes (four descriptors). With the privilege to do so (root, or
/// CAP_SYS_RESOURCE) both limits go to `/proc/sys/fs/nr_open`; otherwise the soft limit goes up
/// to the hard one. Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a properly sized, initialised struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let want = nr_open.max(lim.rlim_max);
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit reads a properly sized, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(want);
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The two ends of a pipe, for moving bytes between sockets with `splice(2)`.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// A non-blocking, close-on-exec pipe (64 KiB of capacity until [`Pipe::grow`]).
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        Ok(unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }

    /// Raises the pipe's capacity (`F_SETPIPE_SZ`); returns the capacity the kernel granted.
    pub fn grow(&self, bytes: usize) -> io::Result<usize> {
        let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        let rc = unsafe { libc::fcntl(self.write.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) };
        usize::try_from(rc).map_err(|_| io::Error::last_os_error())
    }
}

/// `splice(2)` without offsets, non-blocking: moves up to `len` bytes from `from` to `to`, one
/// of which must be a pipe. Returns 0 at end of file of `from`.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed for the call; null offsets are allowed for sockets
    // and pipes.
    let rc = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// Whether a process exists (signal 0).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// `struct sched_attr` (linux/sched/types.h), as far as `sched_setattr(2)` reads it.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks the scheduler for a slice of `ns` nanoseconds for the calling thread, keeping its
/// policy (SCHED_OTHER) and nice value: on Linux 6.12 and later (EEVDF's custom slices) a
/// shorter slice gives the thread an earlier deadline when it wakes, so it preempts a thread
/// that has run longer instead of waiting for it; earlier kernels ignore it. Returns the slice
/// in force afterwards as the kernel reports it (0: the request was ignored).
pub fn set_sched_slice(ns: u64) -> io::Result<u64> {
    let mut attr = SchedAttr {
        size: socklen::<SchedAttr>(),
        runtime: ns,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr reads a live, correctly sized sched_attr; pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    attr = SchedAttr::default();
    // SAFETY: sched_getattr writes at most `size` bytes into the live sched_attr.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &raw mut attr,
            socklen::<SchedAttr>(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr.runtime)
}

/// Moves the calling thread into a mount namespace of its own, a copy of its current one:
/// mounts made from it (or by processes it starts) after `mount --make-rprivate /` are seen
/// nowhere else, and go away with the thread. For tests that need a mount of their own.
#[cfg(all(test, feature = "ebpf"))]
pub(crate) fn unshare_mounts() -> io::Result<()> {
    // SAFETY: unshare takes no pointers; it changes only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_the_thread_home_even_when_its_closure_panics() {
        let Ok(other) = Netns::private() else {
            eprintln!("SKIPPED: cannot create a network namespace (not root)");
            return;
        };
        let home = Netns::current().expect("home");
        let home_ino = home.inode().expect("inode");
        let inside = other.run(&home, || {
            Netns::current().expect("current").inode().expect("ino")
        });
        assert_eq!(inside.ok(), Some(other.inode().expect("inode")));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            other.run(&home, || panic!("in the other namespace"))
        }));
        assert!(panicked.is_err());
        let now = Netns::current().expect("current").inode().expect("inode");
        assert_eq!(now, home_ino, "the thread stayed in the other namespace");
    }
}
