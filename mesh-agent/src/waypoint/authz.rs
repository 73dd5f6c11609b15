//! Authorization at the waypoint: the policies bound to a service (`targetRefs`), decided with
//! the client's identity from its mTLS certificate, never from a header.

use http::StatusCode;

use super::{
    normalize,
    proxy::{flags, Downstream, Local, Record, Waypoint},
};
use crate::state::Snapshot;

/// L7 authorization of the request with the client's identity (from its mTLS certificate,
/// never a header), under the policies bound to the service (`targetRefs`): a denied request
/// is answered 403 and its log line names the policy and rule.
pub(super) fn authorize(
    wp: &Waypoint,
    down: &Downstream,
    snap: &Snapshot,
    parts: &http::request::Parts,
    target: &normalize::Target,
    host: &str,
    record: &mut Record,
) -> Result<(), Local> {
    let Some(selected) = bound(wp, down, snap) else {
        return Ok(());
    };
    let decision = crate::policy::decide_request(
        &selected,
        &crate::policy::Request {
            identity: Some(&down.identity),
            src: down.addr.ip(),
            dst: down.authority.ip(),
            port: down.authority.port(),
            host,
            method: parts.method.as_str(),
            path: &target.path,
            headers: &parts.headers,
        },
    );
    record.policy = format!(
        "{} {}#{} ({})",
        decision.verdict(),
        decision.policy_label(),
        decision.rule_str(),
        decision.reason.as_str()
    );
    if decision.allowed {
        Ok(())
    } else {
        Err(Local::new(
            StatusCode::FORBIDDEN,
            flags::DENIED,
            format!(
                "denied by {} rule {} ({})",
                decision.policy_label(),
                decision.rule_str(),
                decision.reason.as_str()
            ),
        ))
    }
}

/// L4 authorization of a stream that is not HTTP, under the service's bound policies: L7
/// attributes cannot be seen, so an ALLOW rule that needs them matches nothing and a DENY rule
/// that names them denies (fail closed).
pub(super) fn authorize_opaque(
    wp: &Waypoint,
    down: &Downstream,
    snap: &Snapshot,
) -> Result<(), String> {
    let Some(selected) = bound(wp, down, snap) else {
        return Ok(());
    };
    let decision = crate::policy::evaluate(
        Some(&selected),
        &crate::policy::Conn {
            identity: Some(&down.identity),
            src: down.addr.ip(),
            dst: down.authority.ip(),
            port: down.authority.port(),
        },
    );
    if decision.allowed {
        Ok(())
    } else {
        Err(format!(
            "denied by {} rule {} ({})",
            decision.policy_label(),
            decision.rule_str(),
            decision.reason.as_str()
        ))
    }
}

/// The policies bound to the service the client asked for; `None` when there are none.
fn bound(wp: &Waypoint, down: &Downstream, snap: &Snapshot) -> Option<crate::policy::Selected> {
    let (namespace, service) = down
        .service
        .split_once('/')
        .unwrap_or((wp.namespace.as_str(), down.service.as_str()));
    let selected = snap.service_policies(namespace, service);
    (!selected.is_empty()).then_some(selected)
}
