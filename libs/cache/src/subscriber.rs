//! Applies the invalidation bus to an L1, and knows when the L1 cannot be trusted.
//!
//! Each step reads the bus after the last message applied and invalidates the named keys
//! (raising their floors) and tags in the L1. The L1 is flushed whenever invalidations may
//! have been missed:
//! - at the first step (whatever the L1 holds predates the subscription);
//! - after a gap: a sequence number was skipped (messages trimmed before they were read,
//!   or lost on their way: [`Subscriber::with_drop_ratio`] injects such losses);
//! - after a reset: the stream is gone or its last id went backwards;
//! - after Redis restarted (its run id changed), even with the stream intact: persistence
//!   can lose the last messages (the AOF's last second, an older snapshot, a failover);
//! - after any failed step, once the bus answers again (a reconnect).
//!
//! While steps fail, [`SubscriberHandle::is_current`] is false: the L1 may be missing
//! invalidations and must not serve. A flush stands in for invalidations the L1 never
//! applied, so it has no floors for them: [`SubscriberHandle::may_copy_from`] says whether
//! an entry another L1 served may be copied in.
//!
//! A bus that answers may still be *stale*: when Redis refuses writes (out of memory) but
//! serves reads, or every relay is down or behind, invalidations stop reaching it while
//! steps succeed. Relays heartbeat on the bus ([`crate::bus::Heartbeat`], every second)
//! with the age of their oldest unpublished change, so the subscriber is current only while
//! some relay heard within the staleness bound ([`BusArgs::bus_stale_after_ms`], 3 s)
//! vouches for a backlog within the bound, counting the time since it spoke
//! ([`Liveness`]). An invalidation committed at `t` is therefore on the bus by `t + bound`
//! or every L1 stops serving at about `t + bound` (one step later). Once a relay reports
//! the backlog within the bound again, the L1 is flushed (it may hold entries whose
//! invalidations were held up) and serves again.
//!
//! Metrics: `convoy_cache_bus_lag_seconds` (histogram: from a message's stream id, Redis'
//! clock at publication, to its application here), `convoy_cache_bus_dropped_total`
//! (messages missed, as the sequence gaps that reveal them; a gap after a restart, whose
//! size is unknown, counts only as a flush), `convoy_cache_bus_flushes_total{why}`,
//! `convoy_cache_bus_current` (1 while the L1 may serve) and
//! `convoy_cache_bus_relay_backlog_seconds` (the least backlog a relay vouches for, with
//! the time since it spoke; +Inf when none was heard within the bound).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;

use crate::bus::{Heartbeat, StreamExtent, StreamId};
use crate::l1::L1;
use crate::l2::{L2, L2Error};

/// Messages applied per step at most.
const BATCH: usize = 512;

/// The health service name under which a process with an L1 reports whether it serves:
/// SERVING while its subscriber is current (see `convoy_mesh::health`).
pub const BUS_HEALTH_SERVICE: &str = "convoy.bus";

/// The default staleness bound: see [`BusArgs::bus_stale_after_ms`].
pub const BUS_STALE_AFTER: Duration = Duration::from_secs(3);

/// How a process's L1s judge the invalidation bus (flattened into each binary's flags).
#[derive(Clone, Debug, clap::Args)]
pub struct BusArgs {
    /// The invalidation bus's staleness bound, in milliseconds: an L1 (and the cache tier's
    /// Redis entries) stop serving when no relay heartbeat was read for this long, or the
    /// relays' oldest unpublished change is older than this; they serve again (L1 flushed)
    /// once a relay vouches for its backlog. 3000: three relay heartbeats (one a second),
    /// so one late heartbeat does not stop the caches. Raised to twice the heartbeat
    /// interval (2000) if set lower; 0 turns the check off (a bus whose publishers do not
    /// heartbeat: convoy's relays do).
    #[arg(long, env = "CONVOY_BUS_STALE_AFTER_MS", default_value_t = 3000)]
    pub bus_stale_after_ms: u64,
}

impl Default for BusArgs {
    fn default() -> Self {
        Self {
            bus_stale_after_ms: BUS_STALE_AFTER.as_millis() as u64,
        }
    }
}

