//! The typed client of `convoy.v1.WatchService`: live streams that resume by themselves.
//!
//! A watch ends for reasons its reader should not have to handle: the server ends every
//! stream at its maximum lifetime (UNAVAILABLE, reason `STREAM_LIFETIME`), an instance
//! drains or goes away (UNAVAILABLE), a slow reader is told it fell behind (`FellBehind`).
//! [`ConversationWatch`] opens the stream again after the last sequence it delivered, at
//! once after a lifetime's end and a `FellBehind`, otherwise after a backoff, so its reader
//! sees every event exactly once and in order. Any other status (UNAUTHENTICATED when the
//! token expired, PERMISSION_DENIED, NOT_FOUND, ...) is handed to the reader and ends the
//! watch, as does [`MAX_RETRIES`] failed opens in a row.
//!
//! A team's watch has no position to resume from: [`TeamWatch`] opens it again too, but
//! first tells its reader to re-list ([`TeamWatchItem::Relist`]), as `FellBehind` asks.

use std::time::Duration;

use convoy_proto::v1 as pb;
use convoy_proto::v1::watch_service_client::WatchServiceClient;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;

use crate::Transport;

/// The deadline each opened stream carries (unless the caller's own is nearer): 24 h,
/// longer than any server's stream lifetime (30 min by default), so a stream ends at its
/// lifetime (and resumes), not at its deadline.
pub const WATCH_CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Failed opens in a row (no event in between) before a watch gives up: 8, about 13 s of
/// backoff in all.
pub const MAX_RETRIES: u32 = 8;

/// The first backoff after a failure; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest backoff between two opens.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// WatchService through the mesh (without retries: a watch resumes itself); cheap to clone.
#[derive(Clone)]
pub struct WatchClient {
    inner: WatchServiceClient<Transport>,
}

impl WatchClient {
    pub(crate) fn new(transport: Transport) -> Self {
        Self {
            inner: WatchServiceClient::new(transport),
        }
    }

    /// The events of conversation `name` (`teams/{team}/conversations/{id}`) after sequence
    /// `after_sequence` (0: from the start), resuming by itself; see the module docs.
    pub fn watch_conversation(
        &self,
        name: impl Into<String>,
        after_sequence: i64,
    ) -> ConversationWatch {
        ConversationWatch {
            client: self.inner.clone(),
            name: name.into(),
            delivered: after_sequence,
            stream: None,
            failures: 0,
            resumes: 0,
            done: false,
        }
    }

    /// The changes of team `parent` (`teams/{team}`), opened again by itself; see the
    /// module docs.
    pub fn watch_team(&self, parent: impl Into<String>) -> TeamWatch {
        TeamWatch {
            client: self.inner.clone(),
            parent: parent.into(),
            stream: None,
            failures: 0,
            relist: false,
            done: false,
        }
    }
}

/// Why a stream ended, as far as resuming goes.
enum Ended {
    /// Resume now: the lifetime ended, or the server said where to resume.
    Now,
    /// Resume after a backoff: the instance was unavailable.
    Later(Status),
    /// Hand it to the reader.
    Final(Status),
}

fn classify(status: Status) -> Ended {
    if status.code() != Code::Unavailable {
        return Ended::Final(status);
    }
    let lifetime = status
        .get_error_details()
        .error_info()
        .is_some_and(|info| info.reason == "STREAM_LIFETIME");
    if lifetime {
        Ended::Now
    } else {
        Ended::Later(status)
    }
}

/// Waits before the `failures`th open in a row, or gives `status` up.
async fn back_off(failures: &mut u32, status: Status) -> Result<(), Status> {
    *failures += 1;
    if *failures > MAX_RETRIES {
        return Err(status);
    }
    let wait = FIRST_BACKOFF
        .saturating_mul(1 << (*failures - 1).min(16))
        .min(MAX_BACKOFF);
    tokio::time::sleep(wait).await;
    Ok(())
}

/// A conversation's events, resumed across the stream's ends; see the module docs.
pub struct ConversationWatch {
    client: WatchServiceClient<Transport>,
    name: String,
    delivered: i64,
    stream: Option<Streaming<pb::WatchConversationResponse>>,
    failures: u32,
    resumes: u64,
    done: bool,
}

