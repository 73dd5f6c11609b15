//! The byte copier: both directions at once, half-close preserved (EOF on one side becomes a
//! shutdown of the other side's write half), one fixed buffer per direction.

use tokio::net::TcpStream;

use super::COPY_BUFFER;

/// Copies until both directions have ended. `pod_side` is the pod's own connection; returns
/// (bytes from the pod's side, bytes toward it).
pub async fn bidirectional(
    mut pod_side: TcpStream,
    mut peer_side: TcpStream,
) -> std::io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional_with_sizes(
        &mut pod_side,
        &mut peer_side,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await
}
