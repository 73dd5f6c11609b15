//! The byte copier between two TCP sockets (plaintext outbound and inbound): both directions at
//! once, half-close preserved (EOF on one side becomes a write shutdown of the other).
//!
//! Bytes move with `splice(2)` through a pipe: the kernel hands socket pages to the pipe and on
//! to the other socket, so they never enter user space. A connection holds no pipe while it is
//! idle: a transfer takes one from a small shared pool when the socket turns readable and
//! gives it back once the pipe is drained, so ten thousand idle connections hold two
//! descriptors each, not six. A pipe starts at the kernel's 64 KiB; a splice that fills it marks
//! a bulk transfer, and the pipe grows to [`PIPE_MAX`] so that each wake-up moves more (it keeps
//! that size in the pool). docs/performance.md has the measurements behind these choices.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, BorrowedFd},
    sync::Mutex,
};

use tokio::{io::Interest, net::TcpStream};

use crate::sys::{self, Pipe};

/// Capacity a pipe grows to once a transfer fills it (the kernel's default `pipe-max-size`).
pub const PIPE_MAX: usize = 1 << 20;
/// Capacity of a new pipe (the kernel's default).
const PIPE_START: usize = 64 << 10;
/// Empty pipes kept for the next transfers; more are closed.
const POOL_MAX: usize = 64;

/// Empty pipes and their capacities, shared by all connections.
static POOL: Mutex<Vec<(Pipe, usize)>> = Mutex::new(Vec::new());

/// An empty pipe from the pool, or a new one.
fn take_pipe() -> io::Result<(Pipe, usize)> {
    let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
    match pooled {
        Some(p) => Ok(p),
        None => Ok((Pipe::new()?, PIPE_START)),
    }
}

/// Returns an empty pipe to the pool (or closes it when the pool is full).
fn give_back(pipe: (Pipe, usize)) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOL_MAX {
        pool.push(pipe);
    }
}

/// Copies until both directions have ended. `pod_side` is the pod's own connection; returns
/// (bytes from the pod's side, bytes toward it), which `from_pod` and `to_pod` are also told
/// as they move.
/// An abnormal end on either side (a reset, an error) resets both: the application must never
/// see a clean end (FIN) where its peer's bytes were cut off.
pub async fn bidirectional(
    pod_side: TcpStream,
    peer_side: TcpStream,
    from_pod: impl Fn(u64),
    to_pod: impl Fn(u64),
) -> io::Result<(u64, u64)> {
    let up = one_way(&pod_side, &peer_side, from_pod);
    let down = one_way(&peer_side, &pod_side, to_pod);
    let result = tokio::try_join!(up, down);
    if result.is_err() {
        reset(&pod_side);
        reset(&peer_side);
    }
    result
}

/// Makes the socket's close a reset (`SO_LINGER` 0); it closes when dropped.
pub fn reset(s: &TcpStream) {
    // Nothing better to do if even this fails: the close is then an ordinary one.
    let _ = sys::set_linger_zero(s.as_fd());
}

/// One direction: splices everything `src` receives into `dst`, then shuts `dst`'s write half.
/// `moved` is told each chunk once it is written.
async fn one_way(src: &TcpStream, dst: &TcpStream, moved: impl Fn(u64)) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let (pipe, mut capacity) = take_pipe()?;
        // The pipe is empty here (every chunk is drained below), so EAGAIN can only mean the
        // socket has nothing after all.
        let n = match src.try_io(Interest::READABLE, || {
            sys::splice(src.as_fd(), pipe.write.as_fd(), capacity)
        }) {
            Ok(0) => {
                give_back((pipe, capacity));
                sys_shutdown_write(dst)?;
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_back((pipe, capacity));
                continue;
            }
            // A pipe with bytes of unknown count in it is not reusable: it is closed here.
            Err(e) => return Err(e),
        };
        // On error the pipe (maybe not empty) is dropped, never pooled.
        drain(pipe.read.as_fd(), dst, n).await?;
        total += n as u64;
        moved(n as u64);
        if n >= capacity && capacity < PIPE_MAX {
            // A full pipe: a bulk transfer. Keep the old capacity if the kernel refuses.
            capacity = pipe.grow(PIPE_MAX).unwrap_or(capacity);
        }
        give_back((pipe, capacity));
    }
}

/// Moves `n` bytes from the pipe into `dst`, waiting for `dst` to take them.
async fn drain(pipe: BorrowedFd<'_>, dst: &TcpStream, mut n: usize) -> io::Result<()> {
    while n > 0 {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || sys::splice(pipe, dst.as_fd(), n)) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the socket accepted no bytes from the pipe",
                ))
            }
            Ok(m) => n -= m.min(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn sys_shutdown_write(s: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(s).shutdown(Shutdown::Write) {
        // The peer already closed both ways: nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        // client <-> (pod_side | copier | peer_side) <-> server
        let (mut client, pod_side) = pair().await;
        let (peer_side, mut server) = pair().await;
        let copier = tokio::spawn(bidirectional(pod_side, peer_side, |_| {}, |_| {}));
        // 3 MiB one way: fills and grows the pipe; the other way stays open meanwhile.
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("half-close");
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read to EOF");
        assert!(got == data, "bytes arrive intact and in order");
        let mut client = writer.await.expect("writer");
        // The other direction still works after the half-close, then closes too.
        server.write_all(b"reply").await.expect("reply");
        server.shutdown().await.expect("server half-close");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.expect("reply to EOF");
        assert_eq!(reply, b"reply");
        let (up, down) = copier.await.expect("join").expect("copy");
        assert_eq!((up, down), (3 << 20, 5));
    }

    #[tokio::test]
    async fn a_reset_ends_the_copy_with_an_error_and_resets_the_other_side() {
        let (mut client, pod_side) = pair().await;
        let (peer_side, server) = pair().await;
        let copier = tokio::spawn(bidirectional(pod_side, peer_side, |_| {}, |_| {}));
        let std = server.into_std().expect("std");
        sys::set_linger_zero(std.as_fd()).expect("linger");
        drop(std);
        let result = copier.await.expect("join");
        assert!(result.is_err(), "a reset is an error: {result:?}");
        // The client sees the reset too, not an end of stream it could take for complete.
        let mut buf = [0u8; 16];
        let read = client.read(&mut buf).await;
        assert_eq!(
            read.as_ref().map_err(io::Error::kind).err(),
            Some(io::ErrorKind::ConnectionReset),
            "{read:?}"
        );
    }
}
