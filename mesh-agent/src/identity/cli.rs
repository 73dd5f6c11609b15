//! `mesh-agent ca ...`: create a root CA and issue node agents' intermediate CAs as PEM files.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rustls::pki_types::{CertificateDer, UnixTime};

use super::{
    ca::check_node_name, fmt_time, verify_peer, Error, Issuer, PeerRole, SpiffeId, TrustBundle,
    DEFAULT_TRUST_DOMAIN,
};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(clap::Subcommand, Debug)]
pub enum CaCommand {
    /// Create a root CA (ECDSA P-256).
    ///
    /// Writes <OUT>/root-cert.pem and <OUT>/root-key.pem (mode 0600); an existing key file is
    /// never overwritten.
    Init {
        /// Directory for the files (created, mode 0700, if missing).
        #[arg(long)]
        out: PathBuf,
        /// The SPIFFE trust domain the CA speaks for.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Validity of the root certificate, in days.
        #[arg(long, default_value_t = 3650)]
        lifetime_days: u64,
    },
    /// Issue a node agent's intermediate CA, signed by a root or intermediate given as PEM files.
    ///
    /// Writes <OUT>/<NAME>-cert.pem (the intermediate, then the chain above it, without the root)
    /// and <OUT>/<NAME>-key.pem (mode 0600); NAME is the node's unless --name says otherwise.
    /// The intermediate has pathlen:0: it can sign leaf certificates only.
    IssueNode {
        /// The Kubernetes node name of the agent.
        #[arg(long)]
        node: String,
        /// The files' base name (default: the node name). The DaemonSet's init container writes
        /// `node-cert.pem` and `node-key.pem`, the names the agent's configuration gives.
        #[arg(long)]
        name: Option<String>,
        /// Replace the files of an earlier run instead of failing on them: for the init
        /// container that issues a fresh intermediate at every pod start (deploy/). Never for a
        /// root: `ca init` has no such option.
        #[arg(long)]
        replace: bool,
        /// The signing CA's certificate (PEM; its own certificate first, then its chain).
        #[arg(long)]
        ca_cert: PathBuf,
        /// The signing CA's private key (PEM, PKCS#8 or SEC1, unencrypted).
        #[arg(long)]
        ca_key: PathBuf,
        /// Directory for the files (created, mode 0700, if missing).
        #[arg(long)]
        out: PathBuf,
        /// Validity of the intermediate, in days (never beyond the signing CA's).
        #[arg(long, default_value_t = 365)]
        lifetime_days: u64,
        /// Trust domain, for a CA whose certificate names none (no spiffe:// URI SAN).
        #[arg(long)]
        trust_domain: Option<String>,
    },
    /// Issue a workload certificate to files, for debugging and tests (agents mint their own
    /// in memory): <out>/<name>-cert.pem (leaf and chain) and <out>/<name>-key.pem.
    IssueLeaf {
        /// The SPIFFE id, spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
        #[arg(long)]
        id: String,
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        ca_key: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "workload")]
        name: String,
        #[arg(long, default_value_t = 3600)]
        lifetime_secs: u64,
        /// Make a certificate whose validity has already ended (to test that peers refuse it).
        #[arg(long)]
        expired: bool,
    },
}

