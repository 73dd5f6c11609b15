//! The fuzz targets' inputs as unit tests: every seed of `fuzz/corpus/<target>/` goes through
//! its entry point (so the harnesses cannot rot unnoticed), and every input a fuzzer found a
//! failure with stays here as a regression test.

use std::path::PathBuf;

use super::{connect_request, kube_objects, policy, record_reader, request_target, state_file};

/// Runs every seed of `target`'s corpus through `entry`.
fn replay(target: &str, entry: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list the seeds in {}: {e}", dir.display()));
    let mut seeds = 0;
    for file in entries {
        let path = file.expect("corpus entry").path();
        let input =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        entry(&input);
        seeds += 1;
    }
    assert!(seeds > 0, "no seeds in {}", dir.display());
}

#[test]
fn record_reader_seeds() {
    replay("record_reader", record_reader);
}

#[test]
fn connect_request_seeds() {
    replay("connect_request", connect_request);
}

#[test]
fn state_file_seeds() {
    replay("state_file", state_file);
}

#[test]
fn policy_seeds() {
    replay("policy", policy);
}

#[test]
fn kube_objects_seeds() {
    replay("kube_objects", kube_objects);
}

#[test]
fn request_target_seeds() {
    replay("request_target", request_target);
}
