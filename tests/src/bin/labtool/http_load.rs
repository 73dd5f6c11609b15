//! `mesh-labtool http-load`: HTTP/1.1 load at a fixed rate for the bench's L7 scenario
//! (docs/performance.md), open loop and corrected for coordinated omission as `rr` is.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{mpsc, Arc, Barrier, Mutex, OnceLock, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

use super::{
    rr::{schedule, sleep_until},
    say,
};

/// `http-load`: connect, request and answer timeout; a hung request costs one error.
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// `http-load`: how long after the recording window a connection that fell behind may still
/// send its backlog (what it has not sent by then is missing from `requests`).
const LOAD_GRACE: Duration = Duration::from_secs(1);
/// `http-load`: largest latency recorded, in µs (60 s); slower samples are clamped to it.
const LOAD_MAX_US: u64 = 60_000_000;
/// `http-load`: most connections (one thread each).
const LOAD_MAX_CONNECTIONS: usize = 256;
/// `http-load`: failed requests (errors and answers other than 2xx) beyond this fraction make
/// the run fail (exit 1 after the report).
const LOAD_MAX_FAILED: f64 = 0.01;

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Server address (a service's `vip:port`, or a pod's `ip:port`).
    #[arg(long)]
    to: SocketAddr,
    /// The Host header.
    #[arg(long, default_value = "service")]
    host: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests per second over all connections.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the recorded window, in seconds (after the warm-up).
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Seconds of load before recording starts.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// HTTP/1.1 keep-alive connections, one thread each; requests are dealt to them round robin.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

/// What every connection of an `http-load` run needs to know.
#[derive(Clone, Debug)]
struct LoadPlan {
    to: SocketAddr,
    host: String,
    path: String,
    /// Requests per second in total (at least 1).
    rate: u64,
    connections: usize,
    warmup: Duration,
    duration: Duration,
}

/// One connection's samples (each has its own, locked only to record, so that the main thread
/// can collect them even from a connection still blocked in a request).
#[derive(Debug)]
struct Tally {
    /// From each request's scheduled time to the end of its answer's body, in µs; answers with
    /// a 2xx status only (a quick error answer is no round trip of the service).
    latency: Histogram<u64>,
    /// Requests scheduled in the recording window, failed ones included.
    requests: u64,
    /// Requests sent in all, warm-up and backlog included: what the servers and proxies
    /// handled while the load ran (for CPU per request).
    sent: u64,
    /// Recorded requests without an answer (connect, I/O or protocol error, timeout).
    errors: u64,
    /// Recorded answers by status.
    statuses: BTreeMap<u16, u64>,
    /// The first error's message, for the report.
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Result<Tally> {
        Ok(Tally {
            latency: Histogram::new_with_bounds(1, LOAD_MAX_US, 3)
                .context("creating a latency histogram")?,
            requests: 0,
            sent: 0,
            errors: 0,
            statuses: BTreeMap::new(),
            first_error: None,
        })
    }

    fn merge(&mut self, other: &Tally) -> Result<()> {
        self.latency
            .add(&other.latency)
            .map_err(|e| anyhow!("merging histograms: {e}"))?;
        self.requests += other.requests;
        self.sent += other.sent;
        self.errors += other.errors;
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        Ok(())
    }

    /// Recorded requests that failed: errors and answers other than 2xx.
    fn failed(&self) -> u64 {
        let answered_bad: u64 = self
            .statuses
            .iter()
            .filter(|(status, _)| !(200..300).contains(*status))
            .map(|(_, n)| n)
            .sum();
        self.errors + answered_bad
    }
}

/// HTTP/1.1 load at a fixed rate, open loop, over keep-alive connections: request `j` of the
/// run is scheduled at `j / rate` seconds and dealt to connection `j mod C`; its latency runs
/// from that scheduled time, not from when it was sent, so a stall inflates the samples queued
/// behind it instead of hiding them (coordinated omission corrected, as `rr` does). Prints one
/// JSON line; exits 1 when more than 1% of the recorded requests failed.
pub fn load(args: LoadArgs) -> Result<()> {
    if args.rate == 0 {
        bail!("--rate must be at least 1 (http-load is open loop at a fixed rate)");
    }
    if args.secs == 0 {
        bail!("--secs must be at least 1");
    }
    if args.connections == 0 || args.connections > LOAD_MAX_CONNECTIONS {
        bail!(
            "--connections {} is out of range: 1 to {LOAD_MAX_CONNECTIONS} (one thread each)",
            args.connections
        );
    }
    let plan = LoadPlan {
        to: args.to,
        host: args.host,
        path: args.path,
        rate: args.rate,
        connections: args.connections,
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.secs),
    };
    let total = run_load(&plan)?;
    say(&load_report(&plan, &total).to_string());
    if total.requests == 0 || total.failed() as f64 > LOAD_MAX_FAILED * total.requests as f64 {
        eprintln!(
            "http-load: {} of {} requests failed (more than {}% or none at all)",
            total.failed(),
            total.requests,
            LOAD_MAX_FAILED * 100.0
        );
        // Not through `main`'s error path: that prints to stdout, which must stay one JSON line.
        std::process::exit(1);
    }
    Ok(())
}

