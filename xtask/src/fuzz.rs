//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` (libFuzzer), one at a time, each
//! for a stated time, and says per target how many inputs it ran, how large its corpus grew and
//! whether it found a failure (naming the input that shows it).
//!
//! Each target starts from its seeds (`fuzz/corpus/<target>`, kept small and in git) and from
//! what earlier runs found (`<target dir>/fuzz-corpus/<target>`, where new inputs are written,
//! so the seeds stay as committed). The targets build with nightly, optimised, with debug
//! assertions and overflow checks, and without a sanitizer: the code they drive is safe Rust,
//! whose memory errors are panics already, and a sanitizer would halve the inputs per second.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _};

use crate::build::{self, root, run};

/// cargo-fuzz, installed when missing: the newest release, which builds with the stable
/// toolchain here.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The targets, in the order they run (each is `fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: [&str; 6] = [
    "record_reader",
    "connect_request",
    "state_file",
    "policy",
    "kube_objects",
    "request_target",
];

/// What `cargo fuzz build` and `run` are given: see the module documentation.
const BUILD_FLAGS: [&str; 4] = ["--release", "--debug-assertions", "--sanitizer", "none"];

#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 600)]
    time: u64,
    /// Run only this target (repeatable); default: all of them.
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
}

/// What one target's run came to.
#[derive(Debug)]
struct Report {
    target: String,
    runs: Option<u64>,
    corpus: Option<u64>,
    seconds: f64,
    outcome: Outcome,
}

#[derive(Debug)]
enum Outcome {
    Clean,
    /// libFuzzer stopped on a failing input, written there.
    Failed {
        artifact: Option<PathBuf>,
    },
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
        write!(
            f,
            "{:<16} {:>12} runs in {:>5.0} s, corpus {:>6} inputs: ",
            self.target,
            count(self.runs),
            self.seconds,
            count(self.corpus)
        )?;
        match &self.outcome {
            Outcome::Clean => f.write_str("clean"),
            Outcome::Failed {
                artifact: Some(path),
            } => write!(f, "FAILED, input in {}", path.display()),
            Outcome::Failed { artifact: None } => {
                f.write_str("FAILED (no input written; see the log)")
            }
        }
    }
}

pub fn run_targets(args: FuzzArgs) -> anyhow::Result<()> {
    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        args.targets
    };
    if let Some(unknown) = targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        bail!(
            "no fuzz target {unknown}: the targets are {}",
            TARGETS.join(", ")
        );
    }
    if args.time == 0 {
        bail!("--time must be at least 1 second");
    }
    ensure_cargo_fuzz()?;
    // mesh-agent's build script embeds the eBPF object, which the targets link with the rest.
    if !build::ebpf_object().is_file() {
        build::ebpf()?;
    }
    let root = root();
    let started = Instant::now();
    eprintln!("xtask: building the fuzz targets (nightly, optimised, debug assertions)");
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["+nightly", "fuzz", "build"])
        .args(BUILD_FLAGS))?;
    eprintln!(
        "xtask: fuzz targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let work = build::target_dir().join("fuzz-corpus");
    let logs = build::target_dir().join("fuzz-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut reports = Vec::new();
    for target in &targets {
        let report = fuzz(&root, target, args.time, &work.join(target), &logs)?;
        eprintln!("xtask: {report}");
        reports.push(report);
    }
    eprintln!("\nxtask: fuzzing, {} s per target:", args.time);
    for report in &reports {
        eprintln!("  {report}");
    }
    let failed: Vec<&Report> = reports
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed { .. }))
        .collect();
    if !failed.is_empty() {
        let named: Vec<String> = failed.iter().map(|r| r.to_string()).collect();
        bail!(
            "fuzzing found failures (reproduce with `cargo +nightly fuzz run {} <target> \
             <input>`; logs in {}):\n  {}",
            BUILD_FLAGS.join(" "),
            logs.display(),
            named.join("\n  ")
        );
    }
    eprintln!("xtask: every target ran clean");
    Ok(())
}

/// Installs cargo-fuzz if `cargo fuzz` is missing.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("installing cargo-fuzz failed: it needs network access to crates.io")
}

/// Runs one target for `seconds`, its output in `<logs>/<target>.log`.
fn fuzz(
    root: &Path,
    target: &str,
    seconds: u64,
    work: &Path,
    logs: &Path,
) -> anyhow::Result<Report> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let seeds = root.join("fuzz/corpus").join(target);
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    eprintln!(
        "\nxtask: == fuzzing {target} for {seconds} s (log: {}) ==",
        log_path.display()
    );
    let started = Instant::now();
    let status = Command::new("cargo")
        .current_dir(root)
        .args(["+nightly", "fuzz", "run"])
        .args(BUILD_FLAGS)
        .arg(target)
        // New inputs go to the first directory; the seeds are only read.
        .arg(work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // An input that takes this long is reported as a failure (a hang), not waited on.
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("cannot start cargo fuzz run {target}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log_path)
        .with_context(|| format!("reading {}", log_path.display()))?;
    let outcome = if status.success() {
        Outcome::Clean
    } else {
        // Show why: the end of the log has the panic and the input's path.
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        for line in tail.iter().rev() {
            eprintln!("  | {line}");
        }
        Outcome::Failed {
            artifact: artifact(&text).map(|p| root.join("fuzz").join(p)),
        }
    };
    Ok(Report {
        target: target.to_owned(),
        runs: stat(&text, "stat::number_of_executed_units:").or_else(|| last_count(&text)),
        corpus: corpus_size(&text),
        seconds,
        outcome,
    })
}

/// A number libFuzzer prints in its final statistics (`stat::name: N`).
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|n| n.trim().parse().ok())
}

/// The input count of libFuzzer's last status line (`#N ...`), when it stopped before its
/// final statistics.
fn last_count(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix('#'))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The corpus size in libFuzzer's last status line (`... corp: N/SIZEb ...`).
fn corpus_size(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.split_once(" corp: "))
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
}

/// Where libFuzzer wrote the failing input (`Test unit written to PATH`), relative to the
/// fuzz directory (cargo fuzz runs it there).
fn artifact(log: &str) -> Option<PathBuf> {
    log.lines()
        .rev()
        .find_map(|l| l.split_once("Test unit written to "))
        .map(|(_, path)| PathBuf::from(path.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
#524288\tpulse  cov: 1602 ft: 5000 corp: 312/41Kb lim: 4096 exec/s: 8738 rss: 120Mb
#600123\tDONE   cov: 1610 ft: 5012 corp: 318/42Kb lim: 4096 exec/s: 1000 rss: 121Mb
Done 600123 runs in 601 second(s)
stat::number_of_executed_units: 600123
stat::average_exec_per_sec:     998
";

    #[test]
    fn reads_libfuzzer_statistics() {
        assert_eq!(stat(LOG, "stat::number_of_executed_units:"), Some(600_123));
        assert_eq!(corpus_size(LOG), Some(318));
        assert_eq!(last_count(LOG), Some(600_123));
        let crash = "thread panicked\n==1== ERROR: libFuzzer: deadly signal\n\
            artifact_prefix='/w/fuzz/artifacts/policy/'; Test unit written to \
            /w/fuzz/artifacts/policy/crash-ab12\nBase64: AAE=\n";
        assert_eq!(
            artifact(crash),
            Some(PathBuf::from("/w/fuzz/artifacts/policy/crash-ab12"))
        );
        assert_eq!(artifact(LOG), None);
    }
}
