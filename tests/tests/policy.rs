//! End-to-end tests of L4 authorization (issue: L4 authorization policy on mTLS identities).
//! Real agents decide real connections: HBONE streams across nodes, same-node deliveries and
//! plaintext connections; policies change in the state file while connections run.

use mesh_lab::{
    traffic::{send_succeeds, serve, WAIT},
    wait_until, Lab, LabOptions, Running,
};
use serde_yaml::Value;

/// An AuthorizationPolicy object as Kubernetes holds it; `spec` in YAML flow style.
fn policy(namespace: &str, name: &str, spec: &str) -> Value {
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    );
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("policy {namespace}/{name}: {e}"))
}

/// Replaces the policies of the state file and waits until both agents have applied it.
fn set_policies(lab: &Lab, policies: &[Value]) {
    let reloads = |node: &str| lab.metric(node, "mesh_state_reloads_total", &[("result", "ok")]);
    let before = (reloads("n1"), reloads("n2"));
    let mut state = lab.read_state();
    state["policies"] = Value::Sequence(policies.to_vec());
    lab.write_state(&state);
    wait_until("both agents to apply the policies", WAIT, || {
        reloads("n1") > before.0 && reloads("n2") > before.1
    });
}

/// Sends 64 KiB from `client` to `addr` and says whether the echo came back whole.
fn transfer(lab: &Lab, client: &str, addr: &str) -> bool {
    send_succeeds(lab, client, addr, 65536)
}

fn allowed(lab: &Lab, client: &str, addr: &str) {
    assert!(
        transfer(lab, client, addr),
        "{client} -> {addr} should be allowed\nn1:\n{}\nn2:\n{}",
        tail(&lab.agent_log("n1")),
        tail(&lab.agent_log("n2"))
    );
}

fn denied(lab: &Lab, client: &str, addr: &str) {
    assert!(
        !transfer(lab, client, addr),
        "{client} -> {addr} should be denied"
    );
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The log lines of `node` that contain every one of `parts`.
fn log_lines(lab: &Lab, node: &str, parts: &[&str]) -> Vec<String> {
    lab.agent_log(node)
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_owned)
        .collect()
}

fn assert_logged(lab: &Lab, node: &str, parts: &[&str]) {
    assert!(
        !log_lines(lab, node, parts).is_empty(),
        "no log line of {node} has all of {parts:?}:\n{}",
        tail(&lab.agent_log(node))
    );
}

const CLIENT: &str = "cluster.local/ns/shop/sa/client";

fn allow_client() -> Value {
    policy(
        "shop",
        "allow-client",
        &format!(
            "{{selector: {{matchLabels: {{app: api}}}}, action: ALLOW, \
             rules: [{{from: [{{source: {{principals: [\"{CLIENT}\"]}}}}]}}]}}"
        ),
    )
}

