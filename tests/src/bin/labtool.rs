//! `mesh-labtool`: the traffic tool the lab runs inside pods (echo server and checking clients).

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};

#[path = "labtool/grpc.rs"]
mod grpc;
#[path = "labtool/hbone.rs"]
mod hbone;
#[path = "labtool/http.rs"]
mod http;
#[path = "labtool/http_load.rs"]
mod http_load;
#[path = "labtool/idle.rs"]
mod idle;
#[path = "labtool/maps.rs"]
mod maps;
#[path = "labtool/probe.rs"]
mod probe;
#[path = "labtool/rr.rs"]
mod rr;
use clap::{Parser, Subcommand};

/// Size of the blocks the pseudo-random stream is generated in.
const BLOCK: usize = 64 * 1024;
/// Connect timeout of the clients.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "mesh-labtool",
    about = "Echo server and checking clients for the mesh lab"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// TCP echo server; prints `listening <addr>`, then `accepted ...`/`closed ...` per connection.
    Serve {
        /// Port to listen on.
        #[arg(long)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::IpAddr,
        /// Serve thousands of mostly idle connections from one thread (no line per
        /// connection) instead of a thread per connection.
        #[arg(long)]
        many: bool,
    },
    /// Sends N deterministic bytes, half-closes, and checks the echo byte for byte.
    Send {
        /// Server address.
        #[arg(long)]
        to: SocketAddr,
        /// How many bytes to send.
        #[arg(long)]
        bytes: u64,
        /// Seed of the pseudo-random stream.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Send this text repeated instead of pseudo-random bytes.
        #[arg(long)]
        marker: Option<String>,
    },
    /// Long-lived connection: writes a chunk, checks its echo, repeats until stdin closes.
    Stream {
        /// Server address.
        #[arg(long)]
        to: SocketAddr,
        /// Bytes per round trip.
        #[arg(long, default_value_t = 16384)]
        chunk: usize,
        /// Pause between round trips.
        #[arg(long, default_value_t = 5)]
        interval_ms: u64,
        /// Seed of the pseudo-random stream.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// An HBONE client: mTLS with the given certificate, then CONNECT requests on one
    /// connection; prints each response, then echoes data through the accepted streams.
    Hbone(hbone::Args),
    /// Request/response load against `serve`: open loop at a fixed rate (or closed loop), on
    /// persistent connections or a new connection per request; prints one JSON line of latency
    /// percentiles.
    Rr(rr::Args),
    /// Opens N connections (one echoed byte each), prints `held N`, keeps them idle until
    /// stdin closes, then closes them.
    Hold(idle::HoldArgs),
    /// Connects again and again until stdin closes; prints each attempt's outcome and time.
    Probe(probe::Args),
    /// A server that, once a connection sends a byte, writes to it without end; prints
    /// `listening <addr>`, then `flooded bytes=N` as each connection fails.
    Flood(idle::FloodArgs),
    /// Opens N connections that send nothing (or, with `--partial`, the start of a TLS
    /// record), prints `opened N`, then `closed N` once the server has closed every one.
    Connects(idle::ConnectsArgs),
    /// Connects from one bound port, then N more times from the same port to the same
    /// destination (each fails after connect4: the 4-tuple is taken); prints `collided N other M`.
    Collide(maps::CollideArgs),
    /// Counts the entries of a pinned eBPF hash map; prints `entries N`.
    MapCount(maps::MapCountArgs),
    /// Detaches a pinned eBPF link from its hook, as `bpftool link detach` does; prints
    /// `detached`.
    LinkDetach(maps::LinkDetachArgs),
    /// HTTP/1.1 and HTTP/2 server naming itself, reporting what it received (`--fail-every`,
    /// `--delay-ms` to misbehave).
    HttpServe(http::ServeArgs),
    /// Sends N HTTP requests, prints one JSON line tallying the answers.
    HttpGet(http::GetArgs),
    /// HTTP/1.1 load at a fixed rate on keep-alive connections, open loop (latency from each
    /// request's scheduled time); prints one JSON line of percentiles and statuses.
    HttpLoad(http_load::LoadArgs),
    /// gRPC server naming itself: echoes (unary), streams N messages, ends with a non-OK
    /// status when asked to (`fail`).
    GrpcServe(grpc::ServeArgs),
    /// One gRPC call, unary or server-streaming; prints one JSON line with the messages, the
    /// status and where it came from (trailers or headers), and the metadata.
    GrpcCall(grpc::CallArgs),
    /// A server-speaks-first server: a banner line on accept, then echo.
    Banner(http::BannerArgs),
    /// Connects, sends nothing, prints the server's first line.
    ReadBanner(http::ReadBannerArgs),
    /// Connects and exits 0, or prints the error and exits 1.
    Connect {
        /// Server address.
        #[arg(long)]
        to: SocketAddr,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Serve {
            port,
            bind,
            many: false,
        } => serve(SocketAddr::new(bind, port)),
        Cmd::Serve {
            port,
            bind,
            many: true,
        } => idle::serve_many(SocketAddr::new(bind, port)),
        Cmd::Hold(args) => idle::hold(args),
        Cmd::Flood(args) => idle::flood(args),
        Cmd::Collide(args) => maps::collide(args),
        Cmd::MapCount(args) => maps::map_count(args),
        Cmd::LinkDetach(args) => maps::link_detach(args),
        Cmd::Connects(args) => idle::connects(args),
        Cmd::Send {
            to,
            bytes,
            seed,
            marker,
        } => send(to, bytes, seed, marker.as_deref()),
        Cmd::Hbone(args) => hbone::run(args),
        Cmd::Stream {
            to,
            chunk,
            interval_ms,
            seed,
        } => stream(to, chunk.max(1), Duration::from_millis(interval_ms), seed),
        Cmd::Connect { to } => connect(to).map(|_| ()),
        Cmd::Rr(args) => rr::run(args),
        Cmd::Probe(args) => probe::run(args),
        Cmd::HttpServe(args) => http::serve(args),
        Cmd::HttpGet(args) => http::get(args),
        Cmd::HttpLoad(args) => http_load::load(args),
        Cmd::GrpcServe(args) => grpc::serve(args),
        Cmd::GrpcCall(args) => grpc::call(args),
        Cmd::Banner(args) => http::banner(args),
        Cmd::ReadBanner(args) => http::read_banner(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<Verdict>() {
                Some(verdict) => say(&verdict.0),
                None => say(&format!("error: {e:#}")),
            }
            ExitCode::FAILURE
        }
    }
}

