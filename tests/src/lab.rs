//! A lab: nodes and pods as network namespaces, cgroups, one agent per node.

mod agent;
mod cni;
pub mod kube;
mod layout;
mod net;
mod state;
mod sys;
mod teardown;
pub mod topology;
pub(crate) mod waypoint;

use std::{
    ffi::OsStr,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

pub use self::{
    agent::agent_bin,
    cni::CniRun,
    layout::{Node, Pod, METRICS_PORT, READINESS_PORT},
    sys::cgroup2_mount,
    teardown::sweep,
};
use self::{
    agent::AgentProcess,
    layout::{check_id, Layout, RUN_ROOT},
    topology::{CaptureExclusions, Topology},
};

/// A waypoint the lab runs.
#[derive(Debug, Clone)]
pub struct WaypointProcess {
    /// `namespace/name` of the waypoint (its service).
    pub waypoint: String,
    /// `namespace/pod` it runs in.
    pub pod: String,
    /// Its process, while it runs.
    pub pid: Option<u32>,
    /// Its log.
    pub log: PathBuf,
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Lab id (1-12 lowercase letters and digits); a random one when `None`.
    pub id: Option<String>,
    /// Nodes, namespaces, pods and services.
    pub topology: Topology,
    /// Start one agent per node (and wait until they are ready).
    pub agents: bool,
    /// Keep the lab when the [`Lab`] is dropped or its owner process exits (owner 0).
    pub persistent: bool,
    /// Capture exclusions written into every agent's config.
    pub global_capture: CaptureExclusions,
    /// How long the agents get to become ready.
    pub ready_timeout: Duration,
    /// Lifetime of workload certificates (the agents renew them at half-life).
    pub leaf_lifetime_secs: u64,
    /// The agents' `hbone.same_node_fast_path`: `false` tunnels same-node traffic through
    /// HBONE too.
    pub same_node_fast_path: bool,
    /// The agents' `lifecycle.drain_timeout_secs`: how long an agent that handed over (or was
    /// told to stop) keeps its established connections.
    pub drain_timeout_secs: u64,
    /// The agents' `hbone.server` settings (limits, idle timeout, PINGs) that differ from the
    /// agent's defaults.
    pub hbone_server: std::collections::BTreeMap<String, u64>,
    /// The Kubernetes mode (docs/lab.md), with KMock's Python: the agents learn the mesh from
    /// an API emulator served in n1, every pod is laid out as the kubelet lays pods out.
    pub kube: Option<PathBuf>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            id: None,
            topology: Topology::default(),
            agents: true,
            persistent: false,
            global_capture: CaptureExclusions::default(),
            ready_timeout: Duration::from_secs(30),
            leaf_lifetime_secs: 24 * 3600,
            same_node_fast_path: true,
            drain_timeout_secs: 300,
            hbone_server: std::collections::BTreeMap::new(),
            kube: None,
        }
    }
}

/// What [`Lab::upgrade_agent`] did.
#[derive(Debug, Clone, Copy)]
pub struct Upgrade {
    /// The agent that was running, told to stop once the new one took over.
    pub old: Option<u32>,
    /// The new agent.
    pub new: u32,
    /// From the start of the upgrade until the new agent served the node.
    pub took_over: Duration,
}

/// A running lab. Torn down by [`Lab::down`], or on drop unless persistent or attached.
#[derive(Debug)]
pub struct Lab {
    layout: Layout,
    topology: Topology,
    agents: Vec<AgentProcess>,
    /// Tear down on drop.
    owned: bool,
    torn_down: bool,
}

impl Lab {
    /// Builds a lab; panics with the reason if it cannot (after removing what it created).
    pub fn up(opts: LabOptions) -> Lab {
        match Lab::try_up(opts) {
            Ok(lab) => lab,
            Err(e) => panic!("could not bring the lab up: {e:#}"),
        }
    }

