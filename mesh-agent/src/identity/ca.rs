//! Certificate authorities ([`Issuer`]), the leaf certificates they mint ([`Leaf`]) and the
//! roots the agent trusts ([`TrustBundle`]).

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::RngCore as _;
use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor},
    sign::CertifiedKey,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use super::{
    fmt_time, pem,
    spiffe::{check_trust_domain, validate_trust_domain},
    whole_secs, Error, SpiffeId, DEFAULT_TRUST_DOMAIN,
};

/// Certificates are back-dated by this much so that a peer whose clock is a little behind
/// ours still accepts them.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// A certificate authority that can sign: a root, or an intermediate (with its chain up to, not
/// including, the root). Its `Debug` output never shows the private key.
pub struct Issuer {
    cert: CertificateDer<'static>,
    /// Intermediates above `cert`, nearest first, without the root.
    chain: Vec<CertificateDer<'static>>,
    /// The root `cert` chains to, when known (itself for a root).
    root: Option<CertificateDer<'static>>,
    signer: rcgen::Issuer<'static, KeyPair>,
    subject: String,
    trust_domain: String,
    trust_domain_from_uri: bool,
    not_after: SystemTime,
    /// False when a pathLenConstraint forbids the CAs it would sign.
    can_sign_cas: bool,
}

/// What the issuer's own certificate says about itself.
struct CaInfo {
    subject: String,
    not_after: SystemTime,
    self_signed: bool,
    /// The raw public key (SubjectPublicKeyInfo's BIT STRING contents).
    public_key: Vec<u8>,
    /// From a `spiffe://<td>` URI SAN.
    uri_trust_domain: Option<String>,
    /// From the subject's O attribute, when that is a valid trust domain name.
    org_trust_domain: Option<String>,
}

