//! `cargo xtask demo`: build the release binaries, bring up the lab, show one captured
//! connection and the metrics that prove it, tear down. Every fact it narrates is checked on
//! what it observed (the client's socket, the agents' log lines and metrics, what is left after
//! teardown): the demo fails when one is not so.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, ensure, Context as _};
use mesh_lab::{exposed_value, traffic, Lab, LabOptions};

use crate::{
    build::{self, Profile},
    preflight,
};

const BYTES: u64 = 16 << 20;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// What a metric must show for the demo's story to hold.
#[derive(Clone, Copy)]
enum Expect {
    Exactly(f64),
    AtLeast(f64),
}

pub fn run() -> anyhow::Result<()> {
    preflight::ensure(
        "cargo xtask demo",
        &[preflight::LAB, preflight::MANIFESTS, preflight::KUBE_LAB],
    )?;
    if !mesh_lab::require_privileged("cargo xtask demo") {
        anyhow::bail!("the demo needs root (network namespaces, cgroups, eBPF)");
    }
    // The release build of the agent and the lab tool: about 2 GiB from scratch.
    preflight::disk_space("cargo xtask demo", 3);
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

    println!(
        "\n== shop/client sends 16 MiB to {vip}:80 and checks the echo (an echo server runs in \
         shop/api) =="
    );
    let _server = traffic::serve(&lab, "shop/api", 8080);
    let out = traffic::send(&lab, "shop/client", &format!("{vip}:80"), BYTES);
    for line in &out {
        println!("  client: {line}");
    }
    let peer = traffic::peer_of(traffic::connected(&out));
    ensure!(
        peer == "127.0.0.1:15001",
        "the client's socket is connected to {peer}, not to the agent's 127.0.0.1:15001: the \
         connection was not captured"
    );
    println!(
        "  (the client's socket is connected to {peer}: mesh_connect4 redirected it to the \
         agent inside the pod)"
    );

    mesh_lab::wait_until(
        "the agents to log the connection closed",
        Duration::from_secs(10),
        || {
            closed_line(&lab.agent_log("n1"), "outbound{pod=shop/client").is_ok()
                && closed_line(&lab.agent_log("n2"), "inbound{pod=shop/api").is_ok()
        },
    );
    let (n1, n2) = (lab.agent_log("n1"), lab.agent_log("n2"));
    let outbound = closed_line(&n1, "outbound{pod=shop/client")?;
    ensure!(
        outbound.contains("transport=\"hbone\""),
        "n1 did not send the connection through HBONE: {outbound}"
    );
    println!("\n== agent n1 (client side): HBONE to shop/api, server identity checked ==");
    println!("  {outbound}");
    let inbound = closed_line(&n2, "inbound{pod=shop/api")?;
    ensure!(
        inbound.contains("hbone{pod=shop/api"),
        "n2 did not receive the connection over HBONE: {inbound}"
    );
    println!(
        "\n== agent n2 (server side): HBONE through mesh_sk_lookup, client identity verified =="
    );
    println!("  {inbound}");
    println!("\n== identities ==");
    let client = field(inbound, "identity=")?;
    ensure!(
        client == CLIENT_ID,
        "n2 verified {client}, not shop/client's {CLIENT_ID}"
    );
    println!("  the client presented  {client}  (verified by n2)");
    let server = field(outbound, "peer_identity=")?;
    ensure!(
        server == SERVER_ID,
        "n1 checked {server}, not shop/api's {SERVER_ID}"
    );
    println!("  the server presented  {server}  (checked by n1)");

    let bytes = BYTES as f64;
    for (node, series) in [
        (
            "n1",
            vec![
                (
                    "mesh_capture_events_total",
                    vec![("program", "connect"), ("reason", "redirected")],
                    Expect::AtLeast(1.0),
                ),
                (
                    "mesh_capture_events_total",
                    vec![("program", "sock_ops"), ("reason", "recorded")],
                    Expect::AtLeast(1.0),
                ),
                (
                    "mesh_tcp_connections_opened_total",
                    vec![("direction", "outbound"), ("workload", "client")],
                    Expect::Exactly(1.0),
                ),
                (
                    "mesh_tcp_sent_bytes_total",
                    vec![("direction", "outbound"), ("workload", "client")],
                    Expect::Exactly(bytes),
                ),
                (
                    "mesh_outbound_routes_total",
                    vec![("workload", "client"), ("transport", "hbone")],
                    Expect::Exactly(1.0),
                ),
                (
                    "mesh_hbone_connections_opened_total",
                    vec![],
                    Expect::Exactly(1.0),
                ),
                (
                    "mesh_hbone_streams_opened_total",
                    vec![],
                    Expect::Exactly(1.0),
                ),
            ],
        ),
        (
            "n2",
            vec![
                (
                    "mesh_capture_events_total",
                    vec![("program", "sk_lookup"), ("reason", "steered")],
                    Expect::AtLeast(1.0),
                ),
                (
                    "mesh_tcp_connections_opened_total",
                    vec![("direction", "inbound"), ("workload", "api")],
                    Expect::Exactly(1.0),
                ),
                (
                    "mesh_tcp_received_bytes_total",
                    vec![("direction", "inbound"), ("workload", "api")],
                    Expect::Exactly(bytes),
                ),
            ],
        ),
    ] {
        println!("\n== metrics of agent {node} (GET :15020/metrics) ==");
        let text = lab.metrics(node);
        for (name, labels, expect) in series {
            let value = exposed_value(&text, name, &labels)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("metrics of {node}"))?;
            let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let series = if shown.is_empty() {
                name.to_owned()
            } else {
                format!("{name}{{{}}}", shown.join(","))
            };
            let (holds, wanted) = match expect {
                Expect::Exactly(want) => (value == want, format!("{want}")),
                Expect::AtLeast(min) => (value >= min, format!("at least {min}")),
            };
            ensure!(holds, "{node}: {series} is {value}, expected {wanted}");
            println!("  {series} {value}");
        }
    }
    println!("\n== tearing down ==");
    let left = Footprint::of(&lab);
    lab.try_down()?;
    left.check_gone()?;
    println!("done: the lab is gone (namespaces, cgroups, pins, agents)");
    kubernetes()?;
    waypoint()
}

