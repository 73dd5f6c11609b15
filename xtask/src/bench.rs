//! `cargo xtask bench`: performance figures measured in the lab, each beside the direct path
//! (no agent, same kind of pods, same run) as a ratio. Prints a markdown table and writes
//! `target/bench/results.json` and `target/bench/results.md`. `--quick` runs every scenario
//! briefly (CI runs it so the harness cannot rot; it checks that figures exist, never a speed).

mod measure;

use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Context, Result};
use mesh_lab::{Lab, LabOptions, PodSpec, Topology};
use serde::Serialize;

use crate::build;

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Run every scenario briefly (seconds instead of tens of seconds).
    #[arg(long)]
    quick: bool,
    /// Skip building (use the release binaries already in target/release).
    #[arg(long)]
    no_build: bool,
}

/// One figure of the report.
#[derive(Debug, Serialize)]
struct Figure {
    scenario: &'static str,
    name: String,
    unit: &'static str,
    value: f64,
    /// The same measurement on the direct path, when there is one.
    direct: Option<f64>,
}

impl Figure {
    fn ratio(&self) -> Option<f64> {
        self.direct.filter(|d| *d != 0.0).map(|d| self.value / d)
    }
}

struct Durations {
    iperf_secs: u32,
    rr_secs: f64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !args.no_build {
        build::all()?;
    }
    let target = build::root().join("target/release");
    // The lab finds the binaries through these variables (xtask has no other threads).
    std::env::set_var("MESH_AGENT_BIN", target.join("mesh-agent"));
    std::env::set_var("MESH_LABTOOL_BIN", target.join("mesh-labtool"));
    if !mesh_lab::require_privileged("cargo xtask bench") {
        anyhow::bail!("the benchmarks need root (network namespaces, cgroups, eBPF)");
    }
    let d = if args.quick {
        Durations {
            iperf_secs: 1,
            rr_secs: 2.0,
        }
    } else {
        Durations {
            iperf_secs: 10,
            rr_secs: 20.0,
        }
    };
    let mut topology = Topology::default();
    // A same-node partner outside the mesh, for the same-node direct path.
    topology.pods.push(PodSpec {
        namespace: "legacy".into(),
        name: "local".into(),
        node: "n1".into(),
        service_account: "default".into(),
        labels: [("app".to_owned(), "local".to_owned())].into(),
        capture: None,
    });
    let lab = Lab::try_up(LabOptions {
        id: Some("bench".into()),
        topology,
        ..LabOptions::default()
    })?;
    let mut figures = Vec::new();
    for node in ["n1", "n2"] {
        figures.push(Figure {
            scenario: "cost",
            name: format!("agent {node} RSS, idle (3 and 2 captured pods)"),
            unit: "MiB",
            value: measure::agent_rss_mib(&lab, node)?,
            direct: None,
        });
    }
    throughput(&lab, &d, &mut figures).context("throughput scenario")?;
    latency(&lab, &d, &mut figures).context("latency scenario")?;
    churn(&lab, &d, &mut figures).context("churn scenario")?;
    lab.try_down()?;
    report(&figures, args.quick)
}

fn ip(lab: &Lab, pod: &str) -> String {
    lab.pod(pod).ip.to_string()
}

/// Scenario 1: iperf3, one and four streams, direct / capture-only passthrough / full mesh.
fn throughput(lab: &Lab, d: &Durations, out: &mut Vec<Figure>) -> Result<()> {
    let _servers: Vec<_> = ["legacy/server", "legacy/local", "shop/api", "shop/db"]
        .iter()
        .map(|p| measure::iperf_server(lab, p))
        .collect();
    let paths = [
        (
            "cross-node",
            "legacy/client",
            ip(lab, "legacy/server"),
            vec![
                (
                    "capture-only passthrough (plain TCP through the client's agent)",
                    "shop/client",
                    ip(lab, "legacy/server"),
                ),
                (
                    "full mesh (capture + HBONE mTLS + remote agent)",
                    "shop/client",
                    ip(lab, "shop/api"),
                ),
            ],
        ),
        (
            "same-node",
            "legacy/client",
            ip(lab, "legacy/local"),
            vec![(
                "full mesh (capture + HBONE mTLS, one agent both ends)",
                "shop/client",
                ip(lab, "shop/db"),
            )],
        ),
    ];
    for streams in [1, 4] {
        for (place, direct_client, direct_addr, meshed) in &paths {
            let (direct_bps, _) =
                measure::iperf(lab, direct_client, direct_addr, streams, d.iperf_secs)?;
            out.push(Figure {
                scenario: "throughput",
                name: format!("{place}, {streams} stream(s): direct"),
                unit: "Gbit/s",
                value: direct_bps / 1e9,
                direct: None,
            });
            for (what, client, addr) in meshed {
                let cpu0 = measure::agents_cpu(lab)?;
                let (bps, bytes) = measure::iperf(lab, client, addr, streams, d.iperf_secs)?;
                let cpu = measure::agents_cpu(lab)? - cpu0;
                out.push(Figure {
                    scenario: "throughput",
                    name: format!("{place}, {streams} stream(s): {what}"),
                    unit: "Gbit/s",
                    value: bps / 1e9,
                    direct: Some(direct_bps / 1e9),
                });
                out.push(Figure {
                    scenario: "cost",
                    name: format!("agent CPU per GiB, {place}, {streams} stream(s): {what}"),
                    unit: "CPU s/GiB",
                    value: cpu / (bytes / f64::from(1u32 << 30)),
                    direct: None,
                });
            }
        }
    }
    Ok(())
}

