//! `mesh-labtool rr`: request/response load against an echo server (`mesh-labtool serve`), for
//! the latency and churn scenarios of the benchmark.
//!
//! Each request writes `size` bytes and reads the echo back; the round trip is one sample. The
//! load is open loop: every request has a scheduled time (request `j` of the run at `j / rate`
//! seconds, dealt round robin to the workers so they interleave evenly) and its latency is
//! measured from that time, not from when it was actually sent. A stall therefore inflates the
//! samples queued behind it instead of hiding them (coordinated-omission correction). `--rate 0`
//! is closed loop at full speed, measured from the actual send.
//!
//! Requests scheduled during the warm-up are sent but not recorded; the recording window is the
//! `duration` after it. A worker that has fallen behind drains its backlog for at most
//! [`BACKLOG_GRACE`] after the window; what it has not sent by then is missing from `requests`
//! and so shows in `achieved_rate`. The report is one JSON line on stdout: counts, rates and
//! percentiles of the round trip (and, with `--new-conn`, of the connect), plus `curve`, the
//! round trip as `[percentile, µs]` pairs from p50 to the maximum for plotting.

use std::{
    fmt::Write as _,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{mpsc, Arc, Barrier, Mutex, OnceLock, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;

/// Connect, read and write timeout of every socket: a hung connection costs one error, and the
/// run still ends.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after the recording window a worker that fell behind may still send its backlog.
const BACKLOG_GRACE: Duration = Duration::from_secs(1);
/// Before a scheduled send, `thread::sleep` until this close, then yield in a loop (sleep alone
/// overshoots by tens of microseconds).
const SPIN: Duration = Duration::from_micros(100);
/// Largest histogram value, in microseconds (60 s); slower samples are clamped to it.
const MAX_US: u64 = 60_000_000;
/// Largest request: it is written whole before its echo is read, so it must fit the socket
/// buffers of both ends or the two writers block each other.
const MAX_SIZE: usize = 64 * 1024;
/// Most connections (and so worker threads) one run drives.
const MAX_CONNS: usize = 1024;
/// Failed requests beyond this fraction make the run fail (exit 1 after the report).
const MAX_ERROR_RATIO: f64 = 0.01;
/// Points of the report's `curve` (the bench plots them on a log scale of 1/(1-p)): percentile
/// and quantile, written out (`99.9 / 100.0` is a hair above 0.999 and would read the next
/// bucket); 100 is the largest sample.
const CURVE: [(f64, f64); 10] = [
    (50.0, 0.5),
    (75.0, 0.75),
    (90.0, 0.9),
    (95.0, 0.95),
    (99.0, 0.99),
    (99.5, 0.995),
    (99.9, 0.999),
    (99.95, 0.9995),
    (99.99, 0.9999),
    (100.0, 1.0),
];

/// Arguments of `mesh-labtool rr`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The echo server, `IP:PORT`.
    #[arg(long)]
    to: SocketAddr,
    /// Requests per second over all connections; 0: closed loop, as fast as replies come back.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the recorded window, in seconds (after the warm-up).
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Connections (persistent mode) or worker threads (with `--new-conn`); one thread each.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Bytes per request, echoed back as the response.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// A new TCP connection per request (connect, write, read the echo, half-close, read to
    /// EOF); also reports connection-setup percentiles.
    #[arg(long)]
    new_conn: bool,
    /// Seconds of traffic before recording starts.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
}

/// What every worker needs to know about the run.
#[derive(Clone, Copy, Debug)]
struct Plan {
    to: SocketAddr,
    /// Requests per second in total; 0 for closed loop.
    rate: u64,
    conns: usize,
    size: usize,
    churn: bool,
    warmup: Duration,
    duration: Duration,
}

/// The recording window of a run, fixed once every worker is ready.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// Time of request 0.
    start: Instant,
    /// Requests scheduled (or, closed loop, sent) from here on are recorded.
    record: Instant,
    /// No request scheduled (or sent) from here on.
    end: Instant,
}

/// One worker's samples; each worker has its own, locked only to record, so the main thread can
/// collect them even from a worker still blocked in a read.
#[derive(Debug)]
struct Recorder {
    /// Round trip per request, from its scheduled time (closed loop: from the send), in µs.
    latency: Histogram<u64>,
    /// Churn mode: `connect()` to established, in µs.
    connect: Histogram<u64>,
    /// Recorded requests, failed ones included.
    requests: u64,
    /// Requests that failed (connect error, write error, short read, timeout).
    errors: u64,
}

