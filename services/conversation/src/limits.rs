//! Limits on what a request may carry and a response may hold, as the contract
//! (`conversation.proto`) states them.
//!
//! Every limit bounds memory or work that a client's numbers could otherwise size. They are
//! part of the public contract, so they are constants here, not configuration. The
//! assertions at the end hold the limits to each other: whatever is stored fits a page,
//! and every answer fits a stock client's default 4 MiB.

/// Longest title, in bytes.
pub const MAX_TITLE_BYTES: usize = 512;
/// Longest conversation content, in bytes (1 MiB).
pub const MAX_CONTENT_BYTES: usize = 1 << 20;
/// Most metadata entries.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 4096;
/// Most names in one BatchGet (AIP-231 suggests 100 or fewer).
pub const MAX_BATCH_GET: usize = 100;
/// Most paths in an update mask: 16, room for the six updatable fields and `*` with a few
/// repeats (repeats are harmless, and handled once each).
pub const MAX_UPDATE_MASK_PATHS: usize = 16;
/// Most events in one AppendEvents.
pub const MAX_EVENTS_PER_BATCH: usize = 500;
/// Most bytes of events in one AppendEvents (2.5 MiB), counted as the answer will repeat
/// them (encoded, their raw JSON as stored, with their names): the answer also carries the
/// conversation (at most [`MAX_CONVERSATION_BYTES`], 1.26 MiB), and the two must fit a stock
/// client's 4 MiB.
pub const MAX_APPEND_EVENTS_BYTES: usize = (5 << 20) / 2;
/// Most tokens of each kind one event may report: a billion. The largest context windows
/// hold a few million tokens, so this leaves three orders of magnitude of room, and a full
/// batch (500 events) sums to 5 * 10^11, far inside i64. A conversation's totals add
/// batches without end, so the store saturates them at i64::MAX rather than overflow.
pub const MAX_TOKENS_PER_EVENT: i64 = 1_000_000_000;
/// Longest event content, in bytes (256 KiB).
pub const MAX_EVENT_CONTENT_BYTES: usize = 256 << 10;
/// Longest raw JSON of an event, in bytes (256 KiB).
pub const MAX_EVENT_RAW_JSON_BYTES: usize = 256 << 10;
/// Longest event id, parent id or tool-call id, in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 128;
/// Longest tool name, in bytes.
pub const MAX_TOOL_NAME_BYTES: usize = 256;
/// Longest model name, in bytes.
pub const MAX_MODEL_BYTES: usize = 128;
/// Longest search query, in bytes.
pub const MAX_QUERY_BYTES: usize = 1024;
/// Longest page token accepted, in bytes.
pub const MAX_PAGE_TOKEN_BYTES: usize = 256;

/// Page size of ListConversations when the request says 0.
pub const DEFAULT_LIST_PAGE_SIZE: usize = 50;
/// Largest page of ListConversations; larger requests are clamped (AIP-158).
pub const MAX_LIST_PAGE_SIZE: usize = 1000;
/// Page size of SearchConversations when the request says 0.
pub const DEFAULT_SEARCH_PAGE_SIZE: usize = 20;
/// Largest page of SearchConversations.
pub const MAX_SEARCH_PAGE_SIZE: usize = 100;
/// Page size of ListEvents when the request says 0.
pub const DEFAULT_EVENTS_PAGE_SIZE: usize = 100;
/// Largest page of ListEvents.
pub const MAX_EVENTS_PAGE_SIZE: usize = 1000;

/// Largest gRPC message the service decodes (8 MiB): a full batch of events at their limits
/// would be larger, so batches are also bounded by count.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 8 << 20;

/// Most encoded bytes of the items of one answer (a page of ListConversations,
/// SearchConversations or ListEvents, or a BatchGetConversations): 3 MiB. Stock gRPC
/// clients refuse messages over 4 MiB by default; the rest is room for framing and the page
/// token. A page stops before the item that would pass it (and says so with a
/// `next_page_token`); the first item always fits (see [`MAX_CONVERSATION_BYTES`]).
pub const MAX_RESPONSE_BYTES: usize = 3 << 20;

/// What a stock client accepts by default (4 MiB): every answer stays within it.
pub const STOCK_CLIENT_MESSAGE_BYTES: usize = 4 << 20;

/// Most bytes one stored conversation takes encoded: its content, title and metadata at
/// their limits (16 bytes of framing per metadata entry), and 1 KiB for its name, etag,
/// times and counters. The limits on every way of writing a conversation (create, update,
/// ingest declarations, whose merged metadata is held to [`MAX_METADATA_ENTRIES`]) keep
/// every stored conversation within it.
pub const MAX_CONVERSATION_BYTES: usize = MAX_CONTENT_BYTES
    + MAX_TITLE_BYTES
    + MAX_METADATA_ENTRIES * (MAX_METADATA_KEY_BYTES + MAX_METADATA_VALUE_BYTES + 16)
    + 1024;

