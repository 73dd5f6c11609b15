use std::path::PathBuf;

use serde::Deserialize as _;

use super::*;
use crate::policy;

fn deploy_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

#[test]
fn deploy_holds_what_mesh_agent_crds_prints() {
    let path = deploy_file("crds/authorizationpolicies.yaml");
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let generated = yaml().expect("the CRDs serialise");
    assert!(
        on_disk == generated,
        "{} differs from what `mesh-agent crds` prints (the policy types changed?): regenerate it \
         with `cargo run -p mesh-agent -- crds > deploy/crds/authorizationpolicies.yaml` and \
         review the diff",
        path.display()
    );
}

#[test]
fn the_authorization_policy_schema_is_structural() {
    let crd = authorization_policy();
    let versions = crd["spec"]["versions"]
        .as_array()
        .expect("versions is a list");
    assert_eq!(versions.len(), 2);
    assert_eq!(
        versions
            .iter()
            .filter(|v| v["storage"] == Value::Bool(true))
            .count(),
        1,
        "exactly one storage version"
    );
    for version in versions {
        let schema = &version["schema"]["openAPIV3Schema"];
        let errors = structural_errors(schema);
        assert!(
            errors.is_empty(),
            "{} is not structural: {errors:#?}",
            version["name"]
        );
    }
}

#[test]
fn the_schema_has_istios_fields_and_keeps_unknown_ones_for_the_agent() {
    let crd = authorization_policy();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let source = &spec["properties"]["rules"]["items"]["properties"]["from"]["items"]["properties"]
        ["source"];
    for field in [
        "principals",
        "notPrincipals",
        "namespaces",
        "ipBlocks",
        "remoteIpBlocks",
    ] {
        assert_eq!(
            source["properties"][field]["type"], "array",
            "source.{field} in {source:#}"
        );
    }
    // An unknown field is kept for the agent to refuse, never pruned (an ALLOW would widen).
    assert_eq!(source["x-kubernetes-preserve-unknown-fields"], true);
    assert_eq!(spec["x-kubernetes-preserve-unknown-fields"], true);
    let ports = &spec["properties"]["rules"]["items"]["properties"]["to"]["items"]["properties"]
        ["operation"]["properties"]["ports"];
    assert_eq!(
        ports["items"]["x-kubernetes-int-or-string"], true,
        "{ports:#}"
    );
    assert_eq!(
        spec["properties"]["action"]["enum"],
        json!(["ALLOW", "DENY", "AUDIT", "CUSTOM"])
    );
    assert_eq!(
        spec["properties"]["selector"]["properties"]["matchLabels"]["additionalProperties"]["type"],
        "string"
    );
    let condition = &spec["properties"]["rules"]["items"]["properties"]["when"]["items"];
    assert_eq!(condition["required"], json!(["key"]));
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["ap"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
}

/// The objects of deploy/examples/ (docs/policy.md's examples; `cargo xtask manifests` validates
/// them against the CRD) are policies the agent accepts.
#[test]
fn the_example_policies_are_valid_for_the_agent() {
    let path = deploy_file("examples/authorizationpolicies.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut seen = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let object = serde_yaml::Value::deserialize(doc).expect("a YAML document");
        let name = object["metadata"]["name"].as_str().expect("metadata.name");
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .expect("metadata.namespace");
        assert_eq!(object["kind"].as_str(), Some(KIND), "{name}");
        let spec = object["spec"].clone();
        if let Err(invalid) = policy::compile(namespace, name, spec) {
            panic!("{name}: {}", invalid.error);
        }
        seen += 1;
    }
    assert!(seen >= 6, "only {seen} examples in {}", path.display());
}

/// The structural check itself finds what the API server would refuse, naming the node.
#[test]
fn the_structural_check_names_what_the_api_server_refuses() {
    let schema = json!({
        "type": "object",
        "properties": {
            "untyped": {"description": "no type"},
            "both": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "list": {"type": "array"},
            "referenced": {"$ref": "#/components/schemas/X"},
            "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "port": {"x-kubernetes-int-or-string": true},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        },
    });
    let errors = structural_errors(&schema);
    for expected in [
        ".untyped: no type",
        ".both: properties and additionalProperties together",
        ".list: an array without items",
        ".referenced: has $ref",
        ".either: anyOf outside int-or-string",
    ] {
        assert!(
            errors.iter().any(|e| e == expected),
            "{expected:?} not in {errors:#?}"
        );
    }
    assert!(
        !errors
            .iter()
            .any(|e| e.starts_with(".port") || e.starts_with(".free")),
        "{errors:#?}"
    );
}
