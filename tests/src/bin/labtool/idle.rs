//! Many idle connections, for the memory figures of the benchmark: `mesh-labtool hold` opens
//! connections and keeps them open, `mesh-labtool serve --many` echoes on any number of them
//! from one thread.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// How long each connection may take to open and answer its probe byte.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `mesh-labtool hold`.
#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// The echo server, `IP:PORT`.
    #[arg(long)]
    to: SocketAddr,
    /// How many connections to open and hold.
    #[arg(long)]
    conns: usize,
}

/// Opens `conns` connections one after another, each proven end to end by one echoed byte,
/// prints `held N`, and keeps them open (idle) until stdin closes; then closes them and prints
/// `released N`.
pub fn hold(args: HoldArgs) -> Result<()> {
    room_for(args.conns)?;
    let mut held = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        held.push(probe(args.to).with_context(|| format!("connection {i} to {}", args.to))?);
    }
    crate::say(&format!("held {}", held.len()));
    // EOF or an error on stdin both mean: release.
    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
    let n = held.len();
    drop(held);
    crate::say(&format!("released {n}"));
    Ok(())
}

/// One connection with one byte echoed through it.
fn probe(to: SocketAddr) -> io::Result<TcpStream> {
    let mut conn = TcpStream::connect_timeout(&to, PROBE_TIMEOUT)?;
    conn.set_read_timeout(Some(PROBE_TIMEOUT))?;
    conn.write_all(b"x")?;
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte)?;
    Ok(conn)
}

/// Echo server on one thread (tokio): a task and a small buffer per connection, no output per
/// connection. For thousands of connections; `serve` (a thread per connection) is the one with
/// the lowest latency.
pub fn serve_many(addr: SocketAddr) -> Result<()> {
    serve_each(addr, |mut conn| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut buf = [0u8; 512];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = conn.shutdown().await;
    })
}

/// Listens on `addr` (one thread, tokio), prints `listening <addr>`, and serves every
/// connection with a task running `serve`.
fn serve_each<F, Fut>(addr: SocketAddr, serve: F) -> Result<()>
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        crate::say(&format!(
            "listening {}",
            listener.local_addr().context("getsockname")?
        ));
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    tokio::task::spawn_local(serve(conn));
                }
                Err(e) => {
                    crate::say(&format!("accept error: {e}"));
                    // Out of descriptors: let some connections close first.
                    tokio::task::yield_now().await;
                }
            }
        }
    })
}

/// Arguments of `mesh-labtool flood`.
#[derive(clap::Args, Debug)]
pub struct FloodArgs {
    /// Port to listen on (all addresses).
    #[arg(long)]
    port: u16,
}

/// Writes without end to every connection once it has sent a byte; prints `flooded bytes=N`
/// when a connection fails (the peer reset it or went away).
pub fn flood(args: FloodArgs) -> Result<()> {
    serve_each(
        SocketAddr::from(([0, 0, 0, 0], args.port)),
        |mut conn| async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut go = [0u8; 1];
            if conn.read(&mut go).await.unwrap_or(0) == 0 {
                return;
            }
            let chunk = vec![0x5a_u8; 64 << 10];
            let mut total = 0u64;
            while let Ok(n) = conn.write(&chunk).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            crate::say(&format!("flooded bytes={total}"));
        },
    )
}

/// Arguments of `mesh-labtool connects`.
#[derive(clap::Args, Debug)]
pub struct ConnectsArgs {
    /// Where to connect, `IP:PORT`.
    #[arg(long)]
    to: SocketAddr,
    /// How many connections.
    #[arg(long)]
    conns: usize,
    /// Send the first bytes of a TLS handshake record (and nothing more) on each.
    #[arg(long)]
    partial: bool,
}

/// Opens `conns` connections that stall: they send nothing, or the start of a TLS record.
/// Prints `opened N`, then `closed N` once the server has closed (or reset) every connection;
/// stdin closing ends it early.
pub fn connects(args: ConnectsArgs) -> Result<()> {
    room_for(args.conns)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut open = Vec::with_capacity(args.conns);
        for i in 0..args.conns {
            let mut conn = match tokio::net::TcpStream::connect(args.to).await {
                Ok(conn) => conn,
                // The server took it and reset it at once (a limit): closed already.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
                Err(e) => return Err(e).with_context(|| format!("connection {i} to {}", args.to)),
            };
            if args.partial {
                // A handshake record header announcing 512 bytes, and the first 3 of them.
                // A reset meanwhile is the server closing it.
                if conn.write_all(&[22, 3, 1, 2, 0, 1, 0, 1]).await.is_err() {
                    continue;
                }
            }
            open.push(conn);
        }
        crate::say(&format!("opened {}", args.conns));
        let waits = open.into_iter().map(|mut conn| async move {
            let mut buf = [0u8; 64];
            // Any answer (EOF, reset, an alert) is the server closing it.
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        let waits: Vec<_> = waits.collect();
        let all = async {
            for w in waits {
                w.await;
            }
        };
        let stdin = async {
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut tokio::io::sink()).await;
        };
        tokio::select! {
            () = all => crate::say(&format!("closed {}", args.conns)),
            () = stdin => {}
        }
        Ok(())
    });
    // The stdin reader is a blocking thread that may never return: do not wait for it.
    rt.shutdown_background();
    result
}

/// Raises the open files limit and checks that `conns` connections fit under it.
fn room_for(conns: usize) -> Result<()> {
    let limit = raise_nofile_limit();
    if conns + 64 > limit {
        bail!("--conns {conns} needs more open files than the limit allows ({limit})");
    }
    Ok(())
}

/// Raises the soft (and, when allowed, the hard) limit on open files; returns the soft limit.
fn raise_nofile_limit() -> usize {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(1 << 20);
    // SAFETY: getrlimit/setrlimit read and write a properly sized, initialised struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let want = nr_open.max(lim.rlim_max);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return usize::try_from(want).unwrap_or(usize::MAX);
        }
        lim.rlim_cur = lim.rlim_max;
        let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    }
}
