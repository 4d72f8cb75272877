//! What an analytics request asks, once validated: which conversations, grouped how.
//!
//! Requests become a [`Query`] in [`crate::validate`]; [`crate::scatter`] turns a query into
//! SQL per shard; [`crate::cached`] keys and tags its answer. Nothing here knows gRPC.

use chrono::{DateTime, Utc};
use convoy_proto::names::TeamId;
use convoy_proto::v1 as pb;

/// Whose conversations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One team's.
    Team(TeamId),
    /// Every team's (operators only).
    Fleet,
}

/// Width of a time-series bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// One hour.
    Hour,
    /// One UTC day.
    Day,
}

impl Width {
    /// The width in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Self::Hour => 3600,
            Self::Day => 86_400,
        }
    }
}

/// How the figures are grouped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// One group: everything the filter selects.
    Total,
    /// One group per intent.
    Intent,
    /// One group per time bucket of creation.
    Bucket(Width),
    /// The `limit` teams with the most conversations.
    TopTeams {
        /// How many.
        limit: u32,
    },
    /// The `limit` most common values of a metadata key.
    TopMetadata {
        /// The key.
        key: String,
        /// How many.
        limit: u32,
    },
    /// Events with token usage, per UTC day (of the event) and model.
    Usage {
        /// The price table's fingerprint: its answers are cached under it.
        prices: u64,
    },
    /// Tool calls and failed results, per tool (by the event's time), the `limit` most
    /// called.
    Tools {
        /// How many.
        limit: u32,
    },
}

impl Grouping {
    /// How many groups a top-N grouping keeps; every group for the others.
    pub fn limit(&self) -> u32 {
        match self {
            Self::TopTeams { limit } | Self::TopMetadata { limit, .. } | Self::Tools { limit } => {
                *limit
            }
            Self::Total | Self::Intent | Self::Bucket(_) | Self::Usage { .. } => u32::MAX,
        }
    }

    /// Most groups an answer may hold, where the groups are not bounded otherwise: usage
    /// rows come from the team's own model names, so there may be any number of them.
    /// (Intents and statuses are closed sets, time buckets are bounded by validation, and
    /// top-N groupings by their limit.)
    pub fn max_groups(&self) -> Option<usize> {
        match self {
            Self::Usage { .. } => Some(MAX_USAGE_ROWS),
            _ => None,
        }
    }
}

/// Most rows of a usage answer (days times models): 10,000, a year of 27 models. A row
/// takes at most about 200 bytes encoded, so the answer stays near 2 MiB, inside a stock
/// client's 4 MiB; a range whose answer would have more is refused (narrow it).
pub const MAX_USAGE_ROWS: usize = 10_000;

/// A validated analytics request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Whose conversations.
    pub scope: Scope,
    /// Created (for event groupings: happened) at or after this.
    pub start: DateTime<Utc>,
    /// Created (happened) before this.
    pub end: DateTime<Utc>,
    /// Only this intent (its stored text).
    pub intent: Option<&'static str>,
    /// Only this status (its stored text).
    pub status: Option<&'static str>,
    /// Fail rather than answer without a shard.
    pub require_complete: bool,
    /// How to group.
    pub grouping: Grouping,
}

impl Query {
    /// The team, for a team-scoped query.
    pub fn team(&self) -> Option<&TeamId> {
        match &self.scope {
            Scope::Team(team) => Some(team),
            Scope::Fleet => None,
        }
    }

    /// A canonical description of everything that changes the answer, for the cache key.
    /// `require_complete` is left out: only complete answers are cached.
    pub fn canonical(&self) -> String {
        let scope = match &self.scope {
            Scope::Team(team) => team.as_str(),
            Scope::Fleet => "",
        };
        format!(
            "v1|{scope}|{}|{}|{}|{}|{:?}",
            self.start.timestamp_micros(),
            self.end.timestamp_micros(),
            self.intent.unwrap_or(""),
            self.status.unwrap_or(""),
            self.grouping,
        )
    }
}

/// Stored texts of the intents, in the contract's order (`INTENT_DEBUG` = 1 is `debug`).
/// The schema stores each enum value as its proto name, lowercase, without the prefix;
/// the tests below hold the two lists to the contract.
pub const INTENTS: [&str; 8] = [
    "debug", "feature", "refactor", "review", "explain", "test", "docs", "other",
];

/// Stored texts of the statuses, in the contract's order.
pub const STATUSES: [&str; 4] = ["active", "completed", "abandoned", "archived"];

/// The stored text of an intent; None for unspecified.
pub fn intent_text(intent: pb::Intent) -> Option<&'static str> {
    (intent as usize)
        .checked_sub(1)
        .and_then(|i| INTENTS.get(i).copied())
}

/// The stored text of a status; None for unspecified.
pub fn status_text(status: pb::ConversationStatus) -> Option<&'static str> {
    (status as usize)
        .checked_sub(1)
        .and_then(|i| STATUSES.get(i).copied())
}

/// The intent stored as `text`.
pub fn intent_of(text: &str) -> pb::Intent {
    INTENTS
        .iter()
        .position(|t| *t == text)
        .and_then(|i| pb::Intent::try_from(i as i32 + 1).ok())
        .unwrap_or(pb::Intent::Unspecified)
}

/// The status stored as `text`.
pub fn status_of(text: &str) -> pb::ConversationStatus {
    STATUSES
        .iter()
        .position(|t| *t == text)
        .and_then(|i| pb::ConversationStatus::try_from(i as i32 + 1).ok())
        .unwrap_or(pb::ConversationStatus::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_texts_are_the_contract_names() {
        for (i, text) in INTENTS.iter().enumerate() {
            let intent = pb::Intent::try_from(i as i32 + 1).unwrap();
            assert_eq!(
                intent.as_str_name(),
                format!("INTENT_{}", text.to_uppercase())
            );
        }
        for (i, text) in STATUSES.iter().enumerate() {
            let status = pb::ConversationStatus::try_from(i as i32 + 1).unwrap();
            assert_eq!(
                status.as_str_name(),
                format!("CONVERSATION_STATUS_{}", text.to_uppercase())
            );
        }
        assert!(pb::Intent::try_from(INTENTS.len() as i32 + 1).is_err());
    }

    #[test]
    fn enum_texts_round_trip() {
        assert_eq!(intent_text(pb::Intent::Debug), Some("debug"));
        assert_eq!(intent_text(pb::Intent::Unspecified), None);
        assert_eq!(
            status_text(pb::ConversationStatus::Abandoned),
            Some("abandoned")
        );
        for v in 1..=8 {
            let intent = pb::Intent::try_from(v).unwrap();
            assert_eq!(intent_of(intent_text(intent).unwrap()), intent);
        }
        for (v, text) in (1..=4).zip(STATUSES) {
            let status = pb::ConversationStatus::try_from(v).unwrap();
            assert_eq!(status_text(status), Some(text));
            assert_eq!(status_of(text), status);
        }
    }
}
