//! Developer commands. `cargo xtask --help` lists them.

mod bench;
mod build;
mod demo;
mod fuzz;
mod kernels;
mod kmock;
mod lab;
mod manifests;
mod preflight;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "xtask", about = "Build, run and test the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Performance figures in the lab, each beside the direct path (markdown, JSON, SVG plots);
    /// compares two runs (--compare) and renders docs/performance.md (--render-docs).
    Bench(bench::BenchArgs),
    /// Build the eBPF object (installs rust-src and bpf-linker when missing).
    BuildEbpf,
    /// Build the eBPF object and the release binaries.
    Build,
    /// Build everything, bring up the lab, show a captured connection and the metrics that
    /// prove it, then the lab with a Kubernetes API (an emulator) where a label meshes a
    /// namespace live, then a waypoint routing, splitting and denying HTTP; tear down.
    Demo,
    /// Run the fuzz targets (fuzz/), each for a while; fails on any failing input, naming it.
    Fuzz(fuzz::FuzzArgs),
    /// Boot the kernels users run (Debian's and Ubuntu's, fetched with apt) under qemu and run
    /// `mesh-agent check` and end-to-end suites in each; one table of results
    /// (docs/kernels.md).
    Kernels(kernels::KernelsArgs),
    /// Manage the lab: network namespaces as nodes and pods, one agent per node.
    Lab(lab::LabArgs),
    /// Render every overlay of deploy/ (kubectl kustomize) and validate every object against
    /// the Kubernetes schemas of pinned versions and the CRD; fails naming object and field.
    Manifests,
    /// Build the eBPF object, check formatting and lints, run unit and end-to-end tests.
    Test,
}

/// Runs the command. An error is printed as one line, `error: ` and its chain of causes; with
/// `RUST_LIB_BACKTRACE=1` also the backtrace where it arose. `RUST_BACKTRACE`, which many
/// shells set for good, is left to panics: it does not turn every error into a page.
fn main() -> ExitCode {
    forget_cargo_run_env();
    let command = Cli::parse().command;
    match run(command) {
        Ok(code) => code,
        Err(err) if backtrace_wanted() => {
            eprintln!("error: {err:?}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Bench(args) => bench::run(args),
        Command::BuildEbpf => build::ebpf(),
        Command::Build => build::all(),
        Command::Demo => demo::run(),
        Command::Fuzz(args) => fuzz::run_targets(args),
        Command::Kernels(args) => kernels::run(args),
        Command::Lab(args) => return lab::run(args),
        Command::Manifests => manifests::run_all(),
        Command::Test => test::run_all(),
    }
    .map(|()| ExitCode::SUCCESS)
}

/// Whether the error's backtrace was asked for (`RUST_LIB_BACKTRACE` set, not `0`).
fn backtrace_wanted() -> bool {
    std::env::var_os("RUST_LIB_BACKTRACE").is_some_and(|v| v != "0")
}

/// `cargo xtask` runs this binary with `cargo run`, which sets the xtask package's
/// `CARGO_PKG_*` and `CARGO_MANIFEST_*` variables. The cargo commands xtask runs would inherit
/// them, and build scripts that watch them (ring's does) would be run again, with everything
/// above them rebuilt, each time a build alternates between xtask and a plain `cargo`.
fn forget_cargo_run_env() {
    let ours = |name: &str| {
        name.starts_with("CARGO_PKG_")
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
    };
    let names: Vec<_> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| ours(name))
        .collect();
    for name in names {
        // Single-threaded still: nothing else reads the environment meanwhile.
        std::env::remove_var(name);
    }
}
