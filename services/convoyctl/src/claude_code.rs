//! Claude Code's transcripts as convoy conversations and events.
//!
//! Claude Code writes each session as JSON lines under
//! `~/.claude/projects/<encoded-project-path>/<session-id>.jsonl`: one object per line with
//! `type` (`user`, `assistant`, `system`, `summary`, and others such as
//! `file-history-snapshot`), `uuid`, `parentUuid`, `sessionId`, `timestamp`, `cwd`,
//! `gitBranch`, `version`, `isSidechain` and a `message` whose `content` is a string or
//! blocks (`text`, `thinking`, `tool_use`, `tool_result`).
//!
//! Reading takes two passes over the lines. [`Catalog::scan`] learns what a line alone does
//! not say: each session's title (its `summary`, or else its first prompt), project and
//! branch, its time span, which tool each `tool_use_id` named, and which line first carried
//! each assistant message's usage (Claude Code repeats one API response's `usage` on every
//! line of its blocks, so counting every line would count its tokens several times).
//! [`Catalog::convert`] then turns a line into events that are the same at every import,
//! whatever was imported before: event ids come from the line (`uuid`, or a hash of the
//! line when it has none), so re-importing is a no-op on the server.
//!
//! Mapping: a user's text is a MESSAGE of the user, each `tool_result` a TOOL_RESULT (with
//! the tool's name and `is_error`); an assistant's text is a MESSAGE, `thinking` a SYSTEM
//! event of the assistant (kept, not counted as a message), each `tool_use` a TOOL_CALL
//! (its input as content), all with the model; a `system` line a SYSTEM event (ERROR when
//! its level is `error`); a `summary` a SYSTEM event of the session it summarizes; any other
//! type a RAW event holding the line. A line that is not a JSON object goes to the server as
//! a raw line, which reports it.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use convoy_proto::v1 as pb;
use serde_json::Value;
use uuid::Uuid;

/// Longest event content the contract takes (256 KiB); longer text is cut with a marker.
const MAX_CONTENT_BYTES: usize = 256 << 10;
/// Longest raw JSON the contract takes (256 KiB); a longer unknown line keeps only its type.
const MAX_RAW_JSON_BYTES: usize = 256 << 10;
/// Longest title the contract takes, in bytes; prompts are cut to their first line first.
const MAX_TITLE_BYTES: usize = 200;
/// Longest metadata value the contract takes, in bytes.
const MAX_METADATA_VALUE_BYTES: usize = 4096;

/// An assistant message's usage, and the line that carries it.
#[derive(Clone, Debug, Default)]
struct Usage {
    line: String,
    tokens: pb::TokenUsage,
}

/// What the scan learned about one session.
#[derive(Clone, Debug, Default)]
pub struct Session {
    first_time: Option<DateTime<Utc>>,
    last_time: Option<DateTime<Utc>>,
    first_prompt: Option<(DateTime<Utc>, String)>,
    summary: Option<String>,
    cwd: Option<String>,
    branch: Option<String>,
    version: Option<String>,
    /// By assistant message id.
    usage: HashMap<String, Usage>,
    /// Tool names by tool_use id.
    tools: HashMap<String, String>,
}

impl Session {
    /// The title: the session's summary, else its first prompt's first line, else its id.
    pub fn title(&self, id: Uuid) -> String {
        let title = self
            .summary
            .as_deref()
            .or(self.first_prompt.as_ref().map(|(_, p)| p.as_str()))
            .and_then(|t| t.lines().map(str::trim).find(|l| !l.is_empty()))
            .map(|t| cut(t, MAX_TITLE_BYTES));
        title.unwrap_or_else(|| format!("Claude Code session {}", &id.to_string()[..8]))
    }

    /// Tokens of the session's assistant messages, each message counted once.
    pub fn tokens(&self) -> pb::TokenUsage {
        let mut sum = pb::TokenUsage::default();
        for usage in self.usage.values() {
            sum.input_tokens += usage.tokens.input_tokens;
            sum.output_tokens += usage.tokens.output_tokens;
            sum.cache_creation_input_tokens += usage.tokens.cache_creation_input_tokens;
            sum.cache_read_input_tokens += usage.tokens.cache_read_input_tokens;
        }
        sum
    }
}

/// Sessions as the scan has seen them; see the module docs.
#[derive(Debug, Default)]
pub struct Catalog {
    sessions: BTreeMap<Uuid, Session>,
    /// The session of each line uuid (summaries name the last line they cover).
    line_session: HashMap<String, Uuid>,
    /// Summaries by the uuid of the line they end at, in scan order.
    summaries: Vec<(String, String, Uuid)>,
}

