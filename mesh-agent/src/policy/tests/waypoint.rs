//! Policies bound with `targetRefs`, enforced by the waypoint: which references are accepted,
//! the L7 attributes compiled (and the values refused), decisions on requests
//! (`decide_request`) as a table, and which policies the state gives the waypoint for a
//! service (`Snapshot::service_policies`).

use std::{collections::BTreeMap, sync::Arc};

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{allow, deny, invalid, ip, no_match, peer, policy, try_policy, Want, NO_POLICY, ROOT};
use crate::{
    identity::SpiffeId,
    policy::{decide_request, selects, Decision, Policy, Request, Selected, TargetRef},
    state::{Changes, Namespace, Snapshot, Workload},
    waypoint::normalize,
};

const API: &str = "targetRefs: [{kind: Service, name: api}]";

/// A policy of `shop` bound to Service `api`: `rest` is the spec without its `targetRefs`.
fn bound(key: &str, rest: &str) -> Arc<Policy> {
    let spec = if rest.is_empty() {
        format!("{{{API}}}")
    } else {
        format!("{{{API}, {rest}}}")
    };
    Arc::new(policy(key, &spec))
}

/// One request as the waypoint sees it.
#[derive(Debug, Clone, Copy)]
struct Req {
    identity: Option<&'static str>,
    port: u16,
    host: &'static str,
    method: &'static str,
    /// Normalised here, as the waypoint does before deciding.
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

const GET: Req = Req {
    identity: Some("shop/client"),
    port: 8080,
    host: "api.shop.svc.cluster.local",
    method: "GET",
    path: "/",
    headers: &[],
};

fn decide(policies: &[Arc<Policy>], r: Req) -> Decision {
    let id: Option<SpiffeId> = r.identity.map(peer);
    let mut headers = HeaderMap::new();
    for (name, value) in r.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
        headers.append(name, HeaderValue::from_static(value));
    }
    let path = normalize::target(r.path)
        .unwrap_or_else(|e| panic!("{}: {e}", r.path))
        .path;
    let req = Request {
        identity: id.as_ref(),
        src: ip("10.0.1.5"),
        dst: ip("10.96.0.10"),
        port: r.port,
        host: r.host,
        method: r.method,
        path: &path,
        headers: &headers,
    };
    decide_request(&Selected::new(policies), &req)
}

fn check(policies: &[Arc<Policy>], r: Req, want: Want, case: &str) {
    let d = decide(policies, r);
    let got = Want {
        allowed: d.allowed,
        reason: d.reason,
        policy: want.policy,
        rule: d.rule,
    };
    assert_eq!(got, want, "{case}: {r:?}: {d:?}");
    assert_eq!(d.policy.as_deref(), want.policy, "{case}: {r:?}");
}

#[test]
fn target_refs_accepted() {
    let svc = |n: &str| TargetRef::Service(n.into());
    let gw = |n: &str| TargetRef::Gateway(n.into());
    let cases = [
        (
            "{targetRefs: [{kind: Service, name: api}]}",
            vec![svc("api")],
        ),
        (
            "{targetRefs: [{kind: Service, group: '', name: api, namespace: shop}, \
              {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]}",
            vec![svc("api"), gw("waypoint")],
        ),
        (
            "{targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}",
            vec![gw("waypoint")],
        ),
        (
            "{targetRef: {kind: Service, name: web}, targetRefs: null}",
            vec![svc("web")],
        ),
    ];
    for (spec, want) in cases {
        let p = policy("shop/x", spec);
        assert_eq!(p.targets, want, "{spec}");
        assert!(p.selector.is_empty(), "{spec}");
        assert!(p.warnings.is_empty(), "{spec}: {:?}", p.warnings);
    }
}

