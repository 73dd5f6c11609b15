//! The node agent of the mesh, as a library: `cli` is its command line (`src/main.rs` only
//! calls it); other targets link the library: `mesh-agent-bench` (src/bin/, the bench's
//! in-memory measurements), the fuzz targets and the integration tests. ARCHITECTURE.md says where each
//! concern lives.
#![deny(unsafe_code)]

pub mod admin;
pub mod capture;
pub mod cli;
pub mod cni;
pub mod config;
pub mod crds;
pub mod discovery;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod handover;
pub mod identity;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod pods;
pub mod policy;
pub mod preflight;
pub mod proxy;
pub mod runtime;
pub mod state;
pub mod sys;
pub mod tunnel;
pub mod waypoint;
pub mod workload_api;
