//! What a pod can leave in the agent's eBPF maps. `mesh-labtool collide` makes connects that
//! fail after `connect4` redirected them (each one's 4-tuple is already taken: EADDRNOTAVAIL),
//! which never reach `sock_ops`; `mesh-labtool map-count` counts the entries of a pinned map.

use std::{
    io,
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

/// Arguments of `mesh-labtool collide`.
#[derive(clap::Args, Debug)]
pub struct CollideArgs {
    /// Where to connect (a destination the pod's connects are redirected for).
    #[arg(long)]
    to: SocketAddr,
    /// Local port every socket binds (on 127.0.0.1, the redirect's source).
    #[arg(long, default_value_t = 47_000)]
    port: u16,
    /// How many colliding connects after the first (established) one.
    #[arg(long)]
    count: usize,
}

fn bound_socket(port: u16) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    Ok(socket)
}

/// Connects once from 127.0.0.1:`port` and keeps that connection; then `count` more sockets
/// bound to the same port connect to the same destination, which the redirect turns into the
/// same 4-tuple: each fails with EADDRNOTAVAIL after `connect4` ran. Prints
/// `collided N other M` (M: any other outcome).
pub fn collide(args: CollideArgs) -> Result<()> {
    let first = bound_socket(args.port).context("binding the first socket")?;
    first
        .connect(&args.to.into())
        .with_context(|| format!("the first connect to {}", args.to))?;
    let first: TcpStream = first.into();
    let (mut collided, mut other) = (0usize, 0usize);
    for _ in 0..args.count {
        let socket = bound_socket(args.port).context("binding a colliding socket")?;
        match socket.connect(&args.to.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => collided += 1,
            _ => other += 1,
        }
    }
    crate::say(&format!("collided {collided} other {other}"));
    drop(first);
    Ok(())
}

/// Arguments of `mesh-labtool map-count`.
#[derive(clap::Args, Debug)]
pub struct MapCountArgs {
    /// The pinned map.
    #[arg(long)]
    pin: PathBuf,
    /// Its key size in bytes.
    #[arg(long)]
    key_size: usize,
}

/// Prints `entries N` for a pinned hash map (walks its keys with BPF_MAP_GET_NEXT_KEY).
pub fn map_count(args: MapCountArgs) -> Result<()> {
    let map = obj_get(&args.pin).with_context(|| format!("opening {}", args.pin.display()))?;
    let mut key = vec![0u8; args.key_size];
    let mut next = vec![0u8; args.key_size];
    let mut first = true;
    let mut n = 0u64;
    loop {
        let mut attr = [0u64; 4];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = if first { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        // SAFETY: BPF_MAP_GET_NEXT_KEY with a valid attr (map fd, key or null, next key
        // buffer of the map's key size).
        let r = unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            bail!("walking {}: {e}", args.pin.display());
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    crate::say(&format!("entries {n}"));
    Ok(())
}

/// Arguments of `mesh-labtool link-detach`.
#[derive(clap::Args, Debug)]
pub struct LinkDetachArgs {
    /// The pinned link.
    #[arg(long)]
    pin: PathBuf,
}

/// Detaches a pinned link from its hook as `bpftool link detach` does (BPF_LINK_DETACH): the
/// link and its pin stay, attached to nothing. Prints `detached`.
pub fn link_detach(args: LinkDetachArgs) -> Result<()> {
    let link = obj_get(&args.pin).with_context(|| format!("opening {}", args.pin.display()))?;
    let mut attr = [0u64; 4];
    attr[0] = link.as_raw_fd() as u64;
    // SAFETY: BPF_LINK_DETACH with a valid attr (the link's descriptor).
    if unsafe { bpf(BPF_LINK_DETACH, &mut attr) } < 0 {
        bail!(
            "detaching {}: {}",
            args.pin.display(),
            io::Error::last_os_error()
        );
    }
    crate::say("detached");
    Ok(())
}

fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 4];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET with a valid NUL-terminated path.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned no descriptor"))?;
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// bpf(2) commands (linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_LINK_DETACH: libc::c_int = 34;

/// bpf(2) with a zero-padded attr.
///
/// # Safety
/// `attr` must be valid for `cmd`.
unsafe fn bpf(cmd: libc::c_int, attr: &mut [u64; 4]) -> libc::c_long {
    // SAFETY: the caller's contract.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}
