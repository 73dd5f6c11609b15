//! End-to-end tests of the paths around the agent that issue 12 (security review) closes. Each
//! first shows the path exists (the same connection succeeds while the pod is not captured),
//! then that capture closes it.

use std::time::Duration;

use mesh_lab::{
    certs, labtool_bin, metric_value,
    traffic::{self, delivered, peer_of, serve, WAIT},
    wait_until, Lab, LabOptions, Running,
};

fn capture_events(lab: &Lab, node: &str, reason: &str) -> f64 {
    metric_value(
        &lab.metrics(node),
        "mesh_capture_events_total",
        &[("program", "sk_lookup"), ("reason", reason)],
    )
    .unwrap_or_else(|| panic!("no sk_lookup/{reason} sample in the metrics of {node}"))
}

/// `mesh-labtool connect`: whether the connection was established, and the tool's output.
fn connects(lab: &Lab, from: &str, to: &str) -> (bool, String) {
    let mut run = Running::spawn(
        &format!("connect from {from} to {to}"),
        lab.command(from, labtool_bin())
            .args(["connect", "--to", to]),
    );
    let line = run.wait_line("", Duration::from_secs(20));
    (run.wait(WAIT).success(), line)
}

fn run_ok(lab: &Lab, target: &str, program: &str, args: &[&str]) {
    let mut run = Running::spawn(
        &format!("{program} {args:?} in {target}"),
        lab.command(target, program).args(args),
    );
    run.wait_success(WAIT);
}

fn set_captured(lab: &Lab, captured: bool) {
    lab.set_namespace_enabled("shop", captured);
    let want = if captured { 2.0 } else { 0.0 };
    wait_until(&format!("n1 to have {want} captured pods"), WAIT, || {
        metric_value(&lab.metrics("n1"), "mesh_captured_pods", &[]) == Some(want)
    });
}

