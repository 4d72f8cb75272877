//! Reading the teams a request names straight from its protobuf encoding, and the gRPC
//! framing around it.
//!
//! The layer runs before tonic decodes the request into its type, so it reads only the
//! team fields its policy names: a walk over the wire format that allocates nothing but the
//! values it returns, and refuses malformed input instead of guessing.

use bytes::{Buf, Bytes};

use crate::policy::{MethodPolicy, TeamField};

/// Why a message could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not valid protobuf (truncated, a bad varint, a group, a bad length).
    #[error("the request is not a valid protobuf message")]
    Malformed,
    /// A team field holds bytes that are not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(String),
}

fn varint(buf: &mut &[u8]) -> Result<u64, WireError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let Some((&byte, rest)) = buf.split_first() else {
            return Err(WireError::Malformed);
        };
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::Malformed)
}

fn take<'a>(buf: &mut &'a [u8], n: u64) -> Result<&'a [u8], WireError> {
    let n = usize::try_from(n).map_err(|_| WireError::Malformed)?;
    if n > buf.len() {
        return Err(WireError::Malformed);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// Appends to `out` every value at `path` (field numbers, outermost first) in `message`.
fn collect<'a>(message: &'a [u8], path: &[u32], out: &mut Vec<&'a [u8]>) -> Result<(), WireError> {
    let Some((&want, rest)) = path.split_first() else {
        return Ok(());
    };
    let mut buf = message;
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let number = key >> 3;
        match key & 7 {
            0 => {
                varint(&mut buf)?;
            }
            1 => {
                take(&mut buf, 8)?;
            }
            2 => {
                let len = varint(&mut buf)?;
                let value = take(&mut buf, len)?;
                if number == u64::from(want) {
                    if rest.is_empty() {
                        out.push(value);
                    } else {
                        collect(value, rest, out)?;
                    }
                }
            }
            5 => {
                take(&mut buf, 4)?;
            }
            // Groups (3, 4) are not in proto3; 6 and 7 do not exist.
            _ => return Err(WireError::Malformed),
        }
    }
    Ok(())
}

/// The values of `field` in `message`, as strings.
pub fn field_values<'a>(message: &'a [u8], field: &TeamField) -> Result<Vec<&'a str>, WireError> {
    let mut raw = Vec::new();
    collect(message, &field.numbers, &mut raw)?;
    raw.into_iter()
        .map(|v| std::str::from_utf8(v).map_err(|_| WireError::NotUtf8(field.name.clone())))
        .collect()
}

/// Every (field name, value) the policy's team fields hold in `message`.
pub fn team_values<'a>(
    message: &'a [u8],
    policy: &'a MethodPolicy,
) -> Result<Vec<(&'a str, &'a str)>, WireError> {
    let mut out = Vec::new();
    for field in &policy.team_fields {
        for value in field_values(message, field)? {
            out.push((field.name.as_str(), value));
        }
    }
    Ok(out)
}

/// The team a value names, by the convention of its field (see `AccessPolicy.team_fields`
/// in options.proto): a resource name (`teams/{team}[/...]`), a bare id in a field named
/// `team` (the last path segment), a cache key (`{kind}:{team}:...`) or a tag
/// (`team:{team}`). `None` when the value follows none of them.
pub fn team_of<'a>(field: &str, value: &'a str, cache_key: bool) -> Option<&'a str> {
    let team = if cache_key {
        let mut parts = value.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("team"), Some(team), None) => team,
            (Some(_), Some(team), Some(_)) => team,
            _ => return None,
        }
    } else if let Some(rest) = value.strip_prefix("teams/") {
        rest.split('/').next().unwrap_or_default()
    } else if field.rsplit('.').next() == Some("team") {
        value
    } else {
        return None;
    };
    (!team.is_empty()).then_some(team)
}

/// Splits complete gRPC messages off the front of `buf` (1 byte compressed flag, 4 bytes
/// big-endian length, the message). Returns `None` when `buf` holds no complete frame yet.
pub fn next_frame(buf: &mut Bytes) -> Option<Frame> {
    let len = frame_len(buf).filter(|len| buf.len() - 5 >= *len)?;
    let compressed = buf[0] != 0;
    buf.advance(5);
    Some(Frame {
        compressed,
        message: buf.split_to(len),
    })
}

