//! Request validation: the conversation API's requests become domain values or a precise
//! INVALID_ARGUMENT listing every field that is wrong.
//!
//! Parse, don't validate: past this module a request is known good (names parsed, enums
//! known, sizes within [`crate::limits`], text storable in Postgres), so the store never
//! sees input that could fail for a reason the client could have fixed. Nothing here
//! touches the database.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Utc};
use convoy_proto::consistency::ConsistencyToken;
use convoy_proto::errors::clip;
use convoy_proto::v1 as pb;
use prost::Message;
use uuid::Uuid;

use crate::error::{ApiError, Violation};
use crate::fingerprint::Fingerprint;
use crate::limits::*;
use crate::model::*;
use crate::names::{ConversationName, TeamId, parse_team_name, parse_uuid};
use crate::page_token::{self, Cursor, PageTokenError};

/// Collects violations so that one answer names every bad field.
#[derive(Default)]
struct Violations(Vec<Violation>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(Violation::new(field, description));
    }

    /// Records `result`'s error under `field`, returning its value if it is fine.
    fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|why| self.add(field, why)).ok()
    }

    /// Like [`Violations::check`], building the field path only on error (batches of
    /// events would otherwise format a dozen paths per event).
    fn check_at<T>(
        &mut self,
        field: impl FnOnce() -> String,
        result: Result<T, String>,
    ) -> Option<T> {
        result.map_err(|why| self.add(field(), why)).ok()
    }

    fn finish<T>(self, build: impl FnOnce() -> T) -> Result<T, ApiError> {
        if self.0.is_empty() {
            Ok(build())
        } else {
            Err(ApiError::InvalidArgument(self.0))
        }
    }
}

/// Longest piece of a client's value quoted back in a violation's description: 64 bytes,
/// enough to recognise it (every description is clipped again where the status is made).
const MAX_QUOTED_BYTES: usize = 64;

/// Text that Postgres can store and that fits `max` bytes.
fn text(value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "is {} bytes; at most {max} are allowed",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err("contains a NUL character, which cannot be stored".into());
    }
    Ok(())
}

/// Optional text: empty means absent.
fn optional_text(value: &str, max: usize) -> Result<Option<String>, String> {
    text(value, max)?;
    Ok((!value.is_empty()).then(|| value.to_owned()))
}

fn title(value: &str) -> Result<String, String> {
    text(value, MAX_TITLE_BYTES)?;
    if value.trim().is_empty() {
        return Err("is required: give the conversation a short title".into());
    }
    Ok(value.to_owned())
}

fn intent(value: i32) -> Result<Intent, String> {
    use pb::Intent as P;
    match P::try_from(value) {
        Ok(P::Debug) => Ok(Intent::Debug),
        Ok(P::Feature) => Ok(Intent::Feature),
        Ok(P::Refactor) => Ok(Intent::Refactor),
        Ok(P::Review) => Ok(Intent::Review),
        Ok(P::Explain) => Ok(Intent::Explain),
        Ok(P::Test) => Ok(Intent::Test),
        Ok(P::Docs) => Ok(Intent::Docs),
        Ok(P::Other) => Ok(Intent::Other),
        Ok(P::Unspecified) => Err("is required: choose one of the INTENT_* values".into()),
        Err(_) => Err(format!("{value} is not a known Intent")),
    }
}

fn status(value: i32) -> Result<Option<Status>, String> {
    use pb::ConversationStatus as P;
    match P::try_from(value) {
        Ok(P::Unspecified) => Ok(None),
        Ok(P::Active) => Ok(Some(Status::Active)),
        Ok(P::Completed) => Ok(Some(Status::Completed)),
        Ok(P::Abandoned) => Ok(Some(Status::Abandoned)),
        Ok(P::Archived) => Ok(Some(Status::Archived)),
        Err(_) => Err(format!("{value} is not a known ConversationStatus")),
    }
}

fn metadata(map: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, String> {
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(format!(
            "has {} entries; at most {MAX_METADATA_ENTRIES} are allowed",
            map.len()
        ));
    }
    for (key, value) in map {
        if key.is_empty() {
            return Err("has an empty key".into());
        }
        let quoted = || clip(key, MAX_QUOTED_BYTES);
        text(key, MAX_METADATA_KEY_BYTES).map_err(|why| format!("key {:?} {why}", quoted()))?;
        text(value, MAX_METADATA_VALUE_BYTES)
            .map_err(|why| format!("value of {:?} {why}", quoted()))?;
    }
    Ok(map.clone())
}

fn effectiveness(score: Option<f64>) -> Result<Option<f64>, String> {
    match score {
        Some(s) if !(0.0..=1.0).contains(&s) => Err(format!("{s} is outside [0, 1]")),
        other => Ok(other),
    }
}

/// A protobuf timestamp as a UTC time in years 1 to 9999.
fn timestamp(ts: &prost_types::Timestamp) -> Result<DateTime<Utc>, String> {
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or("has nanos outside [0, 999999999]")?;
    DateTime::from_timestamp(ts.seconds, nanos)
        .filter(|t| (1..=9999).contains(&t.year()))
        .ok_or_else(|| "is outside years 1 to 9999".to_owned())
}

