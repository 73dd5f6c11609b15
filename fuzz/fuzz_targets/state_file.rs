//! The mesh state file: parsing, validation, build, and a reload to a second version.
//! Input layout and invariants: `mesh_agent::fuzzing::state_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::state_file(data));
