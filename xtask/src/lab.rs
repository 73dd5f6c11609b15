//! `cargo xtask lab ...`: owned by the lab harness work (see tests/src/lib.rs).

/// Arguments of `cargo xtask lab`.
#[derive(clap::Args, Debug)]
pub struct LabArgs {}

/// Runs a lab subcommand.
pub fn run(_args: LabArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet implemented")
}
