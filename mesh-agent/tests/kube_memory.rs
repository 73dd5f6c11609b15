//! What the mesh-wide pod watch costs the agent per 10,000 pods (docs/kubernetes.md): the
//! emulator of `kube_discovery.rs` holds MESH_MEASURE_PODS pods (default 2,000: the emulator
//! scans every object on each request, so filling it grows with the square of the count), the
//! source lists and watches them, and the resident set is read before and after; the cost per
//! pod is scaled to 10,000. A measurement, not a check: run it by hand,
//!
//!     cargo test -p mesh-agent --test kube_memory -- --ignored --nocapture
//!
//! with KMock installed (`cargo xtask test` does it, or MESH_KMOCK_PYTHON).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Api, PostParams},
    Client,
};
use mesh_agent::{
    discovery::kube::{run, Rules},
    metrics::Metrics,
    state::Store,
};
use serde_json::json;

/// Pods in the emulator (MESH_MEASURE_PODS, default 2,000).
fn pods() -> u32 {
    std::env::var("MESH_MEASURE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// VmRSS and VmHWM of this process, in KiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn pod(i: u32) -> Pod {
    let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256);
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("app-{i}-7c9d8f6b5-x2x8q"),
            "namespace": format!("ns-{}", i % 50),
            "uid": format!("2d6f7a8b-3c4d-4e5f-9a0b-{i:012}"),
            "labels": {"app": format!("app-{}", i % 500), "pod-template-hash": "7c9d8f6b5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "controller": true,
                                 "name": format!("app-{}-7c9d8f6b5", i % 500),
                                 "uid": "9e1f3c2a-1b2c-4d5e-8f90-a1b2c3d4e5f6"}]
        },
        "spec": {
            "nodeName": format!("n{}", i % 100),
            "serviceAccountName": format!("app-{}", i % 500),
            "containers": [{"name": "app", "image": "registry.example/app:1.0",
                            "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]}]
        },
        "status": {
            "phase": "Running",
            "hostIP": "192.168.10.11",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }))
    .expect("a pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/kubernetes.md, run by hand"]
async fn memory_of_the_pod_watch_per_10000_pods() {
    let count = pods();
    let python = std::env::var_os("MESH_KMOCK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/kmock-venv/bin/python")
        });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kube_emulator.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the emulator with {}: {e}", python.display()));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the emulator's first line");
    let port: u16 = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the emulator said {line:?}"));
    let url = format!("http://127.0.0.1:{port}").parse().expect("url");
    let client = Client::try_from(kube::Config::new(url)).expect("client");
    let started = Instant::now();
    stream::iter(0..count)
        .for_each_concurrent(16, |i| {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &format!("ns-{}", i % 50));
            async move {
                pods.create(&PostParams::default(), &pod(i))
                    .await
                    .unwrap_or_else(|e| panic!("create pod {i}: {e}"));
            }
        })
        .await;
    eprintln!("{count} pods created in {:?}", started.elapsed());

    let store = Arc::new(Store::new());
    let metrics = Arc::new(Metrics::new());
    let (before, _) = memory();
    let started = Instant::now();
    let running = run(client, "n0", Rules::default(), store.clone(), metrics);
    let mut synced = running.synced.clone();
    tokio::time::timeout(Duration::from_secs(300), synced.wait_for(|s| *s))
        .await
        .expect("listed within 300 s")
        .expect("watchers run");
    let listed = started.elapsed();
    assert_eq!(
        store.load().workloads.len(),
        count as usize,
        "every pod a workload"
    );
    let (after, peak) = memory();
    let grown = after.saturating_sub(before) * 1024;
    let per_pod = grown as f64 / f64::from(count);
    eprintln!(
        "listed {count} pods in {listed:?}; resident set {before} KiB before, {after} KiB after \
         (+{} KiB, {per_pod:.0} bytes per pod, {:.1} MiB per 10,000 pods), peak {peak} KiB; \
         this node's pods held whole: {}",
        grown / 1024,
        per_pod * 10_000.0 / 1_048_576.0,
        running.node_pods.state().len()
    );
    let _ = child.kill();
    let _ = child.wait();
}
