//! `mesh-agent waypoint`: the process. It fetches its certificate from its node's agent (the
//! workload API) and renews it, follows the mesh state and the HTTPRoutes, and serves HBONE on
//! port 15008: each CONNECT stream names a service port of the waypoint's namespace; its first
//! bytes say whether it is HTTP/1.1, HTTP/2 or something else, which is proxied at L4.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use bytes::BytesMut;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{io::AsyncReadExt as _, sync::watch};
use tracing::{debug, error, info, warn, Instrument as _};

use super::{
    config::Config,
    io::{H2Io, Rewind},
    proxy::{self, Downstream, Waypoint},
    sniff::{self, Sniffed},
    table, telemetry,
    upstream::{Upstream, Version},
};
use crate::{
    admin, discovery,
    identity::{Leaf, SpiffeId, TrustBundle},
    state::{Protocol, Store},
    tunnel,
    workload_api::{self, Certificate},
};

/// Runs the waypoint until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let (runtime, shape) = crate::runtime::build()?;
    tracing::info!("data path: {shape}");
    runtime.block_on(serve(config))
}

/// The certificate and trust bundle in force, shared by the TLS configurations.
struct Identity {
    leaf: Arc<ArcSwap<Leaf>>,
    bundle: Arc<ArcSwap<TrustBundle>>,
    server: ArcSwap<rustls::ServerConfig>,
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(crate::metrics::Metrics::without_node_families());
    let readiness = Arc::new(admin::Readiness::new("starting: no certificate yet"));
    let (_stop_admin, admin_stopped) = watch::channel(false);
    let mut wanted = vec![("metrics", config.metrics_addr)];
    if config.readiness_addr != config.metrics_addr {
        wanted.push(("readiness", config.readiness_addr));
    }
    let mut endpoints = Vec::new();
    for (what, addr) in wanted {
        endpoints.push(admin::serve(
            admin::bind(addr, what)?,
            what,
            metrics.clone(),
            readiness.clone(),
            admin::Inspector::default(),
            admin_stopped.clone(),
        )?);
    }

    // The state: services, endpoints, workloads, policies; the routes from the same source.
    let store = Arc::new(Store::new());
    let mut kube_routes = None;
    let state_bytes = match config.discovery {
        crate::config::DiscoverySource::File => {
            let (snapshot, bytes, rejected) =
                discovery::file::load(&config.state_file, &config.policy.root_namespace)?;
            store.replace(snapshot);
            discovery::policies::report(&rejected, &metrics);
            tokio::spawn(discovery::file::watch(
                config.state_file.clone(),
                Duration::from_millis(config.state_poll_interval_ms),
                bytes.clone(),
                store.clone(),
                metrics.clone(),
            ));
            bytes
        }
        crate::config::DiscoverySource::Kube => {
            // The mesh's watchers, as the node agent runs them but without a node's pods;
            // not ready until every one of them has listed.
            store.replace(crate::state::Snapshot::with_root_namespace(
                &config.policy.root_namespace,
            ));
            let client = discovery::kube::client(&config.kube).await?;
            let running = discovery::kube::run_mesh(
                client.clone(),
                discovery::kube::Rules::from(&config.kube),
                store.clone(),
                metrics.clone(),
            );
            readiness.set(Some(
                "waiting for the first full lists of the Kubernetes API".into(),
            ));
            let mut synced = running.synced.clone();
            let _ = synced.wait_for(|s| *s).await;
            kube_routes = Some((client, running));
            Vec::new()
        }
    };

    // Its identity, from its node's agent.
    let socket = config.identity.workload_socket.clone();
    let first = fetch_until_issued(&socket, &readiness).await;
    let identity = Arc::new(identity_from(&first, &config)?);
    info!(
        identity = %identity.leaf.load().id,
        not_after = first.not_after,
        "waypoint certificate fetched"
    );
    tokio::spawn(renew(
        socket,
        first.renew_at,
        identity.clone(),
        config.clone(),
    ));

