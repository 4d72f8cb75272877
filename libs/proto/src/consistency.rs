//! The consistency token that writes return and reads may present.
//!
//! A write answers with the `convoy-consistency-token` response header; a read that sends it
//! back must not see data older than that write. The token names the shard that took the
//! write, the primary's WAL position after it (0 until replica routing measures LSNs), and
//! the written conversation's id and version. Clients treat it as opaque; its encoding is
//! versioned so it can grow. This module is the token's one home: encoding, decoding and the
//! header name. What a read does with a token is the data layer's business, not this one's.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use uuid::Uuid;

/// Metadata key of the token, on write responses and read requests.
pub const HEADER: &str = "convoy-consistency-token";

/// Encoding version written by [`ConsistencyToken::encode`].
const FORMAT_V1: u8 = 1;
/// Longest shard id a token may carry (shard ids are short labels like `shard-0`).
const MAX_SHARD_ID_LEN: usize = 63;
/// Longest encoded token accepted; anything longer is malformed without being decoded.
const MAX_ENCODED_LEN: usize = 160;

/// What a reader must not read older than.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistencyToken {
    /// The shard that committed the write.
    pub shard: String,
    /// The primary's WAL position after the commit (0 when not measured).
    pub lsn: u64,
    /// The conversation written.
    pub conversation: Uuid,
    /// Its version after the write.
    pub version: i64,
}

/// A token that is not one convoy issued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed consistency token: {0}")]
pub struct MalformedToken(&'static str);

impl ConsistencyToken {
    /// Encodes the token as URL-safe base64 (valid as an ASCII gRPC metadata value).
    pub fn encode(&self) -> String {
        let shard = self.shard.as_bytes();
        let shard_len = shard.len().min(MAX_SHARD_ID_LEN);
        let mut buf = Vec::with_capacity(2 + shard_len + 8 + 16 + 8);
        buf.push(FORMAT_V1);
        buf.push(shard_len as u8);
        buf.extend_from_slice(&shard[..shard_len]);
        buf.extend_from_slice(&self.lsn.to_be_bytes());
        buf.extend_from_slice(self.conversation.as_bytes());
        buf.extend_from_slice(&self.version.to_be_bytes());
        URL_SAFE_NO_PAD.encode(buf)
    }

    /// The token a request presents in its metadata, if any.
    pub fn from_metadata(
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<Self>, MalformedToken> {
        let Some(value) = metadata.get(HEADER) else {
            return Ok(None);
        };
        let text = value.to_str().map_err(|_| MalformedToken("not ASCII"))?;
        Self::decode(text).map(Some)
    }

    /// Decodes a token produced by [`ConsistencyToken::encode`].
    pub fn decode(token: &str) -> Result<Self, MalformedToken> {
        if token.len() > MAX_ENCODED_LEN {
            return Err(MalformedToken("too long"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| MalformedToken("not base64url"))?;
        let (&format, rest) = bytes.split_first().ok_or(MalformedToken("empty"))?;
        if format != FORMAT_V1 {
            return Err(MalformedToken("unknown format version"));
        }
        let (&shard_len, rest) = rest.split_first().ok_or(MalformedToken("truncated"))?;
        let shard_len = usize::from(shard_len);
        if shard_len > MAX_SHARD_ID_LEN || rest.len() != shard_len + 8 + 16 + 8 {
            return Err(MalformedToken("wrong length"));
        }
        let (shard, rest) = rest.split_at(shard_len);
        let shard = std::str::from_utf8(shard)
            .map_err(|_| MalformedToken("shard id is not UTF-8"))?
            .to_owned();
        let (lsn, rest) = rest.split_at(8);
        let (conversation, version) = rest.split_at(16);
        Ok(Self {
            shard,
            lsn: u64::from_be_bytes(lsn.try_into().expect("split at 8")),
            conversation: Uuid::from_slice(conversation).expect("split at 16"),
            version: i64::from_be_bytes(version.try_into().expect("split at 8")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> ConsistencyToken {
        ConsistencyToken {
            shard: "shard-1".into(),
            lsn: 0x0000_0001_0300_0148,
            conversation: Uuid::now_v7(),
            version: 42,
        }
    }

    #[test]
    fn encode_then_decode_is_identity() {
        let t = token();
        assert_eq!(ConsistencyToken::decode(&t.encode()), Ok(t));
    }

    #[test]
    fn encoded_token_is_a_valid_ascii_metadata_value() {
        let encoded = token().encode();
        assert!(
            encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[test]
    fn garbage_truncation_and_unknown_versions_are_rejected() {
        assert!(ConsistencyToken::decode("").is_err());
        assert!(ConsistencyToken::decode("not base64!").is_err());
        let encoded = token().encode();
        assert!(ConsistencyToken::decode(&encoded[..encoded.len() - 4]).is_err());
        let mut raw = URL_SAFE_NO_PAD.decode(&encoded).unwrap();
        raw[0] = 9;
        assert_eq!(
            ConsistencyToken::decode(&URL_SAFE_NO_PAD.encode(raw)),
            Err(MalformedToken("unknown format version"))
        );
        assert!(ConsistencyToken::decode(&"A".repeat(1000)).is_err());
    }
}
