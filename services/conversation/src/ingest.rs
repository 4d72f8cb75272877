//! IngestService: transcripts in, idempotently by the source's own event ids.
//!
//! A client streams conversation declarations and source lines. Each message is validated
//! as it arrives: a bad line becomes a [`pb::LineError`] and the rest of the stream still
//! lands. Valid lines are stored in batches: at most [`MAX_EVENTS_PER_BATCH`] lines or
//! [`MAX_BATCH_BYTES`], or whatever has arrived once the stream pauses for [`FLUSH_AFTER`]
//! (a `convoyctl import --follow` stream trickles, and its lines must not wait for more).
//! So a stream of any length holds one batch in memory. A batch declares its
//! conversations first, then appends each conversation's lines in one transaction (the
//! store's AppendEvents: counters exact, duplicates by event id skipped), placed parent
//! before child and otherwise by time. Each batch runs on a detached task, so a client
//! that goes away mid-batch never cancels a transaction half-way.
//!
//! A failure of the store (a shard down, a deadline) ends the stream with its status:
//! what was stored before stays stored, and the client sends the stream again (every line
//! it had sent is then skipped as a duplicate or stored, never twice). So does an error of
//! the stream itself, which the server's layers raise (`convoy_mesh::streams`): no message
//! for the idle timeout (DEADLINE_EXCEEDED), the stream's maximum lifetime (UNAVAILABLE),
//! its token's expiry or key's removal (UNAUTHENTICATED), a message that trickles in
//! (`convoy_auth`'s read timeout). Lines of the batch not yet stored then are dropped, never
//! stored without the rights they came with; a batch already on its way completes.
//!
//! An open stream holds at most one batch, so what the instance holds for ingestion is at
//! most [`MAX_BATCH_BYTES`] (plus the message being decoded) times the streams it admits
//! (`--max-streams`, and `--max-streams-per-team` for one team).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use convoy_proto::errors::{self, clip};
use convoy_proto::v1 as pb;
use convoy_proto::v1::ingest_service_server::IngestService;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ApiError;
use crate::limits::MAX_EVENTS_PER_BATCH;
use crate::model::{IngestConversation, NewEvent};
use crate::names::ConversationName;
use crate::sampler::Sampler;
use crate::store::ConversationStore;
use crate::validate;

/// A batch is stored once the stream has paused this long.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// A batch is stored once its lines' encoded sizes reach this: 1 MiB. What one open stream
/// holds; large enough that a batch of [`MAX_EVENTS_PER_BATCH`] ordinary lines (a few KiB
/// each) is bounded by its count, small enough that 1024 streams hold about 1 GiB.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Most line errors one response lists (`rejected_count` counts them all).
pub const MAX_REPORTED_ERRORS: usize = 1000;
/// Longest source of a listed line error, in bytes: 256, room for a file path and a line
/// number. With the field and description clipped as every status's are, 1000 errors
/// take well under 1 MiB.
pub const MAX_SOURCE_BYTES: usize = 256;

/// The IngestService implementation.
#[derive(Clone, Debug)]
pub struct IngestApi {
    store: Arc<ConversationStore>,
    sampler: Option<Arc<Sampler>>,
}

impl IngestApi {
    /// A service storing through `store`.
    pub fn new(store: Arc<ConversationStore>) -> Self {
        Self {
            store,
            sampler: None,
        }
    }

    /// Hands every write to `sampler` (the consistency sampler), as the conversation API
    /// does.
    pub fn with_sampler(mut self, sampler: Option<Arc<Sampler>>) -> Self {
        self.sampler = sampler;
        self
    }
}

/// Lines and declarations waiting to be stored.
#[derive(Default)]
struct Batch {
    /// In arrival order; a later declaration of the same conversation follows the earlier.
    declared: Vec<IngestConversation>,
    /// Each conversation's lines (source, event), conversations in order of first line.
    lines: Vec<(ConversationName, Vec<(String, NewEvent)>)>,
    index: HashMap<ConversationName, usize>,
    count: usize,
    bytes: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.declared.is_empty() && self.count == 0
    }

    fn is_full(&self) -> bool {
        self.count >= MAX_EVENTS_PER_BATCH || self.bytes >= MAX_BATCH_BYTES
    }

    fn push(&mut self, name: ConversationName, source: String, event: NewEvent, bytes: usize) {
        let at = *self.index.entry(name.clone()).or_insert_with(|| {
            self.lines.push((name, Vec::new()));
            self.lines.len() - 1
        });
        self.lines[at].1.push((source, event));
        self.count += 1;
        self.bytes += bytes;
    }
}

/// What a stream has done so far.
#[derive(Debug, Default)]
struct Report {
    stored: i64,
    duplicates: i64,
    rejected: i64,
    errors: Vec<pb::LineError>,
    /// Conversations written, with the versions their writes made (for the sampler).
    written: Vec<(ConversationName, i64)>,
}