    let waypoint_metrics = telemetry::Metrics::new(&metrics);
    let pool = tunnel::client::Pool::new(
        tunnel::client::PoolConfig::default(),
        pool_metrics(&metrics),
    );
    let upstream = Upstream::new(
        pool,
        identity.leaf.clone(),
        identity.bundle.clone(),
        Duration::from_millis(config.http.connect_timeout_ms),
    );
    let wp = Arc::new(Waypoint::new(
        config.namespace.clone(),
        config.name.clone(),
        config.identity.trust_domain.clone(),
        store.clone(),
        upstream,
        waypoint_metrics,
        config.http.clone(),
    ));
    let mut routes = table::Settled::default();
    if let Some((client, running)) = kube_routes {
        follow_kube_routes(client, running, &wp, &config, &readiness).await;
    } else {
        reload_routes(&wp, &mut routes, &state_bytes);
        tokio::spawn(watch_routes(
            wp.clone(),
            routes,
            config.state_file.clone(),
            Duration::from_millis(config.state_poll_interval_ms),
            state_bytes,
        ));
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} for HBONE", config.listen))?;
    readiness.set(None);
    info!(
        namespace = %config.namespace,
        name = %config.name,
        listen = %config.listen,
        "waypoint serving"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    warn!(error = %e, "accepting an HBONE connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (wp, identity, store) = (wp.clone(), identity.clone(), store.clone());
        tokio::spawn(
            serve_connection(tcp, wp, identity, store).instrument(tracing::info_span!(
                "hbone",
                src = %remote
            )),
        );
    }
    info!("waypoint stopping");
    drop(endpoints);
    Ok(())
}

/// Fetches the certificate, again and again until the agent issues it (the agent may not know
/// the pod yet); not ready meanwhile, saying why.
async fn fetch_until_issued(socket: &Path, readiness: &admin::Readiness) -> Certificate {
    let mut wait = Duration::from_millis(200);
    loop {
        let path = socket.to_owned();
        match tokio::task::spawn_blocking(move || workload_api::fetch(&path)).await {
            Ok(Ok(cert)) => return cert,
            Ok(Err(e)) => {
                warn!(error = %e, retry_in = ?wait, "no certificate yet");
                readiness.set(Some(format!("no certificate: {e}")));
            }
            Err(e) => error!(error = %e, "the certificate fetch failed"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// The identity of an answer, checked: a SPIFFE id of the waypoint's namespace and trust
/// domain (the agent issues what the pod's service account says; a waypoint of another
/// namespace's pods would serve that namespace's traffic with the wrong identity).
fn identity_from(cert: &Certificate, config: &Config) -> anyhow::Result<Identity> {
    let leaf = Leaf::from_pem(
        &cert.certificate_chain,
        &cert.private_key,
        "the workload API's certificate",
    )?;
    check_identity(&leaf.id, config)?;
    let bundle = TrustBundle::from_pem(&cert.trust_bundle, "the workload API's trust bundle")?
        .bind_unnamed(&config.identity.trust_domain);
    let leaf = Arc::new(ArcSwap::from_pointee(leaf));
    let server = tunnel::tls::server_config(
        bundle.clone(),
        config.identity.trust_domain.clone(),
        leaf.clone(),
    )?;
    Ok(Identity {
        leaf,
        bundle: Arc::new(ArcSwap::from_pointee(bundle)),
        server: ArcSwap::new(server),
    })
}

fn check_identity(id: &SpiffeId, config: &Config) -> anyhow::Result<()> {
    if id.namespace != config.namespace || id.trust_domain != config.identity.trust_domain {
        anyhow::bail!(
            "the agent issued {id}, which is not an identity of namespace {} in trust domain {}: \
             is this pod the waypoint of that namespace?",
            config.namespace,
            config.identity.trust_domain
        );
    }
    Ok(())
}

/// Renews the certificate half-way through its life; a failure is retried every few seconds
/// (the old certificate serves meanwhile, until it expires).
async fn renew(
    socket: std::path::PathBuf,
    mut renew_at: u64,
    identity: Arc<Identity>,
    config: Config,
) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        tokio::time::sleep(Duration::from_secs(renew_at.saturating_sub(now))).await;
        let path = socket.clone();
        let fetched = tokio::task::spawn_blocking(move || workload_api::fetch(&path)).await;
        let cert = match fetched {
            Ok(Ok(cert)) => cert,
            Ok(Err(e)) => {
                warn!(error = %e, "renewing the certificate failed; retrying in 5 s");
                renew_at = now + 5;
                continue;
            }
            Err(e) => {
                error!(error = %e, "renewing the certificate failed; retrying in 5 s");
                renew_at = now + 5;
                continue;
            }
        };
        match identity_from(&cert, &config) {
            Ok(fresh) => {
                identity.leaf.store(fresh.leaf.load_full());
                identity.bundle.store(fresh.bundle.load_full());
                // The server configuration holds the bundle: rebuilt with the new one.
                if let Ok(server) = tunnel::tls::server_config(
                    (**identity.bundle.load()).clone(),
                    config.identity.trust_domain.clone(),
                    identity.leaf.clone(),
                ) {
                    identity.server.store(server);
                }
                info!(not_after = cert.not_after, "waypoint certificate renewed");
                renew_at = cert.renew_at;
            }
            Err(e) => {
                error!(error = %e, "the renewed certificate is unusable; retrying in 5 s");
                renew_at = now + 5;
            }
        }
    }
}

fn pool_metrics(metrics: &crate::metrics::Metrics) -> tunnel::client::PoolMetrics {
    let m = tunnel::client::PoolMetrics::default();
    metrics.register(
        "mesh_hbone_connections_opened",
        "HBONE connections opened to endpoints (TLS handshakes)",
        m.connections_opened.clone(),
    );
    metrics.register(
        "mesh_hbone_connections",
        "HBONE connections to endpoints in the pool",
        m.connections.clone(),
    );
    metrics.register(
        "mesh_hbone_streams_opened",
        "HBONE CONNECT streams opened to endpoints",
        m.streams_opened.clone(),
    );
    metrics.register(
        "mesh_hbone_streams_retried",
        "HBONE CONNECT streams a draining peer refused unprocessed, opened again",
        m.streams_retried.clone(),
    );
    m
}

/// Applies the routes of a state file's text: the table changes, rejections are logged.
fn reload_routes(wp: &Waypoint, settled: &mut table::Settled, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let parsed = match table::parse_file(&text, &wp.namespace) {
        Ok(parsed) => parsed,
        Err(e) => {
            error!(error = %e, "routes unreadable; keeping the routes in force");
            return;
        }
    };
    install_routes(&wp.routes, &wp.metrics, settled, parsed);
}

/// The HTTPRoutes of the API (`discovery: kube`): the namespace's routes through the same
/// conversion and [`install_routes`], their status written by the watcher; returns once the
/// first list is in force (not ready meanwhile).
async fn follow_kube_routes(
    client: kube::Client,
    running: discovery::kube::Running,
    wp: &Arc<Waypoint>,
    config: &Config,
    readiness: &admin::Readiness,
) {
    let mut settled = table::Settled::default();
    let sink = wp.clone();
    let mut synced = discovery::kube::run_routes(
        client,
        discovery::kube::Waypoint {
            namespace: config.namespace.clone(),
            name: config.name.clone(),
        },
        wp.store.clone(),
        &running,
        move |parsed| install_routes(&sink.routes, &sink.metrics, &mut settled, parsed),
    );
    readiness.set(Some(
        "waiting for the first list of HTTPRoutes from the Kubernetes API".into(),
    ));
    let _ = synced.wait_for(|s| *s).await;
}

/// Applies one complete list of converted routes (each judged on its own, the last good version
/// kept): the table in force changes, rejections are logged and counted
/// (`mesh_waypoint_routes_rejected_total`), `mesh_waypoint_routes` is the number in force.
pub fn install_routes(
    routes: &ArcSwap<table::Table>,
    metrics: &telemetry::Metrics,
    settled: &mut table::Settled,
    parsed: Vec<Result<super::httproute::HttpRoute, super::httproute::Rejected>>,
) {
    for r in settled.apply(parsed) {
        let kept = if r.kept { "true" } else { "false" };
        if r.kept {
            error!(error = %r.error, "HTTPRoute rejected; its last good version keeps serving");
        } else {
            error!(error = %r.error, "HTTPRoute rejected");
        }
        metrics
            .routes_rejected
            .get_or_create(&telemetry::RejectedLabels {
                route: r.error.route.clone(),
                kept,
            })
            .inc();
    }
    let table = settled.table();
    metrics
        .routes
        .set(i64::try_from(table.len()).unwrap_or(i64::MAX));
    info!(routes = table.len(), "routes in force");
    routes.store(Arc::new(table));
}

async fn watch_routes(
    wp: Arc<Waypoint>,
    mut settled: table::Settled,
    path: std::path::PathBuf,
    interval: Duration,
    mut last: Vec<u8>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || std::fs::read(path)).await
        };
        let Ok(Ok(bytes)) = read else { continue };
        if bytes != last {
            reload_routes(&wp, &mut settled, &bytes);
            last = bytes;
        }
    }
}