/// `(spec, the whole error)`: each spec is refused.
#[rustfmt::skip]
const TARGET_ERRORS: &[(&str, &str)] = &[
    ("{targetRefs: [{kind: Service, name: api}, {kind: ServiceEntry, name: x}]}",
        "policy shop/x: spec.targetRefs[1].kind: \"ServiceEntry\" is not supported: Service (the \
         requests to that Service) or Gateway (the requests through the namespace's waypoint)"),
    ("{targetRefs: [{kind: Gateway, name: waypoint}]}",
        "policy shop/x: spec.targetRefs[0].group: is missing: a Gateway's group is \
         gateway.networking.k8s.io"),
    ("{targetRefs: [{kind: Gateway, group: networking.istio.io, name: waypoint}]}",
        "policy shop/x: spec.targetRefs[0].group: \"networking.istio.io\": a Gateway's group is \
         gateway.networking.k8s.io"),
    ("{targetRefs: [{kind: Service, group: apps, name: api}]}",
        "policy shop/x: spec.targetRefs[0].group: \"apps\": a Service's group is \"\" (the core \
         group); leave it out"),
    ("{targetRefs: [{kind: Service, name: api, namespace: other}]}",
        "policy shop/x: spec.targetRefs[0].namespace: \"other\" is not the policy's namespace \
         \"shop\": a policy applies to the Services and the waypoint of its own namespace"),
    ("{targetRefs: [{kind: Service}]}", "policy shop/x: spec.targetRefs[0].name: is missing"),
    ("{targetRefs: [{name: api}]}", "policy shop/x: spec.targetRefs[0].kind: is missing: Service or Gateway"),
    ("{targetRefs: [{kind: Service, name: Api}]}",
        "policy shop/x: spec.targetRefs[0].name: \"Api\" is not a Kubernetes object name \
         (lowercase letters, digits, '-', '.')"),
    ("{targetRefs: [{kind: Service, name: api, sectionName: http}]}",
        "policy shop/x: spec.targetRefs[0].sectionName: unknown field: a reference has kind, \
         group, name and namespace"),
    ("{targetRefs: []}",
        "policy shop/x: spec.targetRefs: is empty: name the Services or the waypoint (Gateway) \
         the policy applies to, or leave it out and use selector"),
    ("{targetRefs: {kind: Service, name: api}}",
        "policy shop/x: spec.targetRefs: expected a list of references ({kind: Service, name: \
         ...} or {kind: Gateway, group: gateway.networking.k8s.io, name: ...})"),
    ("{targetRef: {kind: Service, name: api}, targetRefs: [{kind: Service, name: api}]}",
        "policy shop/x: spec.targetRef: set targetRefs or targetRef, not both"),
    ("{selector: {matchLabels: {app: api}}, targetRefs: [{kind: Service, name: api}]}",
        "policy shop/x: spec.selector: a policy has a selector (enforced by the node proxies) or \
         targetRefs (enforced by the waypoint), not both"),
    ("{selector: {}, targetRef: {kind: Service, name: api}}",
        "policy shop/x: spec.selector: a policy has a selector (enforced by the node proxies) or \
         targetRefs (enforced by the waypoint), not both"),
];

#[test]
fn target_ref_errors() {
    for &(spec, want) in TARGET_ERRORS {
        assert_eq!(invalid("shop/x", spec).to_string(), want, "{spec}");
    }
}

