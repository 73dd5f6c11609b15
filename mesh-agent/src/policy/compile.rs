//! From the resource as written to a [`Policy`]: every field checked, errors naming the field
//! (`spec.rules[0].to[0].operation.ports[1]: "80a" is not a port (1-65535)`). L7 attributes are
//! compiled for the waypoint; in a policy with a selector (enforced at L4 only) they get their
//! L4 meaning, with a warning.
//!
//! An invalid policy still yields what is known of it ([`Invalid`]): its action and selector
//! when they could be read, so that the caller can fail closed on an invalid DENY.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr, sync::Arc};

use ipnet::IpNet;

use super::{
    l7,
    spec::{AuthorizationPolicySpec, ConditionSpec, OperationSpec, PortSpec, SourceSpec},
    targets::targets,
    Action, Condition, Error, Operation, Pattern, Policy, Rule, Source,
};
use crate::identity::SpiffeId;

/// A policy that could not be compiled, with what could still be read of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub namespace: String,
    pub name: String,
    pub error: Error,
    /// The action, if `spec.action` could be read and is a known one.
    pub action: Option<Action>,
    /// `spec.selector.matchLabels`, if it could be read.
    pub selector: Option<BTreeMap<String, String>>,
    /// For a policy bound with `targetRefs` (enforced by the waypoint): what it is bound to,
    /// or [`TargetRef::Unreadable`]; `None` for a selector policy. Its stand-in then fails
    /// closed at the waypoint for those services only, never at L4 across the namespace.
    pub targets: Option<Vec<super::TargetRef>>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl Invalid {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The stand-in that keeps an invalid policy from failing open: for a DENY (or a policy
    /// whose action cannot be read) a DENY of every connection to the workloads it selects
    /// (all of its namespace when the selector cannot be read either). `None` for an ALLOW or
    /// AUDIT, which the caller keeps at its last good version or leaves out.
    pub fn fail_closed(&self) -> Option<Policy> {
        if matches!(self.action, Some(Action::Allow | Action::Audit)) {
            return None;
        }
        Some(self.stand_in(Action::Deny, vec![Rule::default()]))
    }

    /// For an invalid ALLOW whose last good version is unknown (at start): an ALLOW that
    /// matches nothing, so that the workloads it selects accept only what their other ALLOW
    /// policies allow. `None` for other actions.
    pub fn allow_nothing(&self) -> Option<Policy> {
        (self.action == Some(Action::Allow)).then(|| self.stand_in(Action::Allow, Vec::new()))
    }

    fn stand_in(&self, action: Action, rules: Vec<Rule>) -> Policy {
        Policy {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            key: Arc::from(self.key()),
            selector: self.selector.clone().unwrap_or_default(),
            targets: self.targets.clone().unwrap_or_default(),
            action,
            rules,
            warnings: Vec::new(),
            invalid: Some(self.error.to_string()),
        }
    }
}

/// Compiles a policy from its `spec` as a YAML (or JSON-converted) value: unknown fields,
/// wrong types and bad values are errors naming the field.
#[expect(
    clippy::result_large_err,
    reason = "an invalid policy carries what could be read of it; a rare path"
)]
pub fn compile(namespace: &str, name: &str, spec: serde_yaml::Value) -> Result<Policy, Invalid> {
    let action = hint_action(&spec);
    let selector = hint_selector(&spec);
    let targets = super::targets::hint_targets(namespace, &spec);
    let invalid = |field: String, message: String| Invalid {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        error: Error::Invalid {
            policy: format!("{namespace}/{name}"),
            field,
            message,
        },
        action,
        selector: selector.clone(),
        targets: targets.clone(),
    };
    let spec: AuthorizationPolicySpec = serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_owned()
        } else {
            format!("spec.{path}")
        };
        invalid(field, e.into_inner().to_string())
    })?;
    compile_spec(namespace, name, &spec).map_err(|mut e| {
        // A typed error knows the action only if it could be parsed; keep the hints.
        e.action = e.action.or(action);
        e.selector = e.selector.or(selector.clone());
        e.targets = e.targets.clone().or(targets.clone());
        e
    })
}

