//! The handover protocol between two agents, in one process: a giver answering from its own
//! thread, a taker on the test thread, and a stand-in for the giver's capture task that
//! answers its commands. Pods' listeners need a pod's network namespace, so the lab's
//! upgrade test covers them; here the HTTP listeners travel, which take the same path.

use std::{net::TcpListener, sync::Arc, time::Duration};

use tokio::sync::mpsc;

use super::*;
use crate::{
    admin::Endpoint,
    metrics::Metrics,
    pods::{Changes, Command},
};

/// What the stand-in capture task was asked, in order.
fn capture_stand_in(mut rx: mpsc::Receiver<Command>) -> std::thread::JoinHandle<Vec<&'static str>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                Command::Freeze(reply) => {
                    seen.push("freeze");
                    let _ = reply.send(Vec::new());
                }
                Command::Thaw => seen.push("thaw"),
                Command::Relinquish(reply) => {
                    seen.push("relinquish");
                    let _ = reply.send(());
                }
                Command::Uninstall(reply) => {
                    seen.push("uninstall");
                    let _ = reply.send(Changes {
                        released: 3,
                        ..Changes::default()
                    });
                }
                Command::Cni(_, reply) => {
                    seen.push("cni");
                    drop(reply);
                }
                Command::Inspect(reply) => {
                    seen.push("inspect");
                    drop(reply);
                }
            }
        }
        seen
    })
}

struct Setup {
    _dir: tempdir::Dir,
    path: PathBuf,
    events: mpsc::UnboundedReceiver<Event>,
    capture: std::thread::JoinHandle<Vec<&'static str>>,
    metrics_addr: std::net::SocketAddr,
    _rt: tokio::runtime::Runtime,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    pub fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("mesh-handover-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Dir(dir)
    }
}

/// A giver with one HTTP listener to hand over.
fn giver(name: &str) -> Setup {
    let dir = tempdir::new(name);
    let path = dir.0.join("run").join("handover.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let metrics_addr = listener.local_addr().expect("addr");
    let endpoint = {
        let _guard = rt.enter();
        Endpoint {
            what: "metrics",
            listener: Arc::new(
                tokio::net::TcpListener::from_std({
                    listener.set_nonblocking(true).expect("nonblocking");
                    listener
                })
                .expect("register"),
            ),
        }
    };
    let (tx, rx) = mpsc::channel(4);
    let capture = capture_stand_in(rx);
    let (events_tx, events) = mpsc::unbounded_channel();
    let giver = Giver::bind(&path).expect("bind the handover socket");
    giver
        .spawn(tx, vec![endpoint], events_tx, Arc::new(Metrics::new()))
        .expect("spawn");
    Setup {
        _dir: dir,
        path,
        events,
        capture,
        metrics_addr,
        _rt: rt,
    }
}

#[test]
fn the_socket_is_private_to_the_agents_user() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = giver("mode");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&s.path), 0o600);
    assert_eq!(mode(s.path.parent().expect("dir")), 0o700);
}

#[test]
fn a_taker_gets_the_same_listening_sockets_and_the_giver_stops() {
    let mut s = giver("take");
    let taken = take(&s.path).expect("handover").expect("an agent answers");
    assert_eq!(taken.giver, std::process::id());
    assert!(taken.pods.is_empty());
    assert_eq!(taken.admin.len(), 1);
    let (what, listener) = &taken.admin[0];
    assert_eq!(what, "metrics");
    assert_eq!(
        listener.local_addr().expect("addr"),
        s.metrics_addr,
        "the very socket the giver listens on"
    );
    taken.complete().expect("released");
    match s.events.blocking_recv() {
        Some(Event::HandedOver { to }) => assert_eq!(to, std::process::id()),
        other => panic!("expected HandedOver, got {other:?}"),
    }
    assert!(
        !s.path.exists(),
        "the giver leaves the path to its successor"
    );
    // The giver's thread has ended: nobody answers any more.
    assert!(take(&s.path).expect("no error").is_none());
    drop(s.events);
    // The giver thread dropped its sender: the stand-in ends and reports.
    assert_eq!(
        s.capture.join().expect("stand-in"),
        vec!["freeze", "relinquish"]
    );
}

#[test]
fn a_taker_that_gives_up_leaves_the_giver_as_it_was() {
    let s = giver("abort");
    let taken = take(&s.path).expect("handover").expect("an agent answers");
    taken.abort("cannot serve shop/db");
    // The giver thaws and answers the next successor.
    let again = take(&s.path)
        .expect("second handover")
        .expect("still answering");
    again.abort("again");
    // And one that vanishes without a word.
    let third = take(&s.path).expect("third").expect("still answering");
    drop(third);
    let fourth = take(&s.path).expect("fourth").expect("still answering");
    fourth.complete().expect("released");
    assert_eq!(
        s.capture.join().expect("stand-in"),
        vec![
            "freeze",
            "thaw",
            "freeze",
            "thaw",
            "freeze",
            "thaw",
            "freeze",
            "relinquish"
        ]
    );
}

#[test]
fn garbage_is_refused_and_changes_nothing() {
    let s = giver("garbage");
    let conn = connect(&s.path)
        .expect("connect")
        .expect("an agent answers");
    fdpass::send(conn.socket.as_fd(), b"{not json", &[]).expect("send");
    // The giver drops the conversation.
    let e = conn.recv(Duration::from_secs(10)).expect_err("no answer");
    assert!(matches!(e, Error::Protocol { .. }), "{e}");
    let taken = take(&s.path).expect("handover").expect("still answering");
    taken.complete().expect("released");
    assert_eq!(
        s.capture.join().expect("stand-in"),
        vec!["freeze", "relinquish"]
    );
}

#[test]
fn uninstall_asks_the_running_agent() {
    let mut s = giver("uninstall");
    let done = uninstall(&s.path)
        .expect("uninstall")
        .expect("an agent answers");
    assert_eq!((done.agent, done.released), (std::process::id(), 3));
    assert!(matches!(s.events.blocking_recv(), Some(Event::Uninstalled)));
    assert!(uninstall(&s.path).expect("no error").is_none(), "gone");
}

#[test]
fn no_agent_and_a_stale_socket_mean_no_handover() {
    let dir = tempdir::new("none");
    let path = dir.0.join("handover.sock");
    assert!(take(&path).expect("no socket").is_none());
    std::fs::create_dir_all(&dir.0).expect("dir");
    // A socket file nobody listens on (its agent died).
    drop(Giver::bind(&path).expect("bind"));
    assert!(path.exists());
    assert!(take(&path).expect("stale socket").is_none());
    assert!(!path.exists(), "the stale socket is removed");
}

#[test]
fn messages_round_trip() {
    for msg in [
        Message::Hello {
            version: "0.1.0".into(),
            pid: 7,
        },
        Message::Pod {
            key: "shop/db".into(),
        },
        Message::Done { pods: 2 },
        Message::Taken,
        Message::Uninstalled {
            released: 1,
            failed: vec!["x".into()],
        },
    ] {
        let text = serde_json::to_string(&msg).expect("encode");
        assert_eq!(serde_json::from_str::<Message>(&text).expect("decode"), msg);
    }
    assert!(serde_json::from_str::<Message>(r#"{"type":"take_everything"}"#).is_err());
    assert!(serde_json::from_str::<Message>(r#"{"type":"pod","key":"a","x":1}"#).is_err());
}
