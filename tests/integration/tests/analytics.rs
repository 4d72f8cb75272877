//! The analytics service against real shards: every answer equals the same aggregate
//! computed directly over all rows (quantiles within the sketch's stated error), a stopped
//! shard is named rather than silently left out, cached answers are invalidated by exactly
//! their team's writes and never older than a token, and the queries use the indexes the
//! schema built for them.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use convoy_integration_tests::{CacheInstance, Fleet, Instance, channel_to, message};
use convoy_proto::consistency::HEADER;
use convoy_proto::v1 as pb;
use convoy_proto::v1::analytics_service_client::AnalyticsServiceClient;
use sqlx::Row;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// The sketch's stated relative error.
const ALPHA: f64 = analytics::aggregate::RELATIVE_ERROR;
/// Where the seeded conversations' creation times start: a UTC midnight three days ago.
fn origin() -> DateTime<Utc> {
    let now = Utc::now().timestamp();
    DateTime::from_timestamp(now - now.rem_euclid(86_400) - 3 * 86_400, 0).unwrap()
}

/// One conversation as the oracle sees it, read straight from a shard.
#[derive(Clone, Debug)]
struct Row_ {
    team: String,
    intent: String,
    status: String,
    messages: i64,
    duration: f64,
    effectiveness: Option<f64>,
    created: i64,
    project: String,
}

/// Teams that land on both shards, with distinct sizes (so "top teams" has one answer).
fn teams(fleet: &Fleet) -> Vec<(String, usize)> {
    let mut per_shard = [Vec::new(), Vec::new()];
    for i in 0.. {
        let team = format!("team-{i}");
        let owner = fleet.map.owner_of_team(&team);
        if per_shard[owner].len() < 3 {
            per_shard[owner].push(team);
        }
        if per_shard.iter().all(|teams| teams.len() == 3) {
            break;
        }
    }
    let [a, b] = per_shard;
    a.into_iter()
        .zip(b)
        .flat_map(|(x, y)| [x, y])
        .enumerate()
        .map(|(i, team)| (team, 12 + 5 * i))
        .collect()
}

/// Creates conversations for `teams` through the API (intents, statuses, scores,
/// metadata and durations varied; some without events, lasting 0 s), then spreads their
/// creation over two days from [`origin`] directly in the shards.
async fn seed(fleet: &Fleet, teams: &[(String, usize)]) {
    let mut client = fleet.client().await;
    let mut n = 0_i64;
    for (team, count) in teams {
        for _ in 0..*count {
            n += 1;
            let mut request =
                convoy_integration_tests::new_conversation(team, &format!("c{n}"), "body");
            let conversation = request.conversation.as_mut().unwrap();
            conversation.intent = (n % 8 + 1) as i32;
            conversation.status = (n % 4 + 1) as i32;
            conversation.effectiveness_score = (n % 3 != 0).then(|| (n % 10) as f64 / 10.0);
            conversation.metadata = BTreeMap::from([("project".into(), format!("p{}", n % 4))]);
            let created = client
                .create_conversation(request)
                .await
                .unwrap()
                .into_inner();
            if n % 7 != 0 {
                // Durations from a second to hours, skewed.
                let duration = ((n * 7919) % 5000) as f64 * 1.9 + 1.0;
                let events = vec![
                    message(1_700_000_000, "hi"),
                    message(1_700_000_000 + duration as i64, "bye"),
                ];
                client
                    .append_events(pb::AppendEventsRequest {
                        parent: created.name,
                        events,
                    })
                    .await
                    .unwrap();
            }
        }
    }
    for index in 0..fleet.shards.len() {
        sqlx::query(
            "UPDATE conversations SET created_at = $1 + make_interval(secs => \
             (abs(hashtext(id::text)) % 172800)::double precision)",
        )
        .bind(origin())
        .execute(&fleet.shard_pool(index).await)
        .await
        .unwrap();
    }
}

/// Every conversation on every shard.
async fn all_rows(fleet: &Fleet) -> Vec<Row_> {
    let mut rows = Vec::new();
    for index in 0..fleet.shards.len() {
        let found = sqlx::query(
            "SELECT team_id, intent, status, message_count, duration_seconds, \
             effectiveness_score, extract(epoch FROM created_at)::bigint, \
             coalesce(metadata ->> 'project', '') FROM conversations",
        )
        .fetch_all(&fleet.shard_pool(index).await)
        .await
        .unwrap();
        rows.extend(found.into_iter().map(|r| Row_ {
            team: r.get(0),
            intent: r.get(1),
            status: r.get(2),
            messages: r.get(3),
            duration: r.get(4),
            effectiveness: r.get(5),
            created: r.get(6),
            project: r.get(7),
        }));
    }
    rows
}

