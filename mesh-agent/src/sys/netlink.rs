//! A `NETLINK_ROUTE` socket, for the few requests the agent makes (a pod's return path,
//! `capture::return_path`). The messages are built by their callers.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

/// A `NETLINK_ROUTE` socket of the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Netlink(OwnedFd);

impl Netlink {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `body` as a request of type `kind` that creates what it describes, and reads its
    /// acknowledgement; already there (`EEXIST`) counts as done.
    pub fn create(&self, (kind, body): (u16, Vec<u8>)) -> io::Result<()> {
        let msg = message(
            kind,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &body,
        );
        let fd = self.0.as_raw_fd();
        // SAFETY: a valid buffer of the given length.
        let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        // SAFETY: a valid buffer of the given length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        match ack(&buf[..n]) {
            Some(0) => Ok(()),
            Some(errno) if errno == -libc::EEXIST => Ok(()),
            Some(errno) => Err(io::Error::from_raw_os_error(-errno)),
            None => Err(io::Error::other("the kernel sent no acknowledgement")),
        }
    }
}

/// A netlink message: header, then `body`.
fn message(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(16 + body.len()).expect("small message");
    let mut msg = Vec::with_capacity(16 + body.len());
    // struct nlmsghdr: len, type, flags, seq, pid (0: the kernel fills it in).
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    msg
}

/// An attribute with a `u32` payload (struct nlattr: length, type; then the value).
pub fn attr_u32(buf: &mut Vec<u8>, kind: u16, value: u32) {
    buf.extend_from_slice(&8u16.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&value.to_ne_bytes());
}

/// The error code of an `NLMSG_ERROR` answer (0: acknowledged), if `answer` is one.
fn ack(answer: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    Some(i32::from_ne_bytes(answer.get(16..20)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_sized_and_aligned() {
        let mut body = vec![0u8; 12];
        attr_u32(&mut body, 6, 7);
        let msg = message(24, NLM_F_REQUEST, &body);
        let len = u32::from_ne_bytes(msg[0..4].try_into().expect("len")) as usize;
        assert_eq!((len, len % 4), (16 + 12 + 8, 0));
        assert_eq!(len, msg.len());
    }

    #[test]
    fn an_acknowledgement_is_read_and_anything_else_is_not_one() {
        let mut answer = vec![0u8; 36];
        answer[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        answer[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(ack(&answer), Some(-libc::EEXIST));
        answer[4..6].copy_from_slice(&24u16.to_ne_bytes());
        assert_eq!(ack(&answer), None);
        assert_eq!(ack(&answer[..3]), None);
    }
}