fn page_size(requested: i32, default: usize, max: usize) -> Result<usize, String> {
    match requested {
        n if n < 0 => Err(format!(
            "{n} is negative; use 0 for the default of {default}"
        )),
        0 => Ok(default),
        n => Ok((n as usize).min(max)),
    }
}

fn team(field: &str, name: &str, v: &mut Violations) -> Option<TeamId> {
    v.check(field, parse_team_name(name))
}

/// Parses an etag: the row version in double quotes, as [`etag_of`] writes it.
fn etag(value: &str) -> Result<Option<Version>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|v| *v > 0)
        .map(|v| Some(Version(v)))
        .ok_or_else(|| "is not an etag this service issued: pass it exactly as returned".into())
}

/// The etag of a row version.
pub fn etag_of(version: Version) -> String {
    format!("\"{}\"", version.0)
}

/// Reads the optional consistency token a read presents.
pub fn consistency_token(
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Option<ConsistencyToken>, ApiError> {
    ConsistencyToken::from_metadata(metadata).map_err(|e| {
        ApiError::invalid(
            format!("metadata[{}]", convoy_proto::consistency::HEADER),
            format!("{e}: pass the token exactly as a write returned it"),
        )
    })
}

fn fields_fingerprint(f: &ConversationFields) -> Fingerprint {
    let mut fp = Fingerprint::new()
        .with_str(&f.title)
        .with_str(f.intent.as_str())
        .with_str(f.status.as_str())
        .with_str(&f.content)
        .with_i64(f.metadata.len() as i64);
    for (k, v) in &f.metadata {
        fp = fp.with_str(k).with_str(v);
    }
    fp.with_i64(f.effectiveness_score.map_or(-1, |s| s.to_bits() as i64))
}

/// Validates CreateConversation.
pub fn create(req: &pb::CreateConversationRequest) -> Result<NewConversation, ApiError> {
    let mut v = Violations::default();
    let team = team("parent", &req.parent, &mut v);
    let fields = match &req.conversation {
        None => {
            v.add("conversation", "is required");
            None
        }
        Some(c) => {
            let title = v.check("conversation.title", title(&c.title));
            let intent = v.check("conversation.intent", intent(c.intent));
            let status = v.check("conversation.status", status(c.status));
            let content = v.check(
                "conversation.content",
                text(&c.content, MAX_CONTENT_BYTES).map(|()| c.content.clone()),
            );
            let metadata = v.check("conversation.metadata", metadata(&c.metadata));
            let score = v.check(
                "conversation.effectiveness_score",
                effectiveness(c.effectiveness_score),
            );
            match (title, intent, status, content, metadata, score) {
                (
                    Some(title),
                    Some(intent),
                    Some(status),
                    Some(content),
                    Some(metadata),
                    Some(score),
                ) => Some(ConversationFields {
                    title,
                    intent,
                    status: status.unwrap_or(Status::Active),
                    content,
                    metadata,
                    effectiveness_score: score,
                }),
                _ => None,
            }
        }
    };
    let chosen_id = if req.conversation_id.is_empty() {
        None
    } else {
        v.check(
            "conversation_id",
            parse_uuid(&req.conversation_id)
                .map(Some)
                .ok_or_else(|| "is not a UUID in canonical lowercase hyphenated form".to_owned()),
        )
        .flatten()
    };
    let request_id = if req.request_id.is_empty() {
        None
    } else {
        v.check(
            "request_id",
            Uuid::try_parse(&req.request_id)
                .map_err(|_| "is not a UUID: generate one per logical request".to_owned()),
        )
    };
    v.finish(|| {
        let team = team.expect("checked");
        let fields = fields.expect("checked");
        let request = request_id.map(|id| {
            let fp = fields_fingerprint(&fields)
                .with_str(&req.conversation_id)
                .finish();
            (id, fp.to_be_bytes())
        });
        NewConversation {
            name: ConversationName {
                team,
                id: chosen_id.unwrap_or_else(Uuid::now_v7),
            },
            fields,
            request,
        }
    })
}

/// Validates a conversation name in `field`.
pub fn conversation_name(field: &str, name: &str) -> Result<ConversationName, ApiError> {
    ConversationName::parse(name).map_err(|why| ApiError::invalid(field, why))
}

/// Validates BatchGetConversations: the team and the names, all under it.
pub fn batch_get(
    req: &pb::BatchGetConversationsRequest,
) -> Result<(TeamId, Vec<ConversationName>), ApiError> {
    let mut v = Violations::default();
    let team = team("parent", &req.parent, &mut v);
    if req.names.is_empty() {
        v.add("names", "is empty: name 1 to 100 conversations");
    }
    if req.names.len() > MAX_BATCH_GET {
        v.add(
            "names",
            format!(
                "has {} names; at most {MAX_BATCH_GET} are allowed",
                req.names.len()
            ),
        );
        return v.finish(|| unreachable!("has a violation"));
    }
    let mut names = Vec::with_capacity(req.names.len());
    for (i, name) in req.names.iter().enumerate() {
        let field = format!("names[{i}]");
        if let Some(parsed) = v.check(&field, ConversationName::parse(name)) {
            if team.as_ref().is_some_and(|t| *t != parsed.team) {
                v.add(field, format!("is not under parent {:?}", req.parent));
            } else {
                names.push(parsed);
            }
        }
    }
    v.finish(|| (team.expect("checked"), names))
}

fn list_fingerprint(team: &TeamId, f: &Filters) -> u64 {
    let time = |t: Option<DateTime<Utc>>| t.map_or(i64::MIN, |t| t.timestamp_micros());
    Fingerprint::new()
        .with_str("list")
        .with_str(team.as_str())
        .with_str(f.status.map_or("", Status::as_str))
        .with_str(f.intent.map_or("", Intent::as_str))
        .with_i64(time(f.created_from))
        .with_i64(time(f.created_until))
        .finish()
}

/// The fingerprint a List page token is bound to.
pub fn list_token_fingerprint(query: &ListQuery) -> u64 {
    list_fingerprint(&query.team, &query.filters)
}

fn optional_intent(value: i32) -> Result<Option<Intent>, String> {
    if value == pb::Intent::Unspecified as i32 {
        Ok(None)
    } else {
        intent(value).map(Some)
    }
}

fn page_token_error(e: PageTokenError) -> String {
    e.to_string()
}

/// Validates ListConversations.
pub fn list(req: &pb::ListConversationsRequest) -> Result<ListQuery, ApiError> {
    let mut v = Violations::default();
    let team = team("parent", &req.parent, &mut v);
    let page_size = v.check(
        "page_size",
        page_size(req.page_size, DEFAULT_LIST_PAGE_SIZE, MAX_LIST_PAGE_SIZE),
    );
    let status = v.check("status", status(req.status)).flatten();
    let intent = v.check("intent", optional_intent(req.intent)).flatten();
    let created_from = req
        .create_time_start
        .as_ref()
        .and_then(|t| v.check("create_time_start", timestamp(t)));
    let created_until = req
        .create_time_end
        .as_ref()
        .and_then(|t| v.check("create_time_end", timestamp(t)));
    if let (Some(from), Some(until)) = (created_from, created_until)
        && from > until
    {
        v.add("create_time_end", "is before create_time_start");
    }
    let filters = Filters {
        status,
        intent,
        created_from,
        created_until,
    };
    let cursor = match (&team, req.page_token.is_empty()) {
        (Some(team), false) => v.check(
            "page_token",
            page_token::decode(&req.page_token, list_fingerprint(team, &filters))
                .map_err(page_token_error)
                .and_then(|c| match c {
                    Cursor::List(c) => Ok(c),
                    _ => Err(PageTokenError::Mismatch.to_string()),
                }),
        ),
        _ => None,
    };
    v.finish(|| ListQuery {
        team: team.expect("checked"),
        filters,
        page_size: page_size.expect("checked"),
        cursor,
    })
}

fn search_fingerprint(team: &TeamId, query: &str, f: &Filters) -> u64 {
    Fingerprint::new()
        .with_str("search")
        .with_str(team.as_str())
        .with_str(query)
        .with_str(f.status.map_or("", Status::as_str))
        .with_str(f.intent.map_or("", Intent::as_str))
        .finish()
}

/// The fingerprint a Search page token is bound to.
pub fn search_token_fingerprint(query: &SearchQuery) -> u64 {
    search_fingerprint(&query.team, &query.query, &query.filters)
}

/// Validates SearchConversations.
pub fn search(req: &pb::SearchConversationsRequest) -> Result<SearchQuery, ApiError> {
    let mut v = Violations::default();
    let team = team("parent", &req.parent, &mut v);
    let query = v.check(
        "query",
        text(&req.query, MAX_QUERY_BYTES).and_then(|()| {
            if req.query.trim().is_empty() {
                Err("is required: give words to search for".to_owned())
            } else {
                Ok(req.query.clone())
            }
        }),
    );
    let page_size = v.check(
        "page_size",
        page_size(
            req.page_size,
            DEFAULT_SEARCH_PAGE_SIZE,
            MAX_SEARCH_PAGE_SIZE,
        ),
    );
    let filters = Filters {
        status: v.check("status", status(req.status)).flatten(),
        intent: v.check("intent", optional_intent(req.intent)).flatten(),
        ..Filters::default()
    };
    let cursor = match (&team, &query, req.page_token.is_empty()) {
        (Some(team), Some(query), false) => v.check(
            "page_token",
            page_token::decode(&req.page_token, search_fingerprint(team, query, &filters))
                .map_err(page_token_error)
                .and_then(|c| match c {
                    Cursor::Search(c) => Ok(c),
                    _ => Err(PageTokenError::Mismatch.to_string()),
                }),
        ),
        _ => None,
    };
    v.finish(|| SearchQuery {
        team: team.expect("checked"),
        query: query.expect("checked"),
        filters,
        page_size: page_size.expect("checked"),
        cursor,
    })
}

/// Fields an update may name.
const UPDATABLE: [&str; 6] = [
    "title",
    "intent",
    "status",
    "content",
    "metadata",
    "effectiveness_score",
];
/// Fields that exist but only the server sets.
const OUTPUT_ONLY: [&str; 11] = [
    "name",
    "message_count",
    "event_count",
    "duration",
    "token_usage",
    "create_time",
    "update_time",
    "first_event_time",
    "last_event_time",
    "version",
    "etag",
];

/// Validates UpdateConversation into the target, the patch and the expected version.
pub fn update(
    req: &pb::UpdateConversationRequest,
) -> Result<(ConversationName, ConversationPatch, Option<Version>), ApiError> {
    let mut v = Violations::default();
    let Some(c) = &req.conversation else {
        return Err(ApiError::invalid("conversation", "is required"));
    };
    let name = v.check("conversation.name", ConversationName::parse(&c.name));
    let expected = v.check("conversation.etag", etag(&c.etag)).flatten();

    // Which updatable fields the mask names, as flags in UPDATABLE's order: repeats and
    // `*` cost one pass over the paths, and each field is validated (its value copied)
    // once, however often it is named.
    let mut named = [false; UPDATABLE.len()];
    match &req.update_mask {
        Some(mask) if mask.paths.len() > MAX_UPDATE_MASK_PATHS => {
            v.add(
                "update_mask.paths",
                format!(
                    "has {} paths; at most {MAX_UPDATE_MASK_PATHS} are allowed (name each of \
                     {} at most once, or `*`)",
                    mask.paths.len(),
                    UPDATABLE.join(", ")
                ),
            );
            return v.finish(|| unreachable!("has a violation"));
        }
        Some(mask) if !mask.paths.is_empty() => {
            for (i, path) in mask.paths.iter().enumerate() {
                if path == "*" {
                    named = [true; UPDATABLE.len()];
                } else if let Some(at) = UPDATABLE.iter().position(|f| f == path) {
                    named[at] = true;
                } else if OUTPUT_ONLY.contains(&path.as_str()) {
                    v.add(
                        format!("update_mask.paths[{i}]"),
                        format!("{path:?} is output only and cannot be updated"),
                    );
                } else {
                    v.add(
                        format!("update_mask.paths[{i}]"),
                        format!(
                            "{:?} is not a field of Conversation; updatable: {}",
                            clip(path, MAX_QUOTED_BYTES),
                            UPDATABLE.join(", ")
                        ),
                    );
                }
            }
        }
        // AIP-134: no mask means every populated field.
        _ => {
            named = [
                !c.title.is_empty(),
                c.intent != 0,
                c.status != 0,
                !c.content.is_empty(),
                !c.metadata.is_empty(),
                c.effectiveness_score.is_some(),
            ];
        }
    }
    let mut patch = ConversationPatch::default();
    for (target, _) in UPDATABLE.iter().zip(named).filter(|(_, on)| *on) {
        match *target {
            "title" => patch.title = v.check("conversation.title", title(&c.title)),
            "intent" => patch.intent = v.check("conversation.intent", intent(c.intent)),
            "status" => {
                patch.status = v
                    .check("conversation.status", status(c.status))
                    .and_then(|s| {
                        s.or_else(|| {
                            v.add("conversation.status", "is required when it is in the mask");
                            None
                        })
                    })
            }
            "content" => {
                patch.content = v.check(
                    "conversation.content",
                    text(&c.content, MAX_CONTENT_BYTES).map(|()| c.content.clone()),
                )
            }
            "metadata" => patch.metadata = v.check("conversation.metadata", metadata(&c.metadata)),
            "effectiveness_score" => {
                patch.effectiveness_score = v.check(
                    "conversation.effectiveness_score",
                    effectiveness(c.effectiveness_score),
                )
            }
            _ => unreachable!("UPDATABLE lists only the fields above"),
        }
    }
    if v.0.is_empty() && patch.is_empty() {
        v.add("update_mask", "names no field to change");
    }
    v.finish(|| (name.expect("checked"), patch, expected))
}

/// Validates DeleteConversation.
pub fn delete(
    req: &pb::DeleteConversationRequest,
) -> Result<(ConversationName, Option<Version>), ApiError> {
    let mut v = Violations::default();
    let name = v.check("name", ConversationName::parse(&req.name));
    let expected = v.check("etag", etag(&req.etag)).flatten();
    v.finish(|| (name.expect("checked"), expected))
}

/// An event, its fields' paths made by `field` (only on error), and an upper bound of its
/// encoded size when the API repeats it.
fn event(
    e: &pb::ConversationEvent,
    field: impl Fn(&str) -> String,
    v: &mut Violations,
) -> Option<(NewEvent, usize)> {
    let kind = v.check_at(
        || field("kind"),
        match pb::EventKind::try_from(e.kind) {
            Ok(pb::EventKind::Message) => Ok(EventKind::Message),
            Ok(pb::EventKind::ToolCall) => Ok(EventKind::ToolCall),
            Ok(pb::EventKind::ToolResult) => Ok(EventKind::ToolResult),
            Ok(pb::EventKind::Error) => Ok(EventKind::Error),
            Ok(pb::EventKind::System) => Ok(EventKind::System),
            Ok(pb::EventKind::Raw) => Ok(EventKind::Raw),
            Ok(pb::EventKind::Unspecified) => Err("is required: choose one of EVENT_KIND_*".into()),
            Err(_) => Err(format!("{} is not a known EventKind", e.kind)),
        },
    );
    let role = v
        .check_at(
            || field("role"),
            match pb::Role::try_from(e.role) {
                Ok(pb::Role::Unspecified) => Ok(None),
                Ok(pb::Role::User) => Ok(Some(Role::User)),
                Ok(pb::Role::Assistant) => Ok(Some(Role::Assistant)),
                Ok(pb::Role::System) => Ok(Some(Role::System)),
                Ok(pb::Role::Tool) => Ok(Some(Role::Tool)),
                Err(_) => Err(format!("{} is not a known Role", e.role)),
            },
        )
        .flatten();
    let occurred_at = match &e.occur_time {
        None => {
            v.add(field("occur_time"), "is required");
            None
        }
        Some(t) => v.check_at(|| field("occur_time"), timestamp(t)),
    };
    let content = v.check_at(
        || field("content"),
        text(&e.content, MAX_EVENT_CONTENT_BYTES).map(|()| e.content.clone()),
    );
    let event_id = v.check_at(
        || field("event_id"),
        optional_text(&e.event_id, MAX_EVENT_ID_BYTES),
    );
    let parent = v.check_at(
        || field("parent_event_id"),
        optional_text(&e.parent_event_id, MAX_EVENT_ID_BYTES),
    );
    let tool_name = v.check_at(
        || field("tool_name"),
        optional_text(&e.tool_name, MAX_TOOL_NAME_BYTES),
    );
    let tool_call_id = v.check_at(
        || field("tool_call_id"),
        optional_text(&e.tool_call_id, MAX_EVENT_ID_BYTES),
    );
    let model = v.check_at(|| field("model"), optional_text(&e.model, MAX_MODEL_BYTES));
    let usage = e.token_usage.unwrap_or_default();
    let mut count =
        |name: &str, n: i64| v.check_at(|| field(&format!("token_usage.{name}")), token_count(n));
    let usage = (
        count("input_tokens", usage.input_tokens),
        count("output_tokens", usage.output_tokens),
        count(
            "cache_creation_input_tokens",
            usage.cache_creation_input_tokens,
        ),
        count("cache_read_input_tokens", usage.cache_read_input_tokens),
    );
    let raw_json = v.check_at(|| field("raw_json"), raw_json(&e.raw_json));
    let (Some(input), Some(output), Some(cache_creation), Some(cache_read)) = usage else {
        return None;
    };
    let (raw_json, stored_raw_bytes) = raw_json?.unzip();
    // The answer repeats the event with the raw JSON as stored (which may be longer than
    // sent: `1E2` comes back as `100.0`) and with its name and sequence.
    let echoed = e.encoded_len()
        + stored_raw_bytes
            .unwrap_or(0)
            .saturating_sub(e.raw_json.len())
        + ECHO_NAME_BYTES;
    let event = NewEvent {
        event_id: event_id?,
        parent_event_id: parent?,
        kind: kind?,
        role,
        occurred_at: occurred_at?,
        content: content?,
        tool_name: tool_name?,
        tool_call_id: tool_call_id?,
        is_error: e.is_error,
        model: model?,
        usage: TokenUsage {
            input,
            output,
            cache_creation,
            cache_read,
        },
        is_sidechain: e.is_sidechain,
        raw_json,
    };
    Some((event, echoed))
}

/// Bytes the server adds to an event it repeats: its name (`teams/{team}/conversations/
/// {uuid}/events/{sequence}`, at most 148 bytes) and sequence, with their framing.
const ECHO_NAME_BYTES: usize = 192;

/// One token count of one event: 0 to [`MAX_TOKENS_PER_EVENT`].
fn token_count(n: i64) -> Result<i64, String> {
    if n < 0 {
        Err(format!("is {n}; token counts are 0 or more"))
    } else if n > MAX_TOKENS_PER_EVENT {
        Err(format!(
            "is {n}; at most {MAX_TOKENS_PER_EVENT} tokens of a kind per event are allowed"
        ))
    } else {
        Ok(n)
    }
}

/// Counts the bytes written to it.
#[derive(Default)]
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raw JSON as stored, with the length it has when written back (compactly, as the API
/// returns it): both within [`MAX_EVENT_RAW_JSON_BYTES`].
fn raw_json(text: &str) -> Result<Option<(serde_json::Value, usize)>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > MAX_EVENT_RAW_JSON_BYTES {
        return Err(format!(
            "is {} bytes; at most {MAX_EVENT_RAW_JSON_BYTES} are allowed",
            text.len()
        ));
    }
    // jsonb cannot hold U+0000 in strings.
    if text.contains("\\u0000") {
        return Err("contains \\u0000, which cannot be stored".into());
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("is not valid JSON: {e}"))?;
    let mut stored = ByteCount::default();
    serde_json::to_writer(&mut stored, &value).map_err(|e| format!("cannot be stored: {e}"))?;
    if stored.0 > MAX_EVENT_RAW_JSON_BYTES {
        return Err(format!(
            "takes {} bytes as stored (numbers are written out in full); at most \
             {MAX_EVENT_RAW_JSON_BYTES} are allowed",
            stored.0
        ));
    }
    Ok(Some((value, stored.0)))
}

/// Validates AppendEvents: all events or none.
pub fn append(
    req: &pb::AppendEventsRequest,
) -> Result<(ConversationName, Vec<NewEvent>), ApiError> {
    let mut v = Violations::default();
    let name = v.check("parent", ConversationName::parse(&req.parent));
    if req.events.is_empty() {
        v.add("events", "is empty: append 1 to 500 events");
    }
    if req.events.len() > MAX_EVENTS_PER_BATCH {
        v.add(
            "events",
            format!(
                "has {} events; at most {MAX_EVENTS_PER_BATCH} per call are allowed",
                req.events.len()
            ),
        );
        return v.finish(|| unreachable!("has a violation"));
    }
    let events: Vec<Option<(NewEvent, usize)>> = req
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| event(e, |name| format!("events[{i}].{name}"), &mut v))
        .collect();
    let echoed: usize = events.iter().flatten().map(|(_, bytes)| bytes).sum();
    if echoed > MAX_APPEND_EVENTS_BYTES {
        v.add(
            "events",
            format!(
                "take {echoed} bytes as stored; at most {MAX_APPEND_EVENTS_BYTES} per call are \
                 allowed (the answer repeats them): append them in smaller batches"
            ),
        );
    }
    v.finish(|| {
        (
            name.expect("checked"),
            events.into_iter().map(|e| e.expect("checked").0).collect(),
        )
    })
}