impl Issuer {
    /// Creates a self-signed root CA: ECDSA P-256, `CA:true` without path length limit,
    /// keyCertSign + cRLSign, CN `mesh root CA <td>`, O `<td>`, URI SAN `spiffe://<td>`.
    pub fn generate_root(trust_domain: &str, lifetime: Duration) -> Result<Issuer, Error> {
        check_trust_domain(trust_domain)?;
        let what = || format!("the root CA of {trust_domain}");
        let now = whole_secs(SystemTime::now());
        let not_after = add_lifetime(now, lifetime)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate(what()))?;
        let mut params = ca_params(&format!("mesh root CA {trust_domain}"), trust_domain)
            .map_err(generate(what()))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = back_dated(now).into();
        params.not_after = not_after.into();
        let cert = params.self_signed(&key).map_err(generate(what()))?;
        let cert = cert.der().clone();
        Issuer::from_parts(
            cert.clone(),
            Vec::new(),
            Some(cert),
            key,
            trust_domain,
            true,
        )
        .map_err(generate(what()))
    }

    /// Loads a CA from PEM files made by `mesh-agent ca` or elsewhere (cert-manager, an
    /// enterprise PKI, openssl). `cert_pem` holds the CA's certificate first, then optionally
    /// the intermediates above it (a self-signed root at the end is recognised and not sent to
    /// peers). `key_pem` holds its unencrypted key: PKCS#8 (ECDSA P-256/P-384, RSA, Ed25519) or
    /// SEC1 "EC PRIVATE KEY" (P-256/P-384).
    ///
    /// The trust domain comes from a `spiffe://<td>` URI SAN of the CA certificate, else from
    /// its O attribute when that is a valid trust domain name, else it is
    /// [`DEFAULT_TRUST_DOMAIN`]; [`Issuer::with_trust_domain`] overrides the last two.
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<Issuer, Error> {
        let certs = pem::read_certs(cert_pem)?;
        let infos = certs
            .iter()
            .enumerate()
            .map(|(i, der)| inspect_ca(der, cert_pem, i + 1))
            .collect::<Result<Vec<_>, _>>()?;
        let mut certs = certs.into_iter();
        let (Some(cert), Some(info)) = (certs.next(), infos.first()) else {
            return Err(Error::NoCertificate {
                path: cert_pem.to_owned(),
            });
        };
        let mut chain: Vec<_> = certs.collect();
        let root = if info.self_signed {
            Some(cert.clone())
        } else if infos.last().is_some_and(|last| last.self_signed) {
            chain.pop()
        } else {
            None
        };
        if SystemTime::now() >= info.not_after {
            return Err(Error::IssuerExpired {
                subject: info.subject.clone(),
                not_after: fmt_time(info.not_after),
            });
        }
        let key = load_key(key_pem)?;
        if key.der_bytes() != info.public_key.as_slice() {
            return Err(Error::KeyMismatch {
                key: key_pem.to_owned(),
                cert: cert_pem.to_owned(),
            });
        }
        let (trust_domain, from_uri) = match (&info.uri_trust_domain, &info.org_trust_domain) {
            (Some(td), _) => (td.clone(), true),
            (None, Some(td)) => (td.clone(), false),
            (None, None) => (DEFAULT_TRUST_DOMAIN.to_owned(), false),
        };
        Issuer::from_parts(cert, chain, root, key, &trust_domain, from_uri).map_err(|e| {
            Error::InvalidCertificate {
                path: cert_pem.to_owned(),
                index: 1,
                reason: format!("cannot sign with it: {e}"),
            }
        })
    }

    /// Sets the trust domain of a loaded CA whose certificate does not name one with a
    /// `spiffe://` URI SAN. A CA whose URI SAN names another trust domain is refused.
    pub fn with_trust_domain(mut self, trust_domain: &str) -> Result<Issuer, Error> {
        check_trust_domain(trust_domain)?;
        if self.trust_domain_from_uri && self.trust_domain != trust_domain {
            return Err(Error::TrustDomainMismatch {
                what: format!("configured trust domain for CA {}", self.subject),
                expected: self.trust_domain,
                found: trust_domain.to_owned(),
            });
        }
        trust_domain.clone_into(&mut self.trust_domain);
        Ok(self)
    }

    fn from_parts(
        cert: CertificateDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        root: Option<CertificateDer<'static>>,
        key: KeyPair,
        trust_domain: &str,
        trust_domain_from_uri: bool,
    ) -> Result<Issuer, rcgen::Error> {
        let parsed = parse(&cert).map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        let subject = parsed.subject().to_string();
        let not_after = unix_to_system(parsed.validity().not_after.timestamp());
        let path_len = parsed
            .basic_constraints()
            .ok()
            .flatten()
            .and_then(|bc| bc.value.path_len_constraint);
        // The signer takes the subject name and key identifier from the certificate itself, so
        // that what it signs chains to it byte for byte, also for CAs made elsewhere.
        let signer = rcgen::Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Issuer {
            cert,
            chain,
            root,
            signer,
            subject,
            trust_domain: trust_domain.to_owned(),
            trust_domain_from_uri,
            not_after,
            can_sign_cas: path_len != Some(0),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The end of this CA's validity; nothing it signs outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The issuer's own certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The root this issuer chains to, when known: itself for a root, the root it was issued
    /// from by [`Issuer::issue_intermediate`], or a self-signed certificate at the end of the
    /// PEM file it was loaded from.
    pub fn root_cert_der(&self) -> Option<CertificateDer<'static>> {
        self.root.clone()
    }

    /// Issues the intermediate CA of one node agent: ECDSA P-256, `CA:true` with
    /// `pathlen:0` (it can only sign leaves), keyCertSign, CN `mesh node <node>`, O naming the
    /// trust domain and URI SAN `spiffe://<td>/node/<node>` naming the node (verifiers accept
    /// its leaves only for workloads of that node); it expires no later than this issuer.
    pub fn issue_intermediate(&self, node: &str, lifetime: Duration) -> Result<Issuer, Error> {
        if !self.can_sign_cas {
            return Err(Error::CannotSignCa {
                subject: self.subject.clone(),
            });
        }
        check_node_name(node)?;
        let what = || format!("the intermediate CA of node {node:?}");
        let now = whole_secs(SystemTime::now());
        let (not_before, not_after) = self.validity(now, lifetime)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate(what()))?;
        let mut params = ca_params(&format!("mesh node {node}"), &self.trust_domain)
            .map_err(generate(what()))?;
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(node_uri(&self.trust_domain, node)).map_err(generate(what()))?,
        )];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, &self.signer)
            .map_err(generate(what()))?;
        Issuer::from_parts(
            cert.der().clone(),
            self.chain_to_send(),
            self.root.clone(),
            key,
            &self.trust_domain,
            true,
        )
        .map_err(generate(what()))
    }

    /// Mints a leaf certificate for `id`, valid from now (back-dated by [`CLOCK_SKEW`]) for
    /// `lifetime`, capped at this issuer's expiry.
    pub fn issue_leaf(&self, id: &SpiffeId, lifetime: Duration) -> Result<Leaf, Error> {
        self.issue_leaf_at(id, lifetime, SystemTime::now())
    }

    /// [`Issuer::issue_leaf`] with an explicit "now", for callers with their own clock.
    ///
    /// The leaf: a fresh ECDSA P-256 key, `CA:false`, keyUsage digitalSignature, extended key
    /// usage serverAuth + clientAuth, an empty subject and exactly one (critical) URI SAN, the
    /// id; a random 128-bit serial.
    fn sign_leaf(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<SignedLeaf, Error> {
        if id.trust_domain != self.trust_domain {
            return Err(Error::TrustDomainMismatch {
                what: format!("identity {id}"),
                expected: self.trust_domain.clone(),
                found: id.trust_domain.clone(),
            });
        }
        let what = || format!("identity {id}");
        let issued_at = whole_secs(now);
        let (not_before, not_after) = self.validity(issued_at, lifetime)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate(what()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = Ia5String::try_from(id.to_string()).map_err(generate(what()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, &self.signer)
            .map_err(generate(what()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain_to_send());
        Ok(SignedLeaf {
            chain,
            key,
            issued_at,
            not_before,
            not_after,
        })
    }

    /// Issues a leaf certificate for `id`, valid from `now - CLOCK_SKEW` for `lifetime`
    /// (capped at the issuer's expiry).
    pub fn issue_leaf_at(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Leaf, Error> {
        into_leaf(id, self.sign_leaf(id, lifetime, now)?)
    }

    /// A leaf for `id` handed to the workload that holds the identity (the workload API): the
    /// chain (leaf first, not the root) and the private key as PEM, with its expiry and renewal
    /// time.
    pub fn issue_leaf_pem(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<IssuedPem, Error> {
        let signed = self.sign_leaf(id, lifetime, now)?;
        let chain = signed
            .chain
            .iter()
            .map(|der| pem::encode("CERTIFICATE", der))
            .collect();
        let life = signed
            .not_after
            .duration_since(signed.issued_at)
            .unwrap_or_default();
        Ok(IssuedPem {
            chain,
            key: signed.key.serialize_pem(),
            not_after: signed.not_after,
            renew_at: signed.issued_at + life / 2,
        })
    }

    /// [`Issuer::issue_leaf`], and the leaf's private key (PKCS#8 DER) for tests that look for
    /// it where it must not be.
    #[cfg(test)]
    pub(crate) fn issue_leaf_and_key(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<(Leaf, Vec<u8>), Error> {
        let signed = self.sign_leaf(id, lifetime, SystemTime::now())?;
        let key = signed.key.serialize_der();
        Ok((into_leaf(id, signed)?, key))
    }

    /// Issues a leaf for `id` and writes it as files, for operators and tests (agents keep
    /// their leaves in memory): `<dir>/<name>-cert.pem` (the leaf, then its chain without the
    /// root) and `<dir>/<name>-key.pem` (mode 0600, never overwritten).
    pub fn write_leaf(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
        dir: &Path,
        name: &str,
    ) -> Result<(PathBuf, PathBuf), Error> {
        let signed = self.sign_leaf(id, lifetime, now)?;
        pem::ensure_dir(dir)?;
        let (cert_path, key_path) = pem::pair_paths(dir, name);
        let certs: String = signed
            .chain
            .iter()
            .map(|der| pem::encode("CERTIFICATE", der))
            .collect();
        pem::write_pair(&cert_path, &certs, &key_path, &signed.key.serialize_pem())?;
        Ok((cert_path, key_path))
    }

    /// The issuer certificate followed by its chain (not the root), as PEM.
    pub fn cert_pem(&self) -> String {
        std::iter::once(&self.cert)
            .chain(&self.chain)
            .map(|der| pem::encode("CERTIFICATE", der))
            .collect()
    }

    /// Writes `<dir>/<name>-cert.pem` (see [`Issuer::cert_pem`]) and `<dir>/<name>-key.pem`
    /// (PKCS#8, created with mode 0600; an existing key file is never overwritten). Creates
    /// `dir` (mode 0700) if needed. Returns the two paths.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), Error> {
        pem::ensure_dir(dir)?;
        let (cert_path, key_path) = pem::pair_paths(dir, name);
        pem::write_pair(
            &cert_path,
            &self.cert_pem(),
            &key_path,
            &self.signer.key().serialize_pem(),
        )?;
        Ok((cert_path, key_path))
    }

    /// What a certificate this issuer signs sends after itself: this issuer and the
    /// intermediates above it, never a root (peers have it in their bundle).
    fn chain_to_send(&self) -> Vec<CertificateDer<'static>> {
        let is_root = self.root.as_ref() == Some(self.cert_der());
        let own = (!is_root).then(|| self.cert_der().clone());
        own.into_iter().chain(self.chain.iter().cloned()).collect()
    }

    /// `(not_before, not_after)` of a certificate issued at `now` for `lifetime`.
    fn validity(
        &self,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(SystemTime, SystemTime), Error> {
        if now >= self.not_after {
            return Err(Error::IssuerExpired {
                subject: self.subject.clone(),
                not_after: fmt_time(self.not_after),
            });
        }
        let not_after = add_lifetime(now, lifetime)?.min(self.not_after);
        Ok((back_dated(now), not_after))
    }

    #[cfg(test)]
    pub(crate) fn signer(&self) -> &rcgen::Issuer<'static, KeyPair> {
        &self.signer
    }
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("subject", &self.subject)
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &fmt_time(self.not_after))
            .field("chain_len", &self.chain.len())
            .field("can_sign_cas", &self.can_sign_cas)
            .finish_non_exhaustive()
    }
}

/// A leaf certificate and its key, as used by TLS. The private key exists only inside the
/// rustls signing key; `Debug` shows no key material.
/// A freshly signed leaf before it becomes a [`Leaf`] or files.
struct SignedLeaf {
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
    issued_at: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// A leaf as PEM, for the workload that holds it ([`Issuer::issue_leaf_pem`]).
pub struct IssuedPem {
    /// The leaf, then its issuer and the issuer's intermediates (not the root).
    pub chain: String,
    /// The leaf's private key (PKCS#8).
    pub key: String,
    pub not_after: SystemTime,
    /// Half-way through its life, as [`Leaf::renew_at`].
    pub renew_at: SystemTime,
}

impl fmt::Debug for IssuedPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedPem")
            .field("not_after", &fmt_time(self.not_after))
            .finish_non_exhaustive()
    }
}

pub struct Leaf {
    pub id: SpiffeId,
    /// The leaf first, then its issuer and the issuer's intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    issued_at: SystemTime,
    certified_key: Arc<CertifiedKey>,
}

impl Leaf {
    /// The chain and signing key, ready for a rustls certificate resolver.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified_key)
    }

    /// When the leaf was minted (`not_before` is this minus [`CLOCK_SKEW`]).
    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    /// Half-way through the leaf's useful life: `issued_at + (not_after - issued_at) / 2`.
    /// (Measured from the issue time, not the back-dated `not_before`, so that short lifetimes
    /// do not come out already due.)
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("id", &format_args!("{}", self.id))
            .field("not_before", &fmt_time(self.not_before))
            .field("not_after", &fmt_time(self.not_after))
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The roots the agent trusts. Several roots are allowed, for the rotation of the root itself.
#[derive(Clone)]
pub struct TrustBundle {
    inner: Arc<BundleInner>,
}

struct BundleInner {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    /// The trust domain each root vouches for (same index as `anchors`): the one its URI SAN
    /// names (`spiffe://<td>`), or the one it was bound to ([`TrustBundle::bind_unnamed`]);
    /// `None`: any.
    domains: Vec<Option<String>>,
}

impl TrustBundle {
    /// Loads a PEM file of one or more CA certificates.
    pub fn load(path: &Path) -> Result<TrustBundle, Error> {
        let roots = pem::read_certs(path)?;
        for (i, der) in roots.iter().enumerate() {
            inspect_ca(der, path, i + 1)?;
            webpki::anchor_from_trusted_cert(der).map_err(|e| Error::InvalidCertificate {
                path: path.to_owned(),
                index: i + 1,
                reason: format!("not usable as a trust anchor: {e}"),
            })?;
        }
        Ok(TrustBundle::from_roots(roots))
    }

    /// A bundle of the given roots. Certificates that cannot serve as trust anchors (not
    /// parseable) are skipped with a warning.
    pub fn from_roots(roots: Vec<CertificateDer<'static>>) -> TrustBundle {
        let mut kept = Vec::with_capacity(roots.len());
        let mut anchors = Vec::with_capacity(roots.len());
        let mut domains = Vec::with_capacity(roots.len());
        for der in roots {
            match webpki::anchor_from_trusted_cert(&der) {
                Ok(anchor) => {
                    anchors.push(anchor.to_owned());
                    domains.push(root_domain(&der));
                    kept.push(der);
                }
                Err(error) => tracing::warn!(?error, "trust bundle: root skipped, not parseable"),
            }
        }
        TrustBundle {
            inner: Arc::new(BundleInner {
                roots: kept,
                anchors,
                domains,
            }),
        }
    }

    /// Binds the roots that name no trust domain (such as istiod's, whose only mark is the
    /// organisation) to `trust_domain`: a root vouches for the identities of one domain only.
    pub fn bind_unnamed(self, trust_domain: &str) -> TrustBundle {
        let domains = self
            .inner
            .domains
            .iter()
            .map(|d| d.clone().or_else(|| Some(trust_domain.to_owned())))
            .collect();
        TrustBundle {
            inner: Arc::new(BundleInner {
                roots: self.inner.roots.clone(),
                anchors: self.inner.anchors.clone(),
                domains,
            }),
        }
    }

    /// The trust domain `anchor` (one of [`Self::anchors`]) vouches for; `None`: any.
    pub(crate) fn domain_of(&self, anchor: &TrustAnchor<'_>) -> Option<&str> {
        let at = self
            .inner
            .anchors
            .iter()
            .position(|a| std::ptr::eq(a, anchor))?;
        self.inner.domains.get(at)?.as_deref()
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.inner.roots
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.inner.anchors
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subjects: Vec<String> = self
            .roots()
            .iter()
            .map(|der| parse(der).map_or_else(|_| "?".to_owned(), |c| c.subject().to_string()))
            .collect();
        f.debug_struct("TrustBundle")
            .field("roots", &subjects)
            .finish()
    }
}

/// The trust domain a root names in a URI SAN `spiffe://<td>` (as `ca init` writes it).
fn root_domain(der: &CertificateDer<'_>) -> Option<String> {
    let cert = parse(der).ok()?;
    let sans = cert.subject_alternative_name().ok()??;
    sans.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .filter(|td| !td.is_empty() && !td.contains('/'))
            .map(str::to_owned),
        _ => None,
    })
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| format!("not a DER X.509 certificate: {e}"))
}

