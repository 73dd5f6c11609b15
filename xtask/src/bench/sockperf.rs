//! The latency scenario's second load generator: sockperf, a tool users know and can run on
//! their own machines, beside `mesh-labtool rr` on the same paths (direct: legacy/client to
//! legacy/server; full mesh: shop/client to shop/api). `sockperf ping-pong` over TCP, 1 KiB
//! messages, 1000 messages/s on one connection, against `sockperf server` in the server pod.
//!
//! Two differences from rr a reader must know. sockperf reports half the round trip unless
//! told otherwise (`avg-latency`, every percentile halved); we pass `--full-rtt`, and the parser
//! insists on the `avg-rtt` line it then prints, so a sockperf that ignored the flag fails the
//! run instead of halving the figures. And ping-pong is closed loop: each message waits for the
//! previous reply (paced to the rate), so a stall delays the messages behind it instead of
//! showing in their times. rr corrects for that (coordinated omission), sockperf does not: its
//! tail percentiles read lower than rr's under the same stalls.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_lab::{Lab, Running};

use super::{
    latency::{self, PERCENTILES},
    Curves, Durations, Figure,
};

/// `sockperf server` listens here (rr's echo servers use 7000, the memory and policy
/// scenarios 7100).
const PORT: u16 = 7200;
/// Messages per second.
const RATE: u32 = 1000;
/// Bytes per message, echoed back.
const MESSAGE_BYTES: u32 = 1024;

/// The figures of sockperf on the direct and the full mesh path; the percentiles sockperf
/// prints go to `curves` as `sockperf.1000.<path>`.
pub fn run(lab: &Lab, d: &Durations, out: &mut Vec<Figure>, curves: &mut Curves) -> Result<()> {
    let _servers = [server(lab, "legacy/server"), server(lab, "shop/api")];
    let p = latency::paths(lab, PORT);
    let direct = ping_pong(lab, d.rr_secs, &p.direct)?;
    let mesh = ping_pong(lab, d.rr_secs, &p.mesh)?;
    for (label, _, pk) in PERCENTILES {
        // "p99.9" -> 99.9
        let percentile: f64 = label[1..].parse().context("a percentile label")?;
        latency::mesh_and_added(
            out,
            &format!("latency.sockperf.{RATE}"),
            [
                format!("sockperf ping-pong {RATE}/s, full mesh round trip (RTT) {label}"),
                format!("sockperf ping-pong {RATE}/s, RTT added by the mesh {label}"),
            ],
            pk,
            (mesh.at(percentile)?, direct.at(percentile)?),
        );
    }
    for (path, report) in [("direct", &direct), ("mesh", &mesh)] {
        curves.insert(format!("sockperf.{RATE}.{path}"), report.points.clone());
    }
    Ok(())
}

/// Starts `sockperf server` (TCP, every address) in `pod` and waits until it serves.
fn server(lab: &Lab, pod: &str) -> Running {
    let mut server = Running::spawn(
        &format!("sockperf server in {pod}"),
        lab.command(pod, "sockperf")
            .args(["server", "--tcp", "-p", &PORT.to_string()]),
    );
    // Its receiving thread announces itself once the socket listens.
    server.wait_line("sockperf: [tid", Duration::from_secs(10));
    server
}

/// One `sockperf ping-pong` run from `client` to `addr` (`IP:PORT`) for `secs` seconds.
fn ping_pong(lab: &Lab, secs: u32, (client, addr): &(&str, String)) -> Result<Report> {
    let (ip, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("{addr} is not IP:PORT"))?;
    let mut run = Running::spawn(
        &format!("sockperf ping-pong from {client} to {addr}"),
        lab.command(client, "sockperf").args([
            "ping-pong",
            "--tcp",
            "-i",
            ip,
            "-p",
            port,
            "-m",
            &MESSAGE_BYTES.to_string(),
            "--mps",
            &RATE.to_string(),
            "-t",
            &secs.to_string(),
            "--full-rtt",
        ]),
    );
    let out = run.wait_success(Duration::from_secs(u64::from(secs) + 30));
    parse(&out.join("\n")).with_context(|| format!("sockperf from {client} to {addr}"))
}

/// What one ping-pong run printed: its percentiles, round trip in µs.
#[derive(Debug, PartialEq)]
struct Report {
    /// `[percentile, µs]` from the lowest percentile to the maximum (as 100).
    points: Vec<[f64; 2]>,
}