impl BusArgs {
    /// The staleness bound; `None` when the check is off.
    pub fn stale_after(&self) -> Option<Duration> {
        (self.bus_stale_after_ms > 0).then(|| {
            Duration::from_millis(self.bus_stale_after_ms).max(crate::bus::HEARTBEAT_INTERVAL * 2)
        })
    }
}

/// Whether the relays vouch for the bus: see the module docs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Some relay heard within the bound vouches for a backlog within it.
    Current,
    /// No relay heartbeat was read within the bound.
    Silent,
    /// The least backlog a relay heard within the bound vouches for (reported, plus the
    /// time since) is past the bound.
    Behind(Duration),
}

/// What a subscriber heard from the relays: per relay, when its last heartbeat was read
/// and the backlog it reported. Entries older than the bound are dropped as new ones come,
/// so the map holds the relays of the last few seconds.
#[derive(Debug)]
pub struct Liveness {
    bound: Duration,
    relays: HashMap<String, (Instant, Duration)>,
}

impl Liveness {
    /// Nothing heard yet: not current until a relay speaks.
    pub fn new(bound: Duration) -> Self {
        Self {
            bound,
            relays: HashMap::new(),
        }
    }

    /// Records `heartbeat`, read at `now`.
    pub fn heard(&mut self, heartbeat: &Heartbeat, now: Instant) {
        let bound = self.bound;
        self.relays
            .retain(|_, (at, _)| now.saturating_duration_since(*at) <= bound);
        self.relays
            .insert(heartbeat.relay.clone(), (now, heartbeat.backlog));
    }

    /// The least backlog any relay heard within the bound vouches for at `now`: what it
    /// reported plus the time since (the oldest row it knew of has aged as much, at most).
    pub fn backlog(&self, now: Instant) -> Option<Duration> {
        self.relays
            .values()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= self.bound)
            .map(|(at, backlog)| backlog.saturating_add(now.saturating_duration_since(*at)))
            .min()
    }

    /// Until when the relays heard vouch for the bus if none speaks again: the latest
    /// `at + bound - backlog` over the relays whose backlog is within the bound (the
    /// verdict is [`Verdict::Current`] exactly until then); `None` when none does.
    pub fn vouched_until(&self) -> Option<Instant> {
        self.relays
            .values()
            .filter(|(_, backlog)| *backlog <= self.bound)
            .map(|(at, backlog)| *at + (self.bound - *backlog))
            .max()
    }

    /// The verdict at `now`.
    pub fn verdict(&self, now: Instant) -> Verdict {
        match self.backlog(now) {
            None => Verdict::Silent,
            Some(backlog) if backlog > self.bound => Verdict::Behind(backlog),
            Some(_) => Verdict::Current,
        }
    }
}

/// What a subscriber and its handles share.
#[derive(Debug)]
struct State {
    /// The Redis it follows (its URL).
    source: String,
    /// The last step succeeded and the relays vouched for the bus then.
    current: AtomicBool,
    /// The same, for those who wait for a change (health reporting).
    current_changes: tokio::sync::watch::Sender<bool>,
    /// Where [`State::vouched_until`] counts from.
    epoch: Instant,
    /// Until when the relays vouch for the bus ([`Liveness::vouched_until`]), as
    /// nanoseconds after `epoch` plus one: 0 never, `u64::MAX` always (the check is off).
    /// Read by every lookup, so time alone ends it, however late the next step is.
    vouched_until: AtomicU64,
    flushes: AtomicU64,
    /// The stream id through which the L1 holds nothing older than the bus says.
    coherent_through: Mutex<Option<StreamId>>,
    /// What the last flush stood in for.
    flush_mark: Mutex<FlushMark>,
}

/// What an L1's last flush stood in for: the invalidations it may have skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum FlushMark {
    /// Nothing flushed yet: nothing may be copied in from another L1.
    #[default]
    NextMessage,
    /// Every invalidation through this stream id.
    At(StreamId),
}

