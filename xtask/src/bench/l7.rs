//! Scenario l7: HTTP through the waypoint. `mesh-labtool http-load` (HTTP/1.1 keep-alive, open
//! loop, latency from each request's scheduled time) at 1000 requests/s on 4 connections to an
//! `http-serve` answering 1 KiB bodies, on three paths of one lab and one run: direct (legacy,
//! no agent), the L4 mesh (shop/client to shop/reviews-v1's service before shop has its
//! waypoint: both node agents and HBONE) and through the waypoint (the same service once it
//! runs: client's agent, HBONE to the waypoint on n1, the waypoint, HBONE to the endpoint's
//! agent on n2).
//!
//! Its own lab, `mesh_lab::l7::topology()`, brought up after the main bench lab is down: a
//! waypoint for shop would send every shop service of the main lab through it (the latency,
//! churn and policy scenarios measure shop/api at L4), the L7 topology is the one the waypoint's
//! end-to-end tests use, and the main lab's hundred idle pods do not make its figures any
//! truer. The cost is one more lab up and down, a few seconds.

use anyhow::{ensure, Context, Result};
use mesh_lab::{l7, Lab, LabOptions};

use super::{
    measure::{agents_cpu, num, process_cpu, process_rss_mib},
    Durations, Figure,
};

/// Requests per second of every path.
const RATE: u32 = 1000;
/// Keep-alive connections the load is spread over.
const CONNECTIONS: u32 = 4;
/// Body of every answer: the same on every path, whatever headers the waypoint adds.
const BODY_BYTES: &str = "1024";
/// Percentiles of the figures: label, key in the load generator's report, key of the figure.
const PERCENTILES: [(&str, &str, &str); 4] = [
    ("p50", "p50_us", "p50"),
    ("p90", "p90_us", "p90"),
    ("p99", "p99_us", "p99"),
    ("p99.9", "p999_us", "p999"),
];

pub fn run(d: &Durations, out: &mut Vec<Figure>) -> Result<()> {
    let lab = Lab::try_up(LabOptions {
        id: Some("benchl7".into()),
        topology: l7::topology(),
        ..LabOptions::default()
    })?;
    let measured = measure(&lab, d, out);
    lab.try_down()?;
    measured
}