/// Prints a line to stdout and flushes (tests wait on these lines through a pipe).
fn say(line: &str) {
    let mut out = io::stdout().lock();
    // Nothing useful to do if stdout is gone.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// A failed check of the echoed data, printed as is (`mismatch at byte K`, `short read ...`).
#[derive(Debug)]
struct Verdict(String);

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Verdict {}

/// A deterministic pseudo-random byte stream (xorshift64*), generated a block at a time; or,
/// with a marker, the marker text repeated (to look for it on the wire).
struct Stream {
    state: u64,
    block: Box<[u8]>,
    pos: usize,
    marker: Option<(Box<[u8]>, usize)>,
}

impl Stream {
    fn new(seed: u64) -> Stream {
        // xorshift must not start at 0; mix the seed so that nearby seeds differ at once.
        let state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Stream {
            state,
            block: vec![0; BLOCK].into_boxed_slice(),
            pos: BLOCK,
            marker: None,
        }
    }

    /// The stream for `seed`, or the marker repeated when one is given.
    fn of(seed: u64, marker: Option<&str>) -> Stream {
        let mut stream = Stream::new(seed);
        stream.marker = marker
            .filter(|m| !m.is_empty())
            .map(|m| (m.as_bytes().into(), 0));
        stream
    }

    fn refill(&mut self) {
        if let Some((marker, at)) = &mut self.marker {
            for b in self.block.iter_mut() {
                *b = marker[*at];
                *at = (*at + 1) % marker.len();
            }
            self.pos = 0;
            return;
        }
        for word in self.block.chunks_exact_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            word.copy_from_slice(&self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        self.pos = 0;
    }

    /// The next `max` (or fewer, up to the end of the current block) bytes of the stream.
    fn next(&mut self, max: usize) -> &[u8] {
        if self.pos == BLOCK {
            self.refill();
        }
        let n = max.min(BLOCK - self.pos);
        let start = self.pos;
        self.pos += n;
        &self.block[start..start + n]
    }
}

/// Checks received bytes against the expected stream.
struct Verifier {
    expected: Stream,
    offset: u64,
}

impl Verifier {
    fn check(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let want = self.expected.next(data.len());
            if let Some(i) = want.iter().zip(data).position(|(a, b)| a != b) {
                return Err(Verdict(format!("mismatch at byte {}", self.offset + i as u64)).into());
            }
            self.offset += want.len() as u64;
            data = &data[want.len()..];
        }
        Ok(())
    }
}

fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    say(&format!(
        "listening {}",
        listener.local_addr().context("getsockname")?
    ));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                say(&format!("accept error: {e}"));
                continue;
            }
        };
        std::thread::spawn(move || echo(conn));
    }
    Ok(())
}

