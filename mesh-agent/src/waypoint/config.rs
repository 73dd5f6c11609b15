//! The waypoint's configuration (`mesh-agent waypoint --config FILE`): typed, with defaults,
//! validated on load. docs/waypoint.md documents every field.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{breaker, budget};
use crate::config::{expand, DiscoverySource, KubeConfig, PolicyConfig};

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the waypoint configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid waypoint configuration {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid waypoint configuration {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The waypoint's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The namespace this waypoint serves (its own).
    pub namespace: String,
    /// The waypoint's name: the service of `namespace` whose endpoints are its pods, which the
    /// namespace names (label `mesh-agent/waypoint=<name>`, or a state file `waypoints` entry).
    pub name: String,
    /// Where the mesh state comes from: the state file (default) or the Kubernetes API.
    #[serde(default)]
    pub discovery: DiscoverySource,
    /// The mesh state file, watched for changes (with `discovery: file`); its `routes` are the
    /// HTTPRoutes.
    #[serde(default)]
    pub state_file: PathBuf,
    /// How often the state file is checked for changes, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub state_poll_interval_ms: u64,
    /// The Kubernetes source (`discovery: kube`).
    #[serde(default)]
    pub kube: KubeConfig,
    /// Authorization policy (the root namespace).
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The waypoint's identity.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// The HBONE listener (the node proxies connect here).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Prometheus metrics (scraped from outside the pod).
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// Readiness (probed by the kubelet).
    #[serde(default = "default_readiness_addr")]
    pub readiness_addr: SocketAddr,
    /// How requests are handled.
    #[serde(default)]
    pub http: HttpConfig,
}

/// Where the waypoint's certificate comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// The trust domain the certificate must be of.
    pub trust_domain: String,
    /// The node agent's workload API socket (a hostPath in Kubernetes).
    pub workload_socket: PathBuf,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.into(),
            workload_socket: PathBuf::from("/run/mesh-agent/workload/workload.sock"),
        }
    }
}

/// Request handling: protocol detection, retries, timeouts, circuit breaking.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// How long the waypoint waits for a client's first bytes to tell HTTP from other
    /// traffic; a client silent this long (a server-speaks-first protocol) is proxied at L4.
    pub sniff_timeout_ms: u64,
    /// Retries.
    pub retries: RetryConfig,
    /// Limits per backend service (exceeded: 503, response flag `UO`).
    pub limits: breaker::Limits,
    /// Outlier detection per backend service.
    pub outlier: breaker::OutlierSettings,
    /// The whole request, retries included, when the route sets no `timeouts.request`
    /// (0: none).
    pub request_timeout_ms: u64,
    /// Connecting to an endpoint (the HBONE stream and the HTTP handshake).
    pub connect_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            sniff_timeout_ms: 1000,
            retries: RetryConfig::default(),
            limits: breaker::Limits::default(),
            outlier: breaker::OutlierSettings::default(),
            request_timeout_ms: 0,
            connect_timeout_ms: 10_000,
        }
    }
}

/// Retries of a failed try: a connect failure, a reset, 502, 503, 504 and `on_status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    /// Each try, when the route sets no `timeouts.backendRequest` (0: none).
    pub per_try_timeout_ms: u64,
    /// The first backoff; each next one doubles, up to `backoff_max_ms`, with full jitter.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Statuses retried besides 502, 503 and 504.
    pub on_status: Vec<u16>,
    /// A request body larger than this is not buffered for replay: not retried.
    pub max_buffered_body: usize,
    /// The retry budget, per backend service.
    pub budget: BudgetConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout_ms: 0,
            backoff_base_ms: 25,
            backoff_max_ms: 250,
            on_status: Vec::new(),
            max_buffered_body: 64 * 1024,
            budget: BudgetConfig::default(),
        }
    }
}

/// The retry budget: retries may add `percent` of the requests plus `min_per_second`,
/// counted over `ttl_secs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    pub percent: u32,
    pub min_per_second: u32,
    pub ttl_secs: u64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        let d = budget::Settings::default();
        Self {
            percent: d.percent,
            min_per_second: d.min_per_second,
            ttl_secs: d.ttl.as_secs(),
        }
    }
}

impl BudgetConfig {
    pub fn settings(&self) -> budget::Settings {
        budget::Settings {
            percent: self.percent,
            min_per_second: self.min_per_second,
            ttl: Duration::from_secs(self.ttl_secs),
        }
    }
}