/// Checks that a certificate can act as a CA and extracts what [`Issuer`] needs.
fn inspect_ca(der: &CertificateDer<'_>, path: &Path, index: usize) -> Result<CaInfo, Error> {
    let invalid = |reason: String| Error::InvalidCertificate {
        path: path.to_owned(),
        index,
        reason,
    };
    let cert = parse(der).map_err(invalid)?;
    let subject = cert.subject().to_string();
    let not_a_ca = |detail| Error::NotACa {
        path: path.to_owned(),
        index,
        subject: subject.clone(),
        detail,
    };
    let bc = cert
        .basic_constraints()
        .map_err(|e| invalid(format!("bad basicConstraints: {e}")))?
        .ok_or_else(|| not_a_ca(": the extension is absent"))?;
    if !bc.value.ca {
        return Err(not_a_ca(": it says CA:false"));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| invalid(format!("bad keyUsage: {e}")))?;
    if ku.is_some_and(|ku| !ku.value.key_cert_sign()) {
        return Err(invalid(
            "its keyUsage lacks keyCertSign, so it may not sign certificates".to_owned(),
        ));
    }
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| invalid(format!("bad subjectAltName: {e}")))?;
    let uri_trust_domain = sans
        .into_iter()
        .flat_map(|s| &s.value.general_names)
        .find_map(|n| {
            let GeneralName::URI(uri) = n else {
                return None;
            };
            let td = uri.strip_prefix("spiffe://")?;
            let td = td.split_once('/').map_or(td, |(td, _)| td);
            validate_trust_domain(td).ok().map(|()| td.to_owned())
        });
    let org_trust_domain = cert
        .subject()
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .find(|o| validate_trust_domain(o).is_ok())
        .map(str::to_owned);
    Ok(CaInfo {
        not_after: unix_to_system(cert.validity().not_after.timestamp()),
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        uri_trust_domain,
        org_trust_domain,
        subject,
    })
}

