//! `mesh-agent node`: the node agent's life, from start (taking over from a running agent, or
//! adopting what an earlier one pinned) to its end (drained, handed over, or uninstalled).
//!
//! Capture is pinned and outlives the process: no exit of the agent (SIGTERM, a crash, an
//! OOM kill) stops it, and while no agent serves a captured pod its connections are refused.
//! Only a release (the pod leaves the state) or `--uninstall` stops capture.
//!
//! - SIGTERM (a rollout, a node drain): the agent keeps serving and waits for a successor to
//!   take over; it exits once it has no connection left, or at the drain deadline. A second
//!   SIGTERM or SIGINT exits at once.
//! - A successor took over (the handover socket): the agent stops accepting at once, keeps its
//!   established connections until they end or the drain deadline passes, and exits once it
//!   has also been told to stop (SIGTERM): a DaemonSet's old pod exits when it is deleted, so
//!   its container is not restarted into a second takeover.
//! - Connections still open when the agent exits are reset, never ended cleanly.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{error, info, warn};

use crate::{
    admin, capture, cni, config, discovery, handover, identity, metrics, pods, preflight, proxy,
    state, sys, tunnel,
};

/// How long a stopping agent waits with no proxied connection or stream before it closes its
/// inbound HBONE connections and exits (new connections may still arrive after SIGTERM when
/// no successor has taken over).
const IDLE_BEFORE_CLOSING: Duration = Duration::from_secs(1);

/// How long a new agent may take to serve every pod before it gives the node back to the
/// agent it was taking over from.
const TAKEOVER_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `mesh-agent node --uninstall`: releases every pod of this node and removes the pins, through
/// the running agent if there is one.
pub fn uninstall(config_path: &Path) -> anyhow::Result<()> {
    let config = config::Config::load(config_path)?;
    let socket = config.handover_socket();
    if let Some(done) = handover::uninstall(&socket)? {
        info!(
            agent = done.agent,
            released = done.released,
            "uninstalled by the running agent, which now drains and exits"
        );
        println!(
            "uninstalled: the running agent (pid {}) released {} and removed its pins; it exits \
             once its connections end",
            done.agent,
            pods(done.released)
        );
        anyhow::ensure!(
            done.failed.is_empty(),
            "some could not be released: {}",
            done.failed.join("; ")
        );
        return Ok(());
    }
    let bpf_dir = config.bpf_dir();
    preflight::check(&bpf_dir)?;
    let released = capture::uninstall_pins(&bpf_dir)?;
    println!(
        "uninstalled: no agent was running; released {} and removed the pins under {}",
        pods(released),
        bpf_dir.display()
    );
    Ok(())
}

/// `1 pod`, `2 pods`.
fn pods(n: usize) -> String {
    format!("{n} pod{}", if n == 1 { "" } else { "s" })
}

/// Runs the agent until it has handed over and drained, or drained after SIGTERM.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
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
    let (snapshot, state_bytes, rejected_policies) = match config.discovery {
        config::DiscoverySource::File => {
            discovery::file::load(&config.state_file, &config.policy.root_namespace)?
        }
        // Filled by the watchers; capture waits for their first full lists.
        config::DiscoverySource::Kube => (
            state::Snapshot::with_root_namespace(&config.policy.root_namespace),
            Vec::new(),
            Vec::new(),
        ),
    };
    let id = &config.identity;
    let issuer = identity::Issuer::load(&id.issuer_cert, &id.issuer_key)?
        .with_trust_domain(&id.trust_domain)?;
    let bundle = identity::TrustBundle::load(&id.trust_bundle)?.bind_unnamed(&id.trust_domain);
    // Before anything is bound: the running agent's sockets are ours to share from here.
    let socket_path = config.handover_socket();
    let takeover = handover::take(&socket_path)?;
    let (runtime, shape) = crate::runtime::build()?;
    tracing::info!("data path: {shape}");
    let start = Start {
        config,
        bpf_dir,
        cgroup_root,
        home,
        snapshot,
        state_bytes,
        rejected_policies,
        issuer,
        bundle,
        takeover,
        socket_path,
    };
    let code = runtime.block_on(serve(start))?;
    // Blocking threads (the handover listener) must not hold the process.
    runtime.shutdown_timeout(Duration::from_millis(100));
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// Everything `run` prepares before the runtime starts.
struct Start {
    config: config::Config,
    bpf_dir: std::path::PathBuf,
    cgroup_root: std::path::PathBuf,
    home: sys::Netns,
    snapshot: state::Snapshot,
    state_bytes: Vec<u8>,
    rejected_policies: Vec<discovery::policies::Rejection>,
    issuer: identity::Issuer,
    bundle: identity::TrustBundle,
    takeover: Option<handover::Takeover>,
    socket_path: std::path::PathBuf,
}

