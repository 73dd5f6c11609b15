//! Measurements: iperf3 and `mesh-labtool rr` runs inside lab pods, agent CPU and memory from
//! /proc, and a description of the machine for the report.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use mesh_lab::{Lab, Running};

/// Kernel, CPU, cores and the commit measured, one line.
pub fn environment() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    format!(
        "kernel {}, {cpu} ({}), {cores} cores, commit {}; both agents, clients and servers share \
         the cores",
        kernel.trim(),
        crypto_features(&cpuinfo),
        commit()
    )
}

/// The CPU features AES-GCM's speed depends on, from /proc/cpuinfo's first `flags` line: the
/// same record layer runs about twice as fast with VAES and VPCLMULQDQ (docs/performance.md).
fn crypto_features(cpuinfo: &str) -> String {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|v| {
            v.trim_start_matches([' ', '\t', ':'])
                .split_whitespace()
                .collect()
        })
        .unwrap_or_default();
    let named = [
        ("aes", "AES-NI"),
        ("vaes", "VAES"),
        ("vpclmulqdq", "VPCLMULQDQ"),
        ("avx2", "AVX2"),
        ("avx512f", "AVX-512"),
    ];
    let (with, without): (Vec<_>, Vec<_>) =
        named.iter().partition(|(flag, _)| flags.contains(flag));
    let list = |v: &[&(&str, &str)]| v.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ");
    match (with.is_empty(), without.is_empty()) {
        (true, _) => format!("none of {}", list(&without)),
        (false, true) => list(&with),
        (false, false) => format!("{}; no {}", list(&with), list(&without)),
    }
}

/// `git describe --always --dirty` of the workspace (empty if git cannot tell).
pub fn commit() -> String {
    output(
        Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(crate::build::root()),
    )
}

/// Today's date in UTC, `YYYY-MM-DD` (empty if `date` cannot tell).
pub fn date() -> String {
    output(Command::new("date").args(["-u", "+%Y-%m-%d"]))
}

/// What `cmd` prints, trimmed; empty if it cannot run.
fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// CPU seconds (user + system, exited threads included) of one process so far.
pub fn process_cpu(pid: u32) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // After the command name: state is field 3, utime 14, stime 15 (1-based).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let utime: f64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .context("utime")?;
    let stime: f64 = fields
        .get(12)
        .and_then(|v| v.parse().ok())
        .context("stime")?;
    Ok((utime + stime) / ticks)
}

/// Busy CPU seconds of the whole machine so far (every CPU: user, nice, system, irq, softirq
/// and steal; idle and iowait left out), from the first line of /proc/stat.
pub fn machine_cpu() -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| fields.get(i).copied().unwrap_or(0.0))
        .sum();
    Ok(busy / ticks)
}

/// CPU seconds of both agents so far.
pub fn agents_cpu(lab: &Lab) -> Result<f64> {
    let mut total = 0.0;
    for node in lab.nodes() {
        let pid = lab
            .agent_pid(&node.name)
            .with_context(|| format!("no agent on {}", node.name))?;
        total += process_cpu(pid)?;
    }
    Ok(total)
}

/// Resident memory of one agent, in MiB.
pub fn agent_rss_mib(lab: &Lab, node: &str) -> Result<f64> {
    let pid = lab
        .agent_pid(node)
        .with_context(|| format!("no agent on {node}"))?;
    process_rss_mib(pid).with_context(|| format!("the agent of {node}"))
}

/// Resident memory (VmRSS) of one process, in MiB.
pub fn process_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

/// Starts `iperf3 -s` in `pod` and waits until it listens.
pub fn iperf_server(lab: &Lab, pod: &str) -> Running {
    let mut server = Running::spawn(
        &format!("iperf3 server in {pod}"),
        lab.command(pod, "iperf3")
            .args(["-s", "-p", "5201", "--forceflush"]),
    );
    server.wait_line("Server listening", Duration::from_secs(10));
    server
}

