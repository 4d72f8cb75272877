//! The SDK over the mesh, against real instances found in etcd: restarts, broken and
//! stalled instances cost callers nothing but the retries the budget allows.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use convoy_client::{ClientConfig, ConvoyClient, Discovery};
use convoy_discovery::EtcdConfig;
use convoy_integration_tests::{Fleet, new_conversation};
use convoy_proto::v1 as pb;
use convoy_testkit::Etcd;

fn etcd_flags(etcd: &Etcd) -> Vec<String> {
    vec![
        "--etcd-endpoint".into(),
        etcd.endpoint(),
        "--registration-ttl-secs".into(),
        "2".into(),
    ]
}

/// An SDK client that finds instances in `etcd`.
fn sdk(etcd: &Etcd, config: ClientConfig) -> ConvoyClient {
    ConvoyClient::connect(
        Discovery::Etcd(EtcdConfig {
            endpoints: vec![etcd.endpoint()],
            ..EtcdConfig::default()
        }),
        config,
    )
    .unwrap()
}

fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn a_rolling_restart_of_three_instances_fails_no_idempotent_read() {
    let etcd = Etcd::start().await.unwrap();
    let flags = etcd_flags(&etcd);
    let flags = as_strs(&flags);
    let mut fleet = Fleet::start_with(2, &flags).await;
    let mut instances = vec![
        fleet.spawn_instance(&flags).await,
        fleet.spawn_instance(&flags).await,
    ];

    let client = sdk(&etcd, ClientConfig::default());
    let conversations = client.conversations();
    let created = conversations
        .create_conversation(new_conversation("rolling", "survives restarts", ""))
        .await
        .unwrap()
        .into_inner();

    // A steady stream of reads for the whole restart.
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let reader = {
        let (stop, reads, failures) = (stop.clone(), reads.clone(), failures.clone());
        let conversations = conversations.clone();
        let name = created.name.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match conversations
                    .get_conversation(pb::GetConversationRequest { name: name.clone() })
                    .await
                {
                    Ok(_) => reads.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        eprintln!("read failed: {status:?}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    // Replace each instance in turn: start the new one, then stop the old one gracefully.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.stop_service().await;
    instances.push(fleet.spawn_instance(&flags).await);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        instances.push(fleet.spawn_instance(&flags).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut old = instances.remove(0);
        old.stop().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();

    let (reads, failures) = (
        reads.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );

    assert!(reads > 100, "only {reads} reads went through");
    assert_eq!(
        failures,
        0,
        "{failures} of {} reads failed",
        reads + failures
    );
}

/// Runs `n` reads, eight at a time (so load spreads over every endpoint rather than
/// following the single fastest one); returns how many failed.
async fn read_n(client: &convoy_client::ConversationClient, name: &str, n: usize) -> usize {
    let failed = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (client, name) = (client.clone(), name.to_owned());
            let (failed, next) = (failed.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    if let Err(status) = client
                        .get_conversation(pb::GetConversationRequest { name: name.clone() })
                        .await
                    {
                        eprintln!("read failed: {status:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    failed.load(Ordering::Relaxed)
}

/// Runs `sql` on every shard of `fleet`.
async fn on_every_shard(fleet: &Fleet, sql: &str) {
    for index in 0..fleet.shards.len() {
        let pool = fleet.shard_pool(index).await;
        for statement in sql.split(';').filter(|s| !s.trim().is_empty()) {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
}

#[tokio::test]
async fn an_instance_answering_unavailable_is_ejected_and_readmitted_when_it_recovers() {
    let etcd = Etcd::start().await.unwrap();
    let flags = etcd_flags(&etcd);
    let flags = as_strs(&flags);
    let mut fleet = Fleet::start_with(2, &flags).await;
    let mut healthy = fleet.spawn_instance(&flags).await;

    // Instance B reaches the shards as its own role, which the test can lock out: a real
    // fault of the real server ("role is not permitted to log in"), which B answers
    // UNAVAILABLE at once. (A shard that refuses connections in a transient way instead
    // costs B its pool's acquire timeout per call, and p2c's load estimate steers around
    // it before any breaker needs to.)
    on_every_shard(
        &fleet,
        "CREATE ROLE convoy_b LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public TO convoy_b; \
         GRANT CREATE ON SCHEMA public TO convoy_b; \
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO convoy_b",
    )
    .await;
    let mut b_flags: Vec<String> = flags.iter().map(|s| (*s).to_owned()).collect();
    for shard in &fleet.shards {
        b_flags.push("--shard-dsn".into());
        b_flags.push(
            shard
                .dsn()
                .replace("postgres://postgres@", "postgres://convoy_b@"),
        );
    }
    // The harness passes the superuser DSNs too; B's own flags come last and must win, so
    // B gets only its DSNs: start it over no default shards.
    let b = fleet
        .spawn_instance_with_own_shards(&as_strs(&b_flags))
        .await;

    let client = sdk(&etcd, ClientConfig::default());
    let conversations = client.conversations();
    let name = conversations
        .create_conversation(new_conversation("breaker", "t", ""))
        .await
        .unwrap()
        .into_inner()
        .name;
    assert_eq!(read_n(&conversations, &name, 60).await, 0);

    // Break B.
    on_every_shard(
        &fleet,
        "ALTER ROLE convoy_b NOLOGIN; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'convoy_b'",
    )
    .await;
    assert_eq!(
        read_n(&conversations, &name, 200).await,
        0,
        "retries hide B's failures from callers"
    );
    let (_, retries_while_breaking, _) = conversations.retry_counts();
    assert!(retries_while_breaking > 0, "B was called and failed");
    // Ejected: B gets no more calls, so hardly any more retries are needed (in rotation it
    // would take about half of 200 calls; a slow machine may let the breaker's open
    // interval pass and one half-open probe or two reach B, each costing one retry).
    assert_eq!(read_n(&conversations, &name, 200).await, 0);
    let (_, retries_after, _) = conversations.retry_counts();
    assert!(
        retries_after - retries_while_breaking <= 2,
        "B is out of rotation: {} more retries",
        retries_after - retries_while_breaking
    );

    // Recover B, then leave it alone in the set: reads succeed only if its breaker let a
    // probe through and closed.
    on_every_shard(&fleet, "ALTER ROLE convoy_b LOGIN").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.stop_service().await;
    healthy.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ok = 0;
    for _ in 0..50 {
        if conversations
            .get_conversation(pb::GetConversationRequest { name: name.clone() })
            .await
            .is_ok()
        {
            ok += 1;
        }
    }
    assert!(ok >= 45, "B serves again once recovered ({ok} of 50 reads)");
    drop(b);
}

/// A PostgreSQL address that accepts connections and never answers: a silent network
/// partition, which a real server cannot be made to produce.
async fn silent_database() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_stalled_instance_costs_callers_their_deadline_at_most_and_p2c_moves_away() {
    let etcd = Etcd::start().await.unwrap();
    let flags = etcd_flags(&etcd);
    let flags = as_strs(&flags);
    let fleet = Fleet::start_with(1, &flags).await;
    let _second = fleet.spawn_instance(&flags).await;
    // The stalled instance: its shard never answers, so its calls hang until the caller
    // gives up.
    let (silent, _silent_task) = silent_database().await;
    let silent_dsn = format!("postgres://postgres@{silent}/convoy");
    let mut stalled_flags = flags.clone();
    stalled_flags.extend(["--shard-dsn", &silent_dsn, "--migrate", "false"]);
    let _stalled = fleet.spawn_instance_with_own_shards(&stalled_flags).await;

    let deadline = Duration::from_millis(300);
    let client = sdk(
        &etcd,
        ClientConfig {
            per_call_timeout: deadline,
            ..ClientConfig::default()
        },
    );
    let conversations = client.conversations();
    // Created through the healthy instances (retried past the stalled one if needed).
    let mut name = None;
    for _ in 0..10 {
        if let Ok(created) = conversations
            .create_conversation(new_conversation("stall", "t", ""))
            .await
        {
            name = Some(created.into_inner().name);
            break;
        }
    }
    let name = name.expect("a create succeeds through a healthy instance");

    // Every call, stalled or not, returns within the deadline (with generous slack for a
    // loaded two-core machine: without the deadline a stalled call would take the stalled
    // instance's 2 s pool timeout).
    let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let failures = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let (conversations, name) = (conversations.clone(), name.clone());
            let (slowest, failures) = (slowest.clone(), failures.clone());
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let result = conversations
                    .get_conversation(pb::GetConversationRequest { name })
                    .await;
                let took = started.elapsed();
                let mut slowest = slowest.lock().unwrap();
                *slowest = (*slowest).max(took);
                if let Err(status) = result {
                    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    let slowest = *slowest.lock().unwrap();
    assert!(
        slowest < deadline * 2,
        "a call took {slowest:?} with a {deadline:?} deadline"
    );

    let during = failures.load(Ordering::Relaxed);
    assert!(during > 0, "the burst reached the stalled instance");

    // Its load estimate (a 300 ms peak) now keeps p2c away from it. Not absolutely: just
    // after the burst the healthy instances' own peaks, times their pending calls, can
    // briefly exceed it, and p2c then tries the stalled one (seen: 1 to 5 reads in 200,
    // more on a loaded machine). Load-blind balancing would send it a third (~67); a tenth
    // is the bound.
    let after = read_n(&conversations, &name, 200).await;
    assert!(
        after <= 20,
        "{after} of 200 reads still went to the stalled instance (during the burst: {during} of 64)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_client_reads_its_own_writes_past_a_lagging_replica() {
    let fleet = Fleet::start_with_replicas(1, 1, &[]).await;
    let replica = sqlx::PgPool::connect(&fleet.replicas[0][0].dsn())
        .await
        .unwrap();
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&replica)
        .await
        .unwrap();
    let addr = fleet.addr.to_string();
    let session = ConvoyClient::connect(
        Discovery::Static(vec![addr.clone()]),
        ClientConfig::default(),
    )
    .unwrap()
    .conversations();
    let other = ConvoyClient::connect(
        Discovery::Static(vec![addr]),
        ClientConfig {
            session_consistency: false,
            ..ClientConfig::default()
        },
    )
    .unwrap()
    .conversations();
    let created = session
        .create_conversation(convoy_integration_tests::new_conversation(
            "session", "t", "c",
        ))
        .await
        .unwrap()
        .into_inner();
    let list = |client: convoy_client::ConversationClient| async move {
        client
            .list_conversations(pb::ListConversationsRequest {
                parent: "teams/session".into(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .conversations
            .into_iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
    };
    for _ in 0..10 {
        assert!(
            list(session.clone()).await.contains(&created.name),
            "the writing client reads its write"
        );
    }
    // A client without the session's token may read the paused replica (and miss it).
    let mut missed = false;
    for _ in 0..20 {
        missed |= !list(other.clone()).await.contains(&created.name);
    }
    assert!(
        missed,
        "reads without the token were served by the lagging replica"
    );
}

/// A stand-in cache instance that records the path and `grpc-timeout` of every call it
/// receives and answers UNAVAILABLE (trailers only), so reads go on to the primary: a probe
/// of what the second hop is told, which a real cache instance does not report.
#[derive(Clone, Default)]
struct TimeoutProbe {
    seen: Arc<std::sync::Mutex<Vec<SeenCall>>>,
}

/// A call's path and the `grpc-timeout` it carried.
type SeenCall = (String, Option<Duration>);

impl tonic::server::NamedService for TimeoutProbe {
    const NAME: &'static str = "convoy.v1.CacheService";
}

impl tower::Service<http::Request<tonic::body::Body>> for TimeoutProbe {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                convoy_mesh::deadline::parse_grpc_timeout(v).expect("a well-formed grpc-timeout")
            });
        self.seen
            .lock()
            .unwrap()
            .push((request.uri().path().to_owned(), timeout));
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .header("grpc-message", "probe")
            .body(tonic::body::Body::empty())
            .unwrap();
        std::future::ready(Ok(response))
    }
}

#[tokio::test]
async fn the_callers_deadline_reaches_the_second_hop() {
    let probe = TimeoutProbe::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probe_addr = listener.local_addr().unwrap();
    let _probe_task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(probe.clone())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    ));
    // The service would give its cache calls 10 s: what the probe sees below is the
    // caller's deadline, not the service's own bound.
    let probe_addr = probe_addr.to_string();
    let fleet = Fleet::start_with(
        1,
        &[
            "--cache-addr",
            &probe_addr,
            "--cache-timeout-ms",
            "10000",
            "--local-cache-mib",
            "0",
        ],
    )
    .await;
    let created = fleet
        .client()
        .await
        .create_conversation(new_conversation("deadline", "Two hops", ""))
        .await
        .unwrap()
        .into_inner();

    let deadline = Duration::from_secs(2);
    let margin = Duration::from_millis(5);
    let client = ConvoyClient::connect(
        Discovery::Static(vec![fleet.addr.to_string()]),
        ClientConfig {
            per_call_timeout: deadline,
            deadline_margin: margin,
            // No token: the read may use the caches.
            session_consistency: false,
            ..ClientConfig::default()
        },
    )
    .unwrap();
    let read = client
        .conversations()
        .get_conversation(pb::GetConversationRequest {
            name: created.name.clone(),
        })
        .await
        .expect("the read goes on to the primary past the failing cache")
        .into_inner();
    assert_eq!(read.name, created.name);

    let seen = probe.seen.lock().unwrap().clone();
    let tier_calls: Vec<_> = seen
        .iter()
        .filter(|(path, _)| path.starts_with("/convoy.v1.CacheService/"))
        .collect();
    assert!(!tier_calls.is_empty(), "the read asked the cache tier");
    for (path, timeout) in tier_calls {
        let timeout = timeout.unwrap_or_else(|| panic!("{path} carried no grpc-timeout"));
        // The SDK sent 2 s minus its margin; the service passed on what was left of it.
        assert!(
            timeout > Duration::ZERO && timeout <= deadline - margin,
            "{path}: grpc-timeout {timeout:?}, want what is left of the caller's {deadline:?}"
        );
    }
}
