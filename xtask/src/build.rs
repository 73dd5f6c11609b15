//! Building: the eBPF object (the one definition of how it is built) and the binaries.
//!
//! The eBPF crate builds with the installed `nightly` toolchain, its `rust-src` component and
//! bpf-linker 0.13 linked against the nightly's own LLVM. Missing pieces are installed; what
//! cannot be installed is named precisely.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where `build-ebpf` leaves the object (mesh-agent's build.rs reads it from here).
pub fn ebpf_object() -> PathBuf {
    root().join("mesh-ebpf/target/bpfel-unknown-none/release/mesh-ebpf")
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    Ok(stdout_of(cmd)?.trim().to_owned())
}

/// What `cmd` prints on stdout, exactly; an error with its stderr when it fails.
pub fn stdout_of(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed something not UTF-8"))
}

/// Checks (and installs) what the eBPF build needs.
fn ensure_toolchain() -> anyhow::Result<()> {
    let nightly = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required to build the eBPF programs")?;
    if !nightly.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "the eBPF programs build with a nightly toolchain and none is installed. Install one \
             whose LLVM bpf-linker 0.13 supports (e.g. `rustup toolchain install nightly \
             --component rust-src`), then run this again"
        );
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker 0.13.0 against the nightly toolchain's LLVM (about a minute)"
    );
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(&sysroot).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM") && n.ends_with(".so"))
        .with_context(|| {
            format!(
                "no libLLVM*.so in {}: the nightly toolchain lacks its LLVM library",
                lib.display()
            )
        })?;
    let llvm = llvm
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_owned();
    let major = llvm
        .trim_start_matches("LLVM-")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .filter(|m| !m.is_empty())
        .with_context(|| format!("cannot read the LLVM version from {llvm}"))?
        .to_owned();
    let rustflags = format!(
        "-L {} -l dylib={llvm} -C link-arg=-Wl,-rpath,{}",
        lib.display(),
        lib.display()
    );
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major},no-llvm-linking"))
        .env("RUSTFLAGS", rustflags))
    .context("installing bpf-linker failed: it needs network access to crates.io and a C toolchain")
}

/// `cargo xtask build-ebpf`.
pub fn ebpf() -> anyhow::Result<()> {
    ensure_toolchain()?;
    let dir = root().join("mesh-ebpf");
    run(Command::new("cargo")
        .current_dir(&dir)
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        // The host's flags (e.g. from a developer's environment) must not reach the BPF target.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR"))?;
    let object = ebpf_object();
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    eprintln!("xtask: eBPF object at {}", object.display());
    Ok(())
}

/// `cargo xtask build`: the eBPF object and the release binaries.
pub fn all() -> anyhow::Result<()> {
    crate::preflight::ensure("cargo xtask build", &[crate::preflight::BUILD])?;
    ebpf()?;
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release", "--bins"]))
}

/// The cargo target directory of the cargo commands xtask runs (in the workspace root):
/// `CARGO_TARGET_DIR` (relative to the root), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// The cargo profile a command builds and runs the lab's binaries in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `lab` and `test`: quick to build, the profile of the end-to-end tests.
    Debug,
    /// `demo` and `bench`: what would be deployed.
    Release,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// The binaries a lab runs.
#[derive(Clone, Debug)]
pub struct LabBins {
    pub agent: PathBuf,
    pub labtool: PathBuf,
}

impl LabBins {
    /// `mesh-agent-bench` beside the agent (the bench's in-memory measurements), built with it.
    pub fn bench(&self) -> anyhow::Result<PathBuf> {
        let bench = self.agent.with_file_name("mesh-agent-bench");
        if !bench.is_file() {
            bail!(
                "{} does not exist: it is built with the agent (`cargo build --release -p \
                 mesh-agent`), and looked for beside it",
                bench.display()
            );
        }
        Ok(bench)
    }
}

/// The one rule for the binaries a lab command runs: `MESH_AGENT_BIN` / `MESH_LABTOOL_BIN` when
/// set (used as they are, never built), else `mesh-agent` / `mesh-labtool` of `profile` in the
/// target directory, built first (the eBPF object, then `cargo build`) when `build` is true.
/// Either way both must exist, and the lab library is pointed at them through those variables.
pub fn lab_bins(profile: Profile, build: bool) -> anyhow::Result<LabBins> {
    let given = |var: &str| -> anyhow::Result<Option<PathBuf>> {
        let Some(path) = std::env::var_os(var).map(PathBuf::from) else {
            return Ok(None);
        };
        if !path.is_file() {
            bail!(
                "{var} names {}, which does not exist: build it there, or unset {var} so that \
                 xtask builds and uses target/{}/",
                path.display(),
                profile.dir()
            );
        }
        Ok(Some(path))
    };
    let (agent, labtool) = (given(AGENT_ENV)?, given(LABTOOL_ENV)?);
    let dir = target_dir().join(profile.dir());
    let mut wanted = Vec::new();
    if agent.is_none() {
        wanted.extend([
            "-p",
            "mesh-agent",
            "--bin",
            "mesh-agent",
            "--bin",
            "mesh-agent-bench",
        ]);
    }
    if labtool.is_none() {
        wanted.extend(["-p", "mesh-tests", "--bin", "mesh-labtool"]);
    }
    if build && !wanted.is_empty() {
        if agent.is_none() {
            crate::preflight::ensure("building the agent", &[crate::preflight::BUILD])?;
            // mesh-agent embeds the eBPF object.
            ebpf()?;
        }
        eprintln!(
            "xtask: building the lab's binaries ({} profile)",
            profile.dir()
        );
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root()).arg("build").args(wanted);
        if profile == Profile::Release {
            cmd.arg("--release");
        }
        run(&mut cmd)?;
    }
    let bins = LabBins {
        agent: agent.unwrap_or_else(|| dir.join("mesh-agent")),
        labtool: labtool.unwrap_or_else(|| dir.join("mesh-labtool")),
    };
    for path in [&bins.agent, &bins.labtool] {
        if !path.is_file() {
            bail!(
                "{} does not exist: run without --no-build, or build it with `cargo xtask build`",
                path.display()
            );
        }
    }
    // The lab library reads these (xtask has no other threads).
    std::env::set_var(AGENT_ENV, &bins.agent);
    std::env::set_var(LABTOOL_ENV, &bins.labtool);
    Ok(bins)
}

/// Where the lab library finds the agent.
const AGENT_ENV: &str = "MESH_AGENT_BIN";
/// Where the lab library finds mesh-labtool.
const LABTOOL_ENV: &str = "MESH_LABTOOL_BIN";
