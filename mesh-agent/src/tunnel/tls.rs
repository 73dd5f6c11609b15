//! TLS for HBONE: TLS 1.3 only, AES-GCM suites, X25519, ALPN `h2`, no SNI, no resumption, and
//! SPIFFE verification on both sides. Certificates are resolved per handshake from the
//! identity manager's current leaf, so rotation never touches established connections and new
//! handshakes use the new certificate. Secret extraction is enabled: rustls makes the
//! handshake and `tunnel::record` protects the records after it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert, Resumption,
    },
    crypto::{ring, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, NoServerSessionStorage, ResolvesServerCert,
    },
    sign::CertifiedKey,
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme,
};
use tracing::warn;

use crate::identity::{
    verify_peer_issued, Error as IdentityError, Leaf, PeerRole, SpiffeId, TrustBundle,
};

/// ALPN of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider: ring, TLS 1.3 AES-GCM suites, X25519 (what ztunnel negotiates).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        kx_groups: vec![ring::kx_group::X25519],
        ..ring::default_provider()
    })
}

/// The server side of one pod: presents the pod's identity, requires a client certificate
/// from the trust domain.
pub fn server_config(
    bundle: TrustBundle,
    trust_domain: String,
    leaf: Arc<ArcSwap<Leaf>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = SpiffeClientVerifier {
        bundle,
        trust_domain,
        provider: provider.clone(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(LeafResolver(leaf)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    // The record layer after the handshake is ours (tunnel::record): rustls hands over the
    // traffic secrets.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The client side: presents the source identity and accepts only a server whose SPIFFE id is
/// one of `expected`.
pub fn client_config(
    bundle: TrustBundle,
    leaf: Arc<ArcSwap<Leaf>>,
    expected: Vec<SpiffeId>,
    destination_node: Option<String>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        bundle,
        expected,
        destination_node,
        provider: provider.clone(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(LeafResolver(leaf)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    // See server_config: tunnel::record takes over after the handshake.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The SPIFFE id in a certificate already verified by the handshake (first URI SAN).
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri.parse().ok(),
        _ => None,
    })
}

/// When a certificate expires, in Unix seconds (for logs: which certificate a peer used).
pub fn not_after_of(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// Serves the current leaf of one identity to rustls, on both sides.
#[derive(Debug)]
struct LeafResolver(Arc<ArcSwap<Leaf>>);

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().certified_key())
    }
}

impl ResolvesClientCert for LeafResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The handshake signature checks, the same for both verifiers: delegated to the provider's
/// algorithms (TLS 1.2 is never negotiated, but the trait requires the method).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Accepts clients whose chain leads to the bundle and whose SPIFFE id is in our trust
/// domain. Authorization decides the rest.
#[derive(Debug)]
struct SpiffeClientVerifier {
    bundle: TrustBundle,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        // Which node issued it is checked once the handshake is done (tunnel::server's
        // `admit`: the agent may wait there for its state to catch up).
        let (id, _) = verify_peer_issued(
            end_entity,
            intermediates,
            &self.bundle,
            now,
            PeerRole::Client,
        )
        .map_err(|e| {
            warn!(error = %e, "HBONE client certificate rejected");
            TlsError::from(e)
        })?;
        if id.trust_domain != self.trust_domain {
            warn!(identity = %id, trust_domain = %self.trust_domain, "HBONE client from another trust domain rejected");
            return Err(TlsError::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

/// Accepts a server whose chain leads to the bundle and whose SPIFFE id is one of `expected`.
/// The server name is not used: SPIFFE certificates carry no DNS names.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: Vec<SpiffeId>,
    /// The destination pod's node: a node-issued server certificate must come from it.
    destination_node: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let (id, issuer_node) = verify_peer_issued(
            end_entity,
            intermediates,
            &self.bundle,
            now,
            PeerRole::Server,
        )
        .map_err(|e| {
            warn!(error = %e, "HBONE server certificate rejected");
            TlsError::from(e)
        })?;
        if let (Some(node), Some(expected)) = (issuer_node, &self.destination_node) {
            if node != *expected {
                let e = IdentityError::PeerNotFromDestinationNode {
                    identity: id.to_string(),
                    node,
                    expected: expected.clone(),
                };
                warn!(error = %e, "HBONE server certificate rejected");
                return Err(e.into());
            }
        }
        if !self.expected.contains(&id) {
            let expected: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
            warn!(identity = %id, expected = %expected.join(" or "), "HBONE server identity mismatch: refused");
            return Err(TlsError::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}
