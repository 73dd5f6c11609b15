//! End-to-end tests of `mesh-agent inspect` (issue 16): every subcommand against the lab's
//! running agents, read from their admin endpoints on the nodes' loopback. `why` answers for
//! an allowed, a denied and an uncaptured pair, checked against real connections; `check`
//! passes on an intact node and fails, naming the pod and program, once a link is detached by
//! hand (as `bpftool link detach` does) or its pin removed.

use mesh_lab::{
    agent_bin, labtool_bin,
    traffic::{send_succeeds, serve, stream, WAIT},
    wait_until, Lab, LabOptions, Running,
};
use serde_json::Value;
use serde_yaml::Value as Yaml;

/// `mesh-agent inspect ARGS` on `node`: whether it exited 0, its stdout and its stderr (all
/// of them: read to the end, the command's own timeouts bound it).
fn inspect(lab: &Lab, node: &str, args: &[&str]) -> (bool, String, String) {
    let out = lab
        .command(node, agent_bin())
        .env("RUST_BACKTRACE", "0")
        .arg("inspect")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("mesh-agent inspect {args:?} on {node}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `inspect ARGS -o json` on `node`, which must succeed.
fn json(lab: &Lab, node: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (ok, out, err) = inspect(lab, node, &all);
    assert!(ok, "inspect {args:?} on {node} failed: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect {args:?}: {e}: {out}"))
}

/// `inspect ARGS` (tables) on `node`, which must succeed.
fn table(lab: &Lab, node: &str, args: &[&str]) -> String {
    let (ok, out, err) = inspect(lab, node, args);
    assert!(ok, "inspect {args:?} on {node} failed: {err}\n{out}");
    out
}

fn find<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|v| v[key] == value))
        .unwrap_or_else(|| panic!("no {key}={value} in {list:#}"))
}

/// shop/db (node n1) admits shop/client only, on 5432.
fn allow_client_to_db(lab: &Lab) {
    let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: db-clients, namespace: shop}\n\
        spec: {selector: {matchLabels: {app: db}}, action: ALLOW, rules: [{from: [{source: \
        {principals: [cluster.local/ns/shop/sa/client]}}], to: [{operation: {ports: ['5432']}}]}]}\n";
    let policy: Yaml = serde_yaml::from_str(text).expect("policy");
    let reloads = |node: &str| lab.metric(node, "mesh_state_reloads_total", &[("result", "ok")]);
    let before = (reloads("n1"), reloads("n2"));
    let mut state = lab.read_state();
    state["policies"] = Yaml::Sequence(vec![policy]);
    lab.write_state(&state);
    wait_until("both agents to apply the policy", WAIT, || {
        reloads("n1") > before.0 && reloads("n2") > before.1
    });
}

