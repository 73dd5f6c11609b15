//! End-to-end tests of the Kubernetes node integration (issue: Kubernetes), with real agents in
//! the lab: the chained CNI plugin driven exactly as a container runtime drives it
//! (environment and stdin), and pods laid out as the kubelet lays them out (cgroupfs and
//! systemd drivers), which the state names by UID only.

use std::time::Duration;

use mesh_lab::{
    traffic::{send_succeeds, serve, WAIT},
    wait_until, CgroupDriver, CniRun, Lab, LabOptions, PodSpec, Topology,
};
use serde_json::{json, Value};

fn opened(lab: &Lab, node: &str, pod: &str) -> f64 {
    let (namespace, workload) = pod.split_once('/').expect("ns/name");
    lab.metric(
        node,
        "mesh_tcp_connections_opened_total",
        &[
            ("direction", "outbound"),
            ("namespace", namespace),
            ("workload", workload),
        ],
    )
}

/// The default topology plus kubelet-style pods on n1.
fn topology(pods: &[(&str, &str, CgroupDriver)]) -> Topology {
    let mut topology = Topology::default();
    for (namespace, name, driver) in pods {
        topology.pods.push(PodSpec {
            namespace: (*namespace).into(),
            name: (*name).into(),
            node: "n1".into(),
            service_account: (*name).into(),
            labels: [("app".to_owned(), (*name).to_owned())].into(),
            capture: None,
            kubelet: Some(*driver),
        });
    }
    topology
}

/// The primary plugin's result for `pod`, as the lab's runtime passes it to the plugin.
fn prev_result(lab: &Lab, pod: &str) -> Value {
    let p = lab.pod(pod);
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": p.netns}],
        "ips": [{"address": format!("{}/24", p.ip), "interface": 0}],
    })
}

/// Runs the plugin as a container runtime does (`Lab::cni`).
fn cni(lab: &Lab, command: &str, pod: &str, container: &str) -> CniRun {
    lab.cni(command, pod, container)
        .unwrap_or_else(|e| panic!("{command} {pod}: {e:#}"))
}