/// `(operation or condition, the field, the message)`: in a policy bound to Service `api`,
/// each is refused.
#[rustfmt::skip]
const L7_ERRORS: &[(&str, &str, &str)] = &[
    ("to: [{operation: {paths: ['/a//b']}}]", "spec.rules[0].to[0].operation.paths[0]",
        "\"/a//b\" is not in the form requests are matched in (it would be \"/a/b\")"),
    ("to: [{operation: {paths: ['/ok', '/%61dmin']}}]", "spec.rules[0].to[0].operation.paths[1]",
        "\"/%61dmin\" is not in the form requests are matched in (it would be \"/admin\")"),
    ("to: [{operation: {notPaths: ['/x/../admin']}}]", "spec.rules[0].to[0].operation.notPaths[0]",
        "\"/x/../admin\" is not in the form requests are matched in (it would be \"/admin\")"),
    ("to: [{operation: {paths: ['/api//*']}}]", "spec.rules[0].to[0].operation.paths[0]",
        "\"/api//*\" is not in the form requests are matched in (it would be \"/api/*\")"),
    ("to: [{operation: {paths: ['*//x.js']}}]", "spec.rules[0].to[0].operation.paths[0]",
        "\"*//x.js\" is not in the form requests are matched in (it would be \"*/x.js\")"),
    ("to: [{operation: {paths: ['/api/{*}']}}]", "spec.rules[0].to[0].operation.paths[0]",
        "\"/api/{*}\": path templates ({*}, {**}) are not supported: use a prefix (/api/*), a \
         suffix (*.js) or an exact path"),
    ("to: [{operation: {paths: ['/a/{**}/b']}}]", "spec.rules[0].to[0].operation.paths[0]",
        "path templates ({*}, {**}) are not supported"),
    ("to: [{operation: {paths: ['/a*b']}}]", "spec.rules[0].to[0].operation.paths[0]",
        "\"/a*b\": a `*` may only stand alone, at the start or at the end"),
    ("to: [{operation: {paths: ['api/*']}}]", "spec.rules[0].to[0].operation.paths[0]",
        "\"api/*\": the request target is not a path (origin form, starting with '/')"),
    ("to: [{operation: {paths: ['/a?b=1']}}]", "spec.rules[0].to[0].operation.paths[0]",
        "\"/a?b=1\" has a query ('?'): paths are matched without the query"),
    ("to: [{operation: {hosts: ['a.example:8080']}}]", "spec.rules[0].to[0].operation.hosts[0]",
        "\"a.example:8080\" is not in the form requests are matched in (it would be \
         \"a.example\"): requests are matched on their host without its port"),
    ("to: [{operation: {notHosts: ['*.example.com:80']}}]", "spec.rules[0].to[0].operation.notHosts[0]",
        "(it would be \"*.example.com\")"),
    ("to: [{operation: {hosts: ['a b']}}]", "spec.rules[0].to[0].operation.hosts[0]",
        "\"a b\" is not a host name or address"),
    ("to: [{operation: {methods: [get]}}]", "spec.rules[0].to[0].operation.methods[0]",
        "\"get\" is not \"GET\": methods are case-sensitive, and matched exactly"),
    ("to: [{operation: {notMethods: ['G*']}}]", "spec.rules[0].to[0].operation.notMethods[0]",
        "\"G*\": methods are matched exactly, without wildcards"),
    ("when: [{key: 'request.headers[]', values: [x]}]", "spec.rules[0].when[0].key",
        "condition key \"request.headers[]\" names no header"),
    ("when: [{key: 'request.headers[:path]', values: [x]}]", "spec.rules[0].when[0].key",
        "pseudo-headers are not headers here"),
    ("when: [{key: 'request.headers[x-a', values: [x]}]", "spec.rules[0].when[0].key",
        "is not request.headers[<name>]"),
    ("when: [{key: 'request.headers[x-a]', notValues: ['a', '*b*']}]", "spec.rules[0].when[0].notValues[1]",
        "\"*b*\": a `*` may only stand alone"),
];

#[test]
fn l7_errors() {
    for &(rule, field, message) in L7_ERRORS {
        let spec = format!("{{{API}, rules: [{{{rule}}}]}}");
        let shown = invalid("shop/x", &spec).to_string();
        let want = format!("policy shop/x: {field}: ");
        assert!(
            shown.starts_with(&want),
            "{rule}: {shown:?} does not name {field}"
        );
        assert!(
            shown.contains(message),
            "{rule}: {shown:?} lacks {message:?}"
        );
        // With a selector (enforced at L4 only) the same values are only noted, as before.
        let spec = format!("{{selector: {{matchLabels: {{app: api}}}}, rules: [{{{rule}}}]}}");
        let p = try_policy("shop/x", &spec).unwrap_or_else(|e| panic!("{rule}: {e}"));
        assert_eq!(p.warnings.len(), 1, "{rule}");
    }
}

#[test]
fn targeted_policies_select_no_workload() {
    let labels = BTreeMap::from([("app".to_owned(), "api".to_owned())]);
    for spec in [
        "{targetRefs: [{kind: Service, name: api}], rules: [{to: [{operation: {methods: [GET]}}]}]}",
        "{action: DENY, targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: wp}}",
    ] {
        for key in ["shop/x", "mesh-system/x"] {
            let p = policy(key, spec);
            assert!(!selects(&p, ROOT, "shop", &labels), "{key}: {spec}");
            assert!(!selects(&p, ROOT, "mesh-system", &labels), "{key}: {spec}");
            // L7 attributes, and no L4 warning about them.
            assert!(p.warnings.is_empty(), "{spec}: {:?}", p.warnings);
        }
    }
    // Attributes no proxy evaluates (JWT) are warned about, with their meaning at the waypoint.
    let p = policy(
        "shop/x",
        "{targetRefs: [{kind: Service, name: api}], rules: [{from: [{source: {requestPrincipals: ['*']}}],
          when: [{key: 'request.auth.claims[iss]', values: [x]}, {key: 'request.headers[x-a]', values: [y]}]}]}",
    );
    assert_eq!(
        p.warnings,
        [
            "rules[0] needs attributes this mesh does not evaluate (requestPrincipals, \
          request.auth.claims[iss]): at the waypoint this ALLOW rule matches no request"
        ]
    );
    assert!(p.rules[0].never_l7);
}

