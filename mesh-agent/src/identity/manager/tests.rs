//! Rotation under tokio's paused clock.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::{family::Family, gauge::Gauge};
use rustls::pki_types::UnixTime;

use super::*;
use crate::identity::{verify_peer, PeerRole};

const DAY: Duration = Duration::from_secs(86_400);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap_or_else(|e| panic!("test id: {e}"))
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).expect("after 1970"))
}

/// A wall clock that moves with tokio's (possibly paused) clock.
fn tokio_clock() -> Clock {
    let base_wall = SystemTime::now();
    let base = tokio::time::Instant::now();
    Arc::new(move || base_wall + base.elapsed())
}

#[tokio::test(start_paused = true)]
async fn rotation_under_paused_clock() {
    let root = Issuer::generate_root("cluster.local", 10 * DAY).expect("root");
    let node = root
        .issue_intermediate("node-1", DAY)
        .expect("intermediate");
    let bundle = TrustBundle::from_roots(vec![root.root_cert_der().expect("root")]);
    let expiry = Family::<CertLabels, Gauge>::default();
    let clock = tokio_clock();
    let lifetime = Duration::from_secs(10);
    let manager = CertManager::with_clock(node, bundle, lifetime, expiry.clone(), clock.clone(), 7);
    assert_eq!(manager.trust_domain(), "cluster.local");
    let api = id("shop", "api");
    let handle = manager.get(&api).expect("first leaf");
    let same = manager.get(&api).expect("cached");
    assert!(Arc::ptr_eq(&handle, &same), "one handle per identity");
    let first = handle.load_full();
    let labels = CertLabels {
        namespace: "shop".to_owned(),
        service_account: "api".to_owned(),
    };
    let gauge = |leaf: &Leaf| i64::try_from(unix_secs(leaf.not_after)).expect("fits");
    assert_eq!(expiry.get_or_create(&labels).get(), gauge(&first));
    // Renewal is due at half-life ± 10%.
    let renew = manager.renew_times()[0].1;
    let (lo, hi) = (
        first.issued_at() + Duration::from_millis(4500),
        first.issued_at() + Duration::from_millis(5500),
    );
    assert!(
        renew >= lo && renew <= hi,
        "renewal outside half-life ± 10%"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(Arc::clone(&manager).run_rotation(stop_rx));
    let start = tokio::time::Instant::now();
    while handle.load().not_after == first.not_after {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no renewal within 30 s of paused time"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let second = handle.load_full();
    assert!(
        second.not_after > first.not_after,
        "renewed leaf expires later"
    );
    assert_ne!(second.chain[0], first.chain[0]);
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "renewed at half-life, not at expiry"
    );
    assert_eq!(expiry.get_or_create(&labels).get(), gauge(&second));
    let now = unix(clock());
    verify_peer(
        &second.chain[0],
        &second.chain[1..],
        manager.bundle(),
        now,
        PeerRole::Server,
    )
    .expect("renewed leaf verifies");

    // It keeps renewing: after several lifetimes the leaf is still valid.
    tokio::time::sleep(Duration::from_secs(35)).await;
    let now = clock();
    assert!(handle.load().not_after > now, "leaf expired under rotation");

    // An identity added later is picked up and rotated too.
    let db = id("shop", "db");
    let db_handle = manager.get(&db).expect("db leaf");
    let db_first = db_handle.load().not_after;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        db_handle.load().not_after > db_first,
        "new identity not rotated"
    );

    // Forgetting an identity drops its metric series.
    manager.retain(&HashSet::from([db.clone()]));
    assert_eq!(manager.renew_times().len(), 1);
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register(
        "mesh_certificate_expiry_timestamp_seconds",
        "expiry",
        expiry.clone(),
    );
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(!text.contains("service_account=\"api\""), "{text}");
    assert!(text.contains("service_account=\"db\""), "{text}");

    stop_tx.send(true).expect("task alive");
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("rotation stops")
        .expect("no panic");
}
