//! Limits on what a request may carry, as the contract (`conversation.proto`) states them.
//!
//! Every limit bounds memory or work that a client's numbers could otherwise size. They are
//! part of the public contract, so they are constants here, not configuration.

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
/// Most events in one AppendEvents.
pub const MAX_EVENTS_PER_BATCH: usize = 500;
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
