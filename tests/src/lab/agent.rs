//! Starting the agents, waiting for them to be ready, and talking HTTP to them inside a netns.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    layout::{Layout, Node, READINESS_PORT},
    sys,
};

/// Name every agent command line contains; checked before signalling a pid read from a file.
pub(crate) const AGENT_PROGRAM: &str = "mesh-agent";
/// How many log lines an error message quotes.
const LOG_TAIL_LINES: usize = 40;
/// Timeout of one HTTP request (connect, and each read or write).
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// An agent process of the lab: our child, or (after [`crate::Lab::attach`]) a pid from the run dir.
#[derive(Debug)]
pub(crate) struct AgentProcess {
    pub node: String,
    pub pid: u32,
    /// 1 for the node's first agent; each restart or upgrade starts the next.
    pub generation: u32,
    pub child: Option<Child>,
}

impl AgentProcess {
    /// True while the process runs (for a child of ours: not yet reaped; for a recorded pid:
    /// alive and still a mesh-agent, so a recycled pid is never signalled).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => sys::process_alive(self.pid) && sys::cmdline_contains(self.pid, AGENT_PROGRAM),
        }
    }
}

/// The agent binary: `MESH_AGENT_BIN`, else `<workspace>/target/debug/mesh-agent`.
pub fn agent_bin() -> PathBuf {
    match std::env::var_os("MESH_AGENT_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/debug")
            .join(AGENT_PROGRAM),
    }
}

