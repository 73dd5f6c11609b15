//! Measurements: iperf3 and `mesh-labtool rr` runs inside lab pods, agent CPU and memory from
//! /proc.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_lab::{Lab, Running};

/// CPU seconds (user + system) of both agents so far.
pub fn agents_cpu(lab: &Lab) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    for node in lab.nodes() {
        let pid = lab
            .agent_pid(&node.name)
            .with_context(|| format!("no agent on {}", node.name))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        // After the command name: state is field 3, utime 14, stime 15 (1-based).
        let utime: f64 = fields
            .get(11)
            .and_then(|v| v.parse().ok())
            .context("utime")?;
        let stime: f64 = fields
            .get(12)
            .and_then(|v| v.parse().ok())
            .context("stime")?;
        total += (utime + stime) / ticks;
    }
    Ok(total)
}

/// Resident memory of one agent, in MiB.
pub fn agent_rss_mib(lab: &Lab, node: &str) -> Result<f64> {
    let pid = lab
        .agent_pid(node)
        .with_context(|| format!("no agent on {node}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
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

/// One `mesh-labtool rr` run; returns its JSON report.
pub fn rr(
    lab: &Lab,
    client: &str,
    addr: &str,
    rate: u32,
    secs: f64,
    new_conn: bool,
) -> Result<serde_json::Value> {
    let mut cmd = lab.command(client, mesh_lab::labtool_bin());
    cmd.args([
        "rr",
        "--to",
        addr,
        "--rate",
        &rate.to_string(),
        "--conns",
        "4",
        "--size",
        "1024",
    ]);
    cmd.args([
        "--duration-secs",
        &format!("{secs}"),
        "--warmup-secs",
        if secs < 5.0 { "0" } else { "1" },
    ]);
    if new_conn {
        cmd.arg("--new-conn");
    }
    let mut run = Running::spawn(&format!("rr from {client} to {addr}"), &mut cmd);
    let out = run.wait_success(Duration::from_secs_f64(secs + 60.0));
    let line = out
        .iter()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("rr printed no JSON: {out:?}"))?;
    Ok(serde_json::from_str(line)?)
}
