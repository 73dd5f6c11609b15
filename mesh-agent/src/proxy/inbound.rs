//! Inbound plaintext: a connection to the pod's address that sk_lookup steered to the pod's
//! inbound listener. The accepted socket's local address is the original destination.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;
use tracing::{info, warn, Instrument as _};

use super::{connect_in_pod, copy, reset, Error, Inputs, Pod};

pub async fn handle(stream: TcpStream, peer: SocketAddr, pod: Arc<Pod>, inputs: Arc<Inputs>) {
    let dst = stream.local_addr().ok();
    let span = match dst {
        Some(dst) => tracing::info_span!("inbound", pod = %pod.key, src = %peer, %dst),
        None => tracing::info_span!("inbound", pod = %pod.key, src = %peer, dst = "unknown"),
    };
    async move {
        pod.inbound.opened.inc();
        let start = Instant::now();
        match proxy(stream, dst, &pod, &inputs).await {
            Ok((sent, received)) => info!(
                sent,
                received,
                duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                "connection closed"
            ),
            Err(e) => {
                pod.count_failure(&inputs.metrics, "inbound", &e);
                warn!(error = %e, "connection failed");
            }
        }
        pod.inbound.closed.inc();
    }
    .instrument(span)
    .await;
}

async fn proxy(
    stream: TcpStream,
    dst: Option<SocketAddr>,
    pod: &Pod,
    inputs: &Inputs,
) -> Result<(u64, u64), Error> {
    let Some(dst) = dst else {
        reset(stream);
        return Err(Error::Socket(std::io::Error::other(
            "the accepted socket has no local address",
        )));
    };
    // sk_lookup never steers the agent's ports; a connection to one here would loop.
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if mesh_common::ports::RESERVED.contains(&dst.port()) || !pod.workload.ips.contains(&dst.ip()) {
        reset(stream);
        return Err(Error::Loop { addr: dst });
    }
    let app = match connect_in_pod(pod, &inputs.home, dst).await {
        Ok(app) => app,
        Err(e) => {
            reset(stream);
            return Err(e);
        }
    };
    info!("connection delivered");
    // For inbound the pod's side is the application: bytes it sends are "sent".
    copy::bidirectional(app, stream, &pod.inbound)
        .await
        .map_err(|source| Error::Connect { addr: dst, source })
}
