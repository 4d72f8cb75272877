//! Live streams: a watcher gets every appended event exactly once and in order, across a
//! reconnect with its resume sequence; a watcher that does not read is told it fell behind
//! (with where to resume) and loses nothing by resuming; a team's watcher sees its
//! conversations' changes and no other team's. All fed by the invalidation bus in a real
//! Redis.

use std::time::Duration;

use convoy_integration_tests::{Fleet, message, new_conversation};
use convoy_proto::v1 as pb;
use convoy_testkit::Redis;
use tonic::Streaming;
use tonic::transport::Channel;

type Conversations = pb::conversation_service_client::ConversationServiceClient<Channel>;
type Watch = pb::watch_service_client::WatchServiceClient<Channel>;

async fn fleet(redis: &Redis) -> Fleet {
    let url = redis.url();
    Fleet::start_with(1, &["--redis-url", &url]).await
}

async fn append(client: &mut Conversations, name: &str, from: i64, n: i64, content: &str) {
    let events = (from..from + n)
        .map(|i| pb::ConversationEvent {
            event_id: format!("e{i}"),
            ..message(1_793_527_200 + i, content)
        })
        .collect();
    client
        .append_events(pb::AppendEventsRequest {
            parent: name.to_owned(),
            events,
        })
        .await
        .unwrap();
}

fn request(name: &str, after_sequence: i64) -> pb::WatchConversationRequest {
    pb::WatchConversationRequest {
        name: name.to_owned(),
        after_sequence,
    }
}

/// A WatchConversation stream of `name` after `after`.
async fn watching(
    watch: &mut Watch,
    name: &str,
    after: i64,
) -> Streaming<pb::WatchConversationResponse> {
    watch
        .watch_conversation(request(name, after))
        .await
        .unwrap()
        .into_inner()
}

/// The next message, within a bound (a hang fails the test, it is not a figure).
async fn next<T>(stream: &mut Streaming<T>) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a message within 20 s")
        .unwrap()
}

