//! AuthorizationPolicy compilation (spec and whole object) and decisions on connections.
//! Input layout and invariants: `mesh_agent::fuzzing::policy`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::policy(data));
