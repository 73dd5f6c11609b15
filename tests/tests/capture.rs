//! End-to-end tests of eBPF capture with real agents in the lab (issue: foundation and
//! capture). Each test brings up its own lab (two nodes, one agent each), drives real
//! processes in pod namespaces and cgroups, and checks what the agents and the applications
//! saw. Every test ends by checking that its lab left nothing behind.

use std::{path::PathBuf, time::Duration};

use mesh_lab::{
    traffic::{connected, delivered, echoed, peer_of, send, serve, WAIT},
    wait_until, CaptureExclusions, Lab, LabOptions, Running,
};

const MIB_64: u64 = 64 << 20;

fn capture_events(lab: &Lab, node: &str, program: &str, reason: &str) -> f64 {
    lab.metric(
        node,
        "mesh_capture_events_total",
        &[("program", program), ("reason", reason)],
    )
}

fn opened(lab: &Lab, node: &str, direction: &str, pod: &str) -> f64 {
    let (namespace, workload) = pod.split_once('/').expect("ns/name");
    lab.metric(
        node,
        "mesh_tcp_connections_opened_total",
        &[
            ("direction", direction),
            ("namespace", namespace),
            ("workload", workload),
        ],
    )
}

/// Everything a lab created, to check after `down`.
struct Footprint {
    id: String,
    run_dir: PathBuf,
    cgroup_dir: PathBuf,
    bpf_dir: PathBuf,
    agent_pids: Vec<u32>,
}

fn footprint(lab: &Lab) -> Footprint {
    Footprint {
        id: lab.id().to_owned(),
        run_dir: lab.run_dir().to_owned(),
        cgroup_dir: lab.cgroup_dir().to_owned(),
        bpf_dir: lab.bpf_dir().to_owned(),
        agent_pids: lab
            .nodes()
            .iter()
            .filter_map(|n| lab.agent_pid(&n.name))
            .collect(),
    }
}

