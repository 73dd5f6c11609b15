//! Handing a node over from a running agent to its successor without refusing a connection.
//!
//! The running agent (the giver) listens on a Unix `SOCK_SEQPACKET` socket (`handover_socket`,
//! mode 0600 in a 0700 directory; the peer must be the same user). A new agent (the taker)
//! connects at start:
//!
//! ```text
//! taker                                   giver
//!   Hello{version,pid}        ->            freezes capture (no pod captured or released)
//!                             <-  Pod{key} + the pod's listening sockets (SCM_RIGHTS), per pod
//!                             <-  Admin{what} + the metrics / readiness listener
//!                             <-  Done{pods}
//!   serves the same sockets (both accept meanwhile), adopts the pinned capture,
//!   once every pod is served:
//!   Taken                     ->            stops accepting at once, closes its copies,
//!                             <-  Released  removes the socket path, drains its connections
//!   binds the socket path itself, for the next one
//! ```
//!
//! The listening sockets never close: what is queued on them is accepted by one agent or the
//! other, so an upgrade refuses nothing. A taker that cannot serve every pod sends `Abort` (or
//! dies): the giver thaws and carries on, having lost nothing. `Uninstall` (from `mesh-agent
//! node --uninstall`) asks the running agent to release every pod, remove its pins and stop.

pub mod metrics;

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::{admin::Endpoint, capture::listeners::Opened, pods, sys::fdpass};

/// How long the taker may take from `Done` to `Taken` (loading, adopting, minting
/// certificates for every pod): the giver's capture stays frozen meanwhile.
pub const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one message may take to arrive once expected.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest message.
const MAX_MESSAGE: usize = 64 * 1024;

/// Errors of the handover. Messages say what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("handover socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error(
        "the agent at {path} (pid {pid}) runs as user {uid}, this one as {ours}: refusing to \
         exchange sockets with it"
    )]
    Peer {
        path: PathBuf,
        pid: u32,
        uid: u32,
        ours: u32,
    },
    #[error("handover with the agent at {path}: {what}")]
    Protocol { path: PathBuf, what: String },
    #[error(
        "handover with the agent at {path}: no answer within {timeout:?} (is it stuck? stop \
         it, then start this agent again)"
    )]
    Timeout { path: PathBuf, timeout: Duration },
}

/// One message of the protocol (JSON, one per datagram).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Message {
    Hello {
        version: String,
        pid: u32,
    },
    Uninstall,
    Pod {
        key: String,
    },
    Admin {
        what: String,
    },
    Done {
        pods: usize,
    },
    Taken,
    Abort {
        why: String,
    },
    Released,
    Uninstalled {
        released: usize,
        failed: Vec<String>,
    },
    Refused {
        why: String,
    },
}

/// A Unix seqpacket connection with message framing, descriptor passing and deadlines.
#[derive(Debug)]
struct Conn {
    socket: Socket,
    path: PathBuf,
}

impl Conn {
    fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        let data = serde_json::to_vec(msg).map_err(|e| self.protocol(e.to_string()))?;
        fdpass::send(self.socket.as_fd(), &data, fds).map_err(|e| self.io(e))
    }

    /// The next message and its descriptors, within `timeout`.
    fn recv(&self, timeout: Duration) -> Result<(Message, Vec<OwnedFd>), Error> {
        self.socket
            .set_read_timeout(Some(timeout))
            .map_err(|e| self.io(e))?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, fds) = match fdpass::recv(self.socket.as_fd(), &mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout {
                    path: self.path.clone(),
                    timeout,
                })
            }
            Err(e) => return Err(self.io(e)),
        };
        if n == 0 {
            return Err(self.protocol("the other agent closed the connection".into()));
        }
        let msg = serde_json::from_slice(&buf[..n])
            .map_err(|e| self.protocol(format!("unreadable message: {e}")))?;
        Ok((msg, fds))
    }

    fn io(&self, source: io::Error) -> Error {
        Error::Socket {
            path: self.path.clone(),
            source,
        }
    }

    fn protocol(&self, what: String) -> Error {
        Error::Protocol {
            path: self.path.clone(),
            what,
        }
    }

    /// Refuses to talk to a process of another user.
    fn check_peer(&self) -> Result<u32, Error> {
        let (pid, uid) = fdpass::peer_cred(self.socket.as_fd()).map_err(|e| self.io(e))?;
        let ours = crate::sys::euid();
        if uid != ours {
            return Err(Error::Peer {
                path: self.path.clone(),
                pid,
                uid,
                ours,
            });
        }
        Ok(pid)
    }
}

/// Connects to a running agent; `None` when none runs (no socket, or a stale one, removed).
fn connect(path: &Path) -> Result<Option<Conn>, Error> {
    let io_err = |source| Error::Socket {
        path: path.to_owned(),
        source,
    };
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(io_err)?;
    let addr = SockAddr::unix(path).map_err(io_err)?;
    match socket.connect(&addr) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // Left by an agent that died: nobody listens.
            info!(socket = %path.display(), "removing the handover socket of an agent that is gone");
            let _ = std::fs::remove_file(path);
            return Ok(None);
        }
        Err(e) => return Err(io_err(e)),
    }
    socket
        .set_write_timeout(Some(STEP_TIMEOUT))
        .map_err(io_err)?;
    Ok(Some(Conn {
        socket,
        path: path.to_owned(),
    }))
}