/// A captured pod's address the state does not list (here a secondary address), and the
/// agent's own ports on its listed address, never reach the application around the agent.
#[test]
fn unlisted_addresses_and_the_agents_ports_of_a_captured_pod_are_dropped() {
    if !mesh_lab::require_privileged(
        "unlisted_addresses_and_the_agents_ports_of_a_captured_pod_are_dropped",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let db = lab.pod("shop/db").clone();
    let legacy = lab.pod("legacy/client").ip;
    // shop/db gets a second address the state does not list, routed from its node.
    let secondary = "10.240.1.50";
    run_ok(
        &lab,
        "shop/db",
        "ip",
        &["addr", "add", &format!("{secondary}/32"), "dev", "eth0"],
    );
    run_ok(
        &lab,
        "n1",
        "ip",
        &[
            "route",
            "add",
            &format!("{secondary}/32"),
            "dev",
            &db.host_veth,
        ],
    );
    let mut app = serve(&lab, "shop/db", 9090);
    let mut squatter = serve(&lab, "shop/db", 15020);
    let unlisted = format!("{secondary}:9090");
    let reserved = format!("{}:15020", db.ip);

    // Not captured: both paths reach the application (so the test can see a bypass).
    set_captured(&lab, false);
    for to in [&unlisted, &reserved] {
        let (ok, out) = connects(&lab, "legacy/client", to);
        assert!(ok, "{to} is not reachable even without capture: {out}");
    }
    app.wait_line("accepted", WAIT);
    squatter.wait_line("accepted", WAIT);

    // Captured: both are dropped in the kernel (the client is refused), and counted.
    set_captured(&lab, true);
    let unlisted_before = capture_events(&lab, "n1", "drop_unlisted_address");
    let reserved_before = capture_events(&lab, "n1", "drop_reserved_port");
    let (ok, out) = connects(&lab, "legacy/client", &unlisted);
    assert!(!ok && out.contains("refused"), "{unlisted}: {out}");
    let (ok, out) = connects(&lab, "legacy/client", &reserved);
    assert!(!ok && out.contains("refused"), "{reserved}: {out}");
    assert!(capture_events(&lab, "n1", "drop_unlisted_address") > unlisted_before);
    assert!(capture_events(&lab, "n1", "drop_reserved_port") > reserved_before);
    // The listed address and an ordinary port still work, through the agent.
    let (ok, out) = connects(&lab, "legacy/client", &format!("{}:9090", db.ip));
    assert!(ok, "{out}");
    let accepted = app.wait_line("accepted", WAIT);
    assert!(
        delivered(&accepted),
        "not delivered by the agent: {accepted}"
    );
    // Nothing else reached either application from legacy/client since the first two.
    let direct: Vec<String> = [&mut app, &mut squatter]
        .into_iter()
        .flat_map(|s| s.stdout_lines())
        .filter(|l| {
            l.starts_with("accepted")
                && peer_of(l).starts_with(&format!("{legacy}:"))
                && !delivered(l)
        })
        .collect();
    assert_eq!(direct.len(), 2, "{direct:?}");
    lab.down();
}

/// An HBONE CONNECT names the pod the tunnel reached, and no other: not another pod of the
/// same node, not a pod of another node.
#[test]
fn a_connect_authority_must_name_the_pod_the_tunnel_reached() {
    if !mesh_lab::require_privileged("a_connect_authority_must_name_the_pod_the_tunnel_reached") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let db = lab.pod("shop/db").ip;
    let client = lab.pod("shop/client").ip;
    let api = lab.pod("shop/api").ip;
    let _db = serve(&lab, "shop/db", 9090);
    let _client = serve(&lab, "shop/client", 7000);
    let leaf = certs::issue_node_leaf(&lab, "n1", &certs::id("shop", "client"), "client");
    let requests = [
        format!("CONNECT {db}:9090"),     // 0: the pod the tunnel reached
        format!("CONNECT {client}:7000"), // 1: another pod of the same node
        format!("CONNECT {api}:8080"),    // 2: a pod of another node
    ];
    let out = certs::hbone_client(
        &lab,
        "legacy/client",
        &format!("{db}:15008"),
        Some(&leaf),
        &requests,
    );
    let has = |line: &str| out.iter().any(|l| l == line);
    assert!(has("response 0 status=200"), "{out:?}");
    assert!(has("response 1 status=400"), "{out:?}");
    assert!(has("response 2 status=400"), "{out:?}");
    let log = lab.agent_log("n1");
    assert!(
        log.contains(&format!(
            "authority {client}:7000 is not shop/db (the pod this tunnel reached at {db}): another pod of node n1 (shop/client)"
        )),
        "{log}"
    );
    lab.down();
}

/// A connect to the unspecified address (the local host) stays in the pod, like loopback:
/// the agent would otherwise be asked to connect back into the pod it serves.
#[test]
fn a_connect_to_the_unspecified_address_stays_local() {
    if !mesh_lab::require_privileged("a_connect_to_the_unspecified_address_stays_local") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let mut local = serve(&lab, "shop/client", 7000);
    let (ok, out) = connects(&lab, "shop/client", "0.0.0.0:7000");
    assert!(ok, "{out}");
    assert_eq!(peer_of(&out), "127.0.0.1:7000", "redirected: {out}");
    assert!(peer_of(&local.wait_line("accepted", WAIT)).starts_with("127.0.0.1:"));
    lab.down();
}

/// A tunnel that dies mid-transfer resets the application's connection: it never sees a clean
/// end (FIN) that it could take for a complete response.
#[test]
fn a_tunnel_cut_mid_transfer_resets_the_application_connection() {
    if !mesh_lab::require_privileged("a_tunnel_cut_mid_transfer_resets_the_application_connection")
    {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let api = lab.pod("shop/api").ip;
    let _api = serve(&lab, "shop/api", 8080);
    let mut stream = traffic::stream(&lab, "shop/client", &vip);
    // Kill the HBONE TCP connection (it lives in shop/client's namespace, opened by n1's agent).
    run_ok(
        &lab,
        "shop/client",
        "ss",
        &["-K", "dst", &api.to_string(), "dport", "=", "15008"],
    );
    let status = stream.wait(WAIT);
    assert!(!status.success(), "the stream ended cleanly");
    let out = stream.stdout_lines().join("\n");
    assert!(
        out.contains("Connection reset by peer"),
        "the application did not see a reset: {out}"
    );
    lab.down();
}

/// Two pods of one service account each get their own tunnels: the destination sees (and its
/// policy decides on) the address of the pod that really connected.
#[test]
fn pods_of_one_service_account_do_not_share_tunnels() {
    if !mesh_lab::require_privileged("pods_of_one_service_account_do_not_share_tunnels") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let (client, db) = (lab.pod("shop/client").ip, lab.pod("shop/db").ip);
    let _api = serve(&lab, "shop/api", 8080);
    // shop/db runs as shop/client's service account.
    let mut state = lab.read_state();
    for w in state["workloads"]
        .as_sequence_mut()
        .expect("workloads")
        .iter_mut()
    {
        if w["namespace"].as_str() == Some("shop") && w["name"].as_str() == Some("db") {
            w["service_account"] = "client".into();
        }
    }
    lab.write_state(&state);
    wait_until("n1 to give shop/db the new identity", WAIT, || {
        lab.agent_log("n1")
            .lines()
            .any(|l| l.contains("service account changed") && l.contains("pod=shop/db"))
    });
    traffic::send(&lab, "shop/client", &vip, 1 << 16);
    traffic::send(&lab, "shop/db", &vip, 1 << 16);
    let from = |ip: std::net::Ipv4Addr| {
        let needle = format!("src={ip}:");
        move |l: &&str| {
            l.contains("inbound{pod=shop/api")
                && l.contains(&needle)
                && l.contains("identity=spiffe://cluster.local/ns/shop/sa/client ")
                && l.contains("connection closed")
        }
    };
    wait_until("n2 to log both connections", WAIT, || {
        let log = lab.agent_log("n2");
        log.lines().filter(from(client)).count() == 1 && log.lines().filter(from(db)).count() == 1
    });
    lab.down();
}

/// With 10 s certificates, an HBONE connection takes no new stream once a certificate it was
/// made with has expired: the next connection is a new one, with a renewed certificate, while
/// a stream opened before keeps flowing.
#[test]
fn no_new_stream_rides_a_connection_past_its_certificates() {
    if !mesh_lab::require_privileged("no_new_stream_rides_a_connection_past_its_certificates") {
        return;
    }
    let lab = Lab::up(LabOptions {
        leaf_lifetime_secs: 10,
        ..LabOptions::default()
    });
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let _api = serve(&lab, "shop/api", 8080);
    let opened = |lab: &Lab| lab.metric("n1", "mesh_hbone_connections_opened_total", &[]);
    traffic::send(&lab, "shop/client", &vip, 1 << 16);
    let mut stream = traffic::stream(&lab, "shop/client", &vip);
    assert_eq!(opened(&lab), 1.0, "the stream shares the first connection");
    // Both certificates of that connection were issued when the agents started: wait until
    // they have expired (the agents renewed them at half-life).
    let log = lab.agent_log("n1");
    let established = log
        .lines()
        .find(|l| l.contains("HBONE connection opened"))
        .unwrap_or_else(|| panic!("no HBONE connection in n1's log:\n{log}"))
        .to_owned();
    let expiry = |node: &str, sa: &str| {
        lab.metric(
            node,
            "mesh_certificate_expiry_timestamp_seconds",
            &[("namespace", "shop"), ("service_account", sa)],
        )
    };
    let first_expiry = expiry("n1", "client").min(expiry("n2", "api"));
    wait_until(
        "the connection's certificates to expire",
        Duration::from_secs(25),
        || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
                > first_expiry + 1.0
        },
    );
    // The stream from before goes on past them, and ends cleanly.
    let before = traffic::echoed(&mut stream);
    wait_until("the old stream to keep flowing", WAIT, || {
        traffic::echoed(&mut stream) > before
    });
    stream.close_stdin();
    stream.wait_success(WAIT);
    // The first connection is idle again, but too old for a new stream: the next connection
    // from the same pod to the same destination gets a new HBONE connection.
    traffic::send(&lab, "shop/client", &vip, 1 << 16);
    assert_eq!(
        opened(&lab),
        2.0,
        "a new stream rode the connection opened at: {established}"
    );
    lab.down();
}

/// A node mints only its own pods' identities: a leaf for shop/api (which runs on n2) issued by
/// n1's intermediate is refused by every agent; the same leaf issued by n2's is accepted.
#[test]
fn an_identity_is_accepted_only_from_the_node_that_runs_it() {
    if !mesh_lab::require_privileged("an_identity_is_accepted_only_from_the_node_that_runs_it") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let api = lab.pod("shop/api").ip;
    let db = lab.pod("shop/db").ip;
    let _api = serve(&lab, "shop/api", 8080);
    let _db = serve(&lab, "shop/db", 9090);
    let api_id = certs::id("shop", "api");
    let from_n1 = certs::issue_node_leaf(&lab, "n1", &api_id, "api-from-n1");
    let from_n2 = certs::issue_node_leaf(&lab, "n2", &api_id, "api-from-n2");
    for (node, pod, target) in [
        ("n2", api, format!("{api}:8080")),
        ("n1", db, format!("{db}:9090")),
    ] {
        let to = format!("{pod}:15008");
        let request = [format!("CONNECT {target}")];
        let forged = certs::hbone_client(&lab, "legacy/client", &to, Some(&from_n1), &request);
        assert!(
            !forged.iter().any(|l| l.contains("status=200")),
            "{node} accepted shop/api from n1: {forged:?}"
        );
        let genuine = certs::hbone_client(&lab, "legacy/client", &to, Some(&from_n2), &request);
        assert!(
            genuine.iter().any(|l| l == "response 0 status=200"),
            "{node} refused shop/api from n2: {genuine:?}"
        );
        wait_until(&format!("{node} to log the refusal"), WAIT, || {
            lab.agent_log(node)
                .contains("was issued by node n1, which runs no workload with that identity")
        });
    }
    lab.down();
}

/// The maps every captured pod of a node shares that take an entry per connection, with their
/// key sizes: the pending connects of ABI v2 (keyed by socket cookie) and the connections
/// waiting for the agent's accept.
const PER_CONNECTION_MAPS: [(&str, usize); 2] = [("MESH_PENDING", 8), ("MESH_ORIG_DST", 32)];

/// Entries of every per-connection map pinned for `node` (any ABI version present).
fn per_connection_entries(lab: &Lab, node: &str) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    let dirs = std::fs::read_dir(&lab.node(node).bpf_dir).expect("the agent's bpffs directory");
    for dir in dirs
        .flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with('v'))
    {
        for (map, key_size) in PER_CONNECTION_MAPS {
            let pin = dir.path().join(map);
            if !pin.exists() {
                continue;
            }
            let mut count = Running::spawn(
                &format!("counting {}", pin.display()),
                lab.command(node, labtool_bin())
                    .arg("map-count")
                    .arg("--pin")
                    .arg(&pin)
                    .args(["--key-size", &key_size.to_string()]),
            );
            let line = count.wait_line("entries ", WAIT);
            let n = line["entries ".len()..].parse().expect("a count");
            found.push((pin.display().to_string(), n));
        }
    }
    found
}

