//! The agent's local Unix-socket services (the CNI plugin's, the workload API's): binding a
//! socket in place of a stale one, and serving each connection on its own task.

use std::{future::Future, path::Path, time::Duration};

use tokio::net::{UnixListener, UnixStream};
use tracing::{warn, Instrument as _};

/// Binds the socket at `path` (its directory made, a stale socket replaced: an earlier
/// agent's, or the one a running agent serves while this one takes over), with `mode`.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Accepts connections until `done()` holds after an accept, serving each with `handle` on its
/// own task; a failed one is logged as `what` ("CNI request").
pub async fn serve_each<F, Fut>(
    listener: UnixListener,
    what: &'static str,
    done: impl Fn() -> bool,
    handle: F,
) where
    F: Fn(UnixStream) -> Fut,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if done() {
            return;
        }
        let served = handle(stream);
        tokio::spawn(
            async move {
                if let Err(e) = served.await {
                    warn!(error = %e, "{what} failed");
                }
            }
            .in_current_span(),
        );
    }
}
