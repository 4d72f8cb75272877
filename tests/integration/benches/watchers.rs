//! What idle watchers cost: 10,000 WatchConversation streams open on one conversation
//! instance (over 20 HTTP/2 connections, 100 conversations), the process's resident memory
//! before and after, and the time from an append to its event at every watcher of that
//! conversation. Client and service share the process, so the memory figure is an upper
//! bound for the service's share.
//!
//! `cargo bench -p convoy-integration-tests --bench watchers`

use std::time::{Duration, Instant};

use convoy_integration_tests::{Fleet, channel_to, message, new_conversation};
use convoy_proto::v1 as pb;
use convoy_testkit::Redis;

const WATCHERS: usize = 10_000;
const CONNECTIONS: usize = 20;
const CONVERSATIONS: usize = 100;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    // The watchers measured here are one team's, far past the default stream limits (1024
    // an instance, 64 a team): raise both so every one opens.
    let fleet = Fleet::start_with(
        1,
        &[
            "--redis-url",
            &url,
            "--max-streams",
            "100000",
            "--max-streams-per-team",
            "100000",
        ],
    )
    .await;
    let mut client =
        pb::conversation_service_client::ConversationServiceClient::new(fleet.channel().await);
    let mut names = Vec::new();
    for i in 0..CONVERSATIONS {
        let name = client
            .create_conversation(new_conversation("acme", &format!("w{i}"), ""))
            .await
            .unwrap()
            .into_inner()
            .name;
        names.push(name);
    }
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(channel_to(fleet.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib();
    let mut streams = Vec::with_capacity(WATCHERS);
    for i in 0..WATCHERS {
        let mut watch =
            pb::watch_service_client::WatchServiceClient::new(channels[i % CONNECTIONS].clone());
        let stream = watch
            .watch_conversation(pb::WatchConversationRequest {
                name: names[i % CONVERSATIONS].clone(),
                after_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    println!(
        "{WATCHERS} idle watchers: RSS {before} KiB -> {after} KiB, {:.2} KiB per watcher (client and service)",
        (after.saturating_sub(before)) as f64 / WATCHERS as f64
    );

    // One append to conversation 0: until its event reached every one of its watchers.
    let watching: Vec<usize> = (0..WATCHERS).filter(|i| i % CONVERSATIONS == 0).collect();
    let start = Instant::now();
    client
        .append_events(pb::AppendEventsRequest {
            parent: names[0].clone(),
            events: vec![message(1_793_527_200, "fan out")],
        })
        .await
        .unwrap();
    for i in &watching {
        let got = streams[*i].message().await.unwrap().unwrap();
        assert!(matches!(
            got.item,
            Some(pb::watch_conversation_response::Item::Event(_))
        ));
    }
    println!(
        "an append reached all {} watchers of its conversation in {:?}",
        watching.len(),
        start.elapsed()
    );
}
