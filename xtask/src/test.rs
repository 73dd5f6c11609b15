//! `cargo xtask test`: everything CI checks, in order of cost. Formatting, lints (host and
//! eBPF), unit tests, then the end-to-end suite in the lab (root needed: without it the lab
//! tests skip loudly, or fail when MESH_REQUIRE_PRIVILEGED=1 as in CI).

use std::process::Command;

use mesh_lab::REQUIRE_PRIVILEGED_ENV;

use crate::{
    build::{self, root, run, Profile},
    preflight,
};

pub fn run_all() -> anyhow::Result<()> {
    let root = root();
    // First, so that a fresh machine is ready (or told what it lacks) before the long builds.
    if preflight::is_root() || std::env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
        preflight::ensure("cargo xtask test", &[preflight::LAB, preflight::TEST])?;
    } else {
        eprintln!(
            "xtask: not root: the end-to-end tests will skip, so the commands they run are not \
             checked"
        );
    }
    build::ebpf()?;
    step("format (rustfmt, nightly for the import options in rustfmt.toml)");
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["+nightly", "fmt", "--all", "--check"]))?;
    run(Command::new("cargo")
        .current_dir(root.join("mesh-ebpf"))
        .args(["+nightly", "fmt", "--check"]))?;
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
    step("build (debug binaries the lab runs)");
    let bins = build::lab_bins(Profile::Debug, true)?;
    step("unit and end-to-end tests");
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["test", "--workspace", "--", "--test-threads=2"])
        .env("MESH_AGENT_BIN", &bins.agent)
        .env("MESH_LABTOOL_BIN", &bins.labtool))?;
    step("lab leftovers");
    let swept = mesh_lab::sweep()?;
    if !swept.is_empty() {
        anyhow::bail!("tests left lab resources behind (now removed): {swept:?}");
    }
    eprintln!("xtask: all checks passed");
    Ok(())
}

fn step(what: &str) {
    eprintln!("\nxtask: == {what} ==");
}
