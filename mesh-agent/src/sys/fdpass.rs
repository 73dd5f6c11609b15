//! Passing descriptors between two agents on one node (the upgrade handover): messages on a
//! Unix `SOCK_SEQPACKET` socket, each carrying at most [`MAX_FDS`] descriptors as
//! `SCM_RIGHTS`, and the peer's credentials (`SO_PEERCRED`), checked before anything is sent.
//! Also the last act of an agent that must end its connections abnormally: every TCP socket
//! of the process set to reset on close.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use super::socklen;

/// Descriptors one message may carry (an agent hands over at most six listeners per pod).
pub const MAX_FDS: usize = 8;

/// Space for one `SCM_RIGHTS` header with [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// Sends one message with `fds` attached (duplicated into the receiver).
pub fn send(socket: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = Control([0; 64]);
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = u32::try_from(fds.len() * std::mem::size_of::<RawFd>())
            .map_err(|_| io::Error::other("descriptor list too long"))?;
        // SAFETY: CMSG_SPACE and CMSG_LEN are pure computations.
        let (space, len) = unsafe { (libc::CMSG_SPACE(bytes), libc::CMSG_LEN(bytes)) };
        if space as usize > control.0.len() {
            return Err(io::Error::other("control buffer too small"));
        }
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space as usize;
        // SAFETY: msg_control points at a live, aligned buffer of msg_controllen bytes, large
        // enough for one header with `fds.len()` descriptors (checked above); CMSG_FIRSTHDR
        // and CMSG_DATA stay inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: every pointer in `msg` refers to live memory described by its length.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    match usize::try_from(n) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(_) => Err(io::Error::other("message sent in part")),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

/// Receives one message into `buf`; returns its length and the descriptors it carried (owned,
/// close-on-exec). A message or descriptor list that did not fit is an error, never silently
/// cut.
pub fn recv(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = Control([0; 64]);
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    // SAFETY: every pointer in `msg` refers to live, writable memory described by its length.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed headers;
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk them and stay inside; each SCM_RIGHTS descriptor is new
    // in this process and owned by nobody else, so wrapping it in OwnedFd is sound.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len - header) / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "descriptors were cut off (more than one message holds)",
        ));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other(format!(
            "message longer than {} bytes",
            buf.len()
        )));
    }
    Ok((n, fds))
}

/// The credentials of a Unix socket's peer (`SO_PEERCRED`): pid and user id.
pub fn peer_cred(socket: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = socklen::<libc::ucred>();
    // SAFETY: the buffer is a live ucred and `len` holds its exact size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((u32::try_from(cred.pid).unwrap_or(0), cred.uid))
}

/// Sets every TCP socket of this process to reset when closed (`SO_LINGER` 0), so that an
/// agent ending with connections still open ends them as an error the applications see (a
/// reset), never as a clean end of stream. Returns how many sockets it changed. Meant for the
/// moment before the process exits: a descriptor closed and reused meanwhile by another thread
/// only gets the same harmless option.
pub fn reset_all_tcp_sockets() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut changed = 0;
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor was open when listed; it is only borrowed for two socket
        // options, which fail harmlessly (ENOTSOCK, EBADF) on anything else.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let tcp = int_option(borrowed, libc::SOL_SOCKET, libc::SO_PROTOCOL)
            .is_ok_and(|p| p == libc::IPPROTO_TCP);
        if tcp && super::set_linger_zero(borrowed).is_ok() {
            changed += 1;
        }
    }
    changed
}

fn int_option(socket: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = socklen::<libc::c_int>();
    // SAFETY: the buffer is a live c_int and `len` holds its exact size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use socket2::{Domain, Socket, Type};

    use super::*;

    fn pair() -> (Socket, Socket) {
        Socket::pair(Domain::UNIX, Type::SEQPACKET, None).expect("socketpair")
    }

    #[test]
    fn descriptors_cross_with_their_message() {
        let (a, b) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        send(a.as_fd(), b"first", &[listener.as_fd()]).expect("send");
        send(a.as_fd(), b"second", &[]).expect("send");
        let mut buf = [0u8; 64];
        let (n, fds) = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..n], b"first");
        assert_eq!(fds.len(), 1);
        let got = std::net::TcpListener::from(fds.into_iter().next().expect("one fd"));
        assert_eq!(got.local_addr().expect("addr"), addr, "the same socket");
        let (n, fds) = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!((&buf[..n], fds.len()), (&b"second"[..], 0));
        let (pid, uid) = peer_cred(b.as_fd()).expect("peer cred");
        assert_eq!((pid, uid), (std::process::id(), crate::sys::euid()));
    }

    #[test]
    fn a_message_too_long_for_the_buffer_is_an_error() {
        let (a, b) = pair();
        send(a.as_fd(), &[7u8; 100], &[]).expect("send");
        let mut buf = [0u8; 10];
        let e = recv(b.as_fd(), &mut buf).expect_err("truncated");
        assert!(e.to_string().contains("longer than 10 bytes"), "{e}");
    }

    #[test]
    fn too_many_descriptors_are_refused_before_sending() {
        let (a, _b) = pair();
        let fds: Vec<_> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        assert!(send(a.as_fd(), b"x", &fds).is_err());
    }
}
