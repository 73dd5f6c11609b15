//! Developer commands. `cargo xtask --help` lists them.

mod build;
mod lab;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "xtask", about = "Build, run and test the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build the eBPF object (installs rust-src and bpf-linker when missing).
    BuildEbpf,
    /// Build the eBPF object and the release binaries.
    Build,
    /// Manage the lab: network namespaces as nodes and pods, one agent per node.
    Lab(lab::LabArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => build::ebpf(),
        Command::Build => build::all(),
        Command::Lab(args) => lab::run(args),
    }
}
