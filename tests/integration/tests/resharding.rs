//! Online resharding against real etcd and Postgres: a slot range moves to a new shard while
//! clients write and read through a conversation instance that follows the map in etcd.
//! Afterwards every acknowledged write is stored exactly once, on the shard that owns it,
//! and no client call failed: fenced writes were retried inside the service.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoy_integration_tests::{Instance, Router, message, new_conversation};
use convoy_proto::v1 as pb;
use convoy_proto::v1::conversation_service_client::ConversationServiceClient;
use convoy_proto::v1::shard_router_service_client::ShardRouterServiceClient;
use convoy_store::{Epoch, Shard, ShardId, ShardMap, Slot};
use convoy_testkit::{Etcd, Postgres, Redis};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tonic::transport::Channel;

const MOVED: RangeInclusive<u16> = 0..=255;

fn seed(shards: &[Postgres]) -> ShardMap {
    ShardMap::new(
        Epoch(1),
        vec![
            (
                Shard {
                    id: ShardId::new("shard-0").unwrap(),
                    primary: shards[0].dsn(),
                    replicas: Vec::new(),
                },
                vec![0..=511],
            ),
            (
                Shard {
                    id: ShardId::new("shard-1").unwrap(),
                    primary: shards[1].dsn(),
                    replicas: Vec::new(),
                },
                vec![512..=1023],
            ),
        ],
    )
    .unwrap()
}

/// Teams, half of them in the `moved` range.
fn teams(moved_range: &RangeInclusive<u16>) -> Vec<String> {
    let (mut moved, mut staying) = (Vec::new(), Vec::new());
    for i in 0.. {
        let team = format!("team-{i}");
        if moved_range.contains(&Slot::for_team(&team).get()) {
            if moved.len() < 12 {
                moved.push(team);
            }
        } else if staying.len() < 12 {
            staying.push(team);
        }
        if moved.len() == 12 && staying.len() == 12 {
            break;
        }
    }
    moved.into_iter().chain(staying).collect()
}

/// What clients were told: each acknowledged conversation and how many events it holds.
#[derive(Default)]
struct Acked {
    events: HashMap<String, i64>,
    failures: Vec<String>,
    /// Slowest acknowledged write to a team in the moved range.
    slowest_moved_write: Duration,
}

async fn write_loop(
    mut client: ConversationServiceClient<Channel>,
    teams: Arc<Vec<String>>,
    range: RangeInclusive<u16>,
    acked: Arc<Mutex<Acked>>,
    worker: usize,
    until: Arc<tokio::sync::Notify>,
) {
    let mut round = 0usize;
    let stop = until.notified();
    tokio::pin!(stop);
    loop {
        let team = &teams[(worker * 7 + round) % teams.len()];
        let moved = range.contains(&Slot::for_team(team).get());
        round += 1;
        let mut create = new_conversation(team, &format!("w{worker} r{round}"), "body");
        create.request_id = uuid::Uuid::now_v7().to_string();
        let mut slowest = Duration::ZERO;
        let written = async {
            let started = Instant::now();
            let c = client.create_conversation(create).await?.into_inner();
            slowest = started.elapsed();
            let started = Instant::now();
            client
                .append_events(pb::AppendEventsRequest {
                    parent: c.name.clone(),
                    events: vec![message(1, "a"), message(2, "b")],
                })
                .await?;
            slowest = slowest.max(started.elapsed());
            Ok::<_, tonic::Status>(c.name)
        }
        .await;
        {
            let mut acked = acked.lock().unwrap();
            match written {
                Ok(name) => {
                    acked.events.insert(name, 2);
                    if moved {
                        acked.slowest_moved_write = acked.slowest_moved_write.max(slowest);
                    }
                }
                Err(status) => acked.failures.push(format!("write: {status}")),
            }
        }
        if tokio::time::timeout(Duration::from_millis(5), &mut stop)
            .await
            .is_ok()
        {
            return;
        }
    }
}

