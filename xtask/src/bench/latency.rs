//! Scenarios 2 and 3: request/response latency on persistent connections at fixed rates, and
//! connection churn (a new connection per request) at a fixed rate and at the maximum. The load
//! generator is `mesh-labtool rr`: open loop, corrected for coordinated omission. sockperf, a
//! load generator users know, measures the same paths beside it (bench/sockperf.rs).

use anyhow::{bail, Context, Result};
use mesh_lab::Lab;

use super::{
    measure::{self, agents_cpu, num, RrRun},
    Curves, Durations, Figure,
};

/// Echo servers of these scenarios listen here.
const PORT: u16 = 7000;
/// Percentiles of the figures: label, key in rr's report, key of the figure.
pub(super) const PERCENTILES: [(&str, &str, &str); 4] = [
    ("p50", "p50_us", "p50"),
    ("p90", "p90_us", "p90"),
    ("p99", "p99_us", "p99"),
    ("p99.9", "p999_us", "p999"),
];

/// The three paths, from the same client node to the same server node.
pub(super) struct Paths {
    pub direct: (&'static str, String),
    pub passthrough: (&'static str, String),
    pub mesh: (&'static str, String),
}

/// The paths to servers listening on `port` (rr's echo servers on [`PORT`]).
pub(super) fn paths(lab: &Lab, port: u16) -> Paths {
    let addr = |pod: &str| format!("{}:{port}", lab.pod(pod).ip);
    Paths {
        direct: ("legacy/client", addr("legacy/server")),
        passthrough: ("shop/client", addr("legacy/server")),
        mesh: ("shop/client", addr("shop/api")),
    }
}

/// One rr run from `path`'s client to its address.
fn rr(
    lab: &Lab,
    d: &Durations,
    (client, addr): &(&str, String),
    rate: u32,
    new_conn: bool,
) -> Result<serde_json::Value> {
    measure::rr(
        lab,
        RrRun {
            client,
            addr,
            rate,
            secs: d.rr_secs,
            warmup_secs: d.warmup_secs,
            new_conn,
        },
    )
}

/// Two figures of one percentile: the full mesh's round trip beside the direct path's
/// (`<prefix>.mesh.<pk>`), and the latency the mesh adds (`<prefix>.mesh_added.<pk>`), named
/// by `names` in that order.
pub(super) fn mesh_and_added(
    out: &mut Vec<Figure>,
    prefix: &str,
    [name, added]: [String; 2],
    pk: &str,
    (mesh, direct): (f64, f64),
) {
    out.push(Figure {
        scenario: "latency",
        key: format!("{prefix}.mesh.{pk}"),
        name,
        unit: "µs",
        value: mesh,
        direct: Some(direct),
    });
    out.push(Figure {
        scenario: "latency",
        key: format!("{prefix}.mesh_added.{pk}"),
        name: added,
        unit: "µs",
        value: mesh - direct,
        direct: None,
    });
}

/// 1 KiB request/response on four persistent connections at 1000/s and 5000/s; each path's
/// percentile curve goes to `curves` as `latency.<rate>.<path>`.
pub fn persistent(
    lab: &Lab,
    d: &Durations,
    out: &mut Vec<Figure>,
    curves: &mut Curves,
) -> Result<()> {
    let _servers = [
        mesh_lab::traffic::serve(lab, "legacy/server", PORT),
        mesh_lab::traffic::serve(lab, "shop/api", PORT),
    ];
    let p = paths(lab, PORT);
    for rate in [1000, 5000] {
        let run = |path: &(&str, String)| rr(lab, d, path, rate, false);
        let direct = run(&p.direct)?;
        let passthrough = run(&p.passthrough)?;
        let cpu0 = agents_cpu(lab)?;
        let mesh = run(&p.mesh)?;
        let cpu = agents_cpu(lab)? - cpu0;
        for (path, report) in [
            ("direct", &direct),
            ("passthrough", &passthrough),
            ("mesh", &mesh),
        ] {
            curves.insert(format!("latency.{rate}.{path}"), curve(report)?);
        }
        for (label, key, pk) in PERCENTILES {
            mesh_and_added(
                out,
                &format!("latency.{rate}"),
                [
                    format!("{rate}/s, full mesh round trip {label}"),
                    format!("{rate}/s, latency added by the mesh {label}"),
                ],
                pk,
                (num(&mesh, key)?, num(&direct, key)?),
            );
        }
        for (label, key, pk) in [PERCENTILES[0], PERCENTILES[2]] {
            let (pt, dv) = (num(&passthrough, key)?, num(&direct, key)?);
            out.push(Figure {
                scenario: "latency",
                key: format!("latency.{rate}.passthrough.{pk}"),
                name: format!("{rate}/s, capture-only passthrough round trip {label}"),
                unit: "µs",
                value: pt,
                direct: Some(dv),
            });
            // One agent that only splices: what a single agent hop costs on this machine
            // before any TLS or HTTP/2 (the full mesh has two agents on the path).
            out.push(Figure {
                scenario: "latency",
                key: format!("latency.{rate}.passthrough_added.{pk}"),
                name: format!("{rate}/s, latency added by one passthrough agent {label}"),
                unit: "µs",
                value: pt - dv,
                direct: None,
            });
        }
        out.push(Figure {
            scenario: "latency",
            key: format!("latency.{rate}.mesh.agent_cpu_per_1000_requests"),
            name: format!("{rate}/s, full mesh: agent CPU per 1000 requests (both agents)"),
            unit: "CPU ms",
            value: cpu * 1000.0 / (num(&mesh, "requests")? / 1000.0),
            direct: None,
        });
    }
    Ok(())
}

/// A new connection per 1 KiB request/response, at 1000/s and as fast as four workers go.
pub fn churn(lab: &Lab, d: &Durations, out: &mut Vec<Figure>) -> Result<()> {
    let _servers = [
        mesh_lab::traffic::serve(lab, "legacy/server", PORT),
        mesh_lab::traffic::serve(lab, "shop/api", PORT),
    ];
    // The clients, as the direct path needs (each closes first, so its TIME_WAIT is its own);
    // shop/client for the passthrough, whose agent connects from the pod's address. Not the
    // servers: the destination agent connects to the application from the client's address,
    // bound to the pod's `lo`, where the kernel's default tcp_tw_reuse=2 reuses its TIME_WAIT
    // ports (docs/performance.md, "Connection churn and TIME_WAIT").
    for pod in ["legacy/client", "shop/client"] {
        measure::tune_ports(lab, pod)?;
    }
    let p = paths(lab, PORT);
    for (label, rate) in [("1000/s", 1000), ("max", 0)] {
        let run = |path: &(&str, String)| rr(lab, d, path, rate, true);
        let rk = if rate == 0 {
            "max".to_owned()
        } else {
            rate.to_string()
        };
        let key = |what: &str| format!("churn.{rk}.{what}");
        let direct = run(&p.direct)?;
        // One agent that accepts, connects and splices, no TLS or HTTP/2: the per-connection
        // floor of one agent on this machine (the full mesh has two on each connection).
        let cpu0 = agents_cpu(lab)?;
        let passthrough = run(&p.passthrough)?;
        let cpu = agents_cpu(lab)? - cpu0;
        let conns = num(&passthrough, "requests")?;
        out.push(Figure {
            scenario: "churn",
            key: key("passthrough.conn_per_s"),
            name: format!("{label}: new connections per second, capture-only passthrough"),
            unit: "conn/s",
            value: num(&passthrough, "achieved_rate")?,
            direct: Some(num(&direct, "achieved_rate")?),
        });
        out.push(Figure {
            scenario: "churn",
            key: key("passthrough.agent_cpu_per_1000_conns"),
            name: format!(
                "{label}: capture-only passthrough: agent CPU per 1000 new connections (one agent)"
            ),
            unit: "CPU ms",
            value: cpu * 1000.0 / (conns / 1000.0),
            direct: None,
        });
        let cpu0 = agents_cpu(lab)?;
        let mesh = run(&p.mesh)?;
        let cpu = agents_cpu(lab)? - cpu0;
        let conns = num(&mesh, "requests")?;
        out.push(Figure {
            scenario: "churn",
            key: key("mesh.conn_per_s"),
            name: format!("{label}: new connections per second, full mesh"),
            unit: "conn/s",
            value: num(&mesh, "achieved_rate")?,
            direct: Some(num(&direct, "achieved_rate")?),
        });
        for (pl, rr_key, pk) in [PERCENTILES[0], PERCENTILES[2]] {
            out.push(Figure {
                scenario: "churn",
                key: key(&format!("mesh.connect.{pk}")),
                name: format!("{label}: connection setup {pl}"),
                unit: "µs",
                value: num(&mesh, &format!("connect_{rr_key}"))?,
                direct: Some(num(&direct, &format!("connect_{rr_key}"))?),
            });
            out.push(Figure {
                scenario: "churn",
                key: key(&format!("mesh.round_trip.{pk}")),
                name: format!("{label}: connect + 1 KiB round trip {pl}"),
                unit: "µs",
                value: num(&mesh, rr_key)?,
                direct: Some(num(&direct, rr_key)?),
            });
        }
        out.push(Figure {
            scenario: "churn",
            key: key("mesh.agent_cpu_per_1000_conns"),
            name: format!("{label}: agent CPU per 1000 new connections (both agents)"),
            unit: "CPU ms",
            value: cpu * 1000.0 / (conns / 1000.0),
            direct: None,
        });
        out.push(Figure {
            scenario: "churn",
            key: key("mesh.conn_per_agent_cpu_s"),
            name: format!("{label}: new meshed connections per second per core of agent CPU"),
            unit: "conn/s",
            value: if cpu > 0.0 { conns / cpu } else { 0.0 },
            direct: None,
        });
    }
    Ok(())
}

/// The `curve` of an rr report: `[percentile, µs]` pairs.
fn curve(report: &serde_json::Value) -> Result<Vec<[f64; 2]>> {
    let points = report["curve"]
        .as_array()
        .with_context(|| format!("no curve in rr's report (an older mesh-labtool?): {report}"))?;
    points
        .iter()
        .map(|point| match (point[0].as_f64(), point[1].as_f64()) {
            (Some(p), Some(us)) => Ok([p, us]),
            _ => bail!("a point of rr's curve is not [percentile, µs]: {point}"),
        })
        .collect()
}
