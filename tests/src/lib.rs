//! `mesh_lab`: the test lab. A node is a network namespace running its own agent; a pod is a
//! network namespace plus a cgroup v2 directory, wired to its node by a veth pair; nodes are
//! joined by a bridge in an underlay namespace. Everything uses 10.240.0.0/16 inside namespaces
//! the lab creates, and is removed on [`Lab::down`], on drop, or by [`sweep`] after a crash.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use mesh_lab::{labtool_bin, Lab, LabOptions, Running};
//!
//! if !mesh_lab::require_privileged("example") {
//!     return;
//! }
//! let lab = Lab::up(LabOptions::default());
//! let mut server = Running::spawn(
//!     "echo server in shop/api",
//!     lab.command("shop/api", labtool_bin()).args(["serve", "--port", "8080"]),
//! );
//! server.wait_line("listening", Duration::from_secs(5));
//! lab.down();
//! ```

#![warn(missing_docs)]

pub mod certs;
pub mod l7;
mod lab;
mod metrics;
pub mod pcap;
mod running;
mod tally;
pub mod traffic;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use self::{
    lab::{
        agent_bin, cgroup2_mount,
        kube::{
            kmock_python, kubectl_bin, API_PORT as KUBE_API_PORT, PYTHON_ENV as KMOCK_PYTHON_ENV,
        },
        sweep,
        topology::{
            AppProtocol, CaptureExclusions, CgroupDriver, NamespaceSpec, PodSpec, ServicePort,
            ServiceSpec, Topology, WaypointSpec, DEFAULT_TOPOLOGY_YAML,
        },
        CniRun, Lab, LabOptions, Node, Pod, Upgrade, WaypointProcess, METRICS_PORT, READINESS_PORT,
    },
    metrics::{exposed_value, metric_value, parse_exposition, Exposition, ParsedSample},
    running::Running,
    tally::{Tally, TALLY_DIR_ENV},
};

/// Polls `f` every 20 ms until it returns true; panics
/// `"timed out after {timeout:?} waiting for {what}"` if it does not within `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Environment variable that turns a missing privilege into a test failure (CI sets it to 1).
pub const REQUIRE_PRIVILEGED_ENV: &str = "MESH_REQUIRE_PRIVILEGED";

/// True if the lab can run here: root, a cgroup2 mount, a writable /run, and `ip` (iproute2).
/// Otherwise panics with the reason when `MESH_REQUIRE_PRIVILEGED=1`, else prints
/// `SKIPPED <test>: <reason>` to stderr and returns false. Either way, when
/// [`TALLY_DIR_ENV`] is set, records whether `test` ran (see [`Tally`]). Start every lab test
/// with `if !mesh_lab::require_privileged("name") { return; }`.
pub fn require_privileged(test: &str) -> bool {
    let Some(reason) = privilege_problem() else {
        tally::record(test, None);
        return true;
    };
    tally::record(test, Some(&reason));
    if std::env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: {REQUIRE_PRIVILEGED_ENV}=1 but the lab cannot run here: {reason}");
    }
    eprintln!(
        "\n*** SKIPPED {test}: {reason} (set {REQUIRE_PRIVILEGED_ENV}=1 to make this a failure) ***\n"
    );
    false
}

fn privilege_problem() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!(
            "not running as root (euid {euid}); the lab creates network namespaces and cgroups"
        ));
    }
    if let Err(e) = cgroup2_mount() {
        return Some(format!("{e:#}"));
    }
    if let Err(e) = std::fs::create_dir_all("/run/mesh-lab") {
        return Some(format!(
            "/run is not writable (creating /run/mesh-lab: {e})"
        ));
    }
    if let Err(e) = std::process::Command::new("ip").arg("-V").output() {
        return Some(format!("cannot run `ip` from iproute2: {e}"));
    }
    None
}

/// The `mesh-labtool` binary: `MESH_LABTOOL_BIN`, else `mesh-labtool` in the target directory of
/// the running executable (`target/<profile>/`, also from `target/<profile>/deps/`). Panics with
/// a hint if it is not there. Tests of this crate can use `env!("CARGO_BIN_EXE_mesh-labtool")`.
pub fn labtool_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MESH_LABTOOL_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot find mesh-labtool: current_exe failed: {e}"));
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join("mesh-labtool");
    if !path.is_file() {
        panic!(
            "mesh-labtool not found at {}: build it with `cargo build -p mesh-tests --bin \
             mesh-labtool` (same profile and target dir) or set MESH_LABTOOL_BIN",
            path.display()
        );
    }
    path
}
