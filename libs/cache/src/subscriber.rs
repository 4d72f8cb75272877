//! Applies the invalidation bus to an L1, and knows when the L1 cannot be trusted.
//!
//! Each step reads the bus after the last message applied and invalidates the named keys
//! (raising their floors) and tags in the L1. The L1 is flushed whenever invalidations may
//! have been missed:
//! - at the first step (whatever the L1 holds predates the subscription);
//! - after a gap: the last message applied has been trimmed from the stream, so messages
//!   after it may have been too (conservative: when exactly that message was trimmed and
//!   the next was not, the flush was not needed, and costs only hit rate);
//! - after a reset: the stream is gone or its last id went backwards (a Redis restart);
//! - after any failed step, once the bus answers again (a reconnect).
//!
//! While steps fail, [`SubscriberHandle::is_current`] is false: the L1 may be missing
//! invalidations and must not serve.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::bus::StreamId;
use crate::l1::L1;
use crate::l2::{L2, L2Error};

/// Messages applied per step at most.
const BATCH: usize = 512;

/// The subscription's state; drive it with [`Subscriber::step`] or run it with [`spawn`].
pub struct Subscriber {
    l2: L2,
    l1: L1,
    last: Option<StreamId>,
    failed: bool,
    current: Arc<AtomicBool>,
    flushes: Arc<AtomicU64>,
}

/// Watches a running subscriber.
#[derive(Clone, Debug)]
pub struct SubscriberHandle {
    current: Arc<AtomicBool>,
    flushes: Arc<AtomicU64>,
}

impl SubscriberHandle {
    /// True when the last step succeeded: the L1 has every invalidation published so far.
    pub fn is_current(&self) -> bool {
        self.current.load(Ordering::Acquire)
    }

    /// How many times the L1 was flushed.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

impl Subscriber {
    /// A subscriber applying `l2`'s bus to `l1`.
    pub fn new(l2: L2, l1: L1) -> Self {
        Self {
            l2,
            l1,
            last: None,
            failed: false,
            current: Arc::new(AtomicBool::new(false)),
            flushes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A handle that watches this subscriber.
    pub fn handle(&self) -> SubscriberHandle {
        SubscriberHandle {
            current: self.current.clone(),
            flushes: self.flushes.clone(),
        }
    }

    async fn flush(&self, why: &str) {
        tracing::info!(why, "flushing L1: invalidations may have been missed");
        self.l1.flush().await;
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads and applies what the bus has after the last message applied; returns how
    /// many messages were applied.
    pub async fn step(&mut self) -> Result<usize, L2Error> {
        match self.try_step().await {
            Ok(applied) => {
                self.current.store(true, Ordering::Release);
                Ok(applied)
            }
            Err(e) => {
                self.current.store(false, Ordering::Release);
                self.failed = true;
                Err(e)
            }
        }
    }

    async fn try_step(&mut self) -> Result<usize, L2Error> {
        let extent = self.l2.bus_extent().await?;
        let zero = StreamId(0, 0);
        match (self.last, extent) {
            (None, extent) => {
                self.flush("first subscription").await;
                self.last = Some(extent.map_or(zero, |e| e.last_generated));
                self.failed = false;
                return Ok(0);
            }
            (Some(_), None) => {
                // Never written, or lost with a Redis restart.
                if self.last != Some(zero) || self.failed {
                    self.flush("the bus stream is gone").await;
                    self.last = Some(zero);
                }
            }
            (Some(last), Some(extent)) => {
                if extent.last_generated < last {
                    self.flush("the bus stream was reset").await;
                    self.last = Some(zero);
                } else if extent.first.is_some_and(|first| last < first) && last != zero {
                    self.flush("messages were trimmed before they were applied")
                        .await;
                } else if self.failed {
                    self.flush("reconnected to the bus").await;
                }
            }
        }
        self.failed = false;
        let after = self.last.unwrap_or(zero).to_string();
        let messages = self.l2.read_bus(&after, BATCH).await?;
        for (id, message) in &messages {
            self.l1.invalidate(&message.key, message.version).await;
            if !message.tags.is_empty() {
                self.l1.invalidate_tags(&message.tags).await;
            }
            if let Some(id) = StreamId::parse(id) {
                self.last = Some(id);
            }
        }
        Ok(messages.len())
    }
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
