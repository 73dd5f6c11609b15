//! Workload identity: SPIFFE ids, the certificate authorities that sign them, the per-node leaf
//! certificate manager with rotation, and peer certificate verification.
//!
//! Layout of trust: a root CA (`mesh-agent ca init`, or the operator's own PKI) signs one
//! intermediate per node agent (`mesh-agent ca issue-node`, `pathlen:0`: it can only sign
//! leaves); the node agent mints short-lived ECDSA P-256 leaves, one per service account of the
//! pods on its node, with the SPIFFE id as the only URI SAN. Private keys of leaves never leave
//! memory, and no key material is ever logged or printed by `Debug`. See docs/identity.md.

pub mod ca;
pub mod cli;
mod manager;
mod pem;
mod spiffe;
mod verify;

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use ca::{IssuedPem, Issuer, Leaf, TrustBundle};
pub use manager::{expiry_family, CertLabels, CertManager, CertView};
pub use spiffe::SpiffeId;
pub use verify::{verify_peer, verify_peer_issued, PeerRole, Placement};

/// The trust domain used when neither the configuration nor the CA certificate names one.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Errors of the identity module. Messages name the file, field or identity at fault and what
/// an operator should check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid SPIFFE id {input:?}: {reason} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
    InvalidSpiffeId { input: String, reason: String },

    #[error("invalid trust domain {input:?}: {reason} (lowercase letters, digits, '.', '-' and '_' only)")]
    InvalidTrustDomain { input: String, reason: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: no PEM certificate found (expected one or more \"-----BEGIN CERTIFICATE-----\" blocks)")]
    NoCertificate { path: PathBuf },

    #[error("{path}: certificate #{index} is not usable: {reason}")]
    InvalidCertificate {
        path: PathBuf,
        /// 1-based position in the PEM file.
        index: usize,
        reason: String,
    },

    #[error("{path}: certificate #{index} ({subject}) is not a CA certificate (basicConstraints CA:true missing{detail}); give the CA certificate first in the file")]
    NotACa {
        path: PathBuf,
        index: usize,
        subject: String,
        detail: &'static str,
    },

    #[error("{path}: no private key found (expected an unencrypted \"PRIVATE KEY\" (PKCS#8) or \"EC PRIVATE KEY\" (SEC1) PEM block; encrypted keys are not supported)")]
    NoPrivateKey { path: PathBuf },

    #[error("{path}: unsupported private key: {reason}")]
    UnsupportedKey { path: PathBuf, reason: String },

    #[error("private key {key} does not belong to certificate {cert} (their public keys differ): check that the two files are a pair")]
    KeyMismatch { key: PathBuf, cert: PathBuf },

    #[error("{path} already exists: refusing to overwrite a private key (move it away or choose another --out directory)")]
    KeyFileExists { path: PathBuf },

    #[error(
        "{what}: trust domain {found:?} does not match the issuer's trust domain {expected:?}"
    )]
    TrustDomainMismatch {
        what: String,
        expected: String,
        found: String,
    },

    #[error("issuer {subject} may not sign CA certificates (pathLenConstraint 0 or no room left in its path length): issue node intermediates from the root or from a CA without pathlen:0")]
    CannotSignCa { subject: String },

    #[error("issuer {subject} expired at {not_after}: renew the node CA (mesh-agent ca issue-node) and restart the agent")]
    IssuerExpired { subject: String, not_after: String },

    #[error("invalid node name {node:?}: use the Kubernetes node name (letters, digits, '.', '-', '_'; not starting with '.')")]
    InvalidNodeName { node: String },

    #[error("the new CA of node {node} does not verify under the root {root}: {source}; mesh certificates it signs would be refused")]
    ChainCheck {
        node: String,
        root: String,
        #[source]
        source: Box<Error>,
    },

    #[error("invalid certificate lifetime {lifetime:?}: {reason}")]
    InvalidLifetime {
        lifetime: Duration,
        reason: &'static str,
    },

    #[error("generating a certificate for {what} failed: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },

    #[error("building the TLS key for {what} failed: {source}")]
    TlsKey {
        what: String,
        #[source]
        source: rustls::Error,
    },

    #[error("peer certificate expired at {not_after} (now {now}): is the peer's certificate rotation stuck, or are the clocks of the two nodes apart?")]
    PeerExpired { not_after: String, now: String },

    #[error("peer certificate is not valid before {not_before} (now {now}): are the clocks of the two nodes apart?")]
    PeerNotYetValid { not_before: String, now: String },

    #[error("peer certificate does not chain to a trusted root: is the peer in another trust domain, or is its root missing from the trust bundle?")]
    PeerUnknownIssuer,

    #[error("peer certificate for {identity} was issued by node {node}, which runs no workload with that identity (a node mints only its own pods' identities)")]
    PeerIssuedByAnotherNode { identity: String, node: String },

    #[error("peer certificate for {identity} was issued by node {node}, but the destination runs on node {expected}")]
    PeerNotFromDestinationNode {
        identity: String,
        node: String,
        expected: String,
    },

    #[error("peer certificate for {identity} chains to a root of trust domain {root_domain}, which vouches only for its own identities")]
    PeerRootOfAnotherDomain {
        identity: String,
        root_domain: String,
    },

    #[error("peer certificate lacks extended key usage {wanted} (needed for a TLS {role:?}): it was not issued for mesh mTLS")]
    PeerBadEku {
        role: PeerRole,
        wanted: &'static str,
    },

    #[error("peer certificate has no URI SAN: it carries no SPIFFE identity")]
    PeerNoUriSan,

    #[error(
        "peer certificate has {count} URI SANs: a mesh identity certificate must carry exactly one"
    )]
    PeerMultipleUriSans { count: usize },

    #[error("peer certificate URI SAN {uri:?} is not a SPIFFE workload id: {reason}")]
    PeerMalformedId { uri: String, reason: String },

    #[error("peer certificate rejected: {0}")]
    PeerRejected(webpki::Error),
}

/// The rustls error a certificate verifier returns for a verification failure, so that the peer
/// gets the matching TLS alert (certificate_expired, unknown_ca, unsupported_certificate,
/// certificate_unknown for identity problems).
/// Log the identity error itself first: only the catch-all keeps its message.
impl From<Error> for rustls::Error {
    fn from(error: Error) -> Self {
        use rustls::{CertificateError as C, Error as E, OtherError};
        E::InvalidCertificate(match error {
            Error::PeerExpired { .. } => C::Expired,
            Error::PeerNotYetValid { .. } => C::NotValidYet,
            Error::PeerUnknownIssuer | Error::PeerRootOfAnotherDomain { .. } => C::UnknownIssuer,
            Error::PeerBadEku { .. } => C::InvalidPurpose,
            Error::PeerRejected(webpki::Error::BadDer | webpki::Error::BadDerTime) => {
                C::BadEncoding
            }
            other => C::Other(OtherError(std::sync::Arc::new(other))),
        })
    }
}

/// Seconds since the Unix epoch (0 for times before it).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `t` rounded down to a whole second, as certificates carry no finer time.
pub(crate) fn whole_secs(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_secs(t))
}

/// RFC 3339 (UTC, second precision) rendering of a time, for logs and error messages.
pub(crate) fn fmt_time(t: SystemTime) -> String {
    fmt_unix(unix_secs(t))
}

/// RFC 3339 rendering of seconds since the Unix epoch.
pub(crate) fn fmt_unix(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm), in u64 arithmetic
    // shifted by 719_468 days so that nothing goes negative.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
