//! Booting one kernel under qemu (TCG: no KVM needed) and reading what its `/init` reports.
//!
//! The first serial port is the console: every line goes to `console.log`, and the lines
//! starting with [`MARK`] say what ran and how it ended. The second serial port carries a tar
//! of the guest's `/out` (the logs of labs whose test failed, dmesg), unpacked into `out/`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::initramfs::MARK;

/// How a boot went.
#[derive(Debug, Default)]
pub struct Report {
    /// `uname -r` in the guest, once it ran `/init`.
    pub release: Option<String>,
    /// `mesh-agent check`: its exit code and its output.
    pub check: Option<(i32, Vec<String>)>,
    pub suites: Vec<SuiteRun>,
    /// Modules that failed to load.
    pub module_failures: Vec<String>,
    /// The guest reached the end of `/init`.
    pub done: bool,
    /// It was stopped at the deadline.
    pub timed_out: bool,
    pub elapsed: Duration,
    pub console: PathBuf,
}

/// One run of one suite.
#[derive(Debug, Default)]
pub struct SuiteRun {
    pub suite: String,
    pub run: u32,
    pub rc: Option<i32>,
    pub passed: u32,
    pub failed: u32,
    pub seconds: u64,
    /// Names of the failed tests.
    pub failures: Vec<String>,
}

/// Boots `vmlinuz` with `initrd`, keeping everything under `dir`; stops the guest after
/// `timeout`. `echo` prints the console as it comes.
pub fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    dir: &Path,
    timeout: Duration,
    echo: bool,
) -> Result<Report> {
    let console = dir.join("console.log");
    let tar = dir.join("out.tar");
    let _ = std::fs::remove_file(&tar);
    let mut log = std::fs::File::create(&console)
        .with_context(|| format!("creating {}", console.display()))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "4G", "-smp", "2"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/init quiet",
            "-serial",
            "stdio",
            "-serial",
        ])
        .arg(format!("file:{}", tar.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // A file, not a pipe read at the end: a qemu that wrote much there would block.
        .stderr(
            std::fs::File::create(dir.join("qemu.stderr"))
                .with_context(|| format!("creating {}", dir.join("qemu.stderr").display()))?,
        );
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            if tx.send(text).is_err() {
                break;
            }
        }
    });
    let mut report = Report {
        console: console.clone(),
        ..Report::default()
    };
    let mut parser = Parser::default();
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}").ok();
                if echo {
                    println!("  | {line}");
                }
                parser.line(&line, &mut report);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                report.timed_out = true;
                // Ours, by the handle we spawned.
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    report.elapsed = started.elapsed();
    if !status.success() && !report.timed_out {
        let stderr = std::fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default();
        writeln!(log, "qemu exited with {status}: {}", stderr.trim()).ok();
    }
    unpack_out(&tar, &dir.join("out"));
    Ok(report)
}

/// Unpacks the guest's `/out` (nothing when the guest did not get that far).
fn unpack_out(tar: &Path, out: &Path) {
    if std::fs::metadata(tar).map(|m| m.len()).unwrap_or(0) == 0 {
        return;
    }
    let _ = std::fs::remove_dir_all(out);
    if std::fs::create_dir_all(out).is_ok() {
        let _ = Command::new("tar")
            .arg("-xf")
            .arg(tar)
            .arg("-C")
            .arg(out)
            .status();
    }
}

/// Reads the console line by line.
#[derive(Default)]
struct Parser {
    /// Inside `mesh-agent check`'s output.
    in_check: Option<Vec<String>>,
    /// The suite running.
    suite: Option<SuiteRun>,
}

impl Parser {
    fn line(&mut self, line: &str, report: &mut Report) {
        // A marker may follow kernel output on the same line.
        let Some(at) = line.find(MARK) else {
            self.output(line);
            return;
        };
        let mut words = line[at + MARK.len()..].split_whitespace();
        let field = |words: &mut std::str::SplitWhitespace<'_>, key: &str| -> Option<String> {
            words
                .clone()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        match (words.next(), words.next()) {
            (Some("release"), Some(release)) => report.release = Some(release.to_owned()),
            (Some("module-failed"), Some(m)) => report.module_failures.push(m.to_owned()),
            (Some("begin"), Some("check")) => self.in_check = Some(Vec::new()),
            (Some("end"), Some("check")) => {
                let rc = field(&mut words, "rc")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(-1);
                report.check = Some((rc, self.in_check.take().unwrap_or_default()));
            }
            (Some("begin"), Some("suite")) => {
                self.suite = Some(SuiteRun {
                    suite: words.next().unwrap_or_default().to_owned(),
                    run: field(&mut words, "run")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1),
                    ..SuiteRun::default()
                });
            }
            (Some("end"), Some("suite")) => {
                if let Some(mut run) = self.suite.take() {
                    run.rc = field(&mut words, "rc").and_then(|v| v.parse().ok());
                    run.seconds = field(&mut words, "seconds")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    report.suites.push(run);
                }
            }
            (Some("done"), _) => report.done = true,
            _ => {}
        }
    }

    fn output(&mut self, line: &str) {
        if let Some(check) = &mut self.in_check {
            check.push(line.to_owned());
        }
        let Some(run) = &mut self.suite else { return };
        // libtest: "test name ... FAILED" and "test result: ok. 6 passed; 0 failed; ...".
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            run.failures.push(name.to_owned());
        }
        if let Some(result) = line.strip_prefix("test result: ") {
            // Each `;`-separated part ends with "<count> <what>".
            let count = |what: &str| {
                result
                    .split(';')
                    .find_map(|part| {
                        let mut words = part.split_whitespace().rev();
                        (words.next() == Some(what)).then(|| words.next()?.parse().ok())?
                    })
                    .unwrap_or(0)
            };
            run.passed += count("passed");
            run.failed += count("failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_gives_check_and_suite_results() {
        let console = "\
[    0.5] some kernel line
@@mesh-kernels release 6.1.0-57-cloud-amd64
@@mesh-kernels begin check
ok   kernel: 6.1.0
FAIL feature sk_lookup: missing
@@mesh-kernels end check rc=1
@@mesh-kernels begin suite capture run=2
running 6 tests
test a ... ok
test outbound_x ... FAILED
test result: FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 99.1s
@@mesh-kernels end suite capture run=2 rc=101 seconds=104
[   99.0] reboot: Power down @@mesh-kernels done";
        let mut report = Report::default();
        let mut parser = Parser::default();
        for line in console.lines() {
            parser.line(line, &mut report);
        }
        assert_eq!(report.release.as_deref(), Some("6.1.0-57-cloud-amd64"));
        let (rc, lines) = report.check.expect("check reported");
        assert_eq!(rc, 1);
        assert_eq!(
            lines,
            ["ok   kernel: 6.1.0", "FAIL feature sk_lookup: missing"]
        );
        let run = &report.suites[0];
        assert_eq!((run.suite.as_str(), run.run), ("capture", 2));
        assert_eq!(
            (run.passed, run.failed, run.rc, run.seconds),
            (5, 1, Some(101), 104)
        );
        assert_eq!(run.failures, ["outbound_x"]);
        assert!(report.done);
    }
}
