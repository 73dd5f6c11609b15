//! `mesh-agent policy check`: the policies of a state file as the agent would apply them, and
//! what they decide for one connection, without running the agent. The one part of `policy`
//! that does I/O (it reads the state file); the decision is the agent's own `evaluate`.

use std::{fmt::Write as _, net::IpAddr, path::PathBuf, str::FromStr};

use clap::Args;

use super::{evaluate, Conn, Decision};
use crate::{discovery::file, identity::SpiffeId, state::Snapshot};

/// Arguments of `mesh-agent policy check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The mesh state file (docs/formats.md).
    #[arg(long)]
    pub state: PathBuf,
    /// The root namespace, as the agent's `policy.root_namespace`.
    #[arg(long, default_value = crate::state::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// The trust domain, to derive a workload's identity from its service account.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The destination workload, `namespace/name`: decide a connection to it.
    #[arg(long, requires = "port")]
    pub to: Option<String>,
    /// The destination (workload) port.
    #[arg(long)]
    pub port: Option<u16>,
    /// The source workload, `namespace/name`: its identity and first address.
    #[arg(long, conflicts_with_all = ["from_identity", "plaintext"])]
    pub from: Option<String>,
    /// The source identity, `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
    #[arg(long, conflicts_with = "plaintext")]
    pub from_identity: Option<String>,
    /// A plaintext source (no identity).
    #[arg(long)]
    pub plaintext: bool,
    /// The source address (default: the source workload's, else 0.0.0.0).
    #[arg(long)]
    pub from_ip: Option<IpAddr>,
}

/// Runs the check and returns the report to print.
pub fn check(args: &CheckArgs) -> anyhow::Result<String> {
    let (snap, _, rejections) = file::load(&args.state, &args.root_namespace)?;
    let mut out = String::new();
    for r in &rejections {
        writeln!(out, "invalid: {r}")?;
    }
    for p in snap.policies.values() {
        for w in p
            .warnings
            .iter()
            .cloned()
            .chain(file::foreign_root_namespace(&snap, p))
        {
            writeln!(out, "warning: policy {}: {w}", p.key)?;
        }
    }
    writeln!(
        out,
        "{} policies in force (root namespace {})",
        snap.policies.len(),
        snap.root_namespace()
    )?;
    let (Some(to), Some(port)) = (&args.to, args.port) else {
        return Ok(out);
    };
    let dst = snap.workloads.get(to.as_str()).ok_or_else(|| {
        anyhow::anyhow!("--to {to}: no such workload in {}", args.state.display())
    })?;
    let (identity, src) = source(args, &snap)?;
    let selected = snap.authorization(to);
    match selected {
        None => writeln!(out, "no policy selects {to}")?,
        Some(s) => {
            for p in s.deny.iter().chain(&s.allow).chain(&s.audit) {
                let invalid = if p.invalid.is_some() {
                    " (invalid: fails closed)"
                } else {
                    ""
                };
                writeln!(out, "selects {to}: {} {}{invalid}", p.action, p.key)?;
            }
        }
    }
    let conn = Conn {
        identity: identity.as_ref(),
        src,
        dst: dst
            .ips
            .first()
            .copied()
            .unwrap_or(IpAddr::from([0, 0, 0, 0])),
        port,
    };
    let decision = evaluate(selected.map(|s| &**s), &conn);
    let from = identity.map_or_else(|| format!("plaintext {src}"), |id| format!("{id} at {src}"));
    writeln!(out, "{from} -> {to}:{port}: {}", describe(&decision))?;
    Ok(out)
}

/// The source identity and address the arguments name.
fn source(args: &CheckArgs, snap: &Snapshot) -> anyhow::Result<(Option<SpiffeId>, IpAddr)> {
    let unspecified = IpAddr::from([0, 0, 0, 0]);
    if let Some(from) = &args.from {
        let w = snap
            .workloads
            .get(from.as_str())
            .ok_or_else(|| anyhow::anyhow!("--from {from}: no such workload"))?;
        let id = SpiffeId::new(&args.trust_domain, &w.namespace, &w.service_account)?;
        let ip = args
            .from_ip
            .or(w.ips.first().copied())
            .unwrap_or(unspecified);
        return Ok((Some(id), ip));
    }
    let ip = args.from_ip.unwrap_or(unspecified);
    match &args.from_identity {
        Some(id) => Ok((Some(SpiffeId::from_str(id)?), ip)),
        None if args.plaintext || args.from_ip.is_some() => Ok((None, ip)),
        None => anyhow::bail!("name the source: --from, --from-identity or --plaintext"),
    }
}

/// `deny policy=shop/allow-client rule=- reason=no_allow_match`, as the agent's log line has it.
pub fn describe(d: &Decision) -> String {
    let mut s = format!(
        "{} policy={} rule={} reason={}",
        d.verdict(),
        d.policy_str(),
        d.rule_str(),
        d.reason
    );
    if !d.audited.is_empty() {
        s.push_str(&format!(" audit={}", d.audited_str()));
    }
    s
}
