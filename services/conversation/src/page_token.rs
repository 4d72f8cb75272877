//! Opaque page tokens (AIP-158) for keyset pagination.
//!
//! A token holds the position after the last row returned (never an offset, so pages stay
//! stable while rows are inserted) and the fingerprint of the request that issued it, so a
//! token replayed with other filters or for another team is refused rather than silently
//! answering a different question. Encoding: URL-safe base64 of
//! `[format=1][kind][fingerprint: u64 BE][position]`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Datelike, Utc};
use uuid::Uuid;

use crate::limits::MAX_PAGE_TOKEN_BYTES;
use crate::model::{ListCursor, SearchCursor};

const FORMAT_V1: u8 = 1;

/// A position in one of the paginated listings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cursor {
    /// ListConversations.
    List(ListCursor),
    /// SearchConversations.
    Search(SearchCursor),
    /// ListEvents: the last sequence returned.
    Events(i64),
}

impl Cursor {
    fn kind(&self) -> u8 {
        match self {
            Self::List(_) => 1,
            Self::Search(_) => 2,
            Self::Events(_) => 3,
        }
    }
}

/// Why a page token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PageTokenError {
    /// Not a token this service issued.
    #[error("page_token is malformed: pass a next_page_token exactly as returned")]
    Malformed,
    /// A token from a request with other parameters.
    #[error(
        "page_token was issued for a request with other parameters: repeat the original filters, or start again without a token"
    )]
    Mismatch,
}

/// Encodes a cursor for the request with fingerprint `request`.
pub fn encode(request: u64, cursor: &Cursor) -> String {
    let mut buf = Vec::with_capacity(2 + 8 + 24);
    buf.push(FORMAT_V1);
    buf.push(cursor.kind());
    buf.extend_from_slice(&request.to_be_bytes());
    match cursor {
        Cursor::List(c) => {
            buf.extend_from_slice(&c.created_at_micros.to_be_bytes());
            buf.extend_from_slice(c.id.as_bytes());
        }
        Cursor::Search(c) => {
            buf.extend_from_slice(&c.rank.to_bits().to_be_bytes());
            buf.extend_from_slice(c.id.as_bytes());
        }
        Cursor::Events(sequence) => buf.extend_from_slice(&sequence.to_be_bytes()),
    }
    URL_SAFE_NO_PAD.encode(buf)
}

/// Decodes a token issued for the request with fingerprint `request`.
pub fn decode(token: &str, request: u64) -> Result<Cursor, PageTokenError> {
    use PageTokenError::{Malformed, Mismatch};
    if token.len() > MAX_PAGE_TOKEN_BYTES {
        return Err(Malformed);
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| Malformed)?;
    if bytes.len() < 10 || bytes[0] != FORMAT_V1 {
        return Err(Malformed);
    }
    let kind = bytes[1];
    let fingerprint = u64::from_be_bytes(bytes[2..10].try_into().map_err(|_| Malformed)?);
    let rest = &bytes[10..];
    let cursor = match (kind, rest.len()) {
        (1, 24) => {
            let created_at_micros =
                i64::from_be_bytes(rest[..8].try_into().map_err(|_| Malformed)?);
            // Only times a row can have (years 1 to 9999): the store binds it as a
            // timestamptz, and Postgres refuses times far outside that.
            DateTime::<Utc>::from_timestamp_micros(created_at_micros)
                .filter(|t| (1..=9999).contains(&t.year()))
                .ok_or(Malformed)?;
            Cursor::List(ListCursor {
                created_at_micros,
                id: Uuid::from_slice(&rest[8..]).map_err(|_| Malformed)?,
            })
        }
        (2, 20) => {
            let rank = f32::from_bits(u32::from_be_bytes(
                rest[..4].try_into().map_err(|_| Malformed)?,
            ));
            if !rank.is_finite() {
                return Err(Malformed);
            }
            Cursor::Search(SearchCursor {
                rank,
                id: Uuid::from_slice(&rest[4..]).map_err(|_| Malformed)?,
            })
        }
        (3, 8) => Cursor::Events(i64::from_be_bytes(rest.try_into().map_err(|_| Malformed)?)),
        _ => return Err(Malformed),
    };
    if fingerprint != request {
        return Err(Mismatch);
    }
    Ok(cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cursor_kind_round_trips() {
        let id = Uuid::now_v7();
        for cursor in [
            Cursor::List(ListCursor {
                created_at_micros: 1_763_000_000_123_456,
                id,
            }),
            Cursor::Search(SearchCursor {
                rank: 0.607_927_1,
                id,
            }),
            Cursor::Events(42),
        ] {
            assert_eq!(decode(&encode(7, &cursor), 7), Ok(cursor));
        }
    }

    #[test]
    fn tokens_for_other_requests_or_garbage_are_refused() {
        let token = encode(7, &Cursor::Events(3));
        assert_eq!(decode(&token, 8), Err(PageTokenError::Mismatch));
        assert_eq!(decode("", 7), Err(PageTokenError::Malformed));
        assert_eq!(decode("%%%", 7), Err(PageTokenError::Malformed));
        assert_eq!(
            decode(&token[..token.len() - 2], 7),
            Err(PageTokenError::Malformed)
        );
        assert_eq!(
            decode(&"A".repeat(10_000), 7),
            Err(PageTokenError::Malformed)
        );
        let nan = encode(
            7,
            &Cursor::Search(SearchCursor {
                rank: f32::NAN,
                id: Uuid::nil(),
            }),
        );
        assert_eq!(decode(&nan, 7), Err(PageTokenError::Malformed));
    }

    #[test]
    fn list_positions_outside_years_1_to_9999_are_refused() {
        for micros in [
            i64::MIN,
            i64::MAX,
            -62_135_596_800_000_001,
            253_402_300_800_000_000,
        ] {
            let forged = encode(
                7,
                &Cursor::List(ListCursor {
                    created_at_micros: micros,
                    id: Uuid::nil(),
                }),
            );
            assert_eq!(
                decode(&forged, 7),
                Err(PageTokenError::Malformed),
                "{micros}"
            );
        }
        let last_micro = Cursor::List(ListCursor {
            created_at_micros: 253_402_300_799_999_999,
            id: Uuid::nil(),
        });
        assert_eq!(decode(&encode(7, &last_micro), 7), Ok(last_micro));
    }
}
