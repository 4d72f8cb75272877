//! WatchService: conversations' events and teams' changes, live, fed by the invalidation
//! bus rather than by polling Postgres per watcher.
//!
//! One task per instance follows the bus (the same Redis stream the caches are kept
//! coherent by). A change to a conversation somebody watches makes its *feed* read the new
//! events from the primary once, after the last sequence it has, and broadcast them to every
//! watcher of that conversation; a change to a team somebody watches goes to the team's
//! watchers as it is. So N watchers of a conversation cost one read per write, not N.
//!
//! A watcher first subscribes to its feed, then reads from Postgres what it asked to resume
//! after, then forwards the feed from there, skipping what it already sent: every event
//! exactly once and in sequence order, a gap (should one appear) filled from Postgres.
//!
//! Memory is bounded: a feed keeps the last [`FEED_CAPACITY`] events, shared by its
//! watchers, and a watcher holds at most [`WATCHER_BUFFER`] messages on their way to its
//! client. A watcher that falls further behind (its client reads too slowly) is sent
//! `FellBehind` with the sequence to resume after, and its stream ends. A team watcher that
//! falls behind, or whose instance may have missed bus messages (a gap in the bus's
//! numbering, a Redis restart), is told the same: it re-lists and watches again.
//!
//! A watch is a stream like any other to the server's layers (`convoy_mesh::streams`): it
//! counts against its team's and the instance's stream limits, and ends at its maximum
//! lifetime (UNAVAILABLE, reason `STREAM_LIFETIME`), its deadline, or when its token
//! expires or its key is removed (UNAUTHENTICATED). Ending it drops the stream this module
//! returned, which ends its task and unsubscribes it. A conversation's watcher resumes after
//! the last sequence it received and loses nothing (the SDK's `WatchClient` does so by
//! itself); a team's watcher re-lists, as after `FellBehind`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_cache::l2::L2;
use convoy_proto::v1 as pb;
use convoy_proto::v1::watch_service_server::WatchService;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::error::ApiError;
use crate::model::EventsQuery;
use crate::names::{ConversationName, TeamId, parse_team_name};
use crate::store::{ConversationStore, ReadAt};
use crate::wire;

/// Events a conversation's feed keeps for watchers that are behind (shared by them all).
pub const FEED_CAPACITY: usize = 256;
/// Changes a team's feed keeps for watchers that are behind.
pub const TEAM_FEED_CAPACITY: usize = 1024;
/// Messages a watcher holds on their way to its client.
pub const WATCHER_BUFFER: usize = 32;
/// Events read from Postgres per page, catching up.
const PAGE: usize = 500;
/// Bus messages read per poll.
const BUS_BATCH: usize = 512;

/// What a team's watchers hear.
#[derive(Clone, Debug)]
enum TeamItem {
    Change(pb::ConversationChange),
    /// The instance may have missed changes: re-list.
    Lost,
}

/// One watched conversation: its broadcast and the last sequence it has read.
#[derive(Debug)]
struct Feed {
    tx: broadcast::Sender<Arc<pb::ConversationEvent>>,
    /// The last sequence read and broadcast; the lock serializes reads.
    last: tokio::sync::Mutex<i64>,
    /// A read is scheduled and has not started: further changes need no other (so a burst
    /// of writes costs at most one waiting read per feed, never a task per write).
    scheduled: AtomicBool,
}

