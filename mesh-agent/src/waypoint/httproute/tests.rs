use serde_json::json;

use super::*;

/// A route as `kubectl get httproute -o json` prints its spec: header routing to v2, a 90/10
/// split, filters, timeouts.
fn good() -> serde_json::Value {
    json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
        "hostnames": ["Reviews.Shop.svc.cluster.local."],
        "rules": [
            {
                "matches": [{"headers": [{"name": "X-Version", "value": "v2"}]}],
                "backendRefs": [{"name": "reviews-v2", "port": 9080}]
            },
            {
                "matches": [
                    {"path": {"type": "PathPrefix", "value": "/api/"}, "method": "GET"},
                    {"path": {"type": "RegularExpression", "value": "/items/[0-9]+"},
                     "queryParams": [{"type": "RegularExpression", "name": "page", "value": "[0-9]+"}]}
                ],
                "filters": [
                    {"type": "RequestHeaderModifier",
                     "requestHeaderModifier": {"set": [{"name": "X-Route", "value": "api"}], "remove": ["X-Debug"]}},
                    {"type": "RequestMirror",
                     "requestMirror": {"backendRef": {"name": "reviews-shadow", "port": 9080}}}
                ],
                "backendRefs": [
                    {"name": "reviews-v1", "port": 9080, "weight": 90},
                    {"name": "reviews-v2", "port": 9080, "weight": 10}
                ],
                "timeouts": {"request": "10s", "backendRequest": "2s500ms"}
            },
            {
                "matches": [{"path": {"type": "Exact", "value": "/old"}}],
                "filters": [{"type": "RequestRedirect",
                             "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}, "statusCode": 301}}]
            }
        ]
    })
}

fn convert_json(spec: serde_json::Value) -> Result<HttpRoute, String> {
    let spec = parse_spec("shop/reviews", spec).map_err(|e| e.to_string())?;
    convert("shop", "reviews", Some(100), &spec).map_err(|e| e.to_string())
}

#[test]
fn a_route_converts_whole() {
    let route = convert_json(good()).expect("valid");
    assert_eq!(route.parents, vec![("reviews".to_owned(), Some(9080))]);
    assert_eq!(
        route.hostnames,
        vec!["reviews.shop.svc.cluster.local".to_owned()]
    );
    assert_eq!(route.rules.len(), 3);
    let split = &route.rules[1];
    assert_eq!(
        split
            .backends
            .iter()
            .map(|b| (b.service.name.as_str(), b.weight))
            .collect::<Vec<_>>(),
        vec![("reviews-v1", 90), ("reviews-v2", 10)]
    );
    assert_eq!(split.request_timeout, Some(Duration::from_secs(10)));
    assert_eq!(split.backend_timeout, Some(Duration::from_millis(2500)));
    assert_eq!(
        split.filters[0],
        Filter::RequestHeaders(HeaderChanges {
            set: vec![("x-route".into(), "api".into())],
            add: vec![],
            remove: vec!["x-debug".into()],
        })
    );
    assert_eq!(
        split.filters[1],
        Filter::Mirror(ServiceRef {
            name: "reviews-shadow".into(),
            port: 9080
        })
    );
    assert!(matches!(
        &route.rules[2].filters[0],
        Filter::Redirect { path: Some(PathChange::Full(p)), status: 301, .. } if p == "/new"
    ));
    // The matching side: header names lowercased, the prefix without its slash.
    let m = &route.matching.rules[0].matches[0];
    assert_eq!(m.headers[0].0, "x-version");
    assert!(
        matches!(&route.matching.rules[1].matches[0].path, PathMatch::Prefix(p) if p == "/api")
    );
    assert_eq!(route.matching.created, Some(100));
    // No rules: one that takes every request, with no backend.
    let empty = convert_json(json!({"parentRefs": [{"name": "reviews"}]})).expect("valid");
    assert_eq!(empty.rules.len(), 1);
    assert!(empty.rules[0].backends.is_empty());
}

