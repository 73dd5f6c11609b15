//! L4 authorization of inbound connections: the one place where HBONE streams, plaintext
//! connections and same-node deliveries are decided, before a byte reaches the application,
//! and decided again while they last, whenever the policies of their workload change.
//!
//! A decision is recorded on the connection's span (`decision`, `policy`, `rule`, `audit`), so
//! that the connection's one log line says which policy and rule decided it, and counted in
//! `mesh_policy_decisions_total`.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::sync::watch;
use tracing::{field::display, Span};

use super::{Error, Inputs, Pod};
use crate::{
    identity::SpiffeId,
    metrics::{DecisionLabels, PolicyLabel, RevokedLabels},
    policy::{self, Decision, Reason, Selected},
};

/// Who connects, as policy sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The verified identity; `None` for plaintext.
    pub identity: Option<Arc<SpiffeId>>,
    /// The source address.
    pub src: IpAddr,
}

/// An allowed connection: what it was decided under, to decide again when that changes.
#[derive(Debug)]
pub struct Grant {
    peer: Peer,
    dst: SocketAddr,
    selected: Option<Arc<Selected>>,
    /// Policy changes since the decision.
    changes: watch::Receiver<u64>,
}

/// Decides a connection from `peer` to `dst` of `pod`; records the decision (on the span and
/// on `conn`, as `/connections` lists it) and counts it.
/// `Err(Error::Denied)` when denied: the caller refuses the connection (403 or reset).
pub fn authorize(
    pod: &Pod,
    inputs: &Inputs,
    peer: Peer,
    dst: SocketAddr,
    conn: &super::live::Conn,
) -> Result<Grant, Error> {
    // Subscribed before the snapshot is read: a change after the read is seen by `enforce`.
    let mut changes = inputs.store.subscribe_authz();
    changes.borrow_and_update();
    let selected = inputs.store.load().authorization(&pod.key).cloned();
    let decision = decide(selected.as_deref(), &peer, dst);
    record(&decision);
    conn.set_decision(&decision);
    count(inputs, &decision);
    if decision.allowed {
        Ok(Grant {
            peer,
            dst,
            selected,
            changes,
        })
    } else {
        Err(Error::Denied(Box::new(decision)))
    }
}

fn decide(selected: Option<&Selected>, peer: &Peer, dst: SocketAddr) -> Decision {
    policy::evaluate(
        selected,
        &policy::Conn {
            identity: peer.identity.as_deref(),
            src: peer.src,
            dst: dst.ip(),
            port: dst.port(),
        },
    )
}

/// Runs an allowed connection's byte copy; whenever the policies of `pod` change (since the
/// decision), decides the connection again and ends it (dropping both sides) when it is now
/// denied. `copy` comes boxed: a connection's task holds it once, and this wrapper adds only
/// the grant and the wait for a change.
pub async fn enforce<F>(
    pod: &Pod,
    inputs: &Inputs,
    mut grant: Grant,
    mut copy: F,
) -> Result<(u64, u64), Error>
where
    F: Future<Output = std::io::Result<(u64, u64)>> + Unpin,
{
    loop {
        tokio::select! {
            result = &mut copy => return result.map_err(Error::Stream),
            changed = grant.changes.changed() => {
                if changed.is_err() {
                    // The store is gone (shutdown): nothing will change any more.
                    return copy.await.map_err(Error::Stream);
                }
                let selected = inputs.store.load().authorization(&pod.key).cloned();
                // The state keeps a workload's entry in place while its policies are the same.
                let same = match (&selected, &grant.selected) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                };
                if same {
                    continue;
                }
                let decision = decide(selected.as_deref(), &grant.peer, grant.dst);
                if decision.allowed {
                    // The span keeps the decision that admitted the connection.
                    tracing::debug!(
                        policy = %decision.policy_str(),
                        rule = %decision.rule_str(),
                        "still allowed after a policy change"
                    );
                    grant.selected = selected;
                    continue;
                }
                inputs
                    .metrics
                    .policy.revoked
                    .get_or_create(&RevokedLabels {
                        policy: PolicyLabel(decision.policy_label()),
                        reason: decision.reason.as_str(),
                    })
                    .inc();
                return Err(Error::Revoked(Box::new(decision)));
            }
        }
    }
}

/// Records the decision that admits or refuses the connection on its span (once: a later
/// decision that closes it is in the closing event's fields).
fn record(d: &Decision) {
    let span = Span::current();
    span.record("decision", display(d.verdict()));
    span.record("policy", display(d.policy_str()));
    span.record("rule", display(d.rule_str()));
    if !d.audited.is_empty() {
        span.record("audit", display(d.audited_str()));
    }
}

fn count(inputs: &Inputs, d: &Decision) {
    let m = &inputs.metrics;
    for (policy, _) in &d.audited {
        m.policy
            .decisions
            .get_or_create(&DecisionLabels {
                action: "audit",
                policy: PolicyLabel(policy.clone()),
                reason: "audit_rule",
            })
            .inc();
    }
    if d.reason == Reason::NoPolicy {
        m.policy.allowed_without_policy.inc();
        return;
    }
    m.policy
        .decisions
        .get_or_create(&DecisionLabels {
            action: d.verdict(),
            policy: PolicyLabel(d.policy_label()),
            reason: d.reason.as_str(),
        })
        .inc();
}