#[test]
fn every_inspect_subcommand_answers_from_the_running_agent() {
    if !mesh_lab::require_privileged("every_inspect_subcommand_answers_from_the_running_agent") {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let _api = serve(&lab, "shop/api", 8080);
    let _db = serve(&lab, "shop/db", 5432);
    allow_client_to_db(&lab);
    let vip = lab.service_vip("shop/api");

    // workloads: this node's, with capture state and the policies in force.
    let workloads = json(&lab, "n1", &["workloads"]);
    let client = find(&workloads, "workload", "shop/client");
    assert_eq!(client["capture"]["state"], "captured", "{client:#}");
    assert_eq!(
        client["identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    let legacy = find(&workloads, "workload", "legacy/client");
    assert_eq!(legacy["capture"]["state"], "not_captured", "{legacy:#}");
    assert_eq!(
        legacy["capture"]["why"],
        "namespace legacy is not in the mesh"
    );
    let db = find(&workloads, "workload", "shop/db");
    assert_eq!(db["policies"]["allow"][0], "shop/db-clients", "{db:#}");
    assert!(
        workloads
            .as_array()
            .is_some_and(|w| w.iter().all(|w| w["workload"] != "shop/api")),
        "n1 lists only its own workloads: {workloads:#}"
    );
    let text = table(&lab, "n1", &["workloads"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("shop/client") && l.contains("captured")),
        "{text}"
    );

    // services, policies, certs.
    let services = json(&lab, "n1", &["services"]);
    let api = find(&services, "service", "shop/api");
    assert_eq!(
        api["ports"][0]["endpoints"][0],
        format!("{}:8080", lab.pod("shop/api").ip)
    );
    let policies = json(&lab, "n1", &["policies"]);
    assert_eq!(
        find(&policies, "policy", "shop/db-clients")["action"],
        "ALLOW"
    );
    assert!(table(&lab, "n1", &["policies"]).contains("shop/db-clients  ALLOW"));
    let certs = json(&lab, "n1", &["certs"]);
    for id in ["client", "db"] {
        let cert = find(
            &certs,
            "identity",
            &format!("spiffe://cluster.local/ns/shop/sa/{id}"),
        );
        assert_eq!(cert["valid"], true, "{cert:#}");
        assert!(
            cert["expires_in_secs"].as_u64().is_some_and(|s| s > 3600),
            "{cert:#}"
        );
        assert!(cert.get("private_key").is_none() && !cert.to_string().contains("PRIVATE"));
    }

    // ebpf: the programs, the maps with their fill, every link attached.
    let ebpf = json(&lab, "n1", &["ebpf"]);
    for p in ebpf["programs"].as_array().expect("programs") {
        assert!(
            p["id"].as_u64().is_some() && p["problem"].is_null(),
            "{p:#}"
        );
    }
    assert_eq!(
        find(&ebpf["maps"], "name", "MESH_PODS")["entries"],
        2,
        "{ebpf:#}"
    );
    let links = &find(&ebpf["links"], "workload", "shop/client")["links"];
    assert_eq!(links.as_array().map(Vec::len), Some(4), "{links:#}");
    assert!(links
        .as_array()
        .is_some_and(|l| l.iter().all(|l| l["attached"] == true)));

    // connections: a live one, its bytes growing, on both ends.
    let mut streaming = stream(&lab, "shop/client", &format!("{vip}:80"));
    let bytes_to_api = |lab: &Lab| -> Option<u64> {
        let conns = json(lab, "n1", &["connections"]);
        conns["connections"]
            .as_array()?
            .iter()
            .find(|c| c["pod"] == "shop/client" && c["dst"] == format!("{vip}:80"))
            .and_then(|c| c["sent"].as_u64())
    };
    let first = bytes_to_api(&lab).expect("the stream's connection in n1's /connections");
    wait_until("the stream's bytes to grow in /connections", WAIT, || {
        bytes_to_api(&lab).is_some_and(|b| b > first)
    });
    // The metrics count the same bytes as they move, not when the connection ends: Istio's
    // dashboards rate them while it lasts.
    for (node, family, labels) in [
        (
            "n1",
            "istio_tcp_received_bytes_total",
            [("reporter", "source"), ("destination_workload", "api")],
        ),
        (
            "n2",
            "istio_tcp_received_bytes_total",
            [("reporter", "destination"), ("source_workload", "client")],
        ),
        (
            "n1",
            "mesh_tcp_sent_bytes_total",
            [("direction", "outbound"), ("workload", "client")],
        ),
    ] {
        let before = lab.metric(node, family, &labels);
        wait_until(
            &format!("{family} {labels:?} of {node} to grow while the stream runs"),
            WAIT,
            || lab.metric(node, family, &labels) > before,
        );
    }
    let conns = json(&lab, "n1", &["connections"]);
    let out = find(&conns["connections"], "pod", "shop/client");
    assert_eq!(out["direction"], "outbound");
    assert_eq!(out["transport"], "hbone");
    assert_eq!(out["dst_workload"], "shop/api");
    assert_eq!(out["dst_identity"], "spiffe://cluster.local/ns/shop/sa/api");
    assert_eq!(out["dst_service"], "api.shop.svc.cluster.local");
    let conns = json(&lab, "n2", &["connections"]);
    let inbound = find(&conns["connections"], "pod", "shop/api");
    assert_eq!(inbound["direction"], "inbound");
    assert_eq!(
        inbound["src_identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(inbound["decision"], "allow");
    assert!(
        inbound["received"].as_u64().is_some_and(|b| b > 0),
        "{inbound:#}"
    );
    let text = table(&lab, "n1", &["connections"]);
    assert!(
        text.contains("shop/client") && text.contains("shop/api"),
        "{text}"
    );

    // workload: one pod, with its certificate, links and connections.
    let text = table(&lab, "n1", &["workload", "shop/client"]);
    for want in [
        "capture:   captured",
        "spiffe://cluster.local/ns/shop/sa/client",
        "mesh_connect4",
        "attached",
        &format!("{vip}:80"),
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    streaming.close_stdin();
    streaming.wait(WAIT);
    let (ok, _, err) = inspect(&lab, "n1", &["workload", "shop/api"]);
    assert!(
        !ok && err.contains("no workload shop/api on node n1"),
        "{err}"
    );

    // why: allowed, denied (a captured source on another node), not captured; each as the
    // real connection goes.
    let db = lab.pod("shop/db").ip;
    let why = json(&lab, "n1", &["why", "shop/client", "shop/db:5432"]);
    assert_eq!(why["verdict"], "allowed", "{why:#}");
    assert_eq!(why["route"]["transport"], "local");
    assert_eq!(why["policy"]["policy"], "shop/db-clients");
    assert_eq!(why["policy"]["rule"], 0);
    assert!(send_succeeds(
        &lab,
        "shop/client",
        &format!("{db}:5432"),
        1024
    ));
    let why = json(&lab, "n1", &["why", "shop/api", "shop/db:5432"]);
    assert_eq!(why["verdict"], "denied", "{why:#}");
    assert_eq!(why["route"]["transport"], "hbone");
    assert_eq!(
        why["policy"]["identity"],
        "spiffe://cluster.local/ns/shop/sa/api"
    );
    assert_eq!(why["policy"]["reason"], "no_allow_match", "{why:#}");
    assert!(!send_succeeds(
        &lab,
        "shop/api",
        &format!("{db}:5432"),
        1024
    ));
    let why = json(&lab, "n1", &["why", "legacy/client", "shop/db:5432"]);
    assert_eq!(why["verdict"], "denied", "{why:#}");
    assert_eq!(why["capture"]["ok"], false);
    assert_eq!(why["policy"]["identity"], Value::Null, "plaintext: {why:#}");
    assert!(!send_succeeds(
        &lab,
        "legacy/client",
        &format!("{db}:5432"),
        1024
    ));
    let why = json(&lab, "n1", &["why", "legacy/client", "shop/api:8080"]);
    assert_eq!(why["verdict"], "not_captured", "{why:#}");
    assert_eq!(why["capture"]["why"], "namespace legacy is not in the mesh");
    assert_eq!(why["policy"]["allowed"], true);
    let text = table(&lab, "n1", &["why", "shop/api", "shop/db:5432"]);
    assert!(
        text.starts_with("DENIED:") && text.contains("shop/db-clients"),
        "{text}"
    );
    let (ok, _, err) = inspect(&lab, "n1", &["why", "shop/nobody", "shop/db:5432"]);
    assert!(
        !ok && err.contains("no workload shop/nobody in the state"),
        "{err}"
    );

    lab.down();
}

#[test]
fn inspect_check_passes_on_an_intact_node_and_names_a_link_detached_by_hand() {
    if !mesh_lab::require_privileged(
        "inspect_check_passes_on_an_intact_node_and_names_a_link_detached_by_hand",
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::default());
    let (ok, out, err) = inspect(&lab, "n1", &["check"]);
    assert!(ok, "check failed on an intact node: {err}\n{out}");
    for want in [
        "ok  kernel",
        "ok  agent",
        "ok  eBPF",
        "ok  pods: 2 captured",
        "ok  certificates",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    let pin = |pod: &str, program: &str| -> String {
        let w = json(&lab, "n1", &["workload", pod]);
        find(&w["workload"]["links"], "program", program)["pin"]
            .as_str()
            .expect("pin")
            .to_owned()
    };

    // Detached as `bpftool link detach` does: the pin stays, attached to nothing.
    let connect4 = pin("shop/db", "mesh_connect4");
    let mut detach = Running::spawn(
        "link-detach",
        lab.command("n1", labtool_bin())
            .args(["link-detach", "--pin", &connect4]),
    );
    detach.wait_success(WAIT);
    let (ok, out, err) = inspect(&lab, "n1", &["check"]);
    assert!(!ok, "check passed with a detached link:\n{out}");
    assert!(
        err.contains("pod shop/db is degraded: mesh_connect4: link") && err.contains("is detached"),
        "{err}"
    );
    let w = json(&lab, "n1", &["workload", "shop/db"]);
    assert_eq!(w["workload"]["capture"]["state"], "degraded", "{w:#}");

    // Its pin removed by hand: the link is gone.
    let sk_lookup = pin("shop/client", "mesh_sk_lookup");
    std::fs::remove_file(&sk_lookup).expect("remove the pin");
    let (_, _, err) = inspect(&lab, "n1", &["check"]);
    assert!(
        err.contains("pod shop/") && err.contains("degraded"),
        "{err}"
    );
    let w = json(&lab, "n1", &["workload", "shop/client"]);
    let link = find(&w["workload"]["links"], "program", "mesh_sk_lookup");
    assert_eq!(link["attached"], false);
    assert!(
        link["problem"]
            .as_str()
            .is_some_and(|p| p.starts_with("no link pinned at")),
        "{link:#}"
    );
    let why = json(&lab, "n1", &["why", "shop/db", "shop/api:8080"]);
    assert_eq!(why["verdict"], "not_captured", "{why:#}");
    assert!(
        why["capture"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("mesh_connect4")),
        "{why:#}"
    );
    lab.down();
}