/// A case of `requests`: what it shows, the policies bound to Service `api` (key, spec without
/// targetRefs), the request, the decision.
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    Req,
    Want,
);

#[test]
fn requests() {
    let r = |f: fn(&mut Req)| {
        let mut r = GET;
        f(&mut r);
        r
    };
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("nothing bound", &[], GET, NO_POLICY),
        ("hosts exact", &[("shop/a", "rules: [{to: [{operation: {hosts: [API.Shop.svc.cluster.local]}}]}]")],
            GET, allow("shop/a", 0)),
        ("hosts exact, other host", &[("shop/a", "rules: [{to: [{operation: {hosts: [web.shop]}}]}]")],
            GET, no_match("shop/a")),
        ("hosts suffix", &[("shop/a", "rules: [{to: [{operation: {hosts: ['*.svc.cluster.local']}}]}]")],
            GET, allow("shop/a", 0)),
        ("hosts prefix", &[("shop/a", "rules: [{to: [{operation: {hosts: ['api.*']}}]}]")],
            r(|r| r.host = "api"), no_match("shop/a")),
        ("notHosts", &[("shop/a", "rules: [{to: [{operation: {notHosts: ['api.*']}}]}]")],
            GET, no_match("shop/a")),
        ("methods", &[("shop/a", "rules: [{to: [{operation: {methods: [GET, HEAD]}}]}]")],
            r(|r| r.method = "HEAD"), allow("shop/a", 0)),
        ("methods, other", &[("shop/a", "rules: [{to: [{operation: {methods: [GET, HEAD]}}]}]")],
            r(|r| r.method = "POST"), no_match("shop/a")),
        ("methods are case-sensitive", &[("shop/a", "rules: [{to: [{operation: {methods: [GET]}}]}]")],
            r(|r| r.method = "get"), no_match("shop/a")),
        ("notMethods", &[("shop/a", "rules: [{to: [{operation: {notMethods: [DELETE]}}]}]")],
            r(|r| r.method = "DELETE"), no_match("shop/a")),
        ("paths exact", &[("shop/a", "rules: [{to: [{operation: {paths: [/x]}}]}]")],
            r(|r| r.path = "/x"), allow("shop/a", 0)),
        ("paths exact, trailing slash", &[("shop/a", "rules: [{to: [{operation: {paths: [/x]}}]}]")],
            r(|r| r.path = "/x/"), no_match("shop/a")),
        ("paths prefix", &[("shop/a", "rules: [{to: [{operation: {paths: ['/api/*']}}]}]")],
            r(|r| r.path = "/api/v1/items"), allow("shop/a", 0)),
        ("paths prefix, the directory", &[("shop/a", "rules: [{to: [{operation: {paths: ['/api/*']}}]}]")],
            r(|r| r.path = "/api/"), allow("shop/a", 0)),
        ("paths prefix, not below", &[("shop/a", "rules: [{to: [{operation: {paths: ['/api/*']}}]}]")],
            r(|r| r.path = "/apix"), no_match("shop/a")),
        ("paths suffix", &[("shop/a", "rules: [{to: [{operation: {paths: ['*.js']}}]}]")],
            r(|r| r.path = "/static/app.js"), allow("shop/a", 0)),
        ("paths suffix, other", &[("shop/a", "rules: [{to: [{operation: {paths: ['*.js']}}]}]")],
            r(|r| r.path = "/app.json"), no_match("shop/a")),
        ("paths any", &[("shop/a", "rules: [{to: [{operation: {paths: ['*']}}]}]")],
            r(|r| r.path = "/anything"), allow("shop/a", 0)),
        ("notPaths", &[("shop/a", "rules: [{to: [{operation: {paths: ['*'], notPaths: [/admin, '/admin/*']}}]}]")],
            r(|r| r.path = "/admin/users"), no_match("shop/a")),
        ("notPaths, elsewhere", &[("shop/a", "rules: [{to: [{operation: {paths: ['*'], notPaths: [/admin, '/admin/*']}}]}]")],
            r(|r| r.path = "/administrator"), allow("shop/a", 0)),
        ("operations: any one", &[("shop/a", "rules: [{to: [{operation: {methods: [POST]}}, {operation: {paths: [/]}}]}]")],
            GET, allow("shop/a", 0)),
        ("ports (the destination's)", &[("shop/a", "rules: [{to: [{operation: {ports: ['8080'], methods: [GET]}}]}]")],
            r(|r| r.port = 9090), no_match("shop/a")),
        ("principals, from the client's identity", &[("shop/a", "rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}], to: [{operation: {methods: [GET]}}]}]")],
            GET, allow("shop/a", 0)),
        ("principals, plaintext", &[("shop/a", "rules: [{from: [{source: {principals: ['*']}}]}]")],
            r(|r| r.identity = None), no_match("shop/a")),
        ("namespaces, another", &[("shop/a", "rules: [{from: [{source: {namespaces: [other]}}]}]")],
            GET, no_match("shop/a")),
        ("header exact", &[("shop/a", "rules: [{when: [{key: 'request.headers[X-User]', values: [alice, 'bob*']}]}]")],
            r(|r| r.headers = &[("x-user", "alice")]), allow("shop/a", 0)),
        ("header prefix", &[("shop/a", "rules: [{when: [{key: 'request.headers[X-User]', values: [alice, 'bob*']}]}]")],
            r(|r| r.headers = &[("x-user", "bobby")]), allow("shop/a", 0)),
        ("header values are case-sensitive", &[("shop/a", "rules: [{when: [{key: 'request.headers[x-user]', values: [alice]}]}]")],
            r(|r| r.headers = &[("x-user", "Alice")]), no_match("shop/a")),
        ("header suffix", &[("shop/a", "rules: [{when: [{key: 'request.headers[x-user]', values: ['*@shop']}]}]")],
            r(|r| r.headers = &[("x-user", "a@shop")]), allow("shop/a", 0)),
        ("header absent: values never match", &[("shop/a", "rules: [{when: [{key: 'request.headers[x-user]', values: ['*']}]}]")],
            GET, no_match("shop/a")),
        ("header '*': present, even empty", &[("shop/a", "rules: [{when: [{key: 'request.headers[x-user]', values: ['*']}]}]")],
            r(|r| r.headers = &[("x-user", "")]), allow("shop/a", 0)),
        ("header sent twice: joined with ','", &[("shop/a", "rules: [{when: [{key: 'request.headers[x-user]', values: ['a,b']}]}]")],
            r(|r| r.headers = &[("x-user", "a"), ("x-user", "b")]), allow("shop/a", 0)),
        ("header notValues: absent", &[("shop/a", "rules: [{when: [{key: 'request.headers[x-user]', notValues: [evil]}]}]")],
            GET, allow("shop/a", 0)),
        ("header notValues: the value", &[("shop/a", "rules: [{when: [{key: 'request.headers[x-user]', notValues: [evil]}]}]")],
            r(|r| r.headers = &[("x-user", "evil")]), no_match("shop/a")),
        ("DENY first", &[("shop/a", "rules: [{}]"), ("shop/d", "action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}, {to: [{operation: {methods: [DELETE]}}]}]")],
            r(|r| r.method = "DELETE"), deny("shop/d", 1)),
        ("DENY that does not match", &[("shop/a", "rules: [{}]"), ("shop/d", "action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]")],
            GET, allow("shop/a", 0)),
        ("JWT in an ALLOW: never", &[("shop/a", "rules: [{from: [{source: {requestPrincipals: ['*']}}]}]")],
            GET, no_match("shop/a")),
        ("JWT in a DENY: fail closed", &[("shop/d", "action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}], to: [{operation: {paths: ['/admin/*']}}]}]")],
            r(|r| r.path = "/admin/x"), deny("shop/d", 0)),
        ("JWT in a DENY: its other attributes", &[("shop/d", "action: DENY, rules: [{when: [{key: request.auth.principal, values: [x]}], to: [{operation: {paths: ['/admin/*']}}]}]")],
            r(|r| r.path = "/public"), NO_POLICY),
    ];
    for &(what, specs, req, want) in cases {
        let policies: Vec<Arc<Policy>> = specs.iter().map(|(key, rest)| bound(key, rest)).collect();
        check(&policies, req, want, what);
    }
}