    /// Builds a lab: sweeps leftovers of dead labs, creates cgroups, namespaces and links, writes
    /// the state and agent configs, and starts the agents. On error, removes what it created.
    pub fn try_up(opts: LabOptions) -> Result<Lab> {
        opts.topology.validate().context("invalid topology")?;
        let cgroup2 = sys::cgroup2_mount()?;
        if let Err(e) = sweep() {
            eprintln!("mesh-lab: warning: {e:#}");
        }
        let id = match opts.id.clone() {
            Some(id) => {
                check_id(&id)?;
                id
            }
            None => sys::random_id()?,
        };
        // In the Kubernetes mode the API names pods by UID: every pod is kubelet-style.
        let mut topology = opts.topology.clone();
        if opts.kube.is_some() {
            for p in &mut topology.pods {
                p.kubelet.get_or_insert(topology::CgroupDriver::Cgroupfs);
            }
        }
        let layout = Layout::new(&id, &topology, &cgroup2);
        // The sweep of another test process removes RUN_ROOT once it holds no lab, possibly
        // between these two steps: then make it again.
        let mut tries = 0;
        let created = loop {
            sys::create_dirs(Path::new(RUN_ROOT))?;
            match std::fs::create_dir(&layout.run_dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 5 => tries += 1,
                other => break other,
            }
        };
        match created {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "lab {id} already exists ({} is there): take it down first with \
                 `cargo xtask lab down --id {id}`",
                layout.run_dir.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", layout.run_dir.display()))
            }
        }
        let owner = if opts.persistent {
            0
        } else {
            std::process::id()
        };
        let mut lab = Lab {
            layout,
            topology,
            agents: Vec::new(),
            owned: !opts.persistent,
            torn_down: false,
        };
        let built = sys::write_atomic(
            &lab.layout.run_dir.join("owner"),
            format!("{owner}\n").as_bytes(),
        )
        .and_then(|()| lab.build(&opts));
        match built {
            Ok(()) => Ok(lab),
            Err(e) => {
                if let Err(t) = lab.teardown() {
                    eprintln!("mesh-lab: cleaning up after the failed start also failed: {t:#}");
                }
                Err(e.context(format!("bringing up lab {id}")))
            }
        }
    }

    fn build(&mut self, opts: &LabOptions) -> Result<()> {
        let layout = &self.layout;
        let topology_yaml =
            serde_yaml::to_string(&self.topology).context("serialising the topology")?;
        sys::write_atomic(
            &layout.run_dir.join("topology.yaml"),
            topology_yaml.as_bytes(),
        )?;
        let cgroups = layout
            .pods
            .iter()
            .map(|p| &p.process_cgroup)
            .chain(layout.nodes.iter().map(|n| &n.agent_cgroup));
        for dir in cgroups {
            sys::create_dirs(dir).context("creating a cgroup")?;
        }
        net::build(layout)?;
        let state = state::state_yaml(layout, &self.topology)?;
        sys::write_atomic(layout.state_path(), state.as_bytes())?;
        for node in &layout.nodes {
            let config = state::agent_config_yaml(
                layout,
                &node.name,
                &opts.global_capture,
                opts.leaf_lifetime_secs,
                opts.same_node_fast_path,
                opts.drain_timeout_secs,
                &opts.hbone_server,
            )?;
            sys::write_atomic(&layout.agent_config_path(&node.name), config.as_bytes())?;
            // The node's CNI configuration, as `mesh-agent cni install` leaves it.
            sys::create_dirs(&layout.cni_conf_dir(&node.name))
                .context("creating a CNI configuration directory")?;
            let conflist = serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "lab-pod-network",
                "plugins": [
                    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                    {"type": "mesh-agent-cni", "socket": layout.cni_socket(&node.name)},
                ],
            });
            sys::write_atomic(
                &layout.cni_conf_dir(&node.name).join(cni::CONFLIST),
                conflist.to_string().as_bytes(),
            )?;
        }
        if !opts.agents {
            return Ok(());
        }
        agent::make_ca(layout)?;
        sys::ensure_bpffs()?;
        if let Some(python) = &opts.kube {
            kube::start_api(layout, python)?;
            self.publish()?;
            let layout = &self.layout;
            let kubeconfig = self.kubeconfig_path();
            sys::write_atomic(&kubeconfig, kube::kubeconfig(&self.kube_url()).as_bytes())?;
            for node in &layout.nodes {
                let path = layout.agent_config_path(&node.name);
                let config = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let config = kube::kube_agent_config(&config, &kubeconfig)?;
                sys::write_atomic(&path, config.as_bytes())?;
            }
        }
        let layout = &self.layout;
        for node in &layout.nodes {
            sys::create_dirs(&node.bpf_dir).context("creating a bpffs directory")?;
            self.agents
                .push(agent::start(layout, node, 1, &agent::agent_bin())?);
        }
        let deadline = Instant::now() + opts.ready_timeout;
        for (node, agent) in layout.nodes.iter().zip(self.agents.iter_mut()) {
            agent::wait_started(layout, node, agent, deadline)?;
        }
        // In the Kubernetes mode the pods start now (as a kubelet starts them), and waypoints
        // learn the mesh from the API (which listens on n1's underlay address: pods reach it).
        let kubeconfig = opts.kube.is_some().then(|| self.kubeconfig_path());
        if opts.kube.is_some() {
            self.run_pods()?;
        }
        for (ns, pod, name) in waypoint::pods(&self.topology) {
            let left = deadline.saturating_duration_since(Instant::now());
            waypoint::start(
                &self.layout,
                waypoint::Start {
                    ns: &ns,
                    pod: &pod,
                    name: &name,
                    bin: &agent::agent_bin(),
                    kubeconfig: kubeconfig.as_deref(),
                },
                left.max(Duration::from_secs(20)),
            )?;
        }
        Ok(())
    }

    /// Reopens an existing lab from its run dir (`/run/mesh-lab/<id>`). The returned value does
    /// not tear the lab down on drop; call [`Lab::down`] or [`Lab::try_down`] for that.
    pub fn attach(id: &str) -> Result<Lab> {
        check_id(id)?;
        let run_dir = Path::new(RUN_ROOT).join(id);
        if !run_dir.is_dir() {
            bail!("no lab {id}: {} does not exist", run_dir.display());
        }
        let topology = Topology::load(&run_dir.join("topology.yaml"))
            .with_context(|| format!("reopening lab {id}"))?;
        let layout = Layout::new(id, &topology, &sys::cgroup2_mount()?);
        let agents = teardown::recorded_agents(&layout.run_dir);
        Ok(Lab {
            layout,
            topology,
            agents,
            owned: false,
            torn_down: false,
        })
    }

    /// The lab id.
    pub fn id(&self) -> &str {
        &self.layout.id
    }

    /// The topology the lab was built from.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The run directory, `/run/mesh-lab/<id>`.
    pub fn run_dir(&self) -> &Path {
        &self.layout.run_dir
    }

    /// The lab's cgroup directory, `<cgroup2 mount>/mesh-lab/<id>` (pods and agents below it).
    pub fn cgroup_dir(&self) -> &Path {
        &self.layout.cgroup_dir
    }

    /// The lab's bpffs directory, `/sys/fs/bpf/mesh-lab/<id>` (one subdirectory per agent).
    pub fn bpf_dir(&self) -> &Path {
        &self.layout.bpf_dir
    }

    /// All nodes, in topology order.
    pub fn nodes(&self) -> &[Node] {
        &self.layout.nodes
    }

    /// All pods, in topology order.
    pub fn pods(&self) -> &[Pod] {
        &self.layout.pods
    }

    /// The pod `namespace/name`; panics if there is none.
    pub fn pod(&self, name: &str) -> &Pod {
        self.find_pod(name).unwrap_or_else(|| {
            let known: Vec<String> = self.layout.pods.iter().map(Pod::full_name).collect();
            panic!(
                "lab {} has no pod {name:?} (pods: {})",
                self.id(),
                known.join(", ")
            )
        })
    }

    fn find_pod(&self, name: &str) -> Option<&Pod> {
        let (ns, pod) = name.split_once('/')?;
        self.layout
            .pods
            .iter()
            .find(|p| p.namespace == ns && p.name == pod)
    }

    /// The node `name`; panics if there is none.
    pub fn node(&self, name: &str) -> &Node {
        self.find_node(name).unwrap_or_else(|| {
            let known: Vec<&str> = self.layout.nodes.iter().map(|n| n.name.as_str()).collect();
            panic!(
                "lab {} has no node {name:?} (nodes: {})",
                self.id(),
                known.join(", ")
            )
        })
    }

    fn find_node(&self, name: &str) -> Option<&Node> {
        self.layout.nodes.iter().find(|n| n.name == name)
    }

    /// The waypoints this lab runs (the topology's `waypoints`, in the pods their services
    /// select).
    pub fn waypoints(&self) -> Vec<WaypointProcess> {
        waypoint::pods(&self.topology)
            .into_iter()
            .map(|(ns, pod, name)| WaypointProcess {
                waypoint: format!("{ns}/{name}"),
                pod: format!("{ns}/{pod}"),
                pid: std::fs::read_to_string(
                    self.layout.run_dir.join(format!("waypoint-{ns}-{pod}.pid")),
                )
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .filter(|p| sys::process_alive(*p)),
                log: waypoint::log_path(&self.layout, &ns, &pod),
            })
            .collect()
    }

    /// The VIP of service `namespace/name`; panics if there is none.
    pub fn service_vip(&self, name: &str) -> Ipv4Addr {
        self.topology
            .services
            .iter()
            .find(|s| name.split_once('/') == Some((s.namespace.as_str(), s.name.as_str())))
            .map(|s| s.vip)
            .unwrap_or_else(|| panic!("lab {} has no service {name:?}", self.id()))
    }

    /// A command that runs `program` in a pod (`"ns/pod"`: its cgroup and network namespace) or
    /// on a node (`"n1"`: its network namespace only). Add arguments, then spawn it. Panics if the
    /// target is unknown or its namespace cannot be opened.
    pub fn command(&self, target: &str, program: impl AsRef<OsStr>) -> Command {
        match self.try_command(target, program) {
            Ok(cmd) => cmd,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Like [`Lab::command`], returning an error instead of panicking.
    pub fn try_command(&self, target: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        let enter = if target.contains('/') {
            let pod = self
                .find_pod(target)
                .ok_or_else(|| anyhow!("lab {} has no pod {target:?}", self.id()))?;
            sys::Enter {
                cgroup: Some(&pod.process_cgroup),
                netns: Some(&pod.netns),
                setsid: false,
            }
        } else {
            let node = self
                .find_node(target)
                .ok_or_else(|| anyhow!("lab {} has no node {target:?}", self.id()))?;
            sys::Enter {
                cgroup: None,
                netns: Some(&node.netns),
                setsid: false,
            }
        };
        sys::enter(&mut cmd, enter).with_context(|| format!("preparing a command in {target}"))?;
        Ok(cmd)
    }

    /// The mesh state file, `/run/mesh-lab/<id>/state.yaml`.
    pub fn state_path(&self) -> &Path {
        self.layout.state_path()
    }

    /// The Unix socket on which `node`'s agent answers the CNI plugin.
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.layout.cni_socket(node)
    }

    /// The workload API socket of `node`'s agent (`mesh-agent workload fetch --socket`).
    pub fn workload_socket(&self, node: &str) -> PathBuf {
        self.layout.workload_socket(node)
    }

    /// The CNI configuration directory of `node` (the agent keeps the plugin in its conflist).
    pub fn cni_conf_dir(&self, node: &str) -> PathBuf {
        self.layout.cni_conf_dir(node)
    }

    /// The configuration file of `node`'s agent (`mesh-agent node --config <this>`).
    pub fn agent_config_path(&self, node: &str) -> PathBuf {
        self.layout.agent_config_path(node)
    }

    /// `GET <path>` on 127.0.0.1:<port> inside node `node`'s netns; returns status and body.
    pub fn http_get(&self, node: &str, port: u16, path: &str) -> Result<(u16, String)> {
        let node = self
            .find_node(node)
            .ok_or_else(|| anyhow!("lab {} has no node {node:?}", self.id()))?;
        agent::http_get(&node.netns, port, path)
    }

    /// The agent's Prometheus metrics (`GET /metrics` on port 15020); panics on failure.
    pub fn metrics(&self, node: &str) -> String {
        match self.http_get(node, METRICS_PORT, "/metrics") {
            Ok((200, body)) => body,
            Ok((status, body)) => panic!("metrics of node {node}: HTTP {status}: {body}"),
            Err(e) => panic!("metrics of node {node}: {e:#}"),
        }
    }

    /// The value of metric sample `name` with `labels` in `node`'s metrics (summed over the
    /// other labels); 0 when its family is exposed but has no such sample yet. Panics naming
    /// the metric when no family exposes it, so that a renamed metric fails `== 0` checks
    /// instead of passing them (see [`crate::exposed_value`]). Gauges work the same way.
    pub fn metric(&self, node: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        crate::exposed_value(&self.metrics(node), name, labels)
            .unwrap_or_else(|e| panic!("metrics of node {node}: {e}"))
    }

    /// True if the agent of `node` answers its readiness probe with 200.
    pub fn agent_ready(&self, node: &str) -> bool {
        matches!(
            self.http_get(node, READINESS_PORT, "/healthz/ready"),
            Ok((200, _))
        )
    }

    /// The logs so far of every agent `node` has had, in the order they were started (empty
    /// if there is none).
    pub fn agent_log(&self, node: &str) -> String {
        let mut all = String::new();
        for generation in 1.. {
            match std::fs::read_to_string(self.layout.agent_log_path_of(node, generation)) {
                Ok(text) => all.push_str(&text),
                Err(_) => break,
            }
        }
        all
    }

    /// The log so far of agent `pid` (one of this lab's).
    pub fn agent_log_of(&self, pid: u32) -> String {
        self.agents
            .iter()
            .find(|a| a.pid == pid)
            .and_then(|a| {
                std::fs::read_to_string(self.layout.agent_log_path_of(&a.node, a.generation)).ok()
            })
            .unwrap_or_default()
    }

    /// The pid of `node`'s current agent (the last one started), if one was started.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents
            .iter()
            .rev()
            .find(|a| a.node == node)
            .map(|a| a.pid)
    }

    /// Whether agent `pid` (one of this lab's) still runs.
    pub fn agent_running(&mut self, pid: u32) -> bool {
        self.agents
            .iter_mut()
            .find(|a| a.pid == pid)
            .is_some_and(AgentProcess::running)
    }

    /// Sends `signal` to `node`'s current agent and returns its pid; after SIGKILL, returns
    /// once the process is gone (so that what follows sees no agent). Panics on failure.
    pub fn signal_agent(&mut self, node: &str, signal: libc::c_int) -> u32 {
        let pid = self
            .agent_pid(node)
            .unwrap_or_else(|| panic!("no agent was started for node {node}"));
        if let Err(e) = sys::kill(pid, signal) {
            panic!("signal {signal} to the agent of {node} (pid {pid}): {e}");
        }
        if signal == libc::SIGKILL && !self.wait_agent_exit(pid, Duration::from_secs(10)) {
            panic!("agent {pid} of {node} still runs 10 s after SIGKILL");
        }
        pid
    }

    /// Waits until agent `pid` has exited (and reaps it if it is our child); false if it
    /// still runs after `timeout`.
    pub fn wait_agent_exit(&mut self, pid: u32, timeout: Duration) -> bool {
        let Some(agent) = self.agents.iter_mut().find(|a| a.pid == pid) else {
            return !sys::process_alive(pid);
        };
        sys::poll_until(timeout, || !agent.running())
    }

    /// What agents need before they start, for a lab brought up without them
    /// (`LabOptions::agents: false`, e.g. to start them with another configuration): the CA
    /// and node intermediates, and the nodes' bpffs directories.
    pub fn prepare_agents(&self) -> Result<()> {
        agent::make_ca(&self.layout)?;
        sys::ensure_bpffs()?;
        for node in &self.layout.nodes {
            sys::create_dirs(&node.bpf_dir).context("creating a bpffs directory")?;
        }
        Ok(())
    }

    /// Starts a new agent for `node` from the lab's agent binary: after a crash it adopts the
    /// pinned capture; with an agent running it takes over from it. Returns once the new agent
    /// has started and the node is ready.
    pub fn start_agent(&mut self, node: &str) -> Result<u32> {
        self.start_agent_from(node, &agent::agent_bin())
    }

    fn start_agent_from(&mut self, node: &str, bin: &Path) -> Result<u32> {
        let node = self
            .find_node(node)
            .ok_or_else(|| anyhow!("lab {} has no node {node:?}", self.id()))?
            .clone();
        let generation = self
            .agents
            .iter()
            .filter(|a| a.node == node.name)
            .map(|a| a.generation)
            .max()
            .unwrap_or(0)
            + 1;
        let mut agent = agent::start(&self.layout, &node, generation, bin)?;
        let started = agent::wait_started(
            &self.layout,
            &node,
            &mut agent,
            Instant::now() + Duration::from_secs(60),
        );
        let pid = agent.pid;
        self.agents.push(agent);
        started.map(|()| pid)
    }

    /// Upgrades `node`'s agent as a DaemonSet rollout does: a new agent (from `bin`, by
    /// default the lab's agent binary; a copy is run, so rebuilding never touches a running
    /// binary) takes over from the running one, which is then told to stop (SIGTERM, as when
    /// Kubernetes deletes the old pod) and exits once its connections have ended. With no
    /// agent running (after a crash), the new one simply starts. Returns once the new agent
    /// serves the node; [`Lab::wait_agent_exit`] waits for the old one.
    pub fn upgrade_agent(&mut self, node: &str, bin: Option<&Path>) -> Result<Upgrade> {
        let started = Instant::now();
        let old = self.agent_pid(node).filter(|pid| self.agent_running(*pid));
        let source = bin.map_or_else(agent::agent_bin, Path::to_path_buf);
        let dir = self.layout.bin_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let copy = dir.join(format!(
            "{}-{node}.{}",
            agent::AGENT_PROGRAM,
            self.agents.len() + 1
        ));
        std::fs::copy(&source, &copy)
            .with_context(|| format!("copying {} to {}", source.display(), copy.display()))?;
        let new = self.start_agent_from(node, &copy)?;
        let took_over = started.elapsed();
        if let Some(old) = old {
            sys::kill(old, libc::SIGTERM)
                .with_context(|| format!("SIGTERM to the old agent {old} of {node}"))?;
        }
        Ok(Upgrade {
            old,
            new,
            took_over,
        })
    }

    /// Tears the lab down; panics if something could not be removed.
    pub fn down(mut self) {
        if let Err(e) = self.teardown() {
            panic!("{e:#}");
        }
    }

    /// Tears the lab down; returns what was removed.
    pub fn try_down(mut self) -> Result<Vec<String>> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<Vec<String>> {
        if self.torn_down {
            return Ok(Vec::new());
        }
        self.torn_down = true;
        teardown::teardown(&self.layout.id, &mut self.agents)
    }
}