/// Validates an ingestion stream's conversation declaration. A declaration without an
/// intent leaves the stored one (or makes `other`).
pub fn ingest_conversation(c: &pb::IngestConversation) -> Result<IngestConversation, ApiError> {
    let mut v = Violations::default();
    let name = v.check("conversation.name", ConversationName::parse(&c.name));
    let title = v.check("conversation.title", title(&c.title));
    let intent = if c.intent == pb::Intent::Unspecified as i32 {
        Some(None)
    } else {
        v.check("conversation.intent", intent(c.intent).map(Some))
    };
    let metadata = v.check("conversation.metadata", metadata(&c.metadata));
    v.finish(|| IngestConversation {
        name: name.expect("checked"),
        title: title.expect("checked"),
        intent: intent.expect("checked"),
        metadata: metadata.expect("checked"),
    })
}

/// Validates one ingested line: its conversation and its event. A line the client could
/// not parse (`raw_line`) becomes a RAW event when it is a JSON object with a `timestamp`
/// (its `uuid`, when it has one, is its event id, so a re-send is a no-op); anything else is
/// a violation of that line only.
pub fn ingest_line(line: &pb::IngestLine) -> Result<(ConversationName, NewEvent), ApiError> {
    let mut v = Violations::default();
    let name = v.check(
        "line.conversation",
        ConversationName::parse(&line.conversation),
    );
    let event = match (&line.event, line.raw_line.is_empty()) {
        (Some(e), true) => {
            event(e, |name| format!("line.event.{name}"), &mut v).map(|(event, _)| event)
        }
        (Some(_), false) => {
            v.add(
                "line",
                "carries both an event and a raw_line: send one of them",
            );
            None
        }
        (None, false) => v.check("line.raw_line", raw_line(&line.raw_line)),
        (None, true) => {
            v.add("line", "carries neither an event nor a raw_line");
            None
        }
    };
    v.finish(|| (name.expect("checked"), event.expect("checked")))
}

