//! End-to-end tests of the agents' telemetry (issue: observability): Istio's `istio_tcp_*`
//! families after real traffic, read with the official Prometheus client's text-format parser.

use mesh_lab::{
    parse_exposition,
    traffic::{send, send_succeeds, serve, WAIT},
    wait_until, Exposition, Lab, LabOptions, ParsedSample,
};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
/// Bytes each way of every transfer.
const BYTES: u64 = 65536;
/// The same, as a sample's value.
const BYTES_F: f64 = 65536.0;

/// `node`'s metrics, parsed by `prometheus_client.openmetrics.parser`.
fn exposition(lab: &Lab, node: &str) -> Exposition {
    parse_exposition(&lab.metrics(node)).unwrap_or_else(|e| panic!("metrics of {node}: {e:#}"))
}

/// `node`'s samples.
fn samples(lab: &Lab, node: &str) -> Vec<ParsedSample> {
    exposition(lab, node).samples
}

/// `node`'s access log lines (target `access`), each a JSON object; panics on a line of its
/// log that is not JSON.
fn access_lines(lab: &Lab, node: &str) -> Vec<serde_json::Value> {
    let log = lab.agent_log(node);
    let mut access = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a line of {node}'s log is not JSON ({e}): {line}"));
        if v["target"] == "access" {
            access.push(v);
        }
    }
    access
}

/// The `expr` of every panel target of deploy/grafana/mesh-agent-dashboard.json.
fn dashboard_queries() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/mesh-agent-dashboard.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            queries.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    queries
}

