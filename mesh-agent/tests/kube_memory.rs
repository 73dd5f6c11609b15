//! What the mesh-wide pod watch costs the agent per 10,000 pods (docs/kubernetes.md): the
//! emulator of `kube_discovery.rs` starts holding MESH_MEASURE_PODS pods (default 10,000,
//! preloaded: creating them over HTTP would take it many minutes), the source lists and
//! watches them, and two figures are read before and after: the heap this process holds (a
//! counting allocator: what the agent keeps, whatever the allocator does with freed memory) and
//! its resident set (what the node sees, the list's transient buffers included: the emulator
//! ignores `limit` and sends the whole list at once, where an API server pages by 500). A
//! measurement, not a check: run it by hand, in release,
//!
//!     cargo test --release -p mesh-agent --test kube_memory -- --ignored --nocapture
//!
//! with KMock installed (`cargo xtask test` does it, or MESH_KMOCK_PYTHON).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use kube::Client;
use mesh_agent::{
    discovery::kube::{run, Rules},
    metrics::Metrics,
    state::Store,
};
use serde_json::{json, Value};

/// The system allocator, counting the bytes allocated and not yet freed.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HELD.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HELD.fetch_sub(layout.size(), Ordering::Relaxed);
            HELD.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Pods in the emulator (MESH_MEASURE_PODS, default 2,000).
fn pods() -> u32 {
    std::env::var("MESH_MEASURE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
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

fn pod(i: u32) -> Value {
    let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256);
    json!({
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
    })
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
    let preload = std::env::temp_dir().join(format!("mesh-kube-pods-{}.json", std::process::id()));
    let objects: Vec<Value> = (0..50)
        .map(|n| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": format!("ns-{n}"),
                                     "labels": {"mesh-agent/enabled": "true"}}})
        })
        .chain((0..count).map(pod))
        .collect();
    std::fs::write(&preload, serde_json::to_vec(&objects).expect("JSON")).expect("preload file");
    drop(objects);
    let started = Instant::now();
    let mut child = Command::new(&python)
        .arg(&script)
        .args(["--port", "0", "--preload"])
        .arg(&preload)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the emulator with {}: {e}", python.display()));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the emulator's first line");
    let _ = std::fs::remove_file(&preload);
    let port: u16 = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the emulator said {line:?}"));
    let url = format!("http://127.0.0.1:{port}").parse().expect("url");
    let client = Client::try_from(kube::Config::new(url)).expect("client");
    eprintln!(
        "emulator serving {count} pods after {:?}",
        started.elapsed()
    );

    let store = Arc::new(Store::new());
    let metrics = Arc::new(Metrics::new());
    let (before, _) = memory();
    let held_before = HELD.load(Ordering::Relaxed);
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
    let held = HELD.load(Ordering::Relaxed).saturating_sub(held_before);
    let grown = after.saturating_sub(before) * 1024;
    let per_10k = |bytes: f64| bytes / f64::from(count) * 10_000.0 / 1_048_576.0;
    eprintln!(
        "listed {count} pods in {listed:?}\n\
         heap held: +{} KiB, {:.0} bytes per pod, {:.1} MiB per 10,000 pods\n\
         resident set: {before} KiB before, {after} KiB after (+{} KiB, {:.0} bytes per pod, \
         {:.1} MiB per 10,000 pods), peak {peak} KiB\n\
         this node's pods held whole: {}",
        held / 1024,
        held as f64 / f64::from(count),
        per_10k(held as f64),
        grown / 1024,
        grown as f64 / f64::from(count),
        per_10k(grown as f64),
        running.node_pods.state().len()
    );
    let _ = child.kill();
    let _ = child.wait();
}
