//! Scenario 1, throughput: iperf3 with one and with four TCP streams, cross-node and same-node,
//! on the direct path, through the client's agent only (capture-only passthrough: plain TCP to
//! a pod outside the mesh) and on the full mesh path: cross-node, capture + HBONE mTLS + the
//! destination's agent; same-node, capture + the same-node fast path (one agent connects the
//! two pods, no tunnel: docs/hbone.md). Also agent CPU per GiB moved.

use std::path::Path;

use anyhow::Result;
use mesh_lab::Lab;

use super::{
    measure::{self, agents_cpu},
    Durations, Figure,
};

/// One place of the comparison: the direct pair and the two meshed paths beside it.
struct Place {
    name: &'static str,
    /// The place in figure keys.
    key: &'static str,
    /// Outside the mesh: the direct path.
    direct: (&'static str, &'static str),
    passthrough: (&'static str, &'static str),
    mesh: (&'static str, &'static str),
    /// What the full mesh path is at this place.
    mesh_label: &'static str,
}

const PLACES: [Place; 2] = [
    Place {
        name: "cross-node",
        key: "cross_node",
        direct: ("legacy/client", "legacy/server"),
        passthrough: ("shop/client", "legacy/server"),
        mesh: ("shop/client", "shop/api"),
        mesh_label: "full mesh (HBONE mTLS)",
    },
    Place {
        name: "same-node",
        key: "same_node",
        direct: ("legacy/client", "legacy/local"),
        passthrough: ("shop/client", "legacy/local"),
        mesh: ("shop/client", "shop/db"),
        mesh_label: "full mesh (same-node fast path)",
    },
];

pub fn run(lab: &Lab, d: &Durations, out: &mut Vec<Figure>) -> Result<()> {
    let _servers: Vec<_> = ["legacy/server", "legacy/local", "shop/api", "shop/db"]
        .iter()
        .map(|p| measure::iperf_server(lab, p))
        .collect();
    for streams in [1, 4] {
        for place in &PLACES {
            let ip = |pod: &str| lab.pod(pod).ip.to_string();
            let (client, server) = place.direct;
            let machine0 = measure::machine_cpu()?;
            let (direct_bps, direct_bytes) =
                measure::iperf(lab, client, &ip(server), streams, d.iperf_secs)?;
            let machine = measure::machine_cpu()? - machine0;
            let direct = direct_bps / 1e9;
            let key = |what: &str| format!("throughput.{}.{streams}.{what}", place.key);
            out.push(Figure {
                scenario: "throughput",
                key: key("direct"),
                name: format!("{}, {streams} stream(s): direct", place.name),
                unit: "Gbit/s",
                value: direct,
                direct: None,
            });
            // What the application and the kernel spend per GiB without any agent: with the
            // agents' CPU per GiB below, it bounds what the machine's cores can carry.
            out.push(Figure {
                scenario: "throughput",
                key: key("direct.machine_cpu_per_gib"),
                name: format!(
                    "{}, {streams} stream(s): direct, machine CPU per GiB (iperf3 and kernel)",
                    place.name
                ),
                unit: "CPU s",
                value: machine / (direct_bytes / f64::from(1u32 << 30)),
                direct: None,
            });
            for (path, what, (client, server)) in [
                ("passthrough", "capture-only passthrough", place.passthrough),
                ("mesh", place.mesh_label, place.mesh),
            ] {
                let cpu0 = agents_cpu(lab)?;
                let (bps, bytes) = measure::iperf(lab, client, &ip(server), streams, d.iperf_secs)?;
                let cpu = agents_cpu(lab)? - cpu0;
                out.push(Figure {
                    scenario: "throughput",
                    key: key(path),
                    name: format!("{}, {streams} stream(s): {what}", place.name),
                    unit: "Gbit/s",
                    value: bps / 1e9,
                    direct: Some(direct),
                });
                out.push(Figure {
                    scenario: "throughput",
                    key: key(&format!("{path}.agent_cpu_per_gib")),
                    name: format!(
                        "{}, {streams} stream(s): {what}, agent CPU per GiB",
                        place.name
                    ),
                    unit: "CPU s",
                    value: cpu / (bytes / f64::from(1u32 << 30)),
                    direct: None,
                });
            }
        }
    }
    Ok(())
}

/// The TLS floor: the record layer's AES-128-GCM on one core (`mesh-agent-bench crypto`), no
/// lab needed. Every byte crossing nodes is sealed once and opened once, so seal plus open per
/// GiB is CPU the two agents spend per GiB whatever else they do.
pub fn crypto(bench: &Path, quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    let millis = if quick { "200" } else { "2000" };
    let v = measure::agent_json(bench, &["crypto", "--millis", millis])?;
    for (name, key, unit) in [
        ("seal, one core", "seal_gbyte_per_s", "GB/s"),
        ("open, one core", "open_gbyte_per_s", "GB/s"),
        (
            "seal + open CPU per GiB (both agents' crypto floor)",
            "seal_open_cpu_s_per_gib",
            "CPU s",
        ),
    ] {
        out.push(Figure {
            scenario: "throughput",
            key: format!("throughput.tls.{key}"),
            name: format!("TLS records (AES-128-GCM, 16 KiB): {name}"),
            unit,
            value: measure::num(&v, key)?,
            direct: None,
        });
    }
    // The record path, ours against rustls's unbuffered API (docs/performance.md, "The record
    // layer against rustls").
    let v = measure::agent_json(bench, &["records", "--millis", millis])?;
    for (path, who) in [
        ("ours", "our record layer"),
        ("rustls", "rustls's unbuffered API"),
    ] {
        out.push(Figure {
            scenario: "throughput",
            key: format!("throughput.tls.path.{path}.cpu_s_per_gib"),
            name: format!("TLS record path in memory, {who}: 16 KiB records, CPU per GiB"),
            unit: "CPU s",
            value: measure::num(&v, &format!("{path}_path_cpu_s_per_gib"))?,
            direct: None,
        });
        out.push(Figure {
            scenario: "throughput",
            key: format!("throughput.tls.path.{path}.ns_per_1k_record"),
            name: format!("TLS record path in memory, {who}: one 1 KiB record"),
            unit: "ns",
            value: measure::num(&v, &format!("{path}_path_ns_per_1k_record"))?,
            direct: None,
        });
    }
    Ok(())
}
