//! Tests of the CA, verification, on-disk formats, the CLI and rotation.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, DistinguishedName,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::{
    pki_types::{CertificateDer, UnixTime},
    SignatureScheme,
};

use super::{cli::CaCommand, *};

const DAY: Duration = Duration::from_secs(86_400);

fn id(td: &str, ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td, ns, sa).unwrap_or_else(|e| panic!("test id: {e}"))
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(std::time::UNIX_EPOCH).expect("after 1970"))
}

/// A root and one node intermediate of `td`.
fn ca(td: &str) -> (Issuer, Issuer) {
    let root = Issuer::generate_root(td, 10 * DAY).expect("root");
    let node = root
        .issue_intermediate("node-1", DAY)
        .expect("intermediate");
    (root, node)
}

fn bundle_of(root: &Issuer) -> TrustBundle {
    TrustBundle::from_roots(vec![root.root_cert_der().expect("a root knows itself")])
}

fn verify(leaf: &Leaf, bundle: &TrustBundle, role: PeerRole) -> Result<SpiffeId, Error> {
    verify_peer(
        &leaf.chain[0],
        &leaf.chain[1..],
        bundle,
        UnixTime::now(),
        role,
    )
}

/// A scratch directory, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-identity-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn chain_verifies_for_both_roles() {
    let (root, node) = ca("cluster.local");
    let bundle = bundle_of(&root);
    let want = id("cluster.local", "shop", "api");
    let leaf = node.issue_leaf(&want, DAY).expect("leaf");
    assert_eq!(leaf.chain.len(), 2, "leaf + intermediate, no root");
    assert_eq!(&leaf.chain[1], node.cert_der());
    for role in [PeerRole::Client, PeerRole::Server] {
        let got = verify(&leaf, &bundle, role).unwrap_or_else(|e| panic!("{role:?}: {e}"));
        assert_eq!(got, want);
    }
    // A leaf straight from the root verifies too.
    let direct = root.issue_leaf(&want, DAY).expect("leaf from root");
    assert_eq!(direct.chain.len(), 1, "the root is never sent");
    assert_eq!(
        verify(&direct, &bundle, PeerRole::Client).expect("verifies"),
        want
    );
}

#[test]
fn leaf_properties() {
    let (_, node) = ca("cluster.local");
    let before = SystemTime::now();
    let leaf = node
        .issue_leaf(&id("cluster.local", "ns", "sa"), Duration::from_secs(3600))
        .expect("leaf");
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf.chain[0]).expect("parses");
    assert!(!cert.is_ca());
    assert!(cert.subject().iter().next().is_none(), "empty subject");
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = cert.key_usage().expect("ku").expect("present").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let skew = leaf
        .issued_at()
        .duration_since(leaf.not_before)
        .expect("back-dated");
    assert_eq!(skew, ca::CLOCK_SKEW);
    let life = leaf
        .not_after
        .duration_since(leaf.issued_at())
        .expect("after");
    assert_eq!(life, Duration::from_secs(3600));
    assert!(leaf.issued_at() <= before && leaf.issued_at() + Duration::from_secs(1) > before);
    assert_eq!(
        leaf.renew_at(),
        leaf.issued_at() + Duration::from_secs(1800)
    );

    // The rustls key signs, and the signature verifies with the certificate's key.
    let ck = leaf.certified_key();
    ck.keys_match().expect("key matches the certificate");
    let signer = ck
        .key
        .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        .expect("P-256 signer");
    let sig = signer.sign(b"hello").expect("signs");
    let ee = webpki::EndEntityCert::try_from(&leaf.chain[0]).expect("parses");
    ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, b"hello", &sig)
        .expect("signature verifies");

    // Capped at the issuer's expiry.
    let long = node
        .issue_leaf(&id("cluster.local", "ns", "sa"), 1000 * DAY)
        .expect("leaf");
    assert_eq!(long.not_after, node.not_after());
}