/// Compiles a typed spec (the Kubernetes source's entry point; `compile` goes through it).
#[expect(
    clippy::result_large_err,
    reason = "an invalid policy carries what could be read of it; a rare path"
)]
pub fn compile_spec(
    namespace: &str,
    name: &str,
    spec: &AuthorizationPolicySpec,
) -> Result<Policy, Invalid> {
    let key = format!("{namespace}/{name}");
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default();
    let parsed = parse_action(spec.action.as_deref());
    let hint = parsed.as_ref().ok().copied();
    let invalid = |field: &str, message: String| Invalid {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        error: Error::Invalid {
            policy: key.clone(),
            field: field.to_owned(),
            message,
        },
        action: hint,
        selector: Some(selector.clone()),
        targets: None,
    };
    let action = parsed.map_err(|m| invalid("spec.action", m))?;
    if let Some(k) = selector.keys().find(|k| k.is_empty()) {
        return Err(invalid(
            "spec.selector.matchLabels",
            format!("label key {k:?} is empty"),
        ));
    }
    if spec.provider.is_some() {
        return Err(invalid(
            "spec.provider",
            "external authorizers (action CUSTOM) are not supported".into(),
        ));
    }
    let targets = targets(namespace, spec).map_err(|(field, m)| invalid(&field, m))?;
    // Enforced by the waypoint, which evaluates L7 attributes: they are checked and compiled.
    // (With a selector they are only noted, as they always were: L4 does not evaluate them.)
    let waypoint = !targets.is_empty();
    let mut rules = Vec::with_capacity(spec.rules.len());
    let mut warnings = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let mut seen = Seen::default();
        let mut rule = Rule::default();
        for (j, f) in r.from.iter().enumerate() {
            let at = format!("{at}.from[{j}].source");
            let source = source(&f.source, &mut seen)
                .map_err(|(field, m)| invalid(&format!("{at}.{field}"), m))?;
            rule.from.push(source);
        }
        for (j, t) in r.to.iter().enumerate() {
            let at = format!("{at}.to[{j}].operation");
            let op = operation(&t.operation, waypoint, &mut seen)
                .map_err(|(field, m)| invalid(&format!("{at}.{field}"), m))?;
            rule.to.push(op);
        }
        for (j, c) in r.when.iter().enumerate() {
            let at = format!("{at}.when[{j}]");
            if let Some(c) = condition(c, waypoint, &mut seen)
                .map_err(|(field, m)| invalid(&format!("{at}.{field}"), m))?
            {
                rule.when.push(c);
            }
        }
        rule.never = action == Action::Allow && !seen.l7.is_empty();
        rule.never_l7 = action == Action::Allow && !seen.unsupported.is_empty();
        if !targets.is_empty() {
            // Enforced by the waypoint only: what it cannot evaluate is worth a warning.
            if let Some(w) = waypoint_warning(i, action, &seen.unsupported) {
                warnings.push(w);
            }
            rules.push(rule);
            continue;
        }
        let mut l7 = seen.l7;
        if !l7.is_empty() {
            let hint = if seen.unsupported.is_empty() {
                " (bind the policy to the waypoint with targetRefs to evaluate it)"
            } else {
                ""
            };
            // Each attribute once, in the order written.
            let mut seen = std::collections::HashSet::new();
            l7.retain(|a| seen.insert(*a));
            let what = l7.join(", ");
            warnings.push(match action {
                Action::Allow => format!(
                    "rules[{i}] needs L7 attributes ({what}): at L4 this ALLOW rule matches no \
                     connection{hint}"
                ),
                Action::Deny => format!(
                    "rules[{i}] needs L7 attributes ({what}): at L4 this DENY rule denies every \
                     connection that its other attributes match (fail closed)"
                ),
                Action::Audit => format!(
                    "rules[{i}] needs L7 attributes ({what}): at L4 this AUDIT rule logs every \
                     connection that its other attributes match"
                ),
            });
        }
        rules.push(rule);
    }
    Ok(Policy {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        key: Arc::from(key.as_str()),
        selector,
        targets,
        action,
        rules,
        warnings,
        invalid: None,
    })
}

fn parse_action(action: Option<&str>) -> Result<Action, String> {
    match action {
        None | Some("ALLOW") => Ok(Action::Allow),
        Some("DENY") => Ok(Action::Deny),
        Some("AUDIT") => Ok(Action::Audit),
        Some("CUSTOM") => Err("action CUSTOM (an external authorizer) is not supported".into()),
        Some(other) => Err(format!(
            "unknown action {other:?}: expected ALLOW, DENY or AUDIT"
        )),
    }
}

/// `spec.action`, read leniently from a spec that may not parse; `None` when unreadable (a
/// spec that is not a mapping included).
fn hint_action(spec: &serde_yaml::Value) -> Option<Action> {
    if !(spec.is_mapping() || spec.is_null()) {
        return None;
    }
    match spec.get("action") {
        None => Some(Action::Allow),
        Some(v) => v.as_str().and_then(|a| parse_action(Some(a)).ok()),
    }
}

