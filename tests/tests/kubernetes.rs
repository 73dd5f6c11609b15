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
    wait_until, CgroupDriver, Lab, LabOptions, PodSpec, Running, Topology,
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
    let python = std::env::var_os("MESH_KMOCK_PYTHON")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/kmock-venv/bin/python");
            venv.exists().then_some(venv)
        });
    if python.is_none() {
        let why = "KMock is not installed (cargo xtask test installs it, or set MESH_KMOCK_PYTHON)";
        if std::env::var("MESH_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
            panic!("{test}: {why}");
        }
        eprintln!("\n*** SKIPPED {test}: {why} ***\n");
    }
    python
}

/// The API emulator, served inside n1's network namespace on n1's underlay address so that
/// every node's agent reaches it; requests are made from there too (curl).
struct Api {
    url: String,
    _emulator: Running,
}

impl Api {
    fn start(lab: &Lab, python: &std::path::Path) -> Api {
        let host = lab.node("n1").underlay_ip.to_string();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../mesh-agent/tests/kube_emulator.py");
        let mut emulator = Running::spawn(
            "the Kubernetes API emulator in n1",
            lab.command("n1", python)
                .arg(&script)
                .args(["--host", &host, "--port", "16443"]),
        );
        emulator.wait_line("listening on", Duration::from_secs(60));
        Api {
            url: format!("http://{host}:16443"),
            _emulator: emulator,
        }
    }

    fn call(&self, lab: &Lab, method: &str, path: &str, content_type: &str, body: &Value) {
        let out = lab
            .command("n1", "curl")
            .args(["-sS", "--fail-with-body", "-X", method, "-H"])
            .arg(format!("Content-Type: {content_type}"))
            .arg("--data-binary")
            .arg(body.to_string())
            .arg(format!("{}{path}", self.url))
            .output()
            .expect("running curl in n1");
        assert!(
            out.status.success(),
            "{method} {path}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn create(&self, lab: &Lab, path: &str, object: Value) {
        self.call(lab, "POST", path, "application/json", &object);
    }

    fn patch(&self, lab: &Lab, path: &str, patch: Value) {
        self.call(lab, "PATCH", path, "application/merge-patch+json", &patch);
    }
}

/// The lab's pods, namespaces and service as API objects, as a cluster's API server would
/// hold them (pods with their addresses, as their kubelet reported them).
fn publish_lab(lab: &Lab, api: &Api) {
    for (ns, meshed) in [("shop", true), ("legacy", false)] {
        let labels = if meshed {
            json!({"mesh-agent/enabled": "true"})
        } else {
            json!({})
        };
        api.create(
            lab,
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "labels": labels}}),
        );
    }
    for pod in [
        "shop/client",
        "shop/api",
        "shop/db",
        "legacy/client",
        "legacy/server",
    ] {
        let p = lab.pod(pod);
        api.create(
            lab,
            &format!("/api/v1/namespaces/{}/pods", p.namespace),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid,
                                "labels": p.labels},
                   "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                            "containers": [{"name": "app", "image": "mesh-labtool"}]},
                   "status": {"phase": "Running", "podIP": p.ip.to_string(),
                              "podIPs": [{"ip": p.ip.to_string()}]}}),
        );
    }
    api.create(
        lab,
        "/api/v1/namespaces/shop/services",
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "api", "namespace": "shop"},
               "spec": {"clusterIP": "10.240.100.10", "clusterIPs": ["10.240.100.10"],
                        "selector": {"app": "api"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                   "protocol": "TCP"}]}}),
    );
    api.create(
        lab,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "api-1", "namespace": "shop",
                            "labels": {"kubernetes.io/service-name": "api"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [lab.pod("shop/api").ip.to_string()],
                              "conditions": {"ready": true}}],
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
    );
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
    // Every pod laid out as the kubelet lays it out: the API names pods by UID only.
    let mut topology = Topology::default();
    for p in &mut topology.pods {
        p.kubelet = Some(if p.node == "n1" {
            CgroupDriver::Cgroupfs
        } else {
            CgroupDriver::Systemd
        });
    }
    let mut lab = Lab::up(LabOptions {
        topology,
        agents: false,
        ..LabOptions::default()
    });
    lab.prepare_agents()
        .expect("the lab's CA and bpffs directories");
    let api = Api::start(&lab, &python);
    publish_lab(&lab, &api);
    let kubeconfig = lab
        .agent_config_path("n1")
        .with_file_name("kubeconfig.yaml");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: lab, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: lab, user: {{}}}}]\ncontexts: [{{name: lab, context: {{cluster: lab, user: lab}}}}]\n\
             current-context: lab\n",
            api.url
        ),
    )
    .expect("writing the kubeconfig");
    for node in ["n1", "n2"] {
        let path = lab.agent_config_path(node);
        let mut config: serde_yaml::Mapping =
            serde_yaml::from_str(&std::fs::read_to_string(&path).expect("agent config"))
                .expect("agent config YAML");
        config.remove("state_file");
        config.insert("discovery".into(), "kube".into());
        let mut kube = serde_yaml::Mapping::new();
        kube.insert("kubeconfig".into(), kubeconfig.display().to_string().into());
        config.insert("kube".into(), kube.into());
        std::fs::write(&path, serde_yaml::to_string(&config).expect("YAML"))
            .expect("writing the agent config");
        lab.start_agent(node)
            .unwrap_or_else(|e| panic!("{node}'s agent in kube mode: {e:#}"));
    }
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
    api.patch(
        &lab,
        "/api/v1/namespaces/legacy",
        json!({"metadata": {"labels": {"mesh-agent/enabled": "true"}}}),
    );
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
