//! `mesh-agent`: the node agent of the mesh. `mesh-agent node --config FILE` runs it;
//! `mesh-agent check` only runs the start-up checks.
#![deny(unsafe_code)]

mod admin;
mod capture;
mod config;
mod discovery;
mod identity;
mod metrics;
mod policy;
mod preflight;
mod proxy;
mod state;
mod sys;
mod tunnel;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent",
    version,
    about = "Sidecarless service mesh node agent (eBPF capture, node proxy)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent.
    Node {
        /// The agent configuration (docs/formats.md).
        #[arg(long, env = "MESH_CONFIG")]
        config: PathBuf,
    },
    /// Certificate authority tools: a root CA, node intermediates.
    #[command(subcommand)]
    Ca(identity::cli::CaCommand),
    /// Authorization policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Check that this machine and these privileges can run the agent, then exit.
    Check {
        /// The pin directory that would be used.
        #[arg(long, default_value = "/sys/fs/bpf/mesh")]
        bpf_dir: PathBuf,
    },
    /// Measure the control path on a synthetic mesh in memory; prints one JSON line.
    #[command(hide = true)]
    BenchState {
        /// Services of the synthetic mesh.
        #[arg(long, default_value_t = 10_000)]
        services: u32,
        /// Workloads of the synthetic mesh.
        #[arg(long, default_value_t = 50_000)]
        workloads: u32,
    },
    /// Measure the record layer's AES-128-GCM on one core; prints one JSON line.
    #[command(hide = true)]
    BenchCrypto {
        /// How long to seal (then as many records are opened).
        #[arg(long, default_value_t = 1000)]
        millis: u64,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Check the policies of a state file as the agent applies them (invalid ones, L7
    /// warnings) and, with --to and --port, decide one connection and name the deciding policy.
    Check(policy::cli::CheckArgs),
}

fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Node { config } => run_node(&config),
        Command::Ca(cmd) => Ok(identity::cli::run(cmd)?),
        Command::Policy(PolicyCommand::Check(args)) => {
            print!("{}", policy::cli::check(&args)?);
            Ok(())
        }
        Command::Check { bpf_dir } => {
            let cgroup = preflight::check(&bpf_dir)?;
            println!(
                "ok: kernel, privileges, cgroup v2 at {}, bpffs at {}",
                cgroup.display(),
                bpf_dir.display()
            );
            Ok(())
        }
        Command::BenchState {
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
            Ok(())
        }
        Command::BenchCrypto { millis } => {
            let bench = tunnel::record::bench::run(std::time::Duration::from_millis(millis))?;
            println!("{}", bench.json());
            Ok(())
        }
    }
}

fn run_node(config_path: &std::path::Path) -> anyhow::Result<()> {
    let config = config::Config::load(config_path)?;
    let bpf_dir = config.bpf_dir();
    let cgroup_root = preflight::check(&bpf_dir)?;
    let home = sys::Netns::current().context("cannot open the agent's own network namespace")?;
    match sys::raise_nofile_limit() {
        // A proxied connection holds up to four descriptors while it moves data.
        Ok(limit) if limit < 65_536 => warn!(
            limit,
            "the open file limit is low: proxied connections are capped at about a quarter of it"
        ),
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => warn!(error = %e, "cannot raise the open file limit; connections may be capped"),
    }
    let (snapshot, state_bytes, rejected_policies) =
        discovery::file::load(&config.state_file, &config.policy.root_namespace)?;
    let id = &config.identity;
    let issuer = identity::Issuer::load(&id.issuer_cert, &id.issuer_key)?
        .with_trust_domain(&id.trust_domain)?;
    let bundle = identity::TrustBundle::load(&id.trust_bundle)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // MESH_WORKER_THREADS: data path threads (default: one per core), as ztunnel's
    // ZTUNNEL_WORKER_THREADS.
    if let Some(n) = std::env::var("MESH_WORKER_THREADS")
        .ok()
        .filter(|v| !v.is_empty())
    {
        let n: usize = n
            .parse()
            .ok()
            .filter(|n| (1..=256).contains(n))
            .with_context(|| format!("MESH_WORKER_THREADS={n}: use a number from 1 to 256"))?;
        runtime.worker_threads(n);
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        let metrics = Arc::new(metrics::Metrics::new());
        let store = Arc::new(state::Store::new());
        store.replace(snapshot);
        discovery::file::report(&rejected_policies, &metrics);
        let readiness = Arc::new(admin::Readiness::new("starting: pods not yet captured"));
        admin::serve(
            config.metrics_addr,
            "metrics",
            metrics.clone(),
            readiness.clone(),
        )
        .await?;
        if config.readiness_addr != config.metrics_addr {
            admin::serve(
                config.readiness_addr,
                "readiness",
                metrics.clone(),
                readiness.clone(),
            )
            .await?;
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (loaded, orig_dst, collector) = capture::ebpf::load(&bpf_dir, &config.capture)?;
        metrics.register_collector(collector);
        let expiry = prometheus_client::metrics::family::Family::<
            identity::CertLabels,
            prometheus_client::metrics::gauge::Gauge,
        >::default();
        metrics.register(
            "mesh_certificate_expiry_timestamp_seconds",
            "When each workload certificate of this node expires (Unix time)",
            expiry.clone(),
        );
        let certs = identity::CertManager::new(
            issuer,
            bundle,
            Duration::from_secs(config.identity.leaf_lifetime_secs),
            expiry,
        );
        tokio::spawn(certs.clone().run_rotation(stop_rx.clone()));
        let pool_metrics = tunnel::client::PoolMetrics::default();
        metrics.register(
            "mesh_hbone_connections_opened",
            "HBONE connections opened (TLS handshakes)",
            pool_metrics.connections_opened.clone(),
        );
        metrics.register(
            "mesh_hbone_connections",
            "HBONE connections in the pool",
            pool_metrics.connections.clone(),
        );
        metrics.register(
            "mesh_hbone_streams_opened",
            "HBONE CONNECT streams opened",
            pool_metrics.streams_opened.clone(),
        );
        metrics.register(
            "mesh_hbone_streams_retried",
            "HBONE CONNECT streams a draining peer refused unprocessed, opened again on another \
             connection",
            pool_metrics.streams_retried.clone(),
        );
        let pool_config = tunnel::client::PoolConfig {
            max_conns: config.hbone.connections_per_peer,
            ..tunnel::client::PoolConfig::default()
        };
        let pool = tunnel::client::Pool::new(pool_config, pool_metrics);
        let inputs = Arc::new(proxy::Inputs {
            store: store.clone(),
            metrics: metrics.clone(),
            home,
            orig_dst,
            node: config.node.clone(),
            certs,
            pool,
            local: proxy::LocalPods::default(),
            same_node_fast_path: config.hbone.same_node_fast_path,
        });
        let capture = capture::Capture::new(loaded, config.node.clone(), cgroup_root, inputs);
        tokio::spawn(discovery::file::watch(
            config.state_file.clone(),
            Duration::from_millis(config.state_poll_interval_ms),
            state_bytes,
            store.clone(),
            metrics.clone(),
        ));
        let capture_task = tokio::spawn(capture::run(
            capture,
            store,
            readiness,
            Duration::from_secs(2),
            stop_rx,
        ));
        info!(node = %config.node, state = %config.state_file.display(), "agent started");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
        let _ = stop_tx.send(true);
        if let Err(e) = capture_task.await {
            warn!(error = %e, "capture task ended abnormally");
        }
        info!("agent stopped");
        anyhow::Ok(())
    })
}
