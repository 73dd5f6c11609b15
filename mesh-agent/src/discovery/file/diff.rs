//! The difference between the state in force and a new state file, by object key: what the
//! store must upsert and remove to make the file's state current, and nothing else.

use std::{collections::HashSet, sync::Arc};

use super::Desired;
use crate::state::{Changes, Key, Snapshot};

/// The changes that turn `current` into `desired`: upserts of the objects that are new or
/// differ, in file order, and removals of those no longer in the file. Costs a lookup per
/// object of the file and a pass over the keys of the current snapshot.
pub fn diff(current: &Snapshot, desired: Desired) -> Changes {
    let mut changes = Changes::default();

    let names: HashSet<&str> = desired
        .namespaces
        .iter()
        .map(|ns| ns.name.as_str())
        .collect();
    changes.removed_namespaces = current
        .namespaces
        .keys()
        .filter(|name| !names.contains(name.as_str()))
        .cloned()
        .collect();
    drop(names);
    changes.namespaces = desired
        .namespaces
        .into_iter()
        .filter(|ns| {
            current.namespaces.get(&ns.name) != Some(&ns.enabled)
                || current.waypoint_of(&ns.name) != ns.waypoint.as_deref()
        })
        .collect();

    (changes.workloads, changes.removed_workloads) = by_key(
        current.workloads.keys(),
        |key| current.workloads.get(key),
        desired.workloads,
    );
    (changes.services, changes.removed_services) = by_key(
        current.service_definitions().map(|(key, _)| key),
        |key| current.service(key),
        desired.services,
    );
    (changes.policies, changes.removed_policies) = by_key(
        current.policies.keys(),
        |key| current.policy(key),
        desired.policies,
    );
    changes
}

/// For one kind of object: the desired objects that are new or differ from the current ones
/// (upserts, in the desired order), and the current keys no longer desired (removals).
fn by_key<'a, T: PartialEq + 'a>(
    current_keys: impl Iterator<Item = &'a Key>,
    current: impl Fn(&str) -> Option<&'a Arc<T>>,
    desired: Vec<(String, T)>,
) -> (Vec<T>, Vec<String>) {
    let keys: HashSet<&str> = desired.iter().map(|(k, _)| k.as_str()).collect();
    let removed = current_keys
        .filter(|key| !keys.contains(&***key))
        .map(|key| key.to_string())
        .collect();
    drop(keys);
    let upserts = desired
        .into_iter()
        .filter(|(key, new)| current(key).is_none_or(|old| **old != *new))
        .map(|(_, new)| new)
        .collect();
    (upserts, removed)
}