/// Asserts `got` equals the aggregate of `rows` (the oracle), quantiles within the error.
fn assert_aggregates(got: &pb::Aggregates, rows: &[&Row_], what: &str) {
    assert_eq!(got.conversation_count, rows.len() as i64, "{what}: count");
    assert_eq!(
        got.message_total,
        rows.iter().map(|r| r.messages).sum::<i64>(),
        "{what}: messages"
    );
    let mut by_status: BTreeMap<i32, i64> = BTreeMap::new();
    for r in rows {
        *by_status
            .entry(analytics::query::status_of(&r.status) as i32)
            .or_default() += 1;
    }
    let got_status: BTreeMap<i32, i64> =
        got.by_status.iter().map(|s| (s.status, s.count)).collect();
    assert_eq!(got_status, by_status, "{what}: by status");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    let mean = rows.iter().map(|r| r.duration).sum::<f64>() / rows.len() as f64;
    assert!(
        close(got.mean_duration_seconds, mean),
        "{what}: mean duration {} vs {mean}",
        got.mean_duration_seconds
    );
    let scored: Vec<f64> = rows.iter().filter_map(|r| r.effectiveness).collect();
    assert_eq!(got.scored_count, scored.len() as i64, "{what}: scored");
    let mean_effectiveness = scored.iter().sum::<f64>() / scored.len().max(1) as f64;
    assert!(
        close(got.mean_effectiveness, mean_effectiveness),
        "{what}: effectiveness"
    );
    let mut durations: Vec<f64> = rows.iter().map(|r| r.duration).collect();
    durations.sort_by(f64::total_cmp);
    for (q, value) in [
        (0.5, got.p50_duration_seconds),
        (0.95, got.p95_duration_seconds),
        (0.99, got.p99_duration_seconds),
    ] {
        let exact = durations[(q * (durations.len() as f64 - 1.0)) as usize];
        assert!(
            (value - exact).abs() <= ALPHA * exact + 1e-9,
            "{what}: q{q} {value} vs exact {exact}"
        );
    }
    assert_eq!(got.quantile_relative_error, ALPHA);
}

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

fn filter(team: &str) -> Option<pb::AnalyticsFilter> {
    Some(pb::AnalyticsFilter {
        parent: format!("teams/{team}"),
        start_time: ts(origin().timestamp()),
        end_time: ts(origin().timestamp() + 2 * 86_400),
        ..Default::default()
    })
}