/// The feeds of this instance's watchers.
#[derive(Debug)]
pub struct WatchHub {
    store: Arc<ConversationStore>,
    conversations: Mutex<HashMap<ConversationName, Arc<Feed>>>,
    teams: Mutex<HashMap<TeamId, broadcast::Sender<TeamItem>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WatchHub {
    /// A hub reading events from `store`; [`follow_bus`] feeds it.
    pub fn new(store: Arc<ConversationStore>) -> Arc<Self> {
        Arc::new(Self {
            store,
            conversations: Mutex::new(HashMap::new()),
            teams: Mutex::new(HashMap::new()),
        })
    }

    /// Subscribes to `name`'s feed, made at `from` (the sequence it has) if it is new.
    fn subscribe(
        &self,
        name: &ConversationName,
        from: i64,
    ) -> broadcast::Receiver<Arc<pb::ConversationEvent>> {
        lock(&self.conversations)
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(Feed {
                    tx: broadcast::channel(FEED_CAPACITY).0,
                    last: tokio::sync::Mutex::new(from),
                    scheduled: AtomicBool::new(false),
                })
            })
            .tx
            .subscribe()
    }

    /// Forgets `name`'s feed once nobody watches it.
    fn unsubscribe(&self, name: &ConversationName) {
        let mut feeds = lock(&self.conversations);
        if feeds.get(name).is_some_and(|f| f.tx.receiver_count() == 0) {
            feeds.remove(name);
        }
    }

    fn subscribe_team(&self, team: &TeamId) -> broadcast::Receiver<TeamItem> {
        lock(&self.teams)
            .entry(team.clone())
            .or_insert_with(|| broadcast::channel(TEAM_FEED_CAPACITY).0)
            .subscribe()
    }

    fn unsubscribe_team(&self, team: &TeamId) {
        let mut teams = lock(&self.teams);
        if teams.get(team).is_some_and(|t| t.receiver_count() == 0) {
            teams.remove(team);
        }
    }

    /// Reads `name`'s events after the feed's last sequence and broadcasts them.
    async fn refresh(&self, name: &ConversationName) {
        let Some(feed) = lock(&self.conversations).get(name).cloned() else {
            return;
        };
        let mut last = feed.last.lock().await;
        // From here on, a change needs a read of its own (this one may miss it).
        feed.scheduled.store(false, Ordering::SeqCst);
        loop {
            let page = match read(&self.store, name, *last).await {
                Ok(page) => page,
                Err(e) => {
                    // The next change retries; watchers fill gaps themselves.
                    tracing::warn!(conversation = %name, error = %e, "watch feed read failed");
                    return;
                }
            };
            let more = page.len() == PAGE;
            for event in page {
                *last = event.sequence;
                // No receiver: nobody watches; the feed goes when its last watcher does.
                let _ = feed.tx.send(Arc::new(event));
            }
            if !more {
                return;
            }
        }
    }

    /// Every feed reads again, and team watchers are told to re-list: changes may have
    /// been missed.
    async fn lost(&self) {
        let names: Vec<ConversationName> = lock(&self.conversations).keys().cloned().collect();
        for name in names {
            self.refresh(&name).await;
        }
        for tx in lock(&self.teams).values() {
            let _ = tx.send(TeamItem::Lost);
        }
    }

    /// Applies one bus message.
    async fn changed(self: &Arc<Self>, message: &convoy_cache::BusMessage) {
        let Some((team, id)) = parse_key(&message.key) else {
            return;
        };
        let Ok(team) = TeamId::parse(team) else {
            return;
        };
        let name = ConversationName { team, id };
        if let Some(tx) = lock(&self.teams).get(&name.team) {
            let _ = tx.send(TeamItem::Change(change(&name, message)));
        }
        let feed = lock(&self.conversations).get(&name).cloned();
        if let Some(feed) = feed
            && matches!(message.kind.as_str(), "events_appended" | "")
            && !feed.scheduled.swap(true, Ordering::SeqCst)
        {
            let hub = self.clone();
            tokio::spawn(async move { hub.refresh(&name).await });
        }
    }
}

/// `conv:{team}:{id}`, the cache key the bus names a conversation by.
fn parse_key(key: &str) -> Option<(&str, Uuid)> {
    let rest = key.strip_prefix("conv:")?;
    let (team, id) = rest.rsplit_once(':')?;
    Some((team, Uuid::try_parse(id).ok()?))
}

fn change(name: &ConversationName, message: &convoy_cache::BusMessage) -> pb::ConversationChange {
    use pb::conversation_change::Kind;
    let kind = match message.kind.as_str() {
        "created" => Kind::Created,
        "updated" => Kind::Updated,
        "deleted" => Kind::Deleted,
        "events_appended" => Kind::EventsAppended,
        _ => Kind::Unspecified,
    };
    let micros = message.written_at_us;
    pb::ConversationChange {
        name: name.to_string(),
        kind: kind as i32,
        version: message.version.0,
        commit_time: (micros > 0).then(|| prost_types::Timestamp {
            seconds: micros.div_euclid(1_000_000),
            nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
        }),
    }
}

