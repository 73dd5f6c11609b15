//! The TLS record reader after the handshake: records sealed with a known key, alerts,
//! post-handshake messages, raw bytes and corruptions.
//! Input layout and invariants: `mesh_agent::fuzzing::record_reader`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::record_reader(data));
