//! End-to-end tests of workload identity and the HBONE mTLS tunnel (issue: identity and HBONE).
//! Real agents, real TLS and HTTP/2 between node agents, packets captured on the underlay.

use std::time::{Duration, SystemTime};

use mesh_lab::{
    certs::{ca, hbone_client, id, issue_leaf},
    pcap::{contains, tshark, Pcap},
    traffic::{connected, echoed, peer_of, send, send_succeeds, serve, WAIT},
    wait_until, Lab, LabOptions, Running,
};

#[test]
fn cross_node_traffic_is_only_tls_and_both_sides_log_the_peer_identity() {
    if !mesh_lab::require_privileged(
        "cross_node_traffic_is_only_tls_and_both_sides_log_the_peer_identity",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let vip = lab.service_vip("shop/api");
    let client_ip = lab.pod("shop/client").ip;
    let legacy_server = lab.pod("legacy/server").ip;
    let _api = serve(&lab, "shop/api", 8080);
    let _legacy = serve(&lab, "legacy/server", 8080);
    let capture = Pcap::start(&lab, "underlay");
    let run_send = |from: &str, to: String, marker: &str| {
        let mut sender = Running::spawn(
            &format!("send from {from}"),
            lab.command(from, mesh_lab::labtool_bin()).args([
                "send", "--to", &to, "--bytes", "1048576", "--marker", marker,
            ]),
        );
        sender.wait_success(Duration::from_secs(30))
    };
    let meshed = run_send(
        "shop/client",
        format!("{vip}:80"),
        "MESH-SECRET-MARKER-7f3a",
    );
    assert_eq!(peer_of(connected(&meshed)), "127.0.0.1:15001");
    // Control: the same kind of transfer outside the mesh is visible on the underlay.
    run_send(
        "legacy/client",
        format!("{legacy_server}:8080"),
        "PLAIN-CONTROL-MARKER-7f3a",
    );
    let file = capture.stop();
    assert!(
        contains(&file, b"PLAIN-CONTROL-MARKER-7f3a"),
        "the capture cannot see payloads: the test proves nothing"
    );
    assert!(
        !contains(&file, b"MESH-SECRET-MARKER-7f3a"),
        "meshed payload crossed the underlay in clear"
    );
    // The meshed transfer crossed as TLS 1.3 application data on port 15008, nothing else.
    let hello = tshark(
        &file,
        "tls.handshake.type == 2 && tcp.srcport == 15008",
        "tls.handshake.extensions.supported_version",
    );
    assert!(
        !hello.is_empty() && hello.iter().all(|v| v == "0x0304"),
        "ServerHello versions: {hello:?}"
    );
    let app = tshark(&file, "tls.app_data && tcp.port == 15008", "frame.number");
    assert!(
        app.len() > 10,
        "too few TLS application records on 15008: {}",
        app.len()
    );
    let clear = tshark(
        &file,
        &format!("ip.src == {client_ip} && tcp.len > 0 && tcp.dstport != 15008"),
        "frame.number",
    );
    assert!(
        clear.is_empty(),
        "shop/client sent {} payload packets outside HBONE",
        clear.len()
    );

    // Each agent logged the other side's identity.
    wait_until("both agents to log the connection", WAIT, || {
        lab.agent_log("n2").contains("connection closed")
            && lab.agent_log("n1").contains("connection closed")
    });
    let n2 = lab.agent_log("n2");
    assert!(
        n2.lines().any(|l| l.contains("inbound{pod=shop/api")
            && l.contains(&format!("identity={}", id("shop", "client")))),
        "n2 did not log the client's SPIFFE id:\n{n2}"
    );
    let n1 = lab.agent_log("n1");
    assert!(
        n1.lines().any(|l| l.contains("outbound{pod=shop/client")
            && l.contains(&format!("peer_identity={}", id("shop", "api")))),
        "n1 did not log the server's SPIFFE id:\n{n1}"
    );
    assert_eq!(
        lab.metric(
            "n1",
            "mesh_outbound_routes_total",
            &[("workload", "client"), ("transport", "hbone")]
        ),
        1.0
    );
    lab.down();
}

#[test]
fn many_connections_between_one_pair_share_a_few_hbone_connections() {
    if !mesh_lab::require_privileged(
        "many_connections_between_one_pair_share_a_few_hbone_connections",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let vip = lab.service_vip("shop/api");
    let _api = serve(&lab, "shop/api", 8080);
    // 40 connections at once, from cold: they share a few handshakes, one per connection the
    // pool spreads concurrent streams over (hbone.connections_per_peer: one per core, at most
    // four), never one per connection.
    let per_peer = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4));
    let mut senders: Vec<Running> = (0..40)
        .map(|i| {
            Running::spawn(
                &format!("sender {i}"),
                lab.command("shop/client", mesh_lab::labtool_bin()).args([
                    "send",
                    "--to",
                    &format!("{vip}:80"),
                    "--bytes",
                    "262144",
                    "--seed",
                    &i.to_string(),
                ]),
            )
        })
        .collect();
    for s in &mut senders {
        let out = s.wait_success(Duration::from_secs(60));
        assert!(
            out.iter().any(|l| l == "ok sent=262144 received=262144"),
            "{out:?}"
        );
    }
    assert_eq!(
        lab.metric("n1", "mesh_hbone_streams_opened_total", &[]),
        40.0
    );
    let handshakes = lab.metric("n1", "mesh_hbone_connections_opened_total", &[]);
    assert!(
        (1.0..=per_peer as f64).contains(&handshakes),
        "{handshakes} handshakes for 40 streams (at most {per_peer}):\n{}",
        lab.metrics("n1")
    );
    assert_eq!(lab.metric("n1", "mesh_hbone_connections", &[]), handshakes);
    lab.down();
}