/// One page of `name`'s events after `after`, from the primary (a watcher must not miss
/// what a lagging replica has not replayed).
async fn read(
    store: &ConversationStore,
    name: &ConversationName,
    after: i64,
) -> Result<Vec<pb::ConversationEvent>, ApiError> {
    let query = EventsQuery {
        conversation: name.clone(),
        after_sequence: after,
        page_size: PAGE,
    };
    let page = store.list_events(&query, &ReadAt::Primary).await?;
    Ok(page
        .items
        .into_iter()
        .map(|e| wire::event(name, e))
        .collect())
}

/// Follows the bus from its end, handing each message to `hub`, until dropped. Polls every
/// `poll` while idle (the bus is Redis's, so this is no load on Postgres).
pub async fn follow_bus(hub: Arc<WatchHub>, bus: L2, poll: Duration) {
    let mut at: Option<(String, Option<convoy_cache::bus::StreamId>, u64)> = None;
    loop {
        let Some((run_id, after, seq)) = at.clone() else {
            match bus.bus_extent().await {
                Ok(extent) => {
                    let (last, seq) = extent
                        .stream
                        .map_or((None, 0), |s| (Some(s.last), s.last_seq));
                    at = Some((extent.run_id, last, seq));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch: cannot reach the bus; retrying");
                    tokio::time::sleep(poll.max(Duration::from_millis(500))).await;
                }
            }
            continue;
        };
        let from = after.map_or_else(|| "0".to_owned(), |id| id.to_string());
        match bus.read_bus(&from, BUS_BATCH).await {
            Ok(read) if read.is_empty() => {
                // A restarted Redis starts a new stream: what it lost, we may have missed.
                if let Ok(extent) = bus.bus_extent().await
                    && extent.run_id != run_id
                {
                    hub.lost().await;
                    at = None;
                    continue;
                }
                tokio::time::sleep(poll).await;
            }
            Ok(read) => {
                let mut seq = seq;
                let mut last = after;
                for received in read {
                    if let Some(n) = received.seq {
                        if seq != 0 && n != seq + 1 {
                            hub.lost().await;
                        }
                        seq = n;
                    }
                    last = Some(received.id);
                    if let Some(message) = &received.message {
                        hub.changed(message).await;
                    }
                }
                at = Some((run_id, last, seq));
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch: reading the bus failed; retrying");
                tokio::time::sleep(poll.max(Duration::from_millis(500))).await;
            }
        }
    }
}

/// The WatchService implementation.
#[derive(Clone, Debug)]
pub struct WatchApi {
    hub: Option<Arc<WatchHub>>,
}

impl WatchApi {
    /// Watches through `hub`; without one (no bus configured) every watch is UNAVAILABLE.
    pub fn new(hub: Option<Arc<WatchHub>>) -> Self {
        Self { hub }
    }

    fn hub(&self) -> Result<&Arc<WatchHub>, Status> {
        self.hub.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this instance has no invalidation bus (--redis-url): live streams need one",
            )
        })
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// Unsubscribes when the watcher's task ends, however it ends.
struct Watching<F: Fn()>(F);

impl<F: Fn()> Drop for Watching<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

#[tonic::async_trait]
impl WatchService for WatchApi {
    type WatchConversationStream = Stream<pb::WatchConversationResponse>;
    type WatchTeamStream = Stream<pb::WatchTeamResponse>;

