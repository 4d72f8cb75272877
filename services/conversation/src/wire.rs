//! Domain values to their protobuf form, for responses.
//!
//! The reverse direction (requests to domain values) is [`crate::validate`]'s job, because it
//! can fail; this direction cannot.

use chrono::{DateTime, Utc};
use convoy_proto::v1 as pb;

use crate::model::*;
use crate::names::{ConversationName, event_name};
use crate::validate::etag_of;

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn duration(seconds: f64) -> prost_types::Duration {
    let whole = seconds.trunc();
    prost_types::Duration {
        seconds: whole as i64,
        nanos: ((seconds - whole) * 1e9).round() as i32,
    }
}

fn usage(u: TokenUsage) -> pb::TokenUsage {
    pb::TokenUsage {
        input_tokens: u.input,
        output_tokens: u.output,
        cache_creation_input_tokens: u.cache_creation,
        cache_read_input_tokens: u.cache_read,
    }
}

fn intent(i: Intent) -> pb::Intent {
    match i {
        Intent::Debug => pb::Intent::Debug,
        Intent::Feature => pb::Intent::Feature,
        Intent::Refactor => pb::Intent::Refactor,
        Intent::Review => pb::Intent::Review,
        Intent::Explain => pb::Intent::Explain,
        Intent::Test => pb::Intent::Test,
        Intent::Docs => pb::Intent::Docs,
        Intent::Other => pb::Intent::Other,
    }
}

fn status(s: Status) -> pb::ConversationStatus {
    match s {
        Status::Active => pb::ConversationStatus::Active,
        Status::Completed => pb::ConversationStatus::Completed,
        Status::Abandoned => pb::ConversationStatus::Abandoned,
        Status::Archived => pb::ConversationStatus::Archived,
    }
}

fn kind(k: EventKind) -> pb::EventKind {
    match k {
        EventKind::Message => pb::EventKind::Message,
        EventKind::ToolCall => pb::EventKind::ToolCall,
        EventKind::ToolResult => pb::EventKind::ToolResult,
        EventKind::Error => pb::EventKind::Error,
        EventKind::System => pb::EventKind::System,
        EventKind::Raw => pb::EventKind::Raw,
    }
}

fn role(r: Option<Role>) -> pb::Role {
    match r {
        None => pb::Role::Unspecified,
        Some(Role::User) => pb::Role::User,
        Some(Role::Assistant) => pb::Role::Assistant,
        Some(Role::System) => pb::Role::System,
        Some(Role::Tool) => pb::Role::Tool,
    }
}

/// A stored conversation as the API returns it.
pub fn conversation(c: Conversation) -> pb::Conversation {
    pb::Conversation {
        name: c.name.to_string(),
        title: c.fields.title,
        intent: intent(c.fields.intent) as i32,
        status: status(c.fields.status) as i32,
        content: c.fields.content,
        metadata: c.fields.metadata,
        effectiveness_score: c.fields.effectiveness_score,
        message_count: c.message_count,
        event_count: c.event_count,
        duration: Some(duration(c.duration_seconds)),
        token_usage: Some(usage(c.usage)),
        create_time: Some(timestamp(c.created_at)),
        update_time: Some(timestamp(c.updated_at)),
        first_event_time: c.first_event_at.map(timestamp),
        last_event_time: c.last_event_at.map(timestamp),
        version: c.version.0,
        etag: etag_of(c.version),
    }
}

/// A stored event as the API returns it.
pub fn event(conversation: &ConversationName, e: Event) -> pb::ConversationEvent {
    let Event { sequence, event: e } = e;
    pb::ConversationEvent {
        name: event_name(conversation, sequence),
        sequence,
        event_id: e.event_id.unwrap_or_default(),
        parent_event_id: e.parent_event_id.unwrap_or_default(),
        kind: kind(e.kind) as i32,
        role: role(e.role) as i32,
        occur_time: Some(timestamp(e.occurred_at)),
        content: e.content,
        tool_name: e.tool_name.unwrap_or_default(),
        tool_call_id: e.tool_call_id.unwrap_or_default(),
        is_error: e.is_error,
        model: e.model.unwrap_or_default(),
        token_usage: Some(usage(e.usage)),
        is_sidechain: e.is_sidechain,
        raw_json: e.raw_json.map(|j| j.to_string()).unwrap_or_default(),
    }
}
