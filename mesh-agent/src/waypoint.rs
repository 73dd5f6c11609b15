//! The waypoint: the per-namespace L7 proxy (`mesh-agent waypoint`, issue 14, in progress).
//! What has landed so far are its pure parts, each with its own tests, which the waypoint's
//! runtime builds on: `normalize` (the one form of a request's path and host that routing and
//! L7 authorization both see) and `sniff` (which protocol a connection speaks, from its first
//! bytes). The node side is in place (`proxy::route` sends a waypoint namespace's service
//! traffic to its waypoint; `workload_api` gives the waypoint its identity).

pub mod balance;
pub mod breaker;
pub mod budget;
pub mod httproute;
pub mod io;
pub mod normalize;
pub mod replay;
pub mod routes;
pub mod sniff;
