//! Bulk echoes through the tunnel as the lab's capture test makes them: 64 MiB written while
//! the echo comes back, the first bytes sent with the CONNECT (as the outbound proxy does),
//! half-closed at the end, every byte checked. Each test makes a node slow or loaded in a way
//! a fast test machine never is: a copy task that keeps running out of its scheduling budget,
//! or an HBONE connection across a slow link (a relay that forwards a little each way per tick
//! of tokio's paused clock) that stalls for a while, so that both directions' buffers stay full
//! for minutes of the agent's own keepalive timers. Every test has a deadline in real time: a
//! hang fails it.

use std::{
    io::Read as _,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::mpsc as std_mpsc,
    task::{Context, Poll},
};

use tokio::{
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
    time::Instant,
};

use super::*;

const MIB: usize = 1 << 20;

/// Byte `i` of a transfer: a pattern whose period (251) is no power of two, so that a lost or
/// repeated block shows.
fn pattern(i: usize) -> u8 {
    u8::try_from(i % 251).expect("below 251")
}

/// The path between the two ends of the HBONE connection.
#[derive(Clone, Copy, Debug)]
struct Link {
    /// At most this many bytes forwarded each way per `tick` (of the paused clock).
    chunk: usize,
    tick: Duration,
    /// Nothing is forwarded for `.1` from `.0` after the link is set up: a node that stops
    /// for a while (swapping, starved of CPU, a VM paused).
    stall: Option<(Duration, Duration)>,
    /// Receive and send buffers of every socket of the HBONE connection (the kernel doubles
    /// them): little room between the two ends besides the HTTP/2 windows.
    socket_buffer: u32,
}

/// A socket with `size` bytes of receive and send buffer.
fn small_socket(size: u32) -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    socket.set_send_buffer_size(size).expect("SO_SNDBUF");
    socket
}

/// A loopback listener whose connections have `size` bytes of buffers.
fn small_listener(size: u32) -> TcpListener {
    let socket = small_socket(size);
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    socket.listen(64).expect("listen")
}

/// A relay to `to` that forwards as `link` says.
async fn slow_link(to: SocketAddr, link: Link) -> SocketAddr {
    let listener = small_listener(link.socket_buffer);
    let addr = listener.local_addr().expect("relay address");
    let stall = link
        .stall
        .map(|(after, length)| (Instant::now() + after, length));
    tokio::spawn(async move {
        while let Ok((a, _)) = listener.accept().await {
            let Ok(b) = small_socket(link.socket_buffer).connect(to).await else {
                continue;
            };
            let (ar, aw) = a.into_split();
            let (br, bw) = b.into_split();
            tokio::spawn(pump(ar, bw, link, stall));
            tokio::spawn(pump(br, aw, link, stall));
        }
    });
    addr
}

async fn pump(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    link: Link,
    stall: Option<(Instant, Duration)>,
) {
    let mut buf = vec![0u8; link.chunk];
    loop {
        if let Some((from, length)) = stall {
            let now = Instant::now();
            if now >= from && now < from + length {
                tokio::time::sleep_until(from + length).await;
            }
        }
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if wr.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep(link.tick).await;
    }
    let _ = wr.shutdown().await;
}

/// Bytes the application already sent, read as the outbound proxy reads them (straight from
/// the socket, past the runtime).
fn initial_bytes(stream: &TcpStream) -> Option<Bytes> {
    let mut buf = vec![0u8; stream::FIRST_READ];
    match (&*socket2::SockRef::from(stream)).read(&mut buf) {
        Ok(n) if n > 0 => {
            buf.truncate(n);
            Some(buf.into())
        }
        _ => None,
    }
}

/// A future whose task has already spent its scheduling budget every other time it is polled,
/// as a copy task finds it after moving many chunks in one go (tokio's cooperative
/// scheduling: every socket operation spends one unit, a task gets 128 per poll).
struct OutOfBudget<F> {
    inner: Pin<Box<F>>,
    polls: u64,
}

impl<F: Future> Future for OutOfBudget<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls += 1;
        if self.polls.is_multiple_of(2) {
            // Spent: the runtime then asks the task to yield (and wakes it to go on later).
            while let Poll::Ready(unit) = tokio::task::coop::poll_proceed(cx) {
                unit.made_progress();
            }
        }
        self.inner.as_mut().poll(cx)
    }
}

/// How one echo goes.
#[derive(Clone, Copy, Debug)]
struct Echo {
    total: usize,
    /// The HBONE connection's path; direct if `None`.
    link: Option<Link>,
    /// The client side's copy runs out of budget every other poll.
    starved_copy: bool,
}