#[test]
fn intermediate_properties() {
    let (root, node) = ca("example.org");
    let (_, cert) = x509_parser::parse_x509_certificate(node.cert_der()).expect("parses");
    let bc = cert
        .basic_constraints()
        .expect("bc")
        .expect("present")
        .value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    assert_eq!(
        cert.subject().to_string(),
        "O=example.org, CN=mesh node node-1"
    );
    assert_eq!(node.trust_domain(), "example.org");
    assert!(node.not_after() <= root.not_after());
    let capped = root
        .issue_intermediate("n", 100 * 365 * DAY)
        .expect("intermediate");
    assert_eq!(capped.not_after(), root.not_after());
    assert_eq!(node.root_cert_der(), root.root_cert_der());
    assert!(root.cert_pem().matches("BEGIN CERTIFICATE").count() == 1);
    assert!(node.cert_pem().matches("BEGIN CERTIFICATE").count() == 1);
    assert!(matches!(
        root.issue_intermediate("bad/name", DAY),
        Err(Error::InvalidNodeName { .. })
    ));
}

#[test]
fn other_trust_domain_is_unknown_issuer() {
    let (root, _) = ca("cluster.local");
    let (_, other_node) = ca("other.example");
    let leaf = other_node
        .issue_leaf(&id("other.example", "ns", "sa"), DAY)
        .expect("leaf");
    let err = verify(&leaf, &bundle_of(&root), PeerRole::Client).expect_err("must fail");
    assert!(matches!(err, Error::PeerUnknownIssuer), "{err:?}");
    assert!(matches!(
        rustls::Error::from(err),
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    ));
    // And the issuer refuses to mint outside its trust domain.
    let (_, node) = ca("cluster.local");
    let err = node
        .issue_leaf(&id("other.example", "ns", "sa"), DAY)
        .expect_err("must fail");
    assert!(matches!(err, Error::TrustDomainMismatch { .. }), "{err:?}");
}

#[test]
fn expired_and_not_yet_valid() {
    let (root, node) = ca("cluster.local");
    let bundle = bundle_of(&root);
    let leaf = node
        .issue_leaf(&id("cluster.local", "ns", "sa"), Duration::from_secs(1))
        .expect("leaf");
    let late = unix(leaf.not_after + Duration::from_secs(10));
    let err = verify_peer(
        &leaf.chain[0],
        &leaf.chain[1..],
        &bundle,
        late,
        PeerRole::Server,
    )
    .expect_err("expired");
    assert!(matches!(err, Error::PeerExpired { .. }), "{err:?}");
    assert!(err.to_string().contains("expired at"), "{err}");
    let early = unix(leaf.not_before - Duration::from_secs(10));
    let err = verify_peer(
        &leaf.chain[0],
        &leaf.chain[1..],
        &bundle,
        early,
        PeerRole::Server,
    )
    .expect_err("not yet valid");
    assert!(matches!(err, Error::PeerNotYetValid { .. }), "{err:?}");
    assert!(matches!(
        node.issue_leaf(&id("cluster.local", "ns", "sa"), Duration::ZERO),
        Err(Error::InvalidLifetime { .. })
    ));
}

/// A certificate signed by `issuer` with the given SANs, EKUs and CA flag, and its key.
fn custom(
    issuer: &Issuer,
    sans: &[&str],
    ekus: Vec<ExtendedKeyUsagePurpose>,
    is_ca: IsCa,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "custom");
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI(Ia5String::try_from(*s).expect("ia5")))
        .collect();
    params.extended_key_usages = ekus;
    params.key_usages = match is_ca {
        IsCa::Ca(_) => vec![KeyUsagePurpose::KeyCertSign],
        _ => vec![KeyUsagePurpose::DigitalSignature],
    };
    params.is_ca = is_ca;
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + DAY).into();
    let cert = params.signed_by(&key, issuer.signer()).expect("signs");
    (cert.der().clone(), key)
}

