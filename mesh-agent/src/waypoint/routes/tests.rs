use http::{HeaderMap, HeaderValue, Method};

use super::*;

fn prefix(p: &str) -> PathMatch {
    PathMatch::Prefix(p.trim_end_matches('/').to_owned())
}

fn exact(p: &str) -> PathMatch {
    PathMatch::Exact(p.to_owned())
}

fn on(path: PathMatch) -> Match {
    Match {
        path,
        ..Match::default()
    }
}

fn route(name: &str, created: Option<u64>, rules: Vec<Vec<Match>>) -> Arc<Route> {
    Arc::new(Route {
        namespace: "shop".into(),
        name: name.into(),
        created,
        rules: rules.into_iter().map(|matches| Rule { matches }).collect(),
    })
}

/// Which route, rule and match `method path?query` with `headers` takes.
fn pick(
    routes: &[Arc<Route>],
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Option<String> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    select(
        routes,
        &Request {
            method: &method,
            path,
            query,
            headers: &map,
        },
    )
    .map(|s| format!("{}#{}.{}", s.route.name, s.rule, s.matched))
}

/// (method, target, headers, expected)
type Case<'a, T> = (&'a str, &'a str, &'a [(&'a str, &'a str)], T);

#[test]
fn path_matches() {
    let routes = [route(
        "r",
        Some(1),
        vec![
            vec![on(exact("/exact"))],
            vec![on(prefix("/foo"))],
            vec![on(PathMatch::Regex(regex("/items/[0-9]+").expect("regex")))],
        ],
    )];
    #[rustfmt::skip]
    let cases = [
        ("/exact", Some("r#0.0")),
        ("/exact/", None),
        ("/exactly", None),
        ("/foo", Some("r#1.0")),
        ("/foo/", Some("r#1.0")),
        ("/foo/bar", Some("r#1.0")),
        ("/foobar", None),
        ("/items/42", Some("r#2.0")),
        ("/items/42/x", None),
        ("/x/items/42", None),
        ("/", None),
    ];
    for (path, want) in cases {
        assert_eq!(pick(&routes, "GET", path, &[]).as_deref(), want, "{path}");
    }
    // A rule without matches takes everything; a prefix of "/" too.
    let all = [route("all", None, vec![vec![]])];
    assert_eq!(
        pick(&all, "GET", "/anything", &[]).as_deref(),
        Some("all#0.0")
    );
    let root = [route("root", None, vec![vec![on(prefix("/"))]])];
    assert_eq!(pick(&root, "GET", "/", &[]).as_deref(), Some("root#0.0"));
}

#[test]
fn headers_query_and_method_must_all_hold() {
    let m = Match {
        path: prefix("/"),
        headers: vec![
            ("x-version".into(), ValueMatch::Exact("v2".into())),
            (
                "x-user".into(),
                ValueMatch::Regex(regex("adm.n").expect("regex")),
            ),
        ],
        query: vec![("debug".into(), ValueMatch::Exact("on now".into()))],
        method: Some(Method::POST),
    };
    let routes = [route("r", None, vec![vec![m]])];
    let ok = [("X-Version", "v2"), ("x-user", "admin")];
    #[rustfmt::skip]
    let cases: [Case<bool>; 8] = [
        ("POST", "/?debug=on+now", &ok, true),
        ("POST", "/?debug=on%20now&debug=off", &ok, true),
        ("POST", "/?debug=off&debug=on+now", &ok, false),
        ("GET", "/?debug=on+now", &ok, false),
        ("POST", "/", &ok, false),
        ("POST", "/?debug=on+now", &[("x-version", "v2")], false),
        ("POST", "/?debug=on+now", &[("x-version", "v1"), ("x-user", "admin")], false),
        ("POST", "/?debug=on+now", &[("x-version", "v2"), ("x-user", "xadmin")], false),
    ];
    for (method, target, headers, want) in cases {
        assert_eq!(
            pick(&routes, method, target, headers).is_some(),
            want,
            "{method} {target} {headers:?}"
        );
    }
}

