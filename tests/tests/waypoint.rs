//! End-to-end tests of the waypoint, with real agents in the lab: a waypoint's pod is never
//! captured and fetches the certificate of its own identity from its node's agent (the
//! workload API), which knows the caller by its cgroup and refuses every other caller; HTTP
//! through a running waypoint is routed by HTTPRoute, split by weight, keeps identities and
//! reports Istio's metrics; a server-speaks-first protocol goes through at L4.

use std::{path::Path, time::Duration};

use mesh_lab::{agent_bin, CgroupDriver, Lab, LabOptions, PodSpec, Topology};

/// How long a change may take to show.
const WAIT: Duration = Duration::from_secs(20);

/// The default topology plus a waypoint pod of shop on n1 (named in the state file) and one on
/// n2 laid out by the kubelet's systemd driver (named by UID).
fn topology() -> Topology {
    let mut topology = Topology::default();
    for (name, node, kubelet) in [
        ("waypoint", "n1", None),
        ("waypoint-k", "n2", Some(CgroupDriver::Systemd)),
    ] {
        topology.pods.push(PodSpec {
            namespace: "shop".into(),
            name: name.into(),
            node: node.into(),
            service_account: "waypoint".into(),
            labels: [
                ("app".to_owned(), "waypoint".to_owned()),
                ("mesh-agent/role".to_owned(), "waypoint".to_owned()),
            ]
            .into(),
            capture: None,
            kubelet,
        });
    }
    topology
}

/// Runs `mesh-agent workload fetch` in `target` (a pod or a node) against `node`'s socket,
/// writing into `out`: (success, stdout and stderr).
fn fetch(lab: &Lab, target: &str, node: &str, out: &Path) -> (bool, String) {
    let output = lab
        .command(target, agent_bin())
        .args(["workload", "fetch", "--socket"])
        .arg(lab.workload_socket(node))
        .arg("--out")
        .arg(out)
        .output()
        .expect("running mesh-agent workload fetch");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The URI SAN of the first certificate of a PEM chain.
fn identity_of(chain: &Path) -> String {
    let pem = std::fs::read(chain).expect("the chain file");
    let first = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("a certificate")
        .expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&first).expect("X.509");
    let san = cert
        .subject_alternative_name()
        .expect("extensions")
        .expect("a SAN");
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .expect("a URI SAN")
}

#[test]
fn a_waypoint_pod_fetches_its_own_certificate_and_no_other_caller_does() {
    const TEST: &str = "a_waypoint_pod_fetches_its_own_certificate_and_no_other_caller_does";
    if !mesh_lab::require_privileged(TEST) {
        return;
    }
    let lab = Lab::up(LabOptions {
        topology: topology(),
        ..LabOptions::default()
    });
    // Waypoint pods are workloads of the mesh, never captured.
    assert_eq!(
        lab.metric("n1", "mesh_captured_pods", &[]),
        2.0,
        "shop/client and shop/db, not shop/waypoint"
    );
    assert_eq!(lab.metric("n2", "mesh_captured_pods", &[]), 1.0, "shop/api");
    let dir = lab.run_dir().join("fetched");

    // The waypoint's pod gets its own identity, from its node.
    let out = dir.join("n1-waypoint");
    let (ok, said) = fetch(&lab, "shop/waypoint", "n1", &out);
    assert!(ok, "{said}");
    let want = "spiffe://cluster.local/ns/shop/sa/waypoint";
    assert!(said.contains(want), "{said}");
    assert_eq!(identity_of(&out.join("cert-chain.pem")), want);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(out.join("key.pem"))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is the owner's only");
    assert!(std::fs::read_to_string(out.join("root-cert.pem"))
        .expect("bundle")
        .contains("BEGIN CERTIFICATE"));
    // A waypoint pod named by UID (systemd layout), through its node's agent.
    let out = dir.join("n2-waypoint-k");
    let (ok, said) = fetch(&lab, "shop/waypoint-k", "n2", &out);
    assert!(ok, "{said}");
    assert_eq!(identity_of(&out.join("cert-chain.pem")), want);

    // Every other caller is refused, and gets nothing.
    for (target, node, why) in [
        (
            "shop/client",
            "n1",
            "pod shop/client is not a waypoint's pod",
        ),
        ("n1", "n1", "is no pod of node n1"),
        ("shop/waypoint", "n2", "is no pod of node n2"),
    ] {
        let out = dir.join(format!("refused-{}", target.replace('/', "-")));
        let (ok, said) = fetch(&lab, target, node, &out);
        assert!(!ok, "{target} via {node}'s agent got a certificate: {said}");
        assert!(said.contains(why), "{target} via {node}: {said}");
        assert!(!out.join("key.pem").exists(), "{target}: a key was written");
    }
    let counted = |node: &str, result: &str| {
        lab.metric(
            node,
            "mesh_workload_certificates_total",
            &[("result", result)],
        )
    };
    assert_eq!(
        (counted("n1", "issued"), counted("n1", "refused")),
        (1.0, 2.0)
    );
    assert_eq!(
        (counted("n2", "issued"), counted("n2", "refused")),
        (1.0, 1.0)
    );
    lab.down();
}

