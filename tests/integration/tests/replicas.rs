//! Reads through replicas, end to end: a conversation service over a shard with streaming
//! replicas. Reads with a write's consistency token always see the write, even with the
//! replicas' replay paused; reads without one use the replicas (shown by the stale answers of
//! a paused replica); a replica killed under load costs no client read, and serves again
//! once it is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use convoy_integration_tests::{Fleet, new_conversation};
use convoy_proto::consistency::HEADER;
use convoy_proto::v1 as pb;
use convoy_proto::v1::conversation_service_client::ConversationServiceClient;
use sqlx::PgPool;
use tonic::transport::Channel;

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(HEADER, token.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_with_a_token_see_the_write_even_past_a_paused_replica() {
    let fleet = Fleet::start_with_replicas(1, 2, &[]).await;
    let mut client = fleet.client().await;
    let replicas: Vec<PgPool> = fleet.replicas[0]
        .iter()
        .map(|r| PgPool::connect_lazy(&r.dsn()).unwrap())
        .collect();
    // The replicas stop replaying: they keep answering, with old data (both stay eligible
    // for ordinary reads: the two least lagged are kept, under the hard cap).
    for r in &replicas {
        sqlx::query("SELECT pg_wal_replay_pause()")
            .execute(r)
            .await
            .unwrap();
    }
    let mut last = String::new();
    for i in 0..20 {
        let (name, token) = create(&mut client, "ryw", i).await;
        let got = client
            .get_conversation(with_token(
                pb::GetConversationRequest { name: name.clone() },
                &token,
            ))
            .await
            .expect("a read with the token sees the write")
            .into_inner();
        assert_eq!(got.name, name);
        assert!(
            list(&mut client, "ryw", Some(&token)).await.contains(&name),
            "a list with the token includes the write"
        );
        last = name;
    }
    // Without a token, reads go to the (stale) replicas.
    for _ in 0..10 {
        assert!(
            !list(&mut client, "ryw", None).await.contains(&last),
            "a list without a token was served by a paused replica"
        );
    }
    for r in &replicas {
        sqlx::query("SELECT pg_wal_replay_resume()")
            .execute(r)
            .await
            .unwrap();
    }
}

async fn create(
    client: &mut ConversationServiceClient<Channel>,
    team: &str,
    i: usize,
) -> (String, String) {
    let response = client
        .create_conversation(new_conversation(team, &format!("t{i}"), "c"))
        .await
        .unwrap();
    let token = response
        .metadata()
        .get(HEADER)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    (response.into_inner().name, token)
}

/// The names in a team's first page, read with `token` if given.
async fn list(
    client: &mut ConversationServiceClient<Channel>,
    team: &str,
    token: Option<&str>,
) -> Vec<String> {
    let message = pb::ListConversationsRequest {
        parent: format!("teams/{team}"),
        page_size: 100,
        ..Default::default()
    };
    let request = match token {
        Some(token) => with_token(message, token),
        None => tonic::Request::new(message),
    };
    client
        .list_conversations(request)
        .await
        .unwrap()
        .into_inner()
        .conversations
        .into_iter()
        .map(|c| c.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_costs_no_read_and_serves_again_when_back() {
    let mut fleet = Fleet::start_with_replicas(1, 1, &[]).await;
    let mut client = fleet.client().await;
    let name = client
        .create_conversation(new_conversation("load", "t", "c"))
        .await
        .unwrap()
        .into_inner()
        .name;
    // Reads go on until the replica has been down and back, each checked; what counts is
    // that reads ran while it was down, not how many a machine manages in some time.
    let reads = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let reader = {
        let mut client = client.clone();
        let name = name.clone();
        let reads = reads.clone();
        tokio::spawn(async move {
            while !*stopped.borrow() {
                client
                    .get_conversation(pb::GetConversationRequest { name: name.clone() })
                    .await
                    .expect("no client read fails while a replica dies");
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // `n` more reads than now, within a generous bound.
    let more_reads = |n: usize| {
        let reads = reads.clone();
        async move {
            let target = reads.load(Ordering::Relaxed) + n;
            tokio::time::timeout(Duration::from_secs(60), async {
                while reads.load(Ordering::Relaxed) < target {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("reads keep going");
        }
    };
    more_reads(20).await;
    fleet.replicas[0][0].stop().await.unwrap();
    more_reads(50).await;
    fleet.replicas[0][0].restart().await.unwrap();
    more_reads(20).await;
    stop.send(true).unwrap();
    reader.await.unwrap();

    // Readmitted: a paused copy of it answers token-less reads again, with its old data.
    let replica = PgPool::connect(&fleet.replicas[0][0].dsn()).await.unwrap();
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&replica)
        .await
        .unwrap();
    let (newer, _) = create(&mut client, "load", 1).await;
    tokio::time::timeout(Duration::from_secs(15), async {
        while list(&mut client, "load", None).await.contains(&newer) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the restarted replica serves reads again");
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&replica)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_another_shard_still_reads_the_sessions_writes() {
    let fleet = Fleet::start_with_replicas(2, 1, &[]).await;
    let mut client = fleet.client().await;
    let team_on = |shard: usize| {
        (0..)
            .map(|i| format!("cross-{i}"))
            .find(|t| fleet.map.owner_of_team(t) == shard)
            .unwrap()
    };
    let (first, second) = (team_on(0), team_on(1));
    for replicas in &fleet.replicas {
        let replica = PgPool::connect(&replicas[0].dsn()).await.unwrap();
        sqlx::query("SELECT pg_wal_replay_pause()")
            .execute(&replica)
            .await
            .unwrap();
    }
    // A session writes on shard 0, then on shard 1: it holds only the second token.
    let (written, _) = create(&mut client, &first, 0).await;
    let (_, token) = create(&mut client, &second, 0).await;
    for _ in 0..10 {
        assert!(
            list(&mut client, &first, Some(&token))
                .await
                .contains(&written),
            "a read on shard 0 with shard 1's token sees the session's shard-0 write"
        );
    }
}