#[test]
fn audit_is_noted() {
    let policies = [
        bound(
            "shop/au",
            "action: AUDIT, rules: [{to: [{operation: {methods: [POST]}}]}]",
        ),
        bound(
            "shop/d",
            "action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]",
        ),
    ];
    let d = decide(
        &policies,
        Req {
            method: "POST",
            path: "/admin",
            ..GET
        },
    );
    assert_eq!(
        (d.allowed, d.policy_str(), d.audited_str()),
        (false, "shop/d", "shop/au#0".into())
    );
    let d = decide(&policies, GET);
    assert_eq!((d.allowed, d.audited_str()), (true, String::new()));
}

/// A DENY on /admin holds for every spelling of it: the waypoint decides on the normalised
/// path, and the policy's paths are in that form.
#[test]
fn deny_admin_whatever_the_spelling() {
    let policies = [bound(
        "shop/no-admin",
        "action: DENY, rules: [{to: [{operation: {paths: [/admin, '/admin/*']}}]}]",
    )];
    for raw in [
        "/admin",
        "//admin",
        "/%61dmin",
        "/%61%64%6D%69%6E",
        "/./admin",
        "/x/../admin",
        "/%2e%2e/admin",
        "/%2Fadmin",
        "/%5Cadmin",
        "/admin/",
        "/admin//users",
        "/admin/./users",
        "/x%2F..%2Fadmin/users",
    ] {
        let d = decide(&policies, Req { path: raw, ..GET });
        assert_eq!(
            (d.allowed, d.policy_str(), d.rule),
            (false, "shop/no-admin", Some(0)),
            "{raw}"
        );
    }
    for raw in ["/Admin", "/administrator", "/x/admin", "/"] {
        assert!(decide(&policies, Req { path: raw, ..GET }).allowed, "{raw}");
    }
}