async fn serve(s: Start) -> anyhow::Result<i32> {
    let Start {
        config,
        bpf_dir,
        cgroup_root,
        home,
        snapshot,
        state_bytes,
        rejected_policies,
        issuer,
        bundle,
        mut takeover,
        socket_path,
    } = s;
    let metrics = Arc::new(metrics::Metrics::new());
    let store = Arc::new(state::Store::new());
    store.replace(snapshot);
    discovery::policies::report(&rejected_policies, &metrics);
    let readiness = Arc::new(admin::Readiness::new("starting: pods not yet served"));
    // The HTTP endpoints: the running agent's sockets when it handed them over.
    let (stop_admin, admin_stopped) = watch::channel(false);
    let mut received_admin = takeover
        .as_mut()
        .map(|t| std::mem::take(&mut t.admin))
        .unwrap_or_default();
    let mut endpoints = Vec::new();
    let inspector = admin::Inspector::default();
    let mut wanted = vec![("metrics", config.metrics_addr)];
    if config.readiness_addr != config.metrics_addr {
        wanted.push(("readiness", config.readiness_addr));
    }
    wanted.push((admin::ADMIN, config.admin_addr));
    for (what, addr) in wanted {
        let listener = match received_admin
            .iter()
            .position(|(w, l)| w == what && same_listener(l, addr, &home))
        {
            Some(i) => received_admin.swap_remove(i).1,
            None => admin::bind(addr, what)?,
        };
        endpoints.push(admin::serve(
            listener,
            what,
            metrics.clone(),
            readiness.clone(),
            inspector.clone(),
            admin_stopped.clone(),
        )?);
    }
    drop(received_admin);

    let layout = capture::pins::Layout::new(&bpf_dir);
    layout.prepare(&bpf_dir)?;
    let (loaded, orig_dst, collector) = capture::ebpf::load(&layout, &config.capture)?;
    metrics.register_collector(collector);
    let certs = identity::CertManager::new(
        issuer,
        bundle,
        Duration::from_secs(config.identity.leaf_lifetime_secs),
        identity::expiry_family(&metrics),
    );
    let (stop_rotation, rotation_stopped) = watch::channel(false);
    tokio::spawn(certs.clone().run_rotation(rotation_stopped));
    let pool = hbone_pool(&config, &metrics);
    let (drain, _) = watch::channel(proxy::Drain::Serving);
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
        preserve_client_address: config.delivery.preserve_client_address,
        hbone_server: config
            .hbone
            .server
            .options(config.hbone.max_connection_age()),
        limits: proxy::limits::Limits::new(&config.hbone.server, &metrics),
        tasks: tokio_util::task::TaskTracker::new(),
        hbone: tokio_util::task::TaskTracker::new(),
        drain,
        connections: Default::default(),
    });
    tokio::spawn(proxy::telemetry::prune(store.clone(), metrics.clone()));
    let received = takeover
        .as_mut()
        .map(|t| std::mem::take(&mut t.pods))
        .unwrap_or_default();
    let kubelet_root = match &config.pods.kubelet_cgroup_root {
        Some(dir) => pods::sandbox::cgroup2_dir(dir),
        None => cgroup_root.clone(),
    };
    // The host's hierarchy mounted elsewhere (a DaemonSet's /host/sys/fs/cgroup, while the
    // agent's own mount is its container's cgroup namespace): pod cgroups live there.
    let cgroup_root = if kubelet_root.starts_with(&cgroup_root) {
        cgroup_root
    } else {
        kubelet_root.clone()
    };
    if let Some(path) = &config.identity.workload_socket {
        let listener = crate::workload_api::bind(path)
            .with_context(|| format!("binding the workload API socket {}", path.display()))?;
        let requests = crate::workload_api::Requests::default();
        metrics.register(
            "mesh_workload_certificates",
            "Requests of the workload API (a waypoint fetching its certificate), by result (issued, refused)",
            requests.clone(),
        );
        tokio::spawn(crate::workload_api::serve(
            listener,
            crate::workload_api::Context {
                store: store.clone(),
                certs: inputs.certs.clone(),
                node: config.node.clone(),
                cgroup2: cgroup_root.clone(),
                kubelet_root: kubelet_root.clone(),
                requests,
            },
        ));
        info!(socket = %path.display(), "serving the workload API");
    }
    let sandboxes = pods::sandbox::Sandboxes::new(kubelet_root, config.pods.netns_dirs.clone());
    let cni_dir = config
        .pods
        .cni_socket
        .as_ref()
        .and_then(|s| s.parent())
        .map(|d| d.to_owned());
    if let Some(dir) = &cni_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the CNI socket's directory {}", dir.display()))?;
    }
    let mut pods = pods::Manager::new(
        loaded,
        layout,
        inputs.clone(),
        received,
        pods::NodeSetup {
            name: config.node.clone(),
            cgroup_root,
            sandboxes,
            cni_dir,
        },
    )?;
    let synced = match config.discovery {
        config::DiscoverySource::File => {
            tokio::spawn(discovery::file::watch(
                config.state_file.clone(),
                Duration::from_millis(config.state_poll_interval_ms),
                state_bytes,
                store.clone(),
                metrics.clone(),
            ));
            None
        }
        config::DiscoverySource::Kube => {
            let client = discovery::kube::client(&config.kube).await?;
            let rules = discovery::kube::Rules::from(&config.kube);
            let running = discovery::kube::run(
                client,
                &config.node,
                rules.clone(),
                store.clone(),
                metrics.clone(),
            );
            // A pod the CNI plugin adds has no address in the API yet: the manager takes it
            // from this node's pods, with the plugin's addresses.
            pods.set_node_pods(Arc::new(discovery::kube::NodePodsStore {
                pods: running.node_pods,
                rules,
            }));
            Some(running.synced)
        }
    };
    let (commands, command_rx) = mpsc::channel(4);
    let _ = inspector.set(Arc::new(crate::inspect::Node::new(
        &config,
        inputs.clone(),
        commands.clone(),
        readiness.clone(),
    )));
    let reconcile = pods::run(
        pods,
        store,
        readiness.clone(),
        Duration::from_secs(2),
        command_rx,
    );
    match synced {
        None => {
            tokio::spawn(reconcile);
        }
        // Capture reconciles against a complete state only: on a partial one it would release
        // the pinned pods the watchers have not delivered yet. Not ready until then.
        Some(mut synced) => {
            readiness.set(Some(
                "starting: waiting for the first full lists of the Kubernetes API".into(),
            ));
            tokio::spawn(async move {
                if synced.wait_for(|s| *s).await.is_ok() {
                    reconcile.await;
                }
            });
        }
    }

    if let Some(takeover) = takeover {
        let giver = takeover.giver;
        let taker = |result| {
            metrics
                .handover
                .handovers
                .get_or_create(&metrics::HandoverLabels {
                    role: "taker",
                    result,
                })
                .inc();
        };
        if tokio::time::timeout(TAKEOVER_READY_TIMEOUT, readiness.wait_ready())
            .await
            .is_err()
        {
            let why = readiness.get().unwrap_or_default();
            tokio::task::spawn_blocking(move || takeover.abort(&why)).await?;
            taker("aborted");
            error!(
                giver,
                "could not serve every pod in time: the running agent keeps the node"
            );
            relinquish(&commands).await;
            let _ = stop_admin.send(true);
            drain_and_exit(&inputs, config.drain_timeout(), "takeover abandoned").await;
            anyhow::bail!(
                "taking over from agent {giver} failed: not every pod could be served within \
                 {TAKEOVER_READY_TIMEOUT:?} ({}); that agent carries on",
                readiness.get().unwrap_or_default()
            );
        }
        match tokio::task::spawn_blocking(move || takeover.complete()).await? {
            Ok(()) => {
                taker("ok");
                info!(
                    giver,
                    "took over: the previous agent no longer accepts connections"
                );
            }
            // The giver died on the way: this agent is the only one, and serves every pod.
            Err(e) if !sys::process_alive(giver) => {
                taker("ok");
                warn!(giver, error = %e, "the previous agent ended during the takeover: this agent carries on alone");
            }
            Err(e) => {
                taker("error");
                error!(giver, error = %e, "the takeover could not be confirmed: leaving the node to the running agent");
                relinquish(&commands).await;
                let _ = stop_admin.send(true);
                drain_and_exit(&inputs, config.drain_timeout(), "takeover unconfirmed").await;
                return Err(anyhow::Error::new(e).context(format!(
                    "taking over from agent {giver} could not be confirmed; that agent carries on"
                )));
            }
        }
    }

    // The CNI plugin asks this agent from now on (after a takeover: not before, so that an
    // abandoned takeover leaves the socket to the agent that keeps the node).
    if let Some(path) = &config.pods.cni_socket {
        let listener = cni::server::bind(path)
            .with_context(|| format!("binding the CNI socket {}", path.display()))?;
        let requests = cni::server::Requests::default();
        metrics.register(
            "mesh_cni_requests",
            "Requests of the CNI plugin, by command (add, del, check) and answer (captured, not_meshed, released, failed)",
            requests.clone(),
        );
        tokio::spawn(cni::server::serve(listener, commands.clone(), requests));
        info!(socket = %path.display(), "serving the CNI plugin");
        if let Some(dir) = &config.pods.cni_conf_dir {
            let repairs = prometheus_client::metrics::counter::Counter::default();
            metrics.register(
                "mesh_cni_conflist_repairs",
                "Times the CNI plugin was put back into the node's conflist",
                repairs.clone(),
            );
            tokio::spawn(cni::install::keep_listed(
                dir.clone(),
                path.clone(),
                Duration::from_secs(2),
                repairs,
            ));
        }
    }
    let (events_tx, mut events) = mpsc::unbounded_channel();
    handover::Giver::bind(&socket_path)?.spawn(
        commands.clone(),
        endpoints,
        events_tx,
        metrics.clone(),
    )?;
    info!(node = %config.node, state = %config.state_file.display(), handover = %socket_path.display(), "agent started");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let drain = config.drain_timeout();
    let mut terminated = false;
    let mut deadline: Option<Instant> = None;
    let mut handed_over = false;
    let mut events_open = true;
    loop {
        let idle = async {
            if !(terminated || handed_over) {
                std::future::pending::<()>().await;
            }
            inputs.tasks.close();
            // No proxied connection or stream for a moment (not just between two of them):
            // then the inbound HBONE connections are told to close, and end once the streams
            // their clients opened before that are done.
            loop {
                inputs.tasks.wait().await;
                tokio::time::sleep(IDLE_BEFORE_CLOSING).await;
                if inputs.tasks.is_empty() {
                    break;
                }
            }
            info!(
                hbone_connections = inputs.hbone.len(),
                "no proxied connection left: closing the inbound HBONE connections"
            );
            inputs.drain_to(proxy::Drain::Closing);
            inputs.hbone.close();
            inputs.hbone.wait().await;
        };
        let timeout = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            name = stop_signal(&mut term, &mut int) => {
                if terminated {
                    warn!("second signal ({name}): exiting now");
                    break;
                }
                terminated = true;
                deadline.get_or_insert(Instant::now() + drain);
                // HBONE clients move their next streams to new connections: pooled idle
                // connections end, and this agent gets to no connection sooner.
                inputs.drain_to(proxy::Drain::Draining);
                if handed_over {
                    info!(open = inputs.tasks.len(), "{name}: exiting once the connections have ended (or at the drain deadline)");
                } else {
                    info!(drain = ?drain, open = inputs.tasks.len(), "{name}: capture stays in place; serving until a successor takes over, the connections end or the drain deadline; a second signal exits at once");
                }
            }
            event = events.recv(), if events_open => match event {
                Some(handover::Event::HandedOver { to }) => {
                    handed_over = true;
                    let _ = stop_admin.send(true);
                    inputs.drain_to(proxy::Drain::Draining);
                    deadline = Some(Instant::now() + drain);
                    info!(successor = to, open = inputs.tasks.len(), drain = ?drain, "draining: established connections continue until they end or the deadline");
                }
                Some(handover::Event::Uninstalled) => {
                    // Nothing is captured any more: this agent has no reason to stay.
                    handed_over = true;
                    terminated = true;
                    let _ = stop_admin.send(true);
                    inputs.drain_to(proxy::Drain::Draining);
                    deadline = Some(Instant::now() + drain);
                    info!(open = inputs.tasks.len(), "uninstalled: draining, then exiting");
                }
                // The handover thread is done (it handed over, or uninstalled): without this,
                // a closed channel would wake the loop at once, again and again.
                None => events_open = false,
            },
            () = idle => {
                if terminated {
                    info!("no connection left: exiting");
                    break;
                }
                // Handed over and drained, not yet told to stop: wait for SIGTERM.
                info!("drained: every connection has ended; waiting for SIGTERM to exit");
                let name = stop_signal(&mut term, &mut int).await;
                info!("{name}: exiting");
                break;
            }
            () = timeout => {
                let open = inputs.tasks.len();
                if open > 0 {
                    let reset = sys::fdpass::reset_all_tcp_sockets();
                    warn!(open, sockets = reset, "drain deadline passed: open connections are reset");
                }
                if terminated {
                    break;
                }
                deadline = None;
                // The reset sockets end their tasks; then wait for SIGTERM as above.
            }
        }
    }
    let _ = stop_rotation.send(true);
    let open = inputs.tasks.len();
    if open > 0 {
        let reset = sys::fdpass::reset_all_tcp_sockets();
        warn!(
            open,
            sockets = reset,
            "exiting with open connections: they are reset"
        );
    }
    info!("agent stopped (capture stays in place)");
    Ok(0)
}

