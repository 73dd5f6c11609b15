//! End-to-end tests of agent restarts (issue: agent restarts). Real agents in the lab, killed,
//! restarted and upgraded while real processes in the pods connect: the mesh fails closed while
//! no agent runs (refused at once, never in plaintext), a new agent adopts what is pinned, and
//! an upgrade hands the listening sockets over without refusing or cutting a connection.
//!
//! Each test prints its figures as `FIGURE ...` lines (docs/operations.md quotes them).

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mesh_lab::{
    agent_bin, labtool_bin,
    pcap::{self, Pcap},
    traffic::{self, connected, peer_of, send, serve, WAIT},
    wait_until, Lab, LabOptions, Running,
};

/// Payload of connections that must never cross in clear (looked for on the underlay).
const LEAK_MARKER: &str = "MESH-LEAK-MARKER-0f3a";
/// Payload of an unmeshed connection, which does cross in clear (shows the capture works).
const CONTROL_MARKER: &str = "MESH-CONTROL-MARKER-77c1";

fn counter(lab: &Lab, node: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    lab.metric(node, name, labels)
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// A `mesh-labtool probe`: one connect attempt every 10 ms, one line each.
struct Probe {
    what: String,
    run: Running,
}

impl Probe {
    fn start(lab: &Lab, from: &str, to: &str) -> Probe {
        let what = format!("{from} -> {to}");
        let mut run = Running::spawn(
            &format!("probe {what}"),
            lab.command(from, labtool_bin())
                .args(["probe", "--to", to, "--interval-ms", "10"]),
        );
        run.wait_line("ok", WAIT);
        Probe { what, run }
    }

    /// Every attempt so far: outcome (`ok`, `refused`, `reset`, `timeout`, `error=N`) and the
    /// time it ended (µs since the epoch).
    fn attempts(&mut self) -> Vec<(String, u128)> {
        self.run
            .stdout_lines()
            .iter()
            .filter_map(|l| {
                let (outcome, at) = l.rsplit_once(' ')?;
                let outcome = outcome.split_whitespace().next()?.to_owned();
                Some((outcome, at.parse().ok()?))
            })
            .collect()
    }

    fn count_after(&mut self, outcome: &str, after: u128) -> usize {
        self.attempts()
            .iter()
            .filter(|(o, t)| o == outcome && *t > after)
            .count()
    }

    fn stop(mut self) {
        self.run.close_stdin();
        self.run.wait(WAIT);
    }
}

/// `mesh-labtool send` of `LEAK_MARKER` or `CONTROL_MARKER`; whether the echo came back whole.
fn send_marker(lab: &Lab, from: &str, to: &str, marker: &str) -> bool {
    Running::spawn(
        &format!("marker from {from} to {to}"),
        lab.command(from, labtool_bin())
            .args(["send", "--to", to, "--bytes", "65536", "--marker", marker]),
    )
    .wait(Duration::from_secs(30))
    .success()
}

/// The peers of the `accepted` lines an echo server printed so far.
fn accepted_peers(server: &mut Running) -> Vec<String> {
    server
        .stdout_lines()
        .iter()
        .filter(|l| l.starts_with("accepted"))
        .map(|l| peer_of(l).to_owned())
        .collect()
}

/// The peers of the `accepted` lines of connections that did not come through the node agent:
/// those without its mark (a delivered connection carries the agent's mark and, with the
/// client's address preserved, the client's address too).
fn direct_peers(server: &mut Running) -> Vec<String> {
    server
        .stdout_lines()
        .iter()
        .filter(|l| l.starts_with("accepted") && l.contains(" mark=0x0"))
        .map(|l| peer_of(l).to_owned())
        .collect()
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let key = format!("{key}=");
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key.as_str()))
        .map(|v| v.trim_end_matches(['}', ':']))
}

/// The link pins of a pod under a node's bpffs directory.
fn pod_pin_dir(lab: &Lab, node: &str, pod: &str) -> Option<PathBuf> {
    let suffix = format!(
        "{sep}{}",
        pod.replace('/', &mesh_common::pins::POD_DIR_SEPARATOR.to_string()),
        sep = mesh_common::pins::POD_DIR_SEPARATOR
    );
    let dir = lab
        .node(node)
        .bpf_dir
        .join(mesh_common::pins::ABI_DIR)
        .join(mesh_common::pins::PODS_DIR);
    std::fs::read_dir(&dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&suffix))
        })
}