/// One source line as ingestion requests.
#[derive(Debug, PartialEq)]
pub enum Converted {
    /// Events of a session, in the line's order.
    Events(Uuid, Vec<pb::ConversationEvent>),
    /// A line that is not a transcript object: the server reports it.
    Raw(String),
    /// A line with nothing to store, and why.
    Skipped(String),
}

/// The session a file's lines belong to when they do not say: its stem when that is a
/// UUID (Claude Code names files by session), else a UUID derived from the path.
pub fn file_session(path: &std::path::Path) -> Uuid {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    Uuid::try_parse(stem).unwrap_or_else(|_| {
        let hash = xxhash_rust::xxh3::xxh3_128(path.to_string_lossy().as_bytes());
        uuid::Builder::from_custom_bytes(hash.to_be_bytes()).into_uuid()
    })
}

fn string<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn time(value: &Value) -> Option<DateTime<Utc>> {
    string(value, "timestamp")
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    const MARK: &str = " …[cut]";
    let mut end = max - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

fn usage(message: &Value) -> Option<pb::TokenUsage> {
    let usage = message.get("usage")?;
    let count = |key: &str| usage.get(key).and_then(Value::as_i64).unwrap_or(0).max(0);
    Some(pb::TokenUsage {
        input_tokens: count("input_tokens"),
        output_tokens: count("output_tokens"),
        cache_creation_input_tokens: count("cache_creation_input_tokens"),
        cache_read_input_tokens: count("cache_read_input_tokens"),
    })
}

/// A prompt worth a title: typed by the engineer, not one of Claude Code's own notes.
fn prompt_text(message: &Value) -> Option<String> {
    let text = match message.get("content")? {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => return None,
    };
    let trimmed = text.trim();
    let note = [
        "<command-",
        "<local-command-",
        "Caveat:",
        "[Request interrupted",
    ]
    .iter()
    .any(|p| trimmed.starts_with(p));
    (!trimmed.is_empty() && !note).then(|| trimmed.to_owned())
}

/// A tool result's content as text.
fn result_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                Some(other) => format!("[{other}]"),
                None => String::new(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

impl Catalog {
    /// The sessions seen, by id.
    pub fn sessions(&self) -> &BTreeMap<Uuid, Session> {
        &self.sessions
    }

    /// The session `line` (of a file whose own session is `file`) belongs to.
    fn session_of(&self, value: &Value, file: Uuid) -> Uuid {
        if value.get("type").and_then(Value::as_str) == Some("summary") {
            return string(value, "leafUuid")
                .and_then(|leaf| self.line_session.get(leaf).copied())
                .unwrap_or(file);
        }
        string(value, "sessionId")
            .and_then(|s| Uuid::try_parse(s).ok())
            .unwrap_or(file)
    }

    /// Learns what `line` says about its session (first pass).
    pub fn scan(&mut self, file: Uuid, line: &str) {
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            return;
        };
        if !value.is_object() {
            return;
        }
        let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
        if kind == "summary" {
            if let (Some(leaf), Some(text)) =
                (string(&value, "leafUuid"), string(&value, "summary"))
            {
                self.summaries
                    .push((leaf.to_owned(), text.to_owned(), file));
            }
            return;
        }
        let id = self.session_of(&value, file);
        if let Some(uuid) = string(&value, "uuid") {
            self.line_session.insert(uuid.to_owned(), id);
        }
        let session = self.sessions.entry(id).or_default();
        let at = time(&value);
        if let Some(at) = at {
            session.first_time = Some(session.first_time.map_or(at, |t| t.min(at)));
            session.last_time = Some(session.last_time.map_or(at, |t| t.max(at)));
        }
        for (key, slot) in [
            ("cwd", &mut session.cwd),
            ("gitBranch", &mut session.branch),
            ("version", &mut session.version),
        ] {
            if slot.is_none() {
                *slot = string(&value, key).map(|v| cut(v, MAX_METADATA_VALUE_BYTES));
            }
        }
        let Some(message) = value.get("message") else {
            return;
        };
        let sidechain = value.get("isSidechain").and_then(Value::as_bool) == Some(true);
        let meta = value.get("isMeta").and_then(Value::as_bool) == Some(true);
        match kind {
            "user" if !sidechain && !meta => {
                if let (Some(at), Some(prompt)) = (at, prompt_text(message))
                    && session.first_prompt.as_ref().is_none_or(|(t, _)| at < *t)
                {
                    session.first_prompt = Some((at, prompt));
                }
            }
            "assistant" => {
                if let Some(Value::Array(blocks)) = message.get("content") {
                    for block in blocks {
                        if block.get("type").and_then(Value::as_str) == Some("tool_use")
                            && let (Some(id), Some(name)) =
                                (string(block, "id"), string(block, "name"))
                        {
                            session.tools.insert(id.to_owned(), name.to_owned());
                        }
                    }
                }
                if let (Some(message_id), Some(tokens), Some(line_id)) = (
                    string(message, "id"),
                    usage(message),
                    string(&value, "uuid"),
                ) {
                    // The first line carries the message's usage; the fullest figures win
                    // (a streamed response's later lines count more output).
                    let entry = session.usage.entry(message_id.to_owned()).or_insert(Usage {
                        line: line_id.to_owned(),
                        tokens,
                    });
                    if tokens.output_tokens > entry.tokens.output_tokens {
                        entry.tokens = tokens;
                    }
                }
            }
            _ => {}
        }
    }

    /// Attaches each summary to the session of the line it names (after scanning: the
    /// line may come later, or in another file). The last summary of a session wins.
    pub fn resolve_summaries(&mut self) {
        for (leaf, text, file) in &self.summaries {
            let id = self.line_session.get(leaf).copied().unwrap_or(*file);
            self.sessions.entry(id).or_default().summary = Some(text.clone());
        }
    }

    /// The conversation of `session` for team `team`, as an ingestion stream declares it.
    pub fn declaration(&self, team: &str, session: Uuid) -> pb::IngestConversation {
        let info = self.sessions.get(&session).cloned().unwrap_or_default();
        let mut metadata = BTreeMap::from([("source".to_owned(), "claude-code".to_owned())]);
        for (key, value) in [
            ("project", &info.cwd),
            ("branch", &info.branch),
            ("claude_code_version", &info.version),
        ] {
            if let Some(value) = value {
                metadata.insert(key.to_owned(), value.clone());
            }
        }
        pb::IngestConversation {
            name: conversation_name(team, session),
            title: info.title(session),
            intent: pb::Intent::Unspecified as i32,
            metadata,
        }
    }

    /// The events of `line` (second pass); see the module docs.
    pub fn convert(&self, file: Uuid, line: &str) -> Converted {
        let value = match serde_json::from_str::<Value>(line) {
            Ok(value) if value.is_object() => value,
            _ => return Converted::Raw(line.to_owned()),
        };
        let id = self.session_of(&value, file);
        let session = self.sessions.get(&id);
        let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
        // A line without a time of its own (a summary, a snapshot) sits at its session's
        // end (a summary) or start.
        let at = time(&value).or_else(|| {
            session.and_then(|s| {
                if kind == "summary" {
                    s.last_time
                } else {
                    s.first_time
                }
            })
        });
        let Some(at) = at else {
            return Converted::Skipped(format!(
                "a {kind:?} line without a timestamp, in a session without any"
            ));
        };
        let line_id = string(&value, "uuid")
            .map(str::to_owned)
            .unwrap_or_else(|| {
                format!("line:{:032x}", xxhash_rust::xxh3::xxh3_128(line.as_bytes()))
            });
        let base = pb::ConversationEvent {
            parent_event_id: string(&value, "parentUuid").unwrap_or("").to_owned(),
            occur_time: Some(timestamp(at)),
            is_sidechain: value.get("isSidechain").and_then(Value::as_bool) == Some(true),
            ..Default::default()
        };
        let message = value.get("message");
        let mut events: Vec<pb::ConversationEvent> = match (kind, message) {
            ("user", Some(message)) => user_events(message, &base, session),
            ("assistant", Some(message)) => {
                let model = string(message, "model").unwrap_or("").to_owned();
                let mut events = assistant_events(message, &base);
                for e in &mut events {
                    e.model.clone_from(&model);
                }
                // The message's usage, on its first line only.
                let counted = match string(message, "id") {
                    Some(message_id) => session
                        .and_then(|s| s.usage.get(message_id))
                        .filter(|u| u.line == line_id)
                        .map(|u| u.tokens),
                    None => usage(message),
                };
                if let Some(first) = events.first_mut() {
                    first.token_usage = counted;
                }
                events
            }
            ("system", _) => {
                let error = string(&value, "level") == Some("error");
                vec![pb::ConversationEvent {
                    kind: if error {
                        pb::EventKind::Error
                    } else {
                        pb::EventKind::System
                    } as i32,
                    role: pb::Role::System as i32,
                    is_error: error,
                    content: cut(
                        string(&value, "content")
                            .or(string(&value, "subtype"))
                            .unwrap_or(""),
                        MAX_CONTENT_BYTES,
                    ),
                    ..base.clone()
                }]
            }
            ("summary", _) => vec![pb::ConversationEvent {
                kind: pb::EventKind::System as i32,
                role: pb::Role::System as i32,
                content: cut(string(&value, "summary").unwrap_or(""), MAX_CONTENT_BYTES),
                ..base.clone()
            }],
            _ => Vec::new(),
        };
        if events.is_empty() {
            // A type (or a shape) this reader does not know: kept as it came.
            let raw_json = if line.len() <= MAX_RAW_JSON_BYTES {
                line.to_owned()
            } else {
                serde_json::json!({ "type": kind, "convoy_cut": line.len() }).to_string()
            };
            events.push(pb::ConversationEvent {
                kind: pb::EventKind::Raw as i32,
                raw_json,
                ..base
            });
        }
        for (k, event) in events.iter_mut().enumerate() {
            event.event_id = if k == 0 {
                line_id.clone()
            } else {
                format!("{line_id}:{k}")
            };
        }
        Converted::Events(id, events)
    }
}

/// `teams/{team}/conversations/{session}`.
pub fn conversation_name(team: &str, session: Uuid) -> String {
    format!("teams/{team}/conversations/{session}")
}

fn user_events(
    message: &Value,
    base: &pb::ConversationEvent,
    session: Option<&Session>,
) -> Vec<pb::ConversationEvent> {
    let text = |content: String| pb::ConversationEvent {
        kind: pb::EventKind::Message as i32,
        role: pb::Role::User as i32,
        content: cut(&content, MAX_CONTENT_BYTES),
        ..base.clone()
    };
    let blocks = match message.get("content") {
        Some(Value::String(s)) => return vec![text(s.clone())],
        Some(Value::Array(blocks)) => blocks,
        _ => return Vec::new(),
    };
    let mut events = Vec::new();
    let mut texts = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => texts.push(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_result") => {
                let call = string(block, "tool_use_id").unwrap_or("");
                events.push(pb::ConversationEvent {
                    kind: pb::EventKind::ToolResult as i32,
                    role: pb::Role::Tool as i32,
                    tool_call_id: call.to_owned(),
                    tool_name: session
                        .and_then(|s| s.tools.get(call))
                        .cloned()
                        .unwrap_or_default(),
                    is_error: block.get("is_error").and_then(Value::as_bool) == Some(true),
                    content: cut(&result_text(block.get("content")), MAX_CONTENT_BYTES),
                    ..base.clone()
                });
            }
            Some(other) => texts.push(if other == "image" { "[image]" } else { "" }),
            None => {}
        }
    }
    let joined = texts
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    if !joined.is_empty() {
        events.insert(0, text(joined));
    }
    events
}

