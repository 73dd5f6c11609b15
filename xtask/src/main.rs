//! Developer commands. `cargo xtask --help` lists them.

mod bench;
mod build;
mod demo;
mod lab;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "xtask", about = "Build, run and test the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Performance figures in the lab, each beside the direct path (markdown + JSON).
    Bench(bench::BenchArgs),
    /// Build the eBPF object (installs rust-src and bpf-linker when missing).
    BuildEbpf,
    /// Build the eBPF object and the release binaries.
    Build,
    /// Build everything, bring up the lab, show a captured connection and the metrics that
    /// prove it, tear down.
    Demo,
    /// Manage the lab: network namespaces as nodes and pods, one agent per node.
    Lab(lab::LabArgs),
    /// Build the eBPF object, check formatting and lints, run unit and end-to-end tests.
    Test,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => bench::run(args),
        Command::BuildEbpf => build::ebpf(),
        Command::Build => build::all(),
        Command::Demo => demo::run(),
        Command::Lab(args) => lab::run(args),
        Command::Test => test::run_all(),
    }
}