/// The waypoint: shop's L7 proxy routes by header and weight and denies /admin however it is
/// spelled, with the client's identity.
fn waypoint() -> anyhow::Result<()> {
    use mesh_lab::l7;
    println!(
        "\n== the waypoint: lab with shop's waypoint (mesh-agent waypoint in pod shop/waypoint) \
         and reviews v1 (n2) and v2 (n1) =="
    );
    let lab = Lab::try_up(LabOptions {
        id: Some("demol7".into()),
        topology: mesh_lab::Topology::from_yaml(l7::WAYPOINT_TOPOLOGY_YAML)?,
        ..LabOptions::default()
    })?;
    for w in lab.waypoints() {
        println!("  waypoint {} runs in pod {}", w.waypoint, w.pod);
    }
    let _v1 = l7::serve_http(&lab, "shop/reviews-v1", "v1", &[]);
    let _v2 = l7::serve_http(&lab, "shop/reviews-v2", "v2", &[]);
    let routes = r#"
- metadata: {name: reviews, namespace: shop}
  spec:
    parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
    rules:
      - matches: [{headers: [{name: x-version, value: v2}]}]
        backendRefs: [{name: reviews-v2, port: 80}]
      - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
"#;
    let policies = r#"
- metadata: {name: no-admin, namespace: shop}
  spec:
    targetRefs: [{kind: Service, group: "", name: reviews}]
    action: DENY
    rules: [{to: [{operation: {paths: [/admin, /admin/*]}}]}]
"#;
    println!("  HTTPRoute shop/reviews: x-version: v2 -> reviews-v2; the rest 90/10 v1/v2");
    println!("  AuthorizationPolicy shop/no-admin (bound to Service reviews): DENY /admin");
    l7::set_state(&lab, routes, policies);
    mesh_lab::wait_until(
        "the waypoint to apply the route",
        Duration::from_secs(20),
        || {
            exposed_value(&l7::waypoint_metrics(&lab), "mesh_waypoint_routes", &[])
                .is_ok_and(|v| v == 1.0)
        },
    );
    let get = |args: &[&str]| {
        let mut all = vec!["--host", "reviews.shop"];
        all.extend_from_slice(args);
        l7::http_get(&lab, "shop/client", l7::REVIEWS, &all)
    };
    println!("\n== shop/client -> reviews.shop (10.240.100.21:80), through the waypoint ==");
    let v2 = get(&["--header", "x-version: v2", "--count", "20"]);
    ensure!(
        l7::count(&v2, "served", "v2") == 20,
        "x-version: v2 did not route to v2: {v2}"
    );
    println!("  20 requests with x-version: v2   -> v2 answered all 20");
    let split = get(&["--count", "1000"]);
    let (n1, n2) = (
        l7::count(&split, "served", "v1"),
        l7::count(&split, "served", "v2"),
    );
    ensure!(
        n1 + n2 == 1000 && (850..=950).contains(&n1),
        "the 90/10 split: {split}"
    );
    println!("  1000 requests without it         -> v1 {n1}, v2 {n2}");
    for path in ["/admin", "//admin", "/%61dmin", "/x/../admin"] {
        let denied = get(&["--path", path]);
        ensure!(
            l7::count(&denied, "statuses", "403") == 1,
            "{path} was not denied: {denied}"
        );
        println!("  GET {path:<14} -> 403 (shop/no-admin)");
    }
    let metrics = l7::waypoint_metrics(&lab);
    let requests = exposed_value(
        &metrics,
        "istio_requests_total",
        &[
            ("source_principal", CLIENT_ID),
            ("destination_workload", "reviews-v2"),
            ("response_code", "200"),
        ],
    )
    .map_err(anyhow::Error::msg)?;
    ensure!(requests >= 20.0, "istio_requests_total to v2: {requests}");
    println!(
        "\n== the waypoint's metrics (Istio's names) ==\n  istio_requests_total{{source_principal=\"{CLIENT_ID}\",destination_workload=\"reviews-v2\",response_code=\"200\"}} {requests}"
    );
    let log = std::fs::read_to_string(&lab.waypoints()[0].log)?;
    let denied_line = log
        .lines()
        .find(|l| l.contains("status=403"))
        .context("no access-log line of a denied request")?;
    println!("\n== the waypoint's access log, a denied request ==\n  {denied_line}");
    println!("\n== tearing down ==");
    let left = Footprint::of(&lab);
    lab.try_down()?;
    left.check_gone()?;
    println!("done: the L7 lab is gone");
    Ok(())
}

/// The Kubernetes mode: the agents learn the mesh from an API (KMock's emulator), and a label
/// meshes a namespace while its pods run.
fn kubernetes() -> anyhow::Result<()> {
    let python = crate::kmock::ensure()?;
    println!(
        "\n== the lab again, in the Kubernetes mode: the agents watch an API (KMock's emulator, \
         served in n1) =="
    );
    let lab = Lab::try_up(LabOptions {
        id: Some("demokube".into()),
        kube: Some(python),
        ..LabOptions::default()
    })?;
    println!(
        "  API {}: namespaces (shop labelled mesh-agent/enabled=true), pods by UID, the api \
         Service and its EndpointSlice. Each pod started as a kubelet starts one: its sandbox \
         ADDed through the CNI plugin (shop's captured before ADD returned), then its address \
         reported.",
        lab.kube_url()
    );
    println!("\n== cargo xtask lab kubectl -- get namespaces --show-labels ==");
    kubectl(&lab, &["get", "namespaces", "--show-labels"])?;
    println!("\n== cargo xtask lab kubectl -- get pods -A -o custom-columns=... ==");
    kubectl(&lab, &["get", "pods", "-A", "-o", POD_COLUMNS])?;
    let _server = traffic::serve(&lab, "legacy/server", 9000);
    let captured = |node: &str| lab.metric(node, "mesh_captured_pods", &[]);
    let before = (captured("n1"), captured("n2"));
    println!(
        "  legacy's pods run, not meshed: captured pods n1 {}, n2 {}",
        before.0, before.1
    );
    println!("\n== cargo xtask lab kubectl -- label namespace legacy mesh-agent/enabled=true ==");
    kubectl(
        &lab,
        &["label", "namespace", "legacy", "mesh-agent/enabled=true"],
    )?;
    mesh_lab::wait_until(
        "both agents to capture legacy's pods",
        Duration::from_secs(15),
        || captured("n1") == before.0 + 1.0 && captured("n2") == before.1 + 1.0,
    );
    for node in ["n1", "n2"] {
        let log = lab.agent_log(node);
        for line in log
            .lines()
            .filter(|l| l.contains("pod captured") && l.contains("pod=legacy/"))
        {
            println!(
                "  {node}: {}",
                line.split_once(" INFO ").map_or(line, |(_, l)| l)
            );
        }
    }
    let to = format!("{}:9000", lab.pod("legacy/server").ip);
    let out = traffic::send(&lab, "legacy/client", &to, 1 << 20);
    let opened = lab.metric(
        "n1",
        "mesh_tcp_connections_opened_total",
        &[
            ("direction", "outbound"),
            ("namespace", "legacy"),
            ("workload", "client"),
        ],
    );
    ensure!(
        opened == 1.0,
        "legacy/client's connection after the label was not the mesh's ({opened} opened): {out:?}"
    );
    println!(
        "  legacy/client -> legacy/server now goes through the mesh (n1 opened {opened} outbound)"
    );
    println!("\n== tearing down ==");
    let left = Footprint::of(&lab);
    lab.try_down()?;
    left.check_gone()?;
    println!("done: the lab is gone (namespaces, cgroups, pins, agents, the API emulator)");
    Ok(())
}

/// The pods' columns (the emulator serves no server-side tables, so `-o wide` shows names only).
pub const POD_COLUMNS: &str = "custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,\
                               NODE:.spec.nodeName,IP:.status.podIP,PHASE:.status.phase";

/// Runs kubectl against the lab's API, printing what it prints, indented.
fn kubectl(lab: &Lab, args: &[&str]) -> anyhow::Result<()> {
    let out = lab.kubectl()?.args(args).output()?;
    ensure!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    Ok(())
}

/// The `connection closed` line of `log` whose innermost span starts with `span`.
fn closed_line<'a>(log: &'a str, span: &str) -> anyhow::Result<&'a str> {
    log.lines()
        .find(|l| {
            let spans = l.split_once("}: ").map_or("", |(spans, _)| spans);
            spans.rsplit("}:").next().is_some_and(|s| s.contains(span))
                && l.contains("connection closed")
        })
        .with_context(|| format!("no `connection closed` line of {span}...}} in:\n{log}"))
}

/// The value of `name=` in a log line (span fields end with `:` or `}`).
fn field<'a>(line: &'a str, name: &str) -> anyhow::Result<&'a str> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name).map(|v| v.trim_end_matches([':', '}'])))
        .with_context(|| format!("no {name} in {line}"))
}

/// What the demo lab created, to check that teardown removed it.
struct Footprint {
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
    agents: Vec<u32>,
}

impl Footprint {
    fn of(lab: &Lab) -> Footprint {
        let netns = lab
            .nodes()
            .iter()
            .map(|n| n.netns_name.clone())
            .chain(lab.pods().iter().map(|p| p.netns_name.clone()))
            .collect();
        let dirs = [lab.run_dir(), lab.cgroup_dir(), lab.bpf_dir()]
            .into_iter()
            .map(PathBuf::from)
            .collect();
        let agents = lab
            .nodes()
            .iter()
            .filter_map(|n| lab.agent_pid(&n.name))
            .collect();
        Footprint {
            netns,
            dirs,
            agents,
        }
    }

    fn check_gone(&self) -> anyhow::Result<()> {
        let mut left: Vec<String> = self
            .netns
            .iter()
            .filter(|n| PathBuf::from("/run/netns").join(n).exists())
            .map(|n| format!("network namespace {n}"))
            .collect();
        left.extend(
            self.dirs
                .iter()
                .filter(|d| d.exists())
                .map(|d| d.display().to_string()),
        );
        left.extend(
            self.agents
                .iter()
                .filter(|pid| PathBuf::from(format!("/proc/{pid}")).exists())
                .map(|pid| format!("agent {pid}")),
        );
        if !left.is_empty() {
            bail!("the lab was not removed: {}", left.join(", "));
        }
        Ok(())
    }
}