#[test]
fn the_cni_plugin_captures_a_pod_before_it_runs_and_releases_it_on_del() {
    if !mesh_lab::require_privileged(
        "the_cni_plugin_captures_a_pod_before_it_runs_and_releases_it_on_del",
    ) {
        return;
    }
    let mut lab = Lab::up(LabOptions {
        topology: topology(&[
            ("shop", "web", CgroupDriver::Systemd),
            ("legacy", "web", CgroupDriver::Cgroupfs),
        ]),
        ..LabOptions::default()
    });
    let vip = "10.240.100.10:80";
    let _api = serve(&lab, "shop/api", 8080);
    // Nothing runs in shop/web yet: the agent waits for it, ready meanwhile.
    wait_until("n1 logs that shop/web has not started", WAIT, || {
        lab.agent_log("n1")
            .lines()
            .any(|l| l.contains("pod has no running sandbox yet") && l.contains("shop/web"))
    });
    assert!(lab.agent_ready("n1"), "a pod not started made n1 not ready");
    let captured = |lab: &Lab| lab.metric("n1", "mesh_captured_pods", &[]);
    assert_eq!(captured(&lab), 2.0, "shop/client and shop/db");

    let version = cni(&lab, "VERSION", "shop/web", "");
    assert_eq!(version.status, 0, "{}", version.stderr);
    assert!(version.json()["supportedVersions"]
        .as_array()
        .is_some_and(|v| v.contains(&json!("1.0.0"))));

    // ADD returns only once the pod is captured: its very first connection is.
    let add = cni(&lab, "ADD", "shop/web", "sandbox-1");
    assert_eq!(add.status, 0, "ADD failed: {} {}", add.stdout, add.stderr);
    assert_eq!(
        add.json(),
        prev_result(&lab, "shop/web"),
        "prevResult passed through"
    );
    assert!(
        send_succeeds(&lab, "shop/web", vip, 4096),
        "shop/web -> api VIP"
    );
    assert_eq!(
        opened(&lab, "n1", "shop/web"),
        1.0,
        "the first connection after ADD"
    );
    assert_eq!(captured(&lab), 3.0);
    let check = cni(&lab, "CHECK", "shop/web", "sandbox-1");
    assert_eq!(check.status, 0, "CHECK: {} {}", check.stdout, check.stderr);

    // Not meshed: passed through untouched, not captured.
    let add = cni(&lab, "ADD", "legacy/web", "sandbox-2");
    assert_eq!(add.status, 0, "{} {}", add.stdout, add.stderr);
    assert_eq!(add.json(), prev_result(&lab, "legacy/web"));
    assert_eq!(captured(&lab), 3.0);

    // DEL releases: the next connection is not the mesh's.
    let del = cni(&lab, "DEL", "shop/web", "sandbox-1");
    assert_eq!(del.status, 0, "DEL: {} {}", del.stdout, del.stderr);
    assert_eq!(del.stdout, "", "DEL prints nothing");
    assert_eq!(captured(&lab), 2.0, "released when DEL returns");
    let api = format!("{}:8080", lab.pod("shop/api").ip);
    assert!(send_succeeds(&lab, "shop/web", &api, 4096));
    // Its series left with it (docs/metrics.md); a connection the agent took would bring them
    // back with a count.
    assert_eq!(
        opened(&lab, "n1", "shop/web"),
        0.0,
        "not captured after DEL"
    );
    let check = cni(&lab, "CHECK", "shop/web", "sandbox-1");
    assert_eq!(check.status, 1, "CHECK of a released pod: {}", check.stdout);

    // The primary CNI rewrites its conflist without the plugin: the agent puts it back.
    let conflist = lab.cni_conf_dir("n1").join("10-lab.conflist");
    let listed = |path: &std::path::Path| {
        let list: Value = serde_json::from_slice(&std::fs::read(path).expect("the conflist"))
            .expect("a JSON conflist");
        list["plugins"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["type"] == "mesh-agent-cni"))
    };
    assert!(listed(&conflist), "the lab's conflist names the plugin");
    let rewritten = json!({"cniVersion": "1.0.0", "name": "lab-pod-network",
        "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}]});
    std::fs::write(&conflist, rewritten.to_string()).expect("rewriting the conflist");
    wait_until("n1 puts the plugin back into the conflist", WAIT, || {
        listed(&conflist)
    });
    assert_eq!(
        lab.metric("n1", "mesh_cni_conflist_repairs_total", &[]),
        1.0
    );

    // No agent: ADD fails for the meshed namespace (try again later), not for the others.
    let pid = lab.signal_agent("n1", libc::SIGKILL);
    assert!(lab.wait_agent_exit(pid, WAIT), "n1's agent did not die");
    let add = cni(&lab, "ADD", "shop/web", "sandbox-3");
    assert_eq!(add.status, 1, "ADD without an agent passed: {}", add.stdout);
    assert_eq!(add.json()["code"], 11, "{}", add.stdout);
    assert!(
        add.stdout.contains("namespace shop is meshed"),
        "{}",
        add.stdout
    );
    let add = cni(&lab, "ADD", "legacy/web", "sandbox-4");
    assert_eq!(add.status, 0, "{} {}", add.stdout, add.stderr);
    assert_eq!(add.json(), prev_result(&lab, "legacy/web"));
    let del = cni(&lab, "DEL", "shop/web", "sandbox-3");
    assert_eq!(del.status, 0, "DEL without an agent: {}", del.stdout);
    lab.down();
}

#[test]
fn a_starting_agent_finds_running_pods_of_both_kubelet_cgroup_drivers() {
    if !mesh_lab::require_privileged(
        "a_starting_agent_finds_running_pods_of_both_kubelet_cgroup_drivers",
    ) {
        return;
    }
    let mut lab = Lab::up(LabOptions {
        topology: topology(&[
            ("shop", "fs", CgroupDriver::Cgroupfs),
            ("shop", "sd", CgroupDriver::Systemd),
        ]),
        ..LabOptions::default()
    });
    // The pods start while no agent runs on n1.
    let pid = lab.signal_agent("n1", libc::SIGKILL);
    assert!(lab.wait_agent_exit(pid, WAIT), "n1's agent did not die");
    let _fs = serve(&lab, "shop/fs", 9000);
    let _sd = serve(&lab, "shop/sd", 9000);
    let _api = serve(&lab, "shop/api", 8080);
    lab.start_agent("n1").expect("starting n1's agent");
    wait_until("n1 ready", Duration::from_secs(30), || {
        lab.agent_ready("n1")
    });
    let log = lab.agent_log("n1");
    for pod in ["shop/fs", "shop/sd"] {
        assert!(
            log.lines()
                .any(|l| l.contains("pod captured") && l.contains(&format!("pod={pod}"))),
            "{pod} was not captured at start:\n{log}"
        );
        assert!(
            send_succeeds(&lab, pod, "10.240.100.10:80", 4096),
            "{pod} -> api VIP"
        );
        assert_eq!(
            opened(&lab, "n1", pod),
            1.0,
            "{pod}'s connection is the mesh's"
        );
    }
    lab.down();
}

/// KMock's Python (`cargo xtask test` installs it and names it in `MESH_KMOCK_PYTHON`).
fn kmock_python(test: &str) -> Option<std::path::PathBuf> {
    let python = mesh_lab::kmock_python();
    if python.is_none() {
        let why = "KMock is not installed (cargo xtask test installs it, or set MESH_KMOCK_PYTHON)";
        if std::env::var("MESH_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
            panic!("{test}: {why}");
        }
        eprintln!("\n*** SKIPPED {test}: {why} ***\n");
    }
    python
}

#[test]
fn agents_learn_the_mesh_from_the_api_and_a_label_meshes_a_namespace_live() {
    const TEST: &str = "agents_learn_the_mesh_from_the_api_and_a_label_meshes_a_namespace_live";
    if !mesh_lab::require_privileged(TEST) {
        return;
    }
    let Some(python) = kmock_python(TEST) else {
        return;
    };
    // The lab's Kubernetes mode: KMock's emulator in n1 holds the lab's namespaces, pods (by
    // UID, kubelet-style, n2's with the systemd driver) and services; agents use discovery:
    // kube. Every pod came up as a kubelet starts one: scheduled with no address in the API,
    // its sandbox ADDed through the CNI plugin (so the agent took the pod's address from the
    // primary plugin's result), then its address reported.
    let mut topology = Topology::default();
    for p in &mut topology.pods {
        if p.node == "n2" {
            p.kubelet = Some(CgroupDriver::Systemd);
        }
    }
    let lab = Lab::up(LabOptions {
        topology,
        kube: Some(python),
        ..LabOptions::default()
    });
    let captured = |lab: &Lab, node: &str| lab.metric(node, "mesh_captured_pods", &[]);
    // Captured when their ADD returned, before anything ran in them and while the API had no
    // address for them: no waiting here.
    let adds = |node: &str, reply: &str| {
        lab.metric(
            node,
            "mesh_cni_requests_total",
            &[("command", "add"), ("reply", reply)],
        )
    };
    assert_eq!(
        (adds("n1", "captured"), adds("n1", "not_meshed")),
        (2.0, 1.0),
        "n1's ADDs: shop/client and shop/db captured, legacy/client not meshed"
    );
    assert_eq!(
        (adds("n2", "captured"), adds("n2", "not_meshed")),
        (1.0, 1.0),
        "n2's ADDs: shop/api captured, legacy/server not meshed"
    );
    assert_eq!(captured(&lab, "n1"), 2.0, "shop/client and shop/db");
    assert_eq!(captured(&lab, "n2"), 1.0, "shop/api");
    let pods = lab
        .kube_get("/api/v1/namespaces/shop/pods")
        .expect("listing shop's pods");
    for pod in pods["items"].as_array().expect("items") {
        let name = format!("shop/{}", pod["metadata"]["name"].as_str().unwrap_or("?"));
        assert_eq!(
            pod["status"]["podIP"],
            json!(lab.pod(&name).ip.to_string()),
            "{name}'s address reported after its ADD"
        );
    }

    let _api_server = serve(&lab, "shop/api", 8080);
    assert!(
        send_succeeds(&lab, "shop/client", "10.240.100.10:80", 4096),
        "shop/client -> the api VIP from the API's Service and EndpointSlice"
    );
    assert_eq!(
        opened(&lab, "n1", "shop/client"),
        1.0,
        "captured, through HBONE"
    );

    // Labelling legacy (kubectl against the emulator) meshes its running pods, live.
    let _legacy_server = serve(&lab, "legacy/server", 9000);
    let server = format!("{}:9000", lab.pod("legacy/server").ip);
    assert!(send_succeeds(&lab, "legacy/client", &server, 4096));
    let legacy_opened = |lab: &Lab| {
        lab.metric(
            "n1",
            "mesh_tcp_connections_opened_total",
            &[("namespace", "legacy")],
        )
    };
    assert_eq!(legacy_opened(&lab), 0.0, "legacy is not meshed yet");
    lab.label_namespace("legacy", "mesh-agent/enabled", Some("true"))
        .expect("labelling legacy");
    wait_until("both agents capture legacy's pods", WAIT, || {
        captured(&lab, "n1") == 3.0 && captured(&lab, "n2") == 2.0
    });
    assert!(send_succeeds(&lab, "legacy/client", &server, 4096));
    assert_eq!(
        opened(&lab, "n1", "legacy/client"),
        1.0,
        "legacy/client is meshed now"
    );

    // Removing the label releases them, live.
    lab.label_namespace("legacy", "mesh-agent/enabled", None)
        .expect("unlabelling legacy");
    wait_until("both agents release legacy's pods", WAIT, || {
        captured(&lab, "n1") == 2.0 && captured(&lab, "n2") == 1.0
    });
    assert!(send_succeeds(&lab, "legacy/client", &server, 4096));
    // Released, its series went with it (docs/metrics.md); a connection the agent took would
    // bring them back with a count.
    assert_eq!(
        opened(&lab, "n1", "legacy/client"),
        0.0,
        "legacy/client is not meshed after the label is gone"
    );
    lab.down();
}

#[test]
fn a_waypoint_follows_httproutes_from_the_api_and_reports_their_status() {
    const TEST: &str = "a_waypoint_follows_httproutes_from_the_api_and_reports_their_status";
    if !mesh_lab::require_privileged(TEST) {
        return;
    }
    let Some(python) = kmock_python(TEST) else {
        return;
    };
    use mesh_lab::l7::{count, http_get, serve_http, REVIEWS, WAIT, WAYPOINT_TOPOLOGY_YAML};
    // The L7 lab in the Kubernetes mode: shop is labelled `mesh-agent/waypoint=waypoint`, and
    // the waypoint (in its pod, kubelet-style) runs with `discovery: kube`.
    let lab = Lab::up(LabOptions {
        topology: Topology::from_yaml(WAYPOINT_TOPOLOGY_YAML).expect("the L7 topology"),
        kube: Some(python),
        ..LabOptions::default()
    });
    assert_eq!(lab.waypoints().len(), 1);
    let _v1 = serve_http(&lab, "shop/reviews-v1", "v1", &[]);
    let _v2 = serve_http(&lab, "shop/reviews-v2", "v2", &[]);
    let host = ["--host", "reviews.shop"];
    let get = |args: &[&str]| {
        let mut all = host.to_vec();
        all.extend_from_slice(args);
        http_get(&lab, "shop/client", REVIEWS, &all)
    };
    // No route yet: the service itself, through the waypoint.
    let before = get(&["--count", "4"]);
    assert_eq!(count(&before, "statuses", "200"), 4, "{before}");

    let route = |header: &str| {
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 80}],
                "rules": [
                    {"matches": [{"headers": [{"name": header, "value": "v2"}]}],
                     "backendRefs": [{"name": "reviews-v2", "port": 80}]},
                    {"backendRefs": [{"name": "reviews-v1", "port": 80}]},
                ],
            },
        })
    };
    let path = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes";
    lab.kube_create(path, route("x-version"))
        .expect("creating the HTTPRoute");
    mesh_lab::wait_until("the waypoint to route by the API's HTTPRoute", WAIT, || {
        let v2 = get(&["--header", "x-version: v2", "--count", "3"]);
        let v1 = get(&["--count", "3"]);
        count(&v2, "served", "v2") == 3 && count(&v1, "served", "v1") == 3
    });
    let condition = |want_type: &str| {
        let route = lab
            .kube_get(&format!("{path}/reviews"))
            .expect("reading the HTTPRoute");
        route["status"]["parents"]
            .as_array()
            .and_then(|parents| {
                parents
                    .iter()
                    .find(|p| p["controllerName"] == "mesh-agent.dev/waypoint")
            })
            .and_then(|p| p["conditions"].as_array().cloned())
            .and_then(|c| c.into_iter().find(|c| c["type"] == want_type))
            .unwrap_or(serde_json::Value::Null)
    };
    mesh_lab::wait_until(
        "the route's status: Accepted and ResolvedRefs",
        WAIT,
        || {
            condition("Accepted")["status"] == "True"
                && condition("ResolvedRefs")["status"] == "True"
        },
    );
    // An invalid change: refused in the route's status, naming the field; the last good
    // version keeps routing.
    lab.kube_call(
        "PATCH",
        &format!("{path}/reviews"),
        "application/merge-patch+json",
        &serde_json::json!({"spec": route("bad name")["spec"]}),
    )
    .expect("patching the HTTPRoute");
    mesh_lab::wait_until("the route's status: not accepted", WAIT, || {
        let accepted = condition("Accepted");
        accepted["status"] == "False"
            && accepted["message"]
                .as_str()
                .is_some_and(|m| m.contains("spec.rules[0].matches[0].headers[0].name"))
    });
    let still = get(&["--header", "x-version: v2", "--count", "3"]);
    assert_eq!(count(&still, "served", "v2"), 3, "{still}");
    lab.down();
}
