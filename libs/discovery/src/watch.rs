//! Follows one service's instances in etcd as a stream of changes for a balancer.
//!
//! List the service (at revision R), then watch from R + 1. After any interruption (etcd
//! down or restarted, a dropped stream) resume watching from the revision after the last
//! change seen, so etcd replays exactly what was missed. Only when etcd cannot replay from
//! there (its history was compacted, the watch was canceled, its data was replaced) list
//! again and emit the difference against what the consumer already has. Either way nothing is
//! lost and an unchanged instance is never inserted twice.
//!
//! Not here: the set arithmetic (see [`crate::service_set`]) or the balancer itself.

use std::collections::VecDeque;

use etcd_client::{Client, EventType, WatchOptions, WatchResponse, WatchStream};
use futures::{StreamExt, future, stream};
use tracing::{debug, info, warn};

use crate::backoff::Delays;
use crate::config::EtcdConfig;
use crate::connection::{bounded, connect};
use crate::service_set::{InstanceChange, ServiceSet};
use crate::{Changes, Error, Result, endpoint, keys, list};

/// Follows the instances of `service`, keyed by instance id: first an `Insert` for each
/// registered instance, then each change as it happens.
///
/// The stream never ends by itself. etcd being unreachable, restarting or compacting its
/// history is retried for ever with [`EtcdConfig::reconnect_backoff`] and logged, never
/// yielded: a balancer treats a discovery error as fatal. The one error it yields is for
/// input that can never work (an invalid service name, no or unparsable etcd endpoints),
/// and then it ends.
pub fn watch_service(etcd: &EtcdConfig, service: &str) -> Changes {
    if let Err(e) = keys::check_segment("service", service) {
        return stream::once(future::ready(Err(e))).boxed();
    }
    let watcher = Watcher::new(etcd.clone(), service);
    stream::unfold(watcher, |mut watcher| async move {
        let item = watcher.next().await?;
        Some((item, watcher))
    })
    .boxed()
}

/// The state of one service's watch, driven by the consumer polling the stream.
struct Watcher {
    etcd: EtcdConfig,
    service: String,
    /// `<prefix>services/<service>/`.
    key_prefix: String,
    client: Option<Client>,
    stream: Option<WatchStream>,
    /// What the consumer has been given.
    set: ServiceSet,
    /// The last revision the set reflects; `None` until listed, and again when etcd can no
    /// longer replay from it.
    revision: Option<i64>,
    /// Changes worked out but not yet yielded.
    pending: VecDeque<InstanceChange>,
    delays: Delays,
    /// Whether the last attempt failed, so only the first failure of a run is a warning.
    interrupted: bool,
    /// Set after yielding an error that retrying cannot cure.
    finished: bool,
}

// === impl Watcher ===

impl Watcher {
    fn new(etcd: EtcdConfig, service: &str) -> Self {
        Self {
            key_prefix: keys::service_prefix(&etcd.prefix, service),
            delays: Delays::new(etcd.reconnect_backoff),
            etcd,
            service: service.to_owned(),
            client: None,
            stream: None,
            set: ServiceSet::default(),
            revision: None,
            pending: VecDeque::new(),
            interrupted: false,
            finished: false,
        }
    }

