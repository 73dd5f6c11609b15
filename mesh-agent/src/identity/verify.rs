//! Verification of a peer's certificate chain and extraction of its SPIFFE identity, for the
//! tunnel's rustls client and server certificate verifiers.

use rustls::pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;

use super::{fmt_unix, Error, SpiffeId, TrustBundle};

/// Which side of the TLS handshake the peer is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is the TLS client: its certificate needs extended key usage clientAuth.
    Client,
    /// The peer is the TLS server: its certificate needs extended key usage serverAuth.
    Server,
}

impl PeerRole {
    fn eku_name(self) -> &'static str {
        match self {
            PeerRole::Client => "clientAuth",
            PeerRole::Server => "serverAuth",
        }
    }
}

/// Verifies a peer chain against the bundle, then extracts the peer's identity.
///
/// The chain must lead from `end_entity` (through `intermediates`) to one of the bundle's roots,
/// every certificate must be valid at `now`, and the end-entity certificate must carry the
/// extended key usage of its `role` (clientAuth for a client, serverAuth for a server). No DNS
/// name is checked: SPIFFE certificates carry none. The end-entity certificate must then carry
/// exactly one URI SAN, a SPIFFE workload id, in the trust domain of the root the chain ends at
/// (a root vouches for one domain: [`TrustBundle`]), which is returned. Comparing the id with
/// what is expected is the caller's business.
pub fn verify_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, Error> {
    verify_peer_issued(end_entity, intermediates, bundle, now, role).map(|(id, _)| id)
}

/// [`verify_peer`], and the node that issued the certificate: the node its issuer (the first
/// intermediate of the verified chain) names in its URI SAN `spiffe://<td>/node/<name>`.
/// `None` for a leaf signed by a root or by an intermediate that names no node (a central CA,
/// as istiod issues): such leaves are not bound to a node.
pub fn verify_peer_issued(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
    role: PeerRole,
) -> Result<(SpiffeId, Option<String>), Error> {
    let cert = EndEntityCert::try_from(end_entity).map_err(Error::PeerRejected)?;
    let usage = match role {
        PeerRole::Client => KeyUsage::client_auth(),
        PeerRole::Server => KeyUsage::server_auth(),
    };
    let path = cert
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            bundle.anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| map_webpki(e, role))?;
    let root_domain = bundle.domain_of(path.anchor()).map(str::to_owned);
    let issuer_node = path
        .intermediate_certificates()
        .next()
        .and_then(|issuer| super::ca::node_of_ca(&issuer.der()));

    // webpki accepts an end-entity certificate without any extended key usage; mesh
    // certificates always carry it, so require it explicitly.
    let (_, parsed) = x509_parser::parse_x509_certificate(end_entity)
        .map_err(|_| Error::PeerRejected(webpki::Error::BadDer))?;
    let eku = parsed
        .extended_key_usage()
        .map_err(|_| Error::PeerRejected(webpki::Error::BadDer))?;
    let has_eku = eku.is_some_and(|eku| match role {
        PeerRole::Client => eku.value.client_auth,
        PeerRole::Server => eku.value.server_auth,
    });
    if !has_eku {
        return Err(Error::PeerBadEku {
            role,
            wanted: role.eku_name(),
        });
    }

    let sans = parsed
        .subject_alternative_name()
        .map_err(|_| Error::PeerRejected(webpki::Error::BadDer))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|s| &s.value.general_names)
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let id: SpiffeId = match uris.as_slice() {
        [] => return Err(Error::PeerNoUriSan),
        [uri] => uri.parse().map_err(|e| Error::PeerMalformedId {
            uri: (*uri).to_owned(),
            reason: match e {
                Error::InvalidSpiffeId { reason, .. } => reason,
                other => other.to_string(),
            },
        })?,
        several => {
            return Err(Error::PeerMultipleUriSans {
                count: several.len(),
            })
        }
    };
    // A root vouches for its own trust domain only (a federated root cannot mint ours).
    match root_domain {
        Some(domain) if domain != id.trust_domain => Err(Error::PeerRootOfAnotherDomain {
            identity: id.to_string(),
            root_domain: domain,
        }),
        _ => Ok((id, issuer_node)),
    }
}

/// Which nodes may issue which identities: a node mints leaves only for the service accounts of
/// its own pods, so a leaf for `ns/X/sa/Y` issued by node N is accepted only when the mesh
/// state places (or placed, within a short grace) a workload of X with service account Y on N.
pub trait Placement: Send + Sync + std::fmt::Debug {
    /// Whether `node` may have issued a certificate for `id`.
    fn may_issue(&self, node: &str, id: &SpiffeId) -> bool;
}

fn map_webpki(error: webpki::Error, role: PeerRole) -> Error {
    match error {
        webpki::Error::CertExpired { time, not_after } => Error::PeerExpired {
            not_after: fmt_unix(not_after.as_secs()),
            now: fmt_unix(time.as_secs()),
        },
        webpki::Error::CertNotValidYet { time, not_before } => Error::PeerNotYetValid {
            not_before: fmt_unix(not_before.as_secs()),
            now: fmt_unix(time.as_secs()),
        },
        // A CA of the same name whose key did not sign it is an untrusted chain too: roots
        // made for the same trust domain (root rotation) share their subject name.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            Error::PeerUnknownIssuer
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => Error::PeerBadEku {
            role,
            wanted: role.eku_name(),
        },
        #[expect(
            deprecated,
            reason = "older webpki paths may still report the bare variant"
        )]
        webpki::Error::RequiredEkuNotFound => Error::PeerBadEku {
            role,
            wanted: role.eku_name(),
        },
        other => Error::PeerRejected(other),
    }
}