/// Edits workload `pod` (`ns/name`) of the state file in place, or removes it (`None`).
fn edit_workload(lab: &Lab, pod: &str, edit: Option<&dyn Fn(&mut serde_yaml::Mapping)>) {
    let (ns, name) = pod.split_once('/').expect("ns/name");
    let mut state = lab.read_state();
    let list = state["workloads"]
        .as_sequence_mut()
        .expect("the state has a workloads list");
    let at = list
        .iter()
        .position(|w| w["namespace"].as_str() == Some(ns) && w["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no workload {pod} in the state"));
    match edit {
        Some(edit) => edit(list[at].as_mapping_mut().expect("a workload is a mapping")),
        None => {
            list.remove(at);
        }
    }
    lab.write_state(&state);
}

/// The last line of a log that reports the reconciliation with the pinned capture.
fn reconciled_line(log: &str) -> Option<String> {
    log.lines()
        .rfind(|l| l.contains("capture reconciled with what was pinned"))
        .map(str::to_owned)
}

#[test]
fn a_killed_agent_leaves_its_pods_closed_and_a_restarted_one_serves_them_again() {
    if !mesh_lab::require_privileged(
        "a_killed_agent_leaves_its_pods_closed_and_a_restarted_one_serves_them_again",
    ) {
        return;
    }
    let mut lab = Lab::up(LabOptions::default());
    let client_ip = lab.pod("shop/client").ip;
    let legacy_ip = lab.pod("legacy/client").ip;
    let db = format!("{}:9090", lab.pod("shop/db").ip);
    let api = format!("{}:8080", lab.pod("shop/api").ip);
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let legacy_server = format!("{}:7070", lab.pod("legacy/server").ip);
    let mut db_server = serve(&lab, "shop/db", 9090);
    let mut api_server = serve(&lab, "shop/api", 8080);
    let _legacy_server = serve(&lab, "legacy/server", 7070);

    // Connect attempts every 10 ms on the paths through n1's agent: shop/client's outbound
    // (same node, cross node by pod address and by VIP) and inbound to shop/db from a pod
    // outside the mesh.
    let paths = [
        ("shop/client", db.as_str()),
        ("shop/client", api.as_str()),
        ("shop/client", vip.as_str()),
        ("legacy/client", db.as_str()),
    ];
    let mut probes: Vec<Probe> = paths
        .iter()
        .map(|(from, to)| Probe::start(&lab, from, to))
        .collect();
    let capture = Pcap::start(&lab, "outage");

    let killed_at = now_us();
    let killed = lab.signal_agent("n1", libc::SIGKILL);
    let gone_at = now_us();
    for probe in &mut probes {
        let what = probe.what.clone();
        wait_until(&format!("{what} to be refused 20 times"), WAIT, || {
            probe.count_after("refused", gone_at) >= 20
        });
    }
    // Promptly refused, never left hanging, never served by anyone after the agent was gone.
    // (An attempt caught in the agent's last moment, queued on its listener as it closed, is
    // reset instead: failed just as well.)
    for probe in &mut probes {
        let attempts = probe.attempts();
        let first = attempts
            .iter()
            .find(|(o, t)| *t > killed_at && o != "ok")
            .unwrap_or_else(|| panic!("{}: no failed attempt: {attempts:?}", probe.what));
        assert!(
            first.0 == "refused" || first.0 == "reset",
            "{}: {attempts:?}",
            probe.what
        );
        let after_kill =
            Duration::from_micros(u64::try_from(first.1 - killed_at).unwrap_or(u64::MAX));
        eprintln!(
            "FIGURE kill -9: {} failed ({}) {:.1} ms after the kill",
            probe.what,
            first.0,
            after_kill.as_secs_f64() * 1e3
        );
        // A bound that only a hang would cross; the figure is the measure.
        assert!(
            after_kill < Duration::from_secs(2),
            "{}: first refused {after_kill:?} after the kill",
            probe.what
        );
        let bad: Vec<_> = attempts
            .iter()
            .filter(|(o, t)| *t > gone_at + 50_000 && o != "refused")
            .collect();
        assert!(
            bad.is_empty(),
            "{}: attempts not refused after the agent was gone: {bad:?}",
            probe.what
        );
    }
    // Data sent on those paths goes nowhere; an unmeshed pair keeps talking in clear.
    for (from, to) in paths {
        assert!(
            !send_marker(&lab, from, to, LEAK_MARKER),
            "{from} -> {to} got through with no agent on n1"
        );
    }
    assert!(
        send_marker(&lab, "legacy/client", &legacy_server, CONTROL_MARKER),
        "legacy/client -> legacy/server (outside the mesh) broke while n1's agent was down"
    );
    // The control transfer went last: once the capture shows it, it holds everything before.
    capture.wait_for(CONTROL_MARKER.as_bytes(), WAIT);
    let file = capture.stop();
    assert!(
        !pcap::contains(&file, LEAK_MARKER.as_bytes()),
        "a payload from n1's captured pods crossed the underlay in clear ({})",
        file.display()
    );
    // Nor did shop/client send a byte outside HBONE (tshark's reading of the same capture).
    let clear = pcap::tshark(
        &file,
        &format!("ip.src == {client_ip} && tcp.len > 0 && tcp.dstport != 15008"),
        "frame.number",
    );
    assert!(
        clear.is_empty(),
        "shop/client sent {} payload packets outside HBONE with no agent on n1",
        clear.len()
    );
    assert!(!lab.agent_running(killed));

    // Started again, with nothing else done: the same paths work, through the mesh.
    let started_at = now_us();
    let new = lab.start_agent("n1").expect("restarting n1's agent");
    for probe in &mut probes {
        let what = probe.what.clone();
        wait_until(&format!("{what} to connect again"), WAIT, || {
            probe.count_after("ok", started_at) >= 5
        });
        let first_ok = probe
            .attempts()
            .iter()
            .find(|(o, t)| *t > started_at && o == "ok")
            .map(|(_, t)| *t)
            .unwrap_or_default();
        eprintln!(
            "FIGURE restart: {what} served again {:.0} ms after the new agent was started",
            first_ok.saturating_sub(started_at) as f64 / 1e3
        );
    }
    for probe in probes {
        probe.stop();
    }
    let out = send(&lab, "shop/client", &vip, 1 << 20);
    assert_eq!(peer_of(connected(&out)), "127.0.0.1:15001", "{out:?}");
    send(&lab, "shop/client", &db, 1 << 20);
    send(&lab, "legacy/client", &db, 1 << 20);
    assert!(
        counter(
            &lab,
            "n1",
            "mesh_outbound_routes_total",
            &[("workload", "client"), ("transport", "hbone")]
        ) >= 1.0,
        "the new agent did not route shop/client through HBONE"
    );
    let log = lab.agent_log_of(new);
    assert!(
        log.lines().any(|l| l.contains("inbound{pod=shop/db")
            && l.contains(&format!("src={legacy_ip}:"))
            && l.contains("connection closed")),
        "the new agent did not serve legacy/client -> shop/db:\n{log}"
    );
    wait_until("n2 to log the client's identity", WAIT, || {
        lab.agent_log("n2").lines().any(|l| {
            l.contains("inbound{pod=shop/api")
                && l.contains("identity=spiffe://cluster.local/ns/shop/sa/client")
                && l.contains("connection closed")
        })
    });
    // At the destinations, no connection ever came from the clients themselves (what a
    // plaintext bypass would show): only the agents delivered (with their mark).
    for (server, name) in [(&mut db_server, "shop/db"), (&mut api_server, "shop/api")] {
        assert!(
            !accepted_peers(server).is_empty(),
            "{name} accepted nothing"
        );
        let direct: Vec<_> = direct_peers(server)
            .into_iter()
            .filter(|p| {
                p.starts_with(&format!("{client_ip}:")) || p.starts_with(&format!("{legacy_ip}:"))
            })
            .collect();
        assert!(
            direct.is_empty(),
            "{name} accepted connections straight from a client: {direct:?}"
        );
    }
    lab.down();
}

