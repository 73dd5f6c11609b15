//! `cargo xtask demo`: build the release binaries, bring up the lab, show one captured
//! connection and the metrics that prove it, tear down.

use std::time::Duration;

use mesh_lab::{metric_value, traffic, Lab, LabOptions};

use crate::{
    build::{self, Profile},
    preflight,
};

pub fn run() -> anyhow::Result<()> {
    preflight::ensure("cargo xtask demo", &[preflight::LAB])?;
    if !mesh_lab::require_privileged("cargo xtask demo") {
        anyhow::bail!("the demo needs root (network namespaces, cgroups, eBPF)");
    }
    build::lab_bins(Profile::Release, true)?;
    println!("\n== bringing up the lab: nodes n1, n2; meshed namespace shop, unmeshed legacy ==");
    let lab = Lab::try_up(LabOptions {
        id: Some("demo".into()),
        ..LabOptions::default()
    })?;
    let vip = lab.service_vip("shop/api");
    for pod in lab.pods() {
        println!(
            "  pod {:<14} node {}  ip {}",
            pod.full_name(),
            pod.node,
            pod.ip
        );
    }
    println!("  service shop/api  vip {vip}:80 -> shop/api:8080");

    println!("\n== shop/client sends 16 MiB to {vip}:80 and checks the echo (an echo server runs in shop/api) ==");
    let _server = traffic::serve(&lab, "shop/api", 8080);
    let out = traffic::send(&lab, "shop/client", &format!("{vip}:80"), 16 << 20);
    for line in &out {
        println!("  client: {line}");
    }
    println!("  (the client's socket is connected to 127.0.0.1:15001: mesh_connect4 redirected it to the agent inside the pod)");

    println!("\n== agent n1 (client side): HBONE to shop/api, server identity checked ==");
    mesh_lab::wait_until(
        "the agents to log the connection",
        Duration::from_secs(10),
        || {
            lab.agent_log("n1").contains("connection closed")
                && lab.agent_log("n2").contains("connection closed")
        },
    );
    print_matching(&lab.agent_log("n1"), "outbound{");
    println!(
        "\n== agent n2 (server side): HBONE through mesh_sk_lookup, client identity verified =="
    );
    print_matching(&lab.agent_log("n2"), "inbound{");
    let (n1, n2) = (lab.agent_log("n1"), lab.agent_log("n2"));
    println!("\n== identities ==");
    println!(
        "  the client presented  {}  (verified by n2)",
        field(&n2, "inbound{", "identity=")
    );
    println!(
        "  the server presented  {}  (checked by n1)",
        field(&n1, "outbound{", "peer_identity=")
    );

    for (node, series) in [
        (
            "n1",
            vec![
                (
                    "mesh_capture_events_total",
                    vec![("program", "connect"), ("reason", "redirected")],
                ),
                (
                    "mesh_capture_events_total",
                    vec![("program", "sock_ops"), ("reason", "recorded")],
                ),
                (
                    "mesh_tcp_connections_opened_total",
                    vec![("direction", "outbound"), ("workload", "client")],
                ),
                (
                    "mesh_tcp_sent_bytes_total",
                    vec![("direction", "outbound"), ("workload", "client")],
                ),
                (
                    "mesh_outbound_routes_total",
                    vec![("workload", "client"), ("transport", "hbone")],
                ),
                ("mesh_hbone_connections_opened_total", vec![]),
                ("mesh_hbone_streams_opened_total", vec![]),
            ],
        ),
        (
            "n2",
            vec![
                (
                    "mesh_capture_events_total",
                    vec![("program", "sk_lookup"), ("reason", "steered")],
                ),
                (
                    "mesh_tcp_connections_opened_total",
                    vec![("direction", "inbound"), ("workload", "api")],
                ),
                (
                    "mesh_tcp_received_bytes_total",
                    vec![("direction", "inbound"), ("workload", "api")],
                ),
            ],
        ),
    ] {
        println!("\n== metrics of agent {node} (GET :15020/metrics) ==");
        let text = lab.metrics(node);
        for (name, labels) in series {
            let value = metric_value(&text, name, &labels).unwrap_or(0.0);
            let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            if shown.is_empty() {
                println!("  {name} {value}");
            } else {
                println!("  {name}{{{}}} {value}", shown.join(","));
            }
        }
    }
    println!("\n== tearing down ==");
    lab.try_down()?;
    println!("done: the lab is gone (namespaces, cgroups, pins, agents)");
    Ok(())
}

fn print_matching(log: &str, needle: &str) {
    for line in log.lines().filter(|l| l.contains(needle)) {
        println!("  {line}");
    }
}

/// The value of `name=` in the first log line of span `span` that has it (span fields end with
/// `:` or `}`).
fn field(log: &str, span: &str, name: &str) -> String {
    log.lines()
        .filter(|l| l.contains(span))
        .flat_map(str::split_whitespace)
        .find_map(|f| {
            f.strip_prefix(name)
                .map(|v| v.trim_end_matches([':', '}']).to_owned())
        })
        .unwrap_or_else(|| "(not logged)".into())
}