impl ConversationWatch {
    /// The next event; `None` after the watch ended with an error (handed out once).
    pub async fn next(&mut self) -> Option<Result<pb::ConversationEvent, Status>> {
        loop {
            if self.done {
                return None;
            }
            let Some(stream) = &mut self.stream else {
                let request = pb::WatchConversationRequest {
                    name: self.name.clone(),
                    after_sequence: self.delivered,
                };
                match self.client.watch_conversation(request).await {
                    Ok(response) => self.stream = Some(response.into_inner()),
                    Err(status) => {
                        if let Err(status) = self.ended(status).await {
                            return Some(Err(status));
                        }
                    }
                }
                continue;
            };
            use pb::watch_conversation_response::Item;
            match stream.message().await {
                Ok(Some(pb::WatchConversationResponse {
                    item: Some(Item::Event(event)),
                })) => {
                    if event.sequence <= self.delivered {
                        continue;
                    }
                    self.delivered = event.sequence;
                    self.failures = 0;
                    return Some(Ok(event));
                }
                Ok(Some(pb::WatchConversationResponse {
                    item: Some(Item::FellBehind(_)),
                })) => {
                    // Resumed after what this watch delivered (what the server says it sent).
                    self.stream = None;
                    self.resumes += 1;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    // Ended without a status (an instance going away): resume, with care.
                    let status = Status::unavailable("the watch ended without a status");
                    if let Err(status) = self.ended(status).await {
                        return Some(Err(status));
                    }
                }
                Err(status) => {
                    if let Err(status) = self.ended(status).await {
                        return Some(Err(status));
                    }
                }
            }
        }
    }

    /// The stream ended with `status`: gets ready to resume, or says it is final.
    async fn ended(&mut self, status: Status) -> Result<(), Status> {
        self.stream = None;
        let outcome = match classify(status) {
            Ended::Now => Ok(()),
            Ended::Later(status) => back_off(&mut self.failures, status).await,
            Ended::Final(status) => Err(status),
        };
        match outcome {
            Ok(()) => {
                self.resumes += 1;
                Ok(())
            }
            Err(status) => {
                self.done = true;
                Err(status)
            }
        }
    }

    /// The last sequence delivered (or the one the watch started after).
    pub fn delivered(&self) -> i64 {
        self.delivered
    }

    /// How many times the stream was opened again.
    pub fn resumes(&self) -> u64 {
        self.resumes
    }
}

/// What a team's watch delivers.
#[derive(Clone, Debug, PartialEq)]
pub enum TeamWatchItem {
    /// A change.
    Change(pb::ConversationChange),
    /// Changes may have been missed (the stream ended, or fell behind): list the team's
    /// conversations again, then go on reading.
    Relist,
}

/// A team's changes, its stream opened again across its ends; see the module docs.
pub struct TeamWatch {
    client: WatchServiceClient<Transport>,
    parent: String,
    stream: Option<Streaming<pb::WatchTeamResponse>>,
    failures: u32,
    /// A re-list is owed to the reader before the next change.
    relist: bool,
    done: bool,
}

impl TeamWatch {
    /// The next change or re-list; `None` after the watch ended with an error (handed out
    /// once).
    pub async fn next(&mut self) -> Option<Result<TeamWatchItem, Status>> {
        loop {
            if self.done {
                return None;
            }
            let Some(stream) = &mut self.stream else {
                let request = pb::WatchTeamRequest {
                    parent: self.parent.clone(),
                };
                match self.client.watch_team(request).await {
                    Ok(response) => {
                        self.stream = Some(response.into_inner());
                        self.failures = 0;
                        if std::mem::take(&mut self.relist) {
                            return Some(Ok(TeamWatchItem::Relist));
                        }
                    }
                    Err(status) => {
                        if let Err(status) = self.ended(status).await {
                            return Some(Err(status));
                        }
                    }
                }
                continue;
            };
            use pb::watch_team_response::Item;
            match stream.message().await {
                Ok(Some(pb::WatchTeamResponse {
                    item: Some(Item::Change(change)),
                })) => return Some(Ok(TeamWatchItem::Change(change))),
                Ok(Some(pb::WatchTeamResponse {
                    item: Some(Item::FellBehind(_)),
                })) => {
                    self.stream = None;
                    self.relist = true;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    let status = Status::unavailable("the watch ended without a status");
                    if let Err(status) = self.ended(status).await {
                        return Some(Err(status));
                    }
                }
                Err(status) => {
                    if let Err(status) = self.ended(status).await {
                        return Some(Err(status));
                    }
                }
            }
        }
    }

    async fn ended(&mut self, status: Status) -> Result<(), Status> {
        self.stream = None;
        self.relist = true;
        let outcome = match classify(status) {
            Ended::Now => Ok(()),
            Ended::Later(status) => back_off(&mut self.failures, status).await,
            Ended::Final(status) => Err(status),
        };
        if outcome.is_err() {
            self.done = true;
        }
        outcome
    }
}