/// A signed leaf, ready for TLS: its key moves into the rustls signing key.
fn into_leaf(id: &SpiffeId, signed: SignedLeaf) -> Result<Leaf, Error> {
    let what = || format!("identity {id}");
    let SignedLeaf {
        chain,
        key,
        issued_at,
        not_before,
        not_after,
    } = signed;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = rustls::crypto::ring::default_provider();
    let certified =
        CertifiedKey::from_der(chain.clone(), key_der, &provider).map_err(|source| {
            Error::TlsKey {
                what: what(),
                source,
            }
        })?;
    Ok(Leaf {
        id: id.clone(),
        chain,
        not_before,
        not_after,
        issued_at,
        certified_key: Arc::new(certified),
    })
}

impl Leaf {
    /// A leaf handed over as PEM (the workload API's answer: the chain, leaf first, and its
    /// PKCS#8 key), checked to name exactly one SPIFFE id and to match its key. `what` names
    /// the source in errors.
    pub fn from_pem(chain_pem: &str, key_pem: &str, what: &str) -> Result<Leaf, Error> {
        let invalid = |reason: String| Error::InvalidCertificate {
            path: PathBuf::from(what),
            index: 1,
            reason,
        };
        let chain = rustls_pemfile::certs(&mut chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("unreadable PEM: {e}")))?;
        let first = chain.first().ok_or_else(|| Error::NoCertificate {
            path: PathBuf::from(what),
        })?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| invalid(format!("unreadable key PEM: {e}")))?
            .ok_or_else(|| Error::NoPrivateKey {
                path: PathBuf::from(what),
            })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref())
            .map_err(|e| invalid(format!("not X.509: {e}")))?;
        let time = |t: x509_parser::time::ASN1Time| {
            UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        let not_before = time(parsed.validity().not_before);
        let not_after = time(parsed.validity().not_after);
        let id: SpiffeId = crate::tunnel::tls::identity_of(first)
            .ok_or_else(|| invalid("names no SPIFFE id".to_owned()))?;
        let provider = rustls::crypto::ring::default_provider();
        let certified =
            CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|source| {
                Error::TlsKey {
                    what: what.to_owned(),
                    source,
                }
            })?;
        Ok(Leaf {
            id,
            chain,
            not_before,
            not_after,
            // The issuer back-dates by CLOCK_SKEW.
            issued_at: (not_before + CLOCK_SKEW).min(not_after),
            certified_key: Arc::new(certified),
        })
    }
}

