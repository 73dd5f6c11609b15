//! `cargo xtask test`: everything CI checks, in order of cost. Formatting, lints (host and
//! eBPF), unit tests, then the end-to-end suite in the lab (root needed: without it the lab
//! tests skip loudly, or fail when MESH_REQUIRE_PRIVILEGED=1 as in CI).

use std::process::Command;

use crate::build::{self, root, run};

pub fn run_all() -> anyhow::Result<()> {
    let root = root();
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
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--workspace", "--bins"]))?;
    step("unit and end-to-end tests");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["test", "--workspace", "--", "--test-threads=2"])
        .env("MESH_AGENT_BIN", target.join("debug/mesh-agent"))
        .env("MESH_LABTOOL_BIN", target.join("debug/mesh-labtool")))?;
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
