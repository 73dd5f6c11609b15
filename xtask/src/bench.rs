//! `cargo xtask bench`: performance figures measured in the lab, each beside the direct path
//! (no agent, the same kind of pods, the same run) as a ratio. Prints a markdown table and
//! writes `target/bench/results.md` and `target/bench/results.json`.
//!
//! `--quick` runs every scenario briefly (a second or two each, fewer idle connections); CI runs
//! it so that the harness cannot rot. Every run checks that every scenario produced figures and
//! that every figure is a number (a NaN or an infinity is a broken measurement), never a speed:
//! speed is judged by a human reading a full run (docs/performance.md).

mod control;
mod l7;
mod latency;
mod measure;
mod memory;
mod policy;
mod throughput;

use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Context, Result};
use mesh_lab::{Lab, LabOptions, PodSpec, Topology};
use serde::Serialize;

use crate::{
    build::{self, Profile},
    preflight,
};

/// Pods added on node n1, besides the default topology, for the memory figure with many pods.
const IDLE_PODS: usize = 100;

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Run every scenario briefly (seconds instead of tens of seconds): checks the harness, not
    /// the speed.
    #[arg(long)]
    quick: bool,
    /// Skip building (use the release binaries already in target/release, or the ones
    /// MESH_AGENT_BIN and MESH_LABTOOL_BIN name).
    #[arg(long)]
    no_build: bool,
    /// Run only these scenarios (throughput, latency, churn, policy, memory, control, l7); all
    /// by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// One figure of the report.
#[derive(Debug, Serialize)]
pub struct Figure {
    pub scenario: &'static str,
    pub name: String,
    pub unit: &'static str,
    pub value: f64,
    /// The same measurement on the direct path, when there is one.
    pub direct: Option<f64>,
}

impl Figure {
    fn ratio(&self) -> Option<f64> {
        self.direct.filter(|d| *d != 0.0).map(|d| self.value / d)
    }
}

/// How long each kind of run lasts.
#[derive(Clone, Copy, Debug)]
pub struct Durations {
    pub iperf_secs: u32,
    pub rr_secs: u32,
    pub warmup_secs: u32,
    pub idle_conns: usize,
    /// Policy changes of the policy scenario.
    pub policy_rounds: usize,
}

pub fn run(args: BenchArgs) -> Result<()> {
    preflight::ensure("cargo xtask bench", &[preflight::LAB, preflight::BENCH])?;
    if !mesh_lab::require_privileged("cargo xtask bench") {
        anyhow::bail!("the benchmarks need root (network namespaces, cgroups, eBPF)");
    }
    let bins = build::lab_bins(Profile::Release, !args.no_build)?;
    // Per-connection log lines at info, as in production (the lab's default adds debug).
    if std::env::var_os("MESH_LOG").is_none() {
        std::env::set_var("MESH_LOG", "info");
    }
    let d = if args.quick {
        Durations {
            iperf_secs: 1,
            rr_secs: 2,
            warmup_secs: 0,
            idle_conns: 1000,
            policy_rounds: 1,
        }
    } else {
        Durations {
            iperf_secs: 10,
            rr_secs: 20,
            warmup_secs: 1,
            idle_conns: 10_000,
            policy_rounds: 10,
        }
    };
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let mut figures = Vec::new();
    if wanted("control") {
        control::run(&bins.bench()?, args.quick, &mut figures).context("control path scenario")?;
    }
    if wanted("throughput") {
        throughput::crypto(&bins.bench()?, args.quick, &mut figures).context("TLS record floor")?;
    }
    let lab_scenarios = ["throughput", "latency", "churn", "policy", "memory"];
    if lab_scenarios.iter().any(|s| wanted(s)) {
        let lab = Lab::try_up(LabOptions {
            id: Some("bench".into()),
            topology: topology(),
            ..LabOptions::default()
        })?;
        // Memory first, on fresh agents: later scenarios leave freed memory in the allocator.
        if wanted("memory") {
            memory::idle(&lab, &mut figures).context("memory scenario (idle)")?;
            memory::connections(&lab, &d, &mut figures)
                .context("memory scenario (idle connections)")?;
        }
        if wanted("throughput") {
            throughput::run(&lab, &d, &mut figures).context("throughput scenario")?;
        }
        if wanted("latency") {
            latency::persistent(&lab, &d, &mut figures).context("latency scenario")?;
        }
        if wanted("churn") {
            latency::churn(&lab, &d, &mut figures).context("churn scenario")?;
        }
        if wanted("policy") {
            policy::run(&lab, d.policy_rounds, &mut figures).context("policy scenario")?;
        }
        if wanted("memory") {
            memory::after_all(&lab, &mut figures)?;
        }
        lab.try_down()?;
    }
    // Its own lab, once the main one is down (bench/l7.rs says why).
    if wanted("l7") {
        l7::run(&d, &mut figures).context("L7 scenario (through the waypoint)")?;
    }
    if lab_scenarios.iter().any(|s| wanted(s)) || wanted("l7") {
        // Leaves nothing behind, not even the empty shared lab directories.
        mesh_lab::sweep()?;
    }
    let expected: Vec<&str> = [
        "throughput",
        "latency",
        "churn",
        "policy",
        "memory",
        "control",
        "l7",
    ]
    .into_iter()
    .filter(|s| wanted(s))
    .collect();
    report(&figures, args.quick, &expected)
}

