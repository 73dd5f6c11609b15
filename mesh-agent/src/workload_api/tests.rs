use std::collections::BTreeMap;

use super::*;
use crate::state::{Changes, Namespace, ROLE_LABEL, ROLE_WAYPOINT};

fn workload(name: &str, node: &str, ip: &str, cgroup: &str, uid: Option<&str>) -> Workload {
    Workload {
        namespace: "shop".into(),
        name: name.into(),
        service_account: name.into(),
        node: node.into(),
        ips: vec![ip.parse().expect("ip")],
        netns: if cgroup.is_empty() {
            PathBuf::new()
        } else {
            format!("/run/netns/{name}").into()
        },
        cgroup: cgroup.into(),
        uid: uid.map(str::to_owned),
        labels: BTreeMap::new(),
        capture: Default::default(),
    }
}

fn waypoint(mut w: Workload) -> Workload {
    w.labels
        .insert(ROLE_LABEL.to_owned(), ROLE_WAYPOINT.to_owned());
    w
}

const UID: &str = "0b4f7a6e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";

#[test]
fn only_a_waypoint_pod_of_this_node_is_attested_by_its_cgroup() {
    let root = std::env::temp_dir().join(format!("mesh-attest-{}", std::process::id()));
    let pod_dir = root.join(format!("kubepods/besteffort/pod{UID}"));
    std::fs::create_dir_all(&pod_dir).expect("pod cgroup dir");
    let (snap, _) = Snapshot::default()
        .apply(Changes {
            namespaces: vec![Namespace {
                name: "shop".into(),
                enabled: true,
                waypoint: Some("waypoint".into()),
            }],
            workloads: vec![
                waypoint(workload(
                    "waypoint",
                    "n1",
                    "10.0.1.9",
                    "/cg/shop-waypoint",
                    None,
                )),
                waypoint(workload("waypoint-kube", "n1", "10.0.1.10", "", Some(UID))),
                waypoint(workload(
                    "waypoint-n2",
                    "n2",
                    "10.0.2.9",
                    "/cg/shop-waypoint-n2",
                    None,
                )),
                workload("client", "n1", "10.0.1.2", "/cg/shop-client", None),
            ],
            ..Changes::default()
        })
        .expect("a valid state");
    let attest = |cgroup: &str| {
        attest(&snap, "n1", Path::new(cgroup), &root)
            .map(|w| w.key())
            .map_err(|e| e.split(':').next().unwrap_or_default().to_owned())
    };
    let kube_ctr = pod_dir.join("cri-containerd-1234.scope");
    #[rustfmt::skip]
    let cases: &[(&str, Result<&str, &str>)] = &[
        // The state file's cgroup, and a cgroup below it.
        ("/cg/shop-waypoint", Ok("shop/waypoint")),
        ("/cg/shop-waypoint/ctr", Ok("shop/waypoint")),
        // A pod named by UID: its container's cgroup below the kubelet's pod cgroup.
        (kube_ctr.to_str().expect("utf-8"), Ok("shop/waypoint-kube")),
        // A name that merely starts the same is another cgroup.
        ("/cg/shop-waypoint-evil", Err("the caller (cgroup /cg/shop-waypoint-evil) is no pod of node n1 in the mesh state")),
        // An ordinary pod of this node, a waypoint of another node, nothing at all.
        ("/cg/shop-client", Err("pod shop/client is not a waypoint's pod (label mesh-agent/role=waypoint)")),
        ("/cg/shop-waypoint-n2", Err("the caller (cgroup /cg/shop-waypoint-n2) is no pod of node n1 in the mesh state")),
        ("/", Err("the caller (cgroup /) is no pod of node n1 in the mesh state")),
    ];
    for (cgroup, want) in cases {
        let got = attest(cgroup);
        let got = got.as_ref().map(String::as_str).map_err(String::as_str);
        assert_eq!(got, *want, "{cgroup}");
    }
    std::fs::remove_dir_all(&root).expect("cleanup");
}