fn echo(mut conn: TcpStream) {
    let peer = conn
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("?({e})"));
    let local = conn
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("?({e})"));
    // The connection's mark: a connection the node agent delivered carries the agent's (the
    // pod accepts with net.ipv4.tcp_fwmark_accept=1), one that arrived any other way has none.
    let mark = socket2::SockRef::from(&conn)
        .mark()
        .map_or_else(|e| format!("?({e})"), |m| format!("{m:#x}"));
    say(&format!("accepted peer={peer} local={local} mark={mark}"));
    let mut buf = vec![0u8; BLOCK];
    let mut total: u64 = 0;
    let result = loop {
        match conn.read(&mut buf) {
            Ok(0) => break conn.shutdown(Shutdown::Write),
            Ok(n) => {
                if let Err(e) = conn.write_all(&buf[..n]) {
                    break Err(e);
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    match result {
        Ok(()) => say(&format!("closed peer={peer} bytes={total}")),
        Err(e) => say(&format!("closed peer={peer} bytes={total} error={e}")),
    }
}

fn connect(to: SocketAddr) -> Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    let local = conn.local_addr().context("getsockname")?;
    let peer = conn.peer_addr().context("getpeername")?;
    say(&format!("connected local={local} peer={peer}"));
    Ok(conn)
}

fn send(to: SocketAddr, bytes: u64, seed: u64, marker: Option<&str>) -> Result<()> {
    let conn = connect(to)?;
    let mut writer = conn.try_clone().context("cloning the socket")?;
    let mut stream = Stream::of(seed, marker);
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let mut left = bytes;
        while left > 0 {
            let chunk = stream.next(usize::try_from(left).unwrap_or(usize::MAX));
            writer.write_all(chunk)?;
            left -= chunk.len() as u64;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut reader = conn;
    let mut verifier = Verifier {
        expected: Stream::of(seed, marker),
        offset: 0,
    };
    let mut buf = vec![0u8; BLOCK];
    let read_result: Result<()> = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                // Bytes beyond what was sent are a mismatch at offset `bytes`.
                let in_range =
                    usize::try_from(bytes - verifier.offset).map_or(n, |left| left.min(n));
                if let Err(e) = verifier.check(&buf[..in_range]) {
                    break Err(e);
                }
                if in_range < n {
                    break Err(
                        Verdict(format!("mismatch at byte {bytes} (more than was sent)")).into(),
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                break Err(e).context(format!("reading the echo after {} bytes", verifier.offset))
            }
        }
    };
    if read_result.is_err() {
        // Unblock the sender (the peer may have stopped reading because we did); the socket may
        // already be closed, which is fine.
        let _ = reader.shutdown(Shutdown::Both);
    }
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sending thread panicked"))?;
    read_result?;
    sent.context("sending")?;
    if verifier.offset < bytes {
        return Err(Verdict(format!("short read received={}", verifier.offset)).into());
    }
    say(&format!("ok sent={bytes} received={}", verifier.offset));
    Ok(())
}

/// A flag set once stdin closes (EOF or an error): the signal to finish.
fn stdin_closed() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
        flag.store(true, Ordering::SeqCst);
    });
    stop
}

fn stream(to: SocketAddr, chunk: usize, interval: Duration, seed: u64) -> Result<()> {
    let stop = stdin_closed();
    let mut conn = connect(to)?;
    let mut outgoing = Stream::new(seed);
    let mut verifier = Verifier {
        expected: Stream::new(seed),
        offset: 0,
    };
    let mut buf = vec![0u8; chunk];
    let mut total: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let mut left = chunk;
        while left > 0 {
            let part = outgoing.next(left);
            conn.write_all(part)
                .with_context(|| format!("writing after {total} bytes"))?;
            left -= part.len();
        }
        conn.read_exact(&mut buf)
            .with_context(|| format!("reading the echo after {total} bytes"))?;
        verifier.check(&buf)?;
        total += chunk as u64;
        say(&format!("progress bytes={total}"));
        std::thread::sleep(interval);
    }
    conn.shutdown(Shutdown::Write).context("half-closing")?;
    let extra = conn.read(&mut buf).context("draining to EOF")?;
    if extra != 0 {
        bail!("received {extra} unexpected bytes after {total}");
    }
    say(&format!("ok total={total}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_deterministic_across_chunkings() {
        let mut a = Stream::new(5);
        let whole: Vec<u8> = (0..3).flat_map(|_| a.next(BLOCK).to_vec()).collect();
        let mut verifier = Verifier {
            expected: Stream::new(5),
            offset: 0,
        };
        for piece in whole.chunks(1000) {
            verifier.check(piece).expect("same stream");
        }
        assert_eq!(verifier.offset, 3 * BLOCK as u64);
        assert_ne!(Stream::new(6).next(64), &whole[..64], "seeds differ");
    }

    #[test]
    fn verifier_reports_the_first_wrong_byte() {
        let mut data = Stream::new(1).next(BLOCK).to_vec();
        data[1234] ^= 1;
        let mut verifier = Verifier {
            expected: Stream::new(1),
            offset: 0,
        };
        let err = verifier
            .check(&data[..1000])
            .and_then(|()| verifier.check(&data[1000..]));
        assert_eq!(
            err.expect_err("mismatch").to_string(),
            "mismatch at byte 1234"
        );
    }
}
