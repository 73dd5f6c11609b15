//! End-to-end tests of what one HBONE client can make an agent hold (issue 12, item 11): a
//! client that stops reading, and thousands of connects that never finish a handshake. Each
//! measures the agent's peak resident memory (VmHWM, reset first) against a stated budget
//! (docs/security.md), and checks that the agent lets go of what the client held.

use std::{collections::BTreeMap, time::Duration};

use mesh_lab::{certs, labtool_bin, wait_until, Lab, LabOptions, Running};

const MIB: u64 = 1 << 20;
/// What 200 streams whose client stopped reading may add to the agent's peak memory: per
/// stream one send buffer (256 KiB) and one read (at most 256 KiB), and some slack.
const STALLED_STREAMS_BUDGET: u64 = 112 * MIB;
/// What 2,000 connects that never finish a handshake may add to the agent's peak memory: a
/// socket and a small task each (the connection's 10 KiB future is made only once it has sent
/// something and has a handshake slot; docs/security.md).
const IDLE_CONNECTS_BUDGET: u64 = 8 * MIB;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading the status of agent {pid}: {e}"));
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in the status of agent {pid}"))
}

/// The agent's resident memory now, in bytes, after resetting its peak (VmHWM) to it.
fn reset_peak(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|e| panic!("resetting the peak RSS of agent {pid}: {e}"));
    status_kib(pid, "VmRSS:") * 1024
}

fn peak(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

/// A client that opens 200 CONNECT streams, has each destination write without end, and stops
/// reading: the agent holds at most a send buffer and a read per stream, and drops the client
/// when its PING goes unanswered (the applications see their connections reset).
#[test]
fn a_client_that_stops_reading_costs_a_bounded_amount_and_is_dropped() {
    if !mesh_lab::require_privileged(
        "a_client_that_stops_reading_costs_a_bounded_amount_and_is_dropped",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions {
        hbone_server: BTreeMap::from([
            ("ping_interval_secs".to_owned(), 2),
            ("ping_timeout_secs".to_owned(), 3),
        ]),
        ..LabOptions::default()
    });
    let db = lab.pod("shop/db").ip;
    let mut flood = Running::spawn(
        "flood server in shop/db",
        lab.command("shop/db", labtool_bin())
            .args(["flood", "--port", "7100"]),
    );
    flood.wait_line("listening", Duration::from_secs(10));
    let agent = lab.agent_pid("n1").expect("n1's agent runs");
    let before = reset_peak(agent);

    let leaf = certs::issue_node_leaf(&lab, "n1", &certs::id("shop", "client"), "client");
    let (cert, key) = &leaf;
    let mut client = lab.command("legacy/client", labtool_bin());
    client
        .args(["hbone", "--stall", "--to", &format!("{db}:15008")])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key);
    for _ in 0..200 {
        client.args(["--request", &format!("CONNECT {db}:7100")]);
    }
    let mut client = Running::spawn("stalling HBONE client", &mut client);
    client.wait_line("stalled 200", Duration::from_secs(30));
    // An established connection holds its slot for as long as it is served.
    assert_eq!(
        lab.metric("n1", "mesh_hbone_server_connections", &[]),
        1.0,
        "the stalled client's connection is not counted"
    );

    wait_until("n1 to drop the client", Duration::from_secs(30), || {
        lab.agent_log("n1")
            .contains("took nothing we sent and answered no PING")
    });
    // Every destination connection was reset when the client was dropped.
    let mut flooded = 0u64;
    let mut lines = 0;
    while lines < 200 {
        let line = flood.wait_line("flooded bytes=", Duration::from_secs(30));
        flooded += line
            .trim_start_matches("flooded bytes=")
            .parse::<u64>()
            .expect("a byte count");
        lines += 1;
    }
    let grew = peak(agent).saturating_sub(before);
    eprintln!(
        "200 stalled streams: the applications wrote {} MiB, the agent's peak RSS grew by {:.1} MiB (budget {} MiB)",
        flooded / MIB,
        grew as f64 / MIB as f64,
        STALLED_STREAMS_BUDGET / MIB
    );
    assert!(
        grew <= STALLED_STREAMS_BUDGET,
        "the agent's peak RSS grew by {grew} bytes for 200 stalled streams (budget {STALLED_STREAMS_BUDGET})"
    );
    client.close_stdin();
    client.wait(Duration::from_secs(10));
    lab.down();
}