/// Events until `last` arrives; panics on anything else.
async fn events_until(
    stream: &mut Streaming<pb::WatchConversationResponse>,
    last: i64,
) -> Vec<pb::ConversationEvent> {
    let mut got = Vec::new();
    while got
        .last()
        .is_none_or(|e: &pb::ConversationEvent| e.sequence < last)
    {
        match next(stream).await.expect("the stream goes on").item {
            Some(pb::watch_conversation_response::Item::Event(e)) => got.push(e),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    got
}

#[tokio::test]
async fn a_watcher_gets_every_event_once_in_order_across_a_reconnect() {
    let redis = Redis::start().await.unwrap();
    let fleet = fleet(&redis).await;
    let mut client = Conversations::new(fleet.channel().await);
    let mut watch = Watch::new(fleet.channel().await);
    let name = client
        .create_conversation(new_conversation("acme", "watched", ""))
        .await
        .unwrap()
        .into_inner()
        .name;
    append(&mut client, &name, 1, 3, "before").await;

    let mut stream = watching(&mut watch, &name, 0).await;
    let mut seen = events_until(&mut stream, 3).await;
    // Live: five appends, one of two events each, from two writers at once.
    let (mut a, mut b) = (client.clone(), client.clone());
    let (n1, n2) = (name.clone(), name.clone());
    tokio::join!(
        async move {
            for i in 0..3 {
                append(&mut a, &n1, 100 + i * 2, 2, "a").await;
            }
        },
        async move {
            for i in 0..2 {
                append(&mut b, &n2, 200 + i * 2, 2, "b").await;
            }
        }
    );
    seen.extend(events_until(&mut stream, 13).await);
    drop(stream);

    // Appended while nobody watches, then resumed from the last sequence seen.
    append(&mut client, &name, 300, 2, "away").await;
    let mut stream = watching(&mut watch, &name, 13).await;
    seen.extend(events_until(&mut stream, 15).await);
    append(&mut client, &name, 400, 1, "after").await;
    seen.extend(events_until(&mut stream, 16).await);

    let sequences: Vec<i64> = seen.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=16).collect::<Vec<_>>(),
        "each once, in order"
    );
    // And they are the stored events, not copies that drifted.
    let stored = client
        .list_events(pb::ListEventsRequest {
            parent: name.clone(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(seen, stored);
}

#[tokio::test]
async fn a_watcher_that_does_not_read_is_told_it_fell_behind_and_loses_nothing_by_resuming() {
    let redis = Redis::start().await.unwrap();
    let fleet = fleet(&redis).await;
    let mut client = Conversations::new(fleet.channel().await);
    let name = client
        .create_conversation(new_conversation("acme", "busy", ""))
        .await
        .unwrap()
        .into_inner()
        .name;
    // Its own connection, so its unread stream's flow-control window fills on its own.
    let mut watch = Watch::new(fleet.channel().await);
    let mut slow = watching(&mut watch, &name, 0).await;
    // 2,000 events of 8 KiB (16 MiB): far past the feed's 256 events, the watcher's 32
    // messages and any HTTP/2 window, while the slow watcher reads nothing.
    let content = "x".repeat(8 << 10);
    for batch in 0..8 {
        append(&mut client, &name, batch * 250 + 1, 250, &content).await;
    }
    // Now it reads: events from 1 on, contiguous, then FellBehind naming the last one.
    let mut delivered = 0;
    let resume = loop {
        match next(&mut slow)
            .await
            .expect("a FellBehind before the end")
            .item
        {
            Some(pb::watch_conversation_response::Item::Event(e)) => {
                assert_eq!(
                    e.sequence,
                    delivered + 1,
                    "contiguous before falling behind"
                );
                delivered = e.sequence;
            }
            Some(pb::watch_conversation_response::Item::FellBehind(f)) => break f.resume_after,
            None => panic!("an empty message"),
        }
    };
    assert_eq!(resume, delivered, "resume after the last event delivered");
    assert!(
        delivered < 2000,
        "it did fall behind ({delivered} delivered)"
    );
    assert!(
        next(&mut slow).await.is_none(),
        "the stream ends after FellBehind"
    );
    println!("the slow watcher got {delivered} events, then FellBehind");

    // Resuming where it was told: the rest, nothing missing.
    let mut resumed = watching(&mut watch, &name, resume).await;
    let rest = events_until(&mut resumed, 2000).await;
    let sequences: Vec<i64> = rest.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (resume + 1..=2000).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_team_watcher_sees_its_teams_changes_and_no_other_teams() {
    let redis = Redis::start().await.unwrap();
    let fleet = fleet(&redis).await;
    let mut client = Conversations::new(fleet.channel().await);
    let mut watch = Watch::new(fleet.channel().await);
    let mut team = watch
        .watch_team(pb::WatchTeamRequest {
            parent: "teams/acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Another team's write first: the acme watcher must never see it.
    client
        .create_conversation(new_conversation("globex", "theirs", ""))
        .await
        .unwrap();
    let created = client
        .create_conversation(new_conversation("acme", "ours", ""))
        .await
        .unwrap()
        .into_inner();
    append(&mut client, &created.name, 1, 1, "hi").await;
    let updated = client
        .update_conversation(pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: created.name.clone(),
                title: "renamed".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["title".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    client
        .delete_conversation(pb::DeleteConversationRequest {
            name: created.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    use pb::conversation_change::Kind;
    let mut changes = Vec::new();
    while changes.len() < 4 {
        match next(&mut team).await.expect("the stream goes on").item {
            Some(pb::watch_team_response::Item::Change(c)) => changes.push(c),
            other => panic!("expected a change, got {other:?}"),
        }
    }
    let got: Vec<(String, Kind, i64)> = changes
        .iter()
        .map(|c| (c.name.clone(), c.kind(), c.version))
        .collect();
    assert_eq!(
        got,
        [
            (created.name.clone(), Kind::Created, created.version),
            (
                created.name.clone(),
                Kind::EventsAppended,
                created.version + 1
            ),
            (created.name.clone(), Kind::Updated, updated.version),
            (created.name.clone(), Kind::Deleted, updated.version + 1),
        ]
    );
    assert!(changes.iter().all(|c| c.commit_time.is_some()));
}

#[tokio::test]
async fn watching_needs_a_real_conversation_and_a_bus() {
    let redis = Redis::start().await.unwrap();
    let fleet = fleet(&redis).await;
    let mut watch = Watch::new(fleet.channel().await);
    let status = watch
        .watch_conversation(request(
            "teams/acme/conversations/77777777-7777-4777-8777-777777777777",
            0,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let status = watch
        .watch_conversation(request(
            "teams/acme/conversations/77777777-7777-4777-8777-777777777777",
            -1,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let without_bus = Fleet::start_with(1, &[]).await;
    let status = Watch::new(without_bus.channel().await)
        .watch_team(pb::WatchTeamRequest {
            parent: "teams/acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
}
