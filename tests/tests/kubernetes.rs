//! End-to-end tests of the Kubernetes node integration (issue: Kubernetes), with real agents in
//! the lab: the chained CNI plugin driven exactly as a container runtime drives it
//! (environment and stdin), and pods laid out as the kubelet lays them out (cgroupfs and
//! systemd drivers), which the state names by UID only.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use mesh_lab::{
    agent_bin,
    traffic::{send_succeeds, serve, WAIT},
    wait_until, CgroupDriver, Lab, LabOptions, PodSpec, Topology,
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

/// What the plugin printed and its exit status.
struct Ran {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

/// The primary plugin's result for `pod`, as the runtime passes it to a chained plugin.
fn prev_result(lab: &Lab, pod: &str) -> Value {
    let p = lab.pod(pod);
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": p.netns}],
        "ips": [{"address": format!("{}/24", p.ip), "interface": 0}],
    })
}

/// Runs `mesh-agent cni` as a container runtime runs a chained plugin: `CNI_*` environment,
/// the network configuration (with `prevResult`) on stdin.
fn cni(lab: &Lab, command: &str, pod: &str, container: &str) -> Ran {
    let p = lab.pod(pod);
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "lab-pod-network",
        "type": "mesh-agent-cni",
        "socket": lab.cni_socket(&p.node),
        "prevResult": prev_result(lab, pod),
    });
    let mut child = Command::new(agent_bin())
        .arg("cni")
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", &p.netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container};K8S_POD_UID={}",
                p.namespace,
                p.name,
                p.uid.as_deref().unwrap_or_default()
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mesh-agent cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("writing the configuration");
    let out = child.wait_with_output().expect("running mesh-agent cni");
    Ran {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
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
    assert_eq!(
        opened(&lab, "n1", "shop/web"),
        1.0,
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
    // UID, kubelet-style, n2's with the systemd driver) and services; agents use discovery: kube.
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

    // The server starts (its process in the pod): the agent finds it by UID at its retry.
    let _api_server = serve(&lab, "shop/api", 8080);
    wait_until("n2 captures shop/api", WAIT, || captured(&lab, "n2") == 1.0);
    // The client's sandbox comes through the CNI plugin, as a kubelet would make it.
    let add = cni(&lab, "ADD", "shop/client", "sandbox-client");
    assert_eq!(add.status, 0, "ADD: {} {}", add.stdout, add.stderr);
    assert!(
        send_succeeds(&lab, "shop/client", "10.240.100.10:80", 4096),
        "shop/client -> the api VIP from the API's Service and EndpointSlice"
    );
    assert_eq!(
        opened(&lab, "n1", "shop/client"),
        1.0,
        "captured, through HBONE"
    );

    // Labelling legacy meshes its running pods, live.
    let _legacy_server = serve(&lab, "legacy/server", 9000);
    let _legacy_client = serve(&lab, "legacy/client", 9001);
    let server = format!("{}:9000", lab.pod("legacy/server").ip);
    assert!(send_succeeds(&lab, "legacy/client", &server, 4096));
    assert_eq!(
        lab.metric(
            "n1",
            "mesh_tcp_connections_opened_total",
            &[("namespace", "legacy")]
        ),
        0.0,
        "legacy is not meshed yet"
    );
    lab.label_namespace("legacy", "mesh-agent/enabled", "true")
        .expect("labelling legacy");
    wait_until("both agents capture legacy's pods", WAIT, || {
        captured(&lab, "n1") == 2.0 && captured(&lab, "n2") == 2.0
    });
    assert!(send_succeeds(&lab, "legacy/client", &server, 4096));
    assert_eq!(
        opened(&lab, "n1", "legacy/client"),
        1.0,
        "legacy/client is meshed now"
    );
    lab.down();
}