#[test]
fn policies_allow_deny_and_name_the_deciding_policy() {
    if !mesh_lab::require_privileged("policies_allow_deny_and_name_the_deciding_policy") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let _api = serve(&lab, "shop/api", 8080);
    let _api_admin = serve(&lab, "shop/api", 9090);
    let _db = serve(&lab, "shop/db", 7000);
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let api_ip = lab.pod("shop/api").ip;
    let (api_8080, api_9090) = (format!("{api_ip}:8080"), format!("{api_ip}:9090"));
    let db = format!("{}:7000", lab.pod("shop/db").ip);

    // No policy: everything flows, counted as allowed without policy.
    allowed(&lab, "shop/client", &vip);
    allowed(&lab, "shop/db", &vip);
    allowed(&lab, "legacy/client", &api_8080);
    assert!(
        lab.metric(
            "n2",
            "mesh_policy_decisions_total",
            &[("action", "allow"), ("reason", "no_policy")]
        ) >= 3.0
    );

    // ALLOW shop/client's identity on shop/api: shop/db's identity and plaintext are denied.
    set_policies(&lab, &[allow_client()]);
    allowed(&lab, "shop/client", &vip);
    denied(&lab, "shop/db", &vip);
    denied(&lab, "legacy/client", &api_8080);
    assert_logged(
        &lab,
        "n2",
        &[
            "connection denied",
            "identity=spiffe://cluster.local/ns/shop/sa/db",
            "decision=deny policy=shop/allow-client rule=-",
            "reason=no_allow_match",
        ],
    );
    assert_logged(
        &lab,
        "n2",
        &[
            "connection closed",
            "identity=spiffe://cluster.local/ns/shop/sa/client",
            "decision=allow policy=shop/allow-client rule=0",
        ],
    );
    // The CLI gives the same answer from the state file alone.
    let out = std::process::Command::new(mesh_lab::agent_bin())
        .args(["policy", "check", "--state"])
        .arg(lab.state_path())
        .args(["--to", "shop/api", "--port", "8080", "--from", "shop/db"])
        .output()
        .expect("running mesh-agent policy check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("selects shop/api: ALLOW shop/allow-client")
            && stdout.contains(
                "spiffe://cluster.local/ns/shop/sa/db at 10.240.1.3 -> shop/api:8080: deny \
                 policy=shop/allow-client rule=- reason=no_allow_match"
            ),
        "{stdout}"
    );
    let deny_labels = [
        ("action", "deny"),
        ("policy", "shop/allow-client"),
        ("reason", "no_allow_match"),
    ];
    assert_eq!(
        lab.metric("n2", "mesh_policy_decisions_total", &deny_labels),
        2.0,
        "shop/db's stream and legacy/client's connection"
    );

    // DENY a port: it wins over the ALLOW that admits shop/client.
    let deny_9090 = policy(
        "shop",
        "deny-admin-port",
        "{selector: {matchLabels: {app: api}}, action: DENY, \
         rules: [{to: [{operation: {ports: [\"9090\"]}}]}]}",
    );
    // Same node (shop/client and shop/db are both on n1): the fast path is decided too.
    let deny_client_to_db = policy(
        "shop",
        "deny-client-to-db",
        &format!(
            "{{selector: {{matchLabels: {{app: db}}}}, action: DENY, \
             rules: [{{from: [{{source: {{principals: [\"{CLIENT}\"]}}}}]}}]}}"
        ),
    );
    // AUDIT never changes a verdict; it is logged and counted.
    let audit_db = policy(
        "shop",
        "audit-db",
        "{selector: {matchLabels: {app: db}}, action: AUDIT, \
         rules: [{from: [{source: {notNamespaces: [shop]}}]}]}",
    );
    set_policies(
        &lab,
        &[
            allow_client(),
            deny_9090.clone(),
            deny_client_to_db.clone(),
            audit_db,
        ],
    );
    denied(&lab, "shop/client", &api_9090);
    allowed(&lab, "shop/client", &api_8080);
    denied(&lab, "shop/client", &db);
    allowed(&lab, "legacy/client", &db);
    assert_logged(
        &lab,
        "n2",
        &[
            "connection denied",
            "policy=shop/deny-admin-port rule=0",
            "reason=deny_rule",
        ],
    );
    assert_logged(
        &lab,
        "n1",
        &[
            "connection denied",
            "local=true",
            "policy=shop/deny-client-to-db rule=0",
        ],
    );
    assert_logged(
        &lab,
        "n1",
        &[
            "connection closed",
            "pod=shop/db",
            "decision=allow policy=- rule=- audit=shop/audit-db#0",
        ],
    );
    assert_eq!(
        lab.metric(
            "n1",
            "mesh_policy_decisions_total",
            &[
                ("action", "audit"),
                ("policy", "shop/audit-db"),
                ("reason", "audit_rule")
            ]
        ),
        1.0,
        "legacy/client's connection to shop/db"
    );
    assert_eq!(
        lab.metric(
            "n2",
            "mesh_policy_decisions_total",
            &[
                ("action", "deny"),
                ("policy", "shop/deny-admin-port"),
                ("reason", "deny_rule")
            ]
        ),
        1.0
    );

    // An invalid ALLOW keeps its last good version; the rest of the change applies (the port
    // DENY goes away).
    let mut broken_allow = allow_client();
    broken_allow["spec"]["rules"][0]["from"][0]["source"] =
        serde_yaml::from_str(&format!("{{principal: [\"{CLIENT}\"]}}")).expect("yaml");
    set_policies(&lab, &[broken_allow.clone(), deny_client_to_db.clone()]);
    assert_logged(
        &lab,
        "n2",
        &[
            "policy rejected",
            "policy shop/allow-client: spec.rules[0].from[0].source",
            "unknown field `principal`",
            "last good version stays in force",
        ],
    );
    assert_eq!(
        lab.metric(
            "n2",
            "mesh_policy_rejected_total",
            &[
                ("policy", "shop/allow-client"),
                ("outcome", "kept_last_good")
            ]
        ),
        1.0
    );
    assert_eq!(lab.metric("n2", "mesh_policies_invalid", &[]), 1.0);
    allowed(&lab, "shop/client", &api_9090);
    allowed(&lab, "shop/client", &vip);
    denied(&lab, "shop/db", &vip);

    // An invalid DENY fails closed: every connection to the workloads it selects is denied.
    let broken_deny = policy(
        "shop",
        "deny-range",
        "{selector: {matchLabels: {app: api}}, action: DENY, \
         rules: [{from: [{source: {ipBlocks: [\"10.240.0.0/33\"]}}]}]}",
    );
    set_policies(&lab, &[broken_allow, deny_client_to_db, broken_deny]);
    denied(&lab, "shop/client", &vip);
    assert_logged(
        &lab,
        "n2",
        &[
            "policy rejected",
            "policy shop/deny-range: spec.rules[0].from[0].source.ipBlocks[0]",
            "\"10.240.0.0/33\" is not an address or CIDR block",
            "fails closed",
        ],
    );
    assert_logged(
        &lab,
        "n2",
        &[
            "connection denied",
            "identity=spiffe://cluster.local/ns/shop/sa/client",
            "policy=shop/deny-range rule=0",
            "reason=invalid_policy",
        ],
    );
    assert!(
        lab.metric(
            "n2",
            "mesh_policy_decisions_total",
            &[
                ("action", "deny"),
                ("policy", "shop/deny-range"),
                ("reason", "invalid_policy")
            ]
        ) >= 1.0
    );
    assert_eq!(
        lab.metric(
            "n2",
            "mesh_policy_rejected_total",
            &[("policy", "shop/deny-range"), ("outcome", "fail_closed")]
        ),
        1.0
    );

    // Fixed (here: removed), traffic flows again.
    set_policies(&lab, &[allow_client()]);
    allowed(&lab, "shop/client", &vip);
    assert_eq!(lab.metric("n2", "mesh_policies_invalid", &[]), 0.0);
    lab.down();
}