#[test]
fn identity_extraction_rejects() {
    let (root, node) = ca("cluster.local");
    let bundle = bundle_of(&root);
    let both = || {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    };
    let a = "spiffe://cluster.local/ns/a/sa/a";
    let b = "spiffe://cluster.local/ns/b/sa/b";
    let check = |sans: &[&str], ekus, role, want: &str| {
        let (der, _) = custom(&node, sans, ekus, IsCa::ExplicitNoCa);
        let chain = [node.cert_der().clone()];
        let result = verify_peer(&der, &chain, &bundle, UnixTime::now(), role);
        let got = format!("{result:?}");
        assert!(got.contains(want), "{sans:?} {role:?}: {got} lacks {want}");
    };
    check(&[a], both(), PeerRole::Client, "Ok(SpiffeId");
    check(
        &[a, b],
        both(),
        PeerRole::Client,
        "PeerMultipleUriSans { count: 2 }",
    );
    check(&[], both(), PeerRole::Client, "PeerNoUriSan");
    check(
        &["spiffe://cluster.local/a/b"],
        both(),
        PeerRole::Client,
        "PeerMalformedId",
    );
    check(
        &["https://cluster.local/ns/a/sa/a"],
        both(),
        PeerRole::Server,
        "PeerMalformedId",
    );
    let server_only = vec![ExtendedKeyUsagePurpose::ServerAuth];
    check(&[a], server_only.clone(), PeerRole::Client, "PeerBadEku");
    check(&[a], server_only, PeerRole::Server, "Ok(SpiffeId");
    check(&[a], Vec::new(), PeerRole::Server, "PeerBadEku");
    // A CA certificate is no peer identity.
    let (ca_der, _) = custom(
        &node,
        &[a],
        both(),
        IsCa::Ca(BasicConstraints::Unconstrained),
    );
    let result = verify_peer(
        &ca_der,
        &[node.cert_der().clone()],
        &bundle,
        UnixTime::now(),
        PeerRole::Client,
    );
    assert!(result.is_err(), "{result:?}");
}

#[test]
fn intermediate_cannot_sign_cas() {
    let (root, node) = ca("cluster.local");
    let err = node.issue_intermediate("n2", DAY).expect_err("pathlen 0");
    assert!(matches!(err, Error::CannotSignCa { .. }), "{err:?}");

    // Force it with rcgen: a sub-CA under the node intermediate, and a leaf under that.
    let (sub_der, sub_key) = custom(
        &node,
        &[],
        Vec::new(),
        IsCa::Ca(BasicConstraints::Unconstrained),
    );
    let sub = rcgen::Issuer::from_ca_cert_der(&sub_der, sub_key).expect("sub issuer");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from("spiffe://cluster.local/ns/a/sa/a").expect("ia5"),
    )];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
    params.not_after = (SystemTime::now() + DAY).into();
    let leaf = params.signed_by(&key, &sub).expect("signs");
    let chain = [sub_der, node.cert_der().clone()];
    let result = verify_peer(
        leaf.der(),
        &chain,
        &bundle_of(&root),
        UnixTime::now(),
        PeerRole::Client,
    );
    assert!(
        matches!(
            result,
            Err(Error::PeerRejected(
                webpki::Error::PathLenConstraintViolated
            ))
        ),
        "a leaf below a pathlen:0 intermediate's sub-CA: {result:?}"
    );
}

