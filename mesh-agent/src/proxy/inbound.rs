//! Inbound plaintext: a connection to the pod's address that sk_lookup steered to the pod's
//! inbound listener. The accepted socket's local address is the original destination.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::info;

use super::{connect_in_pod, copy, reset, Error, Inputs, Pod};

pub async fn proxy(stream: TcpStream, pod: &Pod, inputs: &Inputs) -> Result<(u64, u64), Error> {
    let Ok(dst) = stream.local_addr() else {
        reset(stream);
        return Err(Error::Socket(std::io::Error::other(
            "the accepted socket has no local address",
        )));
    };
    // sk_lookup never steers the agent's ports; a connection to one here would loop.
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    tracing::Span::current().record("dst", tracing::field::display(dst));
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
