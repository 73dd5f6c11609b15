//! The `AuthorizationPolicy` resource as operators write it: the `spec` of Istio's
//! `security.istio.io/v1` AuthorizationPolicy, field for field, so that existing policies work
//! unchanged. Both sources (the state file now, the Kubernetes CRD later) deserialise into
//! these types and hand them to [`super::compile`]; nothing else reads them.
//!
//! Every struct rejects unknown fields: a misspelt `notPrincipal` must be an error, never a
//! field silently ignored (which, in an ALLOW, would widen it).
//!
//! The same types give the CustomResourceDefinition's schema (`JsonSchema`; `mesh-agent crds`,
//! [`crate::crds`]): their doc comments become its descriptions (`kubectl explain`), so they are
//! written for operators.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `spec` of an AuthorizationPolicy: which workloads, what action, which connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The workloads of the policy's namespace it applies to (in the root namespace: of every
    /// namespace); absent or empty: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `ALLOW` (the default), `DENY` or `AUDIT`. A string, so that an unknown action is this
    /// module's error, with its fail-closed handling, rather than a parse error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        description = "ALLOW (the default), DENY or AUDIT. CUSTOM is not supported by mesh-agent \
                       (the policy is invalid and fails closed).",
        extend("enum" = ["ALLOW", "DENY", "AUDIT", "CUSTOM"])
    )]
    pub action: Option<String>,
    /// Rules; a connection matches the policy when it matches any rule. No rules: the policy
    /// matches nothing (an ALLOW without rules allows nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    /// Istio's `CUSTOM` action provider: not supported (rejected with a clear error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crds::any_object")]
    pub provider: Option<serde_yaml::Value>,
    /// Istio's binding to a gateway or waypoint: not supported at L4 (rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crds::any_object")]
    pub target_ref: Option<serde_yaml::Value>,
    /// As `targetRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crds::any_objects")]
    pub target_refs: Option<serde_yaml::Value>,
}

/// `selector`: the workloads the policy applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all have.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One rule: `from` AND `to` AND `when`; an absent part matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// Sources; any one must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<FromSpec>,
    /// Operations; any one must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<ToSpec>,
    /// Conditions; all must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<ConditionSpec>,
}

/// `from[]`: one source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromSpec {
    pub source: SourceSpec,
}

/// `from[].source`: every field given must match (AND); within a field, any value (OR).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// Peer identities (`cluster.local/ns/shop/sa/client`, `spiffe://` optional), with a `*`
    /// at the start or end as a wildcard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals: L7 (the waypoint's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Namespaces of the peer identity, with `*` wildcards as principals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Source addresses: `10.1.0.0/16` or `10.1.0.5`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Addresses from `X-Forwarded-For`: L7.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to[]`: one operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToSpec {
    pub operation: OperationSpec,
}

/// `to[].operation`: ports are L4; hosts, methods and paths are L7.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationSpec {
    /// Destination (workload) ports, as strings (`"8080"`) or numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// A port as written: Istio's API has strings, YAML authors often write numbers.
/// (Its schema, Kubernetes's int-or-string, is written out in [`crate::crds`].)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    Number(i64),
    Text(String),
}

/// `when[]`: one attribute and the values it may (`values`) or may not (`notValues`) have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionSpec {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}
