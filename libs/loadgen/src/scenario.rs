//! What each request of a scenario does, through the SDK users use (`convoy-client`: etcd
//! discovery, p2c balancing, breakers, retries with a budget, deadlines):
//!
//! - `get`: GetConversation of a seeded conversation drawn from a Zipf(1.0) distribution
//!   (a few hot conversations, a long tail), as caches see real traffic;
//! - `write`: CreateConversation then AppendEvents of two messages to it (one request);
//! - `mixed`: 90% `get`, 10% `write`;
//! - `list-search`: half ListConversations (a page of 20 of a team), half
//!   SearchConversations (a word of the seeded titles);
//! - `analytics`: GetTeamSummary of a team over the last 30 days;
//! - `scan`: GetConversation of every seeded conversation in turn (request n reads the
//!   n-th, wrapping), to fill the caches with all of them (memory per cached conversation).
//!
//! Every draw comes from the request's sequence number and the run's seed, so two runs with
//! the same seed send the same requests.
//!
//! Not here: seeding the data ([`crate::seed`]) or offering the load ([`crate::drive`]).

use std::sync::Arc;

use convoy_client::ConvoyClient;
use convoy_proto::v1 as pb;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use crate::drive::Op;
use crate::record::Outcome;
use crate::seed::{DataSet, WORDS};

/// A scenario, by its command-line name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Zipf-distributed GetConversation.
    Get,
    /// Create + AppendEvents.
    Write,
    /// 90% get, 10% write.
    Mixed,
    /// List and Search, half each.
    ListSearch,
    /// GetTeamSummary.
    Analytics,
    /// Every seeded conversation in turn.
    Scan,
}

impl Scenario {
    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Get => "get",
            Scenario::Write => "write",
            Scenario::Mixed => "mixed",
            Scenario::ListSearch => "list-search",
            Scenario::Analytics => "analytics",
            Scenario::Scan => "scan",
        }
    }
}

/// What one request of a scenario is (`mixed` draws one of two per request).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Request {
    Get,
    Scan,
    Write,
    ListSearch,
    Analytics,
}

/// A seeded conversation by Zipf(1.0) rank (rank 1, the first created, is the hottest).
pub(crate) fn hot_name<'a>(data: &'a DataSet, zipf: &Zipf<f64>, rng: &mut SmallRng) -> &'a str {
    let rank = zipf.sample(rng) as usize;
    &data.names[rank.clamp(1, data.names.len()) - 1]
}

/// The Zipf(1.0) distribution over `data`'s conversations.
pub(crate) fn zipf_over(data: &DataSet) -> Zipf<f64> {
    Zipf::new(data.names.len().max(1) as f64, 1.0).expect("a positive count and exponent")
}

/// Per-request randomness: the same for the same seed and sequence number.
pub(crate) fn rng(seed: u64, n: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The requests of `scenario` against `client` over `data`.
pub fn op(scenario: Scenario, client: &ConvoyClient, data: Arc<DataSet>, seed: u64) -> Op {
    let conversations = client.conversations();
    let analytics = client.analytics();
    let zipf = zipf_over(&data);
    Arc::new(move |n| {
        let (conversations, analytics, data) =
            (conversations.clone(), analytics.clone(), data.clone());
        Box::pin(async move {
            let mut rng = rng(seed, n);
            let request = match scenario {
                Scenario::Get => Request::Get,
                Scenario::Scan => Request::Scan,
                Scenario::Write => Request::Write,
                Scenario::Mixed if rng.random_bool(0.9) => Request::Get,
                Scenario::Mixed => Request::Write,
                Scenario::ListSearch => Request::ListSearch,
                Scenario::Analytics => Request::Analytics,
            };
            match request {
                Request::Get | Request::Scan => {
                    let name = if request == Request::Scan {
                        data.names[(n % data.names.len() as u64) as usize].clone()
                    } else {
                        hot_name(&data, &zipf, &mut rng).to_owned()
                    };
                    let got = conversations
                        .get_conversation(pb::GetConversationRequest { name })
                        .await;
                    Outcome::from(&got)
                }
                Request::Write => {
                    let team = &data.teams[rng.random_range(0..data.teams.len())];
                    let created = conversations
                        .create_conversation(crate::seed::new_conversation(team, &mut rng))
                        .await;
                    let created = match created {
                        Ok(created) => created.into_inner(),
                        Err(status) => return Outcome::Failed(status.code()),
                    };
                    let appended = conversations
                        .append_events(pb::AppendEventsRequest {
                            parent: created.name,
                            events: crate::seed::messages(2, &mut rng),
                        })
                        .await;
                    Outcome::from(&appended)
                }
                Request::ListSearch => {
                    let parent = data.teams[rng.random_range(0..data.teams.len())].clone();
                    if rng.random_bool(0.5) {
                        let listed = conversations
                            .list_conversations(pb::ListConversationsRequest {
                                parent,
                                page_size: 20,
                                ..Default::default()
                            })
                            .await;
                        Outcome::from(&listed)
                    } else {
                        let query = WORDS[rng.random_range(0..WORDS.len())].to_owned();
                        let found = conversations
                            .search_conversations(pb::SearchConversationsRequest {
                                parent,
                                query,
                                page_size: 20,
                                ..Default::default()
                            })
                            .await;
                        Outcome::from(&found)
                    }
                }
                Request::Analytics => {
                    let parent = data.teams[rng.random_range(0..data.teams.len())].clone();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64);
                    let summary = analytics
                        .get_team_summary(pb::GetTeamSummaryRequest {
                            filter: Some(pb::AnalyticsFilter {
                                parent,
                                start_time: Some(prost_types::Timestamp {
                                    seconds: now - 30 * 86_400,
                                    nanos: 0,
                                }),
                                end_time: Some(prost_types::Timestamp {
                                    seconds: now + 60,
                                    nanos: 0,
                                }),
                                ..Default::default()
                            }),
                        })
                        .await;
                    Outcome::from(&summary)
                }
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_and_sequence_draw_the_same() {
        let draws = |seed| {
            (0..100)
                .map(|n| rng(seed, n).random_range(0..1_000_000u32))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[test]
    fn zipf_ranks_favour_the_head() {
        let zipf = Zipf::new(1000.0, 1.0).unwrap();
        let mut rng = rng(1, 1);
        let ranks: Vec<usize> = (0..10_000)
            .map(|_| zipf.sample(&mut rng) as usize)
            .collect();
        assert!(ranks.iter().all(|r| (1..=1000).contains(r)));
        let top_ten = ranks.iter().filter(|r| **r <= 10).count();
        // H(10)/H(1000) of the draws: about 39%.
        assert!((3_500..4_300).contains(&top_ten), "{top_ten}");
    }
}