/// Makes the lab's certificate authority with the agent's own CLI: a root, and one node
/// intermediate per node (`<run dir>/ca`).
pub(crate) fn make_ca(layout: &Layout) -> Result<()> {
    let bin = agent_bin();
    let dir = layout.ca_dir();
    let run = |args: &[&std::ffi::OsStr]| -> Result<()> {
        let out = std::process::Command::new(&bin)
            .args(args)
            .output()
            .with_context(|| format!("running {} {args:?}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} {args:?} failed: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    run(&[
        &os("ca"),
        &os("init"),
        &os("--out"),
        dir.as_os_str(),
        &os("--trust-domain"),
        &os(super::state::TRUST_DOMAIN),
    ])?;
    for node in &layout.nodes {
        run(&[
            &os("ca"),
            &os("issue-node"),
            &os("--node"),
            &os(&node.name),
            &os("--ca-cert"),
            dir.join("root-cert.pem").as_os_str(),
            &os("--ca-key"),
            dir.join("root-key.pem").as_os_str(),
            &os("--out"),
            dir.as_os_str(),
        ])?;
    }
    Ok(())
}

/// Starts an agent of `node` (its `generation`th, from `bin`): in its cgroup and netns, in a
/// new session, logging to the run dir, its pid appended to the node's pid file.
pub(crate) fn start(
    layout: &Layout,
    node: &Node,
    generation: u32,
    bin: &Path,
) -> Result<AgentProcess> {
    if !bin.is_file() {
        bail!(
            "agent binary {} does not exist: build it (`cargo build -p mesh-agent`) or point \
             MESH_AGENT_BIN at it",
            bin.display()
        );
    }
    let config = layout.agent_config_path(&node.name);
    let log_path = layout.agent_log_path_of(&node.name, generation);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("creating agent log {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .context("duplicating the agent log file handle")?;
    let mut cmd = Command::new(bin);
    cmd.arg("node").arg("--config").arg(&config);
    if std::env::var_os("MESH_LOG").is_none() {
        cmd.env("MESH_LOG", "info,mesh_agent=debug");
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
    sys::enter(
        &mut cmd,
        sys::Enter {
            cgroup: Some(&node.agent_cgroup),
            netns: Some(&node.netns),
            setsid: true,
        },
    )?;
    // A binary just copied (`Lab::upgrade_agent`) may be "busy" for a moment: another thread
    // of this process that forked meanwhile holds the copy's write descriptor until its child
    // execs. That ends on its own; a few tries, then the error.
    let mut tries = 0;
    let spawned = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => break other,
        }
    };
    let child = spawned.with_context(|| {
        format!(
            "starting agent {} for node {} (cgroup {}, netns {})",
            bin.display(),
            node.name,
            node.agent_cgroup.display(),
            node.netns.display()
        )
    })?;
    let pid = child.id();
    let pid_path = layout.agent_pid_path(&node.name);
    let mut pids = std::fs::read_to_string(&pid_path).unwrap_or_default();
    pids.push_str(&format!("{pid}\n"));
    sys::write_atomic(&pid_path, pids.as_bytes())?;
    Ok(AgentProcess {
        node: node.name.clone(),
        pid,
        generation,
        child: Some(child),
    })
}

/// Waits until the agent's own log says it started (for a successor: it has taken over), then
/// until the node answers ready. Fails early, with the log, if the agent exits.
pub(crate) fn wait_started(
    layout: &Layout,
    node: &Node,
    agent: &mut AgentProcess,
    deadline: Instant,
) -> Result<()> {
    let log = layout.agent_log_path_of(&node.name, agent.generation);
    loop {
        fail_if_exited(node, agent, &log, "it started")?;
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("agent started")) {
            return wait_ready(layout, node, agent, deadline);
        }
        if Instant::now() >= deadline {
            bail!(
                "agent of node {} (pid {}) did not start in time; last lines of {}:\n{}",
                node.name,
                agent.pid,
                log.display(),
                log_tail(&log, LOG_TAIL_LINES)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An error, with the end of its log, if the agent (our child) has exited before `what`.
fn fail_if_exited(node: &Node, agent: &mut AgentProcess, log: &Path, what: &str) -> Result<()> {
    if let Some(child) = agent.child.as_mut() {
        if let Some(status) = child.try_wait().context("checking the agent process")? {
            bail!(
                "agent of node {} (pid {}) exited with {status} before {what}; last lines of \
                 {}:\n{}",
                node.name,
                agent.pid,
                log.display(),
                log_tail(log, LOG_TAIL_LINES)
            );
        }
    }
    Ok(())
}

/// Waits until the agent answers `GET /healthz/ready` with 200 inside its node's netns.
pub(crate) fn wait_ready(
    layout: &Layout,
    node: &Node,
    agent: &mut AgentProcess,
    deadline: Instant,
) -> Result<()> {
    let log = layout.agent_log_path_of(&node.name, agent.generation);
    loop {
        fail_if_exited(node, agent, &log, "it was ready")?;
        let last = match http_get(&node.netns, READINESS_PORT, "/healthz/ready") {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => format!("HTTP {status}: {}", body.trim()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "agent of node {} (pid {}) not ready in time: GET 127.0.0.1:{READINESS_PORT}\
                 /healthz/ready in netns {} last gave: {last}; last lines of {}:\n{}",
                node.name,
                agent.pid,
                node.netns_name,
                log.display(),
                log_tail(&log, LOG_TAIL_LINES)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET <path>` on 127.0.0.1:<port> from inside the network namespace `netns`.
/// Returns the status code and the body.
pub(crate) fn http_get(netns: &Path, port: u16, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    let what = format!("GET 127.0.0.1:{port}{path} in {}", netns.display());
    sys::in_netns(netns, move || {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).context("connecting")?;
        stream
            .set_read_timeout(Some(HTTP_TIMEOUT))
            .context("setting a read timeout")?;
        stream
            .set_write_timeout(Some(HTTP_TIMEOUT))
            .context("setting a write timeout")?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )
        .context("sending the request")?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .context("reading the response")?;
        parse_response(&response)
    })
    .context(what)
}

/// Parses an HTTP/1.1 response read to EOF (`Content-Length`, chunked, or close-delimited body).
fn parse_response(response: &[u8]) -> Result<(u16, String)> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            anyhow!(
                "response has no end of headers: {:?}",
                String::from_utf8_lossy(response)
            )
        })?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Decodes a chunked body.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunked body"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        out.extend_from_slice(chunk);
        data = data
            .get(size + 2..)
            .ok_or_else(|| anyhow!("truncated chunk trailer"))?;
    }
}

/// The last `n` lines of a log file (or a note saying why it could not be read).
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if let Err(e) = File::open(path).and_then(|mut f| f.read_to_string(&mut text)) {
        return format!("(could not read {}: {e})", path.display());
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(
            parse_response(plain).expect("parses"),
            (200, "ok".to_owned())
        );
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).expect("parses"),
            (503, "not ready".to_owned())
        );
        assert!(parse_response(b"garbage").is_err());
    }
}
