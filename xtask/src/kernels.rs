//! `cargo xtask kernels`: the eBPF data path on the kernels users run. Each kernel of the matrix
//! (kernels/catalog.rs) is fetched from its distribution's apt archive, booted under qemu with
//! an initramfs carrying the agent and the test binaries (kernels/initramfs.rs), and runs
//! `mesh-agent check` then the chosen end-to-end suites (kernels/guest.rs). One table says how
//! each did; everything a guest printed stays under `target/kernels/<kernel>/`.
//!
//! The run fails when a kernel does not do what the matrix expects of it: a supported kernel
//! whose check or a suite fails, or a kernel below the floor that `mesh-agent check` does not
//! refuse with the expected reason (the floor the README states would then be wrong).

mod apt;
mod catalog;
mod cpio;
mod guest;
mod initramfs;

use std::{fmt::Write as _, path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};
use catalog::{Expect, Kernel};

use crate::{
    build::{self, root, stdout_of, Profile},
    preflight,
};

/// Arguments of `cargo xtask kernels`.
#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    /// Kernels to boot, by name (5.10, 5.15, 5.17, 6.1, 6.8, 6.12); the whole matrix by default.
    #[arg(long, value_delimiter = ',')]
    kernel: Vec<String>,
    /// End-to-end suites (files of tests/tests/) to run in each guest.
    #[arg(long, value_delimiter = ',', default_values = ["capture", "policy"])]
    suite: Vec<String>,
    /// Run the suites this many times in each guest (to hunt a flaky test).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Run only the tests whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Tests run at once in a guest (libtest's --test-threads).
    #[arg(long, default_value_t = 2)]
    test_threads: u32,
    /// Use the binaries already built (target/debug) instead of building them.
    #[arg(long)]
    no_build: bool,
    /// Minutes a guest may run before it is stopped.
    #[arg(long, default_value_t = 45)]
    timeout_minutes: u64,
    /// Print each guest's console as it runs.
    #[arg(long)]
    verbose: bool,
}

/// Suites that need what the guest does not carry.
const HOST_ONLY_SUITES: &[(&str, &str)] = &[
    ("kubernetes", "KMock's API emulator (python) and curl"),
    ("hbone", "tshark and dumpcap"),
    ("restarts", "tshark and dumpcap"),
    ("waypoint", "curl"),
    ("waypoint_grpc", "curl"),
    ("waypoint_http", "curl"),
    (
        "telemetry",
        "KMock's venv (python) for its Prometheus parser",
    ),
    (
        "delivery",
        "connection rates (a churn at 400/s) that emulation is far too slow for",
    ),
    (
        "hbone_limits",
        "10,000 connections opened within two minutes, which emulation is far too slow for",
    ),
];

pub fn run(args: KernelsArgs) -> Result<()> {
    preflight::ensure(
        "cargo xtask kernels",
        &[preflight::BUILD, preflight::KERNELS],
    )?;
    let kernels = catalog::select(&args.kernel)?;
    for suite in &args.suite {
        if let Some((_, needs)) = HOST_ONLY_SUITES.iter().find(|(s, _)| s == suite) {
            bail!("suite {suite} needs {needs}, which the guests do not carry: run it on the host (`cargo xtask test`)");
        }
        if !root()
            .join("tests/tests")
            .join(format!("{suite}.rs"))
            .is_file()
        {
            bail!("no suite {suite}: the suites are the files of tests/tests/");
        }
    }
    let dir = build::target_dir().join("kernels");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let bins = build::lab_bins(Profile::Debug, !args.no_build)?;
    let suites = suite_binaries(&args.suite, args.no_build)?;
    eprintln!("xtask: staging the guest's binaries");
    let payload = initramfs::stage(&dir.join("stage"), &bins.agent, &bins.labtool, &suites)?;
    eprintln!(
        "xtask: fetching the kernels' packages (apt, {})",
        dir.join("apt").display()
    );
    let apt = apt::Apt::prepare(&dir.join("apt"), &kernels)?;
    let plan = initramfs::Plan {
        suites: args.suite.clone(),
        repeat: args.repeat,
        filter: args.filter.clone(),
        test_threads: args.test_threads,
    };

    let mut rows = Vec::new();
    for kernel in kernels {
        let row = match boot(kernel, &dir, &apt, &payload, &plan, &args) {
            Ok(report) => Row::judge(kernel, &args.suite, args.repeat, report),
            Err(e) => Row {
                kernel,
                report: guest::Report::default(),
                verdict: format!("not booted: {e:#}"),
                as_expected: false,
            },
        };
        eprintln!("xtask: {}: {}", kernel.name, row.verdict);
        rows.push(row);
    }
    let table = table(&rows, &args.suite);
    println!("\n{table}");
    std::fs::write(dir.join("results.md"), &table)
        .with_context(|| format!("writing {}", dir.join("results.md").display()))?;
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.as_expected).collect();
    if !failed.is_empty() {
        let mut why = String::new();
        for r in failed {
            let _ = write!(
                why,
                "\n  {}: {} (console: {}; kept lab logs: {})",
                r.kernel.name,
                r.verdict,
                r.report.console.display(),
                r.report.console.with_file_name("out").display()
            );
        }
        bail!("kernels not as the matrix expects:{why}");
    }
    Ok(())
}

