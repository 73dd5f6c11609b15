//! Scenario 4, memory: agent RSS when idle (n1 carries the bench lab's hundred extra captured
//! pods), and the memory of many open, idle proxied connections: RSS before, with N
//! connections held open (bytes per connection), and after they closed: at once, and for the
//! full mesh `settle_secs` later (two minutes in a full run), once the pooled HBONE connections
//! the burst opened have been idle long enough to close (memory that does not come back would
//! stay at every burst's high-water mark).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_lab::{exposed_value, metric_value, Lab, Running};

use super::{measure::agent_rss_mib, Durations, Figure};

/// Port of the many-connection echo servers.
const PORT: u16 = 7100;

pub fn idle(lab: &Lab, out: &mut Vec<Figure>) -> Result<()> {
    for node in lab.nodes() {
        let pods = captured_pods(lab, &node.name)?;
        out.push(settled_rss(
            lab,
            &node.name,
            format!("memory.idle.{}", node.name),
            format!("agent RSS, idle, {} with {pods} captured pods", node.name),
        )?);
    }
    Ok(())
}

/// Agent RSS once every scenario has run: memory that never returns to the system shows here.
pub fn after_all(lab: &Lab, out: &mut Vec<Figure>) -> Result<()> {
    for node in lab.nodes() {
        let key = format!("memory.after_all.{}", node.name);
        let name = format!("agent RSS after all scenarios, {}", node.name);
        out.push(settled_rss(lab, &node.name, key, name)?);
    }
    Ok(())
}

/// The agent RSS of `node` now, as a figure.
fn rss(lab: &Lab, node: &str, key: String, name: String) -> Result<Figure> {
    Ok(mib(key, name, agent_rss_mib(lab, node)?))
}

/// The agent RSS of `node` once it has settled, as a figure ([`settled_rss_mib`]).
fn settled_rss(lab: &Lab, node: &str, key: String, name: String) -> Result<Figure> {
    Ok(mib(key, name, settled_rss_mib(lab, node)?))
}

fn mib(key: String, name: String, value: f64) -> Figure {
    Figure {
        scenario: "memory",
        key,
        name,
        unit: "MiB",
        value,
        direct: None,
    }
}

/// The agent RSS of `node` once two readings a second apart are within 1% of each other (at
/// most 10 s): the agent's allocator hands freed pages back about a second after they were
/// freed (docs/operations.md, "Memory"), so a reading right after start-up would count the
/// start-up's garbage on its way back. glibc's malloc is settled at once.
fn settled_rss_mib(lab: &Lab, node: &str) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = agent_rss_mib(lab, node)?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = agent_rss_mib(lab, node)?;
        if (now - last).abs() <= last * 0.01 || Instant::now() >= deadline {
            return Ok(now);
        }
        last = now;
    }
}

fn captured_pods(lab: &Lab, node: &str) -> Result<f64> {
    metric_value(&lab.metrics(node), "mesh_captured_pods", &[])
        .context("no mesh_captured_pods metric")
}

pub fn connections(lab: &Lab, d: &Durations, out: &mut Vec<Figure>) -> Result<()> {
    let _servers: Vec<Running> = ["shop/api", "legacy/server"]
        .iter()
        .map(|pod| {
            let mut s = Running::spawn(
                &format!("many-connection echo server in {pod}"),
                lab.command(pod, mesh_lab::labtool_bin()).args([
                    "serve",
                    "--many",
                    "--port",
                    &PORT.to_string(),
                ]),
            );
            s.wait_line("listening", Duration::from_secs(10));
            s
        })
        .collect();
    for (what, path, server, nodes, fds_per_conn) in [
        ("full mesh", "mesh", "shop/api", &["n1", "n2"][..], 1),
        (
            "capture-only passthrough",
            "passthrough",
            "legacy/server",
            &["n1"][..],
            2,
        ),
    ] {
        let key = |node: &str, what: &str| format!("memory.idle_conns.{path}.{node}.{what}");
        // As many as the client agent's open file limit allows (each connection holds
        // `fds_per_conn` descriptors there; the limit is what this machine grants).
        let room = fd_room(lab, "n1")?;
        let n = d.idle_conns.min(room / fds_per_conn);
        if n < 100 {
            eprintln!(
                "bench: {what}: skipping the idle connections: agent n1 may open only {room} \
                 more files (raise its RLIMIT_NOFILE)"
            );
            continue;
        }
        if n < d.idle_conns {
            eprintln!(
                "bench: {what}: {n} idle connections instead of {}: agent n1 has room for {room} \
                 more open files (raise its RLIMIT_NOFILE for more)",
                d.idle_conns
            );
        }
        let before: Vec<f64> = nodes
            .iter()
            .map(|node| settled_rss_mib(lab, node))
            .collect::<Result<_>>()?;
        let addr = format!("{}:{PORT}", lab.pod(server).ip);
        let mut hold = Running::spawn(
            &format!("{n} idle connections to {addr}"),
            lab.command("shop/client", mesh_lab::labtool_bin()).args([
                "hold",
                "--to",
                &addr,
                "--conns",
                &n.to_string(),
            ]),
        );
        hold.wait_line("held", Duration::from_secs(120));
        for (node, before) in nodes.iter().zip(&before) {
            let with = agent_rss_mib(lab, node)?;
            out.push(Figure {
                scenario: "memory",
                key: key(node, "per_conn"),
                name: format!("{what}: agent {node} memory per idle connection ({n} open)"),
                unit: "KiB",
                value: (with - before) * 1024.0 / n as f64,
                direct: None,
            });
        }
        hold.close_stdin();
        hold.wait_line("released", Duration::from_secs(60));
        let released = Instant::now();
        for (node, before) in nodes.iter().zip(&before) {
            wait_connections_closed(lab, node)?;
            out.push(Figure {
                scenario: "memory",
                key: key(node, "rss_before"),
                name: format!("{what}: agent {node} RSS before {n} connections"),
                unit: "MiB",
                value: *before,
                direct: None,
            });
            let name = format!("{what}: agent {node} RSS after they all closed");
            out.push(rss(lab, node, key(node, "rss_after"), name)?);
        }
        if path == "mesh" {
            // A reading at a set time after the burst, not a wait for a condition.
            std::thread::sleep(
                (released + Duration::from_secs(d.settle_secs))
                    .saturating_duration_since(Instant::now()),
            );
            for node in nodes {
                let name = format!(
                    "{what}: agent {node} RSS {} s after they all closed",
                    d.settle_secs
                );
                out.push(rss(lab, node, key(node, "rss_settled"), name)?);
            }
        }
    }
    Ok(())
}

/// How many more descriptors the agent of `node` may open, keeping 512 spare.
fn fd_room(lab: &Lab, node: &str) -> Result<usize> {
    let pid = lab
        .agent_pid(node)
        .with_context(|| format!("no agent on {node}"))?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .with_context(|| format!("reading /proc/{pid}/limits (the agent of {node})"))?;
    let limit: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .context("no open file limit in /proc/PID/limits")?;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd (the agent of {node})"))?
        .count();
    Ok(limit.saturating_sub(open + 512))
}

/// Waits until the agent of `node` has closed every proxied connection it opened.
fn wait_connections_closed(lab: &Lab, node: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = lab.metrics(node);
        let total = |name: &str| {
            exposed_value(&metrics, name, &[])
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("metrics of {node}"))
        };
        let open = total("mesh_tcp_connections_opened_total")?
            - total("mesh_tcp_connections_closed_total")?;
        if open <= 0.0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "agent {node} still has {open} open connections a minute after the clients closed"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