#[test]
fn precedence_follows_the_specification() {
    let method = |path, method| Match {
        path,
        method: Some(method),
        ..Match::default()
    };
    let headers = |n: usize| Match {
        path: prefix("/api"),
        headers: (0..n)
            .map(|i| (format!("h{i}"), ValueMatch::Exact("1".into())))
            .collect(),
        ..Match::default()
    };
    let query = |n: usize| Match {
        path: prefix("/api"),
        query: (0..n)
            .map(|i| (format!("q{i}"), ValueMatch::Exact("1".into())))
            .collect(),
        ..Match::default()
    };
    let regex_all = on(PathMatch::Regex(regex("/.*").expect("regex")));
    // Listed worst first: each must lose to the ones after it.
    let routes = [
        route("z-regex", Some(1), vec![vec![regex_all]]),
        route("y-short", Some(1), vec![vec![on(prefix("/"))]]),
        route("x-long", Some(1), vec![vec![on(prefix("/api"))]]),
        route(
            "w-method",
            Some(1),
            vec![vec![method(prefix("/api"), Method::GET)]],
        ),
        route(
            "v-headers",
            Some(1),
            vec![vec![headers(1)], vec![headers(2)]],
        ),
        route("u-query", Some(1), vec![vec![query(1)]]),
        route("t-exact", Some(1), vec![vec![on(exact("/api/items"))]]),
    ];
    let all = [("h0", "1"), ("h1", "1")];
    #[rustfmt::skip]
    let cases: [Case<&str>; 8] = [
        // Exact beats every prefix, whatever else the prefixes match.
        ("GET", "/api/items?q0=1", &all, "t-exact#0.0"),
        // Then: more headers (2 beats 1) ...
        ("POST", "/api/x?q0=1", &all, "v-headers#1.0"),
        // ... a method beats headers ...
        ("GET", "/api/x?q0=1", &all, "w-method#0.0"),
        // ... query parameters count after headers ...
        ("POST", "/api/x?q0=1", &[], "u-query#0.0"),
        // ... the longer prefix beats the shorter, any prefix beats a regex.
        ("POST", "/api/x", &[], "x-long#0.0"),
        ("POST", "/other", &[], "y-short#0.0"),
        ("POST", "/api", &[("h0", "1")], "v-headers#0.0"),
        ("POST", "/apix", &[], "y-short#0.0"),
    ];
    for (m, target, h, want) in cases {
        assert_eq!(
            pick(&routes, m, target, h).as_deref(),
            Some(want),
            "{m} {target} {h:?}"
        );
    }
}

#[test]
fn ties_go_to_the_oldest_route_then_by_name_then_to_the_first_rule() {
    let same = || vec![vec![on(prefix("/"))], vec![on(prefix("/"))]];
    let routes = [
        route("b", Some(20), same()),
        route("a", Some(20), same()),
        route("c", Some(10), same()),
        route("file", None, same()),
    ];
    assert_eq!(pick(&routes, "GET", "/", &[]).as_deref(), Some("c#0.0"));
    assert_eq!(
        pick(&routes[..2], "GET", "/", &[]).as_deref(),
        Some("a#0.0")
    );
    assert_eq!(
        pick(&routes[3..], "GET", "/", &[]).as_deref(),
        Some("file#0.0")
    );
    // The first match of the first rule.
    let two = [route(
        "r",
        None,
        vec![vec![on(prefix("/x")), on(prefix("/x"))]],
    )];
    assert_eq!(pick(&two, "GET", "/x", &[]).as_deref(), Some("r#0.0"));
}

#[test]
fn regular_expressions_are_anchored_and_bounded() {
    let r = regex("a+").expect("regex");
    assert!(r.is_match("aaa"));
    assert!(!r.is_match("baaa"), "anchored at the start");
    assert!(!r.is_match("aaab"), "anchored at the end");
    assert!(
        regex("a|b").expect("regex").is_match("b"),
        "alternation inside the anchors"
    );
    let err = regex("(").expect_err("invalid");
    assert!(
        err.contains("\"(\" is not a valid regular expression"),
        "{err}"
    );
    let huge = format!("(?:{}){{1000}}", "[a-z]{100}");
    assert!(regex(&huge).is_err(), "over the size limit");
}
