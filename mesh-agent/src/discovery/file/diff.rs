//! The difference between the state in force and a new state file, by object key: what the
//! store must upsert and remove to make the file's state current, and nothing else.

use std::collections::HashSet;

use super::Desired;
use crate::state::{Changes, Snapshot};

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
        .filter(|ns| current.namespaces.get(&ns.name) != Some(&ns.enabled))
        .collect();

    let keys: HashSet<&str> = desired.workloads.iter().map(|(k, _)| k.as_str()).collect();
    changes.removed_workloads = current
        .workloads
        .keys()
        .filter(|key| !keys.contains(&***key))
        .map(|key| key.to_string())
        .collect();
    drop(keys);
    changes.workloads = desired
        .workloads
        .into_iter()
        .filter(|(key, w)| {
            current
                .workloads
                .get(key.as_str())
                .is_none_or(|old| **old != *w)
        })
        .map(|(_, w)| w)
        .collect();

    let keys: HashSet<&str> = desired.services.iter().map(|(k, _)| k.as_str()).collect();
    changes.removed_services = current
        .service_definitions()
        .filter(|(key, _)| !keys.contains(&***key))
        .map(|(key, _)| key.to_string())
        .collect();
    drop(keys);
    changes.services = desired
        .services
        .into_iter()
        .filter(|(key, s)| current.service(key).is_none_or(|old| **old != *s))
        .map(|(_, s)| s)
        .collect();

    let keys: HashSet<&str> = desired.policies.iter().map(|(k, _)| k.as_str()).collect();
    changes.removed_policies = current
        .policies
        .keys()
        .filter(|key| !keys.contains(&***key))
        .map(|key| key.to_string())
        .collect();
    drop(keys);
    changes.policies = desired
        .policies
        .into_iter()
        .filter(|(key, p)| current.policy(key).is_none_or(|old| **old != *p))
        .map(|(_, p)| p)
        .collect();

    changes
}
