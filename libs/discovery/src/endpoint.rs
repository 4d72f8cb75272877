//! What an instance publishes about itself, and its JSON form in etcd.
//!
//! The value is the layout of etcd's own gRPC naming resolver (Go's
//! `go.etcd.io/etcd/client/v3/naming/endpoints`), so `etcdctl get` and Go clients read it:
//!
//! ```json
//! {"Op":0,"Addr":"10.0.0.7:50051","Metadata":{"service":"conversation","instance":"a1","version":"0.1.0","zone":"local"}}
//! ```
//!
//! Not here: where the value is stored (see [`crate::keys`]).

use std::collections::BTreeMap;
use std::str;

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tracing::warn;

use crate::Result;
use crate::keys;

/// The naming resolver's `Op` for "add this endpoint"; the only one ever stored.
const OP_ADD: i64 = 0;

/// The metadata keys that are fields of [`Metadata`], never entries of its `extra` map.
const FIXED_METADATA: [&str; 4] = ["service", "instance", "version", "zone"];

/// One instance of a service: where to reach it and what it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect: `host:port`, the host a name or an IP address.
    pub addr: String,
    /// What the instance is.
    pub metadata: Metadata,
}

/// What an instance says about itself; the resolver JSON's `Metadata` object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Metadata {
    /// The service, e.g. `conversation`; on read, always the one in the key.
    pub service: String,
    /// The instance id, unique within the service; on read, always the one in the key.
    pub instance: String,
    /// The build's version, e.g. `0.1.0`.
    pub version: String,
    /// Where the instance runs, for zone-aware balancing, e.g. `local`.
    pub zone: String,
    /// Any other string labels. Keys named like the fields above are not written.
    #[serde(flatten)]
    pub extra: BTreeMap<String, String>,
}

// === impl Endpoint ===

impl Endpoint {
    /// The value to store in etcd.
    pub fn to_json(&self) -> String {
        // Strings and string maps always serialize.
        serde_json::to_string(self).expect("an endpoint serializes to JSON")
    }

    /// Parses a value in the resolver layout. Unknown top-level fields are ignored, a missing
    /// `Op` means add, and `"Metadata":null` (what Go writes for no metadata) is empty.
    pub fn from_json(value: &[u8]) -> Result<Endpoint> {
        Ok(serde_json::from_slice(value)?)
    }

    /// The etcd key of this endpoint under `prefix`.
    pub fn key(&self, prefix: &str) -> String {
        keys::key_for(prefix, &self.metadata.service, &self.metadata.instance)
    }

    /// Checks that the service and instance names can form a key.
    pub(crate) fn check_names(&self) -> Result<()> {
        keys::check_segment("service", &self.metadata.service)?;
        keys::check_segment("instance", &self.metadata.instance)
    }
}

/// Decodes one etcd entry; the service and instance come from the key, which is the truth.
/// Entries that are not endpoints (another layout, foreign data) are skipped with a warning:
/// one bad value must not hide the good ones from a balancer.
pub(crate) fn from_entry(prefix: &str, key: &[u8], value: &[u8]) -> Option<Endpoint> {
    let key = String::from_utf8_lossy(key);
    let Some(names) = keys::parse_key(prefix, &key) else {
        warn!(%key, "skipping a key outside the services/<service>/<instance> layout");
        return None;
    };
    match Endpoint::from_json(value) {
        Ok(mut endpoint) => {
            endpoint.metadata.service = names.service.to_owned();
            endpoint.metadata.instance = names.instance.to_owned();
            Some(endpoint)
        }
        Err(error) => {
            warn!(%key, %error, "skipping a value that is not an endpoint");
            None
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "Op")]
            op: i64,
            #[serde(rename = "Addr")]
            addr: &'a str,
            #[serde(rename = "Metadata")]
            metadata: &'a Metadata,
        }
        Wire {
            op: OP_ADD,
            addr: &self.addr,
            metadata: &self.metadata,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(rename = "Op", default)]
            op: i64,
            #[serde(rename = "Addr")]
            addr: String,
            #[serde(rename = "Metadata", default)]
            metadata: Option<Metadata>,
        }
        let wire = Wire::deserialize(deserializer)?;
        if wire.op != OP_ADD {
            return Err(D::Error::custom(format!(
                "Op is {}, but only 0 (add) is stored",
                wire.op
            )));
        }
        Ok(Endpoint {
            addr: wire.addr,
            metadata: wire.metadata.unwrap_or_default(),
        })
    }
}

// === impl Metadata ===

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let extra = self
            .extra
            .iter()
            .filter(|(k, _)| !FIXED_METADATA.contains(&k.as_str()));
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("service", &self.service)?;
        map.serialize_entry("instance", &self.instance)?;
        map.serialize_entry("version", &self.version)?;
        map.serialize_entry("zone", &self.zone)?;
        for (k, v) in extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn endpoint() -> Endpoint {
        Endpoint {
            addr: "10.0.0.7:50051".into(),
            metadata: Metadata {
                service: "conversation".into(),
                instance: "a1".into(),
                version: "0.1.0".into(),
                zone: "local".into(),
                extra: BTreeMap::from([("shard".into(), "3".into())]),
            },
        }
    }

    #[test]
    fn json_is_the_go_resolver_layout_and_round_trips() {
        let json = endpoint().to_json();
        assert_eq!(
            json,
            r#"{"Op":0,"Addr":"10.0.0.7:50051","Metadata":{"service":"conversation","instance":"a1","version":"0.1.0","zone":"local","shard":"3"}}"#
        );
        assert_eq!(Endpoint::from_json(json.as_bytes()).unwrap(), endpoint());
    }

    #[test]
    fn go_written_values_parse() {
        // Go's endpoints manager with nil metadata, and an older writer without Op.
        let bare = Endpoint::from_json(br#"{"Op":0,"Addr":"h:1","Metadata":null}"#).unwrap();
        assert_eq!(bare.addr, "h:1");
        assert_eq!(bare.metadata, Metadata::default());
        assert_eq!(
            Endpoint::from_json(br#"{"Addr":"h:1"}"#).unwrap().addr,
            "h:1"
        );
    }

    #[test]
    fn values_that_are_not_endpoints_are_refused() {
        for bad in [
            &br#"{"Op":1,"Addr":"h:1"}"#[..],
            br#"{"Op":0}"#,
            br#"{"Op":0,"Addr":"h:1","Metadata":{"weight":3}}"#,
            b"h:1",
        ] {
            assert!(
                matches!(Endpoint::from_json(bad), Err(Error::Decode(_))),
                "{}",
                str::from_utf8(bad).unwrap()
            );
        }
    }

    #[test]
    fn extra_labels_cannot_shadow_the_fixed_fields() {
        let mut e = endpoint();
        e.metadata.extra.insert("service".into(), "evil".into());
        let back = Endpoint::from_json(e.to_json().as_bytes()).unwrap();
        assert_eq!(back.metadata.service, "conversation");
        assert!(!back.metadata.extra.contains_key("service"));
    }

    #[test]
    fn entries_take_their_names_from_the_key() {
        let mut e = endpoint();
        e.metadata.instance = "stale".into();
        let read = from_entry("", b"services/conversation/a1", e.to_json().as_bytes()).unwrap();
        assert_eq!(read, endpoint());
        assert_eq!(from_entry("", b"services/conversation", b"{}"), None);
        assert_eq!(from_entry("", b"services/conversation/a1", b"nope"), None);
    }
}