/// One HBONE connection from a node proxy (or another waypoint).
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    wp: Arc<Waypoint>,
    identity: Arc<Identity>,
    store: Arc<Store>,
) {
    let server = identity.server.load_full();
    let handler = {
        let wp = wp.clone();
        move |req: tunnel::server::Request| {
            let wp = wp.clone();
            let span = tracing::info_span!("stream", identity = %req.peer, authority = tracing::field::Empty);
            async move { stream(wp, req).await }.instrument(span)
        }
    };
    let admit = {
        let identity = identity.clone();
        move |chain| async move {
            let bundle = identity.bundle.load_full();
            crate::proxy::inbound::admit_chain(&store, &bundle, chain).await
        }
    };
    let result = tunnel::server::serve(
        tcp,
        server,
        handler,
        std::future::pending::<()>(),
        tunnel::server::Options::with_max_age(Duration::from_secs(3600)),
        std::future::ready(()),
        admit,
    )
    .await;
    if let Err(e) = result {
        warn!(error = %e, "HBONE connection failed");
    }
}

/// One CONNECT stream: the authority must be a service port of this waypoint's namespace,
/// which names this waypoint; then HTTP or L4.
async fn stream(wp: Arc<Waypoint>, req: tunnel::server::Request) {
    let refused = |wp: &Waypoint, req: tunnel::server::Request, why: String| {
        warn!(peer = %req.peer, remote = %req.remote, "CONNECT refused: {why}");
        wp.metrics
            .streams
            .get_or_create(&telemetry::ProtocolLabels {
                protocol: "refused",
            })
            .inc();
        req.reject(http::StatusCode::BAD_REQUEST);
    };
    let authority = match req.authority {
        Ok(a) => a,
        Err(why) => return refused(&wp, req, why.to_owned()),
    };
    tracing::Span::current().record("authority", tracing::field::display(authority));
    let snap = wp.store.load();
    let Some(port) = snap.services.get(&authority) else {
        return refused(
            &wp,
            req,
            format!("authority {authority} is not a service port"),
        );
    };
    let service = port.service.clone();
    let declared = snap
        .service(&service)
        .and_then(|def| def.ports.iter().find(|p| p.port == authority.port()))
        .map_or(Protocol::Unspecified, |p| p.protocol);
    // A service of its namespace that names it, never its own (which would loop back to it).
    let ours = service.split_once('/').is_some_and(|(ns, name)| {
        ns == wp.namespace && name != wp.name && snap.waypoint_of(ns) == Some(&wp.name)
    });
    if !ours {
        return refused(
            &wp,
            req,
            format!(
                "service {service} ({authority}) does not go through waypoint {}/{}",
                wp.namespace, wp.name
            ),
        );
    }
    let remote = SocketAddr::new(req.remote.ip().to_canonical(), req.remote.port());
    let workload = snap
        .workloads_by_ip
        .get(&remote.ip())
        .filter(|w| {
            w.namespace == req.peer.namespace && w.service_account == req.peer.service_account
        })
        .cloned();
    drop(snap);
    let identity = req.peer.clone();
    let (send, recv) = match req.accept() {
        Ok(halves) => halves,
        Err(e) => {
            debug!(error = %e, "the CONNECT stream ended before it was answered");
            return;
        }
    };
    let mut io = H2Io::new(send, recv);
    // What the client speaks: what the service declares for the port, or else what its first
    // bytes say, waiting a bounded time (a silent client is a server-speaks-first protocol).
    let mut first = BytesMut::with_capacity(1024);
    let detected = match declared {
        Protocol::Tcp => Sniffed::Opaque,
        Protocol::Http2 => Sniffed::Http2,
        Protocol::Http | Protocol::Unspecified => {
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(wp.http.sniff_timeout_ms);
            let sniffed = loop {
                match sniff::detect(&first) {
                    Sniffed::NeedMore if first.len() < sniff::MAX_REQUEST_LINE => {}
                    Sniffed::NeedMore => break Sniffed::Opaque,
                    other => break other,
                }
                match tokio::time::timeout_at(deadline, io.read_buf(&mut first)).await {
                    Ok(Ok(0)) | Err(_) => break Sniffed::Opaque,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        debug!(error = %e, "the client's stream failed before it said anything");
                        return;
                    }
                }
            };
            // Declared HTTP is HTTP whatever it sent (malformed requests are answered 400).
            match (declared, sniffed) {
                (Protocol::Http, Sniffed::Opaque) => Sniffed::Http1,
                (_, s) => s,
            }
        }
    };
    let io = Rewind::new(first.freeze(), io);
    let version = match detected {
        Sniffed::Http2 => Version::Http2,
        _ => Version::Http1,
    };
    let down = Arc::new(Downstream {
        identity,
        addr: remote,
        workload,
        authority,
        service,
        version,
    });
    let protocol = match detected {
        Sniffed::Http1 => "http1",
        Sniffed::Http2 => "http2",
        _ => "tcp",
    };
    wp.metrics
        .streams
        .get_or_create(&telemetry::ProtocolLabels { protocol })
        .inc();
    let handler = {
        let (wp, down) = (wp.clone(), down.clone());
        service_fn(move |req| proxy::handle(wp.clone(), down.clone(), req))
    };
    let served = match detected {
        Sniffed::Http1 => hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), handler)
            .await
            .map_err(|e| e.to_string()),
        Sniffed::Http2 => hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), handler)
            .await
            .map_err(|e| e.to_string()),
        _ => super::tries::opaque(&wp, &down, io).await,
    };
    if let Err(e) = served {
        debug!(error = %e, protocol, "stream ended with an error");
    }
}