/// 2,000 connects to a pod's HBONE port that send nothing, then 2,000 that send the start of a
/// handshake and stall: the agent closes every one at its handshake timeout, and they cost it
/// at most the stated budget (no buffer before a client sends; a few handshakes at a time).
#[test]
fn connects_that_never_finish_a_handshake_cost_a_bounded_amount_and_are_closed() {
    if !mesh_lab::require_privileged(
        "connects_that_never_finish_a_handshake_cost_a_bounded_amount_and_are_closed",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions {
        // All 2,000 from one pod are admitted: the memory they cost is measured.
        hbone_server: BTreeMap::from([("max_connections_per_peer".to_owned(), 4096)]),
        ..LabOptions::default()
    });
    let db = lab.pod("shop/db").ip;
    let agent = lab.agent_pid("n1").expect("n1's agent runs");
    for partial in [false, true] {
        let before = reset_peak(agent);
        let mut cmd = lab.command("legacy/client", labtool_bin());
        cmd.args([
            "connects",
            "--to",
            &format!("{db}:15008"),
            "--conns",
            "2000",
        ]);
        if partial {
            cmd.arg("--partial");
        }
        let mut run = Running::spawn("idle connects to shop/db's HBONE port", &mut cmd);
        let opened = run.wait_line("opened ", Duration::from_secs(60));
        assert_eq!(opened, "opened 2000", "partial={partial}");
        run.wait_line("closed 2000", Duration::from_secs(60));
        let grew = peak(agent).saturating_sub(before);
        eprintln!(
            "2,000 connects (partial handshake: {partial}) held until the handshake timeout: the agent's peak RSS grew by {:.1} MiB (budget {} MiB)",
            grew as f64 / MIB as f64,
            IDLE_CONNECTS_BUDGET / MIB
        );
        assert!(
            grew <= IDLE_CONNECTS_BUDGET,
            "the agent's peak RSS grew by {grew} bytes for 2,000 idle connects (partial={partial}, budget {IDLE_CONNECTS_BUDGET})"
        );
        run.wait(Duration::from_secs(10));
    }
    lab.down();
}

/// Past `hbone.server.max_connections_per_peer` a peer's new connections are closed at once,
/// counted; its open ones are still served, and it is served again once it closes some.
#[test]
fn connections_past_the_per_peer_limit_are_refused_and_counted() {
    if !mesh_lab::require_privileged("connections_past_the_per_peer_limit_are_refused_and_counted")
    {
        return;
    }
    let lab = Lab::up(LabOptions {
        hbone_server: BTreeMap::from([("max_connections_per_peer".to_owned(), 50)]),
        ..LabOptions::default()
    });
    let db = lab.pod("shop/db").ip;
    let _server = mesh_lab::traffic::serve(&lab, "shop/db", 9090);
    let mut held = Running::spawn(
        "80 idle connects",
        lab.command("legacy/client", labtool_bin()).args([
            "connects",
            "--to",
            &format!("{db}:15008"),
            "--conns",
            "80",
        ]),
    );
    held.wait_line("opened 80", Duration::from_secs(30));
    let refused = || {
        lab.metric(
            "n1",
            "mesh_hbone_server_refused_total",
            &[("reason", "max_connections_per_peer")],
        )
    };
    wait_until("30 connections refused", Duration::from_secs(20), || {
        refused() >= 30.0
    });
    assert_eq!(refused(), 30.0, "only those past the limit are refused");
    assert!(lab
        .agent_log("n1")
        .contains("HBONE connection refused: limit reached (hbone.server)"));
    // Once the held ones are closed (at the handshake timeout), the peer is served again.
    held.wait_line("closed 80", Duration::from_secs(30));
    let leaf = certs::issue_node_leaf(&lab, "n1", &certs::id("shop", "client"), "client");
    let out = certs::hbone_client(
        &lab,
        "legacy/client",
        &format!("{db}:15008"),
        Some(&leaf),
        &[format!("CONNECT {db}:9090")],
    );
    assert!(out.iter().any(|l| l == "response 0 status=200"), "{out:?}");
    lab.down();
}