/// Most bytes one stored event takes encoded: its content and raw JSON (as stored) at their
/// limits, its ids, tool and model names, and 1 KiB for its name, times and counters.
pub const MAX_EVENT_BYTES: usize = MAX_EVENT_CONTENT_BYTES
    + MAX_EVENT_RAW_JSON_BYTES
    + 3 * MAX_EVENT_ID_BYTES
    + MAX_TOOL_NAME_BYTES
    + MAX_MODEL_BYTES
    + 1024;

// A page always has room for its first item, so paging always moves forward.
const _: () = assert!(MAX_CONVERSATION_BYTES <= MAX_RESPONSE_BYTES);
const _: () = assert!(MAX_EVENT_BYTES <= MAX_RESPONSE_BYTES);
// Every page, with its framing and token, fits a stock client.
const _: () = assert!(MAX_RESPONSE_BYTES + (64 << 10) <= STOCK_CLIENT_MESSAGE_BYTES);
// One event at its limits can be appended, and an append's answer (the events and the
// conversation) fits a stock client.
const _: () = assert!(MAX_EVENT_BYTES <= MAX_APPEND_EVENTS_BYTES);
const _: () = assert!(
    MAX_APPEND_EVENTS_BYTES + MAX_CONVERSATION_BYTES + (64 << 10) <= STOCK_CLIENT_MESSAGE_BYTES
);

#[cfg(test)]
mod tests {
    use convoy_proto::v1 as pb;
    use prost::Message;

    use super::*;

    fn timestamp() -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: 253_402_300_799,
            nanos: 999_999_999,
        })
    }

    fn usage() -> Option<pb::TokenUsage> {
        Some(pb::TokenUsage {
            input_tokens: i64::MAX,
            output_tokens: i64::MAX,
            cache_creation_input_tokens: i64::MAX,
            cache_read_input_tokens: i64::MAX,
        })
    }

    #[test]
    fn a_conversation_at_every_limit_fits_its_stated_bound() {
        let conversation = pb::Conversation {
            name: format!(
                "teams/{}/conversations/{}",
                "t".repeat(63),
                uuid::Uuid::max()
            ),
            title: "t".repeat(MAX_TITLE_BYTES),
            intent: pb::Intent::Other as i32,
            status: pb::ConversationStatus::Archived as i32,
            content: "c".repeat(MAX_CONTENT_BYTES),
            metadata: (0..MAX_METADATA_ENTRIES)
                .map(|i| {
                    (
                        format!("{i:0>width$}", width = MAX_METADATA_KEY_BYTES),
                        "v".repeat(MAX_METADATA_VALUE_BYTES),
                    )
                })
                .collect(),
            effectiveness_score: Some(1.0),
            message_count: i64::MAX,
            event_count: i64::MAX,
            duration: Some(prost_types::Duration {
                seconds: i64::MAX,
                nanos: -999_999_999,
            }),
            token_usage: usage(),
            create_time: timestamp(),
            update_time: timestamp(),
            first_event_time: timestamp(),
            last_event_time: timestamp(),
            version: i64::MAX,
            etag: format!("\"{}\"", i64::MAX),
        };
        let len = conversation.encoded_len();
        assert!(
            len <= MAX_CONVERSATION_BYTES,
            "{len} > {MAX_CONVERSATION_BYTES}"
        );
    }

    #[test]
    fn an_event_at_every_limit_fits_its_stated_bound() {
        let event = pb::ConversationEvent {
            name: format!(
                "teams/{}/conversations/{}/events/{}",
                "t".repeat(63),
                uuid::Uuid::max(),
                i64::MAX
            ),
            sequence: i64::MAX,
            event_id: "e".repeat(MAX_EVENT_ID_BYTES),
            parent_event_id: "p".repeat(MAX_EVENT_ID_BYTES),
            kind: pb::EventKind::Raw as i32,
            role: pb::Role::Tool as i32,
            occur_time: timestamp(),
            content: "c".repeat(MAX_EVENT_CONTENT_BYTES),
            tool_name: "n".repeat(MAX_TOOL_NAME_BYTES),
            tool_call_id: "i".repeat(MAX_EVENT_ID_BYTES),
            is_error: true,
            model: "m".repeat(MAX_MODEL_BYTES),
            token_usage: usage(),
            is_sidechain: true,
            raw_json: "r".repeat(MAX_EVENT_RAW_JSON_BYTES),
        };
        let len = event.encoded_len();
        assert!(len <= MAX_EVENT_BYTES, "{len} > {MAX_EVENT_BYTES}");
    }
}
