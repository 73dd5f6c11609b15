use std::{io::BufRead as _, os::unix::net::UnixListener, path::PathBuf, thread};

use super::*;

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/cni-1"}],"ips":[{"address":"10.244.1.7/24","gateway":"10.244.1.1","interface":0}]}"#;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-cni-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating a temporary directory");
    d
}

fn env(command: &str, ns: &str) -> BTreeMap<String, String> {
    [
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", "c1".to_owned()),
        ("CNI_NETNS", "/var/run/netns/cni-1".to_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=api;K8S_POD_UID=u-1"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn conf(socket: &std::path::Path) -> Vec<u8> {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"mesh-agent-cni","socket":{:?},"prevResult":{PREV}}}"#,
        socket.display().to_string()
    )
    .into_bytes()
}

/// An agent stand-in that answers one request with `reply` and returns what it was asked.
fn answer_once(socket: &std::path::Path, reply: Reply) -> thread::JoinHandle<Request> {
    let listener = UnixListener::bind(socket).expect("binding the test socket");
    thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut line = String::new();
        std::io::BufReader::new(&stream)
            .read_line(&mut line)
            .expect("reading the request");
        let mut out = serde_json::to_vec(&reply).expect("reply");
        out.push(b'\n');
        std::io::Write::write_all(&mut &stream, &out).expect("answering");
        serde_json::from_str(&line).expect("a request")
    })
}

fn code(out: &Outcome) -> u64 {
    serde_json::from_str::<Value>(&out.stdout).expect("JSON on stdout")["code"]
        .as_u64()
        .expect("an error code")
}

#[test]
fn version_answers_the_supported_versions() {
    let out = run(&env("VERSION", "shop"), br#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(out.code, 0);
    let v: Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["supportedVersions"]
        .as_array()
        .expect("a list")
        .contains(&json!("1.0.0")));
}

#[test]
fn add_asks_the_agent_and_passes_the_previous_result_through_unchanged() {
    let d = dir("add");
    let socket = d.join("cni.sock");
    let agent = answer_once(&socket, Reply::Captured);
    let out = run(&env("ADD", "shop"), &conf(&socket));
    let asked = agent.join().expect("the agent stand-in");
    assert_eq!(out.code, 0, "{out:?}");
    let prev: Value = serde_json::from_str(PREV).expect("PREV");
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).expect("JSON"),
        prev
    );
    assert_eq!(asked.command, Verb::Add);
    assert_eq!(asked.key(), "shop/api");
    assert_eq!(asked.uid.as_deref(), Some("u-1"));
    assert_eq!(asked.netns, PathBuf::from("/var/run/netns/cni-1"));
    assert_eq!(asked.ips, vec!["10.244.1.7".parse::<IpAddr>().expect("ip")]);
    std::fs::remove_dir_all(&d).expect("cleanup");
}

#[test]
fn a_pod_the_agent_cannot_capture_fails_its_add() {
    let d = dir("failed");
    let socket = d.join("cni.sock");
    let agent = answer_once(&socket, Reply::Failed("no cgroup for pod uid u-1".into()));
    let out = run(&env("ADD", "shop"), &conf(&socket));
    agent.join().expect("the agent stand-in");
    assert_eq!((out.code, code(&out)), (1, u64::from(ERR_NOT_CAPTURED)));
    assert!(
        out.stdout.contains("no cgroup for pod uid u-1"),
        "{}",
        out.stdout
    );
    std::fs::remove_dir_all(&d).expect("cleanup");
}

#[test]
fn without_an_agent_add_fails_for_meshed_namespaces_only() {
    let d = dir("down");
    let socket = d.join("cni.sock");
    // No agent has ever run: every namespace but the excluded ones fails.
    let out = run(&env("ADD", "shop"), &conf(&socket));
    assert_eq!(
        (out.code, code(&out)),
        (1, u64::from(ERR_TRY_AGAIN_LATER)),
        "{out:?}"
    );
    assert_eq!(run(&env("ADD", "kube-system"), &conf(&socket)).code, 0);
    // The agent's list decides.
    std::fs::write(d.join(MESHED_NAMESPACES), "shop\n").expect("writing the list");
    let out = run(&env("ADD", "shop"), &conf(&socket));
    assert_eq!(
        (out.code, code(&out)),
        (1, u64::from(ERR_TRY_AGAIN_LATER)),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("namespace shop is meshed"),
        "{}",
        out.stdout
    );
    let out = run(&env("ADD", "legacy"), &conf(&socket));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).expect("JSON"),
        serde_json::from_str::<Value>(PREV).expect("PREV")
    );
    // DEL never fails.
    assert_eq!(run(&env("DEL", "shop"), &conf(&socket)).code, 0);
    std::fs::remove_dir_all(&d).expect("cleanup");
}

#[test]
fn bad_input_is_a_cni_error_naming_what_is_wrong() {
    let socket = PathBuf::from("/nonexistent/cni.sock");
    let out = run(&env("ADD", "shop"), b"{not json");
    assert_eq!(code(&out), u64::from(ERR_DECODE));
    let out = run(
        &env("ADD", "shop"),
        br#"{"cniVersion":"1.0.0","name":"n","type":"mesh-agent-cni"}"#,
    );
    assert_eq!(code(&out), u64::from(ERR_UNSUPPORTED_FIELD));
    assert!(out.stdout.contains("prevResult"), "{}", out.stdout);
    let out = run(
        &env("ADD", "shop"),
        br#"{"cniVersion":"0.1.0","prevResult":{}}"#,
    );
    assert_eq!(code(&out), u64::from(ERR_INCOMPATIBLE_VERSION));
    let out = run(&env("FROB", "shop"), &conf(&socket));
    assert_eq!(code(&out), u64::from(ERR_INVALID_ENV));
    // Not a Kubernetes pod: passed through.
    let mut plain = env("ADD", "shop");
    plain.insert("CNI_ARGS".into(), String::new());
    assert_eq!(run(&plain, &conf(&socket)).code, 0);
}