/// `spec.selector.matchLabels`, read leniently; `None` when it is there but unreadable.
fn hint_selector(spec: &serde_yaml::Value) -> Option<BTreeMap<String, String>> {
    let Some(selector) = spec.get("selector") else {
        return Some(BTreeMap::new());
    };
    let Some(labels) = selector.get("matchLabels") else {
        return selector.as_mapping().map(|_| BTreeMap::new());
    };
    serde_yaml::from_value(labels.clone()).ok()
}

/// A field error: the field (relative to its parent) and what is wrong.
type FieldError = (String, String);

/// What a rule uses beyond L4, in the order written.
#[derive(Debug, Default)]
struct Seen {
    /// Attributes L4 cannot evaluate (everything below included), by field name (`when` for a
    /// condition).
    l7: Vec<&'static str>,
    /// Attributes no proxy of the mesh evaluates, by field name or condition key.
    unsupported: Vec<String>,
}

/// The warning for rule `i` of a policy enforced by the waypoint that uses `unsupported`
/// attributes.
fn waypoint_warning(i: usize, action: Action, unsupported: &[String]) -> Option<String> {
    if unsupported.is_empty() {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    let what: Vec<&str> = unsupported
        .iter()
        .map(String::as_str)
        .filter(|a| seen.insert(*a))
        .collect();
    let what = what.join(", ");
    let meaning = match action {
        Action::Allow => "at the waypoint this ALLOW rule matches no request",
        Action::Deny => {
            "at the waypoint this DENY rule denies every request that its other attributes \
             match (fail closed)"
        }
        Action::Audit => {
            "at the waypoint this AUDIT rule logs every request that its other attributes match"
        }
    };
    Some(format!(
        "rules[{i}] needs attributes this mesh does not evaluate ({what}): {meaning}"
    ))
}

fn source(s: &SourceSpec, seen: &mut Seen) -> Result<Source, FieldError> {
    for (name, values) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        if !values.is_empty() {
            seen.l7.push(name);
            seen.unsupported.push(name.to_owned());
        }
    }
    Ok(Source {
        principals: list("principals", &s.principals, principal)?,
        not_principals: list("notPrincipals", &s.not_principals, principal)?,
        namespaces: list("namespaces", &s.namespaces, namespace)?,
        not_namespaces: list("notNamespaces", &s.not_namespaces, namespace)?,
        ip_blocks: list("ipBlocks", &s.ip_blocks, ip_block)?,
        not_ip_blocks: list("notIpBlocks", &s.not_ip_blocks, ip_block)?,
    })
}

fn operation(o: &OperationSpec, waypoint: bool, seen: &mut Seen) -> Result<Operation, FieldError> {
    for (name, values) in [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ] {
        if !values.is_empty() {
            seen.l7.push(name);
        }
    }
    let ports = list("ports", &o.ports, port)?;
    let not_ports = list("notPorts", &o.not_ports, port)?;
    if !waypoint {
        return Ok(Operation {
            ports,
            not_ports,
            ..Operation::default()
        });
    }
    Ok(Operation {
        ports,
        not_ports,
        hosts: list("hosts", &o.hosts, l7::host)?,
        not_hosts: list("notHosts", &o.not_hosts, l7::host)?,
        methods: list("methods", &o.methods, l7::method)?,
        not_methods: list("notMethods", &o.not_methods, l7::method)?,
        paths: list("paths", &o.paths, l7::path)?,
        not_paths: list("notPaths", &o.not_paths, l7::path)?,
    })
}