/// Connects that fail after `connect4` redirected them (their 4-tuple is taken, EADDRNOTAVAIL:
/// they never reach `sock_ops`) leave nothing in the maps all pods of the node share: one pod
/// cannot fill them and crowd out (or, in an LRU, evict) the entries of the others. Its own
/// and other pods' connections go on.
#[test]
fn connects_that_never_complete_leave_nothing_in_the_shared_maps() {
    if !mesh_lab::require_privileged(
        "connects_that_never_complete_leave_nothing_in_the_shared_maps",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let db = lab.pod("shop/db").ip;
    let _db = serve(&lab, "shop/db", 9090);
    let mut collide = Running::spawn(
        "colliding connects from shop/client",
        lab.command("shop/client", labtool_bin()).args([
            "collide",
            "--to",
            &format!("{db}:9090"),
            "--count",
            "5000",
        ]),
    );
    assert_eq!(
        collide.wait_line("collided ", Duration::from_secs(60)),
        "collided 5000 other 0"
    );
    let entries = per_connection_entries(&lab, "n1");
    assert!(!entries.is_empty(), "no per-connection map pinned for n1");
    for (pin, n) in &entries {
        assert!(
            *n < 100,
            "{pin} holds {n} entries after 5,000 connects that never completed"
        );
    }
    for (from, to) in [
        ("shop/client", format!("{db}:9090")),
        ("shop/api", format!("{db}:9090")),
    ] {
        assert!(
            traffic::send_succeeds(&lab, from, &to, 4096),
            "{from} could not reach {to} afterwards"
        );
    }
    let misses = lab.metric(
        "n1",
        "mesh_tcp_connection_failures_total",
        &[("reason", "no_original_destination")],
    );
    assert_eq!(misses, 0.0, "connections lost their original destination");
    lab.down();
}

/// The admin endpoint (`admin_addr`, which changes the log filter) answers on the node's
/// loopback and nowhere a pod reaches: neither its own loopback nor the node's address, captured
/// or not.
#[test]
fn the_admin_endpoint_is_out_of_the_pods_reach() {
    if !mesh_lab::require_privileged("the_admin_endpoint_is_out_of_the_pods_reach") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let port = mesh_common::ports::ADMIN;
    let (status, body) = lab
        .http_get("n1", port, "/logging")
        .expect("the node's loopback");
    assert_eq!(status, 200, "{body}");
    let node = lab.node("n1").underlay_ip;
    for pod in ["shop/client", "legacy/client"] {
        for to in [format!("127.0.0.1:{port}"), format!("{node}:{port}")] {
            let mut get = Running::spawn(
                &format!("POST /logging from {pod} to {to}"),
                lab.command(pod, labtool_bin()).args([
                    "http-get",
                    "--to",
                    &to,
                    "--path",
                    "/logging?level=trace",
                    "--method",
                    "POST",
                ]),
            );
            let line = get.wait_line("{", Duration::from_secs(30));
            let tally: serde_json::Value = serde_json::from_str(&line).expect("http-get's JSON");
            assert!(
                tally["statuses"].as_object().is_some_and(|s| s.is_empty()),
                "{pod} reached the admin endpoint at {to}: {tally}"
            );
        }
    }
    // Nothing changed the filter.
    let (_, body) = lab
        .http_get("n1", port, "/logging")
        .expect("the node's loopback");
    assert!(!body.contains("trace"), "{body}");
    lab.down();
}