#[test]
fn a_new_agent_adopts_the_pinned_capture_and_releases_what_left_while_none_ran() {
    if !mesh_lab::require_privileged(
        "a_new_agent_adopts_the_pinned_capture_and_releases_what_left_while_none_ran",
    ) {
        return;
    }
    let mut lab = Lab::up(LabOptions::default());
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let db_ip = lab.pod("shop/db").ip;
    let _api = serve(&lab, "shop/api", 8080);
    let mut db_server = serve(&lab, "shop/db", 9090);
    let first = lab.agent_pid("n1").expect("n1 has an agent");
    let captured_cookie = |log: &str, how: &str| {
        log.lines()
            .find(|l| l.contains(how) && l.contains("pod=shop/client"))
            .and_then(|l| field(l, "netns_cookie").map(str::to_owned))
    };
    let cookie = captured_cookie(&lab.agent_log_of(first), "pod captured")
        .expect("the first agent logged shop/client captured");
    let client_pins = pod_pin_dir(&lab, "n1", "shop/client").expect("shop/client has link pins");
    assert!(pod_pin_dir(&lab, "n1", "shop/db").is_some());

    lab.signal_agent("n1", libc::SIGKILL);
    // While no agent runs: shop/db leaves the state, and one of shop/client's links is lost
    // (its pin removed, so it detaches: what root on the node, or a bpffs mishap, can do).
    edit_workload(&lab, "shop/db", None);
    let lost = client_pins.join(mesh_common::programs::CONNECT4);
    std::fs::remove_file(&lost).unwrap_or_else(|e| panic!("removing {}: {e}", lost.display()));

    let second = lab.start_agent("n1").expect("restarting n1's agent");
    let log = lab.agent_log_of(second);
    let line = reconciled_line(&log).unwrap_or_else(|| panic!("no reconciliation logged:\n{log}"));
    eprintln!("FIGURE crash recovery: {line}");
    for (key, want) in [
        ("captured", "0"),
        ("adopted", "0"),
        ("reattached", "1"),
        ("released", "1"),
        ("closed", "0"),
        ("failed", "0"),
    ] {
        assert_eq!(field(&line, key), Some(want), "{key} in {line}");
    }
    // The same network namespace, served again (not captured anew).
    assert_eq!(
        captured_cookie(&log, "pod adopted, links attached again").as_deref(),
        Some(cookie.as_str()),
        "shop/client was not adopted in place:\n{log}"
    );
    assert!(log.contains("pinned pod released (no longer in the state)"));
    assert_eq!(
        counter(
            &lab,
            "n1",
            "mesh_capture_pod_changes_total",
            &[("change", "reattached")]
        ),
        1.0
    );
    assert!(lost.exists(), "the lost link was not pinned again");
    assert!(
        pod_pin_dir(&lab, "n1", "shop/db").is_none(),
        "shop/db's link pins are still there"
    );
    assert!(lab.agent_ready("n1"));

    // shop/client is redirected again (the re-attached connect4) and served through HBONE.
    let out = send(&lab, "shop/client", &vip, 1 << 20);
    assert_eq!(peer_of(connected(&out)), "127.0.0.1:15001", "{out:?}");
    // shop/db is out of the mesh: its own connections go straight, and a connection to it
    // arrives from the client itself.
    let api = format!("{}:8080", lab.pod("shop/api").ip);
    let out = send(&lab, "shop/db", &api, 1 << 16);
    assert_eq!(peer_of(connected(&out)), api, "shop/db is still captured");
    let legacy_ip = lab.pod("legacy/client").ip;
    send(&lab, "legacy/client", &format!("{db_ip}:9090"), 1 << 16);
    wait_until("shop/db to accept legacy/client directly", WAIT, || {
        direct_peers(&mut db_server)
            .iter()
            .any(|p| p.starts_with(&format!("{legacy_ip}:")))
    });
    lab.down();
}

