//! Transcripts in: `convoyctl import claude-code` over hand-written Claude Code sessions
//! (`tests/integration/fixtures/claude-code`, described in its README) lands exactly the
//! events, counters, titles and metadata worked out by hand below; importing again changes
//! nothing; `--follow` picks up appended lines and new files; and IngestEvents itself
//! reports bad lines one by one while the rest of the stream lands.

use std::path::{Path, PathBuf};
use std::time::Duration;

use convoy_client::Discovery;
use convoy_integration_tests::{Fleet, new_conversation, stored_digest};
use convoy_proto::v1 as pb;
use convoyctl::import::{ImportOptions, Importer};

const SESSION_A: &str = "11111111-1111-4111-8111-111111111111";
const SESSION_B: &str = "33333333-3333-4333-8333-333333333333";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/claude-code")
}

fn importer(fleet: &Fleet, path: &Path, state_file: Option<PathBuf>) -> Importer {
    let client = convoyctl::import::client(
        &Discovery::Static(vec![fleet.addr.to_string()]),
        &convoyctl::access::Access::default(),
    );
    Importer::new(
        client,
        ImportOptions {
            path: path.to_owned(),
            team: "acme".into(),
            state_file,
            full: false,
        },
    )
    .unwrap()
}

async fn conversation(
    client: &mut pb::conversation_service_client::ConversationServiceClient<
        tonic::transport::Channel,
    >,
    session: &str,
) -> pb::Conversation {
    client
        .get_conversation(pb::GetConversationRequest {
            name: format!("teams/acme/conversations/{session}"),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn events(
    client: &mut pb::conversation_service_client::ConversationServiceClient<
        tonic::transport::Channel,
    >,
    session: &str,
) -> Vec<pb::ConversationEvent> {
    client
        .list_events(pb::ListEventsRequest {
            parent: format!("teams/acme/conversations/{session}"),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

/// An event as the assertions below name it: its id (`line:…` ids, derived from a line
/// without a uuid, by their kind) and kind.
fn named(e: &pb::ConversationEvent) -> String {
    let kind = pb::EventKind::try_from(e.kind).unwrap().as_str_name();
    if e.event_id.starts_with("line:") {
        format!("line:{kind}")
    } else {
        format!("{}:{kind}", e.event_id)
    }
}

#[tokio::test]
async fn a_claude_code_import_lands_exactly_the_transcripts_and_a_second_changes_nothing() {
    let fleet = Fleet::start_with(1, &[]).await;
    let mut client =
        pb::conversation_service_client::ConversationServiceClient::new(fleet.channel().await);
    let pool = fleet.shard_pool(0).await;

    let mut import = importer(&fleet, &fixtures(), None);
    import.pass(|_, _| {}).await.unwrap();
    let summary = import.summary();
    // Worked out by hand from the files (fixtures/claude-code/README.md):
    // session A, file 1: summary, prompt, thinking, tool call, failed result, snapshot,
    // text + tool call (two events) = 8 events; its malformed line is refused.
    // Session A, file 2: result, two replies, two sidechain lines, system error, progress
    // = 7 events; its `[1,2,3]` is refused. Session B: 4 lines, 4 events.
    assert_eq!(summary.files, 3);
    assert_eq!(summary.sessions, 2);
    assert_eq!(summary.lines, 20, "non-blank lines");
    assert_eq!(summary.stored, 19);
    assert_eq!(summary.duplicates, 0);
    assert_eq!(summary.skipped_count, 2, "{:?}", summary.skipped);
    let reasons: Vec<&(String, String)> = summary.skipped.iter().collect();
    assert!(
        reasons[0].0.ends_with(&format!("{SESSION_A}.jsonl:7"))
            && reasons[0].1.starts_with("line.raw_line: is not valid JSON"),
        "{reasons:?}"
    );
    assert!(
        reasons[1]
            .0
            .ends_with("22222222-2222-4222-8222-222222222222.jsonl:8")
            && reasons[1].1.contains("not an object"),
        "{reasons:?}"
    );
    // msg_1's usage once (its fullest figures), msg_2, msg_4, msg_3, the sidechain's, B's.
    assert_eq!(summary.tokens.input_tokens, 100 + 200 + 400 + 300 + 10 + 50);
    assert_eq!(summary.tokens.output_tokens, 30 + 40 + 20 + 60 + 3 + 25);
    assert_eq!(summary.tokens.cache_creation_input_tokens, 50);
    assert_eq!(summary.tokens.cache_read_input_tokens, 20 + 150 + 100);

    let a = conversation(&mut client, SESSION_A).await;
    assert_eq!(
        a.title, "Login test flake fixed",
        "the summary names a line of file 2"
    );
    assert_eq!(a.metadata["project"], "/src/app");
    assert_eq!(a.metadata["branch"], "main");
    assert_eq!(a.metadata["source"], "claude-code");
    assert_eq!(a.metadata["claude_code_version"], "1.0.0");
    assert_eq!(a.event_count, 15);
    // Messages: the prompt, the text of a-a3, both replies, both sidechain lines.
    assert_eq!(a.message_count, 6);
    // 09:00:00 (the prompt, and the snapshot placed at the session's start) to 09:01:00.
    assert_eq!(a.duration.unwrap().seconds, 60);
    let usage = a.token_usage.unwrap();
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens
        ),
        (1010, 153, 50, 270)
    );
    let a_events = events(&mut client, SESSION_A).await;
    let order: Vec<String> = a_events.iter().map(named).collect();
    // File 1's batch by time (the summary sits at the session's end, the snapshot at its
    // start, after the prompt that came first); file 2's by time, except that a-a5,
    // whose clock says 09:00:58, answers a-a4 (09:01:00) and follows it.
    assert_eq!(
        order,
        [
            "a-u1:EVENT_KIND_MESSAGE",
            "line:EVENT_KIND_RAW",
            "a-a1:EVENT_KIND_SYSTEM",
            "a-a2:EVENT_KIND_TOOL_CALL",
            "a-u2:EVENT_KIND_TOOL_RESULT",
            "a-a3:EVENT_KIND_MESSAGE",
            "a-a3:1:EVENT_KIND_TOOL_CALL",
            "line:EVENT_KIND_SYSTEM",
            "a-u3:EVENT_KIND_TOOL_RESULT",
            "a-s1:EVENT_KIND_MESSAGE",
            "a-s2:EVENT_KIND_MESSAGE",
            "a-sys1:EVENT_KIND_ERROR",
            "a-p1:EVENT_KIND_RAW",
            "a-a4:EVENT_KIND_MESSAGE",
            "a-a5:EVENT_KIND_MESSAGE",
        ]
    );
    let by_id = |id: &str| a_events.iter().find(|e| e.event_id == id).unwrap();
    let failed = by_id("a-u2");
    assert!(failed.is_error);
    assert_eq!(failed.tool_name, "Bash", "named after its call");
    assert_eq!(failed.tool_call_id, "toolu_1");
    let read = by_id("a-u3");
    assert!(!read.is_error);
    assert_eq!(read.tool_name, "Read");
    assert_eq!(read.content, "test('login', async () => {...})");
    assert!(by_id("a-s1").is_sidechain && by_id("a-s2").is_sidechain);
    assert!(!by_id("a-a4").is_sidechain);
    assert_eq!(by_id("a-s2").model, "claude-haiku-4");
    assert_eq!(by_id("a-a1").token_usage.unwrap().output_tokens, 30);
    assert_eq!(
        by_id("a-a2").token_usage.unwrap_or_default().output_tokens,
        0
    );
    assert!(by_id("a-sys1").is_error);
    assert!(by_id("a-p1").raw_json.contains("\"step\":3"));
    assert_eq!(by_id("a-a5").parent_event_id, "a-a4");

    let b = conversation(&mut client, SESSION_B).await;
    assert_eq!(
        b.title, "Explain the cache layer",
        "not the command note before it"
    );
    assert_eq!(b.metadata["branch"], "feature/cache");
    assert_eq!((b.event_count, b.message_count), (4, 3));
    assert_eq!(b.duration.unwrap().seconds, 21);

    // The same files again, with no memory of the first import: every event is a
    // duplicate, the declarations change nothing, and the shard is byte for byte as it was
    // (versions and update times included).
    let before = stored_digest(&pool).await;
    let mut again = importer(&fleet, &fixtures(), None);
    again.pass(|_, _| {}).await.unwrap();
    let summary = again.summary();
    assert_eq!((summary.stored, summary.duplicates), (0, 19));
    assert_eq!(summary.skipped_count, 2);
    assert_eq!(stored_digest(&pool).await, before);
    assert_eq!(
        conversation(&mut client, SESSION_A).await.version,
        a.version
    );
}

#[tokio::test]
async fn a_resumed_import_sends_only_new_lines_and_follow_picks_up_appends_and_new_files() {
    let fleet = Fleet::start_with(1, &[]).await;
    let mut client =
        pb::conversation_service_client::ConversationServiceClient::new(fleet.channel().await);
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("-src-lib");
    std::fs::create_dir(&project).unwrap();
    let transcript = project.join(format!("{SESSION_B}.jsonl"));
    std::fs::copy(
        fixtures().join(format!("-src-lib/{SESSION_B}.jsonl")),
        &transcript,
    )
    .unwrap();
    let state = dir.path().join("state.json");

    let mut first = importer(&fleet, dir.path(), Some(state.clone()));
    first.pass(|_, _| {}).await.unwrap();
    assert_eq!(first.summary().stored, 4);
    // A second run with the state file sends nothing at all.
    let mut second = importer(&fleet, dir.path(), Some(state.clone()));
    second.pass(|_, _| {}).await.unwrap();
    assert_eq!(second.summary().lines, 0);

    // Following: a line appended to the file, half a line (not taken until its newline
    // is there), and a new session's file.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let follow = tokio::spawn(async move {
        second
            .follow(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        second.summary()
    });
    let appended = r#"{"type":"user","uuid":"b-u2","parentUuid":"b-sys1","sessionId":"33333333-3333-4333-8333-333333333333","timestamp":"2026-11-03T14:05:00.000Z","isSidechain":false,"message":{"role":"user","content":"And the invalidation bus?"}}"#;
    let half = r#"{"type":"user","uuid":"b-u3","parentUuid":"b-u2","sessionId":"33333333-3333-4333-8333-333333333333","timestamp":"2026-11-03T14:05:05.000Z","message":{"content":"Go on"}}"#;
    let (head, tail) = half.split_at(60);
    let started = std::time::Instant::now();
    append(&transcript, &format!("{appended}\n{head}"));
    let other = "44444444-4444-4444-8444-444444444444";
    std::fs::write(
        project.join(format!("{other}.jsonl")),
        format!(
            "{{\"type\":\"user\",\"uuid\":\"c-u1\",\"sessionId\":\"{other}\",\"timestamp\":\"2026-11-04T08:00:00.000Z\",\"message\":{{\"content\":\"New session\"}}}}\n"
        ),
    )
    .unwrap();
    let seen = wait_for(|| async {
        let mut client = client.clone();
        let b = conversation(&mut client, SESSION_B).await;
        let c = client
            .get_conversation(pb::GetConversationRequest {
                name: format!("teams/acme/conversations/{other}"),
            })
            .await;
        b.event_count == 5 && c.is_ok()
    })
    .await;
    assert!(seen, "the appended line and the new file were not imported");
    println!("--follow picked both up after {:?}", started.elapsed());
    // The rest of the half line: now it is a line (taken with the next one, and placed by
    // time with it).
    let rest = r#"{"type":"assistant","uuid":"b-a2","sessionId":"33333333-3333-4333-8333-333333333333","timestamp":"2026-11-03T14:05:10.000Z","message":{"id":"msg_b2","content":[{"type":"text","text":"Later."}]}}"#;
    append(&transcript, &format!("{tail}\n{rest}\n"));
    let seen = wait_for(|| async {
        conversation(&mut client.clone(), SESSION_B)
            .await
            .event_count
            == 7
    })
    .await;
    assert!(seen, "the finished line was not imported");
    stop.send(()).unwrap();
    let summary = follow.await.unwrap();
    // b-u2, the new session's c-u1, b-u3 and b-a2.
    assert_eq!(
        (summary.stored, summary.duplicates, summary.skipped_count),
        (4, 0, 0)
    );
    let ids: Vec<String> = events(&mut client, SESSION_B)
        .await
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(
        ids,
        ["b-u0", "b-u1", "b-a1", "b-sys1", "b-u2", "b-u3", "b-a2"]
    );
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// Polls `done` every 50 ms for up to 20 s (a bound, not a figure: `--follow` looks every
/// 200 ms, and the test prints how long it took).
async fn wait_for<F, Fut>(done: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn an_ingest_stream_reports_each_bad_line_and_stores_the_rest() {
    let fleet = Fleet::start_with(1, &[]).await;
    let mut ingest = pb::ingest_service_client::IngestServiceClient::new(fleet.channel().await);
    let mut client =
        pb::conversation_service_client::ConversationServiceClient::new(fleet.channel().await);
    let name = "teams/acme/conversations/55555555-5555-4555-8555-555555555555";
    let event = |id: &str, second: i64| pb::ConversationEvent {
        event_id: id.into(),
        kind: pb::EventKind::Message as i32,
        role: pb::Role::User as i32,
        occur_time: Some(prost_types::Timestamp {
            seconds: 1_793_527_200 + second,
            nanos: 0,
        }),
        content: id.into(),
        ..Default::default()
    };
    let line =
        |conversation: &str, source: &str, event: Option<pb::ConversationEvent>, raw: &str| {
            pb::IngestEventsRequest {
                item: Some(pb::ingest_events_request::Item::Line(pb::IngestLine {
                    conversation: conversation.into(),
                    source: source.into(),
                    event,
                    raw_line: raw.into(),
                })),
            }
        };
    // An existing conversation, made through the API, takes lines without a declaration.
    let made = client
        .create_conversation(new_conversation("acme", "made", ""))
        .await
        .unwrap()
        .into_inner()
        .name;
    let stream = vec![
        pb::IngestEventsRequest {
            item: Some(pb::ingest_events_request::Item::Conversation(
                pb::IngestConversation {
                    name: name.into(),
                    title: "Ingested".into(),
                    ..Default::default()
                },
            )),
        },
        line(name, "f:1", Some(event("e1", 1)), ""),
        line(
            name,
            "f:2",
            Some(pb::ConversationEvent {
                kind: 0,
                ..event("e2", 2)
            }),
            "",
        ),
        line(
            name,
            "f:3",
            None,
            r#"{"type":"odd","uuid":"e3","timestamp":"2026-11-02T09:00:03Z"}"#,
        ),
        line(name, "f:4", None, r#"{"type":"odd"}"#),
        line(
            "teams/acme/conversations/not-a-uuid",
            "f:5",
            Some(event("e5", 5)),
            "",
        ),
        line(
            "teams/acme/conversations/66666666-6666-4666-8666-666666666666",
            "f:6",
            Some(event("e6", 6)),
            "",
        ),
        line(&made, "f:7", Some(event("e7", 7)), ""),
        line(name, "f:8", Some(event("e1", 1)), ""),
        pb::IngestEventsRequest { item: None },
    ];
    let response = ingest
        .ingest_events(tokio_stream::iter(stream))
        .await
        .unwrap()
        .into_inner();
    // e1, the raw e3, e7; e1 again is a duplicate.
    assert_eq!((response.stored_count, response.duplicate_count), (3, 1));
    let errors: Vec<(&str, &str)> = response
        .errors
        .iter()
        .map(|e| (e.source.as_str(), e.field.as_str()))
        .collect();
    assert_eq!(
        errors,
        [
            ("f:2", "line.event.kind"),
            ("f:4", "line.raw_line"),
            ("f:5", "line.conversation"),
            ("", "item"),
            ("f:6", "line.conversation"),
        ]
    );
    assert_eq!(response.rejected_count, 5);
    assert!(
        response.errors[4].description.contains("declare it"),
        "{:?}",
        response.errors[4]
    );
    let stored: Vec<String> = events(&mut client, "55555555-5555-4555-8555-555555555555")
        .await
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(stored, ["e1", "e3"]);
    let made_events = client
        .list_events(pb::ListEventsRequest {
            parent: made,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(made_events.len(), 1);
}

#[tokio::test]
async fn usage_and_tool_analytics_of_imported_transcripts_match_sql_and_the_files() {
    let fleet = Fleet::start_with(1, &[]).await;
    let prices = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/local/prices.toml");
    let prices = prices.display().to_string();
    let analytics = fleet.start_analytics(&["--prices", &prices]).await;
    let mut import = importer(&fleet, &fixtures(), None);
    import.pass(|_, _| {}).await.unwrap();
    let mut client = pb::analytics_service_client::AnalyticsServiceClient::new(
        convoy_integration_tests::channel_to(analytics.addr).await,
    );
    let filter = || {
        Some(pb::AnalyticsFilter {
            parent: "teams/acme".into(),
            start_time: Some(prost_types::Timestamp {
                seconds: 1_793_491_200, // 2026-11-01T00:00:00Z
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: 1_793_836_800, // 2026-11-05T00:00:00Z
                nanos: 0,
            }),
            ..Default::default()
        })
    };
    let usage = client
        .get_usage(pb::GetUsageRequest { filter: filter() })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(i64, String, [i64; 4], bool)> = usage
        .rows
        .iter()
        .map(|r| {
            let t = r.token_usage.unwrap();
            (
                r.day.unwrap().seconds,
                r.model.clone(),
                [
                    t.input_tokens,
                    t.output_tokens,
                    t.cache_creation_input_tokens,
                    t.cache_read_input_tokens,
                ],
                r.priced,
            )
        })
        .collect();
    // The same sums, straight from SQL.
    let pool = fleet.shard_pool(0).await;
    let sql: Vec<(i64, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT extract(epoch FROM date_trunc('day', occurred_at AT TIME ZONE 'UTC'))::bigint, \
           coalesce(model, ''), sum(input_tokens)::bigint, sum(output_tokens)::bigint, \
           sum(cache_creation_input_tokens)::bigint, sum(cache_read_input_tokens)::bigint \
         FROM conversation_events WHERE team_id = 'acme' \
         GROUP BY 1, 2 \
         HAVING sum(input_tokens + output_tokens + cache_creation_input_tokens + cache_read_input_tokens) > 0 \
         ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected: Vec<(i64, String, [i64; 4], bool)> = sql
        .into_iter()
        .map(|(day, model, a, b, c, d)| (day, model, [a, b, c, d], true))
        .collect();
    assert_eq!(got, expected);
    // And by hand, from the files: the four Sonnet responses (msg_1 once), the sidechain's
    // Haiku, session B's Opus.
    let nov2 = 1_793_577_600;
    assert_eq!(
        got,
        [
            (nov2, "claude-haiku-4".to_owned(), [10, 3, 0, 0], true),
            (
                nov2,
                "claude-sonnet-4".to_owned(),
                [1000, 150, 50, 270],
                true
            ),
            (
                nov2 + 86_400,
                "claude-opus-4".to_owned(),
                [50, 25, 0, 0],
                true
            ),
        ]
    );
    let sonnet = &usage.rows[1];
    let cost = (1000.0 * 3.0 + 150.0 * 15.0 + 50.0 * 3.75 + 270.0 * 0.30) / 1e6;
    assert!(
        (sonnet.estimated_cost_usd - cost).abs() < 1e-12,
        "{sonnet:?}"
    );

    let tools = client
        .get_tool_stats(pb::GetToolStatsRequest {
            filter: filter(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(&str, i64, i64)> = tools
        .rows
        .iter()
        .map(|r| (r.tool_name.as_str(), r.call_count, r.error_count))
        .collect();
    assert_eq!(got, [("Bash", 1, 1), ("Read", 1, 0)]);
    // Sessions by project and branch: the metadata the import wrote.
    let projects = client
        .get_metadata_breakdown(pb::GetMetadataBreakdownRequest {
            filter: Some(pb::AnalyticsFilter {
                start_time: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() - 3600,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() + 3600,
                    nanos: 0,
                }),
                ..filter().unwrap()
            }),
            key: "project".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut by_project: Vec<(String, i64)> = projects
        .rows
        .iter()
        .map(|r| {
            (
                r.value.clone(),
                r.aggregates.as_ref().unwrap().conversation_count,
            )
        })
        .collect();
    by_project.sort();
    assert_eq!(
        by_project,
        [("/src/app".to_owned(), 1), ("/src/lib".to_owned(), 1)]
    );
}