fn workload(name: &str, app: &str, ip: [u8; 4]) -> Workload {
    Workload {
        namespace: "shop".into(),
        name: name.into(),
        service_account: "default".into(),
        node: "n1".into(),
        ips: vec![ip.into()],
        netns: format!("/run/netns/{name}").into(),
        cgroup: format!("/cg/{name}").into(),
        uid: None,
        labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
        capture: Default::default(),
    }
}

#[test]
fn service_policies() {
    let gateway = |name: &str| {
        format!(
            "{{targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: {name}}}]}}"
        )
    };
    let policies = [
        (
            "shop/to-api",
            "{targetRefs: [{kind: Service, name: api}], action: DENY}".to_owned(),
        ),
        (
            "shop/to-api-web",
            "{targetRef: {kind: Service, name: web}}".to_owned(),
        ),
        ("shop/via-waypoint", gateway("waypoint")),
        ("shop/via-other", gateway("other")),
        (
            "shop/selector",
            "{selector: {matchLabels: {app: api}}}".to_owned(),
        ),
        (
            "other/to-api",
            "{targetRefs: [{kind: Service, name: api}]}".to_owned(),
        ),
        ("mesh-system/via-waypoint", gateway("waypoint")),
    ];
    let namespace = |name: &str, waypoint: Option<&str>| Namespace {
        name: name.into(),
        enabled: true,
        waypoint: waypoint.map(str::to_owned),
    };
    let (snap, _) = Snapshot::with_root_namespace(ROOT)
        .apply(Changes {
            namespaces: vec![
                namespace("shop", Some("waypoint")),
                namespace("other", None),
                namespace(ROOT, Some("waypoint")),
            ],
            workloads: vec![
                workload("api-0", "api", [10, 0, 1, 10]),
                workload("web-0", "web", [10, 0, 1, 11]),
            ],
            policies: policies
                .iter()
                .map(|(key, spec)| policy(key, spec))
                .collect(),
            ..Changes::default()
        })
        .expect("valid");
    let keys = |s: &Selected| {
        let mut all: Vec<String> = [&s.deny, &s.allow, &s.audit]
            .into_iter()
            .flatten()
            .map(|p| p.key.to_string())
            .collect();
        all.sort();
        all
    };
    assert_eq!(
        keys(&snap.service_policies("shop", "api")),
        ["shop/to-api", "shop/via-waypoint"]
    );
    assert_eq!(
        keys(&snap.service_policies("shop", "web")),
        ["shop/to-api-web", "shop/via-waypoint"]
    );
    assert_eq!(
        keys(&snap.service_policies("shop", "db")),
        ["shop/via-waypoint"]
    );
    // Without a waypoint, a Gateway reference names nothing; a root namespace policy bound to
    // its own waypoint stays there.
    assert_eq!(
        keys(&snap.service_policies("other", "api")),
        ["other/to-api"]
    );
    assert_eq!(
        keys(&snap.service_policies(ROOT, "x")),
        ["mesh-system/via-waypoint"]
    );
    assert!(snap.service_policies("nowhere", "api").is_empty());
    let api = snap.service_policies("shop", "api");
    assert_eq!(api.deny.len(), 1);

    // At L4 the bound policies select no workload: only the selector's.
    let l4 = snap.authorization("shop/api-0").expect("selected");
    assert_eq!(keys(l4), ["shop/selector"]);
    assert!(snap.authorization("shop/web-0").is_none());

    // A bound policy changed or removed leaves the L4 selections alone.
    let (next, applied) = snap
        .apply(Changes {
            policies: vec![policy(
                "shop/via-waypoint",
                "{targetRefs: [{kind: Service, name: db}]}",
            )],
            removed_policies: vec!["shop/to-api".into()],
            ..Changes::default()
        })
        .expect("valid");
    assert_eq!((applied.policies, applied.authz), (2, 0));
    assert_eq!(
        keys(&next.service_policies("shop", "api")),
        Vec::<String>::new()
    );
    assert_eq!(
        keys(&next.service_policies("shop", "db")),
        ["shop/via-waypoint"]
    );
}