/// A `when` condition: `None` for a key no proxy of the mesh evaluates, or an L7 key of a
/// policy not enforced by the waypoint (recorded in `seen`).
fn condition(
    c: &ConditionSpec,
    waypoint: bool,
    seen: &mut Seen,
) -> Result<Option<Condition>, FieldError> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err((
            "values".into(),
            format!("condition {:?} needs values or notValues", c.key),
        ));
    }
    let key = c.key.as_str();
    if let Some(name) = l7::header_key(key).filter(|_| waypoint) {
        let name = name.map_err(|m| ("key".to_owned(), m))?;
        seen.l7.push("when");
        let (values, not) = values_of(c, l7::header_value)?;
        return Ok(Some(Condition::RequestHeader { name, values, not }));
    }
    if key.starts_with("request.headers[") {
        // A policy with a selector: noted, not checked.
        seen.l7.push("when");
        return Ok(None);
    }
    if key.starts_with("request.") || key.starts_with("experimental.") || key == "remote.ip" {
        seen.l7.push("when");
        seen.unsupported.push(key.to_owned());
        return Ok(None);
    }
    Ok(Some(match key {
        "source.ip" => {
            let (values, not) = values_of(c, ip_block)?;
            Condition::SourceIp { values, not }
        }
        "destination.ip" => {
            let (values, not) = values_of(c, ip_block)?;
            Condition::DestinationIp { values, not }
        }
        "source.principal" => {
            let (values, not) = values_of(c, principal)?;
            Condition::SourcePrincipal { values, not }
        }
        "source.namespace" => {
            let (values, not) = values_of(c, namespace)?;
            Condition::SourceNamespace { values, not }
        }
        "destination.port" => {
            let (values, not) = values_of(c, |s: &String| port(&PortSpec::Text(s.clone())))?;
            Condition::DestinationPort { values, not }
        }
        other => {
            return Err((
                "key".into(),
                format!(
                    "condition key {other:?} is not supported: the keys are source.ip, \
                     source.principal, source.namespace, destination.ip, destination.port and \
                     request.headers[<name>] (request.auth.*, remote.ip: not evaluated)"
                ),
            ))
        }
    }))
}

fn values_of<T>(
    c: &ConditionSpec,
    parse: impl Fn(&String) -> Result<T, String>,
) -> Result<(Vec<T>, Vec<T>), FieldError> {
    Ok((
        list("values", &c.values, &parse)?,
        list("notValues", &c.not_values, &parse)?,
    ))
}

/// Parses each element of a list field; an error names `field[i]`.
fn list<S, T>(
    field: &str,
    values: &[S],
    parse: impl Fn(&S) -> Result<T, String>,
) -> Result<Vec<T>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse(v).map_err(|m| (format!("{field}[{i}]"), m)))
        .collect()
}

/// Characters a principal or namespace pattern may contain besides one leading or trailing `*`.
fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')
}

/// A `*` only at the start or the end ([`super::l7::wildcard`]), the rest in `allowed`.
fn pattern(s: &str) -> Result<Pattern, String> {
    let p = super::l7::wildcard(s)?;
    let body = match &p {
        Pattern::Any => return Ok(p),
        Pattern::Exact(body) | Pattern::Prefix(body) | Pattern::Suffix(body) => body,
    };
    if let Some(c) = body.chars().find(|c| !allowed(*c)) {
        return Err(format!("{s:?}: character {c:?} is not allowed"));
    }
    Ok(p)
}

/// A principal: `<trust domain>/ns/<namespace>/sa/<account>` (`spiffe://` optional), or a
/// pattern. An exact principal must be a valid SPIFFE id: one that is not can never match.
fn principal(s: &String) -> Result<Pattern, String> {
    let body = s.strip_prefix("spiffe://").unwrap_or(s);
    let p = pattern(body).map_err(|m| format!("principal {m}"))?;
    if let Pattern::Exact(exact) = &p {
        SpiffeId::from_str(&format!("spiffe://{exact}")).map_err(|e| {
            format!(
                "principal {s:?} is not <trust-domain>/ns/<namespace>/sa/<service-account>: {e}"
            )
        })?;
    }
    Ok(p)
}

fn namespace(s: &String) -> Result<Pattern, String> {
    let p = pattern(s).map_err(|m| format!("namespace {m}"))?;
    if s.contains('/') {
        return Err(format!("namespace {s:?} contains `/`"));
    }
    Ok(p)
}

/// `10.0.0.0/8` or a single address. An IPv4-mapped IPv6 block (`::ffff:10.0.0.0/104`) is
/// taken as the IPv4 block it maps, as connections' addresses are: written either way, it
/// matches the same connections.
fn ip_block(s: &String) -> Result<IpNet, String> {
    let net = match IpNet::from_str(s) {
        Ok(net) => net.trunc(),
        Err(_) => IpAddr::from_str(s)
            .map(IpNet::from)
            .map_err(|_| format!("{s:?} is not an address or CIDR block"))?,
    };
    Ok(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        other => other,
    })
}

fn port(p: &PortSpec) -> Result<u16, String> {
    let n = match p {
        PortSpec::Number(n) => Some(*n),
        PortSpec::Text(s) => s.trim().parse::<i64>().ok().filter(|_| !s.is_empty()),
    };
    n.and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n != 0)
        .ok_or_else(|| {
            let shown = match p {
                PortSpec::Number(n) => n.to_string(),
                PortSpec::Text(s) => format!("{s:?}"),
            };
            format!("{shown} is not a port (1-65535)")
        })
}
