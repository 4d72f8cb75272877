//! The data set the scenarios read: `count` conversations spread over `teams` teams (so over
//! every shard), each with a title of words from [`WORDS`] (which `list-search` searches
//! for) and a few messages, created through the SDK with bounded concurrency. The names are
//! kept in a JSON file, so later runs read the same data without creating it again.
//!
//! Not here: the requests of a run ([`crate::scenario`]).

use std::path::Path;

use convoy_client::ConvoyClient;
use convoy_proto::v1 as pb;
use futures::StreamExt;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

/// Words of the seeded titles and contents.
pub const WORDS: [&str; 16] = [
    "flaky",
    "test",
    "deploy",
    "timeout",
    "migration",
    "cache",
    "index",
    "panic",
    "retry",
    "schema",
    "latency",
    "refactor",
    "lint",
    "build",
    "shard",
    "query",
];

/// The seeded conversations' teams and names.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DataSet {
    /// `teams/...` parents.
    pub teams: Vec<String>,
    /// `teams/.../conversations/...` names, in creation order.
    pub names: Vec<String>,
}

impl DataSet {
    /// The data set kept at `path`, if it has `count` conversations over `teams` teams.
    pub fn load(path: &Path, count: usize, teams: usize) -> Option<DataSet> {
        let data: DataSet = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        (data.names.len() == count && data.teams.len() == teams).then_some(data)
    }

    /// Writes it to `path`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(
            path,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )
    }
}

/// A new conversation of `parent` with a title and content of random words.
pub fn new_conversation(parent: &str, rng: &mut impl Rng) -> pb::CreateConversationRequest {
    let mut words = |n: usize| {
        (0..n)
            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let title = words(4);
    let content = words(24);
    pb::CreateConversationRequest {
        parent: parent.to_owned(),
        conversation: Some(pb::Conversation {
            title,
            content,
            intent: pb::Intent::Debug as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `n` user messages timed now.
pub fn messages(n: usize, rng: &mut impl Rng) -> Vec<pb::ConversationEvent> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (0..n)
        .map(|_| pb::ConversationEvent {
            kind: pb::EventKind::Message as i32,
            role: pb::Role::User as i32,
            occur_time: Some(prost_types::Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
            }),
            content: WORDS[rng.random_range(0..WORDS.len())].repeat(8),
            ..Default::default()
        })
        .collect()
}

/// Creates `count` conversations over `teams` teams named `{prefix}-{i}`, `concurrency` at
/// a time, calling `progress` with the number done after each; fails at the first error.
pub async fn seed(
    client: &ConvoyClient,
    prefix: &str,
    count: usize,
    teams: usize,
    concurrency: usize,
    progress: impl Fn(u64),
) -> Result<DataSet, tonic::Status> {
    let teams: Vec<String> = (0..teams.max(1))
        .map(|i| format!("teams/{prefix}-{i}"))
        .collect();
    let conversations = client.conversations();
    let teams_ref = &teams;
    let mut created = futures::stream::iter(0..count)
        .map(|i| {
            let conversations = conversations.clone();
            async move {
                let mut rng = SmallRng::seed_from_u64(i as u64);
                let parent = &teams_ref[i % teams_ref.len()];
                let created = conversations
                    .create_conversation(new_conversation(parent, &mut rng))
                    .await?
                    .into_inner();
                conversations
                    .append_events(pb::AppendEventsRequest {
                        parent: created.name.clone(),
                        events: messages(3, &mut rng),
                    })
                    .await?;
                Ok::<_, tonic::Status>((i, created.name))
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut names = vec![String::new(); count];
    let mut done = 0;
    while let Some(result) = created.next().await {
        let (i, name) = result?;
        names[i] = name;
        done += 1;
        progress(done);
    }
    drop(created);
    Ok(DataSet { teams, names })
}