fn measure(lab: &Lab, d: &Durations, out: &mut Vec<Figure>) -> Result<()> {
    let body = ["--body-bytes", BODY_BYTES];
    let _servers = [
        l7::serve_http(lab, "legacy/server", "direct", &body),
        l7::serve_http(lab, "shop/reviews-v1", "v1", &body),
    ];
    let direct_to = format!("{}:8080", lab.pod("legacy/server").ip);
    let direct = load(lab, d, "legacy/client", &direct_to, "server.legacy")?;

    // L4 first: once shop has its waypoint, every shop service goes through it.
    let cpu0 = agents_cpu(lab)?;
    let l4 = load(lab, d, "shop/client", l7::REVIEWS_V1, "reviews-v1.shop")?;
    let l4_agents = agents_cpu(lab)? - cpu0;

    l7::set_state(lab, "[]", "[]");
    let waypoint = l7::start_waypoint(lab, "{}");
    let pid = waypoint.pid();
    let rss_ready = process_rss_mib(pid).context("the waypoint's memory")?;
    let (wp0, cpu0) = (process_cpu(pid)?, agents_cpu(lab)?);
    let l7 = load(lab, d, "shop/client", l7::REVIEWS_V1, "reviews-v1.shop")?;
    let (wp_cpu, l7_agents) = (process_cpu(pid)? - wp0, agents_cpu(lab)? - cpu0);
    let rss_after = process_rss_mib(pid).context("the waypoint's memory")?;
    // The L7 figures mean nothing unless the requests went through the waypoint.
    let through = mesh_lab::exposed_value(
        &l7::waypoint_metrics(lab),
        "istio_requests_total",
        &[("destination_service_name", "reviews-v1")],
    )
    .map_err(anyhow::Error::msg)
    .context("the waypoint's metrics")?;
    ensure!(
        through >= num(&l7, "requests")?,
        "the waypoint counted {through} requests to reviews-v1, the client {}: did they bypass it?",
        num(&l7, "requests")?
    );

    for (label, key, pk) in PERCENTILES {
        let dv = num(&direct, key)?;
        for (path, pathk, run) in [
            ("L4 mesh", "l4", &l4),
            ("through the waypoint", "waypoint", &l7),
        ] {
            let v = num(run, key)?;
            out.push(figure(
                format!("l7.{pathk}.{pk}"),
                format!("{path}: round trip {label}"),
                "µs",
                v,
                Some(dv),
            ));
            out.push(figure(
                format!("l7.{pathk}.added.{pk}"),
                format!("{path}: latency added {label}"),
                "µs",
                v - dv,
                None,
            ));
        }
        // The waypoint's own share: the L7 path minus the L4 path, same percentile.
        let share = num(&l7, key)? - num(&l4, key)?;
        out.push(figure(
            format!("l7.hop.{pk}"),
            format!("waypoint hop: L7 minus L4 {label}"),
            "µs",
            share,
            None,
        ));
    }
    // Every request sent, warm-up included, over the CPU of the whole run.
    let per_cpu = |run: &serde_json::Value, cpu: f64| -> Result<f64> {
        Ok(if cpu > 0.0 {
            num(run, "sent")? / cpu
        } else {
            0.0
        })
    };
    out.push(figure(
        "l7.waypoint.req_per_cpu_s".into(),
        "waypoint: requests per CPU second".into(),
        "req/CPU s",
        per_cpu(&l7, wp_cpu)?,
        None,
    ));
    out.push(figure(
        "l7.agents.waypoint.req_per_cpu_s".into(),
        "through the waypoint: requests per CPU second of both node agents".into(),
        "req/CPU s",
        per_cpu(&l7, l7_agents)?,
        None,
    ));
    out.push(figure(
        "l7.agents.l4.req_per_cpu_s".into(),
        "L4 mesh: requests per CPU second of both node agents".into(),
        "req/CPU s",
        per_cpu(&l4, l4_agents)?,
        None,
    ));
    out.push(figure(
        "l7.waypoint.rss_ready".into(),
        "waypoint RSS, ready, before the load".into(),
        "MiB",
        rss_ready,
        None,
    ));
    out.push(figure(
        "l7.waypoint.rss_after".into(),
        format!("waypoint RSS after {} requests", num(&l7, "sent")?),
        "MiB",
        rss_after,
        None,
    ));
    Ok(())
}

fn figure(
    key: String,
    name: String,
    unit: &'static str,
    value: f64,
    direct: Option<f64>,
) -> Figure {
    Figure {
        scenario: "l7",
        key,
        name,
        unit,
        value,
        direct,
    }
}

/// One `mesh-labtool http-load` run from `client` to `to` at [`RATE`]; its JSON report.
fn load(lab: &Lab, d: &Durations, client: &str, to: &str, host: &str) -> Result<serde_json::Value> {
    let mut cmd = lab.command(client, mesh_lab::labtool_bin());
    cmd.args(["http-load", "--to", to, "--host", host]);
    cmd.args(["--rate", &RATE.to_string()]);
    cmd.args(["--connections", &CONNECTIONS.to_string()]);
    cmd.args(["--secs", &d.rr_secs.to_string()]);
    cmd.args(["--warmup-secs", &d.warmup_secs.to_string()]);
    let mut child = mesh_lab::Running::spawn(&format!("http-load from {client} to {to}"), &mut cmd);
    let out = child.wait_success(std::time::Duration::from_secs(
        u64::from(d.rr_secs + d.warmup_secs) + 60,
    ));
    let line = out
        .iter()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("http-load printed no JSON: {out:?}"))?;
    let report: serde_json::Value = serde_json::from_str(line)?;
    // http-load fails the run beyond 1%; fewer failures are worth a line beside the figures.
    let ok = report["statuses"]["200"].as_f64().unwrap_or(0.0);
    if ok < num(&report, "requests")? {
        eprintln!("bench: l7: not every request from {client} to {to} was answered 200: {report}");
    }
    Ok(report)
}