/// The recording window, fixed once every connection is open.
#[derive(Clone, Copy, Debug)]
struct LoadWindow {
    /// Time of request 0.
    start: Instant,
    /// Requests scheduled from here on are recorded.
    record: Instant,
    /// No request is scheduled from here on.
    end: Instant,
}

/// Opens the connections (before the clock starts: an unreachable server is one clear error),
/// runs the load and returns the merged tallies.
fn run_load(plan: &LoadPlan) -> Result<Tally> {
    let window = Arc::new(OnceLock::new());
    let ready = Arc::new(Barrier::new(plan.connections + 1));
    let (opened_tx, opened_rx) = mpsc::channel::<Result<()>>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut tallies = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        let tally = Arc::new(Mutex::new(Tally::new()?));
        tallies.push(Arc::clone(&tally));
        let (plan, window, ready) = (plan.clone(), Arc::clone(&window), Arc::clone(&ready));
        let (opened, done) = (opened_tx.clone(), done_tx.clone());
        thread::Builder::new()
            .name(format!("http-load-{index}"))
            .spawn(move || {
                // The main thread waits for one message per connection, then for the barrier.
                let connection = match LoadConnection::open(plan, index as u64, tally) {
                    Ok(connection) => {
                        let _ = opened.send(Ok(()));
                        Some(connection)
                    }
                    Err(e) => {
                        let _ = opened.send(Err(e));
                        None
                    }
                };
                ready.wait();
                if let (Some(connection), Some(window)) = (connection, window.get()) {
                    connection.run(*window);
                }
                // The main thread may have stopped waiting; nothing to do then.
                let _ = done.send(());
            })
            .context("spawning a connection thread")?;
    }
    drop((opened_tx, done_tx));
    let mut failure = None;
    for _ in 0..plan.connections {
        match opened_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some(anyhow!("a connection thread ended early"))),
        }
    }
    if let Some(e) = failure {
        // No window: every thread returns at once.
        ready.wait();
        return Err(e.context(format!(
            "connecting to {}: is `mesh-labtool http-serve` there?",
            plan.to
        )));
    }
    let start = Instant::now() + Duration::from_millis(10);
    let record = start + plan.warmup;
    let end = record + plan.duration;
    let _ = window.set(LoadWindow { start, record, end });
    ready.wait();

    // Connections end on their own by `end + LOAD_GRACE` plus one timeout; past that, report
    // what they recorded and leave the stuck ones behind.
    let deadline = end + LOAD_GRACE + LOAD_TIMEOUT + Duration::from_secs(1);
    let mut finished = 0;
    while finished < plan.connections {
        match done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(()) => finished += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!(
                    "http-load: {} of {} connections still blocked at the deadline; reporting \
                     without them",
                    plan.connections - finished,
                    plan.connections
                );
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let mut total = Tally::new()?;
    for tally in &tallies {
        total.merge(&tally.lock().unwrap_or_else(PoisonError::into_inner))?;
    }
    Ok(total)
}

/// One keep-alive connection of `http-load` and the thread's own runtime that drives it.
struct LoadConnection {
    plan: LoadPlan,
    index: u64,
    runtime: tokio::runtime::Runtime,
    /// Reopened on the next request after an error.
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    tally: Arc<Mutex<Tally>>,
}