impl Recorder {
    fn new() -> Result<Recorder> {
        let histogram =
            || Histogram::new_with_bounds(1, MAX_US, 3).context("creating a latency histogram");
        Ok(Recorder {
            latency: histogram()?,
            connect: histogram()?,
            requests: 0,
            errors: 0,
        })
    }

    fn merge(&mut self, other: &Recorder) -> Result<()> {
        self.latency
            .add(&other.latency)
            .map_err(|e| anyhow!("merging histograms: {e}"))?;
        self.connect
            .add(&other.connect)
            .map_err(|e| anyhow!("merging histograms: {e}"))?;
        self.requests += other.requests;
        self.errors += other.errors;
        Ok(())
    }
}

pub fn run(args: Args) -> Result<()> {
    let plan = plan(&args)?;
    let total = measure(&plan)?;
    let failed = total.errors as f64 > MAX_ERROR_RATIO * total.requests as f64;
    let json = report(&plan, &total);
    crate::say(&json);
    if total.requests == 0 || failed {
        eprintln!(
            "rr: {} of {} requests failed (more than {}% or none at all)",
            total.errors,
            total.requests,
            MAX_ERROR_RATIO * 100.0
        );
        // Not through `main`'s error path: that prints to stdout, which must stay one JSON line.
        std::process::exit(1);
    }
    Ok(())
}

fn plan(args: &Args) -> Result<Plan> {
    if args.size == 0 || args.size > MAX_SIZE {
        bail!(
            "--size {} is out of range: a request is 1 to {MAX_SIZE} bytes (it is written whole \
             before its echo is read)",
            args.size
        );
    }
    if args.conns == 0 || args.conns > MAX_CONNS {
        bail!(
            "--conns {} is out of range: 1 to {MAX_CONNS} (one thread each)",
            args.conns
        );
    }
    if args.duration_secs == 0 {
        bail!("--duration-secs must be at least 1");
    }
    Ok(Plan {
        to: args.to,
        rate: args.rate,
        conns: args.conns,
        size: args.size,
        churn: args.new_conn,
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs),
    })
}

/// Runs the load and returns the merged samples of all workers.
fn measure(plan: &Plan) -> Result<Recorder> {
    // Persistent connections are opened before the clock starts (churn mode: one probe), so an
    // unreachable server is one clear error rather than a run of failures.
    let connect = || {
        open(plan.to)
            .with_context(|| format!("connecting to {}: is `mesh-labtool serve` there?", plan.to))
    };
    let conns: Vec<Option<TcpStream>> = if plan.churn {
        drop(connect()?);
        (0..plan.conns).map(|_| None).collect()
    } else {
        (0..plan.conns)
            .map(|_| connect().map(Some))
            .collect::<Result<_>>()?
    };

    let window = Arc::new(OnceLock::new());
    let ready = Arc::new(Barrier::new(plan.conns + 1));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut recorders = Vec::with_capacity(plan.conns);
    for (index, conn) in conns.into_iter().enumerate() {
        let recorder = Arc::new(Mutex::new(Recorder::new()?));
        recorders.push(Arc::clone(&recorder));
        let worker = Worker {
            plan: *plan,
            index: index as u64,
            conn,
            buf: vec![0x5a; plan.size],
            recorder,
        };
        let (window, ready, done) = (Arc::clone(&window), Arc::clone(&ready), done_tx.clone());
        thread::Builder::new()
            .name(format!("rr-{index}"))
            .spawn(move || {
                ready.wait();
                if let Some(window) = window.get() {
                    worker.run(*window);
                }
                // The main thread may have stopped waiting; nothing to do then.
                let _ = done.send(());
            })
            .context("spawning a worker thread")?;
    }
    drop(done_tx);

    let start = Instant::now() + Duration::from_millis(10);
    let record = start + plan.warmup;
    let end = record + plan.duration;
    let _ = window.set(Window { start, record, end });
    ready.wait();

    // Workers end on their own by `end + BACKLOG_GRACE` plus one I/O timeout; past that, report
    // what they recorded and leave the stuck ones behind.
    let deadline = end + BACKLOG_GRACE + IO_TIMEOUT + Duration::from_secs(1);
    let mut finished = 0;
    while finished < plan.conns {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(()) => finished += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!(
                    "rr: {} of {} workers still blocked at the deadline; reporting without them",
                    plan.conns - finished,
                    plan.conns
                );
                break;
            }
            // Every worker has ended (a panicked one drops its sender too).
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }

    let mut total = Recorder::new()?;
    for recorder in &recorders {
        total.merge(&recorder.lock().unwrap_or_else(PoisonError::into_inner))?;
    }
    Ok(total)
}