    async fn watch_conversation(
        &self,
        request: Request<pb::WatchConversationRequest>,
    ) -> Result<Response<Self::WatchConversationStream>, Status> {
        let req = request.into_inner();
        let name =
            crate::validate::conversation_name("name", &req.name).map_err(ApiError::into_status)?;
        if req.after_sequence < 0 {
            return Err(ApiError::invalid(
                "after_sequence",
                "is negative: 0 watches from the start",
            )
            .into_status());
        }
        let hub = self.hub()?.clone();
        // A new feed starts at the conversation's last sequence (they are gap-free, so its
        // event count): it never re-broadcasts history a watcher reads itself.
        let now = hub
            .store
            .get(&name, &ReadAt::Primary)
            .await
            .map_err(ApiError::into_status)?;
        // Subscribe first, then read: nothing appended in between is missed.
        let mut rx = hub.subscribe(&name, now.event_count);
        let guard_hub = hub.clone();
        let guard_name = name.clone();
        let guard = Watching(move || guard_hub.unsubscribe(&guard_name));
        let first = match read(&hub.store, &name, req.after_sequence).await {
            Ok(first) => first,
            Err(e) => return Err(e.into_status()),
        };
        let (tx, out) = mpsc::channel(WATCHER_BUFFER);
        tokio::spawn(async move {
            let _guard = guard;
            let mut delivered = req.after_sequence;
            let send = |event: pb::ConversationEvent| pb::WatchConversationResponse {
                item: Some(pb::watch_conversation_response::Item::Event(event)),
            };
            // Catch up from Postgres, page by page.
            let mut page = first;
            loop {
                let full = page.len() == PAGE;
                for event in page {
                    delivered = event.sequence;
                    if tx.send(Ok(send(event))).await.is_err() {
                        return;
                    }
                }
                if !full {
                    break;
                }
                page = match read(&hub.store, &name, delivered).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(e.into_status())).await;
                        return;
                    }
                };
            }
            // Then live.
            loop {
                let event = tokio::select! {
                    () = tx.closed() => return,
                    event = rx.recv() => event,
                };
                match event {
                    Ok(event) if event.sequence <= delivered => {}
                    Ok(event) => {
                        if event.sequence > delivered + 1 {
                            // A gap: fill it from Postgres.
                            match read(&hub.store, &name, delivered).await {
                                Ok(missing) => {
                                    for e in
                                        missing.into_iter().filter(|e| e.sequence < event.sequence)
                                    {
                                        if tx.send(Ok(send(e))).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                                Err(e) => {
                                    let _ = tx.send(Err(e.into_status())).await;
                                    return;
                                }
                            }
                        }
                        delivered = event.sequence;
                        if tx
                            .send(Ok(send(Arc::unwrap_or_clone(event))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        metrics::counter!("convoy_watch_fell_behind_total", "stream" => "conversation")
                            .increment(1);
                        let _ = tx
                            .send(Ok(pb::WatchConversationResponse {
                                item: Some(pb::watch_conversation_response::Item::FellBehind(
                                    pb::FellBehind {
                                        resume_after: delivered,
                                    },
                                )),
                            }))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn watch_team(
        &self,
        request: Request<pb::WatchTeamRequest>,
    ) -> Result<Response<Self::WatchTeamStream>, Status> {
        let team = parse_team_name(&request.get_ref().parent)
            .map_err(|why| ApiError::invalid("parent", why).into_status())?;
        let hub = self.hub()?.clone();
        let mut rx = hub.subscribe_team(&team);
        let guard_hub = hub.clone();
        let guard_team = team.clone();
        let guard = Watching(move || guard_hub.unsubscribe_team(&guard_team));
        let (tx, out) = mpsc::channel(WATCHER_BUFFER);
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                let item = tokio::select! {
                    () = tx.closed() => return,
                    item = rx.recv() => item,
                };
                let message = match item {
                    Ok(TeamItem::Change(change)) => pb::watch_team_response::Item::Change(change),
                    Ok(TeamItem::Lost) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        metrics::counter!("convoy_watch_fell_behind_total", "stream" => "team")
                            .increment(1);
                        let _ = tx
                            .send(Ok(pb::WatchTeamResponse {
                                item: Some(pb::watch_team_response::Item::FellBehind(
                                    pb::FellBehind { resume_after: 0 },
                                )),
                            }))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx
                    .send(Ok(pb::WatchTeamResponse {
                        item: Some(message),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_keys_name_conversations() {
        let id = Uuid::now_v7();
        assert_eq!(parse_key(&format!("conv:acme:{id}")), Some(("acme", id)));
        assert_eq!(parse_key("conv:acme:nope"), None);
        assert_eq!(parse_key("analytics:acme"), None);
    }
}
