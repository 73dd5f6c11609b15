//! Test traffic with `mesh-labtool`: an echo server in a pod, checksummed transfers from a pod.

use std::time::Duration;

use crate::{labtool_bin, Lab, Running};

/// How long a server may take to listen, or a line to appear.
pub const WAIT: Duration = Duration::from_secs(10);

/// Starts an echo server on `port` in `pod` (e.g. "shop/api") and waits until it listens.
pub fn serve(lab: &Lab, pod: &str, port: u16) -> Running {
    let mut server = Running::spawn(
        &format!("echo server in {pod}"),
        lab.command(pod, labtool_bin())
            .args(["serve", "--port", &port.to_string()]),
    );
    server.wait_line("listening", WAIT);
    server
}

/// Starts `mesh-labtool stream` from `client` to `addr` (a long-lived connection that echoes a
/// chunk at a time) and waits for its first round trip.
pub fn stream(lab: &Lab, client: &str, addr: &str) -> Running {
    let mut stream = Running::spawn(
        &format!("stream from {client} to {addr}"),
        lab.command(client, labtool_bin())
            .args(["stream", "--to", addr]),
    );
    stream.wait_line("progress", WAIT);
    stream
}

/// Sends `bytes` from `client` to `addr`, half-closes, checks the echo byte for byte, and
/// returns the tool's output (`connected local=.. peer=..`, `ok sent=N received=N`).
pub fn send(lab: &Lab, client: &str, addr: &str, bytes: u64) -> Vec<String> {
    let out = spawn_send(lab, client, addr, bytes).wait_success(Duration::from_secs(60));
    let ok = format!("ok sent={bytes} received={bytes}");
    assert!(
        out.contains(&ok),
        "send from {client} to {addr}: expected {ok:?} in {out:?}"
    );
    out
}

/// As [`send`], for a transfer that may be refused: whether the echo came back whole.
pub fn send_succeeds(lab: &Lab, client: &str, addr: &str, bytes: u64) -> bool {
    spawn_send(lab, client, addr, bytes)
        .wait(Duration::from_secs(30))
        .success()
}

fn spawn_send(lab: &Lab, client: &str, addr: &str, bytes: u64) -> Running {
    Running::spawn(
        &format!("send from {client} to {addr}"),
        lab.command(client, labtool_bin()).args([
            "send",
            "--to",
            addr,
            "--bytes",
            &bytes.to_string(),
        ]),
    )
}

/// The `peer=` of a `connected` or `accepted` line: what the socket is connected to.
pub fn peer_of(line: &str) -> &str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("peer="))
        .unwrap_or_else(|| panic!("no peer= in {line:?}"))
}

/// Whether an echo server's `accepted` line is of a connection a node agent delivered: it
/// carries the agent's mark (`mesh_common::DELIVERY_MARK`). With the client's address
/// preserved, that is what tells a delivery from a connection that went around the agent.
pub fn delivered(line: &str) -> bool {
    let mark = format!("mark={:#x}", mesh_common::DELIVERY_MARK);
    line.split_whitespace().any(|f| f == mark)
}

/// The `connected` line of a sender's output.
pub fn connected(out: &[String]) -> &str {
    out.iter()
        .find(|l| l.starts_with("connected"))
        .unwrap_or_else(|| panic!("no connected line in {out:?}"))
}

/// The bytes a `mesh-labtool stream` has had echoed so far: its last `progress` line, after
/// taking every line it printed up to now. (Its lines queue up while a test waits, so the next
/// [`Running::wait_line`] can return one printed long before; compare this instead.)
pub fn echoed(stream: &mut Running) -> u64 {
    let lines = stream.stdout_lines();
    let last = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("progress bytes="))
        .unwrap_or_else(|| panic!("the stream printed no progress: {lines:?}"));
    last.parse()
        .unwrap_or_else(|_| panic!("bad progress line {last:?}"))
}
