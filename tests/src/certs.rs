//! Test certificates from the lab's CA (`mesh-agent ca`) and a raw HBONE client
//! (`mesh-labtool hbone`), for tests that present their own identity to an agent.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{agent_bin, labtool_bin, Lab, Running};

/// The lab's SPIFFE trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// Runs `mesh-agent ca ...`; panics with its output on failure.
pub fn ca(args: &[&str]) {
    let out = Command::new(agent_bin())
        .arg("ca")
        .args(args)
        .output()
        .expect("running mesh-agent ca");
    assert!(
        out.status.success(),
        "mesh-agent ca {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A workload certificate for `spiffe` signed by `ca_cert`/`ca_key` (e.g. a node's
/// intermediate in `<run dir>/ca/`), written as `<dir>/<name>-cert.pem` and `-key.pem`;
/// `extra` goes to `mesh-agent ca issue-leaf` as is (e.g. `--expired`).
pub fn issue_leaf(
    ca_cert: &Path,
    ca_key: &Path,
    spiffe: &str,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (PathBuf, PathBuf) {
    let mut args = vec!["issue-leaf", "--id", spiffe, "--name", name];
    let (c, k, d) = (
        ca_cert.to_string_lossy(),
        ca_key.to_string_lossy(),
        dir.to_string_lossy(),
    );
    args.extend(["--ca-cert", &c, "--ca-key", &k, "--out", &d]);
    args.extend(extra);
    ca(&args);
    (
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    )
}

/// A leaf for `spiffe` from node `node`'s intermediate in the lab's CA directory.
pub fn issue_node_leaf(lab: &Lab, node: &str, spiffe: &str, name: &str) -> (PathBuf, PathBuf) {
    let ca_dir = lab.run_dir().join("ca");
    issue_leaf(
        &ca_dir.join(format!("{node}-cert.pem")),
        &ca_dir.join(format!("{node}-key.pem")),
        spiffe,
        &lab.run_dir().join("test-certs"),
        name,
        &[],
    )
}

/// Runs `mesh-labtool hbone` from `pod` to `to` (`ip:15008`) with the certificate (or none),
/// sending `requests` on one connection; returns its output lines (`server_identity ..`,
/// `response N status=..`, `echo N ok bytes=..`, errors).
pub fn hbone_client(
    lab: &Lab,
    pod: &str,
    to: &str,
    cert: Option<&(PathBuf, PathBuf)>,
    requests: &[String],
) -> Vec<String> {
    let mut cmd = lab.command(pod, labtool_bin());
    cmd.args(["hbone", "--to", to]);
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    for r in requests {
        cmd.args(["--request", r]);
    }
    Running::spawn(&format!("HBONE client in {pod} to {to}"), &mut cmd)
        .wait_success(Duration::from_secs(30))
}
