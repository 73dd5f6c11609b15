//! `cargo xtask bench`: performance figures measured in the lab, each beside the direct path
//! (no agent, the same kind of pods, the same run) as a ratio. Prints a markdown table and
//! writes `target/bench/results.md`, `target/bench/results.json` (every figure with a stable
//! key, bench/results.rs) and SVG plots beside them (bench/plot.rs).
//!
//! `--compare OLD.json` compares two runs figure by figure (bench/compare.rs); `--render-docs`
//! renders a full run's tables and plots into docs/performance.md (bench/render.rs).
//!
//! `--quick` runs every scenario briefly (a second or two each, fewer idle connections); CI runs
//! it so that the harness cannot rot. Every run checks that every scenario produced figures and
//! that every figure is a number (a NaN or an infinity is a broken measurement), never a speed:
//! speed is judged by a human reading a full run (docs/performance.md).

mod compare;
mod control;
mod l7;
mod latency;
mod measure;
mod memory;
mod plot;
mod policy;
mod render;
mod results;
mod sockperf;
mod throughput;

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use mesh_lab::{Lab, LabOptions, PodSpec, Topology};
use results::{Results, Saved};

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
    /// Compare with an earlier results.json, figure by figure: after this run, or with
    /// --no-run, NEW.json (by default target/bench/results.json) without running anything.
    #[arg(long, num_args = 1..=2, value_names = ["OLD.json", "NEW.json"])]
    compare: Vec<PathBuf>,
    /// Measure nothing: only --compare.
    #[arg(long, requires = "compare")]
    no_run: bool,
    /// Measure nothing: render the figure tables of docs/performance.md (between its
    /// `bench:begin latest` and `bench:end latest` markers) and the plots of docs/figures/ from a
    /// full run's results (by default target/bench/results.json). Refuses a --quick run.
    #[arg(
        long,
        value_name = "RESULTS.json",
        num_args = 0..=1,
        conflicts_with_all = ["quick", "only", "compare", "no_run"]
    )]
    render_docs: Option<Option<PathBuf>>,
}

/// Percentile curves, `[percentile, µs]` from p50 up, by path (`latency.1000.mesh`).
pub type Curves = BTreeMap<String, Vec<[f64; 2]>>;

/// One figure of the report.
#[derive(Debug)]
pub struct Figure {
    pub scenario: &'static str,
    /// Stable machine key (`latency.1000.mesh.p99`), the same from run to run: `--compare`
    /// matches figures by it. Unique within a run.
    pub key: String,
    /// For humans; may change (it carries counts and scales).
    pub name: String,
    pub unit: &'static str,
    pub value: f64,
    /// The same measurement on the direct path, when there is one.
    pub direct: Option<f64>,
}

