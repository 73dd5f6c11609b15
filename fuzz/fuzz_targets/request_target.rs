//! The waypoint's normalisation of a request's path and host.
//! Input layout and invariants: `mesh_agent::fuzzing::request_target`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::request_target(data));