#[test]
fn write_load_round_trip() {
    let dir = scratch("roundtrip");
    let root = Issuer::generate_root("example.org", 10 * DAY).expect("root");
    let (cert, key) = root.write(&dir, "root").expect("write");
    assert_eq!(cert, dir.join("root-cert.pem"));
    assert_eq!(key, dir.join("root-key.pem"));
    let mode = fs::metadata(&key).expect("key exists").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode");
    assert!(fs::read_to_string(&key)
        .expect("key")
        .contains("BEGIN PRIVATE KEY"));

    let loaded = Issuer::load(&cert, &key).expect("load");
    assert_eq!(loaded.trust_domain(), "example.org");
    assert_eq!(loaded.root_cert_der(), root.root_cert_der());
    assert_eq!(loaded.not_after(), root.not_after());
    let node = loaded
        .issue_intermediate("node-a", DAY)
        .expect("intermediate");
    let (ncert, nkey) = node.write(&dir, "node-a").expect("write");
    let node = Issuer::load(&ncert, &nkey).expect("load intermediate");
    assert_eq!(node.trust_domain(), "example.org");
    assert!(
        node.root_cert_der().is_none(),
        "the node file holds no root"
    );
    let bundle = TrustBundle::load(&cert).expect("bundle");
    let leaf = node
        .issue_leaf(&id("example.org", "ns", "sa"), DAY)
        .expect("leaf");
    verify(&leaf, &bundle, PeerRole::Server).expect("verifies against the original root");
    assert!(matches!(
        node.issue_intermediate("x", DAY),
        Err(Error::CannotSignCa { .. })
    ));

    // Never overwrite a key; the certificate next to it stays as it was.
    let before = fs::read(&cert).expect("cert");
    let other = Issuer::generate_root("example.org", DAY).expect("root");
    let err = other.write(&dir, "root").expect_err("must refuse");
    assert!(matches!(err, Error::KeyFileExists { .. }), "{err:?}");
    assert_eq!(fs::read(&cert).expect("cert"), before);

    // A key that does not belong to the certificate.
    let err = Issuer::load(&cert, &nkey).expect_err("mismatch");
    assert!(matches!(err, Error::KeyMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("node-a-key.pem"), "{err}");
    // Not PEM at all, or no key.
    let err = Issuer::load(&cert, &cert).expect_err("no key");
    assert!(matches!(err, Error::NoPrivateKey { .. }), "{err:?}");
    let err = Issuer::load(&key, &key).expect_err("no cert");
    assert!(matches!(err, Error::NoCertificate { .. }), "{err:?}");
    let err = TrustBundle::load(&dir.join("missing.pem")).expect_err("missing");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn trust_domain_override() {
    let dir = scratch("override");
    let root = Issuer::generate_root("example.org", DAY).expect("root");
    let (cert, key) = root.write(&dir, "root").expect("write");
    let loaded = Issuer::load(&cert, &key).expect("load");
    let err = loaded
        .with_trust_domain("other.org")
        .expect_err("URI SAN wins");
    assert!(matches!(err, Error::TrustDomainMismatch { .. }), "{err:?}");
    let loaded = Issuer::load(&cert, &key).expect("load");
    assert_eq!(
        loaded
            .with_trust_domain("example.org")
            .expect("same")
            .trust_domain(),
        "example.org"
    );
    let loaded = Issuer::load(&cert, &key).expect("load");
    assert!(matches!(
        loaded.with_trust_domain("Bad"),
        Err(Error::InvalidTrustDomain { .. })
    ));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bundle_with_two_roots() {
    let dir = scratch("bundle");
    let (old_root, old_node) = ca("cluster.local");
    let (new_root, new_node) = ca("cluster.local");
    let pem = format!("{}{}", old_root.cert_pem(), new_root.cert_pem());
    let path = dir.join("bundle.pem");
    fs::write(&path, pem).expect("write bundle");
    let bundle = TrustBundle::load(&path).expect("bundle");
    assert_eq!(bundle.roots().len(), 2);
    for node in [&old_node, &new_node] {
        let leaf = node
            .issue_leaf(&id("cluster.local", "ns", "sa"), DAY)
            .expect("leaf");
        verify(&leaf, &bundle, PeerRole::Client).expect("verifies");
    }
    // Only the old root: the new node's leaves are unknown.
    let leaf = new_node
        .issue_leaf(&id("cluster.local", "ns", "sa"), DAY)
        .expect("leaf");
    assert!(matches!(
        verify(&leaf, &bundle_of(&old_root), PeerRole::Client),
        Err(Error::PeerUnknownIssuer)
    ));
    // A leaf certificate in a bundle file is refused.
    let leaf_pem = pem::encode("CERTIFICATE", &leaf.chain[0]);
    fs::write(&path, leaf_pem).expect("write");
    let err = TrustBundle::load(&path).expect_err("not a CA");
    assert!(matches!(err, Error::NotACa { index: 1, .. }), "{err:?}");
    fs::write(&path, "nothing here\n").expect("write");
    assert!(matches!(
        TrustBundle::load(&path),
        Err(Error::NoCertificate { .. })
    ));
    let _ = fs::remove_dir_all(&dir);
}

/// How a P-256 private key (PKCS#8 DER) could show in text: its secret scalar in hex (either
/// case), as Rust prints bytes, in base64, and the part of the key's PEM that encodes it (the
/// first 48 characters of every P-256 PKCS#8 PEM are the same header: no key material).
fn key_renderings(pkcs8: &[u8]) -> Vec<String> {
    // ECPrivateKey: version 1, then the private key as a 32-byte OCTET STRING.
    const BEFORE_SCALAR: [u8; 5] = [0x02, 0x01, 0x01, 0x04, 0x20];
    let at = pkcs8
        .windows(BEFORE_SCALAR.len())
        .position(|w| w == BEFORE_SCALAR)
        .expect("a P-256 PKCS#8 key")
        + BEFORE_SCALAR.len();
    let scalar = &pkcs8[at..at + 32];
    let hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
    let body = |der: &[u8]| -> String {
        pem::encode("KEY", der)
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect()
    };
    let bytes = format!("{scalar:?}");
    vec![
        hex.clone(),
        hex.to_uppercase(),
        bytes[1..bytes.len() / 2].to_owned(),
        body(scalar)[..40].to_owned(),
        body(pkcs8)[48..88].to_owned(),
    ]
}

#[test]
fn debug_shows_no_key_material() {
    let (root, node) = ca("cluster.local");
    let (leaf, leaf_key) = node
        .issue_leaf_and_key(&id("cluster.local", "ns", "sa"), DAY)
        .expect("leaf");
    let keys = [
        ("leaf", leaf_key),
        ("node", node.signer().key().serialize_der()),
        ("root", root.signer().key().serialize_der()),
    ];
    let mut debugs = vec![
        format!("{leaf:?}"),
        format!("{leaf:#?}"),
        format!("{node:?}"),
        format!("{root:#?}"),
    ];
    let bundle = bundle_of(&root);
    let manager = CertManager::with_clock(
        node,
        bundle,
        DAY,
        prometheus_client::metrics::family::Family::default(),
        std::sync::Arc::new(SystemTime::now),
        1,
    );
    manager
        .get(&id("cluster.local", "ns", "sa"))
        .expect("a leaf in the manager");
    debugs.push(format!("{manager:?}"));
    for debug in &debugs {
        assert!(!debug.contains("PRIVATE"), "{debug}");
        for (whose, key) in &keys {
            for shown in key_renderings(key) {
                assert!(
                    !debug.contains(&shown),
                    "the {whose} key ({shown}) is in a Debug output: {debug}"
                );
            }
        }
        assert!(debug.len() < 400, "unexpectedly long Debug: {debug}");
    }
    assert!(format!("{leaf:?}").contains("spiffe://cluster.local/ns/ns/sa/sa"));
    // The renderings are of the key, not of what every key shares.
    let (_, other) = ca("cluster.local");
    let other = other.signer().key().serialize_der();
    for (whose, key) in &keys {
        for (mine, theirs) in key_renderings(key).iter().zip(key_renderings(&other)) {
            assert_ne!(
                *mine, theirs,
                "a rendering of the {whose} key is not its own"
            );
        }
    }
    let leaf_pem = pem::encode("PRIVATE KEY", &keys[0].1);
    assert!(
        key_renderings(&keys[0].1)
            .iter()
            .any(|r| leaf_pem.replace('\n', "").contains(r.as_str())),
        "the renderings would not find the key's own PEM"
    );
}

#[test]
fn cli_init_and_issue_node() {
    let dir = scratch("cli");
    cli::run(CaCommand::Init {
        out: dir.join("ca"),
        trust_domain: "mesh.test".to_owned(),
        lifetime_days: 30,
    })
    .expect("init");
    let (root_cert, root_key) = (dir.join("ca/root-cert.pem"), dir.join("ca/root-key.pem"));
    let mode = fs::metadata(dir.join("ca"))
        .expect("dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "new --out directory mode");
    cli::run(CaCommand::IssueNode {
        node: "n1".to_owned(),
        name: None,
        replace: false,
        ca_cert: root_cert.clone(),
        ca_key: root_key.clone(),
        out: dir.join("nodes"),
        lifetime_days: 365,
        trust_domain: None,
    })
    .expect("issue-node");
    let node = Issuer::load(
        &dir.join("nodes/n1-cert.pem"),
        &dir.join("nodes/n1-key.pem"),
    )
    .expect("node CA loads");
    assert_eq!(node.trust_domain(), "mesh.test");
    assert!(
        node.not_after()
            <= Issuer::load(&root_cert, &root_key)
                .expect("root")
                .not_after()
    );
    let err = cli::run(CaCommand::Init {
        out: dir.join("ca"),
        trust_domain: "mesh.test".to_owned(),
        lifetime_days: 30,
    })
    .expect_err("must not overwrite");
    assert!(matches!(err, Error::KeyFileExists { .. }), "{err:?}");
    let err = cli::run(CaCommand::IssueNode {
        node: "../evil".to_owned(),
        name: None,
        replace: false,
        ca_cert: root_cert.clone(),
        ca_key: root_key.clone(),
        out: dir.join("nodes"),
        lifetime_days: 365,
        trust_domain: None,
    })
    .expect_err("bad node name");
    assert!(matches!(err, Error::InvalidNodeName { .. }), "{err:?}");

    // As the DaemonSet's init container runs it at every pod start: fixed file names, and
    // --replace issues a fresh intermediate over the last one.
    let issue = |replace: bool| {
        cli::run(CaCommand::IssueNode {
            node: "n2".to_owned(),
            name: Some("node".to_owned()),
            replace,
            ca_cert: root_cert.clone(),
            ca_key: root_key.clone(),
            out: dir.join("identity"),
            lifetime_days: 365,
            trust_domain: None,
        })
    };
    let (cert, key) = (
        dir.join("identity/node-cert.pem"),
        dir.join("identity/node-key.pem"),
    );
    issue(false).expect("first issue-node --name node");
    let first = fs::read(&key).expect("node key");
    let err = issue(false).expect_err("a key file is not overwritten without --replace");
    assert!(matches!(err, Error::KeyFileExists { .. }), "{err:?}");
    issue(true).expect("issue-node --replace");
    assert_ne!(fs::read(&key).expect("node key"), first, "a fresh key");
    let mode = fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "replaced key file mode");
    let node = Issuer::load(&cert, &key).expect("the replaced pair loads and matches");
    assert!(
        node.cert_pem().contains("BEGIN CERTIFICATE"),
        "the intermediate's certificate"
    );
    let _ = fs::remove_dir_all(&dir);
}

/// Runs the openssl CLI in `dir`; panics if it fails or cannot run (no silent skip: without
/// it the bring-your-own-CA path would go untested; `cargo xtask test` installs it).
fn openssl(dir: &Path, args: &[&str]) {
    match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "cannot run the openssl CLI ({e}): this test makes a CA with it; install it (Debian \
             package openssl; `cargo xtask test` installs it as root)"
        ),
    }
}

/// A CA made by the openssl CLI, enterprise-PKI style: a root, an intermediate with
/// pathlen:1 whose key is SEC1, and a chain file holding the intermediate then the root.
#[test]
fn bring_your_own_openssl_ca() {
    let dir = scratch("openssl");
    openssl(
        &dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "root.key",
        ],
    );
    let ca_ext = "basicConstraints=critical,CA:true";
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-sha256",
            "-days",
            "30",
            "-subj",
            "/O=Example Corp/CN=Example Root",
            "-addext",
            ca_ext,
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "root.pem",
        ],
    );
    // Root: SEC1 key, O is no trust domain name: default, then configured.
    let root =
        Issuer::load(&dir.join("root.pem"), &dir.join("root.key")).expect("openssl root loads");
    assert_eq!(root.trust_domain(), DEFAULT_TRUST_DOMAIN);
    let root = root
        .with_trust_domain("corp.example")
        .expect("configurable");
    assert!(root.root_cert_der().is_some());

    // Intermediate with a PKCS#8 key and a spiffe URI SAN, signed by the root.
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "int.key",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-new",
            "-key",
            "int.key",
            "-subj",
            "/O=Example Corp/CN=Mesh Intermediate",
            "-out",
            "int.csr",
        ],
    );
    fs::write(
        dir.join("int.ext"),
        "basicConstraints=critical,CA:true,pathlen:1\nkeyUsage=critical,keyCertSign\nsubjectAltName=URI:spiffe://corp.example\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .expect("ext file");
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "20",
            "-sha256",
            "-extfile",
            "int.ext",
            "-out",
            "int.pem",
        ],
    );
    let chain = format!(
        "{}{}",
        fs::read_to_string(dir.join("int.pem")).expect("int"),
        fs::read_to_string(dir.join("root.pem")).expect("root")
    );
    fs::write(dir.join("int-chain.pem"), chain).expect("chain");
    let int = Issuer::load(&dir.join("int-chain.pem"), &dir.join("int.key"))
        .expect("openssl intermediate loads");
    assert_eq!(int.trust_domain(), "corp.example", "from the URI SAN");
    assert!(
        int.root_cert_der().is_some(),
        "root recognised at the end of the chain file"
    );
    assert_eq!(
        int.cert_pem().matches("BEGIN CERTIFICATE").count(),
        1,
        "root not in the chain"
    );

    let bundle = TrustBundle::load(&dir.join("root.pem")).expect("bundle");
    let node = int
        .issue_intermediate("node-7", DAY)
        .expect("node CA under the openssl intermediate");
    let leaf = node
        .issue_leaf(&id("corp.example", "ns", "sa"), DAY)
        .expect("leaf");
    assert_eq!(leaf.chain.len(), 3, "leaf, node CA, openssl intermediate");
    let got = verify(&leaf, &bundle, PeerRole::Client).expect("verifies to the openssl root");
    assert_eq!(got, id("corp.example", "ns", "sa"));
    // Leaves straight from the openssl CAs verify too.
    let leaf = root
        .issue_leaf(&id("corp.example", "ns", "sa"), DAY)
        .expect("leaf");
    verify(&leaf, &bundle, PeerRole::Server).expect("verifies");

    // The CLI accepts the openssl intermediate too, and checks the new chain under its root.
    cli::run(CaCommand::IssueNode {
        node: "node-8".to_owned(),
        name: None,
        replace: false,
        ca_cert: dir.join("int-chain.pem"),
        ca_key: dir.join("int.key"),
        out: dir.join("out"),
        lifetime_days: 1,
        trust_domain: None,
    })
    .expect("issue-node under an openssl CA");
    assert!(dir.join("out/node-8-key.pem").exists());

    // A non-CA certificate is refused with a clear error.
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "int.key",
            "-sha256",
            "-days",
            "1",
            "-subj",
            "/CN=not a ca",
            "-addext",
            "basicConstraints=critical,CA:false",
            "-out",
            "leaf.pem",
        ],
    );
    let err = Issuer::load(&dir.join("leaf.pem"), &dir.join("int.key")).expect_err("not a CA");
    assert!(matches!(err, Error::NotACa { .. }), "{err:?}");
    assert!(err.to_string().contains("leaf.pem"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_root_vouches_only_for_its_own_trust_domain() {
    let (ours, our_node) = ca("cluster.local");
    let (theirs, their_node) = ca("other.example");
    let bundle = TrustBundle::from_roots(vec![
        ours.root_cert_der().expect("root"),
        theirs.root_cert_der().expect("root"),
    ]);
    // Each domain's own leaves verify against the shared bundle...
    let mine = id("cluster.local", "shop", "api");
    let leaf = our_node.issue_leaf(&mine, DAY).expect("leaf");
    assert_eq!(
        verify(&leaf, &bundle, PeerRole::Client).expect("ours"),
        mine
    );
    let foreign = id("other.example", "shop", "api");
    let leaf = their_node.issue_leaf(&foreign, DAY).expect("leaf");
    assert_eq!(
        verify(&leaf, &bundle, PeerRole::Client).expect("theirs"),
        foreign
    );
    // ...but the other domain's CA cannot mint ours (signed by hand: our CA refuses to).
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(mine.to_string()).expect("uri"),
    )];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let forged = params.signed_by(&key, their_node.signer()).expect("forged");
    let intermediates = [their_node.cert_der().clone()];
    for role in [PeerRole::Client, PeerRole::Server] {
        let e = verify_peer(forged.der(), &intermediates, &bundle, UnixTime::now(), role)
            .expect_err("a cluster.local id from other.example");
        assert!(
            matches!(&e, Error::PeerRootOfAnotherDomain { root_domain, .. } if root_domain == "other.example"),
            "{e}"
        );
    }
}

#[test]
fn a_verified_chain_names_the_node_that_issued_the_leaf() {
    let (root, node) = ca("cluster.local");
    let bundle = bundle_of(&root);
    let want = id("cluster.local", "shop", "api");
    let leaf = node.issue_leaf(&want, DAY).expect("leaf");
    let (got, issuer) = verify_peer_issued(
        &leaf.chain[0],
        &leaf.chain[1..],
        &bundle,
        UnixTime::now(),
        PeerRole::Client,
    )
    .expect("verifies");
    assert_eq!((got, issuer.as_deref()), (want.clone(), Some("node-1")));
    // A leaf from the root (a central CA): bound to no node.
    let central = root.issue_leaf(&want, DAY).expect("leaf");
    let (_, issuer) = verify_peer_issued(
        &central.chain[0],
        &central.chain[1..],
        &bundle,
        UnixTime::now(),
        PeerRole::Client,
    )
    .expect("verifies");
    assert_eq!(issuer, None);
}