/// The declared length of the frame at the front of `buf`, once its header has arrived.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    (buf.len() >= 5).then(|| u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize)
}

/// One gRPC message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Whether the sender compressed it.
    pub compressed: bool,
    /// Its bytes.
    pub message: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_proto::v1 as pb;
    use prost::Message;

    fn policy(path: &str) -> &'static MethodPolicy {
        crate::policy::policy(path).unwrap()
    }

    #[test]
    fn team_fields_are_read_from_nested_and_repeated_fields() {
        let update = pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: "teams/acme/conversations/1".into(),
                title: "x".into(),
                ..Default::default()
            }),
            update_mask: None,
        }
        .encode_to_vec();
        let p = policy("/convoy.v1.ConversationService/UpdateConversation");
        assert_eq!(
            team_values(&update, p).unwrap(),
            vec![("conversation.name", "teams/acme/conversations/1")]
        );
        let batch = pb::BatchGetConversationsRequest {
            parent: "teams/acme".into(),
            names: vec![
                "teams/acme/conversations/1".into(),
                "teams/evil/conversations/2".into(),
            ],
        }
        .encode_to_vec();
        let p = policy("/convoy.v1.ConversationService/BatchGetConversations");
        let teams: Vec<_> = team_values(&batch, p)
            .unwrap()
            .into_iter()
            .map(|(f, v)| team_of(f, v, false).unwrap())
            .collect();
        assert_eq!(teams, vec!["acme", "acme", "evil"]);
    }

    #[test]
    fn values_map_to_teams_by_their_field_convention() {
        assert_eq!(team_of("parent", "teams/acme", false), Some("acme"));
        assert_eq!(
            team_of("name", "teams/acme/conversations/x", false),
            Some("acme")
        );
        assert_eq!(team_of("team", "acme", false), Some("acme"));
        assert_eq!(team_of("parent", "acme", false), None);
        assert_eq!(team_of("parent", "teams/", false), None);
        assert_eq!(team_of("key", "conv:acme:123", true), Some("acme"));
        assert_eq!(team_of("tags", "team:acme", true), Some("acme"));
        assert_eq!(team_of("key", "analytics:_fleet:ab", true), Some("_fleet"));
        assert_eq!(team_of("key", "opaque", true), None);
        assert_eq!(team_of("key", "conv::x", true), None);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let p = policy("/convoy.v1.ConversationService/GetConversation");
        // A length running past the end.
        assert_eq!(
            team_values(&[0x0a, 0x05, b'a'], p),
            Err(WireError::Malformed)
        );
        // A group start.
        assert_eq!(team_values(&[0x0b], p), Err(WireError::Malformed));
        // A varint of eleven bytes.
        let mut long = vec![0x08];
        long.extend([0xff; 11]);
        assert_eq!(team_values(&long, p), Err(WireError::Malformed));
        // Not UTF-8.
        assert!(matches!(
            team_values(&[0x0a, 0x01, 0xff], p),
            Err(WireError::NotUtf8(_))
        ));
        assert_eq!(team_values(&[], p), Ok(vec![]));
    }

    #[test]
    fn frames_split_only_when_complete() {
        let mut buf = Bytes::from_static(&[0, 0, 0, 0, 2, b'h', b'i', 0, 0, 0]);
        assert_eq!(
            next_frame(&mut buf),
            Some(Frame {
                compressed: false,
                message: Bytes::from_static(b"hi")
            })
        );
        assert_eq!(next_frame(&mut buf), None);
        assert_eq!(buf.len(), 3);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            for path in ["/convoy.v1.ConversationService/UpdateConversation", "/convoy.v1.CacheService/Set"] {
                let _ = team_values(&bytes, policy(path));
            }
            let mut buf = Bytes::from(bytes);
            while next_frame(&mut buf).is_some() {}
        }
    }
}
