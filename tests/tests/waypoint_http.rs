//! End-to-end tests of the waypoint at work, with real agents and a real `mesh-agent waypoint`
//! in the lab (`mesh_lab::l7`): HTTP routed by HTTPRoute and split by weight; retries, their
//! budget and timeouts; the circuit breaker and outlier detection; L7 authorization on the
//! normalised request with the client's identity, while the destination's L4 policy sees the
//! waypoint's; a server-speaks-first protocol through at L4; Istio's request metrics.

use std::time::{Duration, Instant};

use mesh_lab::{
    certs,
    l7::{
        count, http_get, serve_http, set_state, start_waypoint, topology, waypoint_metrics, MAIL,
        REVIEWS, REVIEWS_V1, REVIEWS_V2, SMTP, WAIT, WAYPOINT_VIP,
    },
    Lab, LabOptions, Running,
};

const HOST: [&str; 2] = ["--host", "reviews.shop"];

/// Header `x-version: v2` to v2; the rest 90/10 over v1 and v2. reviews-v1's requests are
/// mirrored to v2.
const SPLIT: &str = r#"
- metadata: {name: mirrored, namespace: shop}
  spec:
    parentRefs: [{group: "", kind: Service, name: reviews-v1, port: 80}]
    rules:
      - backendRefs: [{name: reviews-v1, port: 80}]
        filters: [{type: RequestMirror, requestMirror: {backendRef: {name: reviews-v2, port: 80}}}]
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

fn lab(test: &str) -> Option<Lab> {
    if !mesh_lab::require_privileged(test) {
        return None;
    }
    Some(Lab::up(LabOptions {
        topology: topology(),
        ..LabOptions::default()
    }))
}

/// A banner server (server speaks first) on shop/api's port 2525.
fn banner(lab: &Lab) -> Running {
    let mut banner = Running::spawn(
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
    banner
}

/// Six concurrent clients send 5 requests each to reviews-v2: (answered 200, answered 503).
fn flood(lab: &Lab) -> (u64, u64) {
    let clients: Vec<Running> = (0..6)
        .map(|i| {
            Running::spawn(
                &format!("flood {i}"),
                lab.command("shop/client", mesh_lab::labtool_bin()).args([
                    "http-get",
                    "--to",
                    REVIEWS_V2,
                    "--host",
                    "reviews.shop",
                    "--count",
                    "5",
                ]),
            )
        })
        .collect();
    let (mut ok, mut overflowed) = (0, 0);
    for mut c in clients {
        let line = c.wait_success(WAIT).join("");
        let summary: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        ok += count(&summary, "statuses", "200");
        overflowed += count(&summary, "statuses", "503");
    }
    (ok, overflowed)
}

fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    mesh_lab::exposed_value(metrics, name, labels).unwrap_or_else(|e| panic!("{e}\n{metrics}"))
}