/// Echoes `echo.total` bytes through an HBONE tunnel: the application writes everything then
/// half-closes while it reads the echo; returns what went wrong, if anything.
async fn bulk_echo(echo: Echo) -> Result<(), String> {
    let total = echo.total;
    let ca = Ca::new(TD);
    // The agent's defaults: the server PINGs every 30 s, the client every 10 s, each drops the
    // connection after 20 s without an answer.
    let options = server::Options::with_max_age(DAY);
    let buffers = echo.link.map(|l| l.socket_buffer);
    let listener = match buffers {
        Some(size) => small_listener(size),
        None => TcpListener::bind("127.0.0.1:0").await.expect("bind HBONE"),
    };
    let mut server = Server::start_listening(listener, ca.server_config(), options, admit_all());
    let echo_addr = echo_server(false).await;
    let hbone = match echo.link {
        Some(link) => slow_link(server.addr, link).await,
        None => server.addr,
    };
    let (pool, _) = new_pool(200, DAY);

    // The application's connection, accepted as the outbound proxy accepts it.
    let bridge = TcpListener::bind("127.0.0.1:0").await.expect("bind bridge");
    let app = TcpStream::connect(bridge.local_addr().expect("bridge address"))
        .await
        .expect("connect bridge");
    let (side, _) = bridge.accept().await.expect("accept bridge");
    let (mut rd, mut wr) = app.into_split();
    let writer = tokio::spawn(async move {
        let block: Vec<u8> = (0..64 << 10).map(pattern).collect();
        let mut sent = 0;
        while sent < total {
            // Each write goes on where the pattern stopped.
            let start = sent % 251;
            let n = (block.len() - start).min(total - sent);
            wr.write_all(&block[start..start + n])
                .await
                .map_err(|e| format!("application write at {sent}: {e}"))?;
            sent += n;
        }
        wr.shutdown()
            .await
            .map_err(|e| format!("application half-close: {e}"))
    });
    // Peeked, not `readable`: tokio may call a new socket readable before anything arrived.
    side.peek(&mut [0u8; 1]).await.expect("application bytes");
    let initial = initial_bytes(&side);
    let sent_first = initial.as_ref().map_or(0, |b| b.len() as u64);
    assert!(sent_first > 0, "the application has sent its first bytes");

    let config = ca.client_config(api());
    let forwarded = FORWARDED_FOR.parse().expect("forwarded address");
    let tunnel = pool
        .open(
            &key(hbone),
            || Ok(config.clone()),
            move || async move {
                match buffers {
                    Some(size) => small_socket(size).connect(hbone).await,
                    None => TcpStream::connect(hbone).await,
                }
            },
            echo_addr,
            forwarded,
            initial,
        )
        .await
        .map_err(|e| format!("open: {e}"))?;
    let Stream { send, recv, .. } = tunnel;
    let copy = Box::pin(stream::copy(side, send, recv, |_| {}, |_| {}));
    let client_copy = match echo.starved_copy {
        true => tokio::spawn(OutOfBudget {
            inner: copy,
            polls: 0,
        }),
        false => tokio::spawn(copy),
    };

    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = rd
            .read(&mut buf)
            .await
            .map_err(|e| format!("application read at {got}: {e}"))?;
        if n == 0 {
            break;
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(got + i)) {
            return Err(format!("echo differs at byte {}", got + i));
        }
        got += n;
    }
    if got != total {
        return Err(format!("echo ended after {got} of {total} bytes"));
    }
    writer.await.expect("writer task")?;
    let (up, down) = client_copy
        .await
        .expect("client copy task")
        .map_err(|e| format!("client copy: {e}"))?;
    let n = total as u64;
    assert_eq!((up + sent_first, down), (n, n), "client copy counts");
    let copied = server.copied.recv().await.expect("server copy");
    assert_eq!(
        copied.map_err(|e| format!("server copy: {e}"))?,
        (n, n),
        "server copy counts"
    );
    Ok(())
}

/// Runs `echo` on a current-thread runtime (its clock paused if `paused`: it then jumps to the
/// next timer whenever the runtime waits) and panics with what went wrong, or if nothing came
/// out within `limit` of real time: a runtime that spins or waits forever.
fn echo_within(limit: Duration, paused: bool, echo: Echo) {
    let (done, result) = std_mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(paused)
            .build()
            .expect("runtime");
        let ended = std::panic::catch_unwind(AssertUnwindSafe(|| {
            runtime.block_on(async move {
                if paused {
                    // The node's clock moves on while it waits for the kernel: without this
                    // beat, the paused clock would leap to the next timer (a PING's) whenever
                    // every task waits on a socket, however soon the socket would be ready.
                    tokio::spawn(async {
                        loop {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    });
                }
                bulk_echo(echo).await
            })
        }));
        let _ = done.send(ended);
    });
    match result.recv_timeout(limit) {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => panic!("{echo:?}: {e}"),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{echo:?}: no end within {limit:?}: the transfer hangs"),
    }
}

#[test]
fn a_copy_that_runs_out_of_budget_mid_burst_yields_and_goes_on() {
    echo_within(
        Duration::from_secs(20),
        false,
        Echo {
            total: 16 * MIB,
            link: None,
            starved_copy: true,
        },
    );
}

#[test]
fn a_bulk_echo_over_a_slow_link_that_stalls_is_not_dropped_by_the_keepalives() {
    // At most 16 KiB each way per 16 ms, through 8 KiB socket buffers: the echo lasts minutes
    // of the paused clock, many times both ends' PING intervals (10 s, 30 s), with the HTTP/2
    // write buffers full all along; from 25 s to 37 s nothing moves at all. The bytes the
    // peer keeps taking are the sign of life: a PING would wait behind them.
    let link = Link {
        chunk: 16 << 10,
        tick: Duration::from_millis(16),
        stall: Some((Duration::from_secs(25), Duration::from_secs(12))),
        socket_buffer: 4 << 10,
    };
    echo_within(
        Duration::from_secs(20),
        true,
        Echo {
            total: 64 * MIB,
            link: Some(link),
            starved_copy: false,
        },
    );
}
