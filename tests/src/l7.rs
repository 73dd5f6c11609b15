//! The L7 lab: a namespace's waypoint running `mesh-agent waypoint` in its own pod, HTTP
//! servers that name themselves (`mesh-labtool http-serve`), and a client that tallies answers
//! (`mesh-labtool http-get`).

use std::{path::PathBuf, time::Duration};

use crate::{agent_bin, labtool_bin, wait_until, Lab, Running, Topology};

/// How long a change may take to show.
pub const WAIT: Duration = Duration::from_secs(20);

/// The VIP of shop's waypoint service (port 15008).
pub const WAYPOINT_VIP: &str = "10.240.100.20";
/// `shop/reviews:80`: both versions.
pub const REVIEWS: &str = "10.240.100.21:80";
/// `shop/reviews-v1:80`.
pub const REVIEWS_V1: &str = "10.240.100.22:80";
/// `shop/reviews-v2:80`.
pub const REVIEWS_V2: &str = "10.240.100.23:80";
/// `shop/mail:25`: a banner server on shop/api's port 2525.
pub const MAIL: &str = "10.240.100.24:25";
/// `shop/smtp:25`: the same, declared `tcp`.
pub const SMTP: &str = "10.240.100.25:25";

/// The L7 lab's topology (`tests/topologies/waypoint.yaml`): the default topology plus shop's
/// waypoint (pod `shop/waypoint` on n1, service account `waypoint`, service `shop/waypoint`);
/// reviews in two versions (`reviews-v1` on n2, `reviews-v2` on n1, service account `reviews`,
/// port 8080), each with a service and one service of both; `shop/mail` and `shop/smtp`
/// (declared `tcp`), port 25 to shop/api's 2525. Without its `waypoints` entry: the tests give
/// shop its waypoint ([`set_state`]) and start it ([`start_waypoint`]) themselves.
pub fn topology() -> Topology {
    let mut topology =
        Topology::from_yaml(WAYPOINT_TOPOLOGY_YAML).expect("tests/topologies/waypoint.yaml");
    topology.waypoints.clear();
    topology
}

/// `tests/topologies/waypoint.yaml`.
pub const WAYPOINT_TOPOLOGY_YAML: &str = include_str!("../topologies/waypoint.yaml");

/// Gives shop its waypoint in the state file, with `routes` (YAML, a list of HTTPRoutes) and
/// `policies` (YAML, a list of AuthorizationPolicies), and waits until both agents applied it.
pub fn set_state(lab: &Lab, routes: &str, policies: &str) {
    let reloads = |node: &str| lab.metric(node, "mesh_state_reloads_total", &[("result", "ok")]);
    let before = (reloads("n1"), reloads("n2"));
    let mut state = lab.read_state();
    state["waypoints"] =
        serde_yaml::from_str("[{namespace: shop, name: waypoint}]").expect("waypoints YAML");
    state["routes"] = serde_yaml::from_str(routes).expect("routes YAML");
    state["policies"] = serde_yaml::from_str(policies).expect("policies YAML");
    lab.write_state(&state);
    wait_until("both agents to apply the state", WAIT, || {
        reloads("n1") > before.0 && reloads("n2") > before.1
    });
}

/// Starts `mesh-agent waypoint` in `shop/waypoint` with `http` (YAML of the `http` section,
/// `{}` for the defaults) and waits until it is ready.
pub fn start_waypoint(lab: &Lab, http: &str) -> Running {
    let config: PathBuf = lab.run_dir().join("waypoint.yaml");
    std::fs::write(
        &config,
        format!(
            "namespace: shop\nname: waypoint\nstate_file: {}\nstate_poll_interval_ms: 100\n\
             identity: {{workload_socket: {}}}\nhttp: {http}\n",
            lab.state_path().display(),
            lab.workload_socket("n1").display()
        ),
    )
    .expect("writing the waypoint configuration");
    let mut waypoint = Running::spawn(
        "waypoint",
        lab.command("shop/waypoint", agent_bin())
            .env("MESH_LOG", "info")
            .args(["waypoint", "--config"])
            .arg(&config),
    );
    let ready = || {
        lab.command("shop/waypoint", "curl")
            .args([
                "-sf",
                "--max-time",
                "2",
                "http://127.0.0.1:15021/healthz/ready",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !ready() {
        if let Some(status) = waypoint.try_wait() {
            panic!("the waypoint exited ({status}): {}", waypoint.stderr());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the waypoint is not ready after {WAIT:?}: {}",
            waypoint.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    waypoint
}

/// Starts `mesh-labtool http-serve --port 8080 --name NAME ARGS` in `pod`.
pub fn serve_http(lab: &Lab, pod: &str, name: &str, args: &[&str]) -> Running {
    let mut server = Running::spawn(
        &format!("http server {name} in {pod}"),
        lab.command(pod, labtool_bin())
            .args(["http-serve", "--port", "8080", "--name", name])
            .args(args),
    );
    server.wait_line("listening", Duration::from_secs(10));
    server
}

/// `mesh-labtool http-get --to TO ARGS` from `pod`: its JSON summary (`statuses`, `served`,
/// `errors`, `first_body`, `first_headers`).
pub fn http_get(lab: &Lab, pod: &str, to: &str, args: &[&str]) -> serde_json::Value {
    let output = lab
        .command(pod, labtool_bin())
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

/// A count of an http-get summary (`statuses`/`served` entry), 0 when absent.
pub fn count(summary: &serde_json::Value, what: &str, key: &str) -> u64 {
    summary[what][key].as_u64().unwrap_or(0)
}

/// The waypoint's metrics, read inside its pod.
pub fn waypoint_metrics(lab: &Lab) -> String {
    let output = lab
        .command("shop/waypoint", "curl")
        .args(["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
