//! Self-test of the lab harness, without agents: plumbing, cgroups and teardown.

use std::{path::Path, time::Duration};

use mesh_lab::{
    traffic::{send, serve},
    Lab, LabOptions, Running,
};

const WAIT: Duration = Duration::from_secs(10);

fn lab_without_agents() -> Lab {
    Lab::up(LabOptions {
        agents: false,
        ..LabOptions::default()
    })
}

#[test]
fn pods_reach_each_other_on_the_same_and_other_nodes() {
    if !mesh_lab::require_privileged("pods_reach_each_other_on_the_same_and_other_nodes") {
        return;
    }
    let lab = lab_without_agents();
    let client = lab.pod("shop/client").clone();
    for (server_pod, same_node) in [("shop/api", false), ("shop/db", true)] {
        let pod = lab.pod(server_pod);
        assert_eq!(
            pod.node == client.node,
            same_node,
            "topology changed under the test"
        );
        let mut server = serve(&lab, server_pod, 8080);
        let addr = format!("{}:8080", pod.ip);
        let out = send(&lab, "shop/client", &addr, 1 << 20);
        assert!(
            out.iter().any(|l| l == "ok sent=1048576 received=1048576"),
            "{server_pod}: {out:?}"
        );
        // The server sees the client's own pod address: no NAT anywhere in the lab.
        let accepted = server.wait_line("accepted", WAIT);
        assert!(
            accepted.starts_with(&format!("accepted peer={}:", client.ip)),
            "{server_pod}: {accepted}"
        );
        server.wait_line(&format!("closed peer={}:", client.ip), WAIT);
    }
    // A long-lived connection in the unmeshed namespace, ended by closing its stdin.
    let _legacy_server = serve(&lab, "legacy/server", 8080);
    let to = format!("{}:8080", lab.pod("legacy/server").ip);
    let mut stream = Running::spawn(
        "stream legacy/client -> legacy/server",
        lab.command("legacy/client", mesh_lab::labtool_bin()).args([
            "stream",
            "--to",
            &to,
            "--interval-ms",
            "1",
        ]),
    );
    for _ in 0..3 {
        stream.wait_line("progress bytes=", WAIT);
    }
    stream.close_stdin();
    let out = stream.wait_success(WAIT);
    assert!(
        out.last().is_some_and(|l| l.starts_with("ok total=")),
        "{out:?}"
    );

    // Nodes reach each other over the underlay.
    let mut node_server = serve(&lab, "n2", 7000);
    let n2 = format!("{}:7000", lab.node("n2").underlay_ip);
    let mut connect = Running::spawn(
        "connect n1 -> n2",
        lab.command("n1", mesh_lab::labtool_bin())
            .args(["connect", "--to", &n2]),
    );
    connect.wait_success(WAIT);
    node_server.wait_line("accepted peer=10.240.0.1:", WAIT);
    lab.down();
}

#[test]
fn pod_commands_join_the_pod_cgroup_and_down_removes_everything() {
    if !mesh_lab::require_privileged("pod_commands_join_the_pod_cgroup_and_down_removes_everything")
    {
        return;
    }
    let lab = lab_without_agents();
    let id = lab.id().to_owned();
    let pod = lab.pod("shop/client").clone();
    let run_dir = lab.run_dir().to_path_buf();
    let cgroup_dir = lab.cgroup_dir().to_path_buf();
    assert!(lab.state_path().is_file());
    let state = lab.read_state();
    assert_eq!(
        state["workloads"][0]["cgroup"].as_str(),
        pod.cgroup.to_str()
    );
    lab.set_namespace_enabled("legacy", true);
    assert_eq!(
        lab.read_state()["namespaces"][1]["enabled"].as_bool(),
        Some(true)
    );

    // Left running on purpose: down() must kill it through cgroup.kill.
    let mut server = serve(&lab, "shop/client", 9000);
    let procs =
        std::fs::read_to_string(pod.cgroup.join("cgroup.procs")).expect("read cgroup.procs");
    assert!(
        procs.lines().any(|l| l.trim() == server.pid().to_string()),
        "pid {} not in {}: {procs}",
        server.pid(),
        pod.cgroup.display()
    );
    // Node commands run in the node's netns, but not in a pod cgroup.
    let mut ip = Running::spawn(
        "ip addr in n1",
        lab.command("n1", "ip").args(["-4", "-o", "addr"]),
    );
    let out = ip.wait_success(WAIT).join("\n");
    assert!(out.contains("10.240.0.1/24"), "{out}");

    lab.down();
    let status = server.wait(WAIT);
    assert!(
        !status.success(),
        "the pod's server should have been killed, got {status}"
    );
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let prefix = format!("mlab-{id}-");
    assert!(
        !leftovers.iter().any(|n| n.starts_with(&prefix)),
        "netns left: {leftovers:?}"
    );
    assert!(
        !cgroup_dir.exists(),
        "{} still exists",
        cgroup_dir.display()
    );
    assert!(!run_dir.exists(), "{} still exists", run_dir.display());
    assert!(!Path::new("/sys/fs/bpf/mesh-lab").join(&id).exists());
}

#[test]
fn a_fixed_id_cannot_be_used_twice() {
    if !mesh_lab::require_privileged("a_fixed_id_cannot_be_used_twice") {
        return;
    }
    let id = format!("t{}", std::process::id());
    let lab = Lab::up(LabOptions {
        id: Some(id.clone()),
        agents: false,
        ..LabOptions::default()
    });
    let err = Lab::try_up(LabOptions {
        id: Some(id.clone()),
        agents: false,
        ..LabOptions::default()
    })
    .expect_err("second lab with the same id");
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    // The failed attempt must not have damaged the first lab.
    assert!(lab.state_path().is_file());
    let attached = Lab::attach(&id).expect("attach");
    assert_eq!(attached.pod("shop/api").ip, lab.pod("shop/api").ip);
    drop(attached);
    assert!(
        lab.run_dir().exists(),
        "dropping an attached lab must not tear it down"
    );
    drop(lab);
    assert!(
        !Path::new("/run/mesh-lab").join(&id).exists(),
        "drop tears an owned lab down"
    );
}
