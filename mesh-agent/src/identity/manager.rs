//! The per-node leaf certificate manager: mints a certificate for each service account of the
//! pods on this node on first use, and renews it at half-life, with jitter, in the background.
//!
//! Two clocks: certificate validity comes from a wall [`Clock`] (`SystemTime::now` in
//! production), because peers check it against their wall clocks; waits are tokio sleeps of the
//! wall-clock distance to the next renewal, capped at [`MAX_WAIT`] so that a step of the wall
//! clock (NTP, suspend) is noticed within minutes. Tests inject a clock derived from
//! `tokio::time::Instant`, so that under tokio's paused clock both agree.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
};
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::{fmt_time, unix_secs, Error, Issuer, Leaf, SpiffeId, TrustBundle};

/// The wall clock certificates are issued by.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The longest the rotation task sleeps before looking at the clock again.
pub const MAX_WAIT: Duration = Duration::from_secs(5 * 60);
/// A renewal is never scheduled sooner than this after the previous one (tiny lifetimes).
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);
/// Renewal time is spread by up to this fraction of the half-life, either way.
const JITTER: f64 = 0.1;
/// Retry delays after failed renewals: doubling from the first, capped at the second.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Labels of `mesh_certificate_expiry_timestamp_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub namespace: String,
    pub service_account: String,
}

impl From<&SpiffeId> for CertLabels {
    fn from(id: &SpiffeId) -> Self {
        CertLabels {
            namespace: id.namespace.clone(),
            service_account: id.service_account.clone(),
        }
    }
}

/// A workload certificate as the admin endpoint shows it (never its key). Times are Unix
/// seconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertView {
    pub identity: String,
    pub serial: String,
    /// The issuer's subject (this node's intermediate, or a central CA).
    pub issuer: String,
    pub not_before: u64,
    pub not_after: u64,
    /// When the agent renews it (its half-life, or the next retry).
    pub renew_at: u64,
    pub expires_in_secs: u64,
    /// Within its validity now.
    pub valid: bool,
    /// Certificates presented: the leaf and its issuers (not the root).
    pub chain_len: usize,
}

/// The family of `mesh_certificate_expiry_timestamp_seconds`, registered in `metrics`: the
/// [`CertManager`] of the node sets it.
pub fn expiry_family(metrics: &crate::metrics::Metrics) -> Family<CertLabels, Gauge> {
    let expiry = Family::<CertLabels, Gauge>::default();
    metrics.register(
        "mesh_certificate_expiry_timestamp_seconds",
        "When each workload certificate of this node expires (Unix time)",
        expiry.clone(),
    );
    expiry
}

/// Mints and rotates leaf certificates for the service accounts of pods on this node.
pub struct CertManager {
    issuer: Issuer,
    bundle: TrustBundle,
    lifetime: Duration,
    expiry: Family<CertLabels, Gauge>,
    clock: Clock,
    rng: Mutex<StdRng>,
    leaves: Mutex<HashMap<SpiffeId, Entry>>,
    /// Wakes the rotation task when a leaf is added.
    added: Notify,
}

struct Entry {
    leaf: Arc<ArcSwap<Leaf>>,
    /// When to renew: the leaf's half-life, with jitter, or the next retry.
    renew: SystemTime,
    failures: u32,
}

impl CertManager {
    /// A manager issuing leaves of `lifetime` from `issuer`, on the system clock. `expiry` is
    /// the gauge family the caller registers as `mesh_certificate_expiry_timestamp_seconds`.
    pub fn new(
        issuer: Issuer,
        bundle: TrustBundle,
        lifetime: Duration,
        expiry: Family<CertLabels, Gauge>,
    ) -> Arc<CertManager> {
        Self::with_clock(
            issuer,
            bundle,
            lifetime,
            expiry,
            Arc::new(SystemTime::now),
            rand::random(),
        )
    }