impl Report {
    /// The round trip at `percentile`, which sockperf must have printed.
    fn at(&self, percentile: f64) -> Result<f64> {
        self.points
            .iter()
            .find(|[p, _]| (p - percentile).abs() < 1e-6)
            .map(|[_, us]| *us)
            .with_context(|| format!("sockperf printed no percentile {percentile}"))
    }
}

/// Reads sockperf's summary: `---> percentile 99.900 =  172.130` lines and `---> <MAX>
/// observation = ...`, in µs; the `avg-rtt` line proves they are round trips.
fn parse(output: &str) -> Result<Report> {
    let text = strip_ansi(output);
    ensure!(
        text.contains("avg-rtt="),
        "no avg-rtt line: sockperf did not report full round trips (--full-rtt), and its \
         percentiles would be half of them: {text}"
    );
    let mut points = Vec::new();
    for line in text.lines() {
        let Some((_, rest)) = line.split_once("---> ") else {
            continue;
        };
        let Some((what, value)) = rest.split_once('=') else {
            continue;
        };
        let value: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("a value in {line:?}"))?;
        let what = what.trim();
        if let Some(p) = what.strip_prefix("percentile ") {
            let p: f64 = p
                .parse()
                .with_context(|| format!("a percentile in {line:?}"))?;
            points.push([p, value]);
        } else if what == "<MAX> observation" {
            points.push([100.0, value]);
        }
    }
    if points.is_empty() {
        bail!("no percentiles in sockperf's output: {text}");
    }
    points.sort_by(|a, b| a[0].total_cmp(&b[0]));
    Ok(Report { points })
}

/// `output` without terminal colour sequences (sockperf colours some lines even into a pipe).
fn strip_ansi(output: &str) -> String {
    let mut text = String::with_capacity(output.len());
    let mut chars = output.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            text.push(c);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sockperf 3.7 (Debian bookworm), `ping-pong --tcp -m 1024 --mps 1000 -t 1 --full-rtt`
    /// over loopback, stdout as captured through a pipe.
    const FULL_RTT: &str = "\
sockperf: \u{1b}[2;35m== version #3.7-no.git == \u{1b}[0m
sockperf[CLIENT] send on:sockperf: using recvfrom() to block on socket(s)

[ 0] IP = 127.0.0.1       PORT =  7200 # TCP
sockperf: Warmup stage (sending a few dummy messages)...
sockperf: Starting test...
sockperf: Test end (interrupted by timer)
sockperf: Test ended
sockperf: [Total Run] RunTime=1.001 sec; Warm up time=400 msec; SentMessages=1001; ReceivedMessages=1001
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=0.548 sec; SentMessages=549; ReceivedMessages=549
sockperf: \u{1b}[2;35m====> avg-rtt=99.473 (std-dev=27.949)\u{1b}[0m
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Round trip is 99.473 usec
sockperf: \u{1b}[2;35mTotal 549 observations\u{1b}[0m; each percentile contains 5.49 observations
sockperf: ---> <MAX> observation =  686.798
sockperf: ---> percentile 99.999 =  686.798
sockperf: ---> percentile 99.990 =  686.798
sockperf: ---> percentile 99.900 =  172.130
sockperf: ---> percentile 99.000 =  134.900
sockperf: ---> percentile 90.000 =  110.665
sockperf: ---> percentile 75.000 =  105.947
sockperf: ---> percentile 50.000 =  100.516
sockperf: ---> percentile 25.000 =   88.624
sockperf: ---> <MIN> observation =   74.448";

    #[test]
    fn percentiles_are_read_as_round_trips() {
        let report = parse(FULL_RTT).expect("parses");
        assert_eq!(report.at(50.0).expect("p50"), 100.516);
        assert_eq!(report.at(90.0).expect("p90"), 110.665);
        assert_eq!(report.at(99.0).expect("p99"), 134.9);
        assert_eq!(report.at(99.9).expect("p99.9"), 172.13);
        assert_eq!(report.points.first(), Some(&[25.0, 88.624]));
        assert_eq!(report.points.last(), Some(&[100.0, 686.798]));
        assert!(report.at(95.0).is_err());
    }

    #[test]
    fn half_round_trips_are_refused() {
        // Without --full-rtt sockperf prints avg-latency, and every percentile is halved.
        let halved = FULL_RTT.replace("avg-rtt", "avg-latency");
        let err = parse(&halved).expect_err("half round trips");
        assert!(err.to_string().contains("--full-rtt"), "{err}");
        let err = parse("sockperf: ====> avg-rtt=1.0\n").expect_err("no percentiles");
        assert!(err.to_string().contains("no percentiles"), "{err}");
    }
}
