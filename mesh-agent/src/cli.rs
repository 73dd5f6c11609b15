//! The command line of `mesh-agent` (src/main.rs only calls [`main`]): `mesh-agent node
//! --config FILE` runs the node agent; `mesh-agent check` proves the node can run it;
//! installed as `mesh-agent-cni`, the binary is the CNI plugin.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{cni, crds, identity, node, policy, preflight};

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
enum CniCommand {
    /// Copy this binary into the CNI bin directory as `mesh-agent-cni` and add the plugin at
    /// the end of the node's first conflist (idempotent).
    Install {
        /// The host's CNI plugin directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The host's CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The agent's CNI socket, as the plugin (on the host) reaches it.
        #[arg(long, default_value = cni::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Remove the plugin from every conflist and its binary (an uninstall).
    Uninstall {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent (docs/operations.md: restarts, upgrades, uninstall).
    Node {
        /// The agent configuration (docs/formats.md).
        #[arg(long, env = "MESH_CONFIG")]
        config: PathBuf,
        /// Instead of running: release every pod of this node and remove the pinned capture
        /// (through the running agent, which then drains and exits; or directly when none
        /// runs). The only way besides releasing pods one by one that capture stops.
        #[arg(long)]
        uninstall: bool,
    },
    /// The chained CNI plugin: without a subcommand, run as the container runtime runs it
    /// (`CNI_*` environment, configuration on stdin; docs/kubernetes.md). Installed on a node
    /// as `mesh-agent-cni`, the binary runs as the plugin under that name.
    Cni {
        #[command(subcommand)]
        command: Option<CniCommand>,
    },
    /// Run a waypoint: a namespace's L7 proxy, as a pod of its own (docs/waypoint.md).
    Waypoint {
        /// The waypoint configuration (docs/waypoint.md, "Configuration").
        #[arg(long, env = "MESH_WAYPOINT_CONFIG")]
        config: PathBuf,
    },
    /// Certificate authority tools: a root CA, node intermediates.
    #[command(subcommand)]
    Ca(identity::cli::CaCommand),
    /// The workload API's client: a waypoint's pod fetches its own certificate from its node's
    /// agent (docs/identity.md).
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// Authorization policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print the CustomResourceDefinitions the mesh needs where they are missing (Istio's
    /// AuthorizationPolicy, for clusters without Istio), generated from the agent's own types.
    /// deploy/crds/ holds the output.
    Crds,
    /// Ask this node's agent what it is doing: workloads, services, policies, certificates,
    /// connections, eBPF; one pod; why a connection would be allowed or not; or check the
    /// node before trusting it (docs/metrics.md, "mesh-agent inspect").
    Inspect(crate::inspect::cli::Args),
    /// Check that this machine and these privileges can run the agent: load every eBPF
    /// program and map into the running kernel and use each kernel feature the data path
    /// relies on (in scratch pins, a temporary cgroup and a private network namespace, removed
    /// after; a running agent is not touched). One line per check; exits non-zero if any fails.
    Check {
        /// The pin directory that would be used.
        #[arg(long, default_value = "/sys/fs/bpf/mesh")]
        bpf_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum WorkloadCommand {
    /// Fetch this pod's certificate and write <OUT>/cert-chain.pem (leaf, then chain),
    /// <OUT>/key.pem (mode 0600) and <OUT>/root-cert.pem (the trust bundle).
    Fetch {
        /// The agent's workload API socket (`identity.workload_socket`).
        #[arg(long, default_value = "/run/mesh-agent/workload/workload.sock")]
        socket: PathBuf,
        /// Directory for the files (created, mode 0700, if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Check the policies of a state file as the agent applies them (invalid ones, L7
    /// warnings) and, with --to and --port, decide one connection and name the deciding policy.
    Check(policy::cli::CheckArgs),
}

/// The process's allocator, as the binary chose it (`#[global_allocator]` is the binary's:
/// src/main.rs), for the start-up log of the agent and the waypoint.
#[derive(Clone, Debug)]
pub struct Allocator {
    /// Which one, with its version.
    pub name: String,
    /// The options it runs with, as written (built in, then from the environment).
    pub options: String,
    /// Whether freed memory goes back to the system while the process makes no allocation
    /// (jemalloc's background thread); without it, the RSS of an agent that went idle after a
    /// burst of connections stays at the burst's high-water mark.
    pub returns_idle_memory: bool,
}

impl Allocator {
    fn log(&self) {
        if self.returns_idle_memory {
            tracing::info!(allocator = %self.name, options = %self.options, "allocator");
        } else {
            tracing::warn!(
                allocator = %self.name,
                options = %self.options,
                "allocator: freed memory goes back to the system only when the allocator is \
                 next busy, so the RSS can stay at the high-water mark of a burst (build with \
                 the default `jemalloc` feature, with background_thread:true)"
            );
        }
    }
}

/// Runs the command line of this process, whose allocator is `allocator`.
pub fn main(allocator: Allocator) -> anyhow::Result<()> {
    // Installed as `mesh-agent-cni`, the runtime runs the binary as its CNI plugin.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == cni::PLUGIN_TYPE)
    {
        cni_plugin();
    }
    let (filter, spec) = match tracing_subscriber::EnvFilter::try_from_env("MESH_LOG") {
        Ok(filter) => (filter, std::env::var("MESH_LOG").unwrap_or_default()),
        Err(_) => (
            tracing_subscriber::EnvFilter::new("info"),
            "info".to_owned(),
        ),
    };
    use std::io::IsTerminal as _;
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // The filter stays changeable (the admin endpoint's /logging).
    match std::env::var("MESH_LOG_FORMAT").as_deref() {
        Ok("text") | Err(std::env::VarError::NotPresent) => {
            let log = log
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter_reloading();
            let handle = log.reload_handle();
            log.init();
            crate::logging::install(spec, move |f| handle.reload(f).map_err(|e| e.to_string()));
        }
        // One object per line: timestamp, level, target, the event's fields, and the spans it
        // is in with theirs (a connection's addresses, identities, decision).
        Ok("json") => {
            let log = log.json().with_filter_reloading();
            let handle = log.reload_handle();
            log.init();
            crate::logging::install(spec, move |f| handle.reload(f).map_err(|e| e.to_string()));
        }
        Ok(other) => anyhow::bail!(
            "MESH_LOG_FORMAT={other:?} is not a log format: text (the default) or json"
        ),
        Err(e) => anyhow::bail!("MESH_LOG_FORMAT: {e}"),
    }
    match Cli::parse().command {
        Command::Node {
            config,
            uninstall: false,
        } => {
            allocator.log();
            node::run(&config)
        }
        Command::Node {
            config,
            uninstall: true,
        } => node::uninstall(&config),
        Command::Waypoint { config } => {
            allocator.log();
            crate::waypoint::runtime::run(&config)
        }
        Command::Cni { command: None } => cni_plugin(),
        Command::Cni {
            command:
                Some(CniCommand::Install {
                    bin_dir,
                    conf_dir,
                    socket,
                }),
        } => {
            let exe = std::env::current_exe()?;
            let list = cni::install::install(&exe, &bin_dir, &conf_dir, &socket)?;
            println!(
                "installed {} and added it to {}",
                bin_dir.join(cni::PLUGIN_TYPE).display(),
                list.display()
            );
            Ok(())
        }
        Command::Cni {
            command: Some(CniCommand::Uninstall { bin_dir, conf_dir }),
        } => {
            let changed = cni::install::uninstall(&bin_dir, &conf_dir)?;
            println!(
                "removed {} and the plugin from {} conflist(s)",
                bin_dir.join(cni::PLUGIN_TYPE).display(),
                changed.len()
            );
            Ok(())
        }
        Command::Ca(cmd) => Ok(identity::cli::run(cmd)?),
        Command::Workload(WorkloadCommand::Fetch { socket, out }) => {
            let cert = crate::workload_api::fetch(&socket)?;
            write_certificate(&cert, &out)?;
            println!(
                "{}: certificate written to {} (renew after {})",
                cert.identity,
                out.display(),
                cert.renew_at
            );
            Ok(())
        }
        Command::Policy(PolicyCommand::Check(args)) => {
            print!("{}", policy::cli::check(&args)?);
            Ok(())
        }
        Command::Inspect(args) => {
            print!("{}", crate::inspect::cli::run(&args)?);
            Ok(())
        }
        Command::Crds => {
            print!("{}", crds::yaml()?);
            Ok(())
        }
        Command::Check { bpf_dir } => {
            let report = preflight::run(&bpf_dir, crate::capture::ebpf::object());
            print!("{report}");
            let failed = report.failures().count();
            anyhow::ensure!(
                failed == 0,
                "{failed} of {} checks failed: this node cannot run the agent's data path as it is",
                report.checks.len()
            );
            // A check that could not run here (the cgroup links in a pod whose cgroup v2
            // mount is read-only) is not proven: the summary says so, not "all passed".
            let skipped = report
                .checks
                .iter()
                .filter(|c| matches!(c.outcome, preflight::Outcome::Skipped(_)))
                .count();
            if skipped == 0 {
                println!("all {} checks passed", report.checks.len());
            } else {
                println!(
                    "{} checks passed, {skipped} not proven here (skip, above): run `mesh-agent \
                     check` where they can run, on the host",
                    report.checks.len() - skipped
                );
            }
            Ok(())
        }
    }
}

/// Writes a fetched certificate as three PEM files in `dir` (the key owner-only).
fn write_certificate(
    cert: &crate::workload_api::Certificate,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use std::{
        io::Write as _,
        os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let write = |name: &str, text: &str, mode: u32| -> anyhow::Result<()> {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    };
    write("key.pem", &cert.private_key, 0o600)?;
    write("cert-chain.pem", &cert.certificate_chain, 0o644)?;
    write("root-cert.pem", &cert.trust_bundle, 0o644)?;
    Ok(())
}

/// Runs the CNI plugin on this process's environment and stdin, and exits with its status.
fn cni_plugin() -> ! {
    use std::io::{Read as _, Write as _};
    let env = std::env::vars().collect();
    let mut stdin = Vec::new();
    let _ = std::io::stdin()
        .take(cni::MAX_MESSAGE as u64 * 16)
        .read_to_end(&mut stdin);
    let out = cni::plugin::run(&env, &stdin);
    if let Some(log) = &out.log {
        eprintln!("{log}");
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(out.code)
}
