//! `mesh-agent-bench`: the in-memory measurements `cargo xtask bench` runs beside its lab
//! scenarios (docs/performance.md), on the agent's own code, outside the production binary.
//! Each prints one JSON line.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use mesh_agent::{state, tunnel};

/// The agent's allocator (src/main.rs), so that the state's RSS is the agent's.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent-bench",
    about = "In-memory measurements of the agent's code for cargo xtask bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The control path on a synthetic mesh: build the state, then apply single changes.
    State {
        /// Services of the synthetic mesh.
        #[arg(long, default_value_t = 10_000)]
        services: u32,
        /// Workloads of the synthetic mesh.
        #[arg(long, default_value_t = 50_000)]
        workloads: u32,
    },
    /// The record layer's AES-128-GCM on one core.
    Crypto {
        /// How long to seal (then as many records are opened).
        #[arg(long, default_value_t = 1000)]
        millis: u64,
    },
    /// The record path in memory, ours against rustls's unbuffered API: 16 KiB and 1 KiB
    /// records sealed, framed, opened and handed out.
    Records {
        /// How long to measure each path and record size.
        #[arg(long, default_value_t = 1000)]
        millis: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::State {
            services,
            workloads,
        } => {
            let shape = state::bench::Shape {
                services,
                workloads,
            };
            anyhow::ensure!(
                shape.fits(),
                "too large: at most {} workloads and {} services",
                state::bench::MAX_WORKLOADS,
                state::bench::MAX_SERVICES
            );
            println!("{}", state::bench::run(shape)?.json());
        }
        Command::Crypto { millis } => {
            let bench = tunnel::record::bench::run(std::time::Duration::from_millis(millis))?;
            println!("{}", bench.json());
        }
        Command::Records { millis } => {
            let bench = tunnel::record::bench::paths(std::time::Duration::from_millis(millis))
                .map_err(anyhow::Error::msg)?;
            println!("{}", bench.json());
        }
    }
    Ok(())
}