#[test]
fn errors_name_the_route_and_the_field() {
    // The spec with the field at `pointer` set (added to its object if missing).
    let with = |pointer: &str, value: serde_json::Value| {
        let mut spec = good();
        let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
        match spec
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("{pointer}"))
        {
            serde_json::Value::Object(map) => {
                map.insert(key.to_owned(), value);
            }
            serde_json::Value::Array(items) => {
                items[key.parse::<usize>().expect("an index")] = value;
            }
            other => panic!("{pointer}: {other}"),
        }
        spec
    };
    #[rustfmt::skip]
    let cases = [
        (with("/rules/1/matches/0/path/value", json!("/api//x")), "spec.rules[1].matches[0].path.value: \"/api//x\" is not in the form requests are matched in (it would be \"/api/x\")"),
        (with("/rules/1/matches/0/path/value", json!("/a/../admin")), "spec.rules[1].matches[0].path.value: \"/a/../admin\" is not in the form"),
        (with("/rules/1/matches/0/path/value", json!("api")), "spec.rules[1].matches[0].path.value: the request target is not a path"),
        (with("/rules/1/matches/0/path/type", json!("Glob")), "spec.rules[1].matches[0].path.type: \"Glob\" is not Exact, PathPrefix or RegularExpression"),
        (with("/rules/1/matches/1/path/value", json!("(")), "spec.rules[1].matches[1].path.value: \"(\" is not a valid regular expression"),
        (with("/rules/1/matches/0/method", json!("BREW")), "spec.rules[1].matches[0].method: \"BREW\" is not an HTTP method"),
        (with("/rules/0/matches/0/headers/0/name", json!("bad header")), "spec.rules[0].matches[0].headers[0].name: \"bad header\" is not a header name"),
        (with("/rules/1/backendRefs/0/weight", json!(-1)), "spec.rules[1].backendRefs[0].weight: -1 is not in 0..=1000000"),
        (with("/rules/1/backendRefs/0/port", json!(null)), "spec.rules[1].backendRefs[0].port: a Service backend needs a port"),
        (with("/rules/1/backendRefs/0/namespace", json!("other")), "spec.rules[1].backendRefs[0].namespace: a Service of another namespace"),
        (with("/rules/1/backendRefs/0/kind", json!("Pod")), "spec.rules[1].backendRefs[0].kind: Pod of group \"\": only a core Service is supported"),
        (with("/rules/1/timeouts/backendRequest", json!("20s")), "spec.rules[1].timeouts.backendRequest: 20s is longer than the request timeout 10s"),
        (with("/rules/1/timeouts/request", json!("10 seconds")), "spec.rules[1].timeouts.request: \"10 seconds\" is not a duration"),
        (with("/rules/1/filters/0/type", json!("ExtensionRef")), "spec.rules[1].filters[0].type: ExtensionRef filters are not supported"),
        (with("/rules/1/filters/0/type", json!("ResponseHeaderModifier")), "spec.rules[1].filters[0].responseHeaderModifier: missing for this type"),
        (with("/rules/2/filters/0/requestRedirect/statusCode", json!(307)), "spec.rules[2].filters[0].requestRedirect.statusCode: 307 is not 301 or 302"),
        (with("/rules/2/filters/0/requestRedirect/path", json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"})), "spec.rules[2].filters[0].requestRedirect.path.type: ReplacePrefixMatch needs every match of the rule to be a PathPrefix"),
        (with("/parentRefs/0/kind", json!("Gateway")), "spec.parentRefs[0].kind: Gateway of group \"\": only a core Service is supported"),
        (with("/parentRefs", json!([])), "spec.parentRefs: no parent"),
        (with("/hostnames/0", json!("evil host")), "spec.hostnames[0]: the host is empty or not a host name"),
        // Fields the waypoint does not know are refused, never ignored.
        (with("/rules/1/sessionPersistence", json!({"sessionName": "x"})), "spec.rules[1].sessionPersistence: unknown field `sessionPersistence`"),
        (with("/rules/0/matches/0/headers/0/value", json!(1)), "spec.rules[0].matches[0].headers[0].value: invalid type"),
    ];
    for (spec, want) in cases {
        let err = convert_json(spec).expect_err(want);
        let want = format!("HTTPRoute shop/reviews: {want}");
        assert!(
            err.starts_with(&want),
            "error {err:?} should start with {want:?}"
        );
    }
    let too_many = json!({"parentRefs": [{"name": "reviews"}],
        "rules": (0..17).map(|_| json!({})).collect::<Vec<_>>()});
    let err = convert_json(too_many).expect_err("17 rules");
    assert!(err.contains("spec.rules: 17 entries, at most 16"), "{err}");
}

#[test]
fn durations_read_as_the_specification_writes_them() {
    #[rustfmt::skip]
    let cases = [
        ("10s", Ok(Some(Duration::from_secs(10)))),
        ("1h", Ok(Some(Duration::from_secs(3600)))),
        ("1m30s", Ok(Some(Duration::from_secs(90)))),
        ("500ms", Ok(Some(Duration::from_millis(500)))),
        ("1h2m3s4ms", Ok(Some(Duration::from_millis(3_723_004)))),
        ("0s", Ok(None)),
        ("", Err(())),
        ("10", Err(())),
        ("s", Err(())),
        ("123456s", Err(())),
        ("1h1h1h1h1h", Err(())),
        ("1.5s", Err(())),
        ("-1s", Err(())),
    ];
    for (text, want) in cases {
        assert_eq!(duration(text).map_err(|_| ()), want, "{text:?}");
    }
}
