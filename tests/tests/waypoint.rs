//! End-to-end tests of the waypoint's placement, with real agents in the lab: a waypoint's pod
//! is never captured and fetches the certificate of its own identity from its node's agent (the
//! workload API), which knows the caller by its cgroup and refuses every other caller. The
//! waypoint at work: tests/waypoint_http.rs.

use std::path::Path;

use mesh_lab::{agent_bin, CgroupDriver, Lab, LabOptions, PodSpec, Topology};

/// The default topology plus a waypoint pod of shop on n1 (named in the state file) and one on
/// n2 laid out by the kubelet's systemd driver (named by UID).
fn topology() -> Topology {
    let mut topology = Topology::default();
    for (name, node, kubelet) in [
        ("waypoint", "n1", None),
        ("waypoint-k", "n2", Some(CgroupDriver::Systemd)),
    ] {
        topology.pods.push(PodSpec {
            namespace: "shop".into(),
            name: name.into(),
            node: node.into(),
            service_account: "waypoint".into(),
            labels: [
                ("app".to_owned(), "waypoint".to_owned()),
                ("mesh-agent/role".to_owned(), "waypoint".to_owned()),
            ]
            .into(),
            capture: None,
            kubelet,
        });
    }
    topology
}

/// Runs `mesh-agent workload fetch` in `target` (a pod or a node) against `node`'s socket,
/// writing into `out`: (success, stdout and stderr).
fn fetch(lab: &Lab, target: &str, node: &str, out: &Path) -> (bool, String) {
    let output = lab
        .command(target, agent_bin())
        .args(["workload", "fetch", "--socket"])
        .arg(lab.workload_socket(node))
        .arg("--out")
        .arg(out)
        .output()
        .expect("running mesh-agent workload fetch");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The URI SAN of the first certificate of a PEM chain.
fn identity_of(chain: &Path) -> String {
    let pem = std::fs::read(chain).expect("the chain file");
    let first = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("a certificate")
        .expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&first).expect("X.509");
    let san = cert
        .subject_alternative_name()
        .expect("extensions")
        .expect("a SAN");
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .expect("a URI SAN")
}

#[test]
fn a_waypoint_pod_fetches_its_own_certificate_and_no_other_caller_does() {
    const TEST: &str = "a_waypoint_pod_fetches_its_own_certificate_and_no_other_caller_does";
    if !mesh_lab::require_privileged(TEST) {
        return;
    }
    let lab = Lab::up(LabOptions {
        topology: topology(),
        ..LabOptions::default()
    });
    // Waypoint pods are workloads of the mesh, never captured.
    assert_eq!(
        lab.metric("n1", "mesh_captured_pods", &[]),
        2.0,
        "shop/client and shop/db, not shop/waypoint"
    );
    assert_eq!(lab.metric("n2", "mesh_captured_pods", &[]), 1.0, "shop/api");
    let dir = lab.run_dir().join("fetched");

    // The waypoint's pod gets its own identity, from its node.
    let out = dir.join("n1-waypoint");
    let (ok, said) = fetch(&lab, "shop/waypoint", "n1", &out);
    assert!(ok, "{said}");
    let want = "spiffe://cluster.local/ns/shop/sa/waypoint";
    assert!(said.contains(want), "{said}");
    assert_eq!(identity_of(&out.join("cert-chain.pem")), want);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(out.join("key.pem"))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is the owner's only");
    assert!(std::fs::read_to_string(out.join("root-cert.pem"))
        .expect("bundle")
        .contains("BEGIN CERTIFICATE"));
    // A waypoint pod named by UID (systemd layout), through its node's agent.
    let out = dir.join("n2-waypoint-k");
    let (ok, said) = fetch(&lab, "shop/waypoint-k", "n2", &out);
    assert!(ok, "{said}");
    assert_eq!(identity_of(&out.join("cert-chain.pem")), want);

    // Every other caller is refused, and gets nothing.
    for (target, node, why) in [
        (
            "shop/client",
            "n1",
            "pod shop/client is not a waypoint's pod",
        ),
        ("n1", "n1", "is no pod of node n1"),
        ("shop/waypoint", "n2", "is no pod of node n2"),
    ] {
        let out = dir.join(format!("refused-{}", target.replace('/', "-")));
        let (ok, said) = fetch(&lab, target, node, &out);
        assert!(!ok, "{target} via {node}'s agent got a certificate: {said}");
        assert!(said.contains(why), "{target} via {node}: {said}");
        assert!(!out.join("key.pem").exists(), "{target}: a key was written");
    }
    let counted = |node: &str, result: &str| {
        lab.metric(
            node,
            "mesh_workload_certificates_total",
            &[("result", result)],
        )
    };
    assert_eq!(
        (counted("n1", "issued"), counted("n1", "refused")),
        (1.0, 2.0)
    );
    assert_eq!(
        (counted("n2", "issued"), counted("n2", "refused")),
        (1.0, 1.0)
    );
    lab.down();
}