#[test]
fn a_server_pod_out_of_local_ports_is_named_in_the_log_and_the_metric() {
    if !mesh_lab::require_privileged(
        "a_server_pod_out_of_local_ports_is_named_in_the_log_and_the_metric",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let vip = lab.service_vip("shop/api");
    let _api = serve(&lab, "shop/api", 8080);
    // Two ephemeral ports in the server pod. The destination agent connects to the application
    // from the client's address, so two open connections of shop/client take both ports toward
    // the application, and the third has none (docs/performance.md, "Connection churn and
    // TIME_WAIT").
    let status = lab
        .command("shop/api", "sysctl")
        .args(["-qw", "net.ipv4.ip_local_port_range=40000 40001"])
        .status()
        .expect("running sysctl in shop/api");
    assert!(status.success(), "sysctl in shop/api: {status}");
    let _held = [
        mesh_lab::traffic::stream(&lab, "shop/client", &format!("{vip}:80")),
        mesh_lab::traffic::stream(&lab, "shop/client", &format!("{vip}:80")),
    ];
    assert!(
        !send_succeeds(&lab, "shop/client", &format!("{vip}:80"), 1000),
        "with two local ports held open, a third connection must fail"
    );
    wait_until("n2 to log the failure", WAIT, || {
        lab.agent_log("n2")
            .contains("no free local port toward it in the pod")
    });
    let log = lab.agent_log("n2");
    assert!(
        log.lines().any(|l| l.contains("inbound{pod=shop/api")
            && l.contains("no free local port toward it in the pod")
            && l.contains("net.ipv4.ip_local_port_range")),
        "n2 did not name the cause:\n{log}"
    );
    assert_eq!(
        lab.metric(
            "n2",
            "mesh_tcp_connection_failures_total",
            &[("workload", "api"), ("reason", "no_local_port")]
        ),
        1.0,
        "{}",
        lab.metrics("n2")
    );
    lab.down();
}

#[test]
fn the_hbone_endpoint_refuses_bad_certificates_and_malformed_requests() {
    if !mesh_lab::require_privileged(
        "the_hbone_endpoint_refuses_bad_certificates_and_malformed_requests",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let api = lab.pod("shop/api").ip;
    let db = lab.pod("shop/db").ip;
    let to = format!("{api}:15008");
    let _app = serve(&lab, "shop/api", 8080);
    let ca_dir = lab.run_dir().join("ca");
    let certs = lab.run_dir().join("test-certs");
    let (n1_cert, n1_key) = (ca_dir.join("n1-cert.pem"), ca_dir.join("n1-key.pem"));
    let good = issue_leaf(
        &n1_cert,
        &n1_key,
        &id("shop", "client"),
        &certs,
        "good",
        &[],
    );
    let expired = issue_leaf(
        &n1_cert,
        &n1_key,
        &id("shop", "client"),
        &certs,
        "expired",
        &["--expired"],
    );
    let other = certs.join("other");
    ca(&[
        "init",
        "--out",
        &other.to_string_lossy(),
        "--trust-domain",
        "other.example",
    ]);
    let foreign = issue_leaf(
        &other.join("root-cert.pem"),
        &other.join("root-key.pem"),
        "spiffe://other.example/ns/shop/sa/client",
        &certs,
        "foreign",
        &[],
    );

    // Refused at the TLS handshake: another trust domain, an expired certificate, none at all.
    // Each refusal is told apart by what n2 logs about that connection (its `src=`): the
    // verifier's reason and the handshake's error.
    let rejected = "HBONE client certificate rejected";
    for (i, (what, cert, reasons)) in [
        (
            "foreign trust domain",
            Some(&foreign),
            &[
                "does not chain to a trusted root",
                "failed: invalid peer certificate: UnknownIssuer",
            ][..],
        ),
        (
            "expired",
            Some(&expired),
            &[
                "peer certificate expired at",
                "failed: invalid peer certificate: Expired",
            ],
        ),
        (
            "no certificate",
            None,
            &["failed: peer sent no certificates"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let out = hbone_client(
            &lab,
            "legacy/client",
            &to,
            cert,
            &[format!("CONNECT {api}:8080")],
        );
        // TLS 1.3: the client finishes its handshake before the server has checked its
        // certificate, so the refusal shows as a handshake error or a closed connection.
        let refused = out.iter().any(|l| {
            l.starts_with("tls_error")
                || l.starts_with("connection_error")
                || l.starts_with("response 0 error=")
        });
        assert!(
            refused && !out.iter().any(|l| l.contains("status=200")),
            "{what}: not refused: {out:?}"
        );
        let failed = |log: &str| -> Vec<String> {
            log.lines()
                .filter(|l| l.contains("HBONE connection failed"))
                .map(str::to_owned)
                .collect()
        };
        wait_until(&format!("n2 to log the {what} refusal"), WAIT, || {
            failed(&lab.agent_log("n2")).len() > i
        });
        let log = lab.agent_log("n2");
        let failed = failed(&log);
        assert_eq!(failed.len(), i + 1, "{what}: {failed:#?}");
        let src = failed[i]
            .split_whitespace()
            .find_map(|f| f.strip_prefix("src="))
            .map(|s| s.trim_end_matches([':', '}']))
            .unwrap_or_else(|| panic!("no src= in {}", failed[i]));
        let about: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("src={src}}}")))
            .collect();
        for reason in reasons {
            assert!(
                about.iter().any(|l| l.contains(reason)),
                "{what}: n2 did not refuse it for {reason:?}: {about:#?}"
            );
        }
        assert_eq!(
            about.iter().any(|l| l.contains(rejected)),
            cert.is_some(),
            "{what}: {about:#?}"
        );
    }
    assert_eq!(
        lab.metric(
            "n2",
            "mesh_tcp_connection_failures_total",
            &[("workload", "api"), ("reason", "hbone_tls")]
        ),
        3.0
    );

    // A valid client: the server presents api's identity; malformed requests get 400 (or a
    // stream error) and 503 when nothing listens, and the first stream keeps working.
    let requests = [
        format!("CONNECT {api}:8080"),        // 0: good, held open
        format!("GET http://{api}:8080/"),    // 1: not CONNECT
        "CONNECT -".to_owned(),               // 2: no authority
        format!("CONNECT {api}:0"),           // 3: bad port
        format!("CONNECT {db}:9090"),         // 4: a workload of another node
        "CONNECT 10.240.9.9:8080".to_owned(), // 5: not a workload
        format!("CONNECT {api}:15006"),       // 6: an agent port
        format!("CONNECT {api}:8081"),        // 7: nothing listens
        format!("CONNECT {api}:8080"),        // 8: good again
    ];
    let out = hbone_client(&lab, "legacy/client", &to, Some(&good), &requests);
    let has = |line: &str| out.iter().any(|l| l == line);
    assert!(
        has(&format!("server_identity {}", id("shop", "api"))),
        "{out:?}"
    );
    assert!(
        has("response 0 status=200") && has("response 8 status=200"),
        "{out:?}"
    );
    for i in [1, 3, 4, 5, 6] {
        assert!(
            has(&format!("response {i} status=400")),
            "request {i} ({}) not answered 400: {out:?}",
            requests[i]
        );
    }
    assert!(
        has("response 2 status=400") || out.iter().any(|l| l.starts_with("response 2 error=")),
        "a CONNECT without authority was not refused: {out:?}"
    );
    assert!(has("response 7 status=503"), "{out:?}");
    assert!(
        has("echo 0 ok bytes=65536") && has("echo 8 ok bytes=65536"),
        "other streams were disturbed: {out:?}"
    );
    assert!(
        lab.metric(
            "n2",
            "mesh_tcp_connection_failures_total",
            &[("reason", "bad_request")]
        ) >= 5.0
    );
    lab.down();
}

#[test]
fn certificates_rotate_under_a_live_connection() {
    if !mesh_lab::require_privileged("certificates_rotate_under_a_live_connection") {
        return;
    }
    let lab = Lab::up(LabOptions {
        leaf_lifetime_secs: 10,
        // The new HBONE connection below goes to a pod of the same node.
        same_node_fast_path: false,
        ..LabOptions::default()
    });
    let vip = lab.service_vip("shop/api");
    let db = lab.pod("shop/db").ip;
    let _api = serve(&lab, "shop/api", 8080);
    let _db = serve(&lab, "shop/db", 9090);
    let expiry = || {
        lab.metric(
            "n1",
            "mesh_certificate_expiry_timestamp_seconds",
            &[("namespace", "shop"), ("service_account", "client")],
        )
    };
    let mut stream = Running::spawn(
        "stream from shop/client",
        lab.command("shop/client", mesh_lab::labtool_bin()).args([
            "stream",
            "--to",
            &format!("{vip}:80"),
        ]),
    );
    stream.wait_line("progress", WAIT);
    let first = expiry();
    assert!(first > 0.0, "no certificate expiry metric for shop/client");
    // Renewed at half-life (about 5 s)...
    wait_until(
        "the client certificate to be renewed",
        Duration::from_secs(20),
        || expiry() > first,
    );
    // ...and the connection outlives the first certificate.
    wait_until(
        "the first certificate to expire",
        Duration::from_secs(20),
        || {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
                > first + 1.0
        },
    );
    // The stream's progress lines queue up while the test waits: take every one printed so
    // far, then wait for round trips completed after the expiry.
    let at_expiry = echoed(&mut stream);
    wait_until(
        "the stream to echo more after its first certificate expired",
        WAIT,
        || echoed(&mut stream) > at_expiry,
    );
    // A new HBONE connection (to another destination) presents a renewed certificate.
    send(&lab, "shop/client", &format!("{db}:9090"), 1 << 20);
    let log = lab.agent_log("n1");
    let established = log
        .lines()
        .rfind(|l| l.contains("HBONE connection established") && l.contains("hbone{pod=shop/db"))
        .unwrap_or_else(|| panic!("no HBONE connection to shop/db logged:\n{log}"));
    let not_after: f64 = established
        .split_whitespace()
        .find_map(|f| f.strip_prefix("peer_not_after="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peer_not_after in {established}"));
    assert!(
        not_after > first,
        "the new connection used the first certificate: {established}"
    );
    stream.close_stdin();
    let out = stream.wait_success(WAIT);
    assert!(out.iter().any(|l| l.starts_with("ok total=")), "{out:?}");
    lab.down();
}