/// The next SIGTERM or SIGINT, by name (the agent treats them alike).
async fn stop_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Stops accepting without touching capture (a takeover that did not complete).
async fn relinquish(commands: &mpsc::Sender<pods::Command>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if commands.send(pods::Command::Relinquish(tx)).await.is_ok() {
        let _ = rx.await;
    }
}

/// Waits for the connections this agent holds to end (at most `drain`), resets the rest.
async fn drain_and_exit(inputs: &proxy::Inputs, drain: Duration, why: &str) {
    inputs.drain_to(proxy::Drain::Draining);
    inputs.tasks.close();
    if tokio::time::timeout(drain, inputs.tasks.wait())
        .await
        .is_err()
    {
        let reset = sys::fdpass::reset_all_tcp_sockets();
        warn!(
            why,
            open = inputs.tasks.len(),
            sockets = reset,
            "drain deadline passed: open connections are reset"
        );
    }
}

/// Whether a received listener is bound where this agent wants it, in its own namespace.
fn same_listener(l: &std::net::TcpListener, addr: std::net::SocketAddr, home: &sys::Netns) -> bool {
    use std::os::fd::AsFd as _;
    let here = sys::netns_cookie_of(home, home).ok();
    let there = sys::netns_cookie(l.as_fd()).ok();
    l.local_addr().is_ok_and(|a| a == addr) && here.is_some() && here == there
}

fn hbone_pool(config: &config::Config, metrics: &metrics::Metrics) -> Arc<tunnel::client::Pool> {
    let pool_metrics = tunnel::client::PoolMetrics::registered(metrics);
    let pool_config = tunnel::client::PoolConfig {
        max_conns: config.hbone.connections_per_peer,
        max_age: config.hbone.max_connection_age(),
        ..tunnel::client::PoolConfig::default()
    };
    tunnel::client::Pool::new(pool_config, pool_metrics)
}
