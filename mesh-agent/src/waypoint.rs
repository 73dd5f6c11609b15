//! The waypoint: the per-namespace L7 proxy (`mesh-agent waypoint`, docs/waypoint.md).
//!
//! The process (`runtime`) takes HBONE from the node proxies, tells HTTP from other traffic by
//! the first bytes (`sniff`), and hands each request to `proxy`, which runs it through the pure
//! parts, each with its own tests: `normalize` (the one form of a request's path and host that
//! routing and L7 authorization both see), `routes` and `httproute` (Gateway API HTTPRoute,
//! converted and matched; `table` holds those in force), `balance` (weights, peak-EWMA and two
//! choices), `budget` (retries), `breaker` (limits and outlier detection), then `upstream`
//! opens HBONE to the endpoint with the waypoint's own identity. `telemetry`: Istio's request
//! metrics and trace context. The node side: `proxy::route` sends a waypoint namespace's service
//! traffic to its waypoint; `workload_api` gives the waypoint its identity.

mod authz;
pub mod balance;
pub mod breaker;
pub mod budget;
pub mod config;
mod filters;
pub mod httproute;
pub mod io;
pub mod normalize;
mod observe;
pub mod proxy;
pub mod replay;
pub mod routes;
pub mod runtime;
pub mod sniff;
pub mod table;
pub mod telemetry;
mod tries;
pub mod upstream;