/// Where a failing test's lab logs are kept (`target/lab-failures` by default).
pub const FAILURES_DIR_ENV: &str = "MESH_LAB_FAILURES_DIR";

impl Lab {
    /// Copies the lab's logs (agents', waypoints', the API emulator's) to
    /// `target/lab-failures/<test>-<lab>/` (or under [`FAILURES_DIR_ENV`]) before a failing
    /// test's teardown removes them, and says where: what a failure in CI is diagnosed from.
    fn keep_logs(&self) {
        let test = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .replace("::", "-");
        let dir = std::env::var_os(FAILURES_DIR_ENV).map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lab-failures"),
            PathBuf::from,
        );
        let dest = dir.join(format!("{test}-{}", self.layout.id));
        let Ok(entries) = std::fs::read_dir(&self.layout.run_dir) else {
            return;
        };
        if std::fs::create_dir_all(&dest).is_err() {
            return;
        }
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let _ = std::fs::copy(&path, dest.join(entry.file_name()));
            }
        }
        eprintln!("mesh-lab: the lab's logs are kept in {}", dest.display());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.owned || self.torn_down {
            return;
        }
        if std::thread::panicking() {
            self.keep_logs();
        }
        if let Err(e) = self.teardown() {
            if std::thread::panicking() {
                eprintln!("mesh-lab: {e:#}");
            } else {
                panic!("{e:#}");
            }
        }
    }
}