/// The L7 lab: shop's waypoint (a pod of n1 running `mesh-agent waypoint`) and its service;
/// reviews in two versions (v1 on n2, v2 on n1), each with a service, and a service of both;
/// a banner (server-speaks-first) service on shop/api.
fn l7_topology() -> Topology {
    let mut topology = Topology::default();
    let pod = |name: &str, node: &str, sa: &str, labels: &[(&str, &str)]| PodSpec {
        namespace: "shop".into(),
        name: name.into(),
        node: node.into(),
        service_account: sa.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        capture: None,
        kubelet: None,
    };
    topology.pods.push(pod(
        "waypoint",
        "n1",
        "waypoint",
        &[("app", "waypoint"), ("mesh-agent/role", "waypoint")],
    ));
    topology.pods.push(pod(
        "reviews-v1",
        "n2",
        "reviews",
        &[("app", "reviews"), ("version", "v1")],
    ));
    topology.pods.push(pod(
        "reviews-v2",
        "n1",
        "reviews",
        &[("app", "reviews"), ("version", "v2")],
    ));
    let service = |name: &str, vip: &str, port: u16, target: u16, selector: &[(&str, &str)]| {
        mesh_lab::ServiceSpec {
            namespace: "shop".into(),
            name: name.into(),
            vip: vip.parse().expect("vip"),
            ports: vec![mesh_lab::ServicePort {
                port,
                target_port: target,
            }],
            selector: selector
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    };
    topology.services.extend([
        service(
            "waypoint",
            "10.240.100.20",
            15008,
            15008,
            &[("app", "waypoint")],
        ),
        service("reviews", "10.240.100.21", 80, 8080, &[("app", "reviews")]),
        service(
            "reviews-v1",
            "10.240.100.22",
            80,
            8080,
            &[("app", "reviews"), ("version", "v1")],
        ),
        service(
            "reviews-v2",
            "10.240.100.23",
            80,
            8080,
            &[("app", "reviews"), ("version", "v2")],
        ),
        service("mail", "10.240.100.24", 25, 2525, &[("app", "api")]),
    ]);
    topology
}

const ROUTES: &str = r#"
- metadata: {name: reviews, namespace: shop}
  spec:
    parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
    rules:
      - matches: [{headers: [{name: x-version, value: v2}]}]
        backendRefs: [{name: reviews-v2, port: 80}]
      - backendRefs:
          - {name: reviews-v1, port: 80, weight: 90}
          - {name: reviews-v2, port: 80, weight: 10}
"#;

/// `mesh-labtool http-get` from `pod`: its JSON summary.
fn http_get(lab: &Lab, pod: &str, to: &str, args: &[&str]) -> serde_json::Value {
    let output = lab
        .command(pod, mesh_lab::labtool_bin())
        .args(["http-get", "--to", to])
        .args(args)
        .output()
        .expect("running mesh-labtool http-get");
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "http-get answered {text:?} ({e}); stderr {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The waypoint's metrics, read inside its pod.
fn waypoint_metrics(lab: &Lab) -> String {
    let output = lab
        .command("shop/waypoint", "curl")
        .args(["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn http_through_the_waypoint_is_routed_split_and_keeps_identities() {
    const TEST: &str = "http_through_the_waypoint_is_routed_split_and_keeps_identities";
    if !mesh_lab::require_privileged(TEST) {
        return;
    }
    let lab = Lab::up(LabOptions {
        topology: l7_topology(),
        ..LabOptions::default()
    });
    let mut servers = Vec::new();
    for (pod, name) in [("shop/reviews-v1", "v1"), ("shop/reviews-v2", "v2")] {
        let mut s = mesh_lab::Running::spawn(
            name,
            lab.command(pod, mesh_lab::labtool_bin()).args([
                "http-serve",
                "--port",
                "8080",
                "--name",
                name,
            ]),
        );
        s.wait_line("listening", Duration::from_secs(10));
        servers.push(s);
    }
    let mut banner = mesh_lab::Running::spawn(
        "banner",
        lab.command("shop/api", mesh_lab::labtool_bin()).args([
            "banner",
            "--port",
            "2525",
            "--text",
            "220 mail ready",
        ]),
    );
    banner.wait_line("listening", Duration::from_secs(10));

    // The namespace gets its waypoint and routes; both agents apply it.
    let reloads = |node: &str| lab.metric(node, "mesh_state_reloads_total", &[("result", "ok")]);
    let before = (reloads("n1"), reloads("n2"));
    let mut state = lab.read_state();
    state["waypoints"] = serde_yaml::from_str("[{namespace: shop, name: waypoint}]").expect("yaml");
    state["routes"] = serde_yaml::from_str(ROUTES).expect("yaml");
    lab.write_state(&state);
    mesh_lab::wait_until("both agents to apply the waypoint", WAIT, || {
        reloads("n1") > before.0 && reloads("n2") > before.1
    });

    // Before the waypoint runs, its namespace's services are refused, never sent around it.
    let refused = http_get(
        &lab,
        "shop/client",
        "10.240.100.21:80",
        &["--host", "reviews.shop"],
    );
    assert!(
        refused["statuses"]
            .as_object()
            .is_some_and(serde_json::Map::is_empty),
        "a service of a waypoint namespace answered without its waypoint: {refused}"
    );

    let config = lab.run_dir().join("waypoint.yaml");
    std::fs::write(
        &config,
        format!(
            "namespace: shop\nname: waypoint\nstate_file: {}\nstate_poll_interval_ms: 100\n\
             identity: {{workload_socket: {}}}\nhttp: {{sniff_timeout_ms: 500}}\n",
            lab.state_path().display(),
            lab.workload_socket("n1").display()
        ),
    )
    .expect("writing the waypoint configuration");
    let mut waypoint = mesh_lab::Running::spawn(
        "waypoint",
        lab.command("shop/waypoint", agent_bin())
            .env("MESH_LOG", "info")
            .args(["waypoint", "--config"])
            .arg(&config),
    );
    mesh_lab::wait_until("the waypoint to be ready", WAIT, || {
        lab.command("shop/waypoint", "curl")
            .args([
                "-sf",
                "--max-time",
                "2",
                "http://127.0.0.1:15021/healthz/ready",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    });

    // Header-based routing: every request with the header goes to v2.
    let v2 = http_get(
        &lab,
        "shop/client",
        "10.240.100.21:80",
        &[
            "--host",
            "reviews.shop",
            "--header",
            "x-version: v2",
            "--count",
            "20",
        ],
    );
    assert_eq!(v2["served"]["v2"], 20, "{v2}\n{}", waypoint.stderr());
    // What the endpoint received: the trace context; no identity header the client forged.
    let forged = http_get(
        &lab,
        "shop/client",
        "10.240.100.21:80",
        &[
            "--host",
            "reviews.shop",
            "--header",
            "x-version: v2",
            "--header",
            "x-forwarded-client-cert: By=spiffe://cluster.local/ns/shop/sa/admin",
        ],
    );
    let received: serde_json::Value =
        serde_json::from_str(forged["first_body"].as_str().expect("a body")).expect("JSON");
    assert!(
        received["headers"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-") && t.len() == 55),
        "{received}"
    );
    assert!(
        received["headers"].get("x-forwarded-client-cert").is_none(),
        "a forged identity header reached the endpoint: {received}"
    );

    // A 90/10 split over 2,000 requests lands within 3 points; over HTTP/2 too.
    let split = http_get(
        &lab,
        "shop/client",
        "10.240.100.21:80",
        &["--host", "reviews.shop", "--count", "2000"],
    );
    let v1 = split["served"]["v1"].as_f64().unwrap_or(0.0);
    assert!(
        (1740.0..=1860.0).contains(&v1),
        "v1 took {v1} of 2000 (90% is 1800): {split}"
    );
    let h2 = http_get(
        &lab,
        "shop/client",
        "10.240.100.21:80",
        &[
            "--h2",
            "--host",
            "reviews.shop",
            "--header",
            "x-version: v2",
            "--count",
            "10",
        ],
    );
    assert_eq!(h2["served"]["v2"], 10, "{h2}");
    let version: serde_json::Value =
        serde_json::from_str(h2["first_body"].as_str().expect("a body")).expect("JSON");
    assert_eq!(
        version["version"], "HTTP/2.0",
        "the endpoint is spoken to as the client spoke"
    );

    // A server-speaks-first protocol through the waypoint does not stall.
    let output = lab
        .command("shop/client", mesh_lab::labtool_bin())
        .args(["read-banner", "--to", "10.240.100.24:25"])
        .output()
        .expect("read-banner");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.starts_with("banner 220 mail ready"),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The node proxy sent these through the waypoint; the waypoint's metrics carry Istio's
    // labels: the client's identity as the source, the endpoint's workload as the destination.
    // (One connection per http-get run and the banner's: five through the waypoint.)
    let through = lab.metric(
        "n1",
        "mesh_outbound_routes_total",
        &[("transport", "waypoint")],
    );
    assert!(through >= 5.0, "{through} connections through the waypoint");
    let metrics = waypoint_metrics(&lab);
    let requests = |labels: &[(&str, &str)]| {
        mesh_lab::exposed_value(&metrics, "istio_requests_total", labels)
            .unwrap_or_else(|e| panic!("{e}\n{metrics}"))
    };
    let to_v2 = requests(&[
        ("reporter", "waypoint"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/client",
        ),
        ("destination_workload", "reviews-v2"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/reviews",
        ),
        ("destination_service", "reviews.shop.svc.cluster.local"),
        ("response_code", "200"),
        ("connection_security_policy", "mutual_tls"),
    ]);
    // 20 by header, the forged one, 10 over HTTP/2, and v2's share of the split.
    assert!(to_v2 >= 31.0, "{to_v2}\n{metrics}");
    assert_eq!(
        requests(&[("destination_workload", "reviews-v1")])
            + requests(&[("destination_workload", "reviews-v2")]),
        2031.0,
        "{metrics}"
    );
    assert!(
        mesh_lab::exposed_value(
            &metrics,
            "mesh_waypoint_streams_total",
            &[("protocol", "tcp")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    waypoint.kill();
    banner.kill();
    for mut s in servers {
        s.kill();
    }
    lab.down();
}
