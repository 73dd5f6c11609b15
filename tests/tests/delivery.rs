//! End-to-end tests of the delivery to the application: the agent connects from the client's
//! address (`delivery.preserve_client_address`, docs/capture.md "The client's address"), so the
//! application sees the real client on every path, and a client's churn is bounded by its own
//! port range toward the application, as on the direct path, not by the server pod's.

use std::time::Duration;

use mesh_lab::{
    labtool_bin,
    traffic::{delivered, peer_of, send, serve, WAIT},
    Lab, LabOptions, Running,
};

#[test]
fn the_application_sees_the_client_address_on_every_path() {
    if !mesh_lab::require_privileged("the_application_sees_the_client_address_on_every_path") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let client = lab.pod("shop/client").ip;
    let legacy = lab.pod("legacy/client").ip;
    let db = lab.pod("shop/db").ip;
    let vip = lab.service_vip("shop/api");
    let mut api = serve(&lab, "shop/api", 8080);
    let mut db_server = serve(&lab, "shop/db", 7000);
    let check = |server: &mut Running, from: &str, to: &str, expected: std::net::Ipv4Addr| {
        let out = send(&lab, from, to, 1 << 16);
        assert!(
            out.iter().any(|l| l == "ok sent=65536 received=65536"),
            "{from} -> {to}: {out:?}"
        );
        let accepted = server.wait_line("accepted", WAIT);
        assert!(
            delivered(&accepted) && peer_of(&accepted).starts_with(&format!("{expected}:")),
            "{from} -> {to}: the application should see {expected}, from the agent: {accepted}"
        );
    };
    // HBONE, cross-node (through the service address).
    check(&mut api, "shop/client", &format!("{vip}:80"), client);
    // The same-node fast path.
    check(&mut db_server, "shop/client", &format!("{db}:7000"), client);
    // Plaintext inbound from a pod outside the mesh (which has no service addresses), same node
    // and cross-node.
    check(
        &mut db_server,
        "legacy/client",
        &format!("{db}:7000"),
        legacy,
    );
    let api_ip = lab.pod("shop/api").ip;
    check(&mut api, "legacy/client", &format!("{api_ip}:8080"), legacy);
    // Each captured pod has its return path, and no pod went without it.
    for pod in ["shop/api", "shop/db", "shop/client"] {
        let out = lab
            .command(pod, "ip")
            .args(["rule", "show"])
            .output()
            .expect("ip rule");
        let rules = String::from_utf8_lossy(&out.stdout);
        assert!(
            rules.contains(&format!(
                "fwmark {:#x} lookup 15006",
                mesh_common::DELIVERY_MARK
            )),
            "{pod}: {rules}"
        );
    }
    for node in ["n1", "n2"] {
        assert_eq!(
            lab.metric(node, "mesh_return_path_failures_total", &[]),
            0.0
        );
    }
    lab.down();
}

/// With the pod's address as the source, every connection the agent closes first leaves a
/// TIME_WAIT on the server pod's one 4-tuple space (pod, pod, port), and a churn past its
/// port range within a minute fails (it did, with the client's address not preserved: the
/// connection after the 1,000th). From the client's address and bound to `lo`, the kernel's
/// default `tcp_tw_reuse=2` reuses those ports, and nothing is tuned anywhere.
#[test]
fn a_client_churning_past_the_server_pods_port_range_needs_no_tuning() {
    if !mesh_lab::require_privileged(
        "a_client_churning_past_the_server_pods_port_range_needs_no_tuning",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let api = format!("{}:7000", lab.pod("shop/api").ip);
    let _server = serve(&lab, "shop/api", 7000);
    for pod in ["shop/api", "shop/client"] {
        let out = lab
            .command(pod, "cat")
            .arg("/proc/sys/net/ipv4/tcp_tw_reuse")
            .output()
            .expect("reading tcp_tw_reuse");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "2",
            "{pod}: the kernel's default"
        );
    }
    // 1,000 ephemeral ports in the server pod; the test makes three times as many connections.
    let status = lab
        .command("shop/api", "sysctl")
        .args(["-qw", "net.ipv4.ip_local_port_range=40000 40999"])
        .status()
        .expect("running sysctl in shop/api");
    assert!(status.success(), "sysctl in shop/api: {status}");
    let out = Running::spawn(
        "rr --new-conn from shop/client",
        lab.command("shop/client", labtool_bin()).args([
            "rr",
            "--to",
            &api,
            "--new-conn",
            "--rate",
            "400",
            "--conns",
            "4",
            "--size",
            "1024",
            "--warmup-secs",
            "0",
            "--duration-secs",
            "8",
        ]),
    )
    .wait_success(Duration::from_secs(90));
    let report: serde_json::Value = serde_json::from_str(
        out.iter()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("rr printed no JSON: {out:?}")),
    )
    .expect("rr's JSON");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(
        report["requests"].as_f64().unwrap_or(0.0) >= 3000.0,
        "{report}"
    );
    assert_eq!(
        lab.metric(
            "n2",
            "mesh_tcp_connection_failures_total",
            &[("workload", "api"), ("reason", "no_local_port")]
        ),
        0.0
    );
    lab.down();
}
