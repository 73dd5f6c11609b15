//! `cargo xtask test`: everything CI checks, in order of cost. Formatting, lints (host and
//! eBPF), the Kubernetes manifests, unit tests, then the end-to-end suite in the lab (root needed: without it the lab
//! tests skip loudly, or fail when MESH_REQUIRE_PRIVILEGED=1 as in CI). The last line says how
//! many end-to-end tests ran: a run where they skipped is not "all checks passed".

use std::process::Command;

use anyhow::Context as _;
use mesh_lab::{Tally, REQUIRE_PRIVILEGED_ENV, TALLY_DIR_ENV};

use crate::{
    build::{self, root, run, Profile},
    manifests, preflight,
};

pub fn run_all() -> anyhow::Result<()> {
    let root = root();
    // First, so that a fresh machine is ready (or told what it lacks) before the long builds.
    if preflight::is_root() || std::env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
        preflight::ensure(
            "cargo xtask test",
            &[
                preflight::BUILD,
                preflight::UNIT,
                preflight::MANIFESTS,
                preflight::LAB,
                preflight::TEST,
                preflight::KUBE_LAB,
            ],
        )?;
    } else {
        preflight::ensure(
            "cargo xtask test",
            &[preflight::BUILD, preflight::UNIT, preflight::MANIFESTS],
        )?;
        eprintln!(
            "xtask: not root: the end-to-end tests will skip, so the commands they run are not \
             checked"
        );
    }
    // Measured on a fresh clone: about 6 GiB of debug builds (without incremental data, as CI
    // builds), the eBPF objects and the Kubernetes tools.
    preflight::disk_space("cargo xtask test", 8);
    build::ebpf()?;
    step("format (rustfmt, nightly for the import options in rustfmt.toml)");
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["+nightly", "fmt", "--all", "--check"]))?;
    for own_workspace in ["mesh-ebpf", "fuzz"] {
        run(Command::new("cargo")
            .current_dir(root.join(own_workspace))
            .args(["+nightly", "fmt", "--check"]))?;
    }
    step("clippy (host crates)");
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("clippy (eBPF programs)");
    run(Command::new("cargo")
        .current_dir(root.join("mesh-ebpf"))
        .args([
            "+nightly",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR"))?;
    step("the agent's library without eBPF (no eBPF object: --no-default-features)");
    // What the waypoint and every test of pure code rely on: the library builds and its unit
    // tests pass on the default (stable) toolchain with neither the eBPF object nor bpf-linker
    // (the object's path is made unusable so that nothing can quietly embed it).
    run(Command::new("cargo")
        .current_dir(&root)
        .args([
            "test",
            "-p",
            "mesh-agent",
            "--lib",
            "--no-default-features",
            "--",
            "--test-threads=2",
        ])
        .env("MESH_EBPF_OBJECT", "/nonexistent/mesh-ebpf"))?;
    step("the tunnel with rustls's record path (feature rustls-records, the other side of an A/B)");
    // Built for measurements only (docs/performance.md, "The record layer against rustls"),
    // so it is linted and its HBONE tests run here, where it would otherwise rot unseen.
    let rustls_records = [
        "-p",
        "mesh-agent",
        "--lib",
        "--no-default-features",
        "--features",
        "rustls-records",
    ];
    run(Command::new("cargo")
        .current_dir(&root)
        .arg("clippy")
        .args(rustls_records)
        .args(["--tests", "--", "-D", "warnings"])
        .env("MESH_EBPF_OBJECT", "/nonexistent/mesh-ebpf"))?;
    run(Command::new("cargo")
        .current_dir(&root)
        .arg("test")
        .args(rustls_records)
        .args(["--", "--test-threads=2", "tunnel::"])
        .env("MESH_EBPF_OBJECT", "/nonexistent/mesh-ebpf"))?;
    step("Kubernetes manifests (deploy/: rendered and validated)");
    manifests::run_all()?;
    step("build (debug binaries the lab runs)");
    let bins = build::lab_bins(Profile::Debug, true)?;
    step("KMock (the Kubernetes API emulator of the discovery tests)");
    let kmock = crate::kmock::ensure()?;
    step("unit and end-to-end tests");
    // Each lab test records there whether it ran or skipped: the count below.
    let tally_dir = build::target_dir().join("e2e-tally");
    match std::fs::remove_dir_all(&tally_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("emptying {}", tally_dir.display()));
        }
        _ => {}
    }
    let tested = run(Command::new("cargo")
        .current_dir(&root)
        .args(["test", "--workspace", "--", "--test-threads=2"])
        .env("MESH_AGENT_BIN", &bins.agent)
        .env("MESH_LABTOOL_BIN", &bins.labtool)
        .env(crate::kmock::PYTHON_ENV, &kmock)
        .env(TALLY_DIR_ENV, &tally_dir));
    let tally = Tally::read(&tally_dir).with_context(|| {
        format!(
            "reading what the lab tests recorded in {}",
            tally_dir.display()
        )
    })?;
    eprintln!("xtask: {tally}");
    tested?;
    step("lab leftovers");
    let swept = mesh_lab::sweep()?;
    if !swept.is_empty() {
        anyhow::bail!("tests left lab resources behind (now removed): {swept:?}");
    }
    if tally.total() == 0 {
        anyhow::bail!(
            "no end-to-end test recorded whether it ran (in {}): the suite did not run them",
            tally_dir.display()
        );
    }
    if tally.skipped.is_empty() {
        eprintln!("xtask: all checks passed; {tally}");
    } else {
        eprintln!("xtask: the other checks passed, but {tally}");
    }
    Ok(())
}

fn step(what: &str) {
    eprintln!("\nxtask: == {what} ==");
}
