//! `cargo xtask lab ...`: a persistent lab for manual work (the library is `mesh_lab`).
//!
//! The lab runs debug builds: `up` and `upgrade` build mesh-agent and mesh-labtool first (see
//! [`build::lab_bins`]), as does `exec` when the command is `mesh-agent` or `mesh-labtool`.

use std::{
    path::PathBuf,
    process::{ExitCode, ExitStatus},
};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mesh_lab::{Lab, LabOptions, Topology};

use crate::{
    build::{self, Profile},
    preflight,
};

/// Arguments of `cargo xtask lab`.
#[derive(clap::Args, Debug)]
pub struct LabArgs {
    /// Lab id (network namespaces are named `mlab-<id>-...`).
    #[arg(long, global = true, default_value = "dev")]
    id: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand, Debug)]
enum LabCommand {
    /// Build a persistent lab and start one agent per node; prints its status when ready.
    Up {
        /// Topology file (default: the embedded tests/topologies/default.yaml).
        #[arg(long)]
        topology: Option<PathBuf>,
        /// Only the network and cgroups, no agents.
        #[arg(long)]
        no_agents: bool,
        /// The Kubernetes mode: KMock's API emulator (installed when missing) holds the lab's
        /// namespaces, pods and services, and the agents learn the mesh from it
        /// (docs/lab.md); `lab label` changes a namespace's labels there.
        #[arg(long)]
        kube: bool,
    },
    /// In a lab up with --kube: set a label on a namespace in the API with kubectl
    /// (`lab label legacy mesh-agent/enabled=true` meshes legacy, live; `KEY-` removes it).
    Label {
        /// The namespace.
        namespace: String,
        /// `KEY=VALUE`, or `KEY-` to remove the label.
        label: String,
    },
    /// In a lab up with --kube: run kubectl against the lab's API emulator (from n1, with the
    /// lab's kubeconfig), e.g. `lab kubectl -- get namespaces --show-labels`.
    Kubectl {
        /// kubectl's arguments (after `--`).
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Run a command in a pod (`<ns>/<pod>`: its netns and cgroup) or on a node (`<node>`).
    /// `mesh-labtool` and `mesh-agent` name the workspace's debug builds (built first).
    Exec {
        /// `<ns>/<pod>` or `<node>`.
        target: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Upgrade a node's agent as a rollout does: a new agent takes the listening sockets over
    /// from the running one (nothing is refused), which drains its connections and exits.
    /// With no agent running (after a crash), simply starts one.
    Upgrade {
        /// The node.
        node: String,
        /// The new agent binary (default: the workspace's debug build, built first).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Return once the new agent serves the node, without waiting for the old one to exit.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show nodes (agent pid, readiness), pods, namespaces and services.
    Status,
    /// Tear the lab down and sweep the leftovers of dead labs.
    Down,
}

/// Runs a lab subcommand; `exec` exits with its command's code.
pub fn run(args: LabArgs) -> Result<ExitCode> {
    let done = match args.command {
        LabCommand::Up {
            topology,
            no_agents,
            kube,
        } => up(&args.id, topology, no_agents, kube),
        LabCommand::Label { namespace, label } => set_label(&args.id, &namespace, &label),
        LabCommand::Kubectl { args: kubectl } => return run_kubectl(&args.id, &kubectl),
        LabCommand::Exec { target, command } => return exec(&args.id, &target, &command),
        LabCommand::Upgrade {
            node,
            binary,
            no_wait,
        } => upgrade(&args.id, &node, binary.as_deref(), no_wait),
        LabCommand::Status => status(&attach(&args.id)?),
        LabCommand::Down => down(&args.id),
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// The running lab `id`, or an error that says how to start one.
fn attach(id: &str) -> Result<Lab> {
    let flag = if id == "dev" {
        String::new()
    } else {
        format!(" --id {id}")
    };
    Lab::attach(id)
        .with_context(|| format!("cannot use lab {id} (`cargo xtask lab up{flag}` brings it up)"))
}

fn up(id: &str, topology: Option<PathBuf>, no_agents: bool, kube: bool) -> Result<()> {
    let topology = match topology {
        Some(path) => Topology::load(&path)?,
        None => Topology::default(),
    };
    preflight::ensure("cargo xtask lab up", &[preflight::LAB])?;
    build::lab_bins(Profile::Debug, true)?;
    let kube = if kube {
        preflight::ensure(
            "cargo xtask lab up --kube",
            &[preflight::MANIFESTS, preflight::KUBE_LAB],
        )?;
        Some(crate::kmock::ensure()?)
    } else {
        None
    };
    let lab = Lab::try_up(LabOptions {
        id: Some(id.to_owned()),
        topology,
        agents: !no_agents,
        persistent: true,
        kube,
        ..LabOptions::default()
    })?;
    println!(
        "lab {} is up (run dir {})",
        lab.id(),
        lab.run_dir().display()
    );
    status(&lab)
}

fn exec(id: &str, target: &str, command: &[String]) -> Result<ExitCode> {
    let lab = attach(id)?;
    let Some((program, args)) = command.split_first() else {
        bail!("no command given after --")
    };
    let program = match program.as_str() {
        "mesh-labtool" => build::lab_bins(Profile::Debug, true)?.labtool,
        "mesh-agent" => build::lab_bins(Profile::Debug, true)?.agent,
        _ => PathBuf::from(program),
    };
    let shown = program.display();
    let status = lab
        .try_command(target, &program)?
        .args(args)
        .status()
        .with_context(|| format!("cannot run {shown} in {target} of lab {id}"))?;
    Ok(ExitCode::from(exit_code(status)))
}

fn set_label(id: &str, namespace: &str, label: &str) -> Result<()> {
    let lab = kube_lab(id)?;
    let (key, value) = match (label.split_once('='), label.strip_suffix('-')) {
        (Some((key, value)), _) => (key, Some(value)),
        (None, Some(key)) => (key, None),
        (None, None) => bail!("{label:?} is neither KEY=VALUE nor KEY-"),
    };
    lab.label_namespace(namespace, key, value)?;
    match value {
        Some(value) => println!("namespace {namespace} labelled {key}={value} in the lab's API"),
        None => println!("label {key} removed from namespace {namespace} in the lab's API"),
    }
    Ok(())
}

/// The running lab `id`, which must be in the Kubernetes mode.
fn kube_lab(id: &str) -> Result<Lab> {
    let lab = attach(id)?;
    if !lab.is_kube() {
        bail!("lab {id} has no Kubernetes API: bring it up with `cargo xtask lab up --kube`");
    }
    Ok(lab)
}

fn run_kubectl(id: &str, args: &[String]) -> Result<ExitCode> {
    let lab = kube_lab(id)?;
    let status = lab
        .kubectl()?
        .args(args)
        .status()
        .context("running kubectl in n1")?;
    Ok(ExitCode::from(exit_code(status)))
}

fn upgrade(id: &str, node: &str, binary: Option<&std::path::Path>, no_wait: bool) -> Result<()> {
    let mut lab = attach(id)?;
    let binary = match binary {
        Some(path) if !path.is_file() => bail!("--binary {} does not exist", path.display()),
        Some(path) => path.to_path_buf(),
        None => build::lab_bins(Profile::Debug, true)?.agent,
    };
    let up = lab.upgrade_agent(node, Some(&binary))?;
    match up.old {
        None => println!(
            "no agent was running on {node}: started agent {} (it adopted the pinned capture) in {:.0?}",
            up.new, up.took_over
        ),
        Some(old) => {
            println!(
                "agent {} took over from agent {old} on {node} in {:.0?}; agent {old} was sent \
                 SIGTERM and drains its connections",
                up.new, up.took_over
            );
            if !no_wait {
                let started = std::time::Instant::now();
                // The agent's drain deadline (lifecycle.drain_timeout_secs) bounds this.
                if lab.wait_agent_exit(old, std::time::Duration::from_secs(24 * 3600)) {
                    println!(
                        "agent {old} exited {:.1?} later (its connections ended)",
                        started.elapsed()
                    );
                }
            }
        }
    }
    Ok(())
}

/// The shell convention: the exit code, or 128 + the signal that ended the process.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(1)
}

fn status(lab: &Lab) -> Result<()> {
    println!("lab {}", lab.id());
    println!("nodes:");
    for node in lab.nodes() {
        let pid = lab
            .agent_pid(&node.name)
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        let ready = if lab.agent_ready(&node.name) {
            "yes"
        } else {
            "no"
        };
        println!(
            "  {:<10} underlay {:<12} netns {:<24} agent pid {pid:<8} ready {ready}",
            node.name, node.underlay_ip, node.netns_name
        );
    }
    println!("pods:");
    for pod in lab.pods() {
        println!(
            "  {:<22} node {:<6} ip {:<12} netns {}",
            pod.full_name(),
            pod.node,
            pod.ip,
            pod.netns_name
        );
    }
    println!("namespaces:");
    if lab.is_kube() {
        // From the API: `lab label` and kubectl change them there.
        let list = lab.kube_get("/api/v1/namespaces")?;
        for ns in list["items"].as_array().into_iter().flatten() {
            let name = ns["metadata"]["name"].as_str().unwrap_or("?");
            let labels: Vec<String> = ns["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                .collect();
            let labels = if labels.is_empty() {
                "(no labels)".to_owned()
            } else {
                labels.join(",")
            };
            println!("  {name:<10} {labels}");
        }
    } else {
        // From the live state file: tests and people may have flipped them.
        let state = lab.try_read_state()?;
        for ns in state["namespaces"].as_sequence().into_iter().flatten() {
            let name = ns["name"].as_str().unwrap_or("?");
            let enabled = ns["enabled"].as_bool().unwrap_or(false);
            println!(
                "  {name:<10} {}",
                if enabled { "enabled" } else { "disabled" }
            );
        }
    }
    println!("services:");
    for svc in &lab.topology().services {
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|p| format!("{}->{}", p.port, p.target_port))
            .collect();
        println!(
            "  {:<22} vip {:<14} ports {}",
            format!("{}/{}", svc.namespace, svc.name),
            svc.vip,
            ports.join(",")
        );
    }
    let waypoints = lab.waypoints();
    if !waypoints.is_empty() {
        println!("waypoints:");
        for w in waypoints {
            println!(
                "  {:<22} in {:<18} pid {:<8} log {}",
                w.waypoint,
                w.pod,
                w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                w.log.display()
            );
        }
    }
    if lab.is_kube() {
        println!(
            "Kubernetes API (KMock's emulator): {} from the nodes; \
             `cargo xtask lab kubectl -- get pods -A -o {}`",
            lab.kube_url(),
            crate::demo::POD_COLUMNS
        );
    } else {
        println!("state file: {}", lab.state_path().display());
    }
    Ok(())
}

fn down(id: &str) -> Result<()> {
    let mut removed = match Lab::attach(id) {
        Ok(lab) => lab.try_down()?,
        Err(e) => {
            println!("{e:#}");
            Vec::new()
        }
    };
    removed.extend(mesh_lab::sweep()?);
    if removed.is_empty() {
        println!("nothing to remove");
    }
    for item in removed {
        println!("removed {item}");
    }
    Ok(())
}