/// Runs a `ca` subcommand, printing the paths it wrote.
pub fn run(cmd: CaCommand) -> Result<(), Error> {
    match cmd {
        CaCommand::Init {
            out,
            trust_domain,
            lifetime_days,
        } => {
            let root = Issuer::generate_root(&trust_domain, days(lifetime_days)?)?;
            let (cert, key) = root.write(&out, "root")?;
            println!(
                "root CA for trust domain {trust_domain}, valid until {}",
                fmt_time(root.not_after())
            );
            println!("certificate: {}", cert.display());
            println!("private key: {}", key.display());
            println!(
                "to keep it in Kubernetes (docs/kubernetes.md), then store these files offline:\n  \
                 kubectl create secret generic mesh-root-ca --namespace mesh-system \\\n    \
                 --from-file={} --from-file={}",
                cert.display(),
                key.display()
            );
        }
        CaCommand::IssueNode {
            node,
            name,
            replace,
            ca_cert,
            ca_key,
            out,
            lifetime_days,
            trust_domain,
        } => {
            check_node_name(&node)?;
            let name = name.unwrap_or_else(|| node.clone());
            check_node_name(&name)?;
            let lifetime = days(lifetime_days)?;
            let mut ca = Issuer::load(&ca_cert, &ca_key)?;
            if let Some(td) = trust_domain {
                ca = ca.with_trust_domain(&td)?;
            }
            let node_ca = ca.issue_intermediate(&node, lifetime)?;
            match node_ca.root_cert_der() {
                Some(root) => check_chain(&node, &node_ca, root, &ca_cert)?,
                None => println!(
                    "note: {} holds no root certificate, so the new chain was not checked",
                    ca_cert.display()
                ),
            }
            if replace {
                remove_pair(&out, &name)?;
            }
            let (cert, key) = node_ca.write(&out, &name)?;
            println!(
                "intermediate CA of node {node} in trust domain {}, valid until {}{}",
                node_ca.trust_domain(),
                fmt_time(node_ca.not_after()),
                if node_ca.not_after() >= ca.not_after() {
                    " (capped at the signing CA's expiry)"
                } else {
                    ""
                }
            );
            println!("certificate: {}", cert.display());
            println!("private key: {}", key.display());
        }
        CaCommand::IssueLeaf {
            id,
            ca_cert,
            ca_key,
            out,
            name,
            lifetime_secs,
            expired,
        } => {
            check_node_name(&name)?;
            let id: SpiffeId = id.parse()?;
            let ca = Issuer::load(&ca_cert, &ca_key)?.with_trust_domain(&id.trust_domain)?;
            let lifetime = Duration::from_secs(lifetime_secs);
            let now = std::time::SystemTime::now();
            // An expired certificate: issued long enough ago that it ended a lifetime ago.
            let issued = if expired {
                now - 2 * lifetime - super::ca::CLOCK_SKEW
            } else {
                now
            };
            let (cert, key) = ca.write_leaf(&id, lifetime, issued, &out, &name)?;
            println!(
                "certificate for {id}{}",
                if expired { " (already expired)" } else { "" }
            );
            println!("certificate: {}", cert.display());
            println!("private key: {}", key.display());
        }
    }
    Ok(())
}

/// Mints a throw-away leaf from the new node CA and verifies it, both ways, under the root: a
/// CA made elsewhere with something webpki refuses (an unsupported critical extension, a name
/// constraint, a weak key) is caught here rather than at the first handshake.
fn check_chain(
    node: &str,
    node_ca: &Issuer,
    root: CertificateDer<'static>,
    ca_cert: &Path,
) -> Result<(), Error> {
    let chain_error = |source| Error::ChainCheck {
        node: node.to_owned(),
        root: ca_cert.display().to_string(),
        source: Box::new(source),
    };
    let id = SpiffeId::new(node_ca.trust_domain(), "mesh-system", "issue-node-check")?;
    let leaf = node_ca
        .issue_leaf(&id, Duration::from_secs(60))
        .map_err(chain_error)?;
    let bundle = TrustBundle::from_roots(vec![root]);
    for role in [PeerRole::Client, PeerRole::Server] {
        verify_peer(
            &leaf.chain[0],
            &leaf.chain[1..],
            &bundle,
            UnixTime::now(),
            role,
        )
        .map_err(chain_error)?;
    }
    Ok(())
}

/// Removes `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem` if they exist (`issue-node
/// --replace`).
fn remove_pair(dir: &Path, name: &str) -> Result<(), Error> {
    let (cert, key) = super::pem::pair_paths(dir, name);
    for path in [key, cert] {
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Io { path, source });
            }
            _ => {}
        }
    }
    Ok(())
}

fn days(n: u64) -> Result<Duration, Error> {
    n.checked_mul(DAY.as_secs())
        .filter(|secs| *secs > 0)
        .map(Duration::from_secs)
        .ok_or(Error::InvalidLifetime {
            lifetime: Duration::from_secs(n.saturating_mul(DAY.as_secs())),
            reason: "give a lifetime of at least one day and at most a few thousand years",
        })
}