#[test]
fn a_changed_service_account_is_the_identity_of_new_connections() {
    if !mesh_lab::require_privileged("a_changed_service_account_is_the_identity_of_new_connections")
    {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let _api = serve(&lab, "shop/api", 8080);
    let identity = |sa: &str| format!("identity=spiffe://cluster.local/ns/shop/sa/{sa} ");
    let inbound_with = |lab: &Lab, sa: &str| {
        lab.agent_log("n2")
            .lines()
            .filter(|l| {
                l.contains("inbound{pod=shop/api")
                    && l.contains(&identity(sa))
                    && l.contains("connection closed")
            })
            .count()
    };
    send(&lab, "shop/client", &vip, 1 << 16);
    wait_until("n2 to log the old identity", WAIT, || {
        inbound_with(&lab, "client") == 1
    });
    // A long-lived connection opened before the change.
    let mut stream = traffic::stream(&lab, "shop/client", &vip);

    edit_workload(
        &lab,
        "shop/client",
        Some(&|w| {
            w.insert("service_account".into(), "client-v2".into());
        }),
    );
    wait_until("n1 to apply the new service account", WAIT, || {
        lab.agent_log("n1")
            .lines()
            .any(|l| l.contains("service account changed") && l.contains("sa/client-v2"))
    });
    send(&lab, "shop/client", &vip, 1 << 16);
    wait_until("n2 to log the new identity", WAIT, || {
        inbound_with(&lab, "client-v2") == 1
    });
    assert_eq!(
        inbound_with(&lab, "client"),
        1,
        "a new connection still carried the old identity:\n{}",
        lab.agent_log("n2")
    );
    // The connection opened before the change is not cut by it.
    let before = stream.wait_line("progress", WAIT);
    assert_ne!(stream.wait_line("progress", WAIT), before);
    stream.close_stdin();
    stream.wait_success(WAIT);
    lab.down();
}

#[test]
fn sigterm_keeps_capture_and_only_uninstall_releases_it() {
    if !mesh_lab::require_privileged("sigterm_keeps_capture_and_only_uninstall_releases_it") {
        return;
    }
    let mut lab = Lab::up(LabOptions::default());
    let db = format!("{}:9090", lab.pod("shop/db").ip);
    let legacy_server = format!("{}:7070", lab.pod("legacy/server").ip);
    let api = format!("{}:8080", lab.pod("shop/api").ip);
    let _db = serve(&lab, "shop/db", 9090);
    let _legacy = serve(&lab, "legacy/server", 7070);
    let _api = serve(&lab, "shop/api", 8080);

    // SIGTERM (a node drain: no successor) while shop/api holds a connection to shop/db
    // through n1's HBONE inbound: n1's agent keeps serving, new connections included, each
    // on a pooled HBONE connection (not a handshake per stream).
    let mut stream = traffic::stream(&lab, "shop/api", &db);
    let opened = |lab: &Lab| counter(lab, "n2", "mesh_hbone_connections_opened_total", &[]);
    let opened_before = opened(&lab);
    let pid = lab.signal_agent("n1", libc::SIGTERM);
    wait_until("n1 to log SIGTERM", WAIT, || {
        lab.agent_log_of(pid)
            .contains("SIGTERM: capture stays in place")
    });
    let load = Running::spawn(
        "rr from shop/api",
        lab.command("shop/api", labtool_bin()).args([
            "rr",
            "--to",
            &db,
            "--new-conn",
            "--rate",
            "100",
            "--conns",
            "4",
            "--warmup-secs",
            "0",
            "--duration-secs",
            "2",
        ]),
    )
    .wait_success(Duration::from_secs(30));
    assert!(load[0].contains("\"errors\":0,"), "{load:?}");
    let handshakes = opened(&lab) - opened_before;
    assert!(
        handshakes <= 8.0,
        "{handshakes} HBONE handshakes for 200 connections to a draining agent"
    );
    assert!(
        lab.agent_running(pid),
        "n1's agent left with a connection open"
    );
    // Its last connection ends: it exits. Capture stays, and shop/client is refused rather
    // than let through.
    stream.close_stdin();
    stream.wait_success(WAIT);
    assert!(
        lab.wait_agent_exit(pid, Duration::from_secs(90)),
        "agent {pid} did not exit"
    );
    let log = lab.agent_log_of(pid);
    assert!(
        !log.contains("pod released"),
        "SIGTERM released pods:\n{log}"
    );
    let mut probe = Probe::start_failing(&lab, "shop/client", &db);
    let gone = now_us();
    wait_until("shop/client to be refused", WAIT, || {
        probe.count_after("refused", gone) >= 3
    });
    assert_eq!(probe.count_after("ok", gone), 0);
    probe.stop();
    assert!(pod_pin_dir(&lab, "n1", "shop/client").is_some());

    // Uninstall with no agent running: the pins go, the pods connect straight.
    let out = uninstall(&lab, "n1");
    assert!(
        out.contains("no agent was running; released 2 pods"),
        "{out}"
    );
    assert!(pod_pin_dir(&lab, "n1", "shop/client").is_none());
    assert!(pod_pin_dir(&lab, "n1", "shop/db").is_none());
    let out = send(&lab, "shop/client", &db, 1 << 16);
    assert_eq!(
        peer_of(connected(&out)),
        db,
        "shop/client is still captured"
    );

    // Uninstall through the running agent of n2: it releases its pods, then drains and exits.
    let n2 = lab.agent_pid("n2").expect("n2 has an agent");
    let out = uninstall(&lab, "n2");
    assert!(
        out.contains(&format!("the running agent (pid {n2}) released 1 pod ")),
        "{out}"
    );
    assert!(lab.wait_agent_exit(n2, WAIT), "n2's agent did not exit");
    assert!(pod_pin_dir(&lab, "n2", "shop/api").is_none());
    let log = lab.agent_log_of(n2);
    assert!(
        log.contains("pod released (uninstall)"),
        "n2 did not log the release:\n{log}"
    );
    // legacy/server is not meshed; shop/api now takes connections straight.
    let out = send(&lab, "legacy/client", &api, 1 << 16);
    assert_eq!(peer_of(connected(&out)), api);
    send(&lab, "legacy/client", &legacy_server, 1 << 16);
    lab.down();
}

impl Probe {
    /// A probe on a path that is expected to fail (no first `ok` to wait for).
    fn start_failing(lab: &Lab, from: &str, to: &str) -> Probe {
        let what = format!("{from} -> {to}");
        let run = Running::spawn(
            &format!("probe {what}"),
            lab.command(from, labtool_bin())
                .args(["probe", "--to", to, "--interval-ms", "10"]),
        );
        Probe { what, run }
    }
}

/// `mesh-agent node --config <n's config> --uninstall` on node `node`; its stdout.
fn uninstall(lab: &Lab, node: &str) -> String {
    let config = lab.agent_config_path(node);
    Running::spawn(
        &format!("mesh-agent --uninstall on {node}"),
        lab.command(node, agent_bin())
            .arg("node")
            .arg("--config")
            .arg(&config)
            .arg("--uninstall"),
    )
    .wait_success(Duration::from_secs(30))
    .join("\n")
}

/// Under load: new connections at 500/s (same node and cross node, both directions of n1)
/// and 20 long-lived streams, while n1's agent is upgraded. Nothing refused, reset or cut.
#[test]
fn an_upgrade_under_load_refuses_nothing_and_cuts_no_connection() {
    if !mesh_lab::require_privileged("an_upgrade_under_load_refuses_nothing_and_cuts_no_connection")
    {
        return;
    }
    let mut lab = Lab::up(LabOptions::default());
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let db = format!("{}:9090", lab.pod("shop/db").ip);
    let _api = serve(&lab, "shop/api", 8080);
    let _db = serve(&lab, "shop/db", 9090);

    // 20 streams: shop/client -> api (VIP, n1 outbound over HBONE), shop/client -> db (n1
    // same node), shop/api -> db (n2 -> n1's HBONE inbound).
    let plan = [
        ("shop/client", vip.as_str(), 7),
        ("shop/client", db.as_str(), 7),
        ("shop/api", db.as_str(), 6),
    ];
    let mut streams: Vec<Running> = Vec::new();
    for (from, to, n) in plan {
        for i in 0..n {
            let mut s = Running::spawn(
                &format!("stream {i} {from} -> {to}"),
                lab.command(from, labtool_bin()).args([
                    "stream",
                    "--to",
                    to,
                    "--seed",
                    &(streams.len() + 1).to_string(),
                    "--interval-ms",
                    "20",
                ]),
            );
            s.wait_line("progress", WAIT);
            streams.push(s);
        }
    }
    // New connections at 500/s in all: 200/s each from shop/client, 100/s from shop/api.
    let load_secs = 12;
    let rr: Vec<Running> = [
        ("shop/client", vip.as_str(), 200),
        ("shop/client", db.as_str(), 200),
        ("shop/api", db.as_str(), 100),
    ]
    .iter()
    .map(|(from, to, rate)| {
        Running::spawn(
            &format!("rr {from} -> {to}"),
            lab.command(from, labtool_bin()).args([
                "rr",
                "--to",
                to,
                "--new-conn",
                "--rate",
                &rate.to_string(),
                "--conns",
                "8",
                "--size",
                "256",
                "--warmup-secs",
                "0",
                "--duration-secs",
                &load_secs.to_string(),
            ]),
        )
    })
    .collect();
    // Let the load settle, then upgrade in the middle of it.
    let settle = Instant::now();
    wait_until("the load to run for 3 s", Duration::from_secs(5), || {
        settle.elapsed() >= Duration::from_secs(3)
    });
    let upgrade = lab.upgrade_agent("n1", None).expect("upgrading n1's agent");
    let old = upgrade.old.expect("an agent was running on n1");
    eprintln!(
        "FIGURE upgrade: agent {} took over from {old} in {:.0} ms",
        upgrade.new,
        upgrade.took_over.as_secs_f64() * 1e3
    );
    // The old agent keeps the streams (it drains); they keep flowing.
    for s in &mut streams {
        let before = s.wait_line("progress", WAIT);
        assert_ne!(s.wait_line("progress", WAIT), before);
    }
    assert!(
        lab.agent_running(old),
        "the old agent did not wait for its streams"
    );

    let mut requests = 0.0;
    for (i, mut r) in rr.into_iter().enumerate() {
        let out = r.wait(Duration::from_secs(load_secs + 30));
        let lines = r.stdout_lines();
        let report = lines
            .iter()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("rr {i} printed no report: {lines:?} {}", r.stderr()));
        let number = |key: &str| -> f64 {
            let at = report
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("no {key} in {report}"));
            let rest = &report[at + key.len() + 3..];
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            rest[..end]
                .parse()
                .unwrap_or_else(|e| panic!("{key} in {report}: {e}"))
        };
        eprintln!("FIGURE upgrade load {i}: {report}");
        assert_eq!(number("errors"), 0.0, "rr {i} failed requests: {report}");
        assert!(out.success(), "rr {i}: {report}");
        requests += number("requests");
    }
    eprintln!("FIGURE upgrade: {requests:.0} new connections during the run, 0 refused or reset");

    let closing = Instant::now();
    let mut intact = 0;
    for s in &mut streams {
        s.close_stdin();
    }
    for s in &mut streams {
        let out = s.wait_success(WAIT);
        assert!(out.iter().any(|l| l.starts_with("ok total=")), "{out:?}");
        intact += 1;
    }
    eprintln!("FIGURE upgrade: {intact} of 20 long-lived streams intact");
    assert!(
        lab.wait_agent_exit(old, Duration::from_secs(30)),
        "the old agent did not exit once its connections ended:\n{}",
        lab.agent_log_of(old)
    );
    eprintln!(
        "FIGURE upgrade: old agent exited {:.0} ms after its last stream was closed",
        closing.elapsed().as_secs_f64() * 1e3
    );
    let log = lab.agent_log_of(old);
    assert!(
        !log.contains("pod released"),
        "the handover released pods:\n{log}"
    );
    assert!(
        counter(
            &lab,
            "n1",
            "mesh_handovers_total",
            &[("role", "taker"), ("result", "ok")]
        ) == 1.0,
        "{}",
        lab.metrics("n1")
    );
    lab.down();
}