impl LoadConnection {
    fn open(plan: LoadPlan, index: u64, tally: Arc<Mutex<Tally>>) -> Result<LoadConnection> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let sender = runtime.block_on(open_h1(plan.to))?;
        Ok(LoadConnection {
            plan,
            index,
            runtime,
            sender: Some(sender),
            tally,
        })
    }

    fn run(mut self, window: LoadWindow) {
        let stride = self.plan.connections as u64;
        let mut next = self.index;
        loop {
            let scheduled = window.start + schedule(next, self.plan.rate);
            next += stride;
            if scheduled >= window.end || Instant::now() >= window.end + LOAD_GRACE {
                break;
            }
            sleep_until(scheduled);
            let outcome = self.request();
            let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
            tally.sent += 1;
            if scheduled < window.record {
                continue;
            }
            tally.requests += 1;
            match outcome {
                Ok((status, answered)) => {
                    *tally.statuses.entry(status).or_default() += 1;
                    if (200..300).contains(&status) {
                        let us = answered.saturating_duration_since(scheduled).as_micros();
                        tally
                            .latency
                            .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
                    }
                }
                Err(e) => {
                    tally.errors += 1;
                    if tally.first_error.is_none() {
                        tally.first_error = Some(format!("{e:#}"));
                    }
                }
            }
        }
    }

    /// One request on the connection (a new one if the last failed): its status and when the
    /// answer's body was complete.
    fn request(&mut self) -> Result<(u16, Instant)> {
        let LoadConnection {
            plan,
            runtime,
            sender,
            ..
        } = self;
        let result = runtime.block_on(async {
            tokio::time::timeout(LOAD_TIMEOUT, async {
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    *sender = Some(open_h1(plan.to).await?);
                }
                let s = sender.as_mut().context("no connection")?;
                s.ready().await?;
                let req = Request::get(plan.path.as_str())
                    .header(hyper::header::HOST, plan.host.as_str())
                    .body(Full::new(Bytes::new()))?;
                let response = s.send_request(req).await?;
                let status = response.status().as_u16();
                response.into_body().collect().await?;
                Ok::<_, anyhow::Error>((status, Instant::now()))
            })
            .await
            .map_err(|_| anyhow!("no answer within {LOAD_TIMEOUT:?}"))?
        });
        if result.is_err() {
            // Out of step or dead: start over on a new connection.
            *sender = None;
        }
        result
    }
}

/// A keep-alive HTTP/1.1 connection, Nagle off (each request is one write).
async fn open_h1(to: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let tcp = tokio::time::timeout(LOAD_TIMEOUT, tokio::net::TcpStream::connect(to))
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The one-line JSON report of `http-load`.
fn load_report(plan: &LoadPlan, total: &Tally) -> serde_json::Value {
    let lat = &total.latency;
    serde_json::json!({
        "target_rate": plan.rate,
        "achieved_rate": total.requests as f64 / plan.duration.as_secs_f64(),
        "connections": plan.connections,
        "requests": total.requests,
        "sent": total.sent,
        "errors": total.errors,
        "statuses": total.statuses,
        "first_error": total.first_error,
        "p50_us": lat.value_at_quantile(0.5),
        "p90_us": lat.value_at_quantile(0.9),
        "p99_us": lat.value_at_quantile(0.99),
        "p999_us": lat.value_at_quantile(0.999),
        "max_us": lat.max(),
        "mean_us": lat.mean(),
    })
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicU64, Ordering},
    };

    use hyper::{body::Incoming, service::service_fn, Response};

    use super::*;

    /// An HTTP/1.1 server on loopback answering 200 `ok`, or 503 to every other request.
    fn server(fail_every_other: bool) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let count = Arc::new(AtomicU64::new(0));
                while let Ok((tcp, _)) = listener.accept().await {
                    let count = count.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |_req: Request<Incoming>| {
                            let n = count.fetch_add(1, Ordering::Relaxed);
                            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                            if fail_every_other && n % 2 == 1 {
                                *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            }
                            async move { Ok::<_, Infallible>(r) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    });
                }
            });
        });
        addr
    }

    fn plan(to: SocketAddr) -> LoadPlan {
        LoadPlan {
            to,
            host: "test".into(),
            path: "/".into(),
            rate: 500,
            connections: 2,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(400),
        }
    }

    #[test]
    fn load_sends_the_scheduled_requests_and_records_the_window() {
        let plan = plan(server(false));
        let total = run_load(&plan).expect("run");
        assert_eq!(total.errors, 0, "{:?}", total.first_error);
        assert_eq!(total.requests, 200, "500/s for 0.4 s");
        assert_eq!(total.sent, 250, "warm-up included");
        assert_eq!(total.statuses, BTreeMap::from([(200, 200)]));
        assert_eq!(total.latency.len(), 200);
        let report = load_report(&plan, &total);
        assert_eq!(report["achieved_rate"], 500.0);
        assert_eq!(report["statuses"]["200"], 200);
        assert!(
            report["p999_us"].as_u64().is_some_and(|v| v > 0),
            "{report}"
        );
    }

    #[test]
    fn answers_other_than_2xx_are_counted_as_failed_and_not_timed() {
        let total = run_load(&plan(server(true))).expect("run");
        assert_eq!(total.statuses.values().sum::<u64>(), 200);
        let failed = total.statuses.get(&503).copied().unwrap_or(0);
        assert!((99..=101).contains(&failed), "{:?}", total.statuses);
        assert_eq!(total.failed(), failed);
        assert_eq!(total.latency.len(), 200 - failed);
    }

    #[test]
    fn an_unreachable_server_is_one_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let err = run_load(&plan(addr)).expect_err("nothing listens");
        assert!(format!("{err:#}").contains("http-serve"), "{err:#}");
    }
}