#[test]
fn http_through_the_waypoint_is_routed_split_and_keeps_identities() {
    let Some(lab) = lab("http_through_the_waypoint_is_routed_split_and_keeps_identities") else {
        return;
    };
    let _v1 = serve_http(&lab, "shop/reviews-v1", "v1", &[]);
    let mut v2_server = serve_http(&lab, "shop/reviews-v2", "v2", &["--log"]);
    let _banner = banner(&lab);
    set_state(&lab, SPLIT, "[]");

    // Before the waypoint runs, its namespace's services are refused, never sent around it.
    let refused = http_get(&lab, "shop/client", REVIEWS, &HOST);
    assert!(
        refused["statuses"]
            .as_object()
            .is_some_and(serde_json::Map::is_empty),
        "a service of a waypoint namespace answered without its waypoint: {refused}"
    );

    let waypoint = start_waypoint(&lab, "{sniff_timeout_ms: 500}");
    // Header-based routing: every request with the header goes to v2.
    let v2 = http_get(
        &lab,
        "shop/client",
        REVIEWS,
        &[
            HOST[0],
            HOST[1],
            "--header",
            "x-version: v2",
            "--count",
            "20",
        ],
    );
    assert_eq!(
        count(&v2, "served", "v2"),
        20,
        "{v2}\n{}",
        waypoint.stderr()
    );
    // What the endpoint received: the trace context; no identity header the client forged.
    let forged = http_get(
        &lab,
        "shop/client",
        REVIEWS,
        &[
            HOST[0],
            HOST[1],
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

    // A 90/10 split over 2,000 requests lands within 3 points.
    let split = http_get(
        &lab,
        "shop/client",
        REVIEWS,
        &[HOST[0], HOST[1], "--count", "2000"],
    );
    let v1 = count(&split, "served", "v1");
    assert!(
        (1740..=1860).contains(&v1),
        "v1 took {v1} of 2000 (90% is 1800): {split}"
    );
    // HTTP/2 with prior knowledge, spoken to the endpoint as the client spoke it.
    let h2 = http_get(
        &lab,
        "shop/client",
        REVIEWS,
        &[
            "--h2",
            HOST[0],
            HOST[1],
            "--header",
            "x-version: v2",
            "--count",
            "10",
        ],
    );
    assert_eq!(count(&h2, "served", "v2"), 10, "{h2}");
    let version: serde_json::Value =
        serde_json::from_str(h2["first_body"].as_str().expect("a body")).expect("JSON");
    assert_eq!(version["version"], "HTTP/2.0");

    // A mirrored request: v1 answers, v2 gets a copy, body included, its host marked.
    let mirrored = http_get(
        &lab,
        "shop/client",
        REVIEWS_V1,
        &[HOST[0], HOST[1], "--method", "POST", "--body-bytes", "1000"],
    );
    assert_eq!(count(&mirrored, "served", "v1"), 1, "{mirrored}");
    v2_server.wait_line(
        "request POST / host=reviews.shop-shadow body_bytes=1000",
        WAIT,
    );

    // A server-speaks-first protocol through the waypoint does not stall.
    let output = lab
        .command("shop/client", mesh_lab::labtool_bin())
        .args(["read-banner", "--to", MAIL])
        .output()
        .expect("read-banner");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.starts_with("banner 220 mail ready"),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The node proxy sent these through the waypoint (one connection per http-get run and the
    // banner's); the waypoint's metrics carry Istio's labels: the client's identity as the
    // source, the endpoint's workload as the destination.
    let through = lab.metric(
        "n1",
        "mesh_outbound_routes_total",
        &[("transport", "waypoint")],
    );
    assert!(through >= 5.0, "{through} connections through the waypoint");
    let metrics = waypoint_metrics(&lab);
    let to_v2 = metric(
        &metrics,
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("source_workload", "client"),
            ("source_workload_namespace", "shop"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/client",
            ),
            ("source_canonical_service", "client"),
            ("source_canonical_revision", "latest"),
            ("destination_workload", "reviews-v2"),
            // Its pod's labels app=reviews, version=v2: what Kiali's versioned app graph shows.
            ("destination_canonical_service", "reviews"),
            ("destination_canonical_revision", "v2"),
            ("destination_app", "reviews"),
            ("destination_version", "v2"),
            ("destination_workload_namespace", "shop"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/shop/sa/reviews",
            ),
            ("destination_service", "reviews.shop.svc.cluster.local"),
            ("destination_service_name", "reviews"),
            ("request_protocol", "http"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    // 20 by header, the forged one, 10 over HTTP/2, and v2's share of the split.
    assert!(to_v2 >= 31.0, "{to_v2}\n{metrics}");
    let all = metric(
        &metrics,
        "istio_requests_total",
        &[("response_code", "200")],
    );
    // (2,031 routed and the mirrored POST; a mirror's copy is not a request of a client.)
    assert_eq!(all, 2032.0, "{metrics}");
    let durations = metric(
        &metrics,
        "istio_request_duration_milliseconds_count",
        &[
            ("destination_workload", "reviews-v1"),
            ("destination_service_name", "reviews"),
        ],
    );
    assert_eq!(durations, v1 as f64, "{metrics}");
    assert!(
        metric(
            &metrics,
            "mesh_waypoint_streams_total",
            &[("protocol", "tcp")]
        ) >= 1.0
    );
    assert_eq!(metric(&metrics, "mesh_waypoint_routes", &[]), 2.0);
    lab.down();
}

#[test]
fn filters_redirect_rewrite_and_change_headers_both_ways() {
    let Some(lab) = lab("filters_redirect_rewrite_and_change_headers_both_ways") else {
        return;
    };
    let _v1 = serve_http(&lab, "shop/reviews-v1", "v1", &[]);
    let routes = r#"
- metadata: {name: filtered, namespace: shop}
  spec:
    parentRefs: [{group: "", kind: Service, name: reviews-v1, port: 80}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /old}}]
        filters:
          - type: RequestRedirect
            requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
      - matches: [{path: {type: PathPrefix, value: /api}}]
        filters:
          - type: URLRewrite
            urlRewrite: {hostname: reviews.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}
          - type: RequestHeaderModifier
            requestHeaderModifier: {set: [{name: x-env, value: lab}], add: [{name: x-added, value: "1"}], remove: [x-drop]}
          - type: ResponseHeaderModifier
            responseHeaderModifier: {set: [{name: x-through, value: waypoint}], remove: [x-served-by]}
        backendRefs: [{name: reviews-v1, port: 80}]
"#;
    set_state(&lab, routes, "[]");
    let waypoint = start_waypoint(&lab, "{}");

    // A redirect is the waypoint's own answer, the matched prefix replaced, the query kept.
    let moved = http_get(
        &lab,
        "shop/client",
        REVIEWS_V1,
        &[HOST[0], HOST[1], "--path", "/old/page?x=1"],
    );
    assert_eq!(
        count(&moved, "statuses", "301"),
        1,
        "{moved}\n{}",
        waypoint.stderr()
    );
    assert_eq!(
        moved["first_headers"]["location"], "http://reviews.shop/new/page?x=1",
        "{moved}"
    );
    // A rewrite and header changes: what the endpoint received, and what the client got.
    let changed = http_get(
        &lab,
        "shop/client",
        REVIEWS_V1,
        &[
            HOST[0],
            HOST[1],
            "--path",
            "/api/items?q=2",
            "--header",
            "x-drop: secret",
            "--header",
            "x-env: prod",
        ],
    );
    assert_eq!(count(&changed, "statuses", "200"), 1, "{changed}");
    let received: serde_json::Value =
        serde_json::from_str(changed["first_body"].as_str().expect("a body")).expect("JSON");
    assert_eq!(received["path"], "/v1/items?q=2", "{received}");
    assert_eq!(
        received["headers"]["host"], "reviews.internal",
        "{received}"
    );
    assert_eq!(received["headers"]["x-env"], "lab", "{received}");
    assert_eq!(received["headers"]["x-added"], "1", "{received}");
    assert!(received["headers"].get("x-drop").is_none(), "{received}");
    let headers = &changed["first_headers"];
    assert_eq!(headers["x-through"], "waypoint", "{changed}");
    assert!(headers.get("x-served-by").is_none(), "{changed}");
    // No rule matches: 404 from the waypoint.
    let unrouted = http_get(
        &lab,
        "shop/client",
        REVIEWS_V1,
        &[HOST[0], HOST[1], "--path", "/else"],
    );
    assert_eq!(count(&unrouted, "statuses", "404"), 1, "{unrouted}");
    lab.down();
}

/// Every request to reviews-v1 and reviews-v2 goes to that service (no route).
#[test]
fn retries_hide_a_flaky_endpoint_the_budget_caps_them_and_timeouts_hold() {
    let Some(lab) = lab("retries_hide_a_flaky_endpoint_the_budget_caps_them_and_timeouts_hold")
    else {
        return;
    };
    // v1 fails every other request; v2 fails them all.
    let v1 = serve_http(&lab, "shop/reviews-v1", "v1", &["--fail-every", "2"]);
    let v2 = serve_http(&lab, "shop/reviews-v2", "v2", &["--fail-every", "1"]);
    set_state(&lab, "[]", "[]");
    let waypoint = start_waypoint(&lab, "{}");

    // A backend failing every other request: the client sees no error. (One client on one
    // endpoint: after the first, each request's first try fails and its retry succeeds, so 80
    // requests need 79 retries, which the budget's floor alone allows: 10 per second over its
    // 10 s window.)
    let flaky = http_get(
        &lab,
        "shop/client",
        REVIEWS_V1,
        &[HOST[0], HOST[1], "--count", "80"],
    );
    assert_eq!(
        count(&flaky, "statuses", "200"),
        80,
        "{flaky}\n{}",
        waypoint.stderr()
    );

    // A backend that always fails: retries stay within the budget (20% of the requests plus
    // 10 per second), not the 2 per request the policy would make.
    let started = Instant::now();
    let down = http_get(
        &lab,
        "shop/client",
        REVIEWS_V2,
        &[HOST[0], HOST[1], "--count", "1000"],
    );
    let took = started.elapsed().as_secs_f64();
    assert_eq!(count(&down, "statuses", "503"), 1000, "{down}");
    let metrics = waypoint_metrics(&lab);
    let labels = |result| [("service", "shop/reviews-v2"), ("result", result)];
    let sent = metric(&metrics, "mesh_waypoint_retries_total", &labels("sent"));
    let refused = metric(
        &metrics,
        "mesh_waypoint_retries_total",
        &labels("budget_exhausted"),
    );
    // 20% of the requests plus the floor: 10 per second, and its 10 s window's worth at first.
    let allowed = 0.2 * 1000.0 + 10.0 * (took + 10.0);
    assert!(
        sent <= allowed,
        "{sent} retries sent in {took:.1} s, the budget allows {allowed:.0}"
    );
    assert!(sent >= 200.0, "{sent} retries: the budget's share is 200");
    assert!(refused >= 700.0, "{refused} retries refused by the budget");
    assert_eq!(
        metric(
            &metrics,
            "istio_requests_total",
            &[
                ("destination_service_name", "reviews-v2"),
                ("response_code", "503"),
                ("response_flags", "URX"),
            ]
        ) + metric(
            &metrics,
            "istio_requests_total",
            &[
                ("destination_service_name", "reviews-v2"),
                ("response_code", "503"),
                ("response_flags", "-"),
            ]
        ),
        1000.0,
        "{metrics}"
    );
    drop((v1, v2));
    lab.down();
}

#[test]
fn timeouts_hold_and_a_slow_try_is_retried_on_another_endpoint() {
    let Some(lab) = lab("timeouts_hold_and_a_slow_try_is_retried_on_another_endpoint") else {
        return;
    };
    // v1 answers after 3 s, v2 at once.
    let _v1 = serve_http(&lab, "shop/reviews-v1", "v1", &["--delay-ms", "3000"]);
    let _v2 = serve_http(&lab, "shop/reviews-v2", "v2", &[]);
    let routes = r#"
- metadata: {name: slow, namespace: shop}
  spec:
    parentRefs: [{group: "", kind: Service, name: reviews-v1, port: 80}]
    rules: [{backendRefs: [{name: reviews-v1, port: 80}], timeouts: {request: 500ms}}]
- metadata: {name: reviews, namespace: shop}
  spec:
    parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
    rules:
      - backendRefs: [{name: reviews, port: 80}]
        timeouts: {request: 10s, backendRequest: 300ms}
"#;
    set_state(&lab, routes, "[]");
    // A client that says nothing is waited for up to a minute before it is taken for TCP...
    let _waypoint = start_waypoint(&lab, "{sniff_timeout_ms: 60000}");
    let _banner = banner(&lab);
    // ... unless the service declares the port's protocol: shop/smtp is `tcp`, proxied at
    // once, and its banner comes well within read-banner's 10 s.
    let output = lab
        .command("shop/client", mesh_lab::labtool_bin())
        .args(["read-banner", "--to", SMTP, "--timeout-ms", "10000"])
        .output()
        .expect("read-banner");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.starts_with("banner 220 mail ready"),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The request timeout: 504, flagged UT.
    let timed_out = http_get(&lab, "shop/client", REVIEWS_V1, &HOST);
    assert_eq!(count(&timed_out, "statuses", "504"), 1, "{timed_out}");
    // A try that takes longer than backendRequest is retried on the other endpoint: every
    // request is answered by v2, in time.
    let retried = http_get(
        &lab,
        "shop/client",
        REVIEWS,
        &[HOST[0], HOST[1], "--count", "20"],
    );
    assert_eq!(count(&retried, "served", "v2"), 20, "{retried}");
    let metrics = waypoint_metrics(&lab);
    assert_eq!(
        metric(
            &metrics,
            "istio_requests_total",
            &[("response_code", "504"), ("response_flags", "UT")]
        ),
        1.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "mesh_waypoint_retries_total",
            &[("service", "shop/reviews"), ("result", "sent")]
        ) >= 1.0,
        "no try was slow: the two choices never picked v1?\n{metrics}"
    );
    lab.down();
}

#[test]
fn the_breaker_trips_under_a_flood_and_a_failing_endpoint_is_ejected_and_returns() {
    let Some(lab) =
        lab("the_breaker_trips_under_a_flood_and_a_failing_endpoint_is_ejected_and_returns")
    else {
        return;
    };
    // v1 always answers 503; v2 answers after 200 ms.
    let _v1 = serve_http(&lab, "shop/reviews-v1", "v1", &["--fail-every", "1"]);
    let _v2 = serve_http(&lab, "shop/reviews-v2", "v2", &["--delay-ms", "200"]);
    set_state(&lab, "[]", "[]");
    let outlier = "outlier: {consecutive_errors: 3, base_ejection_ms: 2000}";

    // Requests: 2 in flight and 1 waiting at most.
    let mut waypoint = start_waypoint(
        &lab,
        &format!(
            "{{retries: {{attempts: 0}}, limits: {{max_requests: 2, max_pending: 1}}, {outlier}}}"
        ),
    );
    let (ok, overflowed) = flood(&lab);
    assert!(overflowed > 0, "the breaker never tripped: {ok} answered");
    assert!(ok >= 3, "the breaker let too little through: {ok}");
    let overflows = || {
        metric(
            &waypoint_metrics(&lab),
            "mesh_waypoint_overflows_total",
            &[("service", "shop/reviews-v2")],
        )
    };
    assert_eq!(overflows(), overflowed as f64);
    assert!(waypoint
        .stderr()
        .contains("over its concurrent request limit"));
    // It recovers: one request at a time goes through.
    let calm = http_get(
        &lab,
        "shop/client",
        REVIEWS_V2,
        &[HOST[0], HOST[1], "--count", "3"],
    );
    assert_eq!(count(&calm, "statuses", "200"), 3, "{calm}");
    waypoint.kill();

    // Connections: 1 per backend. The flood's second request in flight finds no place for a
    // connection of its own.
    let waypoint = start_waypoint(
        &lab,
        &format!("{{retries: {{attempts: 0}}, limits: {{max_connections: 1}}, {outlier}}}"),
    );
    let (ok, overflowed) = flood(&lab);
    assert!(
        overflowed > 0,
        "the connection limit never held: {ok} answered"
    );
    assert!(ok >= 3, "the connection limit let too little through: {ok}");
    assert_eq!(overflows(), overflowed as f64);
    let said = waypoint.stderr();
    assert!(said.contains("over its connection limit"), "{said}");

    // reviews (v1 and v2, one connection at a time: an idle one to v1 is closed to make room
    // for one to v2): v1 is ejected after 3 consecutive 503s, and the rest go to v2; each
    // ejection (2 s, then 4 s) costs exactly 3 failed requests.
    let ejections = || {
        metric(
            &waypoint_metrics(&lab),
            "mesh_waypoint_ejections_total",
            &[("service", "shop/reviews")],
        )
    };
    let spread = http_get(
        &lab,
        "shop/client",
        REVIEWS,
        &[HOST[0], HOST[1], "--count", "30"],
    );
    let failed = count(&spread, "statuses", "503");
    let ejected = ejections();
    assert!(ejected >= 1.0, "{spread}");
    assert_eq!(
        failed as f64,
        3.0 * ejected,
        "v1 took requests while ejected: {spread}"
    );
    assert_eq!(count(&spread, "served", "v2"), 30 - failed);
    // After its ejection (2 s), v1 takes requests again, fails, and is ejected again.
    mesh_lab::wait_until("v1 to return and be ejected again", WAIT, || {
        let _ = http_get(
            &lab,
            "shop/client",
            REVIEWS,
            &[HOST[0], HOST[1], "--count", "5"],
        );
        ejections() > ejected
    });
    lab.down();
}

#[test]
fn l7_policy_sees_the_normalised_request_and_the_clients_identity() {
    let Some(lab) = lab("l7_policy_sees_the_normalised_request_and_the_clients_identity") else {
        return;
    };
    let _v1 = serve_http(&lab, "shop/reviews-v1", "v1", &[]);
    let _v2 = serve_http(&lab, "shop/reviews-v2", "v2", &[]);
    // L7, at the waypoint: no /admin for anyone; only shop/client may use reviews at all.
    // L4, at the endpoints: only the waypoint may connect to reviews' pods.
    let policies = r#"
- metadata: {name: no-admin, namespace: shop}
  spec:
    targetRefs: [{kind: Service, group: "", name: reviews}]
    action: DENY
    rules: [{to: [{operation: {paths: [/admin, /admin/*]}}]}]
- metadata: {name: client-only, namespace: shop}
  spec:
    targetRefs: [{kind: Service, group: "", name: reviews}]
    action: ALLOW
    rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
- metadata: {name: from-the-waypoint, namespace: shop}
  spec:
    selector: {matchLabels: {app: reviews}}
    action: ALLOW
    rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/waypoint]}}]}]
"#;
    set_state(&lab, "[]", policies);
    let waypoint = start_waypoint(&lab, "{}");

    let get = |pod: &str, path: &str| {
        let summary = http_get(&lab, pod, REVIEWS, &[HOST[0], HOST[1], "--path", path]);
        summary["statuses"]
            .as_object()
            .and_then(|s| s.keys().next().cloned())
            .unwrap_or_else(|| format!("no answer: {summary}"))
    };
    assert_eq!(
        get("shop/client", "/products"),
        "200",
        "{}",
        waypoint.stderr()
    );
    // The bypasses Istio shipped as CVEs: each is the one form /admin.
    for path in [
        "/admin",
        "//admin",
        "/%61dmin",
        "/./admin",
        "/x/../admin",
        "/%2Fadmin",
        "/x%2F..%2Fadmin",
        "/admin/users",
        "/%2e%2e/admin",
    ] {
        assert_eq!(get("shop/client", path), "403", "{path} got through");
    }
    // Paths are case-sensitive (Gateway API and Istio): /Admin is another path.
    assert_eq!(get("shop/client", "/Admin"), "200");
    // The L7 policy sees the client's identity: shop/db is not shop/client.
    assert_eq!(get("shop/db", "/products"), "403");
    // ... however it dresses up.
    let forged = http_get(
        &lab,
        "shop/db",
        REVIEWS,
        &[
            HOST[0],
            HOST[1],
            "--header",
            "x-forwarded-client-cert: By=spiffe://cluster.local/ns/shop/sa/client",
        ],
    );
    assert_eq!(count(&forged, "statuses", "403"), 1, "{forged}");
    // The endpoints' L4 policy sees the waypoint's identity: through it, allowed (above);
    // straight to a pod (not through the service), shop/client is denied.
    let direct = lab.pod("shop/reviews-v1").ip;
    let straight = http_get(&lab, "shop/client", &format!("{direct}:8080"), &HOST);
    assert_eq!(count(&straight, "statuses", "200"), 0, "{straight}");
    assert!(
        lab.metric(
            "n2",
            "mesh_policy_decisions_total",
            &[("action", "deny"), ("policy", "shop/from-the-waypoint")]
        ) >= 1.0
    );
    // The waypoint's own HBONE server (here from legacy/client, outside the mesh) admits a
    // client by placement, and takes only the service ports of its namespace that name it.
    let waypoint_addr = format!("{}:15008", lab.pod("shop/waypoint").ip);
    let client_id = certs::id("shop", "client");
    let placed = certs::issue_node_leaf(&lab, "n1", &client_id, "client-n1");
    let requests = [
        format!("CONNECT {REVIEWS}"),
        format!("CONNECT {direct}:8080"),
        "CONNECT 10.240.100.99:80".to_owned(),
        format!("CONNECT {WAYPOINT_VIP}:15008"),
    ];
    let out = certs::hbone_client(
        &lab,
        "legacy/client",
        &waypoint_addr,
        Some(&placed),
        &requests,
    );
    let has = |line: &str| out.iter().any(|l| l == line);
    assert!(
        has(&format!(
            "server_identity {}",
            certs::id("shop", "waypoint")
        )),
        "{out:?}"
    );
    assert!(has("response 0 status=200"), "{out:?}");
    for (i, request) in requests.iter().enumerate().skip(1) {
        assert!(
            has(&format!("response {i} status=400")),
            "{request} was not refused: {out:?}"
        );
    }
    // shop/client runs on n1: a certificate of its identity from n2 is refused.
    let misplaced = certs::issue_node_leaf(&lab, "n2", &client_id, "client-n2");
    let out = certs::hbone_client(
        &lab,
        "legacy/client",
        &waypoint_addr,
        Some(&misplaced),
        &[format!("CONNECT {REVIEWS}")],
    );
    assert!(
        !out.iter().any(|l| l.starts_with("response 0 status=")),
        "{out:?}"
    );
    // The waypoint's log names the deciding policy and rule.
    let said = waypoint.stderr();
    assert!(
        said.contains("shop/no-admin") && said.contains("403"),
        "{said}"
    );
    lab.down();
}
