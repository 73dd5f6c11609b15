//! The agent's side: the Unix socket the plugin asks on. Each connection carries one request
//! line and gets one reply line; the request goes to the pod lifecycle manager, which answers
//! once the pod is captured (or released, or known not to be of the mesh).

use std::{path::Path, time::Duration};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use super::{Reply, Request, Verb, MAX_MESSAGE};
use crate::pods::Command;

/// `mesh_cni_requests_total`: the plugin's requests by command and answer.
pub type Requests = Family<RequestLabels, Counter>;

/// The labels of [`Requests`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RequestLabels {
    /// `add`, `del`, `check`, or `unreadable`.
    command: &'static str,
    /// `captured`, `not_meshed`, `released` or `failed`.
    reply: &'static str,
}

impl RequestLabels {
    fn of(command: Option<Verb>, reply: &Reply) -> Self {
        RequestLabels {
            command: match command {
                Some(Verb::Add) => "add",
                Some(Verb::Del) => "del",
                Some(Verb::Check) => "check",
                None => "unreadable",
            },
            reply: match reply {
                Reply::Captured => "captured",
                Reply::NotMeshed => "not_meshed",
                Reply::Released => "released",
                Reply::Failed(_) => "failed",
            },
        }
    }
}

/// How long a request may take to arrive once connected.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the manager may take to answer (the plugin waits 30 s for an ADD).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(28);

/// Binds the socket at `path` (replacing a stale one: an earlier agent's, or the one a running
/// agent serves while this one takes over), owner-only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::sys::unix::bind(path, 0o600)
}

/// Serves the plugin's requests until the manager is gone, counting them in `requests`.
pub async fn serve(listener: UnixListener, pods: mpsc::Sender<Command>, requests: Requests) {
    let closed = pods.clone();
    crate::sys::unix::serve_each(
        listener,
        "CNI request",
        move || closed.is_closed(),
        move |stream| {
            let (pods, requests) = (pods.clone(), requests.clone());
            async move { one(stream, &pods, &requests).await }
        },
    )
    .await;
}

async fn one(
    stream: UnixStream,
    pods: &mpsc::Sender<Command>,
    requests: &Requests,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_MESSAGE as u64));
    tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::other("no request within 5 s"))??;
    let (verb, reply) = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let (pod, verb, container) =
                (request.key(), request.command, request.container_id.clone());
            let reply = ask(pods, request).await;
            info!(%pod, ?verb, container_id = %container, ?reply, "CNI request answered");
            (Some(verb), reply)
        }
        Err(e) => {
            warn!(error = %e, "unreadable CNI request");
            (None, Reply::Failed(format!("unreadable CNI request: {e}")))
        }
    };
    requests
        .get_or_create(&RequestLabels::of(verb, &reply))
        .inc();
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

async fn ask(pods: &mpsc::Sender<Command>, request: Request) -> Reply {
    let (tx, rx) = oneshot::channel();
    if pods.send(Command::Cni(request, tx)).await.is_err() {
        return Reply::Failed("the agent is stopping".into());
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => Reply::Failed("the agent is stopping (or handing over)".into()),
        Err(_) => Reply::Failed(format!(
            "the pod was not captured within {} s",
            ANSWER_TIMEOUT.as_secs()
        )),
    }
}
