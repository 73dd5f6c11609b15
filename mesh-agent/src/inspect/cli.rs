//! `mesh-agent inspect`: asks this node's agent (its admin endpoint, 127.0.0.1:15000 unless
//! told otherwise) and prints aligned tables, or the JSON it answered (`-o json`).
//!
//! `check` is the operator's gate before trusting the mesh on a node: it runs the kernel
//! checks of `mesh-agent check`, then asks the agent, and stops at the first failure with a
//! message that names what is wrong and where to look.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use serde_json::Value;

/// Errors of `inspect`. Messages say what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the agent's admin endpoint at {addr}: {source} (is the agent running on this node, and is admin_addr {addr}?)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading {path} from {addr}: {source}")]
    Io {
        addr: SocketAddr,
        path: String,
        source: std::io::Error,
    },
    #[error("{path} on {addr} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{path} on {addr} did not answer JSON: {source}")]
    Json {
        addr: SocketAddr,
        path: String,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Check(String),
}

/// What `inspect` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned tables.
    Table,
    /// The agent's JSON, as it answered.
    Json,
}

/// The subcommands of `mesh-agent inspect`.
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// This node's workloads: addresses, capture state, the policies in force.
    Workloads,
    /// Services, their ports and endpoints.
    Services,
    /// Authorization policies.
    Policies,
    /// The workload certificates this agent holds (never their keys).
    Certs,
    /// The connections being proxied now: identities, bytes, age, decision.
    Connections,
    /// The eBPF programs and maps, and each pod's links.
    Ebpf,
    /// One pod: captured or not and why, identity and certificate, policies, connections.
    Workload {
        /// NAMESPACE/POD
        pod: String,
    },
    /// Would a connection from SRC to DST:PORT be captured, routed (how) and allowed (by
    /// which policy and rule)? From the live state.
    Why {
        /// NAMESPACE/POD
        src: String,
        /// NAMESPACE/NAME:PORT (a pod or a service)
        dst: String,
    },
    /// Everything an operator needs before trusting the mesh on this node: kernel features,
    /// every enabled pod captured with its programs attached, certificates valid, state in
    /// sync. Exits non-zero at the first failure, naming it.
    Check {
        /// The pin directory to check (default: the one the agent says it uses).
        #[arg(long)]
        bpf_dir: Option<PathBuf>,
    },
}

/// The arguments of `mesh-agent inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent's admin endpoint (`admin_addr`).
    #[arg(long, default_value = "127.0.0.1:15000", global = true)]
    pub admin: SocketAddr,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub what: What,
}

/// How long one answer may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `GET path` on the admin endpoint: the body of a 200, else an error with the agent's words.
pub fn get(addr: SocketAddr, path: &str) -> Result<String, Error> {
    let io = |source| Error::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|source| Error::Connect { addr, source })?;
    conn.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: application/json\r\nconnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    if status != 200 {
        return Err(Error::Status {
            addr,
            path: path.to_owned(),
            status,
            body: body.trim().to_owned(),
        });
    }
    Ok(body.to_owned())
}

/// [`get`], as JSON.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<Value, Error> {
    serde_json::from_str(&get(addr, path)?).map_err(|source| Error::Json {
        addr,
        path: path.to_owned(),
        source,
    })
}

/// Runs `inspect`; returns what to print and whether it succeeded (`check` fails with a
/// non-zero exit).
pub fn run(args: &Args) -> Result<String, Error> {
    let addr = args.admin;
    let json = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    match &args.what {
        What::Check { bpf_dir } => super::cli_check::check(addr, bpf_dir.as_deref()),
        What::Why { src, dst } => {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("src", src)
                .append_pair("dst", dst)
                .finish();
            let answer = get_json(addr, &format!("/why?{query}"))?;
            Ok(match args.output {
                Output::Json => json(&answer),
                Output::Table => super::cli_tables::why(&answer),
            })
        }
        What::Connections => {
            let answer = get_json(addr, "/connections")?;
            Ok(match args.output {
                Output::Json => json(&answer),
                Output::Table => super::cli_tables::connections(&answer["connections"]),
            })
        }
        what => {
            let dump = get_json(addr, "/config_dump")?;
            let connections = match what {
                What::Workload { .. } => Some(get_json(addr, "/connections")?),
                _ => None,
            };
            super::cli_tables::from_dump(what, &dump, connections.as_ref(), args.output)
        }
    }
}