async fn read_loop(
    mut client: ConversationServiceClient<Channel>,
    acked: Arc<Mutex<Acked>>,
    until: Arc<tokio::sync::Notify>,
) -> usize {
    let mut reads = 0;
    let stop = until.notified();
    tokio::pin!(stop);
    loop {
        let names: Vec<String> = acked
            .lock()
            .unwrap()
            .events
            .keys()
            .take(50)
            .cloned()
            .collect();
        for name in names {
            match client
                .get_conversation(pb::GetConversationRequest { name: name.clone() })
                .await
            {
                Ok(_) => reads += 1,
                Err(status) => acked
                    .lock()
                    .unwrap()
                    .failures
                    .push(format!("read {name}: {status}")),
            }
        }
        if tokio::time::timeout(Duration::from_millis(5), &mut stop)
            .await
            .is_ok()
        {
            return reads;
        }
    }
}

/// Writers (and optionally a reader) running against the fleet until [`Load::stop`].
struct Load {
    acked: Arc<Mutex<Acked>>,
    stop: Arc<tokio::sync::Notify>,
    writers: JoinSet<()>,
    reader: Option<tokio::task::JoinHandle<usize>>,
}

impl Load {
    /// Writers to teams half of which lie in `range` (the moved one), and a reader if asked.
    fn start(
        client: &ConversationServiceClient<Channel>,
        range: RangeInclusive<u16>,
        writers: usize,
        read: bool,
    ) -> Load {
        let teams = Arc::new(teams(&range));
        let acked = Arc::new(Mutex::new(Acked::default()));
        let stop = Arc::new(tokio::sync::Notify::new());
        let mut set = JoinSet::new();
        for worker in 0..writers {
            set.spawn(write_loop(
                client.clone(),
                teams.clone(),
                range.clone(),
                acked.clone(),
                worker,
                stop.clone(),
            ));
        }
        let reader =
            read.then(|| tokio::spawn(read_loop(client.clone(), acked.clone(), stop.clone())));
        Load {
            acked,
            stop,
            writers: set,
            reader,
        }
    }