/// One connection (persistent mode) or one stream of new connections (churn mode).
struct Worker {
    plan: Plan,
    index: u64,
    /// Persistent mode: the connection; reopened on the next request after an error.
    conn: Option<TcpStream>,
    /// The request, and the place its echo is read into.
    buf: Vec<u8>,
    recorder: Arc<Mutex<Recorder>>,
}

impl Worker {
    fn run(mut self, window: Window) {
        let Window { start, record, end } = window;
        let stride = self.plan.conns as u64;
        let mut next = self.index;
        loop {
            let begin = if self.plan.rate == 0 {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                now
            } else {
                let scheduled = start + schedule(next, self.plan.rate);
                next += stride;
                if scheduled >= end || Instant::now() >= end + BACKLOG_GRACE {
                    break;
                }
                sleep_until(scheduled);
                scheduled
            };
            let outcome = self.request();
            if begin < record {
                continue;
            }
            let mut rec = self.recorder.lock().unwrap_or_else(PoisonError::into_inner);
            rec.requests += 1;
            match outcome {
                Ok((answered, connect)) => {
                    rec.latency
                        .saturating_record(micros(answered.saturating_duration_since(begin)));
                    if let Some(connect) = connect {
                        rec.connect.saturating_record(micros(connect));
                    }
                }
                Err(_) => rec.errors += 1,
            }
        }
        if let Some(conn) = self.conn.take() {
            // Let the server see a clean end; it may already be gone.
            let _ = conn.shutdown(Shutdown::Write);
        }
    }