    /// [`CertManager::new`] with an injected wall clock and a fixed seed for the renewal jitter.
    pub fn with_clock(
        issuer: Issuer,
        bundle: TrustBundle,
        lifetime: Duration,
        expiry: Family<CertLabels, Gauge>,
        clock: Clock,
        jitter_seed: u64,
    ) -> Arc<CertManager> {
        Arc::new(CertManager {
            issuer,
            bundle,
            lifetime,
            expiry,
            clock,
            rng: Mutex::new(StdRng::seed_from_u64(jitter_seed)),
            leaves: Mutex::new(HashMap::new()),
            added: Notify::new(),
        })
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn trust_domain(&self) -> &str {
        self.issuer.trust_domain()
    }

    /// The certificate handle of `id`, minting its first leaf on first use. The handle always
    /// holds the current leaf: rotation swaps inside it, so a TLS resolver holding it presents
    /// the new certificate on new handshakes while connections in flight keep theirs.
    pub fn get(&self, id: &SpiffeId) -> Result<Arc<ArcSwap<Leaf>>, Error> {
        if let Some(entry) = self.lock().get(id) {
            return Ok(Arc::clone(&entry.leaf));
        }
        // Sign outside the lock; if another caller raced us, its leaf wins and ours is dropped.
        let now = (self.clock)();
        let leaf = self.issuer.issue_leaf_at(id, self.lifetime, now)?;
        let mut leaves = self.lock();
        let entry = leaves.entry(id.clone()).or_insert_with(|| {
            info!(identity = %id, not_after = %fmt_time(leaf.not_after), "certificate issued");
            self.set_expiry(id, &leaf);
            self.added.notify_one();
            Entry {
                renew: self.renew_time(&leaf, now),
                leaf: Arc::new(ArcSwap::from_pointee(leaf)),
                failures: 0,
            }
        });
        Ok(Arc::clone(&entry.leaf))
    }

    /// A fresh leaf of `id` as PEM, with its key, for the workload that holds the identity
    /// itself (a waypoint, through the workload API); not kept here: the workload renews it.
    pub fn issue_pem(&self, id: &SpiffeId) -> Result<super::ca::IssuedPem, Error> {
        let issued = self
            .issuer
            .issue_leaf_pem(id, self.lifetime, (self.clock)())?;
        info!(identity = %id, not_after = %fmt_time(issued.not_after), "certificate issued to its workload");
        Ok(issued)
    }

    /// The trusted roots as PEM.
    pub fn bundle_pem(&self) -> String {
        self.bundle
            .roots()
            .iter()
            .map(|der| super::pem::encode("CERTIFICATE", der))
            .collect()
    }

    /// The workload certificates held now (no keys), by identity: for the admin endpoint.
    pub fn certificates(&self) -> Vec<CertView> {
        let now = (self.clock)();
        let mut views: Vec<CertView> = self
            .lock()
            .values()
            .map(|entry| {
                let leaf = entry.leaf.load();
                let unix = |t: SystemTime| {
                    t.duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                };
                let parsed = leaf.chain.first().and_then(|der| {
                    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                    Some((cert.raw_serial_as_string(), cert.issuer().to_string()))
                });
                let (serial, issuer) = parsed.unwrap_or_default();
                CertView {
                    identity: leaf.id.to_string(),
                    serial,
                    issuer,
                    not_before: unix(leaf.not_before),
                    not_after: unix(leaf.not_after),
                    renew_at: unix(entry.renew),
                    expires_in_secs: leaf
                        .not_after
                        .duration_since(now)
                        .map_or(0, |d| d.as_secs()),
                    valid: leaf.not_before <= now && now < leaf.not_after,
                    chain_len: leaf.chain.len(),
                }
            })
            .collect();
        views.sort_by(|a, b| a.identity.cmp(&b.identity));
        views
    }

    /// Forgets the identities not in `keep` (no pod of theirs is left on this node), and their
    /// expiry series. Handles already given out keep their last leaf until dropped.
    pub fn retain(&self, keep: &HashSet<SpiffeId>) {
        self.lock().retain(|id, _| {
            let kept = keep.contains(id);
            if !kept {
                self.expiry.remove(&CertLabels::from(id));
                info!(identity = %id, "certificate dropped: no pod of this identity on the node");
            }
            kept
        });
    }

    /// Renews each leaf when its renewal time comes, until `stop` turns true or its sender is
    /// dropped. A failed renewal keeps the current leaf and is retried with backoff.
    pub async fn run_rotation(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow_and_update() {
                return;
            }
            let wait = match self.rotate_due() {
                Some(next) => next
                    .duration_since((self.clock)())
                    .unwrap_or_default()
                    .min(MAX_WAIT),
                None => MAX_WAIT,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.added.notified() => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Renews the leaves that are due; returns the next renewal time, if any leaf is held.
    fn rotate_due(&self) -> Option<SystemTime> {
        let now = (self.clock)();
        let due: Vec<(SpiffeId, Arc<ArcSwap<Leaf>>)> = self
            .lock()
            .iter()
            .filter(|(_, entry)| entry.renew <= now)
            .map(|(id, entry)| (id.clone(), Arc::clone(&entry.leaf)))
            .collect();
        for (id, handle) in due {
            let result = self.issuer.issue_leaf_at(&id, self.lifetime, now);
            let mut leaves = self.lock();
            // Forgotten by `retain` meanwhile: nobody needs a new leaf.
            let Some(entry) = leaves.get_mut(&id) else {
                continue;
            };
            match result {
                Ok(leaf) => {
                    info!(identity = %id, not_after = %fmt_time(leaf.not_after), "certificate renewed");
                    entry.renew = self.renew_time(&leaf, now);
                    entry.failures = 0;
                    self.set_expiry(&id, &leaf);
                    handle.store(Arc::new(leaf));
                }
                Err(error) => {
                    entry.failures = entry.failures.saturating_add(1);
                    let retry = RETRY_FIRST
                        .saturating_mul(1 << entry.failures.min(10))
                        .min(RETRY_MAX);
                    warn!(
                        identity = %id,
                        %error,
                        retry_in = ?retry,
                        current_not_after = %fmt_time(handle.load().not_after),
                        "certificate renewal failed; the current certificate stays in use"
                    );
                    entry.renew = now + retry;
                }
            }
        }
        self.lock().values().map(|entry| entry.renew).min()
    }

    /// The leaf's half-life moved by a random ±10% of it, and not sooner than
    /// [`MIN_RENEW_INTERVAL`] from `now`.
    fn renew_time(&self, leaf: &Leaf, now: SystemTime) -> SystemTime {
        let renew_at = leaf.renew_at();
        let half = renew_at
            .duration_since(leaf.issued_at())
            .unwrap_or_default();
        let frac: f64 = self
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .random_range(-JITTER..=JITTER);
        let shift = half.mul_f64(frac.abs());
        let jittered = if frac < 0.0 {
            renew_at.checked_sub(shift).unwrap_or(renew_at)
        } else {
            renew_at + shift
        };
        jittered.max(now + MIN_RENEW_INTERVAL)
    }

    fn set_expiry(&self, id: &SpiffeId, leaf: &Leaf) {
        let secs = i64::try_from(unix_secs(leaf.not_after)).unwrap_or(i64::MAX);
        self.expiry.get_or_create(&CertLabels::from(id)).set(secs);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        self.leaves.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(crate) fn renew_times(&self) -> Vec<(SpiffeId, SystemTime)> {
        self.lock()
            .iter()
            .map(|(id, entry)| (id.clone(), entry.renew))
            .collect()
    }
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("issuer", &self.issuer)
            .field("lifetime", &self.lifetime)
            .field("identities", &self.lock().len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