/// One iperf3 run: (bits per second received, bytes received).
pub fn iperf(lab: &Lab, client: &str, addr: &str, streams: u32, secs: u32) -> Result<(f64, f64)> {
    let mut run = Running::spawn(
        &format!("iperf3 from {client} to {addr}"),
        lab.command(client, "iperf3").args([
            "-c",
            addr,
            "-p",
            "5201",
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ]),
    );
    let out = run
        .wait_success(Duration::from_secs(u64::from(secs) + 30))
        .join("\n");
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("iperf3 output: {out}"))?;
    let sum = &v["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) => Ok((bps, bytes)),
        _ => bail!("iperf3 reported no result: {out}"),
    }
}

/// What one `mesh-labtool rr` run measures.
#[derive(Clone, Copy, Debug)]
pub struct RrRun<'a> {
    pub client: &'a str,
    pub addr: &'a str,
    /// Requests (or new connections) per second; 0 for as fast as possible.
    pub rate: u32,
    pub secs: u32,
    pub warmup_secs: u32,
    pub new_conn: bool,
}

/// One `mesh-labtool rr` run (1 KiB requests, four connections or workers); its JSON report.
pub fn rr(lab: &Lab, run: RrRun<'_>) -> Result<serde_json::Value> {
    let mut cmd = lab.command(run.client, mesh_lab::labtool_bin());
    cmd.args(["rr", "--to", run.addr, "--conns", "4", "--size", "1024"]);
    cmd.args(["--rate", &run.rate.to_string()]);
    cmd.args(["--duration-secs", &run.secs.to_string()]);
    cmd.args(["--warmup-secs", &run.warmup_secs.to_string()]);
    if run.new_conn {
        cmd.arg("--new-conn");
    }
    let mut child = Running::spawn(&format!("rr from {} to {}", run.client, run.addr), &mut cmd);
    let out = child.wait_success(Duration::from_secs(
        u64::from(run.secs + run.warmup_secs) + 60,
    ));
    let line = out
        .iter()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("rr printed no JSON: {out:?}"))?;
    Ok(serde_json::from_str(line)?)
}

/// A number from an rr report.
pub fn num(v: &serde_json::Value, key: &str) -> Result<f64> {
    v[key].as_f64().with_context(|| format!("no {key} in {v}"))
}

/// Lets a pod open connections at a high rate: reuse of TIME_WAIT ports for new outgoing
/// connections and the whole ephemeral port range (with the kernel's defaults a sustained churn
/// runs out of ports, about 470 new connections per second to one destination, and measures
/// the port search instead of connections). The range starts above every port a lab server
/// listens on (7000, 7100, 7200, 8080, the agent's 15001-15008): a TIME_WAIT socket on a
/// server's port would make the next server that binds it fail with EADDRINUSE (seen in CI,
/// when the server pods were tuned too: the policy scenario's server on 7100 after churn).
pub fn tune_ports(lab: &Lab, pod: &str) -> Result<()> {
    let script = "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse && \
                  echo '20000 65535' > /proc/sys/net/ipv4/ip_local_port_range";
    let status = lab
        .command(pod, "sh")
        .args(["-c", script])
        .status()
        .with_context(|| format!("tuning {pod}"))?;
    if !status.success() {
        bail!("tuning the TCP port reuse of {pod} failed ({status})");
    }
    Ok(())
}

/// Runs `<agent> <args>` (one of mesh-agent's hidden bench commands) and parses the JSON line
/// it prints last.
pub fn agent_json(bin: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let what = args.first().copied().unwrap_or("");
    let output = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {} {what}", bin.display()))?;
    if !output.status.success() {
        bail!(
            "{} {what} failed ({}): {}",
            bin.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{what} printed no JSON: {stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_crypto_features_are_named_with_and_without() {
        let cpuinfo = "model name\t: X\nflags\t\t: fpu aes avx2 vaes\n";
        assert_eq!(
            super::crypto_features(cpuinfo),
            "AES-NI, VAES, AVX2; no VPCLMULQDQ, AVX-512"
        );
        assert_eq!(
            super::crypto_features(""),
            "none of AES-NI, VAES, VPCLMULQDQ, AVX2, AVX-512"
        );
    }
}
