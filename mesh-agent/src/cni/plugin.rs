//! The plugin as the container runtime runs it: `CNI_*` environment, the network configuration
//! on stdin, the result (or a CNI error object) on stdout.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Reply, Request, Verb, DEFAULT_SOCKET, MAX_MESSAGE, MESHED_NAMESPACES};

/// The CNI versions this plugin speaks.
const SUPPORTED: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// How long the agent may take to answer an ADD (capture of a pod, its certificate minted).
const ADD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// CNI error codes (spec: 1-99 are the spec's, 100 and up the plugin's).
const ERR_INCOMPATIBLE_VERSION: u32 = 1;
const ERR_UNSUPPORTED_FIELD: u32 = 2;
const ERR_INVALID_ENV: u32 = 4;
const ERR_DECODE: u32 = 6;
const ERR_TRY_AGAIN_LATER: u32 = 11;
const ERR_NOT_CAPTURED: u32 = 100;

/// The plugin's network configuration (the runtime's conflist entry, with `prevResult`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    prev_result: Option<Value>,
    /// The agent's socket.
    #[serde(default)]
    socket: Option<PathBuf>,
    /// Namespaces whose pods start even when no agent has ever said which namespaces are
    /// meshed (the node's own infrastructure).
    #[serde(default = "default_excluded")]
    exclude_namespaces: Vec<String>,
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into(), "mesh-system".into()]
}

/// What the plugin prints and its exit status.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub code: i32,
    /// A line for stderr (the runtime's logs), if any.
    pub log: Option<String>,
}

/// Runs the plugin: `env` is the process environment, `stdin` the network configuration.
pub fn run(env: &BTreeMap<String, String>, stdin: &[u8]) -> Outcome {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        let version = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "1.0.0".into());
        return ok(json!({"cniVersion": version, "supportedVersions": SUPPORTED}));
    }
    let conf: NetConf = match serde_json::from_slice(stdin) {
        Ok(c) => c,
        Err(e) => {
            return error(
                "1.0.0",
                ERR_DECODE,
                "the network configuration on stdin is not valid JSON for mesh-agent-cni",
                &e.to_string(),
            )
        }
    };
    let v = conf.cni_version.clone();
    if !SUPPORTED.contains(&v.as_str()) {
        return error(
            &v,
            ERR_INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            &format!("supported: {}", SUPPORTED.join(", ")),
        );
    }
    let verb = match command {
        "ADD" => Verb::Add,
        "DEL" => Verb::Del,
        "CHECK" => Verb::Check,
        "GC" | "STATUS" => return Outcome::empty(),
        other => {
            return error(
                &v,
                ERR_INVALID_ENV,
                "CNI_COMMAND is missing or unknown",
                &format!("CNI_COMMAND={other:?}"),
            )
        }
    };
    if verb != Verb::Del && conf.prev_result.is_none() {
        return error(
            &v,
            ERR_UNSUPPORTED_FIELD,
            "mesh-agent-cni is a chained plugin: it needs the primary plugin's prevResult",
            "put it after the primary plugin in the conflist's plugins",
        );
    }
    let args = cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""));
    let (Some(namespace), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
    else {
        // Not a Kubernetes pod: nothing of the mesh.
        return pass(verb, &conf);
    };
    let request = Request {
        command: verb,
        namespace: namespace.clone(),
        name: name.clone(),
        uid: args.get("K8S_POD_UID").cloned(),
        container_id: env.get("CNI_CONTAINERID").cloned().unwrap_or_default(),
        netns: env.get("CNI_NETNS").map(PathBuf::from).unwrap_or_default(),
        ips: conf.prev_result.as_ref().map(ips_of).unwrap_or_default(),
    };
    if verb == Verb::Add && request.netns.as_os_str().is_empty() {
        return error(&v, ERR_INVALID_ENV, "CNI_NETNS is missing on ADD", "");
    }
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let pod = request.key();
    match ask(&socket, &request) {
        Ok(Reply::Captured | Reply::NotMeshed | Reply::Released) => pass(verb, &conf),
        Ok(Reply::Failed(why)) => error(
            &v,
            ERR_NOT_CAPTURED,
            &format!("pod {pod} could not be captured by the mesh agent"),
            &why,
        ),
        Err(e) if verb == Verb::Del => {
            // The agent releases what no longer runs when it comes back; a DEL never fails.
            let mut out = pass(verb, &conf);
            out.log = Some(format!(
                "mesh-agent-cni: DEL of pod {pod}: the agent did not answer ({e}); it releases \
                 the pod when it runs again"
            ));
            out
        }
        Err(e) => match meshed(&socket, namespace, &conf.exclude_namespaces) {
            Meshed::No => {
                let mut out = pass(verb, &conf);
                out.log = Some(format!(
                    "mesh-agent-cni: pod {pod}: the agent did not answer ({e}); namespace \
                     {namespace} is not meshed, so the pod starts untouched"
                ));
                out
            }
            Meshed::Yes(how) => error(
                &v,
                ERR_TRY_AGAIN_LATER,
                &format!(
                    "the mesh agent of this node did not answer, and pod {pod} must be captured \
                     before it starts ({how})"
                ),
                &format!("{}: {e}", socket.display()),
            ),
        },
    }
}