/// What a taker received from the running agent.
#[derive(Debug)]
pub struct Takeover {
    conn: Conn,
    /// The giver's pid.
    pub giver: u32,
    /// Every served pod's listeners, checked with the kernel.
    pub pods: Vec<Opened>,
    /// The giver's metrics and readiness listeners, by `what`.
    pub admin: Vec<(String, std::net::TcpListener)>,
}

/// Takes over from the agent running on this node, if there is one: returns its listening
/// sockets, its capture frozen until [`Takeover::complete`] or [`Takeover::abort`].
pub fn take(path: &Path) -> Result<Option<Takeover>, Error> {
    let Some(conn) = connect(path)? else {
        return Ok(None);
    };
    let giver = conn.check_peer()?;
    conn.send(
        &Message::Hello {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
        },
        &[],
    )?;
    let mut pods = Vec::new();
    let mut admin = Vec::new();
    loop {
        match conn.recv(STEP_TIMEOUT)? {
            (Message::Pod { key }, fds) => match Opened::from_fds(fds) {
                Ok(opened) => pods.push(opened),
                // Its pod is captured anew (new listeners): nothing is lost but the queue.
                Err(why) => {
                    warn!(pod = %key, %why, "unusable listeners handed over; opening new ones")
                }
            },
            (Message::Admin { what }, mut fds) if fds.len() == 1 => {
                if let Some(fd) = fds.pop() {
                    admin.push((what, std::net::TcpListener::from(fd)));
                }
            }
            (Message::Done { pods: n }, _) => {
                if n != pods.len() {
                    warn!(
                        announced = n,
                        usable = pods.len(),
                        "fewer pods handed over than announced"
                    );
                }
                break;
            }
            (Message::Refused { why }, _) => {
                return Err(conn.protocol(format!("the running agent (pid {giver}) refused: {why}")))
            }
            (other, _) => return Err(conn.protocol(format!("unexpected {other:?}"))),
        }
    }
    info!(
        giver,
        pods = pods.len(),
        admin = admin.len(),
        "listening sockets received from the running agent"
    );
    Ok(Some(Takeover {
        conn,
        giver,
        pods,
        admin,
    }))
}