/// The default lab plus a same-node partner outside the mesh (`legacy/local`, for the same-node
/// direct path) and [`IDLE_PODS`] captured pods on n1, each with its own service account.
fn topology() -> Topology {
    let mut topology = Topology::default();
    topology.pods.push(PodSpec {
        namespace: "legacy".into(),
        name: "local".into(),
        node: "n1".into(),
        service_account: "default".into(),
        labels: [("app".to_owned(), "local".to_owned())].into(),
        capture: None,
        kubelet: None,
    });
    for i in 0..IDLE_PODS {
        topology.pods.push(PodSpec {
            namespace: "shop".into(),
            name: format!("idle-{i:03}"),
            node: "n1".into(),
            service_account: format!("idle-{i:03}"),
            labels: [("app".to_owned(), "idle".to_owned())].into(),
            capture: None,
            kubelet: None,
        });
    }
    topology
}

fn report(figures: &[Figure], quick: bool, expected: &[&str]) -> Result<()> {
    let dir = build::target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let env = measure::environment();
    let mut md = String::new();
    let _ = writeln!(md, "{env}\n");
    let _ = writeln!(
        md,
        "| scenario | measurement | value | direct | ratio |\n|---|---|---|---|---|"
    );
    for f in figures {
        let direct = f
            .direct
            .map(|d| format!("{} {}", fmt_value(d), f.unit))
            .unwrap_or_default();
        let ratio = f
            .ratio()
            .map(|r| format!("{:.0}%", r * 100.0))
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {} {} | {direct} | {ratio} |",
            f.scenario,
            f.name,
            fmt_value(f.value),
            f.unit
        );
    }
    if quick {
        md.push_str(
            "\n(--quick: runs of a second or two; for checking the harness, not for comparing figures)\n",
        );
    }
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "environment": env,
        "quick": quick,
        "figures": figures,
    }))?;
    let (json_path, md_path): (PathBuf, PathBuf) =
        (dir.join("results.json"), dir.join("results.md"));
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    println!("{md}");
    println!("written: {} and {}", md_path.display(), json_path.display());
    let problems = incomplete(figures, expected);
    anyhow::ensure!(
        problems.is_empty(),
        "the benchmarks did not measure everything: {}",
        problems.join("; ")
    );
    Ok(())
}

/// What is missing from a report: each expected scenario without figures, and each figure
/// whose value (or direct-path value) is not a finite number.
fn incomplete(figures: &[Figure], expected: &[&str]) -> Vec<String> {
    let mut problems: Vec<String> = expected
        .iter()
        .filter(|s| !figures.iter().any(|f| f.scenario == **s))
        .map(|s| format!("{s}: no figures"))
        .collect();
    for f in figures {
        if !f.value.is_finite() || f.direct.is_some_and(|d| !d.is_finite()) {
            let direct = f
                .direct
                .map(|d| format!(" (direct {d})"))
                .unwrap_or_default();
            problems.push(format!("{}: {} is {}{direct}", f.scenario, f.name, f.value));
        }
    }
    problems
}

/// Three significant digits, without a fraction for large values.
fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(scenario: &'static str, value: f64, direct: Option<f64>) -> Figure {
        Figure {
            scenario,
            name: format!("{scenario} figure"),
            unit: "ms",
            value,
            direct,
        }
    }

    #[test]
    fn every_figure_of_every_scenario_must_be_a_number() {
        let good = [
            figure("latency", 1.0, Some(2.0)),
            figure("churn", -3.0, None),
        ];
        assert!(incomplete(&good, &["latency", "churn"]).is_empty());
        assert_eq!(
            incomplete(&good, &["latency", "churn", "memory"]),
            ["memory: no figures"]
        );
        let bad = [
            figure("latency", 1.0, Some(2.0)),
            figure("latency", f64::NAN, Some(2.0)),
            figure("churn", 3.0, Some(f64::INFINITY)),
        ];
        assert_eq!(
            incomplete(&bad, &["latency", "churn"]),
            [
                "latency: latency figure is NaN (direct 2)",
                "churn: churn figure is 3 (direct inf)"
            ]
        );
    }
}
