//! The Kubernetes source's conversion of API objects into the state.
//! Input layout and invariants: `mesh_agent::fuzzing::kube_objects`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::kube_objects(data));
