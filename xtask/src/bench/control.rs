//! Scenario 5, the control path at scale: a state of 10,000 services and 50,000 endpoints,
//! built by the agent's own state code (`mesh-agent-bench state`), then single-service and
//! single-workload updates applied through the incremental API the discovery sources use.

use std::path::Path;

use anyhow::Result;

use super::{
    measure::{self, num},
    Figure,
};

pub fn run(bench: &Path, quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    let (services, workloads) = if quick {
        (1_000, 5_000)
    } else {
        (10_000, 50_000)
    };
    let v = measure::agent_json(
        bench,
        &[
            "state",
            "--services",
            &services.to_string(),
            "--workloads",
            &workloads.to_string(),
        ],
    )?;
    let scale = format!("{services} services, {workloads} endpoints");
    for (name, key, unit) in [
        ("full build of the state", "build_ms", "ms"),
        (
            "single-service update applied, p50",
            "update_one_service_us_p50",
            "µs",
        ),
        (
            "single-service update applied, max",
            "update_one_service_us_max",
            "µs",
        ),
        (
            "single-workload update applied, p50",
            "update_one_workload_us_p50",
            "µs",
        ),
        (
            "single namespace policy update applied, p50",
            "update_one_policy_us_p50",
            "µs",
        ),
        (
            "root-namespace (mesh-wide) policy update applied, p50",
            "update_root_policy_ms_p50",
            "ms",
        ),
        (
            "one authorization decision (2 policies select the workload)",
            "decide_ns",
            "ns",
        ),
        ("state process RSS", "rss_mib", "MiB"),
    ] {
        out.push(Figure {
            scenario: "control",
            key: format!("control.{key}"),
            name: format!("{scale}: {name}"),
            unit,
            value: num(&v, key)?,
            direct: None,
        });
    }
    Ok(())
}