/// A long-lived echo connection (`mesh-labtool stream`) that has made progress.
fn stream(lab: &Lab, client: &str, addr: &str) -> Running {
    let mut s = Running::spawn(
        &format!("stream from {client} to {addr}"),
        lab.command(client, mesh_lab::labtool_bin()).args([
            "stream",
            "--to",
            addr,
            "--chunk",
            "4096",
            "--interval-ms",
            "5",
        ]),
    );
    s.wait_line("progress", WAIT);
    s
}

#[test]
fn a_policy_change_closes_connections_it_denies_and_keeps_the_others() {
    if !mesh_lab::require_privileged(
        "a_policy_change_closes_connections_it_denies_and_keeps_the_others",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let _api = serve(&lab, "shop/api", 8080);
    let _db = serve(&lab, "shop/db", 7000);
    let vip = format!("{}:80", lab.service_vip("shop/api"));
    let api_8080 = format!("{}:8080", lab.pod("shop/api").ip);
    let db = format!("{}:7000", lab.pod("shop/db").ip);

    let mut kept = stream(&lab, "shop/client", &vip);
    // Each enforcement path: an HBONE stream, a plaintext connection, a same-node delivery.
    let mut hbone = stream(&lab, "shop/db", &vip);
    let mut plaintext = stream(&lab, "legacy/client", &api_8080);
    let mut local = stream(&lab, "shop/client", &db);

    let deny_client_to_db = policy(
        "shop",
        "deny-client-to-db",
        &format!(
            "{{selector: {{matchLabels: {{app: db}}}}, action: DENY, \
             rules: [{{from: [{{source: {{principals: [\"{CLIENT}\"]}}}}]}}]}}"
        ),
    );
    set_policies(&lab, &[allow_client(), deny_client_to_db]);
    // Applied (seen in the reload counters): the denied connections are cut. How soon is a
    // figure of `cargo xtask bench --only policy`, not a test: this machine is shared.
    for (what, s) in [
        ("HBONE stream shop/db -> shop/api", &mut hbone),
        ("plaintext legacy/client -> shop/api", &mut plaintext),
        ("same-node shop/client -> shop/db", &mut local),
    ] {
        let status = s.wait(WAIT);
        assert!(
            !status.success(),
            "{what} ended cleanly instead of being cut"
        );
    }
    // The allowed connection goes on: more echoes, then a clean end.
    let before = kept.stdout_lines().len();
    wait_until("the allowed stream to make progress", WAIT, || {
        kept.stdout_lines().len() > before + 5
    });
    kept.close_stdin();
    let out = kept.wait_success(WAIT);
    assert!(out.iter().any(|l| l.starts_with("ok total=")), "{out:?}");

    assert_logged(
        &lab,
        "n2",
        &[
            "connection closed by a policy change",
            "identity=spiffe://cluster.local/ns/shop/sa/db",
            "policy=shop/allow-client",
        ],
    );
    assert_logged(
        &lab,
        "n1",
        &[
            "connection closed by a policy change",
            "policy=shop/deny-client-to-db rule=0",
        ],
    );
    assert_eq!(
        lab.metric(
            "n2",
            "mesh_policy_connections_closed_total",
            &[
                ("policy", "shop/allow-client"),
                ("reason", "no_allow_match")
            ]
        ),
        2.0,
        "the HBONE stream and the plaintext connection"
    );
    // The allowed stream was never counted as closed by policy.
    assert!(log_lines(
        &lab,
        "n2",
        &[
            "connection closed by a policy change",
            "identity=spiffe://cluster.local/ns/shop/sa/client"
        ]
    )
    .is_empty());
    lab.down();
}