fn default_poll_ms() -> u64 {
    500
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], mesh_common::ports::HBONE))
}

fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15020))
}

fn default_readiness_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15021))
}

impl Config {
    /// Reads and validates a configuration file (`${NAME}` replaced from the environment, as
    /// the node agent's).
    pub fn load(path: &std::path::Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message| Error::Invalid {
            path: path.to_owned(),
            message,
        };
        let text = expand(&text, |name| std::env::var(name).ok()).map_err(invalid)?;
        let config: Config = serde_yaml::from_str(&text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        // Both are DNS labels (a namespace's name and a service's).
        for (field, value) in [("namespace", &self.namespace), ("name", &self.name)] {
            crate::state::validate::waypoint_name(value)
                .map_err(|e| format!("`{field}`: {}", e.message))?;
        }
        if self.discovery == DiscoverySource::File && self.state_file.as_os_str().is_empty() {
            return Err("`state_file` is required with `discovery: file`".into());
        }
        if !(10..=60_000).contains(&self.state_poll_interval_ms) {
            return Err(format!(
                "`state_poll_interval_ms` is {}: use 10 to 60000",
                self.state_poll_interval_ms
            ));
        }
        let h = &self.http;
        if !(10..=60_000).contains(&h.sniff_timeout_ms) {
            return Err(format!(
                "`http.sniff_timeout_ms` is {}: use 10 to 60000",
                h.sniff_timeout_ms
            ));
        }
        if !(100..=300_000).contains(&h.connect_timeout_ms) {
            return Err(format!(
                "`http.connect_timeout_ms` is {}: use 100 to 300000",
                h.connect_timeout_ms
            ));
        }
        let r = &h.retries;
        if r.attempts > 10 {
            return Err(format!(
                "`http.retries.attempts` is {}: use 0 to 10",
                r.attempts
            ));
        }
        if r.backoff_base_ms == 0 || r.backoff_base_ms > r.backoff_max_ms {
            return Err(format!(
                "`http.retries.backoff_base_ms` is {} and `backoff_max_ms` {}: the base must be \
                 at least 1 and at most the maximum",
                r.backoff_base_ms, r.backoff_max_ms
            ));
        }
        if let Some(s) = r.on_status.iter().find(|s| !(500..=599).contains(*s)) {
            return Err(format!(
                "`http.retries.on_status` holds {s}: only 5xx statuses are retried"
            ));
        }
        if r.max_buffered_body > 16 << 20 {
            return Err(format!(
                "`http.retries.max_buffered_body` is {}: at most 16 MiB",
                r.max_buffered_body
            ));
        }
        if !(1..=100).contains(&r.budget.percent) || !(1..=600).contains(&r.budget.ttl_secs) {
            return Err(format!(
                "`http.retries.budget`: percent {} (use 1 to 100), ttl_secs {} (use 1 to 600)",
                r.budget.percent, r.budget.ttl_secs
            ));
        }
        let l = &h.limits;
        if l.max_connections == 0 || l.max_pending == 0 || l.max_requests == 0 {
            return Err("`http.limits`: every limit must be at least 1".into());
        }
        let o = &h.outlier;
        if o.consecutive_errors == 0 || o.max_ejection_percent > 100 {
            return Err(format!(
                "`http.outlier`: consecutive_errors {} (at least 1), max_ejection_percent {} \
                 (at most 100)",
                o.consecutive_errors, o.max_ejection_percent
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let c: Config = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_and_errors() {
        let c = parse("{namespace: shop, name: waypoint, state_file: /s.yaml}").expect("valid");
        assert_eq!(c.listen.port(), 15008);
        assert_eq!(c.http.retries.attempts, 2);
        assert_eq!(c.http.retries.budget.percent, 20);
        for (text, want) in [
            ("{namespace: shop, name: waypoint}", "`state_file` is required"),
            (
                "{namespace: shop, name: waypoint, state_file: /s, http: {retries: {attempts: 11}}}",
                "`http.retries.attempts` is 11",
            ),
            (
                "{namespace: shop, name: waypoint, state_file: /s, http: {retries: {on_status: [404]}}}",
                "holds 404",
            ),
            ("{namespace: shop, name: waypoint, state_file: /s, bogus: 1}", "unknown field `bogus`"),
            ("{namespace: Shop, name: waypoint, state_file: /s}", "`namespace`"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
