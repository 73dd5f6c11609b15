//! What the waypoint reports about requests: Istio's request metrics with Istio's names and
//! labels (so that Istio's dashboards and Kiali read them unchanged), W3C trace context, and
//! the waypoint's own `mesh_waypoint_*` families.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};
use rand::RngCore as _;

/// Labels of Istio's request metrics (Istio's standard labels without the cluster and locality
/// ones). A value the waypoint does not know is empty.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    /// The workload's canonical service (`state::Workload::canonical_service`) and revision,
    /// and again as app and version, as Istio's proxies report them.
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// A histogram family built with fixed buckets.
pub type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // Istio's buckets, in milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn size_histogram() -> Histogram {
    // Istio's buckets, in bytes: 1 to 10^9 by powers of ten.
    Histogram::new((0..10).map(|e| 10f64.powi(e)))
}

/// Labels of requests the waypoint answered itself, by why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalLabels {
    pub reason: &'static str,
}

/// Labels of connections by how they were handled.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

/// Labels of route rejections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub route: String,
    pub kept: &'static str,
}

/// Labels of endpoint events (ejections, breaker trips) by service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// Labels of retries: by service and outcome (`sent`, `budget_exhausted`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub service: String,
    pub result: &'static str,
}

/// The waypoint's metric handles.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histograms,
    pub request_bytes: Histograms,
    pub response_bytes: Histograms,
    /// CONNECT streams by what they carried: http1, http2, tcp (not HTTP), refused.
    pub streams: Family<ProtocolLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub ejections: Family<ServiceLabels, Counter>,
    pub overflows: Family<ServiceLabels, Counter>,
    pub routes: Gauge,
    pub routes_rejected: Family<RejectedLabels, Counter>,
}

impl Metrics {
    /// The handles, registered in `registry`.
    pub fn new(registry: &crate::metrics::Metrics) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            request_bytes: Family::new_with_constructor(size_histogram as fn() -> Histogram),
            response_bytes: Family::new_with_constructor(size_histogram as fn() -> Histogram),
            streams: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            overflows: Family::default(),
            routes: Gauge::default(),
            routes_rejected: Family::default(),
        };
        registry.register(
            "istio_requests",
            "Requests through the waypoint (Istio's standard metric)",
            m.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration through the waypoint, until the response ended",
            m.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        registry.register(
            "mesh_waypoint_streams",
            "CONNECT streams the waypoint took, by what they carried (http1, http2, tcp) or refused",
            m.streams.clone(),
        );
        registry.register(
            "mesh_waypoint_retries",
            "Retries by backend service and result (sent, budget_exhausted)",
            m.retries.clone(),
        );
        registry.register(
            "mesh_waypoint_ejections",
            "Endpoints ejected by outlier detection, by backend service",
            m.ejections.clone(),
        );
        registry.register(
            "mesh_waypoint_overflows",
            "Requests refused by a backend service's limits (503, response flag UO)",
            m.overflows.clone(),
        );
        registry.register(
            "mesh_waypoint_routes",
            "HTTPRoutes in force",
            m.routes.clone(),
        );
        registry.register(
            "mesh_waypoint_routes_rejected",
            "Invalid HTTPRoutes found by a load, by route and whether its last good version was kept",
            m.routes_rejected.clone(),
        );
        m
    }
}

/// W3C trace context: the trace a request belongs to and the span the waypoint adds to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: [u8; 16],
    /// The waypoint's span (the parent the upstream sees).
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl Trace {
    /// Continues the client's trace (`traceparent`, version 00 or a later one read as 00) or
    /// starts a new one when it is absent or invalid.
    pub fn continue_or_start(traceparent: Option<&[u8]>) -> Trace {
        let mut span_id = [0u8; 8];
        while span_id == [0u8; 8] {
            rand::rng().fill_bytes(&mut span_id);
        }
        if let Some((trace_id, flags)) = traceparent.and_then(parse) {
            return Trace {
                trace_id,
                span_id,
                flags,
            };
        }
        let mut trace_id = [0u8; 16];
        while trace_id == [0u8; 16] {
            rand::rng().fill_bytes(&mut trace_id);
        }
        Trace {
            trace_id,
            span_id,
            flags: 0,
        }
    }

    /// The `traceparent` header value to send upstream.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }

    /// The trace id, for the access log.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `version-traceid-parentid-flags`, lowercase hex; all-zero ids and version ff are invalid.
fn parse(value: &[u8]) -> Option<([u8; 16], u8)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(version, 2) || version == "ff" || !lower_hex(trace, 32) || !lower_hex(parent, 16)
    {
        return None;
    }
    // Version 00 has exactly four parts; a later version may add more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !lower_hex(flags, 2) {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&trace[2 * i..2 * i + 2], 16).ok()?;
    }
    if trace_id == [0u8; 16] || parent.bytes().all(|b| b == b'0') {
        return None;
    }
    Some((trace_id, u8::from_str_radix(flags, 16).ok()? & 0x01))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_continued_or_started() {
        let incoming = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = Trace::continue_or_start(Some(incoming));
        let header = t.header();
        assert!(
            header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{header}"
        );
        assert!(header.ends_with("-01"));
        assert!(!header.contains("00f067aa0ba902b7"), "a new span: {header}");
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"garbage",
        ] {
            let t = Trace::continue_or_start(Some(bad));
            assert!(
                !t.header().contains("4bf92f3577b34da6a3ce929d0e0e4736"),
                "{:?} was continued",
                String::from_utf8_lossy(bad)
            );
            assert_eq!(t.header().len(), 55);
        }
        let a = Trace::continue_or_start(None);
        let b = Trace::continue_or_start(None);
        assert_ne!(a.trace_id, b.trace_id);
    }
}
