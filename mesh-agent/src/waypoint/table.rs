//! The HTTPRoutes in force, by the service they are attached to, and their source in the state
//! file (`routes`, the same objects as the API's). Each route is judged on its own: an invalid
//! one is rejected with an error naming the route and field, and its last good version (if any)
//! keeps serving; the other routes apply.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::Deserialize;

use super::{
    httproute::{self, HttpRoute, Rejected},
    routes,
};

/// The routes of one waypoint's namespace, by `namespace/service`.
#[derive(Debug, Default)]
pub struct Table {
    by_service: HashMap<String, Attached>,
}

/// The routes attached to one service: each with the port it names (`None`: every port), in
/// the order matching needs them (parallel vectors).
#[derive(Debug, Default)]
struct Attached {
    routes: Vec<(Arc<HttpRoute>, Option<u16>)>,
}

/// The routes that may take a request to one service port, for [`routes::select`], and the
/// converted route each came from.
#[derive(Debug, Default)]
pub struct Candidates {
    pub matching: Vec<Arc<routes::Route>>,
    pub routes: Vec<Arc<HttpRoute>>,
}

impl Candidates {
    /// The converted route of a selected one.
    pub fn route_of(&self, selected: &routes::Selected) -> Option<&Arc<HttpRoute>> {
        self.matching
            .iter()
            .position(|m| Arc::ptr_eq(m, &selected.route))
            .map(|i| &self.routes[i])
    }
}

impl Table {
    pub fn new(routes: impl IntoIterator<Item = Arc<HttpRoute>>) -> Self {
        let mut by_service: HashMap<String, Attached> = HashMap::new();
        for route in routes {
            for (service, port) in &route.parents {
                by_service
                    .entry(format!("{}/{service}", route.namespace))
                    .or_default()
                    .routes
                    .push((route.clone(), *port));
            }
        }
        Table { by_service }
    }

    /// Whether any route is attached to `service` (`namespace/name`) on `port`.
    pub fn has_routes(&self, service: &str, port: u16) -> bool {
        self.by_service
            .get(service)
            .is_some_and(|a| a.routes.iter().any(|(_, p)| p.is_none_or(|p| p == port)))
    }

    /// The routes attached to `service` on `port` whose hostnames (if any) include `host`.
    pub fn candidates(&self, service: &str, port: u16, host: &str) -> Candidates {
        let mut out = Candidates::default();
        let Some(attached) = self.by_service.get(service) else {
            return out;
        };
        for (route, p) in &attached.routes {
            if p.is_some_and(|p| p != port) {
                continue;
            }
            if !route.hostnames.is_empty() && !route.hostnames.iter().any(|h| host_matches(h, host))
            {
                continue;
            }
            out.matching.push(route.matching.clone());
            out.routes.push(route.clone());
        }
        out
    }

    /// Routes in force.
    pub fn len(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        for a in self.by_service.values() {
            for (r, _) in &a.routes {
                seen.insert(Arc::as_ptr(r));
            }
        }
        seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }
}

/// A hostname of a route (`*.example.com` matches one or more labels) against the request's.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        None => pattern == host,
    }
}

/// The `routes` of a state file (the rest of the file is the node agent's to judge).
#[derive(Debug, Deserialize)]
struct RoutesOnly {
    #[serde(default)]
    routes: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
struct Object {
    metadata: Metadata,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    name: String,
    namespace: String,
}

/// The routes of `namespace` in a state file's text, each converted or rejected; an error for
/// a file whose `routes` cannot be read at all (then nothing changes).
pub fn parse_file(text: &str, namespace: &str) -> Result<Vec<Result<HttpRoute, Rejected>>, String> {
    let file: RoutesOnly =
        serde_yaml::from_str(text).map_err(|e| format!("the state file's routes: {e}"))?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, entry) in file.routes.into_iter().enumerate() {
        let object: Object = serde_yaml::from_value(entry).map_err(|e| {
            format!("routes[{i}]: {e} (an HTTPRoute needs metadata.name and metadata.namespace)")
        })?;
        let Metadata {
            name,
            namespace: ns,
        } = object.metadata;
        if ns != namespace {
            continue;
        }
        let key = format!("{ns}/{name}");
        if !seen.insert(key.clone()) {
            return Err(format!("routes[{i}] ({key}): listed twice"));
        }
        let converted = serde_json::to_value(&object.spec)
            .map_err(|e| Rejected {
                route: key.clone(),
                field: "spec".into(),
                message: e.to_string(),
            })
            .and_then(|spec| httproute::parse_spec(&key, spec))
            .and_then(|spec| httproute::convert(&ns, &name, None, &spec));
        out.push(converted.map_err(|mut e| {
            e.route.clone_from(&key);
            e
        }));
    }
    Ok(out)
}