impl TrustBundle {
    /// The roots of a PEM text (the workload API's trust bundle); an error when it holds none.
    pub fn from_pem(pem: &str, what: &str) -> Result<TrustBundle, Error> {
        let roots = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidCertificate {
                path: PathBuf::from(what),
                index: 1,
                reason: format!("unreadable PEM: {e}"),
            })?;
        if roots.is_empty() {
            return Err(Error::NoCertificate {
                path: PathBuf::from(what),
            });
        }
        Ok(TrustBundle::from_roots(roots))
    }
}

/// Reads a CA private key in any of the accepted encodings.
fn load_key(path: &Path) -> Result<KeyPair, Error> {
    let unsupported = |reason: String| Error::UnsupportedKey {
        path: path.to_owned(),
        reason,
    };
    match pem::read_key(path)? {
        PrivateKeyDer::Pkcs8(der) => KeyPair::try_from(&der)
            .map_err(|e| unsupported(format!("PKCS#8 key not usable for signing: {e}"))),
        PrivateKeyDer::Sec1(der) => [pem::ALG_ID_EC_P256, pem::ALG_ID_EC_P384]
            .iter()
            .find_map(|alg| KeyPair::try_from(&pem::sec1_to_pkcs8(der.secret_sec1_der(), alg)).ok())
            .ok_or_else(|| unsupported("SEC1 EC key not on curve P-256 or P-384".to_owned())),
        PrivateKeyDer::Pkcs1(_) => Err(unsupported(
            "RSA PKCS#1 key: convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt`".to_owned(),
        )),
        _ => Err(unsupported("unknown key encoding".to_owned())),
    }
}

