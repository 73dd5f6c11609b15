//! The verdict on the tokio's paused clock, with a peer played by the test: what it takes of
//! ours, whether our bytes wait on it, whether it answers PINGs.

use std::sync::atomic::AtomicUsize;

use futures::FutureExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

const INTERVAL: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(20);
/// Longer than any verdict takes.
const LONG: Duration = Duration::from_secs(600);

/// The peer's side of PINGs: answered after `rtt`, or never. Writing the PING shows nothing
/// (our own socket buffer takes it, whether the peer is there or not).
struct Peer {
    rtt: Option<Duration>,
    pings: Arc<AtomicUsize>,
}

impl Ping for Peer {
    async fn ping(&mut self) -> bool {
        self.pings.fetch_add(1, Ordering::SeqCst);
        match self.rtt {
            Some(rtt) => {
                tokio::time::sleep(rtt).await;
                true
            }
            None => std::future::pending().await,
        }
    }
}

/// The verdict's future for a peer answering after `rtt` (or never), and its PING count.
fn judged(
    activity: &Activity,
    rtt: Option<Duration>,
) -> (impl std::future::Future<Output = ()> + '_, Arc<AtomicUsize>) {
    let pings = Arc::new(AtomicUsize::new(0));
    let peer = Peer {
        rtt,
        pings: pings.clone(),
    };
    (judge(peer, activity, INTERVAL, TIMEOUT), pings)
}

/// Shows a sign of the peer every `every`, from `after` on, for as long as the test runs.
fn signs(activity: &Activity, after: Duration, every: Duration) {
    let activity = activity.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        activity.set_waiting(false);
        loop {
            activity.shown();
            tokio::time::sleep(every).await;
        }
    });
}

#[tokio::test(start_paused = true)]
async fn an_idle_peer_that_answers_its_pings_is_kept() {
    let activity = Activity::new();
    let (verdict, pings) = judged(&activity, Some(Duration::from_millis(50)));
    assert!(tokio::time::timeout(LONG, verdict).await.is_err());
    assert!(pings.load(Ordering::SeqCst) >= 10, "an idle peer is PINGed");
}

#[tokio::test(start_paused = true)]
async fn an_idle_peer_that_leaves_its_ping_unanswered_is_dropped() {
    let activity = Activity::new();
    let (verdict, pings) = judged(&activity, None);
    let start = Instant::now();
    verdict.await;
    assert_eq!(start.elapsed(), INTERVAL + TIMEOUT);
    assert_eq!(pings.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_keeps_taking_our_bytes_is_neither_pinged_nor_dropped() {
    // Its PONG would wait behind the transfer: it never comes here.
    let activity = Activity::new();
    signs(&activity, Duration::ZERO, Duration::from_secs(5));
    let (verdict, pings) = judged(&activity, None);
    assert!(tokio::time::timeout(LONG, verdict).await.is_err());
    assert_eq!(pings.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_reads_slowly_is_kept_though_its_ping_is_never_answered() {
    // A sign every 15 s: quiet intervals, so a PING, whose answer never comes.
    let activity = Activity::new();
    signs(&activity, Duration::ZERO, Duration::from_secs(15));
    let (verdict, pings) = judged(&activity, None);
    assert!(tokio::time::timeout(LONG, verdict).await.is_err());
    assert_eq!(pings.load(Ordering::SeqCst), 1, "one PING at a time");
}

#[tokio::test(start_paused = true)]
async fn a_peer_our_bytes_wait_on_is_not_pinged_and_is_dropped_if_it_stays_stuck() {
    let activity = Activity::new();
    activity.set_waiting(true);
    let (verdict, pings) = judged(&activity, Some(Duration::from_millis(50)));
    let start = Instant::now();
    verdict.await;
    assert_eq!(start.elapsed(), INTERVAL + TIMEOUT);
    assert_eq!(pings.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_takes_our_bytes_again_before_the_timeout_is_kept() {
    // A node stalled for 25 s (less than the interval and the timeout), then reading again.
    let activity = Activity::new();
    activity.set_waiting(true);
    signs(&activity, Duration::from_secs(25), Duration::from_secs(1));
    let (verdict, pings) = judged(&activity, None);
    assert!(tokio::time::timeout(LONG, verdict).await.is_err());
    assert_eq!(pings.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn the_transport_records_what_the_peer_takes_and_what_waits_on_it() {
    let activity = Activity::new();
    let (ours, mut theirs) = tokio::io::duplex(64);
    let mut ours = Watched::new(ours, activity.clone());
    let start = Instant::now();

    // Taken at once (by our own buffer, as a dead peer's would be): no sign.
    tokio::time::advance(Duration::from_secs(1)).await;
    ours.write_all(&[1; 64]).await.expect("write");
    assert_eq!(
        activity.shown_at(),
        start,
        "a write taken at once shows nothing"
    );
    assert!(!activity.waiting());

    // Full: our bytes wait on the peer.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(ours.write(&[2; 8]).now_or_never().is_none(), "full");
    assert!(activity.waiting());
    // What it sends meanwhile shows nothing.
    theirs.write_all(b"hello").await.expect("peer write");
    let mut got = [0u8; 5];
    ours.read_exact(&mut got).await.expect("read");
    assert_eq!(activity.shown_at(), start);

    // It reads: the write that waited is taken, a sign.
    tokio::time::advance(Duration::from_secs(1)).await;
    theirs.read_exact(&mut [0u8; 64]).await.expect("peer read");
    ours.write_all(&[3; 8]).await.expect("write after the wait");
    assert!(!activity.waiting());
    assert_eq!(activity.shown_at(), start + Duration::from_secs(3));
    ours.flush().await.expect("flush");

    // And what it sends while nothing waits shows it is there.
    tokio::time::advance(Duration::from_secs(1)).await;
    theirs.write_all(b"again").await.expect("peer write");
    ours.read_exact(&mut got).await.expect("read");
    assert_eq!(activity.shown_at(), start + Duration::from_secs(4));
}