impl Report {
    fn reject(&mut self, source: &str, field: &str, description: String) {
        self.rejected += 1;
        metrics::counter!("convoy_ingest_lines_total", "outcome" => "rejected").increment(1);
        self.list(source, field, &description);
    }

    /// Lists an error, while fewer than [`MAX_REPORTED_ERRORS`] are, each part clipped (the
    /// source to [`MAX_SOURCE_BYTES`]) so the answer stays bounded whatever the lines held.
    fn list(&mut self, source: &str, field: &str, description: &str) {
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(pb::LineError {
                source: clip(source, MAX_SOURCE_BYTES).into_owned(),
                field: clip(field, errors::MAX_FIELD_BYTES).into_owned(),
                description: clip(description, errors::MAX_DESCRIPTION_BYTES).into_owned(),
            });
        }
    }

    /// A line (or declaration) refused by validation or the store: one error per field.
    fn refuse(&mut self, source: &str, error: ApiError) {
        match error {
            ApiError::InvalidArgument(violations) => {
                // One line, one rejection, however many of its fields are wrong.
                let mut violations = violations.into_iter();
                if let Some(first) = violations.next() {
                    self.reject(source, &first.field, first.description);
                }
                for more in violations.take(errors::MAX_REPORTED_VIOLATIONS - 1) {
                    self.list(source, &more.field, &more.description);
                }
            }
            other => self.reject(source, "line", other.to_string()),
        }
    }

    /// Adds a batch's report (its rejections counted there already).
    fn add(&mut self, batch: Report) {
        self.stored += batch.stored;
        self.duplicates += batch.duplicates;
        self.rejected += batch.rejected;
        let room = MAX_REPORTED_ERRORS.saturating_sub(self.errors.len());
        self.errors.extend(batch.errors.into_iter().take(room));
    }

    fn into_response(self) -> pb::IngestEventsResponse {
        pb::IngestEventsResponse {
            stored_count: self.stored,
            duplicate_count: self.duplicates,
            errors: self.errors,
            rejected_count: self.rejected,
        }
    }
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn ingest_events(
        &self,
        request: Request<Streaming<pb::IngestEventsRequest>>,
    ) -> Result<Response<pb::IngestEventsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut batch = Batch::default();
        let mut report = Report::default();
        loop {
            // `Streaming::message` keeps its state in the stream: a timed-out wait loses
            // nothing.
            let next = if batch.is_empty() {
                stream.message().await?
            } else {
                match tokio::time::timeout(FLUSH_AFTER, stream.message()).await {
                    Ok(next) => next?,
                    Err(_) => {
                        report.add(self.store(std::mem::take(&mut batch)).await?);
                        continue;
                    }
                }
            };
            let Some(message) = next else { break };
            accept(message, &mut batch, &mut report);
            if batch.is_full() {
                report.add(self.store(std::mem::take(&mut batch)).await?);
            }
        }
        if !batch.is_empty() {
            report.add(self.store(batch).await?);
        }
        Ok(Response::new(report.into_response()))
    }
}

/// Validates one message of the stream into the batch, or reports it.
fn accept(message: pb::IngestEventsRequest, batch: &mut Batch, report: &mut Report) {
    match message.item {
        Some(pb::ingest_events_request::Item::Conversation(c)) => {
            match validate::ingest_conversation(&c) {
                Ok(declared) => batch.declared.push(declared),
                Err(e) => report.refuse(&c.name, e),
            }
        }
        Some(pb::ingest_events_request::Item::Line(line)) => match validate::ingest_line(&line) {
            Ok((name, event)) => {
                let bytes = line.encoded_len();
                batch.push(name, line.source, event, bytes);
            }
            Err(e) => report.refuse(&line.source, e),
        },
        None => report.reject(
            "",
            "item",
            "is empty: send a conversation or a line".to_owned(),
        ),
    }
}

impl IngestApi {
    /// Stores `batch` on a detached task (see the module docs).
    async fn store(&self, batch: Batch) -> Result<Report, Status> {
        let store = self.store.clone();
        match tokio::spawn(store_batch(store, batch)).await {
            Ok(Ok(mut report)) => {
                if let Some(sampler) = &self.sampler {
                    for (name, version) in report.written.drain(..) {
                        sampler.observe(&name, version);
                    }
                }
                Ok(report)
            }
            Ok(Err(e)) => Err(e.into_status()),
            Err(e) => Err(ApiError::Internal(format!("ingest task failed: {e}")).into_status()),
        }
    }
}

