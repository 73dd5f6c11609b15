//! `mesh-agent inspect check`: each check prints one `ok` line; the first that fails ends the
//! command with an error naming what is wrong (the process exits non-zero).

use std::{net::SocketAddr, path::Path};

use serde_json::Value;

use super::cli::{get, get_json, Error};
use crate::preflight::Outcome;

fn list(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// Runs the checks in order, printing each that passes; the first failure is the error.
pub fn check(addr: SocketAddr, bpf_dir: Option<&Path>) -> Result<String, Error> {
    let fail = |what: String| Err(Error::Check(format!("check failed: {what}")));
    // What the agent uses, to check the same kernel objects (its pin directory).
    let dump = match get_json(addr, "/config_dump") {
        Ok(dump) => dump,
        Err(e) => return fail(e.to_string()),
    };
    let bpf_dir = match bpf_dir {
        Some(dir) => dir.to_owned(),
        None => std::path::PathBuf::from(text(&dump["bpf_dir"])),
    };
    let bpf_dir = bpf_dir.as_path();
    // Everything `mesh-agent check` does, the eBPF probe included: it loads and attaches in
    // scratch pins, a cgroup and a network namespace of its own, never the agent's.
    let kernel = crate::preflight::run(bpf_dir, crate::capture::ebpf::object());
    let failures: Vec<String> = kernel
        .failures()
        .filter_map(|c| c.error().map(|e| format!("{}: {e}", c.name)))
        .collect();
    if !failures.is_empty() {
        return fail(format!("kernel: {}", failures.join("; ")));
    }
    // Advice (an old kernel) and what could not be checked here (the cgroup links, in a
    // container with cgroup v2 read-only) stay visible.
    for c in kernel
        .checks
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Warn(_) | Outcome::Skipped(_)))
    {
        println!("{c}");
    }
    let passed = kernel
        .checks
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Ok(_)))
        .count();
    println!(
        "ok  kernel: {passed} checks of `mesh-agent check` passed (privileges, cgroup v2, bpffs \
         at {}, the eBPF programs and maps loaded, the kernel features used)",
        bpf_dir.display()
    );
    match get(addr, "/healthz/ready") {
        Ok(_) => println!("ok  agent at {addr}: ready"),
        Err(Error::Status { body, .. }) => return fail(format!("the agent is {body}")),
        Err(e) => return fail(e.to_string()),
    }
    let node = text(&dump["node"]).to_owned();
    if dump["ready"] != true {
        return fail(format!(
            "the agent of node {node} is not in sync: {}",
            dump["ready"]
        ));
    }
    for p in list(&dump["ebpf"]["programs"]) {
        if !p["problem"].is_null() || p["id"].is_null() {
            return fail(format!(
                "program {}: {}",
                text(&p["name"]),
                text(&p["problem"])
            ));
        }
    }
    for m in list(&dump["ebpf"]["maps"]) {
        if !m["problem"].is_null() {
            return fail(format!("map {}: {}", text(&m["name"]), text(&m["problem"])));
        }
        if let (Some(n), Some(max)) = (m["entries"].as_u64(), m["max_entries"].as_u64()) {
            // Arrays are always full, an LRU map evicts: only the others can run out.
            let array = text(&m["name"]) == mesh_common::maps::COUNTERS;
            if !array && m["evicts"] != true && max > 0 && n >= max {
                return fail(format!(
                    "map {} is full ({n} of {max} entries): new pods or connections cannot be \
                     captured",
                    text(&m["name"])
                ));
            }
        }
    }
    println!(
        "ok  eBPF: {} programs loaded and pinned, {} maps readable",
        list(&dump["ebpf"]["programs"]).len(),
        list(&dump["ebpf"]["maps"]).len()
    );
    let failed = &dump["capture"]["failed"];
    if let Some((pod, why)) = failed.as_object().and_then(|m| m.iter().next()) {
        return fail(format!(
            "pod {pod} is not served (its connections are refused): {}",
            text(why)
        ));
    }
    let mut captured = 0;
    let mut identities = Vec::new();
    for w in list(&dump["workloads"]) {
        let pod = text(&w["workload"]);
        match text(&w["capture"]["state"]) {
            "captured" => {
                captured += 1;
                identities.push(text(&w["identity"]).to_owned());
            }
            "not_captured" => {}
            state => {
                return fail(format!(
                    "pod {pod} is {state}: {}",
                    text(&w["capture"]["why"])
                ))
            }
        }
    }
    println!("ok  pods: {captured} captured on node {node}, every program attached to each");
    let certs = list(&dump["certificates"]);
    for id in &identities {
        match certs.iter().find(|c| c["identity"] == id.as_str()) {
            None => return fail(format!("no certificate for {id}, whose pods are captured")),
            Some(c) if c["valid"] != true || c["expires_in_secs"].as_u64() == Some(0) => {
                return fail(format!(
                    "the certificate of {id} is not valid now (not before {}, not after {}, Unix \
                     seconds): is the node's clock right, and its issuer valid?",
                    c["not_before"], c["not_after"]
                ))
            }
            Some(_) => {}
        }
    }
    println!("ok  certificates: {} held, each valid", certs.len());
    Ok(String::new())
}
