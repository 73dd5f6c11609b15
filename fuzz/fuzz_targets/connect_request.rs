//! The HBONE server's judgement of a CONNECT request: method, authority, headers, and
//! whether the authority names the pod the tunnel reached.
//! Input layout and invariants: `mesh_agent::fuzzing::connect_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::connect_request(data));