    /// The next change; `None` only after a permanent error was yielded.
    async fn next(&mut self) -> Option<Result<InstanceChange>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Some(Ok(change));
            }
            if self.finished {
                return None;
            }
            if let Err(error) = self.step().await {
                if !error.is_transient() {
                    self.finished = true;
                    return Some(Err(error));
                }
                // A fresh client too: never trust a channel that just failed.
                self.stream = None;
                self.client = None;
                let delay = self.delays.next_delay();
                if self.interrupted {
                    debug!(service = %self.service, %error, ?delay, "watch still interrupted; retrying");
                } else {
                    warn!(service = %self.service, %error, ?delay, "watch interrupted; resuming");
                    self.interrupted = true;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Waits for one watch response and applies it, or (re)opens the watch.
    async fn step(&mut self) -> Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return self.resume().await;
        };
        // No time limit: a quiet service sends nothing for hours. A dead connection is caught
        // by HTTP/2 keepalive instead.
        let response = stream
            .message()
            .await
            .map_err(|e| Error::etcd("watch", e))?
            .ok_or_else(|| Error::etcd("watch", "etcd closed the watch stream"))?;
        self.apply(response)
    }

    /// Lists the service if the set needs it, then watches from the revision after the set's.
    async fn resume(&mut self) -> Result<()> {
        if self.client.is_none() {
            self.client = Some(connect(&self.etcd).await?);
        }
        let client = self.client.as_mut().expect("connected above");
        let revision = match self.revision {
            Some(revision) => revision,
            None => {
                let listing = list::read(client, &self.etcd, &self.key_prefix).await?;
                let listed = listing
                    .endpoints
                    .into_values()
                    .map(|e| (e.metadata.instance.clone(), e))
                    .collect();
                let changes = self.set.replace(listed);
                info!(
                    service = %self.service,
                    revision = listing.revision,
                    instances = self.set.len(),
                    changes = changes.len(),
                    "listed instances"
                );
                self.pending.extend(changes);
                self.revision = Some(listing.revision);
                listing.revision
            }
        };
        let limit = self.etcd.request_timeout;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let watch = client.watch(self.key_prefix.as_str(), Some(options));
        let mut stream = bounded("watch", limit, watch).await?;
        let created = bounded("watch", limit, stream.message())
            .await?
            .ok_or_else(|| Error::etcd("watch", "etcd closed the watch stream at once"))?;
        let now = created.header().map_or(revision, |h| h.revision());
        if now < revision {
            // Revisions went backwards: etcd's data was replaced, and replaying from ours
            // would wait for revisions that will mean something else.
            self.revision = None;
            return Err(Error::etcd(
                "watch",
                format!(
                    "etcd is at revision {now}, behind the {revision} seen; its data was replaced, listing again"
                ),
            ));
        }
        self.stream = Some(stream);
        self.apply(created)?;
        self.delays.reset();
        if self.interrupted {
            info!(service = %self.service, from = revision + 1, "watch resumed");
            self.interrupted = false;
        } else {
            debug!(service = %self.service, from = revision + 1, "watching");
        }
        Ok(())
    }

    /// Turns one watch response into pending changes.
    fn apply(&mut self, response: WatchResponse) -> Result<()> {
        if response.canceled() {
            // Relisting is always correct, and the only way on after a compaction.
            self.revision = None;
            let compacted = response.compact_revision();
            let why = if compacted > 0 {
                format!("etcd compacted its history up to revision {compacted}; listing again")
            } else {
                format!(
                    "etcd canceled the watch ({}); listing again",
                    response.cancel_reason()
                )
            };
            return Err(Error::etcd("watch", why));
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            self.revision = Some(kv.mod_revision());
            let key = String::from_utf8_lossy(kv.key());
            let Some(names) = keys::parse_key(&self.etcd.prefix, &key) else {
                warn!(%key, "ignoring a key outside the services/<service>/<instance> layout");
                continue;
            };
            let instance = names.instance.to_owned();
            let change = match event.event_type() {
                EventType::Put => {
                    match endpoint::from_entry(&self.etcd.prefix, kv.key(), kv.value()) {
                        Some(endpoint) => self.set.insert(instance, endpoint),
                        // Overwritten with something that is not an endpoint: gone.
                        None => self.set.remove(&instance),
                    }
                }
                EventType::Delete => self.set.remove(&instance),
            };
            self.pending.extend(change);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn input_that_cannot_work_is_yielded_once_then_the_stream_ends() {
        let cases = [
            (EtcdConfig::default(), "a/b"),
            (
                EtcdConfig {
                    endpoints: vec![],
                    ..EtcdConfig::default()
                },
                "conversation",
            ),
            (
                EtcdConfig {
                    endpoints: vec!["not a url".into()],
                    ..EtcdConfig::default()
                },
                "conversation",
            ),
        ];
        for (etcd, service) in cases {
            let mut changes = watch_service(&etcd, service);
            match changes.next().await {
                Some(Err(e)) => assert!(!e.is_transient(), "{e}"),
                other => panic!("expected a permanent error, got {other:?}"),
            }
            assert!(changes.next().await.is_none());
        }
    }
}