/// A raw source line as a RAW event; see [`ingest_line`].
fn raw_line(text: &str) -> Result<NewEvent, String> {
    let (value, _) = raw_json(text)?.ok_or("is empty")?;
    let serde_json::Value::Object(fields) = &value else {
        return Err("is JSON but not an object: a transcript line is one JSON object".into());
    };
    let occurred_at = match fields.get("timestamp") {
        Some(serde_json::Value::String(t)) => DateTime::parse_from_rfc3339(t)
            .map(|t| t.with_timezone(&Utc))
            .ok()
            .filter(|t| (1..=9999).contains(&t.year()))
            .ok_or_else(|| {
                format!(
                    "has a `timestamp` that is not an RFC 3339 time in years 1 to 9999: {:?}",
                    clip(t, MAX_QUOTED_BYTES)
                )
            })?,
        _ => {
            return Err("has no `timestamp` string: send it as an event with an occur_time".into());
        }
    };
    let event_id = match fields.get("uuid") {
        Some(serde_json::Value::String(id)) => optional_text(id, MAX_EVENT_ID_BYTES)
            .map_err(|why| format!("has a `uuid` that {why}"))?,
        _ => None,
    };
    Ok(NewEvent {
        event_id,
        parent_event_id: None,
        kind: EventKind::Raw,
        role: None,
        occurred_at,
        content: String::new(),
        tool_name: None,
        tool_call_id: None,
        is_error: false,
        model: None,
        usage: TokenUsage::default(),
        is_sidechain: false,
        raw_json: Some(value),
    })
}