/// Memory a burst of connections took goes back to the system once they and the HBONE
/// connections that carried them are gone (the agent's allocator, docs/operations.md "Memory"):
/// 10,000 idle connections through the full mesh, cross-node, then closed. glibc's malloc kept
/// nearly all of it (the agents stayed at the burst's high-water mark).
#[test]
fn memory_of_a_burst_of_connections_goes_back_to_the_system() {
    if !mesh_lab::require_privileged("memory_of_a_burst_of_connections_goes_back_to_the_system") {
        return;
    }
    const CONNS: usize = 10_000;
    let lab = Lab::up(LabOptions {
        // The destination closes an HBONE connection 2 s after its last stream (instead of 5
        // minutes), and the source's pool then lets it go: their HTTP/2 state is freed too.
        hbone_server: BTreeMap::from([("idle_timeout_secs".to_owned(), 2)]),
        ..LabOptions::default()
    });
    let mut server = Running::spawn(
        "many-connection echo server in shop/api",
        lab.command("shop/api", labtool_bin())
            .args(["serve", "--many", "--port", "7100"]),
    );
    server.wait_line("listening", Duration::from_secs(10));
    let agents: Vec<(&str, u32)> = ["n1", "n2"]
        .into_iter()
        .map(|node| (node, lab.agent_pid(node).expect("the agent runs")))
        .collect();
    // Anonymous memory: the heap, without the binary's pages (a debug build's are large).
    let anon = |pid: u32| status_kib(pid, "RssAnon:") * 1024;
    // Once the start-up's garbage is back with the system (readings a second apart within 1%).
    let before: Vec<u64> = agents
        .iter()
        .map(|&(_, pid)| {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            let mut last = anon(pid);
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let now = anon(pid);
                if now.abs_diff(last) <= last / 100 || std::time::Instant::now() >= deadline {
                    break now;
                }
                last = now;
            }
        })
        .collect();
    let api = lab.pod("shop/api").ip;
    let mut hold = Running::spawn(
        "idle connections from shop/client to shop/api",
        lab.command("shop/client", labtool_bin()).args([
            "hold",
            "--to",
            &format!("{api}:7100"),
            "--conns",
            &CONNS.to_string(),
        ]),
    );
    hold.wait_line(&format!("held {CONNS}"), Duration::from_secs(120));
    let held: Vec<u64> = agents.iter().map(|&(_, pid)| anon(pid)).collect();
    for (i, &(node, _)) in agents.iter().enumerate() {
        eprintln!(
            "agent {node}: anonymous memory {:.1} MiB before, {:.1} MiB with {CONNS} connections",
            before[i] as f64 / MIB as f64,
            held[i] as f64 / MIB as f64
        );
        // Otherwise the test would prove nothing.
        assert!(
            held[i] >= before[i] + 8 * MIB,
            "{CONNS} connections added only {} bytes to agent {node}'s memory",
            held[i].saturating_sub(before[i])
        );
    }
    hold.close_stdin();
    hold.wait_line(&format!("released {CONNS}"), Duration::from_secs(60));
    // At most a quarter of what the burst added may stay (the HBONE connections close 2 s after
    // their last stream; the source's pool drops a closed one within 30 s; jemalloc purges
    // after 1 s).
    let settled =
        |i: usize, now: u64| now.saturating_sub(before[i]) <= held[i].saturating_sub(before[i]) / 4;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now: Vec<u64> = agents.iter().map(|&(_, pid)| anon(pid)).collect();
        if (0..agents.len()).all(|i| settled(i, now[i])) {
            for (i, &(node, _)) in agents.iter().enumerate() {
                eprintln!(
                    "agent {node}: anonymous memory {:.1} MiB before, {:.1} MiB with {CONNS} connections, {:.1} MiB after",
                    before[i] as f64 / MIB as f64,
                    held[i] as f64 / MIB as f64,
                    now[i] as f64 / MIB as f64
                );
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a minute after {CONNS} connections closed the agents still hold what they took: \
             anonymous memory before / with them / now, MiB: {}",
            agents
                .iter()
                .enumerate()
                .map(|(i, (node, _))| format!(
                    "{node} {:.1} / {:.1} / {:.1}",
                    before[i] as f64 / MIB as f64,
                    held[i] as f64 / MIB as f64,
                    now[i] as f64 / MIB as f64
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.down();
}