    /// Waits until `n` writes are acknowledged.
    async fn until_written(&self, n: usize) {
        while self.acked.lock().unwrap().events.len() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the load; what clients were told, and how many reads succeeded.
    async fn stop(mut self) -> (Acked, usize) {
        self.stop.notify_waiters();
        while self.writers.join_next().await.is_some() {}
        let reads = match self.reader.take() {
            Some(reader) => reader.await.unwrap(),
            None => 0,
        };
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (acked, reads)
    }
}

/// How many rows of conversation `name` (and of its events) shard `pool` holds.
async fn stored(pool: &PgPool, name: &str) -> (i64, i64) {
    let parts: Vec<&str> = name.split('/').collect();
    let (team, id) = (parts[1], uuid::Uuid::parse_str(parts[3]).unwrap());
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM conversations WHERE team_id = $1 AND id = $2), \
                (SELECT count(*) FROM conversation_events WHERE team_id = $1 AND conversation_id = $2)",
    )
    .bind(team)
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The operations holding outbox rows on a shard.
async fn outbox_holds(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT operation_id FROM outbox_holds ORDER BY operation_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn wait_done(router: &mut ShardRouterServiceClient<Channel>, name: &str) -> pb::Operation {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        // A router being replaced answers UNAVAILABLE for a moment.
        if let Ok(op) = router
            .get_operation(pb::GetOperationRequest { name: name.into() })
            .await
        {
            let op = op.into_inner();
            if op.done {
                return op;
            }
        }
        assert!(Instant::now() < deadline, "the move did not finish in 90 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn phase(router: &mut ShardRouterServiceClient<Channel>, name: &str) -> Option<i32> {
    router
        .get_operation(pb::GetOperationRequest { name: name.into() })
        .await
        .ok()
        .map(|op| op.into_inner().phase)
}

struct Setup {
    etcd: Etcd,
    shards: Vec<Postgres>,
    pools: Vec<PgPool>,
    seed: ShardMap,
    instance: Instance,
    client: ConversationServiceClient<Channel>,
}

/// Three shards (the map on the first two), etcd, and a conversation instance following
/// the map with `extra` flags.
async fn setup(extra: &[&str]) -> Setup {
    let etcd = Etcd::start().await.unwrap();
    let shards = convoy_testkit::start_postgres_shards(3).await.unwrap();
    let seed = seed(&shards);
    let endpoint = etcd.endpoint();
    // A first router publishes the map; the instance follows it.
    let publisher = Router::start(&endpoint, &seed, &[]).await;
    drop(publisher);
    let mut flags = vec!["--shard-map-from-etcd", "--etcd-endpoint", &endpoint];
    flags.extend(extra);
    let instance = Instance::start_with_flags(&flags).await;
    let client =
        ConversationServiceClient::new(convoy_integration_tests::channel_to(instance.addr).await);
    let mut pools = Vec::new();
    for shard in &shards {
        pools.push(PgPool::connect(&shard.dsn()).await.unwrap());
    }
    Setup {
        etcd,
        shards,
        pools,
        seed,
        instance,
        client,
    }
}

/// Adds the third shard (`shard-2`, the moves' target) to the map through `router`.
async fn add_target(router: &mut Router, s: &Setup) {
    router
        .client
        .add_shard(pb::AddShardRequest {
            shard_id: "shard-2".into(),
            primary_address: format!("127.0.0.1:{}", s.shards[2].port()),
            replica_addresses: Vec::new(),
        })
        .await
        .unwrap();
}

/// Every acknowledged conversation is stored exactly once, on its owner (shard-2 for the
/// `moved` range), with its events.
async fn assert_placed(pools: &[PgPool], acked: &Acked, moved: &RangeInclusive<u16>) {
    for (name, events) in &acked.events {
        let team = name.split('/').nth(1).unwrap();
        let owner = if moved.contains(&Slot::for_team(team).get()) {
            2
        } else if Slot::for_team(team).get() < 512 {
            0
        } else {
            1
        };
        for (index, pool) in pools.iter().enumerate() {
            let (rows, stored_events) = stored(pool, name).await;
            if index == owner {
                assert_eq!(
                    (rows, stored_events),
                    (1, *events),
                    "{name} on its owner shard-{index}"
                );
            } else {
                assert_eq!(
                    (rows, stored_events),
                    (0, 0),
                    "{name} also on shard-{index}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moving_half_of_shard_0_under_load_loses_nothing_and_no_client_call_fails() {
    let s = setup(&[]).await;
    let mut router = Router::start(
        &s.etcd.endpoint(),
        &s.seed,
        &["--move-cleanup-grace-ms", "300"],
    )
    .await;
    let load = Load::start(&s.client, MOVED, 4, true);
    // Some data before the move.
    load.until_written(200).await;

    // Driven as an operator would: `convoyctl reshard --start 0 --end 255 --to shard-2
    // --add-primary ...`, through a router it finds in etcd.
    let etcd = convoy_discovery::EtcdConfig {
        endpoints: vec![s.etcd.endpoint()],
        ..Default::default()
    };
    let plan = convoyctl::reshard::Reshard {
        start: *MOVED.start(),
        end: *MOVED.end(),
        to: "shard-2".into(),
        add_primary: Some(format!("127.0.0.1:{}", s.shards[2].port())),
        add_replicas: Vec::new(),
    };
    let mut phases = Vec::new();
    let access = convoyctl::access::Access::default();
    let reshard = convoyctl::reshard::reshard(&etcd, &access, &plan, |op| {
        let phase = convoyctl::reshard::phase(op);
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
    });
    // The CLI waits as long as the move takes; the test does not.
    let done = tokio::time::timeout(Duration::from_secs(90), reshard)
        .await
        .expect("the move finishes within 90 s")
        .unwrap();
    assert_eq!(phases.last(), Some(&"done"), "phases seen: {phases:?}");
    // Load goes on a little on the new map, then stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (acked, reads) = load.stop().await;

    assert_eq!(done.phase, pb::operation::Phase::Done as i32, "{done:?}");
    let pause = done.write_pause.expect("the write pause is reported");
    let pause = Duration::new(pause.seconds as u64, pause.nanos as u32);
    println!("{}", convoyctl::reshard::summary(&done));
    println!(
        "moved slots {MOVED:?}: {} rows copied, write pause {pause:?}, slowest acknowledged \
         write to the moved range {:?}, {} writes and {reads} reads acknowledged",
        done.rows_copied,
        acked.slowest_moved_write,
        acked.events.len()
    );
    assert!(
        acked.failures.is_empty(),
        "client calls failed: {:?}",
        acked.failures
    );
    assert!(reads > 0);
    assert_placed(&s.pools, &acked, &MOVED).await;

    // The map routes the range to shard-2, and the service follows it.
    let map = router
        .client
        .get_shard_map(pb::GetShardMapRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        map.ranges
            .iter()
            .any(|r| (r.start, r.end, r.shard.as_str()) == (0, 255, "shard-2"))
    );
    drop(s.instance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_survives_a_router_and_etcd_restart_and_a_cancelled_one_changes_nothing() {
    let mut s = setup(&[]).await;
    let endpoint = s.etcd.endpoint();
    let slow = [
        "--move-cleanup-grace-ms",
        "100",
        "--fault-move-step-pause-ms",
        "150",
    ];
    let mut first = Router::start(&endpoint, &s.seed, &slow).await;
    let load = Load::start(&s.client, MOVED, 2, false);
    load.until_written(100).await;
    add_target(&mut first, &s).await;

    // A move cancelled before its cut-over leaves everything where it was.
    let cancelled = first
        .client
        .move_slots(pb::MoveSlotsRequest {
            start: 0,
            end: 255,
            to_shard: "shard-2".into(),
            request_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    while phase(&mut first.client, &cancelled.name).await
        != Some(pb::operation::Phase::Copying as i32)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first
        .client
        .cancel_operation(pb::CancelOperationRequest {
            name: cancelled.name.clone(),
        })
        .await
        .unwrap();
    let over = wait_done(&mut first.client, &cancelled.name).await;
    assert_eq!(
        over.phase,
        pb::operation::Phase::Cancelled as i32,
        "{over:?}"
    );
    let on_target: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&s.pools[2])
        .await
        .unwrap();
    assert_eq!(on_target, 0, "a cancelled move leaves no copies");
    assert_eq!(
        outbox_holds(&s.pools[0]).await,
        Vec::<String>::new(),
        "a cancelled move drops its outbox hold"
    );

    // A move interrupted mid-copy by a router crash and an etcd restart is resumed by the
    // next leader.
    let op = first
        .client
        .move_slots(pb::MoveSlotsRequest {
            start: 0,
            end: 255,
            to_shard: "shard-2".into(),
            request_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    while phase(&mut first.client, &op.name).await != Some(pb::operation::Phase::Copying as i32) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(first);
    // A hold whose driver died after its operation's record went: the next leader's sweep
    // drops it, while the interrupted move's own hold stands until that move ends.
    sqlx::query("INSERT INTO outbox_holds (operation_id, after_id) VALUES ('vanished', 0)")
        .execute(&s.pools[0])
        .await
        .unwrap();
    s.etcd.restart().await.unwrap();
    let mut second = Router::start(&endpoint, &s.seed, &["--move-cleanup-grace-ms", "100"]).await;
    let done = wait_done(&mut second.client, &op.name).await;
    assert_eq!(
        outbox_holds(&s.pools[0]).await,
        Vec::<String>::new(),
        "the finished move dropped its hold, the sweep the vanished one's"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (acked, _) = load.stop().await;

    assert_eq!(done.phase, pb::operation::Phase::Done as i32, "{done:?}");
    assert!(
        acked.failures.is_empty(),
        "client calls failed: {:?}",
        acked.failures
    );
    assert_placed(&s.pools, &acked, &MOVED).await;
    drop(s.instance);
}

/// One copy step's worth of slots: the long move's length is its pauses, not its copying.
const HELD_OPEN: RangeInclusive<u16> = 0..=15;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_held_open_past_the_outbox_purge_under_writes_loses_nothing() {
    // The instance relays its outbox and purges rows published over a second ago, every
    // second: an hour's retention, shrunk.
    let redis = Redis::start().await.unwrap();
    let s = setup(&[
        "--redis-url",
        &redis.url(),
        "--outbox-retention-secs",
        "1",
        "--purge-interval-secs",
        "1",
    ])
    .await;
    // Every step of the move is followed by 2.5 s, past retention plus a purge interval:
    // the changes a catch-up replays were purgeable before it ran. One pass, then the cut
    // over, whose tail replays the rest.
    let mut router = Router::start(
        &s.etcd.endpoint(),
        &s.seed,
        &[
            "--move-cleanup-grace-ms",
            "100",
            "--fault-move-step-pause-ms",
            "2500",
            "--move-tail-threshold",
            "1000000",
        ],
    )
    .await;
    add_target(&mut router, &s).await;
    let load = Load::start(&s.client, HELD_OPEN, 2, false);
    load.until_written(50).await;
    let source = &s.pools[0];
    // At most the hold the move sets: every row up to it is the purge's to take.
    let first_id: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM outbox")
        .fetch_one(source)
        .await
        .unwrap();
    let op = router
        .client
        .move_slots(pb::MoveSlotsRequest {
            start: i32::from(*HELD_OPEN.start()),
            end: i32::from(*HELD_OPEN.end()),
            to_shard: "shard-2".into(),
            request_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap()
        .into_inner();

    // While the move runs, the purge goes on: rows from before the move go, rows the move
    // may still replay stay past their retention.
    let (mut purged_before, mut kept_past_retention) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let (oldest, kept): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(min(id), 0), \
               count(*) FILTER (WHERE published_at < now() - interval '3 seconds') FROM outbox",
        )
        .fetch_one(source)
        .await
        .unwrap();
        if let Ok(current) = router
            .client
            .get_operation(pb::GetOperationRequest {
                name: op.name.clone(),
            })
            .await
        {
            let current = current.into_inner();
            if current.done {
                break current;
            }
            purged_before |= oldest > first_id;
            kept_past_retention |= kept > 0;
        }
        assert!(Instant::now() < deadline, "the move did not finish in 90 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (acked, _) = load.stop().await;

    assert_eq!(done.phase, pb::operation::Phase::Done as i32, "{done:?}");
    assert!(
        purged_before,
        "the purge ran during the move (rows before its watermark went)"
    );
    assert!(
        kept_past_retention,
        "rows the move could replay outlived their retention"
    );
    assert!(
        acked.failures.is_empty(),
        "client calls failed: {:?}",
        acked.failures
    );
    let moved = acked
        .events
        .keys()
        .filter(|name| {
            let team = name.split('/').nth(1).unwrap();
            HELD_OPEN.contains(&Slot::for_team(team).get())
        })
        .count();
    println!(
        "{} writes acknowledged, {moved} to the moved range, over a {} s move",
        acked.events.len(),
        (done.update_time.unwrap().seconds - done.create_time.unwrap().seconds)
    );
    assert_placed(&s.pools, &acked, &HELD_OPEN).await;
    assert!(
        outbox_holds(source).await.is_empty(),
        "the move's hold is gone"
    );

    // Without the hold, the purge takes what the move kept.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kept: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE published_at < now() - interval '3 seconds'",
        )
        .fetch_one(source)
        .await
        .unwrap();
        if kept == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{kept} rows outlived the move's hold"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(s.instance);
}