/// A captured pod the agent cannot serve (here: a process in the pod holds the port of the
/// agent's outbound listener) is closed, not left open: attached, its inbound refused, its
/// outbound never reaching anyone but itself; the node is not ready and says why. Once the
/// port is free, the retry serves it.
#[test]
fn a_pod_that_cannot_be_served_is_closed_and_the_node_not_ready() {
    if !mesh_lab::require_privileged("a_pod_that_cannot_be_served_is_closed_and_the_node_not_ready")
    {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let db = format!("{}:9090", lab.pod("shop/db").ip);
    let client = format!("{}:7000", lab.pod("shop/client").ip);
    let mut db_server = serve(&lab, "shop/db", 9090);
    let _client_server = serve(&lab, "shop/client", 7000);
    lab.set_namespace_enabled("shop", false);
    wait_until("n1 to release shop/client", WAIT, || {
        lab.agent_log("n1").contains("pod released pod=shop/client")
    });
    let mut squatter = Running::spawn(
        "a process of shop/client on 127.0.0.1:15001",
        lab.command("shop/client", labtool_bin()).args([
            "serve",
            "--port",
            "15001",
            "--bind",
            "127.0.0.1",
        ]),
    );
    squatter.wait_line("listening", WAIT);
    lab.set_namespace_enabled("shop", true);
    wait_until("n1 to close shop/client", WAIT, || {
        lab.agent_log("n1").contains("pod closed")
    });
    // Readiness is set once the reconciliation that logged it is done.
    let readiness = || {
        lab.http_get("n1", mesh_lab::READINESS_PORT, "/healthz/ready")
            .expect("readiness of n1")
    };
    wait_until("n1 to turn not ready", WAIT, || readiness().0 != 200);
    let why = readiness();
    assert!(why.1.contains("shop/client"), "{why:?}");
    assert_eq!(counter(&lab, "n1", "mesh_closed_pods", &[]), 1.0);
    // Closed: inbound is refused; outbound is redirected into the pod's own process, never
    // out to its destination.
    let mut inbound = Probe::start_failing(&lab, "legacy/client", &client);
    let mut outbound = Probe::start_failing(&lab, "shop/client", &db);
    wait_until("attempts on both paths", WAIT, || {
        inbound.count_after("refused", 0) >= 5 && outbound.attempts().len() >= 5
    });
    assert_eq!(inbound.count_after("ok", 0), 0, "inbound got through");
    inbound.stop();
    outbound.stop();
    assert!(
        accepted_peers(&mut db_server).is_empty(),
        "shop/db got a connection from a closed pod"
    );
    assert!(
        accepted_peers(&mut squatter).len() >= 5,
        "the redirected connects went elsewhere"
    );

    // The port is free again: the next retry serves the pod.
    squatter.kill();
    wait_until("n1 to be ready again", Duration::from_secs(20), || {
        lab.agent_ready("n1")
    });
    assert_eq!(counter(&lab, "n1", "mesh_closed_pods", &[]), 0.0);
    let out = send(&lab, "shop/client", &db, 1 << 16);
    assert_eq!(peer_of(connected(&out)), "127.0.0.1:15001", "{out:?}");
    send(&lab, "legacy/client", &client, 1 << 16);
    lab.down();
}

/// An old agent keeps its connections only until the drain deadline; then it resets what is
/// left (an application sees an error, never a clean end) and exits.
#[test]
fn the_drain_deadline_resets_what_is_left_and_the_old_agent_exits() {
    if !mesh_lab::require_privileged(
        "the_drain_deadline_resets_what_is_left_and_the_old_agent_exits",
    ) {
        return;
    }
    let mut lab = Lab::up(LabOptions {
        drain_timeout_secs: 2,
        ..LabOptions::default()
    });
    let db = format!("{}:9090", lab.pod("shop/db").ip);
    let _db = serve(&lab, "shop/db", 9090);
    let mut stream = traffic::stream(&lab, "shop/client", &db);
    let upgrade = lab.upgrade_agent("n1", None).expect("upgrading n1's agent");
    let old = upgrade.old.expect("an agent was running on n1");
    let started = Instant::now();
    assert!(
        lab.wait_agent_exit(old, Duration::from_secs(30)),
        "the old agent outlived its drain deadline"
    );
    let after = started.elapsed();
    eprintln!(
        "FIGURE drain deadline 2 s: old agent exited {:.1} s after the handover",
        after.as_secs_f64()
    );
    assert!(
        after >= Duration::from_secs(1),
        "the old agent left before its deadline ({after:?}) with a stream open"
    );
    let status = stream.wait(WAIT);
    assert!(!status.success(), "the stream ended cleanly");
    let log = lab.agent_log_of(old);
    assert!(
        log.contains("drain deadline passed: open connections are reset"),
        "{log}"
    );
    // The new agent serves the same path.
    let out = send(&lab, "shop/client", &db, 1 << 16);
    assert_eq!(peer_of(connected(&out)), "127.0.0.1:15001", "{out:?}");
    lab.down();
}