/// Scenario 2: 1 KiB request/response on four persistent connections, open loop.
fn latency(lab: &Lab, d: &Durations, out: &mut Vec<Figure>) -> Result<()> {
    let _s1 = mesh_lab::traffic::serve(lab, "legacy/server", 7000);
    let _s2 = mesh_lab::traffic::serve(lab, "shop/api", 7000);
    let (direct_addr, mesh_addr) = (
        format!("{}:7000", ip(lab, "legacy/server")),
        format!("{}:7000", ip(lab, "shop/api")),
    );
    for rate in [1000, 5000] {
        let direct = measure::rr(lab, "legacy/client", &direct_addr, rate, d.rr_secs, false)?;
        let cpu0 = measure::agents_cpu(lab)?;
        let mesh = measure::rr(lab, "shop/client", &mesh_addr, rate, d.rr_secs, false)?;
        let cpu = measure::agents_cpu(lab)? - cpu0;
        for p in ["p50", "p90", "p99", "p999"] {
            let key = format!("{p}_us");
            let (m, dv) = (num(&mesh, &key)?, num(&direct, &key)?);
            out.push(Figure {
                scenario: "latency",
                name: format!("{rate}/s cross-node mesh, {p} round trip"),
                unit: "µs",
                value: m,
                direct: Some(dv),
            });
            out.push(Figure {
                scenario: "latency",
                name: format!("{rate}/s latency added by the mesh, {p}"),
                unit: "µs",
                value: m - dv,
                direct: None,
            });
        }
        out.push(Figure {
            scenario: "cost",
            name: format!("agent CPU per 1000 requests at {rate}/s (both agents)"),
            unit: "CPU ms",
            value: cpu * 1000.0 / (num(&mesh, "requests")? / 1000.0),
            direct: None,
        });
    }
    Ok(())
}

/// Scenario 3: a new connection per request, at a fixed rate and at the maximum.
fn churn(lab: &Lab, d: &Durations, out: &mut Vec<Figure>) -> Result<()> {
    let _s1 = mesh_lab::traffic::serve(lab, "legacy/server", 7001);
    let _s2 = mesh_lab::traffic::serve(lab, "shop/api", 7001);
    let (direct_addr, mesh_addr) = (
        format!("{}:7001", ip(lab, "legacy/server")),
        format!("{}:7001", ip(lab, "shop/api")),
    );
    for (label, rate) in [("1000/s", 1000), ("max", 0)] {
        let direct = measure::rr(lab, "legacy/client", &direct_addr, rate, d.rr_secs, true)?;
        let cpu0 = measure::agents_cpu(lab)?;
        let mesh = measure::rr(lab, "shop/client", &mesh_addr, rate, d.rr_secs, true)?;
        let cpu = measure::agents_cpu(lab)? - cpu0;
        let conns = num(&mesh, "requests")?;
        out.push(Figure {
            scenario: "churn",
            name: format!("{label}: new connections per second, mesh"),
            unit: "conn/s",
            value: num(&mesh, "achieved_rate")?,
            direct: Some(num(&direct, "achieved_rate")?),
        });
        for p in ["p50", "p99"] {
            let key = format!("connect_{p}_us");
            out.push(Figure {
                scenario: "churn",
                name: format!("{label}: connection setup {p}"),
                unit: "µs",
                value: num(&mesh, &key)?,
                direct: Some(num(&direct, &key)?),
            });
            let key = format!("{p}_us");
            out.push(Figure {
                scenario: "churn",
                name: format!("{label}: connect + 1 KiB round trip {p}"),
                unit: "µs",
                value: num(&mesh, &key)?,
                direct: Some(num(&direct, &key)?),
            });
        }
        out.push(Figure {
            scenario: "churn",
            name: format!("{label}: agent CPU per 1000 new connections (both agents)"),
            unit: "CPU ms",
            value: cpu * 1000.0 / (conns / 1000.0),
            direct: None,
        });
        out.push(Figure {
            scenario: "churn",
            name: format!("{label}: new meshed connections per second per core of agent CPU"),
            unit: "conn/s/core",
            value: if cpu > 0.0 { conns / cpu } else { 0.0 },
            direct: None,
        });
    }
    Ok(())
}

fn num(v: &serde_json::Value, key: &str) -> Result<f64> {
    v[key].as_f64().with_context(|| format!("no {key} in {v}"))
}

fn report(figures: &[Figure], quick: bool) -> Result<()> {
    let dir = build::root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| scenario | measurement | value | direct | ratio |\n|---|---|---|---|---|"
    );
    for f in figures {
        let direct = f
            .direct
            .map(|d| format!("{d:.2} {}", f.unit))
            .unwrap_or_default();
        let ratio = f
            .ratio()
            .map(|r| format!("{:.0}%", r * 100.0))
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} {} | {direct} | {ratio} |",
            f.scenario, f.name, f.value, f.unit
        );
    }
    if quick {
        md.push_str(
            "\n(--quick: runs of a second or two; for the harness, not for comparing figures)\n",
        );
    }
    let json =
        serde_json::to_string_pretty(&serde_json::json!({ "quick": quick, "figures": figures }))?;
    let (json_path, md_path): (PathBuf, PathBuf) =
        (dir.join("results.json"), dir.join("results.md"));
    std::fs::write(&json_path, json)?;
    std::fs::write(&md_path, &md)?;
    println!("{md}");
    println!("written: {} and {}", md_path.display(), json_path.display());
    let missing: Vec<&str> = ["throughput", "latency", "churn", "cost"]
        .into_iter()
        .filter(|s| {
            !figures
                .iter()
                .any(|f| f.scenario == *s && f.value.is_finite())
        })
        .collect();
    anyhow::ensure!(missing.is_empty(), "scenarios without figures: {missing:?}");
    Ok(())
}