/// The routes in force across reloads: a valid route replaces its last version, an invalid one
/// keeps it (or stays out if it never was valid), a route no longer listed is gone.
#[derive(Debug, Default)]
pub struct Settled {
    good: BTreeMap<String, Arc<HttpRoute>>,
}

/// What happened to a rejected route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub error: Rejected,
    /// Its last good version keeps serving.
    pub kept: bool,
}

impl Settled {
    /// Applies one complete list of routes; returns the rejections.
    pub fn apply(&mut self, routes: Vec<Result<HttpRoute, Rejected>>) -> Vec<Rejection> {
        let mut next = BTreeMap::new();
        let mut rejections = Vec::new();
        for r in routes {
            match r {
                Ok(route) => {
                    next.insert(
                        format!("{}/{}", route.namespace, route.name),
                        Arc::new(route),
                    );
                }
                Err(error) => {
                    let kept = match self.good.get(&error.route) {
                        Some(last) => {
                            next.insert(error.route.clone(), last.clone());
                            true
                        }
                        None => false,
                    };
                    rejections.push(Rejection { error, kept });
                }
            }
        }
        self.good = next;
        rejections
    }

    /// The table of the routes in force.
    pub fn table(&self) -> Table {
        Table::new(self.good.values().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
namespaces: [{name: shop, enabled: true}]
routes:
  - metadata: {name: reviews, namespace: shop}
    spec:
      parentRefs: [{kind: Service, group: "", name: reviews, port: 80}]
      rules:
        - matches: [{headers: [{name: x-version, value: v2}]}]
          backendRefs: [{name: reviews-v2, port: 80}]
        - backendRefs: [{name: reviews-v1, port: 80}]
  - metadata: {name: other, namespace: web}
    spec:
      parentRefs: [{kind: Service, group: "", name: app}]
"#;

    #[test]
    fn routes_of_the_namespace_by_service_and_port() {
        let parsed = parse_file(FILE, "shop").expect("readable");
        assert_eq!(parsed.len(), 1, "web's route is not shop's waypoint's");
        let mut settled = Settled::default();
        assert!(settled.apply(parsed).is_empty());
        let table = settled.table();
        assert!(table.has_routes("shop/reviews", 80));
        assert!(
            !table.has_routes("shop/reviews", 81),
            "the route names port 80"
        );
        assert!(!table.has_routes("shop/api", 80));
        let c = table.candidates("shop/reviews", 80, "reviews.shop.svc.cluster.local");
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].rules.len(), 2);
    }

    #[test]
    fn an_invalid_route_keeps_its_last_good_version_and_others_apply() {
        let mut settled = Settled::default();
        assert!(settled
            .apply(parse_file(FILE, "shop").expect("readable"))
            .is_empty());
        let broken = FILE.replace("value: v2", "value: v2}, {name: 'bad name', value: x");
        let parsed = parse_file(&broken, "shop").expect("readable");
        let rejections = settled.apply(parsed);
        assert_eq!(rejections.len(), 1);
        assert!(rejections[0].kept);
        let said = rejections[0].error.to_string();
        assert!(
            said.starts_with("HTTPRoute shop/reviews: spec.rules[0].matches[0].headers[1].name"),
            "{said}"
        );
        assert!(settled.table().has_routes("shop/reviews", 80), "kept");
        // Never valid: stays out. Gone from the file: gone.
        let mut fresh = Settled::default();
        let rejections = fresh.apply(parse_file(&broken, "shop").expect("readable"));
        assert!(!rejections[0].kept);
        assert!(fresh.table().is_empty());
        assert!(settled
            .apply(parse_file("routes: []", "shop").expect("readable"))
            .is_empty());
        assert!(settled.table().is_empty());
    }

    #[test]
    fn hostnames_restrict_a_route() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "aexample.com"));
        assert!(host_matches("api.shop", "api.shop"));
    }
}