impl State {
    fn new(source: String, checked: bool) -> Self {
        Self {
            source,
            current: AtomicBool::new(false),
            current_changes: tokio::sync::watch::Sender::new(false),
            epoch: Instant::now(),
            vouched_until: AtomicU64::new(if checked { 0 } else { u64::MAX }),
            flushes: AtomicU64::new(0),
            coherent_through: Mutex::new(None),
            flush_mark: Mutex::new(FlushMark::default()),
        }
    }

    /// Whether the relays vouch for the bus at `now`.
    fn vouched(&self, now: Instant) -> bool {
        match self.vouched_until.load(Ordering::Acquire) {
            0 => false,
            u64::MAX => true,
            until => self.offset(now) < until,
        }
    }

    fn set_vouched_until(&self, until: Option<Instant>) {
        let encoded = until.map_or(0, |until| self.offset(until).saturating_add(1));
        self.vouched_until.store(encoded, Ordering::Release);
    }

    /// `at` as nanoseconds after the epoch, saturating.
    fn offset(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every live subscriber of this process, for in-process observers (coherence tests, debug
/// pages); entries die with their subscriber and its handles.
static LIVE: Mutex<Vec<Weak<State>>> = Mutex::new(Vec::new());

/// Handles of every subscriber alive in this process.
pub fn live() -> Vec<SubscriberHandle> {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.iter()
        .filter_map(Weak::upgrade)
        .map(|state| SubscriberHandle { state })
        .collect()
}

/// The subscription's state; drive it with [`Subscriber::step`] or run it with [`spawn`].
pub struct Subscriber {
    l2: L2,
    l1: L1,
    /// The last stream id read.
    last: Option<StreamId>,
    /// The Redis server's run id at the last step.
    run_id: Option<String>,
    /// The last sequence read in order; `None` when unknown (the next message flushes).
    seq: Option<u64>,
    failed: bool,
    drop_ratio: f64,
    /// The relays heard; `None` when the staleness check is off.
    liveness: Option<Liveness>,
    /// The bus was found stale since the last flush: flush before serving again.
    stale: bool,
    state: Arc<State>,
}

/// Watches a running subscriber.
#[derive(Clone, Debug)]
pub struct SubscriberHandle {
    state: Arc<State>,
}

impl SubscriberHandle {
    /// True when the last step succeeded and the relays still vouch for the bus (see
    /// [`Self::bus_vouched`]): the L1 has applied (or flushed past) every invalidation up to
    /// the position that step reached ([`Self::coherent_through`]), and none older than the
    /// staleness bound is held up. It may still be behind the bus's tip by what the next
    /// steps will read. The L1 serves only while this holds.
    pub fn is_current(&self) -> bool {
        self.state.current.load(Ordering::Acquire) && self.bus_vouched()
    }

    /// Whether the relays vouch for the bus now: no invalidation older than the staleness
    /// bound is held up in an outbox. Redis's own entries are dropped by the relays before
    /// they publish, so they may be served exactly while this holds, whether or not this
    /// subscriber's last step succeeded. Always true when the check is off.
    pub fn bus_vouched(&self) -> bool {
        self.state.vouched(Instant::now())
    }

    /// [`Self::is_current`] as a channel that changes with it (for health reporting).
    pub fn current_changes(&self) -> tokio::sync::watch::Receiver<bool> {
        self.state.current_changes.subscribe()
    }

    /// How many times the L1 was flushed.
    pub fn flushes(&self) -> u64 {
        self.state.flushes.load(Ordering::Relaxed)
    }

    /// Whether an entry another L1 served, when that L1 was coherent through `position`,
    /// may be copied into this one. A flush drops entries and stands in for invalidations
    /// this L1 never applied (so it has no floors for them): a copy is safe only from an L1
    /// that had applied them. After a restart, only from one that has read the new bus.
    pub fn may_copy_from(&self, position: StreamId) -> bool {
        match *lock(&self.state.flush_mark) {
            FlushMark::At(mark) => position >= mark,
            FlushMark::NextMessage => false,
        }
    }

    /// The Redis URL of the bus it follows.
    pub fn source(&self) -> &str {
        &self.state.source
    }

    /// The stream id through which every invalidation has reached the L1 (applied, or made
    /// moot by a flush); `None` before the first step.
    pub fn coherent_through(&self) -> Option<StreamId> {
        *self
            .state
            .coherent_through
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Subscriber {
    /// A subscriber applying `l2`'s bus to `l1`, current only while relays vouch for the
    /// bus within [`BUS_STALE_AFTER`] (see [`Subscriber::with_stale_after`]).
    pub fn new(l2: L2, l1: L1) -> Self {
        let state = Arc::new(State::new(l2.config.url.clone(), true));
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&state));
        Self {
            l2,
            l1,
            last: None,
            run_id: None,
            seq: None,
            failed: false,
            drop_ratio: 0.0,
            liveness: Some(Liveness::new(BUS_STALE_AFTER)),
            stale: false,
            state,
        }
    }

    /// The staleness bound (see the module docs); `None` turns the check off, for a bus
    /// whose publishers do not heartbeat.
    pub fn with_stale_after(mut self, bound: Option<Duration>) -> Self {
        self.liveness = bound.map(Liveness::new);
        self.state.vouched_until.store(
            if bound.is_some() { 0 } else { u64::MAX },
            Ordering::Release,
        );
        self
    }

    /// Fault injection for coherence tests: drops this share of the messages read, as if
    /// lost on their way. Each loss must show as a gap and flush the L1. 0 in production.
    pub fn with_drop_ratio(mut self, ratio: f64) -> Self {
        self.drop_ratio = ratio.clamp(0.0, 1.0);
        self
    }

    /// A handle that watches this subscriber.
    pub fn handle(&self) -> SubscriberHandle {
        SubscriberHandle {
            state: self.state.clone(),
        }
    }

    async fn flush(&mut self, why: &'static str) {
        tracing::info!(why, "flushing L1: invalidations may have been missed");
        self.l1.flush().await;
        self.state.flushes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("convoy_cache_bus_flushes_total", "why" => why).increment(1);
    }

    fn set_flush_mark(&self, mark: FlushMark) {
        *lock(&self.state.flush_mark) = mark;
    }

    /// After a flush that waited for the next message, that message's id is the mark.
    fn mark_first_message(&self, id: StreamId) {
        let mut mark = lock(&self.state.flush_mark);
        if *mark == FlushMark::NextMessage {
            *mark = FlushMark::At(id);
        }
    }

    fn set_coherent_through(&self, id: StreamId) {
        let mut through = self
            .state
            .coherent_through
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Never backwards: after a reset, ids start again from the new stream's.
        if through.is_none_or(|t| t < id) {
            *through = Some(id);
        }
    }

    /// Reads and applies what the bus has after the last message read; returns how many
    /// messages were applied.
    pub async fn step(&mut self) -> Result<usize, L2Error> {
        // Serving, and the relays' word ran out since the last step: whatever arrives now,
        // flush before serving again.
        if self.is_current_now() && !self.state.vouched(Instant::now()) {
            self.stale = true;
        }
        match self.try_step().await {
            Ok(applied) => {
                let now = Instant::now();
                let verdict = self
                    .liveness
                    .as_ref()
                    .map_or(Verdict::Current, |l| l.verdict(now));
                if let Some(liveness) = &self.liveness {
                    self.state.set_vouched_until(liveness.vouched_until());
                    metrics::gauge!("convoy_cache_bus_relay_backlog_seconds").set(
                        liveness
                            .backlog(now)
                            .map_or(f64::INFINITY, |b| b.as_secs_f64()),
                    );
                }
                if verdict == Verdict::Current {
                    if self.stale {
                        // Invalidations were held up while this L1 served nothing: what it
                        // held before may have missed them.
                        self.flush("the bus caught up").await;
                        let through = self.last.unwrap_or(StreamId(0, 0));
                        self.set_flush_mark(FlushMark::At(through));
                        self.set_coherent_through(through);
                        self.stale = false;
                    }
                    self.set_current(true, None);
                } else {
                    self.stale = self.stale || self.is_current_now();
                    self.set_current(false, Some(verdict));
                }
                Ok(applied)
            }
            Err(e) => {
                self.set_current(false, None);
                self.failed = true;
                Err(e)
            }
        }
    }

    fn is_current_now(&self) -> bool {
        self.state.current.load(Ordering::Acquire)
    }

    /// Publishes whether the L1 may serve; `why` says why not, when the bus answers.
    fn set_current(&self, current: bool, why: Option<Verdict>) {
        let was = self.state.current.swap(current, Ordering::AcqRel);
        // 1: the L1 serves; 0: degraded (Redis unreachable or the bus stale: it sits out).
        metrics::gauge!("convoy_cache_bus_current").set(if current { 1.0 } else { 0.0 });
        self.state.current_changes.send_if_modified(|c| {
            let changed = *c != current;
            *c = current;
            changed
        });
        if was && !current {
            match why {
                Some(Verdict::Silent) => tracing::warn!(
                    "no relay heartbeat on the invalidation bus within the staleness bound: \
                     the L1 stops serving until a relay vouches for the bus"
                ),
                Some(Verdict::Behind(backlog)) => tracing::warn!(
                    backlog_ms = backlog.as_millis() as u64,
                    "the relays' oldest unpublished change is past the staleness bound: \
                     the L1 stops serving until they catch up"
                ),
                _ => {}
            }
        } else if !was && current {
            tracing::info!("the invalidation bus is current: the L1 serves");
        }
    }

    async fn try_step(&mut self) -> Result<usize, L2Error> {
        let extent = self.l2.bus_extent().await?;
        let zero = StreamId(0, 0);
        let restarted = self
            .run_id
            .as_ref()
            .is_some_and(|known| *known != extent.run_id);
        self.run_id = Some(extent.run_id.clone());
        let stream = extent.stream;
        match (self.last, stream) {
            (None, stream) => {
                self.flush("first subscription").await;
                self.last = Some(stream.map_or(zero, |e| e.last));
                self.seq = Some(stream.map_or(0, |e| e.last_seq));
                // With no stream, peers may not yet have noticed a restart that lost it.
                self.set_flush_mark(match stream {
                    Some(e) => FlushMark::At(e.last),
                    None => FlushMark::NextMessage,
                });
                self.set_coherent_through(self.last.unwrap_or(zero));
                self.failed = false;
                return Ok(0);
            }
            (Some(_), _) if restarted => {
                // Even a persisted stream may have lost its last messages (AOF, snapshot,
                // failover), and with them invalidations nobody applied.
                self.flush("redis restarted").await;
                self.set_flush_mark(FlushMark::NextMessage);
                if stream.is_none_or(|e| Some(e.last) < self.last) {
                    self.last = Some(zero);
                }
                self.seq = None;
            }
            (Some(last), None) => {
                // Never written, or lost with a Redis restart.
                if last != zero || self.failed {
                    self.flush("the bus stream is gone").await;
                    self.set_flush_mark(FlushMark::NextMessage);
                    self.last = Some(zero);
                    self.seq = Some(0);
                }
            }
            (Some(last), Some(e)) => {
                if e.last < last {
                    self.flush("the bus stream was reset").await;
                    self.set_flush_mark(FlushMark::NextMessage);
                    self.last = Some(zero);
                    self.seq = Some(0);
                } else if self.failed {
                    self.flush("reconnected to the bus").await;
                    self.set_flush_mark(FlushMark::At(last));
                }
            }
        }
        self.failed = false;
        let after = self.last.unwrap_or(zero);
        let received = self.l2.read_bus(&after.to_string(), BATCH).await?;
        let mut applied = 0;
        let mut gap = false;
        let mut malformed = false;
        // The last id through which nothing was lost unnoticed.
        let mut through = after;
        let mut lost = false;
        // Messages known missed (by sequence number).
        let mut missed = 0;
        let now = Instant::now();
        for r in &received {
            self.last = Some(r.id);
            self.mark_first_message(r.id);
            if self.drop_ratio > 0.0 && rand::rng().random_bool(self.drop_ratio) {
                // Counted when the next sequence number reveals the gap, as a real loss is.
                lost = true;
                continue;
            }
            if !matches!((self.seq, r.seq), (Some(s), Some(n)) if Some(n) == s.checked_add(1)) {
                gap = true;
                missed += skipped(self.seq, r.seq);
            }
            self.seq = r.seq;
            match &r.message {
                Some(message) => {
                    self.l1.invalidate(&message.key, message.version).await;
                    if !message.tags.is_empty() {
                        self.l1.invalidate_tags(&message.tags).await;
                    }
                    applied += 1;
                    metrics::histogram!("convoy_cache_bus_lag_seconds").record(lag(r.id));
                }
                None => {
                    if let (Some(heartbeat), Some(liveness)) = (&r.heartbeat, &mut self.liveness) {
                        liveness.heard(heartbeat, now);
                    }
                    malformed |= r.is_malformed();
                }
            }
            if !lost {
                through = r.id;
            }
        }
        // Caught up with the extent read before, yet short of its sequence: the last
        // messages were lost.
        if let Some(StreamExtent { last, last_seq, .. }) = stream
            && self.last == Some(last)
            && self.seq != Some(last_seq)
        {
            gap = true;
            missed += self.seq.map_or(0, |seq| last_seq.saturating_sub(seq));
            self.seq = Some(last_seq);
        }
        if missed > 0 {
            metrics::counter!("convoy_cache_bus_dropped_total").increment(missed);
        }
        if gap || malformed {
            // A flush after the reads covers everything read so far: from here on, the L1
            // holds only what is filled after it.
            self.flush(if gap {
                "a message was missed"
            } else {
                "a malformed message"
            })
            .await;
            through = self.last.unwrap_or(zero);
            self.set_flush_mark(FlushMark::At(through));
        }
        self.set_coherent_through(through);
        Ok(applied)
    }
}

/// How many sequence numbers lie between the last one read in order and the next one read;
/// 0 when either is unknown (after a restart: the flush covers it, but nothing counts it).
fn skipped(last: Option<u64>, next: Option<u64>) -> u64 {
    match (last, next) {
        (Some(last), Some(next)) => next.saturating_sub(last).saturating_sub(1),
        _ => 0,
    }
}

/// Seconds from a message's publication (its stream id is Redis' clock then, in ms) to now,
/// by this host's clock; 0 if the clocks disagree the other way.
fn lag(id: StreamId) -> f64 {
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    now_ms.saturating_sub(u128::from(id.0)) as f64 / 1000.0
}

/// Runs `subscriber` until the returned task is aborted, polling every `poll` while idle.
pub fn spawn(
    mut subscriber: Subscriber,
    poll: Duration,
) -> (SubscriberHandle, tokio::task::JoinHandle<()>) {
    let handle = subscriber.handle();
    let task = tokio::spawn(async move {
        loop {
            match subscriber.step().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => tokio::time::sleep(poll).await,
                Err(e) => {
                    tracing::warn!(error = %e, "invalidation bus unreachable; L1 is not current");
                    tokio::time::sleep(poll.max(Duration::from_millis(100))).await;
                }
            }
        }
    });
    (handle, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(relay: &str, backlog_ms: u64) -> Heartbeat {
        Heartbeat {
            relay: relay.into(),
            backlog: Duration::from_millis(backlog_ms),
        }
    }

    const BOUND: Duration = Duration::from_secs(3);

    async fn advance_ms(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_bus_is_stale_until_a_relay_speaks_and_once_none_spoke_within_the_bound() {
        let mut liveness = Liveness::new(BOUND);
        assert_eq!(liveness.verdict(Instant::now()), Verdict::Silent);
        liveness.heard(&beat("a", 0), Instant::now());
        assert_eq!(liveness.verdict(Instant::now()), Verdict::Current);
        advance_ms(3000).await;
        assert_eq!(
            liveness.verdict(Instant::now()),
            Verdict::Current,
            "at the bound"
        );
        advance_ms(1).await;
        assert_eq!(liveness.verdict(Instant::now()), Verdict::Silent);
        liveness.heard(&beat("a", 0), Instant::now());
        assert_eq!(liveness.verdict(Instant::now()), Verdict::Current);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_ages_between_heartbeats_and_past_the_bound_the_bus_is_stale() {
        let mut liveness = Liveness::new(BOUND);
        liveness.heard(&beat("a", 2500), Instant::now());
        assert_eq!(liveness.verdict(Instant::now()), Verdict::Current);
        // The row the relay reported has aged since it spoke, heartbeat or not.
        advance_ms(600).await;
        assert_eq!(
            liveness.verdict(Instant::now()),
            Verdict::Behind(Duration::from_millis(3100))
        );
        liveness.heard(&beat("a", 3100), Instant::now());
        assert_eq!(
            liveness.verdict(Instant::now()),
            Verdict::Behind(Duration::from_millis(3100)),
            "heartbeats alone do not make a bus current"
        );
        liveness.heard(&beat("a", 0), Instant::now());
        assert_eq!(liveness.verdict(Instant::now()), Verdict::Current);
    }

    #[tokio::test(start_paused = true)]
    async fn the_least_backlog_any_relay_heard_within_the_bound_vouches_for_counts() {
        let mut liveness = Liveness::new(BOUND);
        // Each relay's figure bounds the backlog from above: one that reads every shard
        // vouches for the bus while another cannot reach one.
        liveness.heard(&beat("cut-off", 5000), Instant::now());
        liveness.heard(&beat("healthy", 0), Instant::now());
        assert_eq!(liveness.verdict(Instant::now()), Verdict::Current);
        advance_ms(3500).await;
        liveness.heard(&beat("cut-off", 8500), Instant::now());
        assert_eq!(
            liveness.verdict(Instant::now()),
            Verdict::Behind(Duration::from_millis(8500)),
            "the healthy relay fell silent past the bound"
        );
        assert_eq!(
            liveness.relays.len(),
            1,
            "relays silent past the bound are forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_relays_vouch_exactly_until_the_verdict_turns() {
        let mut liveness = Liveness::new(BOUND);
        assert_eq!(liveness.vouched_until(), None);
        let start = Instant::now();
        liveness.heard(&beat("a", 1000), start);
        liveness.heard(&beat("b", 4000), start);
        let until = liveness.vouched_until().unwrap();
        assert_eq!(
            until,
            start + Duration::from_secs(2),
            "a's word, b's is spent"
        );
        assert_eq!(liveness.verdict(until), Verdict::Current);
        assert_ne!(
            liveness.verdict(until + Duration::from_nanos(1)),
            Verdict::Current
        );

        // The handle reads it by time alone: no step needed for it to end.
        let state = State::new(String::new(), true);
        assert!(!state.vouched(Instant::now()), "not before a relay spoke");
        state.set_vouched_until(Some(until));
        assert!(state.vouched(Instant::now()));
        advance_ms(2000).await;
        assert!(state.vouched(Instant::now()), "at the instant itself");
        advance_ms(1).await;
        assert!(!state.vouched(Instant::now()));
        assert!(
            State::new(String::new(), false).vouched(Instant::now()),
            "the check off"
        );
    }

    #[test]
    fn the_staleness_bound_is_at_least_two_heartbeats_and_zero_turns_it_off() {
        let bound = |ms| {
            BusArgs {
                bus_stale_after_ms: ms,
            }
            .stale_after()
        };
        assert_eq!(bound(3000), Some(Duration::from_secs(3)));
        assert_eq!(bound(10), Some(crate::bus::HEARTBEAT_INTERVAL * 2));
        assert_eq!(bound(0), None);
        assert_eq!(BusArgs::default().stale_after(), Some(BUS_STALE_AFTER));
    }

    #[test]
    fn a_gap_counts_the_sequence_numbers_skipped_and_nothing_when_unknown() {
        assert_eq!(skipped(Some(4), Some(5)), 0);
        assert_eq!(skipped(Some(4), Some(8)), 3);
        assert_eq!(
            skipped(None, Some(8)),
            0,
            "after a restart the size is unknown"
        );
        assert_eq!(skipped(Some(4), None), 0);
        assert_eq!(
            skipped(Some(9), Some(2)),
            0,
            "a reset stream is not a loss count"
        );
    }

    #[test]
    fn lag_is_measured_from_the_stream_id_and_never_negative() {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let lag_of_old = lag(StreamId(now_ms - 1500, 0));
        assert!((1.5..2.5).contains(&lag_of_old), "{lag_of_old}");
        assert_eq!(
            lag(StreamId(now_ms + 60_000, 0)),
            0.0,
            "a clock ahead of ours"
        );
    }
}