async fn store_batch(store: Arc<ConversationStore>, batch: Batch) -> Result<Report, ApiError> {
    let mut report = Report::default();
    for declared in &batch.declared {
        match store.declare(declared).await {
            Ok(Some(written)) => report
                .written
                .push((declared.name.clone(), written.version.0)),
            Ok(None) => {}
            // Refused for what it declares (metadata past its limit once merged): that
            // declaration only; the stream goes on.
            Err(e @ ApiError::InvalidArgument(_)) => report.refuse(&declared.name.to_string(), e),
            Err(e) => return Err(e),
        }
    }
    for (name, lines) in batch.lines {
        let (sources, events): (Vec<String>, Vec<NewEvent>) = place(lines).into_iter().unzip();
        match store.append_events(&name, events).await {
            Ok(written) => {
                let stored = written.value.events.len() as u64;
                let duplicates = written.value.duplicates as u64;
                metrics::counter!("convoy_ingest_lines_total", "outcome" => "stored")
                    .increment(stored);
                metrics::counter!("convoy_ingest_lines_total", "outcome" => "duplicate")
                    .increment(duplicates);
                report.stored += stored as i64;
                report.duplicates += duplicates as i64;
                if stored > 0 {
                    report
                        .written
                        .push((name.clone(), written.value.conversation.version.0));
                }
            }
            Err(ApiError::NotFound(_)) => {
                for source in sources {
                    report.reject(
                        &source,
                        "line.conversation",
                        format!(
                            "{name} does not exist: declare it with a `conversation` message \
                             before its lines"
                        ),
                    );
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// Orders one conversation's lines for storing: by time, except that a line whose parent
/// is in the same batch comes after it (a transcript's lines may arrive out of order, and
/// a reply must not precede what it answers). Stable: equal times keep arrival order.
/// Linear apart from the sort; a parent cycle (malformed input) is cut where it closes.
fn place<S>(lines: Vec<(S, NewEvent)>) -> Vec<(S, NewEvent)> {
    let n = lines.len();
    let mut by_time: Vec<usize> = (0..n).collect();
    by_time.sort_by_key(|&i| (lines[i].1.occurred_at, i));
    let index: HashMap<&str, usize> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, (_, e))| e.event_id.as_deref().map(|id| (id, i)))
        .collect();
    let parent = |i: usize| {
        lines[i]
            .1
            .parent_event_id
            .as_deref()
            .and_then(|p| index.get(p).copied())
    };
    let mut placed = vec![false; n];
    let mut order = Vec::with_capacity(n);
    let mut chain = Vec::new();
    for &i in &by_time {
        // Climb to the oldest ancestor not yet placed, then place the chain down to `i`.
        let mut at = Some(i);
        while let Some(j) = at.filter(|&j| !placed[j]) {
            placed[j] = true;
            chain.push(j);
            at = parent(j);
        }
        order.extend(chain.drain(..).rev());
    }
    drop(index);
    let mut slots: Vec<Option<(S, NewEvent)>> = lines.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|i| slots[i].take().expect("each line placed once"))
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone, Utc};

    use super::*;
    use crate::model::{EventKind, TokenUsage};

    fn line(id: &str, parent: Option<&str>, second: i64) -> (String, NewEvent) {
        (
            id.to_owned(),
            NewEvent {
                event_id: Some(id.to_owned()),
                parent_event_id: parent.map(str::to_owned),
                kind: EventKind::Message,
                role: None,
                occurred_at: at(second),
                content: String::new(),
                tool_name: None,
                tool_call_id: None,
                is_error: false,
                model: None,
                usage: TokenUsage::default(),
                is_sidechain: false,
                raw_json: None,
            },
        )
    }

    fn at(second: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + second, 0).unwrap()
    }

    fn order(lines: Vec<(String, NewEvent)>) -> Vec<String> {
        place(lines).into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn lines_are_placed_by_time() {
        let lines = vec![line("c", None, 3), line("a", None, 1), line("b", None, 2)];
        assert_eq!(order(lines), ["a", "b", "c"]);
    }

    #[test]
    fn a_parent_precedes_its_child_whatever_their_times() {
        // b answers a, but its clock said earlier; c is unrelated and in between.
        let lines = vec![
            line("b", Some("a"), 1),
            line("c", None, 2),
            line("a", None, 3),
            line("d", Some("b"), 0),
        ];
        assert_eq!(order(lines), ["a", "b", "d", "c"]);
    }

    #[test]
    fn equal_times_keep_arrival_order_and_a_cycle_does_not_hang() {
        let lines = vec![
            line("x", Some("y"), 5),
            line("y", Some("x"), 5),
            line("z", None, 5),
        ];
        let placed = order(lines);
        assert_eq!(placed.len(), 3);
        assert_eq!(placed[2], "z");
    }

    #[test]
    fn a_parent_outside_the_batch_changes_nothing() {
        let lines = vec![line("b", Some("gone"), 2), line("a", None, 1)];
        assert_eq!(order(lines), ["a", "b"]);
    }
}