    /// One request; returns when the echo was complete and, in churn mode, the connect time.
    fn request(&mut self) -> io::Result<(Instant, Option<Duration>)> {
        if self.plan.churn {
            return churn(self.plan.to, &mut self.buf).map(|(at, connect)| (at, Some(connect)));
        }
        if self.conn.is_none() {
            self.conn = Some(open(self.plan.to)?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(io::Error::other("no connection"));
        };
        let result = conn
            .write_all(&self.buf)
            .and_then(|()| conn.read_exact(&mut self.buf));
        if result.is_err() {
            // The stream is out of step (or dead): start over on a new connection.
            self.conn = None;
        }
        result.map(|()| (Instant::now(), None))
    }
}

/// One churn request: connect, write, read the echo, half-close, read to EOF. Returns when the
/// echo was complete (the close after it is not part of the request time, but a failed close
/// fails the request) and the connect time.
fn churn(to: SocketAddr, buf: &mut [u8]) -> io::Result<(Instant, Duration)> {
    let began = Instant::now();
    let mut conn = open(to)?;
    let connect = began.elapsed();
    conn.write_all(buf)?;
    conn.read_exact(buf)?;
    let answered = Instant::now();
    conn.shutdown(Shutdown::Write)?;
    let mut extra = [0u8; 1];
    if conn.read(&mut extra)? != 0 {
        return Err(io::Error::other("more bytes echoed than were sent"));
    }
    Ok((answered, connect))
}

/// Connects with the run's timeouts; no Nagle delay (each request is one write).
fn open(to: SocketAddr) -> io::Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// Offset of request `j` from the start of a run at `rate` requests per second (`rate > 0`).
pub(super) fn schedule(j: u64, rate: u64) -> Duration {
    let nanos = u128::from(j % rate) * 1_000_000_000 / u128::from(rate);
    // `j % rate < rate`, so `nanos` is below one second.
    Duration::new(j / rate, u32::try_from(nanos).unwrap_or(999_999_999))
}

/// Sleeps until `when`, precisely: the kernel's sleep for all but the last [`SPIN`], then yields.
pub(super) fn sleep_until(when: Instant) {
    loop {
        let left = when.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if left > SPIN {
            thread::sleep(left - SPIN);
        } else {
            thread::yield_now();
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The one-line JSON report.
fn report(plan: &Plan, total: &Recorder) -> String {
    let achieved = total.requests as f64 / plan.duration.as_secs_f64();
    let lat = &total.latency;
    let mut json = format!(
        "{{\"mode\":\"{}\",\"target_rate\":{},\"achieved_rate\":{achieved:.1},\"requests\":{},\
         \"errors\":{},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\
         \"mean_us\":{:.1}",
        if plan.churn { "churn" } else { "persistent" },
        plan.rate,
        total.requests,
        total.errors,
        lat.value_at_quantile(0.5),
        lat.value_at_quantile(0.9),
        lat.value_at_quantile(0.99),
        lat.value_at_quantile(0.999),
        lat.max(),
        lat.mean(),
    );
    json.push_str(",\"curve\":[");
    for (i, (p, q)) in CURVE.iter().enumerate() {
        let us = if *q >= 1.0 {
            lat.max()
        } else {
            lat.value_at_quantile(*q)
        };
        let comma = if i == 0 { "" } else { "," };
        // Writing to a String cannot fail.
        let _ = write!(json, "{comma}[{p},{us}]");
    }
    json.push(']');
    if plan.churn {
        let c = &total.connect;
        // Writing to a String cannot fail.
        let _ = write!(
            json,
            ",\"connect_p50_us\":{},\"connect_p90_us\":{},\"connect_p99_us\":{},\
             \"connect_p999_us\":{}",
            c.value_at_quantile(0.5),
            c.value_at_quantile(0.9),
            c.value_at_quantile(0.99),
            c.value_at_quantile(0.999),
        );
    }
    json.push('}');
    json
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn schedule_spreads_requests_evenly() {
        assert_eq!(schedule(0, 1000), Duration::ZERO);
        assert_eq!(schedule(1, 1000), Duration::from_millis(1));
        assert_eq!(schedule(2500, 1000), Duration::from_millis(2500));
        assert_eq!(schedule(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(schedule(4, 3), Duration::new(1, 333_333_333));
        // Worker 1 of 4 at 1000/s sends requests 1, 5, 9...: every 4 ms, 1 ms after worker 0.
        assert_eq!(
            schedule(5, 1000) - schedule(1, 1000),
            Duration::from_millis(4)
        );
    }

    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    let _ = conn.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    fn quick_plan(to: SocketAddr, churn: bool) -> Plan {
        Plan {
            to,
            rate: 500,
            conns: 2,
            size: 100,
            churn,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(400),
        }
    }

    #[test]
    fn persistent_run_sends_the_scheduled_requests() {
        let plan = quick_plan(echo_server(), false);
        let total = measure(&plan).expect("run");
        assert_eq!(total.errors, 0);
        assert_eq!(total.requests, 200, "500/s for 0.4 s");
        assert_eq!(total.latency.len(), 200);
        let json = report(&plan, &total);
        assert!(
            json.starts_with(r#"{"mode":"persistent","target_rate":500,"achieved_rate":500.0,"#),
            "{json}"
        );
        assert!(!json.contains("connect_"), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).expect("the report is JSON");
        let curve: Vec<(f64, f64)> = v["curve"]
            .as_array()
            .expect("a curve")
            .iter()
            .map(|point| {
                (
                    point[0].as_f64().expect("p"),
                    point[1].as_f64().expect("µs"),
                )
            })
            .collect();
        let percentiles: Vec<f64> = curve.iter().map(|(p, _)| *p).collect();
        let expected: Vec<f64> = CURVE.iter().map(|(p, _)| *p).collect();
        assert_eq!(percentiles, expected, "{json}");
        assert!(curve.windows(2).all(|w| w[0].1 <= w[1].1), "{json}");
        assert_eq!(curve[0].1, v["p50_us"].as_f64().expect("p50"), "{json}");
        assert_eq!(curve[2].1, v["p90_us"].as_f64().expect("p90"), "{json}");
        assert_eq!(curve[4].1, v["p99_us"].as_f64().expect("p99"), "{json}");
        assert_eq!(curve[6].1, v["p999_us"].as_f64().expect("p99.9"), "{json}");
        assert_eq!(curve[9].1, v["max_us"].as_f64().expect("max"), "{json}");
    }

    #[test]
    fn churn_run_records_connect_times() {
        let plan = quick_plan(echo_server(), true);
        let total = measure(&plan).expect("run");
        assert_eq!(total.errors, 0);
        assert_eq!(total.requests, 200);
        assert_eq!(total.connect.len(), 200);
        assert!(total.connect.max() <= total.latency.max());
        assert!(report(&plan, &total).contains(r#""connect_p999_us":"#));
    }

    #[test]
    fn refused_connections_are_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let err = measure(&quick_plan(addr, false)).expect_err("nothing listens");
        assert!(err.to_string().contains("mesh-labtool serve"), "{err:#}");
    }
}