/// Node names become file names and subject names: Kubernetes node name characters only.
pub(crate) fn check_node_name(node: &str) -> Result<(), Error> {
    let ok = !node.is_empty()
        && node.len() <= 253
        && !node.starts_with('.')
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidNodeName {
            node: node.to_owned(),
        })
    }
}

/// The URI SAN of a node's intermediate: `spiffe://<td>/node/<name>`, which verifiers read to
/// know which node issued a leaf (docs/identity.md).
pub fn node_uri(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/node/{node}")
}

/// The node a CA certificate says it belongs to (its URI SAN `spiffe://<td>/node/<name>`).
pub fn node_of_ca(der: &CertificateDer<'_>) -> Option<String> {
    let cert = parse(der).ok()?;
    let sans = cert.subject_alternative_name().ok()??;
    sans.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => {
            let rest = uri.strip_prefix("spiffe://")?;
            let (_, node) = rest.split_once("/node/")?;
            check_node_name(node).ok().map(|()| node.to_owned())
        }
        _ => None,
    })
}

fn ca_params(common_name: &str, trust_domain: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(format!(
        "spiffe://{trust_domain}"
    ))?)];
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // Positive, and with a fixed length so that it never encodes shorter.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn back_dated(now: SystemTime) -> SystemTime {
    now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH)
}

fn add_lifetime(now: SystemTime, lifetime: Duration) -> Result<SystemTime, Error> {
    if lifetime < Duration::from_secs(1) {
        return Err(Error::InvalidLifetime {
            lifetime,
            reason: "must be at least one second",
        });
    }
    now.checked_add(lifetime)
        .map(whole_secs)
        .ok_or(Error::InvalidLifetime {
            lifetime,
            reason: "too long",
        })
}

fn unix_to_system(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

fn generate(what: String) -> impl FnOnce(rcgen::Error) -> Error {
    move |source| Error::Generate { what, source }
}