impl Outcome {
    fn empty() -> Self {
        Self {
            stdout: String::new(),
            code: 0,
            log: None,
        }
    }
}

fn ok(v: Value) -> Outcome {
    Outcome {
        stdout: v.to_string(),
        code: 0,
        log: None,
    }
}

/// Success: ADD and CHECK pass the previous result through unchanged (ADD prints it, CHECK
/// and DEL print nothing).
fn pass(verb: Verb, conf: &NetConf) -> Outcome {
    match (verb, &conf.prev_result) {
        (Verb::Add, Some(prev)) => {
            let mut result = prev.clone();
            if let Some(obj) = result.as_object_mut() {
                obj.insert("cniVersion".into(), json!(conf.cni_version));
            }
            ok(result)
        }
        _ => Outcome::empty(),
    }
}

fn error(version: &str, code: u32, msg: &str, details: &str) -> Outcome {
    Outcome {
        stdout: json!({"cniVersion": version, "code": code, "msg": msg, "details": details})
            .to_string(),
        code: 1,
        log: Some(format!("mesh-agent-cni: {msg}: {details}")),
    }
}

/// `K=V;K=V` of `CNI_ARGS`.
fn cni_args(args: &str) -> BTreeMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The addresses of a CNI result (`ips[].address`, `a.b.c.d/len`).
fn ips_of(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// Sends `request` and reads the agent's reply.
fn ask(socket: &Path, request: &Request) -> std::io::Result<Reply> {
    let mut stream = connect(socket)?;
    let timeout = match request.command {
        Verb::Add => ADD_TIMEOUT,
        Verb::Del | Verb::Check => ADD_TIMEOUT / 3,
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_MESSAGE as u64)).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::other(
            "the agent closed the connection without answering",
        ));
    }
    serde_json::from_str(&reply)
        .map_err(|e| std::io::Error::other(format!("unreadable answer from the agent: {e}")))
}

/// Connects with a deadline (a Unix connect does not block long, but a full backlog could).
fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    Ok(stream)
}

enum Meshed {
    No,
    /// Yes, with how the plugin knows.
    Yes(String),
}

/// Whether `namespace` is meshed, from the list the agent keeps next to its socket; without
/// it, every namespace but the excluded ones is taken as meshed (fail closed).
fn meshed(socket: &Path, namespace: &str, excluded: &[String]) -> Meshed {
    let file = socket.with_file_name(MESHED_NAMESPACES);
    match std::fs::read_to_string(&file) {
        Ok(list) if list.lines().any(|l| l.trim() == namespace) => Meshed::Yes(format!(
            "namespace {namespace} is meshed, as {} says",
            file.display()
        )),
        Ok(_) => Meshed::No,
        Err(_) if excluded.iter().any(|e| e == namespace) => Meshed::No,
        Err(e) => Meshed::Yes(format!(
            "no agent has said which namespaces are meshed ({}: {e}), and {namespace} is not \
             in exclude_namespaces",
            file.display()
        )),
    }
}

#[cfg(test)]
mod tests;