async fn client(instance: &Instance) -> AnalyticsServiceClient<Channel> {
    AnalyticsServiceClient::new(channel_to(instance.addr).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_equals_the_aggregate_over_all_rows() {
    let fleet = Fleet::start(2).await;
    let teams = teams(&fleet);
    seed(&fleet, &teams).await;
    let rows = all_rows(&fleet).await;
    let analytics = fleet.start_analytics(&[]).await;
    let mut client = client(&analytics).await;

    for (team, count) in &teams {
        let mine: Vec<&Row_> = rows.iter().filter(|r| &r.team == team).collect();
        assert_eq!(mine.len(), *count);
        let summary = client
            .get_team_summary(pb::GetTeamSummaryRequest {
                filter: filter(team),
            })
            .await
            .unwrap()
            .into_inner();
        assert_aggregates(summary.aggregates.as_ref().unwrap(), &mine, team);
        let coverage = summary.coverage.unwrap();
        let owner = format!("shard-{}", fleet.map.owner_of_team(team));
        assert_eq!(coverage.shards, [owner]);
        assert!(coverage.missing_shards.is_empty() && !coverage.cached);

        // Filtered by intent and status.
        let mut filtered = filter(team).unwrap();
        filtered.intent = pb::Intent::Feature as i32;
        filtered.status = pb::ConversationStatus::Completed as i32;
        let got = client
            .get_team_summary(pb::GetTeamSummaryRequest {
                filter: Some(filtered),
            })
            .await
            .unwrap()
            .into_inner();
        let want: Vec<&Row_> = mine
            .iter()
            .copied()
            .filter(|r| r.intent == "feature" && r.status == "completed")
            .collect();
        assert_eq!(
            got.aggregates.unwrap().conversation_count,
            want.len() as i64,
            "{team}: filtered"
        );

        // By intent.
        let breakdown = client
            .get_intent_breakdown(pb::GetIntentBreakdownRequest {
                filter: filter(team),
            })
            .await
            .unwrap()
            .into_inner();
        let mut intents: BTreeMap<&str, Vec<&Row_>> = BTreeMap::new();
        for r in &mine {
            intents.entry(r.intent.as_str()).or_default().push(r);
        }
        assert_eq!(breakdown.rows.len(), intents.len(), "{team}: intents");
        for row in &breakdown.rows {
            let intent = analytics::query::intent_text(row.intent()).unwrap();
            assert_aggregates(row.aggregates.as_ref().unwrap(), &intents[intent], intent);
        }

        // Per hour and per day (buckets are UTC-aligned).
        for (width, seconds) in [
            (pb::BucketWidth::Hour, 3600),
            (pb::BucketWidth::Day, 86_400),
        ] {
            let series = client
                .get_time_series(pb::GetTimeSeriesRequest {
                    filter: filter(team),
                    bucket_width: width as i32,
                })
                .await
                .unwrap()
                .into_inner();
            let mut buckets: BTreeMap<i64, Vec<&Row_>> = BTreeMap::new();
            for r in &mine {
                buckets
                    .entry(r.created - r.created.rem_euclid(seconds))
                    .or_default()
                    .push(r);
            }
            let starts: Vec<i64> = series
                .buckets
                .iter()
                .map(|b| b.start_time.unwrap().seconds)
                .collect();
            assert_eq!(starts, buckets.keys().copied().collect::<Vec<_>>());
            for bucket in &series.buckets {
                let start = bucket.start_time.unwrap().seconds;
                assert_aggregates(
                    bucket.aggregates.as_ref().unwrap(),
                    &buckets[&start],
                    "bucket",
                );
            }
        }

        // By a metadata key, largest groups first.
        let projects = client
            .get_metadata_breakdown(pb::GetMetadataBreakdownRequest {
                filter: filter(team),
                key: "project".into(),
                limit: 2,
            })
            .await
            .unwrap()
            .into_inner();
        let mut groups: BTreeMap<&str, Vec<&Row_>> = BTreeMap::new();
        for r in &mine {
            groups.entry(r.project.as_str()).or_default().push(r);
        }
        let mut expected: Vec<(&str, usize)> = groups.iter().map(|(p, v)| (*p, v.len())).collect();
        expected.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        expected.truncate(2);
        let got: Vec<(&str, usize)> = projects
            .rows
            .iter()
            .map(|r| {
                (
                    r.value.as_str(),
                    r.aggregates.as_ref().unwrap().conversation_count as usize,
                )
            })
            .collect();
        assert_eq!(got, expected, "{team}: projects");
    }

    // The fleet: the busiest teams over both shards.
    let overview = client
        .get_fleet_overview(pb::GetFleetOverviewRequest {
            start_time: ts(origin().timestamp()),
            end_time: ts(origin().timestamp() + 2 * 86_400),
            limit: 4,
            require_complete: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut by_size = teams.clone();
    by_size.sort_by_key(|t| std::cmp::Reverse(t.1));
    let names: Vec<String> = overview.rows.iter().map(|r| r.team.clone()).collect();
    let want: Vec<String> = by_size[..4]
        .iter()
        .map(|(t, _)| format!("teams/{t}"))
        .collect();
    assert_eq!(names, want);
    for row in &overview.rows {
        let team = row.team.strip_prefix("teams/").unwrap();
        let mine: Vec<&Row_> = rows.iter().filter(|r| r.team == team).collect();
        assert_aggregates(row.aggregates.as_ref().unwrap(), &mine, team);
    }
    assert_eq!(overview.coverage.unwrap().shards, ["shard-0", "shard-1"]);

    // A range that holds nothing answers zeros, not an error.
    let empty = client
        .get_team_summary(pb::GetTeamSummaryRequest {
            filter: Some(pb::AnalyticsFilter {
                parent: "teams/nobody".into(),
                start_time: ts(0),
                end_time: ts(86_400),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(empty.aggregates.unwrap().conversation_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_shard_is_named_never_silently_left_out() {
    let mut fleet = Fleet::start(2).await;
    let teams = teams(&fleet);
    seed(&fleet, &teams[..2]).await;
    let analytics = fleet.start_analytics(&["--shard-timeout-ms", "2000"]).await;
    let mut client = client(&analytics).await;
    fleet.shards[1].stop().await.unwrap();

    let overview = |require_complete| pb::GetFleetOverviewRequest {
        start_time: ts(origin().timestamp()),
        end_time: ts(origin().timestamp() + 2 * 86_400),
        limit: 10,
        require_complete,
    };
    let partial = client
        .get_fleet_overview(overview(false))
        .await
        .unwrap()
        .into_inner();
    let coverage = partial.coverage.unwrap();
    assert_eq!(coverage.shards, ["shard-0"]);
    assert_eq!(coverage.missing_shards, ["shard-1"]);
    let on_shard_0: Vec<String> = teams[..2]
        .iter()
        .filter(|(t, _)| fleet.map.owner_of_team(t) == 0)
        .map(|(t, _)| format!("teams/{t}"))
        .collect();
    assert_eq!(
        partial
            .rows
            .iter()
            .map(|r| r.team.clone())
            .collect::<Vec<_>>(),
        on_shard_0
    );

    let status = client.get_fleet_overview(overview(true)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let info = status.get_details_error_info().expect("ErrorInfo details");
    assert_eq!(info.reason, "SHARDS_MISSING");
    assert_eq!(info.metadata["missing_shards"], "shard-1");

    // A team on the stopped shard: an empty answer that says why.
    let (team, _) = teams[..2]
        .iter()
        .find(|(t, _)| fleet.map.owner_of_team(t) == 1)
        .unwrap();
    let summary = client
        .get_team_summary(pb::GetTeamSummaryRequest {
            filter: filter(team),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.aggregates.unwrap().conversation_count, 0);
    assert_eq!(summary.coverage.unwrap().missing_shards, ["shard-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_follow_their_teams_writes_and_tokens() {
    let redis = convoy_testkit::Redis::start().await.unwrap();
    let url = redis.url();
    let fleet = Fleet::start_with_replicas(2, 1, &["--redis-url", &url]).await;
    let cache = CacheInstance::start(&url, &[]).await;
    let cache_addr = cache.addr.to_string();
    let analytics = fleet.start_analytics(&["--cache-addr", &cache_addr]).await;
    // The tier serves once the fleet's relay vouches for the bus.
    cache.wait_bus_current().await;
    let mut client = client(&analytics).await;
    let mut conversations = fleet.client().await;
    let teams = teams(&fleet);
    let (a, b) = (&teams[0].0, &teams[1].0);
    let now = Utc::now().timestamp();
    let today = |team: &str| pb::GetTeamSummaryRequest {
        filter: Some(pb::AnalyticsFilter {
            parent: format!("teams/{team}"),
            start_time: ts(now - 3600),
            end_time: ts(now + 3600),
            ..Default::default()
        }),
    };
    for team in [a, b] {
        conversations
            .create_conversation(convoy_integration_tests::new_conversation(
                team, "first", "",
            ))
            .await
            .unwrap();
    }
    // Their invalidations first: one landing while an answer is computed cancels its fill
    // (the lease is bound to the team's tag), and the repeat below would be a miss.
    fleet.wait_outbox_published().await;
    // Computed and stored, then served from the cache.
    for team in [a, b] {
        let first = client
            .get_team_summary(today(team))
            .await
            .unwrap()
            .into_inner();
        assert!(!first.coverage.unwrap().cached);
        let again = client
            .get_team_summary(today(team))
            .await
            .unwrap()
            .into_inner();
        assert!(
            again.coverage.unwrap().cached,
            "{team}: a repeat is served from the cache"
        );
        assert_eq!(again.aggregates.unwrap().conversation_count, 1);
    }

    // A write to team a; its token reads the new count at once, bus or not.
    let written = conversations
        .create_conversation(convoy_integration_tests::new_conversation(a, "second", ""))
        .await
        .unwrap();
    let token = written
        .metadata()
        .get(HEADER)
        .expect("a write returns its token")
        .clone();
    let mut with_token = tonic::Request::new(today(a));
    with_token.metadata_mut().insert(HEADER, token);
    let fresh = client
        .get_team_summary(with_token)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.aggregates.unwrap().conversation_count, 2);

    // Without a token, the bus drops a's cached answer: the new count shows up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = client
            .get_team_summary(today(a))
            .await
            .unwrap()
            .into_inner();
        if seen.aggregates.unwrap().conversation_count == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the write never invalidated a's answer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Exactly a's answers: b's stays cached.
    let other = client
        .get_team_summary(today(b))
        .await
        .unwrap()
        .into_inner();
    assert!(
        other.coverage.unwrap().cached,
        "b's answer survives a's write"
    );
    assert_eq!(other.aggregates.unwrap().conversation_count, 1);

    // A malformed token is refused precisely.
    let mut bad = tonic::Request::new(today(a));
    bad.metadata_mut()
        .insert(HEADER, "garbage!".parse().unwrap());
    let status = client.get_team_summary(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        convoy_integration_tests::violated_fields(&status),
        [format!("metadata[{HEADER}]")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_queries_scan_the_covering_index_and_fleet_queries_the_brin() {
    let fleet = Fleet::start(1).await;
    let pool = fleet.shard_pool(0).await;
    // A year of conversations for 50 teams, in creation order as they would arrive.
    sqlx::query(
        "INSERT INTO conversations (team_id, id, title, intent, status, duration_seconds, \
         message_count, created_at) \
         SELECT 'team-' || (i % 50), gen_random_uuid(), 't', 'debug', 'active', i % 1000, 3, \
                timestamptz '2025-01-01' + make_interval(secs => i * 157.0) \
         FROM generate_series(1, 200000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE conversations")
        .execute(&pool)
        .await
        .unwrap();

    let day = |scope| analytics::query::Query {
        scope,
        start: DateTime::parse_from_rfc3339("2025-06-01T00:00:00Z")
            .unwrap()
            .into(),
        end: DateTime::parse_from_rfc3339("2025-06-02T00:00:00Z")
            .unwrap()
            .into(),
        intent: None,
        status: None,
        require_complete: false,
        grouping: analytics::query::Grouping::Total,
    };
    let team = convoy_proto::names::TeamId::parse("team-7").unwrap();
    let plan = analytics::scatter::explain(&pool, &day(analytics::query::Scope::Team(team)), &[])
        .await
        .unwrap();
    assert!(
        plan.contains("Index Only Scan using conversations_team_analytics_idx"),
        "{plan}"
    );
    let all_slots: Vec<i16> = (0..1024).collect();
    let fleet_day = analytics::query::Query {
        grouping: analytics::query::Grouping::TopTeams { limit: 10 },
        ..day(analytics::query::Scope::Fleet)
    };
    let plan = analytics::scatter::explain(&pool, &fleet_day, &all_slots)
        .await
        .unwrap();
    assert!(
        plan.contains("Bitmap Index Scan on conversations_created_brin"),
        "{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_session_reads_its_own_writes_in_analytics() {
    let etcd = convoy_testkit::Etcd::start().await.unwrap();
    let redis = convoy_testkit::Redis::start().await.unwrap();
    let (endpoint, url) = (etcd.endpoint(), redis.url());
    let discovery = ["--etcd-endpoint", endpoint.as_str()];
    let fleet = Fleet::start_with(2, &[&discovery[..], &["--redis-url", &url]].concat()).await;
    let _cache = CacheInstance::start(&url, &discovery).await;
    let _analytics = fleet.start_analytics(&discovery).await;
    let sdk = convoy_client::ConvoyClient::connect(
        convoy_client::Discovery::Etcd(convoy_discovery::EtcdConfig {
            endpoints: vec![endpoint.clone()],
            ..Default::default()
        }),
        convoy_client::ClientConfig::default(),
    )
    .unwrap();
    let now = Utc::now().timestamp();
    let summary = || pb::GetTeamSummaryRequest {
        filter: Some(pb::AnalyticsFilter {
            parent: "teams/acme".into(),
            start_time: ts(now - 3600),
            end_time: ts(now + 3600),
            ..Default::default()
        }),
    };
    // Another client's view is cached...
    let mut other = client(&_analytics).await;
    sdk.conversations()
        .create_conversation(convoy_integration_tests::new_conversation(
            "acme", "one", "",
        ))
        .await
        .unwrap();
    // (once analytics has found the cache tier in etcd).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = other
            .get_team_summary(summary())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.aggregates.unwrap().conversation_count, 1);
        if answer.coverage.unwrap().cached {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never cached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...while the writing session reads its second write at once, bus or not.
    sdk.conversations()
        .create_conversation(convoy_integration_tests::new_conversation(
            "acme", "two", "",
        ))
        .await
        .unwrap();
    let seen = sdk.analytics().get_team_summary(summary()).await.unwrap();
    assert_eq!(count(seen), 2);
}

fn count(response: tonic::Response<pb::TeamSummary>) -> i64 {
    response.into_inner().aggregates.unwrap().conversation_count
}