fn assistant_events(message: &Value, base: &pb::ConversationEvent) -> Vec<pb::ConversationEvent> {
    let of = |kind: pb::EventKind, content: &str| pb::ConversationEvent {
        kind: kind as i32,
        role: pb::Role::Assistant as i32,
        content: cut(content, MAX_CONTENT_BYTES),
        ..base.clone()
    };
    let blocks = match message.get("content") {
        Some(Value::String(s)) => return vec![of(pb::EventKind::Message, s)],
        Some(Value::Array(blocks)) => blocks,
        _ => return Vec::new(),
    };
    let mut events = Vec::new();
    let mut texts = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => texts.push(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("thinking") => events.push(of(
                pb::EventKind::System,
                block.get("thinking").and_then(Value::as_str).unwrap_or(""),
            )),
            Some("tool_use") => events.push(pb::ConversationEvent {
                tool_name: string(block, "name").unwrap_or("").to_owned(),
                tool_call_id: string(block, "id").unwrap_or("").to_owned(),
                ..of(
                    pb::EventKind::ToolCall,
                    &block.get("input").map(Value::to_string).unwrap_or_default(),
                )
            }),
            _ => {}
        }
    }
    let joined = texts
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    if !joined.is_empty() {
        events.insert(0, of(pb::EventKind::Message, &joined));
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: &str = "6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5";

    fn catalog(lines: &[&str]) -> (Catalog, Uuid) {
        let file = Uuid::try_parse(SESSION).unwrap();
        let mut catalog = Catalog::default();
        for line in lines {
            catalog.scan(file, line);
        }
        catalog.resolve_summaries();
        (catalog, file)
    }

    fn events(catalog: &Catalog, file: Uuid, line: &str) -> Vec<pb::ConversationEvent> {
        match catalog.convert(file, line) {
            Converted::Events(_, events) => events,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn usage_repeated_over_a_responses_lines_counts_once() {
        let a = r#"{"type":"assistant","uuid":"a1","sessionId":"6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5","timestamp":"2026-11-01T10:00:00Z","message":{"id":"msg_1","model":"claude-x","content":[{"type":"thinking","thinking":"hm"}],"usage":{"input_tokens":10,"output_tokens":2}}}"#;
        let b = r#"{"type":"assistant","uuid":"a2","parentUuid":"a1","sessionId":"6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5","timestamp":"2026-11-01T10:00:01Z","message":{"id":"msg_1","model":"claude-x","content":[{"type":"tool_use","id":"t1","name":"Bash","input":{"command":"ls"}}],"usage":{"input_tokens":10,"output_tokens":7}}}"#;
        let (catalog, file) = catalog(&[a, b]);
        let first = events(&catalog, file, a);
        let second = events(&catalog, file, b);
        assert_eq!(first[0].token_usage.unwrap().output_tokens, 7);
        assert_eq!(first[0].token_usage.unwrap().input_tokens, 10);
        assert_eq!(second[0].token_usage, None);
        assert_eq!(second[0].kind, pb::EventKind::ToolCall as i32);
        assert_eq!(second[0].tool_name, "Bash");
        assert_eq!(second[0].content, r#"{"command":"ls"}"#);
        assert_eq!(second[0].model, "claude-x");
        assert_eq!(catalog.sessions()[&file].tokens().output_tokens, 7);
    }

    #[test]
    fn a_tool_result_takes_its_calls_name_even_when_it_comes_first() {
        let result = r#"{"type":"user","uuid":"u2","sessionId":"6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5","timestamp":"2026-11-01T10:00:02Z","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"boom","is_error":true}]}}"#;
        let call = r#"{"type":"assistant","uuid":"a2","sessionId":"6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5","timestamp":"2026-11-01T10:00:01Z","message":{"content":[{"type":"tool_use","id":"t1","name":"Read","input":{}}]}}"#;
        let (catalog, file) = catalog(&[result, call]);
        let events = events(&catalog, file, result);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, pb::EventKind::ToolResult as i32);
        assert_eq!(events[0].tool_name, "Read");
        assert!(events[0].is_error);
        assert_eq!(events[0].event_id, "u2");
    }

    #[test]
    fn the_title_is_the_summary_else_the_first_real_prompt() {
        let note = r#"{"type":"user","uuid":"u0","timestamp":"2026-11-01T09:59:00Z","message":{"content":"<command-name>/clear</command-name>"}}"#;
        let prompt = r#"{"type":"user","uuid":"u1","timestamp":"2026-11-01T10:00:00Z","cwd":"/src/app","gitBranch":"main","message":{"content":"Fix the flaky test\nin CI please"}}"#;
        let (plain, file) = catalog(&[note, prompt]);
        let declared = plain.declaration("acme", file);
        assert_eq!(declared.title, "Fix the flaky test");
        assert_eq!(declared.metadata["project"], "/src/app");
        assert_eq!(declared.metadata["branch"], "main");
        let summary = r#"{"type":"summary","summary":"Flaky CI test fixed","leafUuid":"u1"}"#;
        let (summarized, file) = catalog(&[summary, note, prompt]);
        assert_eq!(
            summarized.declaration("acme", file).title,
            "Flaky CI test fixed"
        );
        // The summary itself is kept at the session's end, with an id from its text.
        let events = events(&summarized, file, summary);
        assert_eq!(events[0].kind, pb::EventKind::System as i32);
        assert!(events[0].event_id.starts_with("line:"));
        assert_eq!(events[0].occur_time.unwrap().seconds, 1_793_527_200);
    }

    #[test]
    fn unknown_types_are_kept_raw_and_broken_lines_go_to_the_server() {
        let snapshot = r#"{"type":"file-history-snapshot","messageId":"m","snapshot":{}}"#;
        let prompt = r#"{"type":"user","uuid":"u1","timestamp":"2026-11-01T10:00:00Z","message":{"content":"hi"}}"#;
        let (catalog, file) = catalog(&[snapshot, prompt]);
        let raw = events(&catalog, file, snapshot);
        assert_eq!(raw[0].kind, pb::EventKind::Raw as i32);
        assert_eq!(raw[0].raw_json, snapshot);
        assert_eq!(
            catalog.convert(file, "{not json"),
            Converted::Raw("{not json".into())
        );
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let long = "é".repeat(200);
        let cut = cut(&long, 101);
        assert!(cut.len() <= 101, "{}", cut.len());
        assert!(cut.ends_with("[cut]"));
    }
}
