//! The conversation domain: validated values that the store writes and reads.
//!
//! These types are what requests become after validation ([`crate::validate`]) and what rows
//! become after loading ([`crate::store`]). Conversions to and from the wire live in
//! [`crate::wire`]; nothing here knows about gRPC.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::names::{ConversationName, TeamId};

/// Declares a closed set of values stored as text in Postgres.
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// The value as stored in Postgres.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// Parses the stored text.
            pub fn from_db(text: &str) -> Option<Self> {
                match text {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

text_enum!(
    /// Why a conversation happened.
    Intent {
        /// Fixing a defect.
        Debug => "debug",
        /// New functionality.
        Feature => "feature",
        /// Restructuring.
        Refactor => "refactor",
        /// Reviewing a change.
        Review => "review",
        /// Understanding something.
        Explain => "explain",
        /// Tests.
        Test => "test",
        /// Documentation.
        Docs => "docs",
        /// Anything else.
        Other => "other",
    }
);

text_enum!(
    /// Life-cycle status.
    Status {
        /// Going on.
        Active => "active",
        /// Ended, goal reached.
        Completed => "completed",
        /// Ended, goal missed.
        Abandoned => "abandoned",
        /// Kept for the record.
        Archived => "archived",
    }
);

text_enum!(
    /// What an event records.
    EventKind {
        /// A message (counted in message_count).
        Message => "message",
        /// A tool call.
        ToolCall => "tool_call",
        /// A tool's result.
        ToolResult => "tool_result",
        /// A failure.
        Error => "error",
        /// System information.
        System => "system",
        /// An uninterpreted source record.
        Raw => "raw",
    }
);

text_enum!(
    /// Who produced an event.
    Role {
        /// The engineer.
        User => "user",
        /// The assistant.
        Assistant => "assistant",
        /// The host.
        System => "system",
        /// A tool.
        Tool => "tool",
    }
);

/// A row version; the etag is derived from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub i64);

/// Token counts by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub input: i64,
    /// Completion tokens.
    pub output: i64,
    /// Prompt-cache writes.
    pub cache_creation: i64,
    /// Prompt-cache reads.
    pub cache_read: i64,
}

/// The client-settable fields of a conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct ConversationFields {
    /// Title.
    pub title: String,
    /// Intent.
    pub intent: Intent,
    /// Status.
    pub status: Status,
    /// Searchable content.
    pub content: String,
    /// Metadata, ordered so that it serializes deterministically.
    pub metadata: BTreeMap<String, String>,
    /// Effectiveness in [0, 1].
    pub effectiveness_score: Option<f64>,
}

/// A validated create.
#[derive(Clone, Debug)]
pub struct NewConversation {
    /// Where it goes.
    pub name: ConversationName,
    /// What it holds.
    pub fields: ConversationFields,
    /// Idempotency key and the fingerprint of the request it belongs to.
    pub request: Option<(Uuid, [u8; 8])>,
}

/// A conversation as an ingestion stream declares it: created on first sight, its declared
/// fields updated when they change (metadata merged key by key).
#[derive(Clone, Debug, PartialEq)]
pub struct IngestConversation {
    /// Where it goes.
    pub name: ConversationName,
    /// Title.
    pub title: String,
    /// Intent, when the source says.
    pub intent: Option<Intent>,
    /// Metadata to merge into the stored metadata.
    pub metadata: BTreeMap<String, String>,
}

/// A validated update: `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConversationPatch {
    /// New title.
    pub title: Option<String>,
    /// New intent.
    pub intent: Option<Intent>,
    /// New status.
    pub status: Option<Status>,
    /// New content.
    pub content: Option<String>,
    /// New metadata (replaces the map).
    pub metadata: Option<BTreeMap<String, String>>,
    /// New effectiveness (`Some(None)` clears it).
    pub effectiveness_score: Option<Option<f64>>,
}

impl ConversationPatch {
    /// True when the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A stored conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    /// Its name.
    pub name: ConversationName,
    /// Its client-settable fields.
    pub fields: ConversationFields,
    /// MESSAGE events.
    pub message_count: i64,
    /// All events.
    pub event_count: i64,
    /// Seconds from first to last event.
    pub duration_seconds: f64,
    /// Token totals.
    pub usage: TokenUsage,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// First event.
    pub first_event_at: Option<DateTime<Utc>>,
    /// Last event.
    pub last_event_at: Option<DateTime<Utc>>,
    /// Row version.
    pub version: Version,
}

/// A validated event to append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// The source's id.
    pub event_id: Option<String>,
    /// The source's parent id.
    pub parent_event_id: Option<String>,
    /// Kind.
    pub kind: EventKind,
    /// Producer.
    pub role: Option<Role>,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// Text.
    pub content: String,
    /// Tool name.
    pub tool_name: Option<String>,
    /// Tool call id.
    pub tool_call_id: Option<String>,
    /// Failure flag.
    pub is_error: bool,
    /// Model.
    pub model: Option<String>,
    /// Tokens.
    pub usage: TokenUsage,
    /// Side conversation flag.
    pub is_sidechain: bool,
    /// The source record.
    pub raw_json: Option<serde_json::Value>,
}

/// A stored event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Position in the conversation, from 1.
    pub sequence: i64,
    /// The event as appended.
    pub event: NewEvent,
}

/// Filters shared by List and Search.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filters {
    /// Only this status.
    pub status: Option<Status>,
    /// Only this intent.
    pub intent: Option<Intent>,
    /// Created at or after.
    pub created_from: Option<DateTime<Utc>>,
    /// Created before.
    pub created_until: Option<DateTime<Utc>>,
}

/// Where a List page starts: after this (created_at, id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListCursor {
    /// Creation time of the last row returned, in microseconds since the epoch.
    pub created_at_micros: i64,
    /// Id of the last row returned.
    pub id: Uuid,
}

/// Where a Search page starts: after this (rank, id).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SearchCursor {
    /// Rank of the last hit returned.
    pub rank: f32,
    /// Id of the last hit returned.
    pub id: Uuid,
}

/// A validated List.
#[derive(Clone, Debug, PartialEq)]
pub struct ListQuery {
    /// Whose.
    pub team: TeamId,
    /// Filters.
    pub filters: Filters,
    /// Page size, already clamped.
    pub page_size: usize,
    /// Continue after.
    pub cursor: Option<ListCursor>,
}

/// A validated Search.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchQuery {
    /// Whose.
    pub team: TeamId,
    /// The websearch query text.
    pub query: String,
    /// Filters (status and intent only).
    pub filters: Filters,
    /// Page size, already clamped.
    pub page_size: usize,
    /// Continue after.
    pub cursor: Option<SearchCursor>,
}

/// A validated ListEvents.
#[derive(Clone, Debug, PartialEq)]
pub struct EventsQuery {
    /// Whose.
    pub conversation: ConversationName,
    /// Only events after this sequence.
    pub after_sequence: i64,
    /// Page size, already clamped.
    pub page_size: usize,
}