fn events_fingerprint(name: &ConversationName, after: i64) -> u64 {
    Fingerprint::new()
        .with_str("events")
        .with_str(&name.to_string())
        .with_i64(after)
        .finish()
}

/// The fingerprint a ListEvents page token is bound to.
pub fn events_token_fingerprint(query: &EventsQuery, original_after: i64) -> u64 {
    events_fingerprint(&query.conversation, original_after)
}

/// Validates ListEvents; the page token, when present, moves `after_sequence` forward.
pub fn list_events(req: &pb::ListEventsRequest) -> Result<EventsQuery, ApiError> {
    let mut v = Violations::default();
    let name = v.check("parent", ConversationName::parse(&req.parent));
    let page_size = v.check(
        "page_size",
        page_size(
            req.page_size,
            DEFAULT_EVENTS_PAGE_SIZE,
            MAX_EVENTS_PAGE_SIZE,
        ),
    );
    if req.after_sequence < 0 {
        v.add(
            "after_sequence",
            "is negative; use 0 to start at the first event",
        );
    }
    let after = match (&name, req.page_token.is_empty()) {
        (Some(name), false) => v.check(
            "page_token",
            page_token::decode(
                &req.page_token,
                events_fingerprint(name, req.after_sequence),
            )
            .map_err(page_token_error)
            .and_then(|c| match c {
                Cursor::Events(seq) => Ok(seq),
                _ => Err(PageTokenError::Mismatch.to_string()),
            }),
        ),
        _ => None,
    };
    v.finish(|| EventsQuery {
        conversation: name.expect("checked"),
        after_sequence: after.unwrap_or(req.after_sequence),
        page_size: page_size.expect("checked"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "teams/acme/conversations/0190b3c4-5d6e-7f80-9a1b-2c3d4e5f6a7b";

    fn fields(error: ApiError) -> Vec<String> {
        match error {
            ApiError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("not INVALID_ARGUMENT: {other}"),
        }
    }

    fn update_with(paths: Vec<String>, content: &str) -> pb::UpdateConversationRequest {
        pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: NAME.into(),
                title: "t".into(),
                intent: pb::Intent::Debug as i32,
                status: pb::ConversationStatus::Completed as i32,
                content: content.into(),
                effectiveness_score: Some(0.5),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        }
    }

    fn event_with(f: impl FnOnce(&mut pb::ConversationEvent)) -> pb::ConversationEvent {
        let mut e = pb::ConversationEvent {
            kind: pb::EventKind::Message as i32,
            occur_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            content: "hello".into(),
            ..Default::default()
        };
        f(&mut e);
        e
    }

    fn append_of(events: Vec<pb::ConversationEvent>) -> pb::AppendEventsRequest {
        pb::AppendEventsRequest {
            parent: NAME.into(),
            events,
        }
    }

    #[test]
    fn a_mask_of_more_than_16_paths_is_refused_without_reading_them() {
        let huge = "x".repeat(1 << 20);
        let request = update_with(vec!["*".to_owned(); 400_000], &huge);
        let error = update(&request).unwrap_err();
        let status = error.into_status();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("has 400000 paths"),
            "{}",
            status.message()
        );
        assert_eq!(fields(update(&request).unwrap_err()), ["update_mask.paths"]);
        let at_limit = update_with(vec!["*".to_owned(); MAX_UPDATE_MASK_PATHS], "c");
        assert!(update(&at_limit).is_ok());
    }

    #[test]
    fn repeated_and_wildcard_paths_name_each_field_once() {
        let mut paths = vec!["*".to_owned(), "title".to_owned(), "*".to_owned()];
        paths.extend(["content", "content", "status"].map(str::to_owned));
        let (_, patch, _) = update(&update_with(paths, "body")).unwrap();
        assert_eq!(patch.title.as_deref(), Some("t"));
        assert_eq!(patch.content.as_deref(), Some("body"));
        assert_eq!(patch.status, Some(Status::Completed));
        assert_eq!(patch.intent, Some(Intent::Debug));
        assert_eq!(patch.effectiveness_score, Some(Some(0.5)));
        assert_eq!(patch.metadata, Some(BTreeMap::new()));
        // A field named twice with a bad value is one violation, not two.
        let bad = update_with(vec!["content".to_owned(); 2], "nul\0");
        assert_eq!(fields(update(&bad).unwrap_err()), ["conversation.content"]);
    }

    #[test]
    fn each_unknown_or_output_only_path_is_named() {
        let paths = ["title", "version", "nope"].map(str::to_owned).to_vec();
        assert_eq!(
            fields(update(&update_with(paths, "")).unwrap_err()),
            ["update_mask.paths[1]", "update_mask.paths[2]"]
        );
    }

    #[test]
    fn token_counts_from_0_to_a_billion_are_accepted() {
        let usage = |n| pb::TokenUsage {
            input_tokens: n,
            output_tokens: n,
            cache_creation_input_tokens: n,
            cache_read_input_tokens: n,
        };
        for n in [0, 1, MAX_TOKENS_PER_EVENT] {
            let request = append_of(vec![event_with(|e| e.token_usage = Some(usage(n)))]);
            let (_, events) = append(&request).unwrap();
            assert_eq!(events[0].usage.cache_read, n);
        }
    }

    #[test]
    fn token_counts_out_of_range_name_the_field() {
        let request = append_of(vec![
            event_with(|_| {}),
            event_with(|e| {
                e.token_usage = Some(pb::TokenUsage {
                    input_tokens: i64::MAX,
                    output_tokens: -1,
                    cache_creation_input_tokens: MAX_TOKENS_PER_EVENT + 1,
                    cache_read_input_tokens: i64::MIN,
                })
            }),
        ]);
        assert_eq!(
            fields(append(&request).unwrap_err()),
            [
                "events[1].token_usage.input_tokens",
                "events[1].token_usage.output_tokens",
                "events[1].token_usage.cache_creation_input_tokens",
                "events[1].token_usage.cache_read_input_tokens",
            ]
        );
        let line = pb::IngestLine {
            conversation: NAME.into(),
            event: Some(event_with(|e| {
                e.token_usage = Some(pb::TokenUsage {
                    input_tokens: i64::MAX,
                    ..Default::default()
                })
            })),
            ..Default::default()
        };
        assert_eq!(
            fields(ingest_line(&line).unwrap_err()),
            ["line.event.token_usage.input_tokens"]
        );
    }

    #[test]
    fn more_than_500_events_are_refused_with_one_violation() {
        let request = append_of(vec![event_with(|_| {}); MAX_EVENTS_PER_BATCH + 1]);
        assert_eq!(fields(append(&request).unwrap_err()), ["events"]);
        let request = append_of(vec![event_with(|_| {}); MAX_EVENTS_PER_BATCH]);
        assert_eq!(append(&request).unwrap().1.len(), MAX_EVENTS_PER_BATCH);
    }

    #[test]
    fn events_whose_answer_would_pass_2_5_mib_are_refused() {
        let big = |_| {
            event_with(|e| {
                e.content = "c".repeat(MAX_EVENT_CONTENT_BYTES);
                e.raw_json = format!("\"{}\"", "r".repeat(MAX_EVENT_RAW_JSON_BYTES - 2));
            })
        };
        let fits = append_of((0..4).map(big).collect());
        assert_eq!(append(&fits).unwrap().1.len(), 4);
        let too_many_bytes = append_of((0..6).map(big).collect());
        assert_eq!(fields(append(&too_many_bytes).unwrap_err()), ["events"]);
    }

    #[test]
    fn raw_json_is_bounded_as_stored_not_only_as_sent() {
        // `1E2` is stored and returned as `100.0`: half as long again.
        let items = vec!["1E2"; 60_000].join(",");
        let sent = format!("[{items}]");
        assert!(sent.len() <= MAX_EVENT_RAW_JSON_BYTES);
        let request = append_of(vec![event_with(|e| e.raw_json = sent)]);
        assert_eq!(
            fields(append(&request).unwrap_err()),
            ["events[0].raw_json"]
        );
        assert!(
            raw_json("{\"a\": [1, 2]}")
                .unwrap()
                .is_some_and(|(_, n)| n == 11)
        );
    }

    #[test]
    fn a_batch_get_of_more_than_100_names_is_refused_with_one_violation() {
        let request = pb::BatchGetConversationsRequest {
            parent: "teams/acme".into(),
            names: vec![NAME.to_owned(); MAX_BATCH_GET + 1],
        };
        assert_eq!(fields(batch_get(&request).unwrap_err()), ["names"]);
        let request = pb::BatchGetConversationsRequest {
            names: vec![NAME.to_owned(); MAX_BATCH_GET],
            ..request
        };
        assert_eq!(batch_get(&request).unwrap().1.len(), MAX_BATCH_GET);
    }

    #[test]
    fn metadata_of_more_than_64_entries_is_refused() {
        let mut request = update_with(vec!["metadata".into()], "");
        let c = request.conversation.as_mut().unwrap();
        c.metadata = (0..=MAX_METADATA_ENTRIES)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(
            fields(update(&request).unwrap_err()),
            ["conversation.metadata"]
        );
        let long_key = BTreeMap::from([("k".repeat(1 << 20), "v".to_owned())]);
        let why = metadata(&long_key).unwrap_err();
        assert!(
            why.len() < 200,
            "the key is quoted in full: {} bytes",
            why.len()
        );
    }

    #[test]
    fn raw_lines_with_times_outside_years_1_to_9999_are_refused() {
        for timestamp in ["0000-12-31T23:59:59Z", "not a time"] {
            let line = pb::IngestLine {
                conversation: NAME.into(),
                raw_line: format!("{{\"timestamp\": \"{timestamp}\"}}"),
                ..Default::default()
            };
            assert_eq!(fields(ingest_line(&line).unwrap_err()), ["line.raw_line"]);
        }
    }
}