impl Takeover {
    /// Tells the giver this agent serves every pod: it stops accepting and drains.
    pub fn complete(self) -> Result<(), Error> {
        self.conn.send(&Message::Taken, &[])?;
        match self.conn.recv(STEP_TIMEOUT)? {
            (Message::Released, _) => Ok(()),
            (other, _) => Err(self.conn.protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Gives up: the giver carries on as if nothing happened.
    pub fn abort(self, why: &str) {
        let _ = self.conn.send(
            &Message::Abort {
                why: why.to_owned(),
            },
            &[],
        );
    }
}

/// What `mesh-agent node --uninstall` got from the running agent.
#[derive(Debug)]
pub struct Uninstalled {
    pub agent: u32,
    pub released: usize,
    pub failed: Vec<String>,
}

/// Asks the running agent to uninstall; `None` when no agent runs.
pub fn uninstall(path: &Path) -> Result<Option<Uninstalled>, Error> {
    let Some(conn) = connect(path)? else {
        return Ok(None);
    };
    let agent = conn.check_peer()?;
    conn.send(&Message::Uninstall, &[])?;
    match conn.recv(TAKEOVER_TIMEOUT)? {
        (Message::Uninstalled { released, failed }, _) => Ok(Some(Uninstalled {
            agent,
            released,
            failed,
        })),
        (Message::Refused { why }, _) => Err(conn.protocol(format!("refused: {why}"))),
        (other, _) => Err(conn.protocol(format!("unexpected {other:?}"))),
    }
}

/// What the giver's side reports to the agent's lifecycle.
#[derive(Debug)]
pub enum Event {
    /// A successor serves every pod now; this agent no longer accepts connections.
    HandedOver { to: u32 },
    /// Every pod was released and the pins removed.
    Uninstalled,
}

/// The giver's side: the listener on `path` and what it needs to answer.
#[derive(Debug)]
pub struct Giver {
    listener: Socket,
    path: PathBuf,
}

impl Giver {
    /// Binds the handover socket (its directory is made 0700, the socket 0600), replacing a
    /// stale file. A live agent there would have been taken over first ([`take`]).
    pub fn bind(path: &Path) -> Result<Giver, Error> {
        use std::os::unix::fs::PermissionsExt as _;
        let io_err = |source| Error::Socket {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener =
            Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(io_err)?;
        listener
            .bind(&SockAddr::unix(path).map_err(io_err)?)
            .map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        listener.listen(4).map_err(io_err)?;
        Ok(Giver {
            listener,
            path: path.to_owned(),
        })
    }

    /// Answers successors and uninstallers on a thread of its own, until one takes over or
    /// uninstalls. `capture` is the capture task, `admin` the HTTP listeners to hand over.
    pub fn spawn(
        self,
        capture: mpsc::Sender<pods::Command>,
        admin: Vec<Endpoint>,
        events: mpsc::UnboundedSender<Event>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> io::Result<()> {
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || self.serve(&capture, &admin, &events, &metrics))
            .map(drop)
    }

    fn serve(
        self,
        capture: &mpsc::Sender<pods::Command>,
        admin: &[Endpoint],
        events: &mpsc::UnboundedSender<Event>,
        metrics: &crate::metrics::Metrics,
    ) {
        let count = |result: &'static str| {
            metrics
                .handover
                .handovers
                .get_or_create(&crate::metrics::HandoverLabels {
                    role: "giver",
                    result,
                })
                .inc();
        };
        loop {
            let socket = match self.listener.accept() {
                Ok((socket, _)) => socket,
                Err(e) => {
                    error!(error = %e, "handover socket: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let conn = Conn {
                socket,
                path: self.path.clone(),
            };
            if let Err(e) = conn.socket.set_write_timeout(Some(STEP_TIMEOUT)) {
                warn!(error = %e, "handover socket: cannot set a timeout");
                continue;
            }
            match self.answer(&conn, capture, admin) {
                Ok(Some(event)) => {
                    count("ok");
                    // The successor binds the path now; this agent never answers again.
                    let _ = events.send(event);
                    return;
                }
                Ok(None) => count("aborted"),
                Err(e) => {
                    warn!(error = %e, "handover failed; this agent carries on");
                    count("error");
                }
            }
        }
    }

    /// One conversation. `Ok(None)`: the other agent went away or gave up, nothing changed.
    fn answer(
        &self,
        conn: &Conn,
        capture: &mpsc::Sender<pods::Command>,
        admin: &[Endpoint],
    ) -> Result<Option<Event>, Error> {
        let peer = conn.check_peer()?;
        let (hello, _) = conn.recv(STEP_TIMEOUT)?;
        let send_cmd = |cmd| {
            capture
                .blocking_send(cmd)
                .map_err(|_| conn.protocol("this agent's capture has stopped".into()))
        };
        match hello {
            Message::Hello { version, pid } => {
                info!(successor = pid, %version, "a successor is taking over");
                let (tx, rx) = oneshot::channel();
                send_cmd(pods::Command::Freeze(tx))?;
                let Ok(pods) = rx.blocking_recv() else {
                    let why = "this agent is already handing over or stopping".to_owned();
                    conn.send(&Message::Refused { why: why.clone() }, &[])?;
                    return Err(conn.protocol(why));
                };
                let sent = self.give(conn, &pods, admin);
                let answer = sent.and_then(|()| conn.recv(TAKEOVER_TIMEOUT));
                match answer {
                    Ok((Message::Taken, _)) => {
                        let (tx, rx) = oneshot::channel();
                        send_cmd(pods::Command::Relinquish(tx))?;
                        let _ = rx.blocking_recv();
                        // The path is the successor's from now on.
                        let _ = std::fs::remove_file(&self.path);
                        conn.send(&Message::Released, &[])?;
                        info!(successor = pid, "handed over: draining");
                        Ok(Some(Event::HandedOver { to: pid }))
                    }
                    other => {
                        send_cmd(pods::Command::Thaw)?;
                        match other {
                            Ok((Message::Abort { why }, _)) => {
                                warn!(successor = pid, %why, "the successor gave up; carrying on");
                                Ok(None)
                            }
                            Ok((msg, _)) => Err(conn.protocol(format!("unexpected {msg:?}"))),
                            Err(e) => Err(e),
                        }
                    }
                }
            }
            Message::Uninstall => {
                info!(by = peer, "uninstall requested");
                let (tx, rx) = oneshot::channel();
                send_cmd(pods::Command::Uninstall(tx))?;
                let changes = rx
                    .blocking_recv()
                    .map_err(|_| conn.protocol("capture ended before uninstalling".into()))?;
                let _ = std::fs::remove_file(&self.path);
                conn.send(
                    &Message::Uninstalled {
                        released: changes.released,
                        failed: changes
                            .failed
                            .iter()
                            .map(|(k, e)| format!("{k}: {e}"))
                            .collect(),
                    },
                    &[],
                )?;
                Ok(Some(Event::Uninstalled))
            }
            other => Err(conn.protocol(format!("unexpected {other:?}"))),
        }
    }

    fn give(
        &self,
        conn: &Conn,
        pods: &[pods::HandoverPod],
        admin: &[Endpoint],
    ) -> Result<(), Error> {
        for pod in pods {
            conn.send(
                &Message::Pod {
                    key: pod.key.clone(),
                },
                &pod.listeners.fds(),
            )?;
        }
        for endpoint in admin {
            conn.send(
                &Message::Admin {
                    what: endpoint.what.to_owned(),
                },
                &[endpoint.listener.as_fd()],
            )?;
        }
        conn.send(&Message::Done { pods: pods.len() }, &[])
    }
}

#[cfg(test)]
mod tests;
