//! The `state_file` target: the mesh state file as the agent loads it and reloads it
//! (`discovery::file`: parse, validate, settle invalid policies, build; then parse, settle,
//! diff and apply incrementally).
//!
//! Input: a state file; optionally, after a `0xff` byte (never part of UTF-8 text), the next
//! version of it. Bytes that are not UTF-8 are replaced as the agent replaces them.
//!
//! Checked: nothing panics; a file the parser accepts builds a snapshot (the file's checks and
//! the store's rules agree); reloading the same file changes nothing; a reload to the next
//! version is accepted exactly when a fresh build of that version (with the same settled
//! policies) is, and gives the same snapshot.

use std::path::Path;

use crate::{
    discovery::file::{build, diff, parse, Desired},
    state::{canonical::canonical, Snapshot, DEFAULT_ROOT_NAMESPACE},
};

/// Parses `text` and settles its invalid policies against `current`, as a load or a reload.
fn parse_settled(text: &str, current: &Snapshot) -> Option<Desired> {
    let mut desired = parse(Path::new("state.yaml"), text).ok()?;
    desired.settle(current);
    Some(desired)
}

/// The `state_file` target.
pub fn state_file(input: &[u8]) {
    let (first, next) = match input.iter().position(|&b| b == 0xff) {
        Some(at) => (&input[..at], Some(&input[at + 1..])),
        None => (input, None),
    };
    let path = Path::new("state.yaml");
    let first = String::from_utf8_lossy(first);
    let base = Snapshot::with_root_namespace(DEFAULT_ROOT_NAMESPACE);
    let Some(desired) = parse_settled(&first, &base) else {
        return;
    };
    let loaded = match build(path, desired, &base) {
        Ok(snap) => snap,
        Err(e) => panic!("a state file the parser accepts is refused by the store: {e}"),
    };
    // Reloading the same file is no change.
    let Some(again) = parse_settled(&first, &loaded) else {
        panic!("the same file parses once, not twice");
    };
    match loaded.apply(diff(&loaded, again)) {
        Ok((_, applied)) => assert!(
            applied.is_empty(),
            "a reload of the same file changed {applied:?}"
        ),
        Err(e) => panic!("a reload of the same file is refused: {e}"),
    }
    let Some(next) = next else {
        return;
    };
    // The next version: incrementally, and built whole; the same snapshot either way.
    let next = String::from_utf8_lossy(next);
    let (Some(incremental), Some(whole)) =
        (parse_settled(&next, &loaded), parse_settled(&next, &loaded))
    else {
        return;
    };
    let reloaded = loaded.apply(diff(&loaded, incremental));
    let built = build(path, whole, &base);
    match (reloaded, built) {
        (Ok((reloaded, _)), Ok(built)) => assert_eq!(
            canonical(&reloaded),
            canonical(&built),
            "a reload and a fresh build of the same file differ"
        ),
        (Ok(_), Err(e)) => panic!("a reload is accepted that a fresh build refuses: {e}"),
        (Err(e), Ok(_)) => panic!("a reload is refused that a fresh build accepts: {e}"),
        (Err(_), Err(_)) => {}
    }
}