/// The lines of the failed checks of `mesh-agent check`'s output: each `FAIL` (or `error`)
/// line with the indented lines that continue it.
fn failed_blocks(lines: &[String]) -> String {
    let mut out = String::new();
    let mut in_failure = false;
    for line in lines {
        if line.starts_with(char::is_whitespace) {
            if in_failure {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        in_failure = line.starts_with("FAIL") || line.starts_with("error");
        if in_failure {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Fetches `kernel`, builds its initramfs and boots it.
fn boot(
    kernel: &Kernel,
    dir: &std::path::Path,
    apt: &apt::Apt,
    payload: &initramfs::Payload,
    plan: &initramfs::Plan,
    args: &KernelsArgs,
) -> Result<guest::Report> {
    let kdir = dir.join(kernel.name);
    std::fs::create_dir_all(&kdir).with_context(|| format!("creating {}", kdir.display()))?;
    let (abi, debs) = apt.fetch(kernel)?;
    let unpacked = initramfs::unpack(&debs, &kdir)?;
    let initrd = kdir.join("initrd.cpio");
    let size = initramfs::write(&initrd, payload, &unpacked, plan)?;
    eprintln!(
        "xtask: booting {} ({} {}, package {}; initramfs {} MiB)",
        kernel.name,
        kernel.distribution,
        unpacked.release,
        kernel.image_package(&abi),
        size >> 20
    );
    guest::boot(
        &unpacked.vmlinuz,
        &initrd,
        &kdir,
        Duration::from_secs(args.timeout_minutes * 60),
        args.verbose,
    )
}

/// The test binaries of `suites`, built unless `no_build` (then the newest already built).
fn suite_binaries(suites: &[String], no_build: bool) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args([
        "test",
        "--no-run",
        "--message-format=json",
        "-p",
        "mesh-tests",
    ]);
    if no_build {
        cmd.arg("--offline");
    }
    for s in suites {
        cmd.args(["--test", s]);
    }
    let out = stdout_of(&mut cmd)?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe)) = (is_test, msg["executable"].as_str()) {
            if suites.iter().any(|s| s == name) {
                found.push((name.to_owned(), PathBuf::from(exe)));
            }
        }
    }
    for s in suites {
        if !found.iter().any(|(n, _)| n == s) {
            bail!("cargo built no test binary for suite {s}");
        }
    }
    Ok(found)
}

/// One kernel's line of the table.
struct Row {
    kernel: &'static Kernel,
    report: guest::Report,
    verdict: String,
    as_expected: bool,
}

impl Row {
    fn judge(
        kernel: &'static Kernel,
        suites: &[String],
        repeat: u32,
        report: guest::Report,
    ) -> Row {
        // The reason a kernel is refused is looked for in what the failed checks say, their
        // indented continuation (a verifier's log) included: never in a warning or a check's
        // name (`feature SO_NETNS_COOKIE` is printed whether it passed or not). The verdict
        // quotes the failed checks' first lines.
        let failed_checks = report
            .check
            .as_ref()
            .map(|(_, lines)| failed_blocks(lines))
            .unwrap_or_default();
        let check_failure = report.check.as_ref().and_then(|(rc, lines)| {
            (*rc != 0).then(|| {
                lines
                    .iter()
                    .filter(|l| l.starts_with("FAIL") || l.starts_with("error"))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        });
        let suite_failures: Vec<String> = report
            .suites
            .iter()
            .filter(|s| s.rc != Some(0) || s.failed > 0 || s.passed == 0)
            .map(|s| match (s.passed, s.failed) {
                (0, 0) => format!("{} run {}: no test ran", s.suite, s.run),
                _ => format!("{} run {}: {}", s.suite, s.run, s.failures.join(", ")),
            })
            .collect();
        let expected_runs = suites.len() * repeat.max(1) as usize;
        let (as_expected, verdict) = if report.timed_out {
            (false, "stopped at the deadline".to_owned())
        } else if !report.module_failures.is_empty() {
            (
                false,
                format!(
                    "modules did not load: {} (see the console)",
                    report.module_failures.join(", ")
                ),
            )
        } else if report.check.is_none() {
            (
                false,
                "the guest never ran mesh-agent check (see the console)".to_owned(),
            )
        } else {
            match (kernel.expect, check_failure) {
                (Expect::Refused(reason), Some(failure)) if failed_checks.contains(reason) => {
                    (true, format!("refused as expected: {failure}"))
                }
                (Expect::Refused(reason), Some(failure)) => (
                    false,
                    format!("refused, but not for {reason} as expected: {failure}"),
                ),
                (Expect::Refused(reason), None) => (
                    false,
                    format!("check passed, yet the matrix expects it refused for {reason}: the floor moved"),
                ),
                (Expect::Runs, Some(failure)) => (false, format!("check failed: {failure}")),
                (Expect::Runs, None) if !suite_failures.is_empty() => {
                    (false, format!("failed: {}", suite_failures.join("; ")))
                }
                (Expect::Runs, None) if report.suites.len() < expected_runs || !report.done => (
                    false,
                    format!(
                        "{} of {expected_runs} suite runs reported (see the console)",
                        report.suites.len()
                    ),
                ),
                (Expect::Runs, None) => (true, "passed".to_owned()),
            }
        };
        Row {
            kernel,
            report,
            verdict,
            as_expected,
        }
    }
}

fn table(rows: &[Row], suites: &[String]) -> String {
    let mut t = String::from("| kernel | distribution | release | check |");
    for s in suites {
        let _ = write!(t, " {s} |");
    }
    t.push_str(" time | as expected |\n|---|---|---|---|");
    for _ in suites {
        t.push_str("---|");
    }
    t.push_str("---|---|\n");
    for r in rows {
        let check = match &r.report.check {
            None => "-".to_owned(),
            Some((0, _)) => "ok".to_owned(),
            Some(_) => "refused".to_owned(),
        };
        let _ = write!(
            t,
            "| {} | {} | {} | {check} |",
            r.kernel.name,
            r.kernel.distribution,
            r.report.release.as_deref().unwrap_or("-")
        );
        for s in suites {
            let runs: Vec<&guest::SuiteRun> = r
                .report
                .suites
                .iter()
                .filter(|run| &run.suite == s)
                .collect();
            if runs.is_empty() {
                t.push_str(" - |");
            } else {
                let passed: u32 = runs.iter().map(|x| x.passed).sum();
                let failed: u32 = runs.iter().map(|x| x.failed).sum();
                let _ = write!(t, " {passed} passed, {failed} failed |");
            }
        }
        let secs = r.report.elapsed.as_secs();
        let _ = writeln!(
            t,
            " {}m{:02}s | {} |",
            secs / 60,
            secs % 60,
            if r.as_expected { "yes" } else { "**no**" }
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(check: Option<(i32, &[&str])>, suites: &[(&str, Option<i32>, u32)]) -> guest::Report {
        guest::Report {
            release: Some("x".into()),
            check: check.map(|(rc, lines)| (rc, lines.iter().map(|l| (*l).to_owned()).collect())),
            suites: suites
                .iter()
                .map(|(suite, rc, failed)| guest::SuiteRun {
                    suite: (*suite).into(),
                    run: 1,
                    rc: *rc,
                    passed: 3,
                    failed: *failed,
                    ..guest::SuiteRun::default()
                })
                .collect(),
            done: true,
            ..guest::Report::default()
        }
    }

    fn kernel(expect: Expect) -> &'static Kernel {
        Box::leak(Box::new(Kernel {
            expect,
            ..catalog::KERNELS[0]
        }))
    }

    /// The matrix fails a kernel that does not do what it expects, in both directions.
    #[test]
    fn a_kernel_is_judged_against_what_the_matrix_expects() {
        let suites = ["capture".to_owned()];
        let judge = |expect, report| Row::judge(kernel(expect), &suites, 1, report).as_expected;
        let refused = Expect::Refused("ingress_ifindex");
        let warn = "warn kernel: 5.15.0 (x86_64): older than Linux 5.17 (ingress_ifindex)";
        let log: &[&str] = &[
            warn,
            "FAIL program mesh_sk_lookup: rejected",
            "       ; ingress_ifindex",
            "skip feature SO_NETNS_COOKIE: not checked",
        ];
        assert!(judge(refused, report(Some((1, log)), &[])));
        // Refused for another reason, or not refused at all: the floor moved. A warning or a
        // check's name is no reason.
        assert!(!judge(refused, report(Some((1, &["FAIL feature x"])), &[])));
        assert!(!judge(
            refused,
            report(Some((1, &[warn, "FAIL feature x"])), &[])
        ));
        assert!(!judge(
            Expect::Refused("SO_NETNS_COOKIE"),
            report(Some((1, log)), &[])
        ));
        let passed = || report(Some((0, &[])), &[("capture", Some(0), 0)]);
        assert!(!judge(refused, passed()));
        let runs = Expect::Runs;
        assert!(judge(runs, passed()));
        assert!(!judge(runs, report(Some((1, log)), &[])));
        assert!(!judge(
            runs,
            report(Some((0, &[])), &[("capture", Some(101), 1)])
        ));
        // No test ran (a --filter that matches none), a module did not load, a suite never
        // reported (the guest died), the guest never checked, or it ran out of time.
        let mut none_ran = passed();
        none_ran.suites[0].passed = 0;
        assert!(!judge(runs, none_ran));
        let mut modules = passed();
        modules.module_failures.push("veth".into());
        assert!(!judge(runs, modules));
        assert!(!judge(runs, report(Some((0, &[])), &[])));
        assert!(!judge(runs, report(None, &[])));
        let mut timed_out = passed();
        timed_out.timed_out = true;
        assert!(!judge(runs, timed_out));
    }
}
