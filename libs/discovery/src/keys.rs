//! The etcd key layout of discovery, in one place: `<prefix>services/<service>/<instance>`.
//!
//! Pure functions from names to keys and back. Not here: what is stored under a key (see
//! [`crate::endpoint`]) or any etcd I/O.

use crate::{Error, Result};

/// The folder under the prefix that holds every service.
const SERVICES: &str = "services/";

/// A key split into the names it was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceKey<'a> {
    /// The service, e.g. `conversation`.
    pub service: &'a str,
    /// The instance id, unique within the service.
    pub instance: &'a str,
}

/// The key of one instance: `<prefix>services/<service>/<instance>`. The names must be valid
/// segments (see [`check_segment`]); an empty prefix puts keys at `services/`.
pub fn key_for(prefix: &str, service: &str, instance: &str) -> String {
    format!("{}{instance}", service_prefix(prefix, service))
}

/// The prefix under which every instance of `service` lives, ending in `/` so that a service
/// named `conv` does not match `conversation`.
pub fn service_prefix(prefix: &str, service: &str) -> String {
    format!("{}{service}/", services_prefix(prefix))
}

/// The prefix under which every service lives: `<prefix>services/`.
pub fn services_prefix(prefix: &str) -> String {
    format!("{}{SERVICES}", root(prefix))
}

/// Splits a key made by [`key_for`] with the same prefix; `None` for any other key (outside
/// the prefix, too few or too many segments, an empty name).
pub fn parse_key<'a>(prefix: &str, key: &'a str) -> Option<InstanceKey<'a>> {
    let rest = key.strip_prefix(root(prefix).as_str())?;
    let rest = rest.strip_prefix(SERVICES)?;
    let (service, instance) = rest.split_once('/')?;
    (is_segment(service) && is_segment(instance)).then_some(InstanceKey { service, instance })
}

/// Checks that `name` can be one key segment: non-empty, without `/`. `what` names it in the
/// error (`service` or `instance`).
pub fn check_segment(what: &'static str, name: &str) -> Result<()> {
    if is_segment(name) {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// Whether `name` can be one key segment.
fn is_segment(name: &str) -> bool {
    !name.is_empty() && !name.contains('/')
}

/// The prefix as keys start with it: empty, or ending in `/`.
fn root(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_services_service_instance_under_the_prefix() {
        assert_eq!(
            key_for("", "conversation", "a1"),
            "services/conversation/a1"
        );
        assert_eq!(
            key_for("convoy/", "conversation", "a1"),
            "convoy/services/conversation/a1"
        );
        // A prefix without its trailing slash gets one.
        assert_eq!(
            key_for("convoy", "conversation", "a1"),
            "convoy/services/conversation/a1"
        );
        assert_eq!(service_prefix("", "conv"), "services/conv/");
        assert_eq!(services_prefix(""), "services/");
    }

    #[test]
    fn parse_key_inverts_key_for_and_rejects_other_keys() {
        for prefix in ["", "convoy/", "convoy"] {
            let key = key_for(prefix, "conversation", "a1");
            assert_eq!(
                parse_key(prefix, &key),
                Some(InstanceKey {
                    service: "conversation",
                    instance: "a1"
                })
            );
        }
        assert_eq!(parse_key("", "convoy/services/conversation/a1"), None);
        assert_eq!(parse_key("convoy/", "services/conversation/a1"), None);
        assert_eq!(parse_key("", "services/conversation"), None);
        assert_eq!(parse_key("", "services/conversation/"), None);
        assert_eq!(parse_key("", "services//a1"), None);
        assert_eq!(parse_key("", "services/conversation/a1/extra"), None);
        assert_eq!(parse_key("", "other/conversation/a1"), None);
    }

    #[test]
    fn names_with_slashes_or_empty_are_refused() {
        assert!(check_segment("service", "conversation").is_ok());
        assert!(matches!(
            check_segment("service", "a/b"),
            Err(Error::InvalidName {
                what: "service",
                ..
            })
        ));
        assert!(check_segment("instance", "").is_err());
    }
}
