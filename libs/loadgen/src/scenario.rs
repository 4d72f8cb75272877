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
//! Every draw ([`draw`]) comes from the request's sequence number and the run's seed, so two
//! runs with the same seed send the same requests, and the direct-SQL baseline
//! ([`crate::baseline::sql`]) sends the same ones as its scenario.
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

/// What request `n` of a scenario asks for, drawn from the run's seed: the scenario and
/// its direct-SQL baseline draw the same ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Draw {
    /// GetConversation of this name.
    Get {
        /// `teams/.../conversations/...`.
        name: String,
    },
    /// A new conversation of this team, then two messages to it.
    Write {
        /// `teams/...`.
        parent: String,
    },
    /// A page of 20 of this team's conversations.
    List {
        /// `teams/...`.
        parent: String,
    },
    /// A page of 20 of this team's conversations matching a word.
    Search {
        /// `teams/...`.
        parent: String,
        /// One of [`WORDS`].
        query: String,
    },
    /// This team's summary over the last 30 days.
    Analytics {
        /// `teams/...`.
        parent: String,
    },
}

impl Draw {
    /// The team it reads or writes (the id, without `teams/`), which picks its shard.
    pub fn team(&self) -> &str {
        let (Draw::Get { name: parent }
        | Draw::Write { parent }
        | Draw::List { parent }
        | Draw::Search { parent, .. }
        | Draw::Analytics { parent }) = self;
        let team = parent.strip_prefix("teams/").unwrap_or(parent);
        team.split_once('/').map_or(team, |(team, _)| team)
    }
}

/// A seeded conversation by Zipf(1.0) rank (rank 1, the first created, is the hottest).
fn hot_name<'a>(data: &'a DataSet, zipf: &Zipf<f64>, rng: &mut SmallRng) -> &'a str {
    let rank = zipf.sample(rng) as usize;
    &data.names[rank.clamp(1, data.names.len()) - 1]
}

/// Draws request `n` of `scenario` over `data` (with `zipf` from [`zipf_over`]); the
/// returned generator goes on with the request's further draws (a new conversation's words).
pub fn draw(
    scenario: Scenario,
    data: &DataSet,
    zipf: &Zipf<f64>,
    seed: u64,
    n: u64,
) -> (Draw, SmallRng) {
    let mut rng = rng(seed, n);
    let team = |rng: &mut SmallRng| data.teams[rng.random_range(0..data.teams.len())].clone();
    let draw = match scenario {
        Scenario::Scan => Draw::Get {
            name: data.names[(n % data.names.len() as u64) as usize].clone(),
        },
        Scenario::Mixed if rng.random_bool(0.9) => Draw::Get {
            name: hot_name(data, zipf, &mut rng).to_owned(),
        },
        Scenario::Get => Draw::Get {
            name: hot_name(data, zipf, &mut rng).to_owned(),
        },
        Scenario::Write | Scenario::Mixed => Draw::Write {
            parent: team(&mut rng),
        },
        Scenario::ListSearch if rng.random_bool(0.5) => Draw::List {
            parent: team(&mut rng),
        },
        Scenario::ListSearch => Draw::Search {
            parent: team(&mut rng),
            query: WORDS[rng.random_range(0..WORDS.len())].to_owned(),
        },
        Scenario::Analytics => Draw::Analytics {
            parent: team(&mut rng),
        },
    };
    (draw, rng)
}

/// The Zipf(1.0) distribution over `data`'s conversations.
pub fn zipf_over(data: &DataSet) -> Zipf<f64> {
    Zipf::new(data.names.len().max(1) as f64, 1.0).expect("a positive count and exponent")
}

/// Per-request randomness: the same for the same seed and sequence number.
fn rng(seed: u64, n: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The last 30 days (and a minute ahead, for clocks a little apart) of `parent`, as the
/// `analytics` scenario asks for them.
pub fn summary_request(parent: String) -> pb::GetTeamSummaryRequest {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    pb::GetTeamSummaryRequest {
        filter: Some(pb::AnalyticsFilter {
            parent,
            start_time: at(now - 30 * 86_400),
            end_time: at(now + 60),
            ..Default::default()
        }),
    }
}

/// The page size of `list-search`'s requests.
pub const PAGE_SIZE: i32 = 20;

/// The requests of `scenario` against `client` over `data`.
pub fn op(scenario: Scenario, client: &ConvoyClient, data: Arc<DataSet>, seed: u64) -> Op {
    let conversations = client.conversations();
    let analytics = client.analytics();
    let zipf = zipf_over(&data);
    Arc::new(move |n| {
        let (conversations, analytics) = (conversations.clone(), analytics.clone());
        let (draw, mut rng) = draw(scenario, &data, &zipf, seed, n);
        Box::pin(async move {
            match draw {
                Draw::Get { name } => Outcome::from(
                    &conversations
                        .get_conversation(pb::GetConversationRequest { name })
                        .await,
                ),
                Draw::Write { parent } => {
                    let created = conversations
                        .create_conversation(crate::seed::new_conversation(&parent, &mut rng))
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
                Draw::List { parent } => Outcome::from(
                    &conversations
                        .list_conversations(pb::ListConversationsRequest {
                            parent,
                            page_size: PAGE_SIZE,
                            ..Default::default()
                        })
                        .await,
                ),
                Draw::Search { parent, query } => Outcome::from(
                    &conversations
                        .search_conversations(pb::SearchConversationsRequest {
                            parent,
                            query,
                            page_size: PAGE_SIZE,
                            ..Default::default()
                        })
                        .await,
                ),
                Draw::Analytics { parent } => {
                    Outcome::from(&analytics.get_team_summary(summary_request(parent)).await)
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

    fn data() -> DataSet {
        DataSet {
            teams: (0..5).map(|i| format!("teams/t-{i}")).collect(),
            names: (0..100)
                .map(|i| format!("teams/t-{}/conversations/{i}", i % 5))
                .collect(),
        }
    }

    #[test]
    fn a_draw_names_the_team_that_picks_its_shard() {
        let get = Draw::Get {
            name: "teams/acme/conversations/0190".into(),
        };
        assert_eq!(get.team(), "acme");
        let list = Draw::List {
            parent: "teams/acme".into(),
        };
        assert_eq!(list.team(), "acme");
    }

    #[test]
    fn scenarios_draw_their_mix_and_the_same_seed_draws_the_same() {
        let data = data();
        let zipf = zipf_over(&data);
        let draws = |scenario, seed| {
            (0..1000)
                .map(|n| draw(scenario, &data, &zipf, seed, n).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(Scenario::Mixed, 3), draws(Scenario::Mixed, 3));
        let writes = draws(Scenario::Mixed, 3)
            .iter()
            .filter(|d| matches!(d, Draw::Write { .. }))
            .count();
        assert!((60..=140).contains(&writes), "{writes} writes of 1000");
        let searches = draws(Scenario::ListSearch, 3)
            .iter()
            .filter(|d| matches!(d, Draw::Search { query, .. } if WORDS.contains(&query.as_str())))
            .count();
        assert!(
            (420..=580).contains(&searches),
            "{searches} searches of 1000"
        );
        // A scan reads every conversation in turn.
        let scanned = draws(Scenario::Scan, 3);
        assert_eq!(
            scanned[..100],
            data.names
                .iter()
                .map(|name| Draw::Get { name: name.clone() })
                .collect::<Vec<_>>()[..]
        );
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