/// How long each kind of run lasts.
#[derive(Clone, Copy, Debug)]
pub struct Durations {
    pub iperf_secs: u32,
    pub rr_secs: u32,
    pub warmup_secs: u32,
    pub idle_conns: usize,
    /// How long after the idle connections closed the memory scenario reads the full mesh's
    /// agent RSS again (the performance issue's "two minutes after the burst").
    pub settle_secs: u64,
    /// Policy changes of the policy scenario.
    pub policy_rounds: usize,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(path) = args.render_docs {
        return render::docs(&path.unwrap_or_else(results_path));
    }
    if args.compare.len() > 1 && !args.no_run {
        bail!(
            "--compare OLD.json NEW.json compares two files without running: add --no-run, or \
             give only OLD.json to compare this run with it"
        );
    }
    // Read before the run: OLD may be the results.json this run overwrites.
    let old = match args.compare.first() {
        Some(path) => Some((Results::load(path)?, path.display().to_string())),
        None => None,
    };
    if args.no_run {
        let new_path = args.compare.get(1).cloned().unwrap_or_else(results_path);
        let new = Results::load(&new_path)?;
        if let Some((old, old_name)) = &old {
            print!(
                "{}",
                compare::compare(old, old_name, &new, &new_path.display().to_string())
            );
        }
        return Ok(());
    }
    preflight::ensure("cargo xtask bench", &[preflight::LAB, preflight::BENCH])?;
    if !mesh_lab::require_privileged("cargo xtask bench") {
        anyhow::bail!("the benchmarks need root (network namespaces, cgroups, eBPF)");
    }
    // The release build: about 2 GiB from scratch.
    preflight::disk_space("cargo xtask bench", 3);
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
            settle_secs: 5,
            policy_rounds: 1,
        }
    } else {
        Durations {
            iperf_secs: 10,
            rr_secs: 20,
            warmup_secs: 1,
            idle_conns: 10_000,
            settle_secs: 120,
            policy_rounds: 10,
        }
    };
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let mut figures = Vec::new();
    let mut curves = Curves::new();
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
            latency::persistent(&lab, &d, &mut figures, &mut curves).context("latency scenario")?;
            sockperf::run(&lab, &d, &mut figures, &mut curves)
                .context("latency scenario (sockperf)")?;
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
    let results = Results {
        environment: measure::environment(),
        commit: measure::commit(),
        date: measure::date(),
        quick: args.quick,
        scenarios: expected.iter().map(|s| (*s).to_owned()).collect(),
        figures: figures.iter().map(Saved::from).collect(),
        curves,
    };
    write(&results)?;
    if let Some((old, old_name)) = &old {
        let new_name = results_path().display().to_string();
        print!("{}", compare::compare(old, old_name, &results, &new_name));
    }
    let problems = incomplete(&figures, &expected);
    anyhow::ensure!(
        problems.is_empty(),
        "the benchmarks did not measure everything: {}",
        problems.join("; ")
    );
    Ok(())
}

/// target/bench/results.json.
fn results_path() -> PathBuf {
    build::target_dir().join("bench").join("results.json")
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

/// Writes results.json, results.md and the plots to target/bench and prints the table.
fn write(results: &Results) -> Result<()> {
    let json_path = results_path();
    let dir = json_path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{}
",
        results.environment
    );
    let _ = writeln!(
        md,
        "| scenario | measurement | value | direct | ratio |\n|---|---|---|---|---|"
    );
    for f in &results.figures {
        let (direct, ratio) = (f.direct_cell(), f.ratio_cell());
        let _ = writeln!(
            md,
            "| {} | {} | {} {} | {direct} | {ratio} |",
            f.scenario,
            f.name,
            fmt_value(f.value),
            f.unit
        );
    }
    if results.quick {
        md.push_str(
            "\n(--quick: runs of a second or two; for checking the harness, not for comparing figures)\n",
        );
    }
    let md_path = dir.join("results.md");
    let json = serde_json::to_string_pretty(results)?;
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    println!("{md}");
    println!("written: {} and {}", md_path.display(), json_path.display());
    let plots = plot::plots(results);
    for name in plot::FILES {
        let path = dir.join(name);
        match plots.iter().find(|(n, _)| *n == name) {
            Some((_, svg)) => {
                std::fs::write(&path, svg)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("written: {}", path.display());
            }
            // A plot of an earlier run would sit beside results it does not show.
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()));
                }
                _ => {}
            },
        }
    }
    Ok(())
}

/// What is missing from a report: each expected scenario without figures, each figure whose
/// value (or direct-path value) is not a finite number, and each key given to two figures.
fn incomplete(figures: &[Figure], expected: &[&str]) -> Vec<String> {
    let mut problems: Vec<String> = expected
        .iter()
        .filter(|s| !figures.iter().any(|f| f.scenario == **s))
        .map(|s| format!("{s}: no figures"))
        .collect();
    let mut keys = HashSet::new();
    for f in figures {
        if !keys.insert(&f.key) {
            problems.push(format!("{}: key {} is not unique", f.scenario, f.key));
        }
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
            key: format!("{scenario}.{value}"),
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
            figure("churn", 3.0, None),
        ];
        assert_eq!(
            incomplete(&bad, &["latency", "churn"]),
            [
                "latency: latency figure is NaN (direct 2)",
                "churn: churn figure is 3 (direct inf)",
                "churn: key churn.3 is not unique"
            ]
        );
    }
}
