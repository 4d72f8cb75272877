//! The set of instances a watcher's consumer holds, and the changes that move it: applying an
//! etcd event or a fresh listing yields exactly the [`Change`]s the consumer has not seen.
//!
//! Not here: reading etcd (see [`crate::watch`]).

use std::collections::BTreeMap;

use tower::discover::Change;

use crate::endpoint::Endpoint;

/// One change to a service's instances, keyed by instance id.
pub(crate) type InstanceChange = Change<String, Endpoint>;

/// The instances of one service as the consumer knows them.
#[derive(Debug, Default)]
pub(crate) struct ServiceSet {
    instances: BTreeMap<String, Endpoint>,
}

// === impl ServiceSet ===

impl ServiceSet {
    /// Records that `id` is at `endpoint`; `None` when the consumer already has exactly that
    /// (a re-registration that wrote the same value), so no duplicate reaches it.
    pub(crate) fn insert(&mut self, id: String, endpoint: Endpoint) -> Option<InstanceChange> {
        if self.instances.get(&id) == Some(&endpoint) {
            return None;
        }
        self.instances.insert(id.clone(), endpoint.clone());
        Some(Change::Insert(id, endpoint))
    }

    /// Records that `id` is gone; `None` when the consumer never had it.
    pub(crate) fn remove(&mut self, id: &str) -> Option<InstanceChange> {
        self.instances
            .remove_entry(id)
            .map(|(id, _)| Change::Remove(id))
    }

    /// Replaces the whole set with a fresh listing and returns the difference: a `Remove`
    /// for each instance that vanished, then an `Insert` for each new or changed one.
    /// Unchanged instances produce nothing.
    pub(crate) fn replace(&mut self, listed: BTreeMap<String, Endpoint>) -> Vec<InstanceChange> {
        let vanished: Vec<String> = self
            .instances
            .keys()
            .filter(|id| !listed.contains_key(*id))
            .cloned()
            .collect();
        let mut changes: Vec<InstanceChange> =
            vanished.iter().filter_map(|id| self.remove(id)).collect();
        changes.extend(
            listed
                .into_iter()
                .filter_map(|(id, endpoint)| self.insert(id, endpoint)),
        );
        changes
    }

    /// How many instances the consumer has.
    pub(crate) fn len(&self) -> usize {
        self.instances.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(addr: &str) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            ..Endpoint::default()
        }
    }

    fn describe(changes: &[InstanceChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Insert(id, e) => format!("+{id}@{}", e.addr),
                Change::Remove(id) => format!("-{id}"),
            })
            .collect()
    }

    #[test]
    fn same_value_is_not_inserted_twice_and_unknown_ids_are_not_removed() {
        let mut set = ServiceSet::default();
        assert!(set.insert("a".into(), at("h:1")).is_some());
        assert!(set.insert("a".into(), at("h:1")).is_none());
        assert!(set.insert("a".into(), at("h:2")).is_some());
        assert!(set.remove("b").is_none());
        assert!(set.remove("a").is_some());
        assert_eq!(set.len(), 0);
    }

    #[test]
    fn relisting_yields_only_the_difference() {
        let mut set = ServiceSet::default();
        set.insert("a".into(), at("h:1"));
        set.insert("b".into(), at("h:2"));
        set.insert("c".into(), at("h:3"));
        let listed = BTreeMap::from([
            ("a".to_string(), at("h:1")),
            ("c".to_string(), at("h:33")),
            ("d".to_string(), at("h:4")),
        ]);
        assert_eq!(
            describe(&set.replace(listed.clone())),
            ["-b", "+c@h:33", "+d@h:4"]
        );
        assert!(set.replace(listed).is_empty());
    }
}