/// Tears the lab down and checks that no namespace, cgroup, pin or process is left.
fn down_and_check_clean(lab: Lab) {
    let f = footprint(&lab);
    assert_eq!(f.agent_pids.len(), 2, "both agents were running");
    lab.down();
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let prefix = format!("mlab-{}-", f.id);
    let left: Vec<_> = netns.iter().filter(|n| n.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "network namespaces left behind: {left:?}");
    for dir in [&f.run_dir, &f.cgroup_dir, &f.bpf_dir] {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    for pid in f.agent_pids {
        assert!(
            !PathBuf::from(format!("/proc/{pid}")).exists(),
            "agent {pid} still running"
        );
    }
}

#[test]
fn outbound_to_service_and_same_node_pod_is_captured_intact() {
    if !mesh_lab::require_privileged("outbound_to_service_and_same_node_pod_is_captured_intact") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let vip = lab.service_vip("shop/api");
    let db_ip = lab.pod("shop/db").ip;
    let _api = serve(&lab, "shop/api", 8080);
    let _db = serve(&lab, "shop/db", 9090);

    // Cross node, through the service VIP: 64 MiB each way, checksummed, half-closed.
    let out = send(&lab, "shop/client", &format!("{vip}:80"), MIB_64);
    assert_eq!(
        peer_of(connected(&out)),
        "127.0.0.1:15001",
        "the connect was not redirected: {out:?}"
    );
    // A dual-stack (IPv6) socket to the v4-mapped VIP goes through mesh_connect6 to the IPv4
    // listener, and the original destination comes back as the IPv4 VIP.
    let out = send(&lab, "shop/client", &format!("[::ffff:{vip}]:80"), 1 << 20);
    assert_eq!(
        peer_of(connected(&out)),
        "[::ffff:127.0.0.1]:15001",
        "connect6 did not redirect: {out:?}"
    );
    // Same node, straight to the pod address.
    let out = send(&lab, "shop/client", &format!("{db_ip}:9090"), MIB_64);
    assert_eq!(
        peer_of(connected(&out)),
        "127.0.0.1:15001",
        "the connect was not redirected: {out:?}"
    );

    // Each agent logs a connection's end once it closes: wait for every one of the three (the
    // first ones are logged long before the last), and for the destinations' sides. A line's
    // innermost span is the side it is about (the same-node delivery's inbound line is nested
    // in the outbound span).
    let api_ip = lab.pod("shop/api").ip;
    let closed = |node: &str, span: &str| -> Vec<String> {
        lab.agent_log(node)
            .lines()
            .filter(|l| {
                let spans = l.split_once("}: ").map_or("", |(spans, _)| spans);
                spans.rsplit("}:").next().is_some_and(|s| s.contains(span))
                    && l.contains("connection closed")
            })
            .map(str::to_owned)
            .collect()
    };
    wait_until(
        "n1 to log the three connections of shop/client closed, and shop/db's side",
        WAIT,
        || {
            closed("n1", "outbound{pod=shop/client").len() >= 3
                && !closed("n1", "inbound{pod=shop/db").is_empty()
        },
    );
    wait_until(
        "n2 to log both connections to shop/api closed",
        WAIT,
        || closed("n2", "inbound{pod=shop/api").len() >= 2,
    );
    // The client's agent logged both original destinations and the chosen endpoint.
    let outbound = closed("n1", "outbound{pod=shop/client");
    assert_eq!(outbound.len(), 3, "{outbound:#?}");
    let line = outbound
        .iter()
        .find(|l| l.contains(&format!("orig_dst={vip}:80")))
        .unwrap_or_else(|| panic!("n1 did not log orig_dst={vip}:80: {outbound:#?}"));
    assert!(line.contains(&format!("endpoint={api_ip}:8080")), "{line}");
    assert!(
        line.contains(&format!("sent={MIB_64} received={MIB_64}")),
        "{line}"
    );
    let line = outbound
        .iter()
        .find(|l| l.contains(&format!("orig_dst={db_ip}:9090")))
        .unwrap_or_else(|| panic!("n1 did not log orig_dst={db_ip}:9090: {outbound:#?}"));
    assert!(
        line.contains(&format!("sent={MIB_64} received={MIB_64}")),
        "{line}"
    );

    // Metrics prove it on both ends.
    assert_eq!(opened(&lab, "n1", "outbound", "shop/client"), 3.0);
    assert!(capture_events(&lab, "n1", "connect", "redirected") >= 3.0);
    assert!(capture_events(&lab, "n1", "sock_ops", "recorded") >= 3.0);
    assert_eq!(
        lab.metric(
            "n1",
            "mesh_tcp_sent_bytes_total",
            &[("direction", "outbound"), ("workload", "client")]
        ),
        (2 * MIB_64 + (1 << 20)) as f64
    );
    assert_eq!(
        opened(&lab, "n2", "inbound", "shop/api"),
        2.0,
        "n2 did not capture the inbound side"
    );
    assert_eq!(
        opened(&lab, "n1", "inbound", "shop/db"),
        1.0,
        "n1 did not capture the inbound side of db"
    );
    // Same node: the fast path (no HBONE to itself), and the destination's own log line names
    // the source identity.
    assert_eq!(
        lab.metric(
            "n1",
            "mesh_outbound_routes_total",
            &[("workload", "client"), ("transport", "local")]
        ),
        1.0
    );
    assert_eq!(
        lab.metric(
            "n1",
            "mesh_tcp_received_bytes_total",
            &[("direction", "inbound"), ("workload", "db")]
        ),
        MIB_64 as f64
    );
    let log = lab.agent_log("n1");
    assert!(
        log.lines().any(|l| l.contains("inbound{pod=shop/db")
            && l.contains("identity=spiffe://cluster.local/ns/shop/sa/client")
            && l.contains("connection closed")),
        "no inbound line for shop/db with the client's identity:\n{log}"
    );
    assert!(capture_events(&lab, "n2", "sk_lookup", "steered") >= 1.0);
    assert_eq!(
        lab.metric(
            "n1",
            "mesh_outbound_routes_total",
            &[("workload", "client"), ("route", "service")]
        ),
        2.0
    );
    assert_eq!(
        lab.metric(
            "n1",
            "mesh_outbound_routes_total",
            &[("workload", "client"), ("route", "direct")]
        ),
        1.0
    );
    down_and_check_clean(lab);
}

#[test]
fn inbound_from_an_unmeshed_client_is_captured_by_sk_lookup() {
    if !mesh_lab::require_privileged("inbound_from_an_unmeshed_client_is_captured_by_sk_lookup") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let api = lab.pod("shop/api").clone();
    let legacy = lab.pod("legacy/client").clone();
    let mut server = serve(&lab, "shop/api", 8080);
    let out = send(&lab, "legacy/client", &format!("{}:8080", api.ip), 1 << 20);
    // The client itself is not captured: it is connected to the real address...
    assert_eq!(peer_of(connected(&out)), format!("{}:8080", api.ip));
    // ...but the application received the connection from the agent (inside its own pod),
    // from the client's address.
    let accepted = server.wait_line("accepted", WAIT);
    assert!(
        delivered(&accepted) && peer_of(&accepted).starts_with(&format!("{}:", legacy.ip)),
        "not delivered by the agent from the client's address: {accepted}"
    );
    assert_eq!(opened(&lab, "n2", "inbound", "shop/api"), 1.0);
    assert!(capture_events(&lab, "n2", "sk_lookup", "steered") >= 1.0);
    let log = lab.agent_log("n2");
    assert!(
        log.lines()
            .any(|l| l.contains("inbound{pod=shop/api")
                && l.contains(&format!("src={}:", legacy.ip))),
        "n2 did not log the inbound connection from {}:\n{log}",
        legacy.ip
    );
    assert_eq!(opened(&lab, "n1", "outbound", "legacy/client"), 0.0);
    down_and_check_clean(lab);
}

#[test]
fn unmeshed_pods_and_loopback_are_not_captured() {
    if !mesh_lab::require_privileged("unmeshed_pods_and_loopback_are_not_captured") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let legacy_client = lab.pod("legacy/client").ip;
    let legacy_server = lab.pod("legacy/server").ip;
    let mut server = serve(&lab, "legacy/server", 8080);
    let out = send(
        &lab,
        "legacy/client",
        &format!("{legacy_server}:8080"),
        1 << 20,
    );
    assert_eq!(peer_of(connected(&out)), format!("{legacy_server}:8080"));
    let accepted = server.wait_line("accepted", WAIT);
    assert!(
        peer_of(&accepted).starts_with(&format!("{legacy_client}:")) && !delivered(&accepted),
        "{accepted}"
    );

    // Loopback inside a captured pod stays on loopback.
    let skipped = capture_events(&lab, "n1", "connect", "skip_loopback");
    let mut local = serve(&lab, "shop/client", 7000);
    let out = send(&lab, "shop/client", "127.0.0.1:7000", 1 << 20);
    assert_eq!(peer_of(connected(&out)), "127.0.0.1:7000");
    assert!(peer_of(&local.wait_line("accepted", WAIT)).starts_with("127.0.0.1:"));
    assert!(capture_events(&lab, "n1", "connect", "skip_loopback") > skipped);
    // IPv6 loopback (mesh_connect6) too.
    let skipped = capture_events(&lab, "n1", "connect", "skip_loopback");
    let mut local6 = Running::spawn(
        "IPv6 loopback echo server in shop/client",
        lab.command("shop/client", mesh_lab::labtool_bin())
            .args(["serve", "--port", "7006", "--bind", "::1"]),
    );
    local6.wait_line("listening", WAIT);
    let out = send(&lab, "shop/client", "[::1]:7006", 1 << 20);
    assert_eq!(peer_of(connected(&out)), "[::1]:7006");
    assert!(capture_events(&lab, "n1", "connect", "skip_loopback") > skipped);

    for node in ["n1", "n2"] {
        let metrics = lab.metrics(node);
        assert!(
            !metrics.contains("namespace=\"legacy\""),
            "{node} has metrics for legacy pods:\n{metrics}"
        );
        assert_eq!(
            lab.metric(node, "mesh_tcp_connections_opened_total", &[]),
            0.0,
            "{node} opened connections:\n{metrics}"
        );
    }
    down_and_check_clean(lab);
}

#[test]
fn excluded_ports_and_cidrs_are_not_captured() {
    if !mesh_lab::require_privileged("excluded_ports_and_cidrs_are_not_captured") {
        return;
    }
    let mut opts = LabOptions {
        global_capture: CaptureExclusions {
            exclude_outbound_ports: vec![7001],
            exclude_inbound_ports: vec![7002],
            ..CaptureExclusions::default()
        },
        ..LabOptions::default()
    };
    // shop/db alone excludes the other node's pod subnet, and inbound port 7003.
    let db = opts
        .topology
        .pods
        .iter_mut()
        .find(|p| p.namespace == "shop" && p.name == "db")
        .expect("shop/db");
    db.capture = Some(CaptureExclusions {
        exclude_outbound_cidrs: vec!["10.240.2.0/24".into()],
        exclude_inbound_ports: vec![7003],
        ..CaptureExclusions::default()
    });
    let lab = Lab::up(opts);
    let api = lab.pod("shop/api").ip;
    let db = lab.pod("shop/db").ip;
    let legacy = lab.pod("legacy/client").ip;
    let client = lab.pod("shop/client").ip;
    let mut s7001 = serve(&lab, "shop/api", 7001);
    let mut s7002 = serve(&lab, "shop/api", 7002);
    let mut s8080 = serve(&lab, "shop/api", 8080);
    let mut s7003 = serve(&lab, "shop/db", 7003);
    let mut s7004 = serve(&lab, "shop/db", 7004);

    // Global outbound port exclusion: shop/client connects straight to api:7001.
    let out = send(&lab, "shop/client", &format!("{api}:7001"), 1 << 20);
    assert_eq!(peer_of(connected(&out)), format!("{api}:7001"));
    assert!(capture_events(&lab, "n1", "connect", "skip_excluded_port") >= 1.0);
    // ...but api's inbound capture still applies: the agent delivers it (from the client's
    // address, with its mark).
    let accepted = s7001.wait_line("accepted", WAIT);
    assert!(delivered(&accepted), "{accepted}");
    assert!(
        peer_of(&accepted).starts_with(&format!("{client}:")),
        "{accepted}"
    );

    // Global inbound port exclusion: legacy/client reaches api:7002 directly.
    send(&lab, "legacy/client", &format!("{api}:7002"), 1 << 20);
    let accepted = s7002.wait_line("accepted", WAIT);
    assert!(peer_of(&accepted).starts_with(&format!("{legacy}:")) && !delivered(&accepted));
    assert!(capture_events(&lab, "n2", "sk_lookup", "skip_excluded_port") >= 1.0);

    // Per-pod CIDR exclusion: shop/db to the other node's subnet is direct; shop/client is not.
    let out = send(&lab, "shop/db", &format!("{api}:8080"), 1 << 20);
    assert_eq!(peer_of(connected(&out)), format!("{api}:8080"));
    assert!(capture_events(&lab, "n1", "connect", "skip_excluded_cidr") >= 1.0);
    s8080.wait_line("accepted", WAIT);
    let out = send(&lab, "shop/client", &format!("{api}:8080"), 1 << 20);
    assert_eq!(peer_of(connected(&out)), "127.0.0.1:15001");

    // Per-pod inbound exclusion: db's port 7003 is reached directly, its port 7004 is not.
    send(&lab, "legacy/client", &format!("{db}:7003"), 1 << 20);
    let accepted = s7003.wait_line("accepted", WAIT);
    assert!(peer_of(&accepted).starts_with(&format!("{legacy}:")) && !delivered(&accepted));
    send(&lab, "legacy/client", &format!("{db}:7004"), 1 << 20);
    let accepted = s7004.wait_line("accepted", WAIT);
    assert!(peer_of(&accepted).starts_with(&format!("{legacy}:")) && delivered(&accepted));
    down_and_check_clean(lab);
}

#[test]
fn enabling_captures_a_running_pod_and_disabling_keeps_established_connections() {
    if !mesh_lab::require_privileged(
        "enabling_captures_a_running_pod_and_disabling_keeps_established_connections",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let server_ip = lab.pod("legacy/server").ip;
    let target = format!("{server_ip}:8080");
    let _server = serve(&lab, "legacy/server", 8080);
    let captured = |node: &str| lab.metric(node, "mesh_captured_pods", &[]);
    assert_eq!(captured("n1"), 2.0, "n1 captures shop/client and shop/db");

    // A long-running process in legacy/client, started before its namespace is enabled.
    let mut shell = Running::spawn(
        "long-running process in legacy/client",
        lab.command("legacy/client", "sh")
            .args(["-c", "read line; exec \"$@\"", "sh"])
            .arg(mesh_lab::labtool_bin())
            .args(["stream", "--to", &target]),
    );
    lab.set_namespace_enabled("legacy", true);
    wait_until(
        "n1 and n2 to capture the legacy pods",
        Duration::from_secs(10),
        || captured("n1") == 3.0 && captured("n2") == 2.0,
    );
    // The same process (not restarted) now opens a connection: it is captured.
    shell.write_stdin_line("go");
    let line = shell.wait_line("connected", WAIT);
    assert_eq!(
        peer_of(&line),
        "127.0.0.1:15001",
        "the running pod was not captured: {line}"
    );
    shell.wait_line("progress", WAIT);
    assert_eq!(opened(&lab, "n1", "outbound", "legacy/client"), 1.0);

    // Disable: the pod is released, the established connection keeps transferring.
    lab.set_namespace_enabled("legacy", false);
    wait_until(
        "n1 to release legacy/client",
        Duration::from_secs(10),
        || captured("n1") == 2.0,
    );
    wait_until("n1 to log the release", WAIT, || {
        lab.agent_log("n1")
            .contains("pod released pod=legacy/client")
    });
    // Its progress lines queued up meanwhile: take them all, then wait for 4 MiB more.
    let at_release = echoed(&mut shell);
    wait_until(
        "the established connection to echo 4 MiB more after the release",
        Duration::from_secs(30),
        || echoed(&mut shell) >= at_release + (4 << 20),
    );
    // A new connection from the released pod goes direct.
    let out = send(&lab, "legacy/client", &target, 1 << 20);
    assert_eq!(peer_of(connected(&out)), target);
    // The old connection ends cleanly, every byte verified by the tool.
    shell.close_stdin();
    let out = shell.wait_success(WAIT);
    assert!(out.iter().any(|l| l.starts_with("ok total=")), "{out:?}");
    down_and_check_clean(lab);
}

#[test]
fn an_invalid_state_change_is_rejected_and_the_last_good_state_keeps_serving() {
    if !mesh_lab::require_privileged(
        "an_invalid_state_change_is_rejected_and_the_last_good_state_keeps_serving",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let good = lab.read_state();
    // Enable legacy and, in the same change, give legacy/client the address of shop/api.
    let mut bad = good.clone();
    let api_ip = lab.pod("shop/api").ip.to_string();
    for ns in bad["namespaces"].as_sequence_mut().expect("namespaces") {
        if ns["name"] == "legacy" {
            ns["enabled"] = true.into();
        }
    }
    for w in bad["workloads"].as_sequence_mut().expect("workloads") {
        if w["namespace"] == "legacy" && w["name"] == "client" {
            w["ips"] = vec![serde_yaml::Value::from(api_ip.clone())].into();
        }
    }
    lab.write_state(&bad);
    let reloads = |node: &str, result: &str| {
        lab.metric(node, "mesh_state_reloads_total", &[("result", result)])
    };
    wait_until("both agents to reject the change", WAIT, || {
        reloads("n1", "error") == 1.0 && reloads("n2", "error") == 1.0
    });
    let log = lab.agent_log("n1");
    assert!(
        log.contains(&format!(
            "workloads[3] (legacy/client).ips: {api_ip} is also the address of shop/api"
        )),
        "the rejection does not name the field:\n{log}"
    );
    // Nothing of the change was applied: legacy is still not captured, shop still is.
    assert_eq!(lab.metric("n1", "mesh_captured_pods", &[]), 2.0);
    let _api = serve(&lab, "shop/api", 8080);
    let vip = lab.service_vip("shop/api");
    let out = send(&lab, "shop/client", &format!("{vip}:80"), 1 << 20);
    assert_eq!(peer_of(connected(&out)), "127.0.0.1:15001");
    let legacy = send(&lab, "legacy/client", &format!("{api_ip}:8080"), 1 << 20);
    assert_eq!(peer_of(connected(&legacy)), format!("{api_ip}:8080"));
    // A valid change after the bad one applies.
    lab.write_state(&good);
    lab.set_namespace_enabled("legacy", true);
    wait_until("n1 to capture legacy/client", WAIT, || {
        lab.metric("n1", "mesh_captured_pods", &[]) == 3.0
    });
    assert!(reloads("n1", "ok") >= 1.0);
    down_and_check_clean(lab);
}