/// An invalid bound policy fails closed where it applies, at the waypoint, for the services it
/// names (all of the waypoint's when they cannot be read), never across the namespace at L4.
#[test]
fn an_invalid_bound_policy_fails_closed_at_the_waypoint_only() {
    let bad_deny = invalid(
        "shop/bad-deny",
        "{targetRefs: [{kind: Service, name: api}], action: DENY, rules: [{to: [{operation: {paths: ['/a//b']}}]}]}",
    );
    assert_eq!(
        bad_deny.targets,
        Some(vec![TargetRef::Service("api".into())])
    );
    let deny = bad_deny.fail_closed().expect("a DENY stand-in");
    let bad_allow = invalid(
        "shop/bad-allow",
        "{targetRefs: [{kind: Service, name: web}], rules: [{to: [{operation: {methods: [get]}}]}]}",
    );
    let allow = bad_allow.allow_nothing().expect("an ALLOW stand-in");
    let unreadable = invalid(
        "shop/unreadable",
        "{targetRefs: [{kind: Deployment, name: x}], action: DENY}",
    );
    assert_eq!(unreadable.targets, Some(vec![TargetRef::Unreadable]));
    let everything = unreadable.fail_closed().expect("a DENY stand-in");
    let (snap, _) = Snapshot::with_root_namespace(ROOT)
        .apply(Changes {
            namespaces: vec![Namespace {
                name: "shop".into(),
                enabled: true,
                waypoint: Some("waypoint".into()),
            }],
            workloads: vec![
                workload("api-0", "api", [10, 0, 1, 10]),
                workload("web-0", "web", [10, 0, 1, 11]),
            ],
            policies: vec![deny, allow, everything],
            ..Changes::default()
        })
        .expect("valid");
    // At L4 no workload is touched.
    assert!(snap.authorization("shop/api-0").is_none());
    assert!(snap.authorization("shop/web-0").is_none());
    // At the waypoint: api denied by both DENY stand-ins, web by the unreadable one and by
    // its ALLOW that allows nothing.
    let api = snap.service_policies("shop", "api");
    assert_eq!(api.deny.len(), 2);
    let web = snap.service_policies("shop", "web");
    assert_eq!((web.deny.len(), web.allow.len()), (1, 1));
    let request = |selected: &Selected| {
        let headers = HeaderMap::new();
        decide_request(
            selected,
            &Request {
                identity: None,
                src: ip("10.0.1.2"),
                dst: ip("10.0.1.10"),
                port: 80,
                host: "api.shop",
                method: "GET",
                path: "/",
                headers: &headers,
            },
        )
        .allowed
    };
    assert!(!request(&api));
    assert!(!request(&web));
    // Without the unreadable one, web's requests fail on the ALLOW stand-in alone.
    let only_allow = Selected::new([&Arc::new(bad_allow.allow_nothing().expect("stand-in"))]);
    assert!(!request(&only_allow));
}