/// The metric names (`mesh_*`, `istio_*`) a PromQL expression mentions.
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let end = (i..bytes.len())
                .find(|&j| !word(bytes[j]))
                .unwrap_or(bytes.len());
            let token = &query[i..end];
            if token.starts_with("mesh_") || token.starts_with("istio_") {
                names.push(token.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// The families docs/metrics.md lists: the first cell of its tables' rows, in backticks.
fn documented_families() -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// The sum of the samples called `name` whose labels include all of `labels`.
fn sum(samples: &[ParsedSample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// The labels of one connection's series: reporter, source and destination workload (in
/// namespace shop, or `unknown`) and principal, service (its name, in shop, or none), the
/// security policy and the flags. The lab's pods are labelled `app: <their name>` and have no
/// version: that is their canonical service, and their revision is `latest`.
#[allow(clippy::too_many_arguments)]
fn series<'a>(
    reporter: &'a str,
    (source, source_principal): (&'a str, &'a str),
    (destination, destination_principal): (&'a str, &'a str),
    service: Option<&'a str>,
    security: &'a str,
    flags: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let ns = |w: &str| if w == "unknown" { "unknown" } else { "shop" };
    let revision = |w: &str| if w == "unknown" { "unknown" } else { "latest" };
    let host = service.map_or("unknown", |s| match s {
        "api" => "api.shop.svc.cluster.local",
        other => panic!("no host for service {other}"),
    });
    vec![
        ("reporter", reporter),
        ("source_workload", source),
        ("source_canonical_service", source),
        ("source_canonical_revision", revision(source)),
        ("source_workload_namespace", ns(source)),
        ("source_principal", source_principal),
        ("source_app", source),
        ("source_version", revision(source)),
        ("destination_workload", destination),
        ("destination_canonical_service", destination),
        ("destination_canonical_revision", revision(destination)),
        ("destination_workload_namespace", ns(destination)),
        ("destination_principal", destination_principal),
        ("destination_app", destination),
        ("destination_version", revision(destination)),
        ("destination_service", host),
        ("destination_service_name", service.unwrap_or("unknown")),
        (
            "destination_service_namespace",
            service.map_or("unknown", |_| "shop"),
        ),
        ("request_protocol", "tcp"),
        ("connection_security_policy", security),
        ("response_flags", flags),
    ]
}

/// Asserts what `node` counted for one series: connections opened and closed, and the bytes
/// of the request (client to server) and of the response.
fn assert_series(
    samples: &[ParsedSample],
    node: &str,
    labels: &[(&str, &str)],
    (opened, closed): (f64, f64),
    (request, response): (f64, f64),
) {
    let got = (
        sum(samples, "istio_tcp_connections_opened_total", labels),
        sum(samples, "istio_tcp_connections_closed_total", labels),
        sum(samples, "istio_tcp_received_bytes_total", labels),
        sum(samples, "istio_tcp_sent_bytes_total", labels),
    );
    let istio: Vec<String> = samples
        .iter()
        .filter(|s| s.family.starts_with("istio_tcp"))
        .map(|s| format!("{} {:?} {}", s.name, s.labels, s.value))
        .collect();
    assert_eq!(
        got,
        (opened, closed, request, response),
        "{node}: opened, closed, request and response bytes of {labels:?}; its istio_tcp samples:\n{}",
        istio.join("\n")
    );
}

#[test]
fn istio_tcp_metrics_count_connections_and_bytes_with_istios_labels() {
    if !mesh_lab::require_privileged(
        "istio_tcp_metrics_count_connections_and_bytes_with_istios_labels",
    ) {
        return;
    }
    // The agents log JSON: they inherit this process's environment (this file's only test, so
    // no other test of the process sees it).
    std::env::set_var("MESH_LOG_FORMAT", "json");
    let lab = Lab::up(LabOptions::default());
    let _api = serve(&lab, "shop/api", 8080);
    let _db = serve(&lab, "shop/db", 7000);
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let api = format!("{}:8080", lab.pod("shop/api").ip);
    let db = format!("{}:7000", lab.pod("shop/db").ip);

    // Across nodes through the service (HBONE), on one node (the fast path), and plaintext
    // from a pod outside the mesh.
    send(&lab, "shop/client", &vip, BYTES);
    send(&lab, "shop/client", &db, BYTES);
    send(&lab, "legacy/client", &api, BYTES);
    // Then shop/db refuses shop/client.
    let mut state = lab.read_state();
    let reloads = |node: &str| lab.metric(node, "mesh_state_reloads_total", &[("result", "ok")]);
    let before = reloads("n1");
    state["policies"] = serde_yaml::from_str(&format!(
        "[{{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, \
         metadata: {{name: deny-client, namespace: shop}}, \
         spec: {{selector: {{matchLabels: {{app: db}}}}, action: DENY, \
         rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]}}}}]",
        CLIENT.trim_start_matches("spiffe://")
    ))
    .expect("policy");
    lab.write_state(&state);
    wait_until("n1 to apply the policy", WAIT, || reloads("n1") > before);
    assert!(
        !send_succeeds(&lab, "shop/client", &db, 1024),
        "the policy denies shop/client -> shop/db"
    );

    // Every connection is counted once its agents have closed it.
    wait_until("the agents to count the connections closed", WAIT, || {
        sum(
            &samples(&lab, "n1"),
            "istio_tcp_connections_closed_total",
            &[],
        ) >= 5.0
            && sum(
                &samples(&lab, "n2"),
                "istio_tcp_connections_closed_total",
                &[],
            ) >= 2.0
    });
    let (n1, n2) = (samples(&lab, "n1"), samples(&lab, "n2"));

    // shop/client -> the service shop/api, across nodes: both agents report it.
    let mtls = "mutual_tls";
    assert_series(
        &n1,
        "n1",
        &series(
            "source",
            ("client", CLIENT),
            ("api", API),
            Some("api"),
            mtls,
            "-",
        ),
        (1.0, 1.0),
        (BYTES_F, BYTES_F),
    );
    assert_series(
        &n2,
        "n2",
        &series(
            "destination",
            ("client", CLIENT),
            ("api", API),
            None,
            mtls,
            "-",
        ),
        (1.0, 1.0),
        (BYTES_F, BYTES_F),
    );
    // Plaintext into shop/api: no principal, no mTLS.
    assert_series(
        &n2,
        "n2",
        &[
            ("reporter", "destination"),
            ("source_principal", "unknown"),
            ("destination_workload", "api"),
            ("connection_security_policy", "unknown"),
            ("response_flags", "-"),
        ],
        (1.0, 1.0),
        (BYTES_F, BYTES_F),
    );
    // Same node, allowed then denied: reported by the source's side and the destination's.
    for reporter in ["source", "destination"] {
        assert_series(
            &n1,
            "n1",
            &series(reporter, ("client", CLIENT), ("db", DB), None, mtls, "-"),
            (1.0, 1.0),
            (BYTES_F, BYTES_F),
        );
        assert_series(
            &n1,
            "n1",
            &series(reporter, ("client", CLIENT), ("db", DB), None, mtls, "DENY"),
            (1.0, 1.0),
            (0.0, 0.0),
        );
    }
    // Istio's labels and no others (no port, address or connection): bounded cardinality.
    let keys: std::collections::BTreeSet<&str> =
        series("source", ("a", "a"), ("b", "b"), None, "", "")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
    for s in n1
        .iter()
        .chain(&n2)
        .filter(|s| s.family.starts_with("istio_tcp"))
    {
        assert_eq!(s.kind, "counter", "{s:?}");
        assert!(
            s.labels.keys().map(String::as_str).eq(keys.iter().copied()),
            "{s:?}"
        );
    }

    // The access log: one JSON object per connection with both ends as the metrics name them.
    let access = access_lines(&lab, "n1");
    let line = access
        .iter()
        .find(|l| l["fields"]["dst.workload"] == "api")
        .unwrap_or_else(|| panic!("no access line of n1 names dst.workload api: {access:#?}"));
    for (field, value) in [
        ("message", "connection closed"),
        ("src.workload", "client"),
        ("src.namespace", "shop"),
        ("src.identity", CLIENT),
        ("dst.namespace", "shop"),
        ("dst.identity", API),
        ("dst.service", "api.shop.svc.cluster.local"),
    ] {
        assert_eq!(line["fields"][field], value, "{field} of {line:#}");
    }
    assert_eq!(line["fields"]["sent"], BYTES, "{line:#}");
    assert_eq!(line["fields"]["received"], BYTES, "{line:#}");
    assert_eq!(line["level"], "INFO", "{line:#}");
    assert!(
        line["span"]["src"].is_string() && line["span"]["endpoint"].is_string(),
        "the connection's span rides along: {line:#}"
    );
    assert_eq!(
        (&line["fields"]["close"], &line["fields"]["flags"]),
        (&"closed".into(), &"-".into()),
        "{line:#}"
    );
    // A denied connection has its access line too, saying why, with Istio's flag (the
    // destination's side, where shop/db's policy decided).
    let denied = access
        .iter()
        .find(|l| {
            l["fields"]["message"] == "connection denied" && l["fields"]["dst.workload"] == "db"
        })
        .unwrap_or_else(|| panic!("no access line of n1 for the denied connection: {access:#?}"));
    for (field, value) in [
        ("close", "policy_denied"),
        ("flags", "DENY"),
        ("src.workload", "client"),
        ("src.identity", CLIENT),
        ("dst.identity", DB),
        ("policy", "shop/deny-client"),
    ] {
        assert_eq!(denied["fields"][field], value, "{field} of {denied:#}");
    }
    assert_eq!(denied["fields"]["sent"], 0, "{denied:#}");

    // Every family the agents export is documented.
    let documented = documented_families();
    for node in ["n1", "n2"] {
        for (family, _) in exposition(&lab, node).families {
            assert!(
                documented.contains(&family),
                "{node} exports {family}, which docs/metrics.md does not list"
            );
        }
    }

    // Every query of the Grafana dashboard in deploy/ names a family the agents export.
    let exported: std::collections::BTreeSet<String> = ["n1", "n2"]
        .iter()
        .flat_map(|node| exposition(&lab, node).families)
        .map(|(family, _)| family)
        .collect();
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    for query in &queries {
        let metrics = metric_names(query);
        assert!(
            !metrics.is_empty(),
            "a dashboard query names no metric: {query}"
        );
        for metric in metrics {
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| metric.strip_suffix(suffix))
                .unwrap_or(&metric);
            assert!(
                exported.contains(family),
                "the dashboard queries {metric}, which no agent exports: {query}"
            );
        }
    }

    // shop/db leaves the state: the series that name it go.
    let mut state = lab.read_state();
    let workloads = state["workloads"].as_sequence_mut().expect("workloads");
    workloads
        .retain(|w| !(w["namespace"].as_str() == Some("shop") && w["name"].as_str() == Some("db")));
    lab.write_state(&state);
    // Its own per-pod series (mesh_tcp_*: n1 served it) go too.
    let pod_series = |samples: &[ParsedSample], workload: &str| {
        samples
            .iter()
            .filter(|s| s.family.starts_with("mesh_tcp_"))
            .filter(|s| s.labels.get("namespace").map(String::as_str) == Some("shop"))
            .filter(|s| s.labels.get("workload").map(String::as_str) == Some(workload))
            .count()
    };
    assert!(pod_series(&samples(&lab, "n1"), "db") > 0);
    wait_until("n1 to remove the series of shop/db", WAIT, || {
        let n1 = samples(&lab, "n1");
        sum(
            &n1,
            "istio_tcp_connections_opened_total",
            &[("destination_workload", "db")],
        ) == 0.0
            && pod_series(&n1, "db") == 0
            && pod_series(&n1, "client") > 0
            && sum(
                &n1,
                "istio_tcp_connections_opened_total",
                &[("source_workload", "client")],
            ) > 0.0
    });
    lab.down();
}
