//! Which HTTPRoute rule a request takes: the matching of Gateway API's HTTPRoute (standard
//! channel) with the specification's precedence, as a pure function over the routes attached
//! to a service ([`select`]). Requests are matched in their one form (`normalize`): the path
//! normalised, the host lowercased.
//!
//! A rule matches when any of its matches does (a rule without matches has one: `PathPrefix
//! /`); a match holds when its path, method, every header and every query parameter hold.
//! Among the matches that hold, across every route, the winner has (the specification's
//! order, each step breaking the previous one's ties):
//! 1. an `Exact` path match, then the `PathPrefix` with the most characters; a
//!    `RegularExpression` path ranks after both (its precedence is left to implementations);
//! 2. a method match;
//! 3. the most header matches;
//! 4. the most query parameter matches;
//! 5. the oldest route (creation time), then the first by `namespace/name`;
//! 6. within a route, the first rule, then its first match.

use std::{cmp::Reverse, sync::Arc};

use regex::Regex;

/// The most a regular expression of a route may compile to (the `regex` crate matches in
/// linear time; this bounds its memory).
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// A path match.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole segments: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`. Kept
    /// without a trailing slash (`/` is the empty prefix).
    Prefix(String),
    /// The whole path matches the expression.
    Regex(Regex),
}

/// How a header or query parameter value matches.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn holds(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// One HTTPRouteMatch.
#[derive(Debug, Clone)]
pub struct Match {
    pub path: PathMatch,
    /// Header names lowercased (they match case-insensitively).
    pub headers: Vec<(String, ValueMatch)>,
    /// Query parameter names as written (they match exactly).
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<http::Method>,
}

impl Default for Match {
    /// What a rule without matches has: every request.
    fn default() -> Self {
        Match {
            path: PathMatch::Prefix(String::new()),
            headers: Vec::new(),
            query: Vec::new(),
            method: None,
        }
    }
}

/// One HTTPRoute rule: its matches (what it does with a request is the caller's).
#[derive(Debug, Clone, Default)]
pub struct Rule {
    pub matches: Vec<Match>,
}

/// An HTTPRoute attached to a service, as matching needs it.
#[derive(Debug, Clone)]
pub struct Route {
    pub namespace: String,
    pub name: String,
    /// Creation time (seconds since the epoch); `None` (the state file) ranks after any time.
    pub created: Option<u64>,
    pub rules: Vec<Rule>,
}

impl Route {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A request as matching sees it (in its one form).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a http::Method,
    /// The normalised path.
    pub path: &'a str,
    /// The raw query (without `?`).
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

/// The chosen rule: the route, the rule's index in it, the match's index in the rule.
#[derive(Debug, Clone)]
pub struct Selected {
    pub route: Arc<Route>,
    pub rule: usize,
    pub matched: usize,
}

/// The rule `request` takes among `routes` (none: no route matches, answered 404).
pub fn select(routes: &[Arc<Route>], request: &Request<'_>) -> Option<Selected> {
    let mut best: Option<(Rank, Selected)> = None;
    for route in routes {
        for (r, rule) in route.rules.iter().enumerate() {
            let default = [Match::default()];
            let matches: &[Match] = if rule.matches.is_empty() {
                &default
            } else {
                &rule.matches
            };
            for (m, candidate) in matches.iter().enumerate() {
                if !holds(candidate, request) {
                    continue;
                }
                let rank = Rank::of(candidate, route, r, m);
                if best.as_ref().is_none_or(|(b, _)| rank < *b) {
                    best = Some((
                        rank,
                        Selected {
                            route: route.clone(),
                            rule: r,
                            matched: m,
                        },
                    ));
                }
            }
        }
    }
    best.map(|(_, s)| s)
}

/// Smaller is better: the precedence of the module documentation as a sort key.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// 0 Exact, 1 Prefix, 2 Regex.
    path_kind: u8,
    /// The prefix's length, longer first.
    prefix_len: Reverse<usize>,
    no_method: bool,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    /// Routes with a creation time first, oldest first.
    created: (bool, u64),
    key: String,
    rule: usize,
    matched: usize,
}

impl Rank {
    fn of(m: &Match, route: &Route, rule: usize, matched: usize) -> Rank {
        let (path_kind, prefix_len) = match &m.path {
            PathMatch::Exact(_) => (0, 0),
            PathMatch::Prefix(p) => (1, p.len()),
            PathMatch::Regex(_) => (2, 0),
        };
        Rank {
            path_kind,
            prefix_len: Reverse(prefix_len),
            no_method: m.method.is_none(),
            headers: Reverse(m.headers.len()),
            query: Reverse(m.query.len()),
            created: (route.created.is_none(), route.created.unwrap_or(0)),
            key: route.key(),
            rule,
            matched,
        }
    }
}

fn holds(m: &Match, req: &Request<'_>) -> bool {
    let path = match &m.path {
        PathMatch::Exact(p) => req.path == p,
        PathMatch::Prefix(p) => req
            .path
            .strip_prefix(p.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        PathMatch::Regex(r) => r.is_match(req.path),
    };
    path && m.method.as_ref().is_none_or(|method| method == req.method)
        && m.headers.iter().all(|(name, value)| {
            // Repeated headers match as their values joined by commas (RFC 9110, 5.3).
            let values: Vec<&str> = req
                .headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            !values.is_empty() && value.holds(&values.join(","))
        })
        && m.query.iter().all(|(name, value)| {
            // The first parameter of the name counts, as the specification asks.
            query_param(req.query, name).is_some_and(|v| value.holds(&v))
        })
}

/// The first value of query parameter `name` in `query`, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

/// Percent-decoding (and `+` as space, the form encoding of query strings), lossy on bad UTF-8.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or("zz"), 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A route's regular expression, anchored (the whole value must match) and bounded; the error
/// names what is wrong, for the route's conversion to report.
pub fn regex(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("{pattern:?} is not a valid regular expression: {e}"))
}

#[cfg(test)]
mod tests;
