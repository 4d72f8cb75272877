//! A hostile tenant against a real fleet: requests shaped to cost the service unbounded
//! work, memory or answer size, or to break its arithmetic. Each is refused with a precise
//! status that names the field (and whose `grpc-message` and details stay within stated
//! sizes), writes nothing on refusal (read from the shard itself), or is answered within
//! the bounds: no page passes a stock client's 4 MiB (the test's client keeps tonic's
//! default 4 MiB limit, as grpcurl's and grpcio's), and paging through returns every row
//! exactly once.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use convoy_integration_tests::{Fleet, channel_to, message, new_conversation, stored_digest};
use convoy_proto::errors::{MAX_MESSAGE_BYTES, MAX_REPORTED_VIOLATIONS};
use convoy_proto::v1 as pb;
use convoy_proto::v1::analytics_service_client::AnalyticsServiceClient;
use convoy_proto::v1::conversation_service_client::ConversationServiceClient;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// What a stock client accepts by default, and what every answer must stay within.
const STOCK_LIMIT: usize = 4 << 20;
/// Encoded bytes of a status's details (which repeat the message) that a refusal stays
/// within: 4 KiB, well inside the 8 KiB of trailers gRPC's C core accepts.
const MAX_DETAILS_BYTES: usize = 4096;
/// A generous bound on any one refusal: the service must not grind on a hostile request.
const PROMPT: Duration = Duration::from_secs(10);
/// One MiB of searchable content.
const MIB: usize = 1 << 20;

/// A page of a conversation's worth of text: `word` then filler, `bytes` long.
fn body(word: &str, bytes: usize) -> String {
    let mut text = format!("{word} ");
    text.push_str(&"lorem ipsum ".repeat(bytes / 12 + 1));
    text.truncate(bytes);
    text
}

/// Asserts `status` is INVALID_ARGUMENT naming exactly `fields`, within the stated sizes.
fn assert_invalid(status: &Status, fields: &[&str]) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let named: Vec<String> = status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(named, fields, "{}", status.message());
    assert_bounded(status);
}

/// Asserts the status's message and details are within the stated sizes.
fn assert_bounded(status: &Status) {
    assert!(
        status.message().len() <= MAX_MESSAGE_BYTES,
        "grpc-message of {} bytes",
        status.message().len()
    );
    assert!(
        status.details().len() <= MAX_DETAILS_BYTES,
        "details of {} bytes",
        status.details().len()
    );
}

/// The digest of what the shard of `team` stores.
async fn digest(fleet: &Fleet, team: &str) -> String {
    stored_digest(&fleet.shard_pool(fleet.map.owner_of_team(team)).await).await
}

async fn create(
    client: &mut ConversationServiceClient<Channel>,
    team: &str,
    title: &str,
    content: &str,
) -> pb::Conversation {
    client
        .create_conversation(new_conversation(team, title, content))
        .await
        .expect("create")
        .into_inner()
}

#[tokio::test]
async fn an_update_mask_of_400000_paths_is_refused_at_once_and_writes_nothing() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let team = "masks";
    let existing = create(&mut client, team, "before", "small").await;
    let before = digest(&fleet, team).await;

    // The shape seen in the wild: 1 MiB of content and 400,000 `*` paths (2.2 MB).
    let hostile = pb::UpdateConversationRequest {
        conversation: Some(pb::Conversation {
            name: existing.name.clone(),
            content: "x".repeat(MIB),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["*".to_owned(); 400_000],
        }),
    };
    let status = tokio::time::timeout(PROMPT, client.update_conversation(hostile))
        .await
        .expect("answered promptly")
        .unwrap_err();
    assert_invalid(&status, &["update_mask.paths"]);
    assert!(status.message().contains("400000"), "{}", status.message());

    // 16 unknown paths of 64 KiB each: every one named, the answer still bounded.
    let unknown = pb::UpdateConversationRequest {
        conversation: Some(pb::Conversation {
            name: existing.name.clone(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: (0..16)
                .map(|i| format!("{i}{}", "p".repeat(64 << 10)))
                .collect(),
        }),
    };
    let status = client.update_conversation(unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let listed = status.get_details_bad_request().unwrap().field_violations;
    assert_eq!(listed.len(), MAX_REPORTED_VIOLATIONS);
    assert_eq!(listed[0].field, "update_mask.paths[0]");
    assert!(
        status
            .message()
            .contains("more (the details list the first 10)"),
        "{}",
        status.message()
    );
    assert_bounded(&status);

    assert_eq!(digest(&fleet, team).await, before, "a refused update wrote");

    // Repeated and wildcard paths within the cap are fine, and applied once.
    let repeated = pb::UpdateConversationRequest {
        conversation: Some(pb::Conversation {
            name: existing.name.clone(),
            title: "after".into(),
            intent: pb::Intent::Review as i32,
            status: pb::ConversationStatus::Completed as i32,
            content: "x".repeat(MIB),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["*".to_owned(); 16],
        }),
    };
    let updated = client
        .update_conversation(repeated)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.title, "after");
    assert_eq!(updated.content.len(), MIB);
    assert_eq!(updated.version, existing.version + 1);
}

#[tokio::test]
async fn oversized_batches_are_refused_and_a_batch_past_3_mib_names_the_names() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let team = "batches";
    let mut big = Vec::new();
    for i in 0..4 {
        big.push(create(&mut client, team, &format!("big {i}"), &body("big", MIB)).await);
    }
    let before = digest(&fleet, team).await;
    let names =
        |n: usize| -> Vec<String> { big.iter().cycle().take(n).map(|c| c.name.clone()).collect() };

    let status = client
        .batch_get_conversations(pb::BatchGetConversationsRequest {
            parent: format!("teams/{team}"),
            names: names(101),
        })
        .await
        .unwrap_err();
    assert_invalid(&status, &["names"]);

    // Four conversations of 1 MiB would answer 4 MiB: refused, naming the field.
    let status = client
        .batch_get_conversations(pb::BatchGetConversationsRequest {
            parent: format!("teams/{team}"),
            names: names(4),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let failure = status.get_details_precondition_failure().expect("details");
    assert_eq!(failure.violations[0].r#type, "RESPONSE_SIZE");
    assert_eq!(failure.violations[0].subject, "names");
    assert_bounded(&status);
    // So would the same one named four times: duplicates are answered in place.
    let repeated = vec![big[0].name.clone(); 4];
    let status = client
        .batch_get_conversations(pb::BatchGetConversationsRequest {
            parent: format!("teams/{team}"),
            names: repeated,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // Two always fit, under a stock client's limit.
    let two = client
        .batch_get_conversations(pb::BatchGetConversationsRequest {
            parent: format!("teams/{team}"),
            names: names(2),
        })
        .await
        .expect("two conversations of 1 MiB fit one answer")
        .into_inner();
    assert_eq!(two.conversations.len(), 2);
    assert!(two.encoded_len() < STOCK_LIMIT);
    assert_eq!(digest(&fleet, team).await, before);
}

#[tokio::test]
async fn metadata_past_64_entries_is_refused_on_create_update_and_ingest() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let team = "meta";
    let entries = |from: usize, n: usize| -> BTreeMap<String, String> {
        (from..from + n)
            .map(|i| {
                (
                    format!("key-{i}"),
                    "v".repeat(if n > 100 { 8 } else { 4096 }),
                )
            })
            .collect()
    };
    let mut first = new_conversation(team, "declared", "");
    first.conversation.as_mut().unwrap().metadata = entries(0, 40);
    let existing = client
        .create_conversation(first)
        .await
        .unwrap()
        .into_inner();
    let before = digest(&fleet, team).await;

    let mut create = new_conversation(team, "too much", "");
    create.conversation.as_mut().unwrap().metadata = entries(0, 65);
    let status = client.create_conversation(create).await.unwrap_err();
    assert_invalid(&status, &["conversation.metadata"]);

    let status = client
        .update_conversation(pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: existing.name.clone(),
                metadata: entries(0, 100_000),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["metadata".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_invalid(&status, &["conversation.metadata"]);
    assert_eq!(digest(&fleet, team).await, before, "a refused write wrote");

    // Declarations merge metadata key by key: 40 stored and 40 new would make 80.
    let mut ingest = pb::ingest_service_client::IngestServiceClient::new(fleet.channel().await);
    let declare = |metadata| pb::IngestEventsRequest {
        item: Some(pb::ingest_events_request::Item::Conversation(
            pb::IngestConversation {
                name: existing.name.clone(),
                title: "declared".into(),
                intent: 0,
                metadata,
            },
        )),
    };
    let report = ingest
        .ingest_events(tokio_stream::iter(vec![declare(entries(40, 40))]))
        .await
        .expect("the stream is answered: one declaration refused, not the stream")
        .into_inner();
    assert_eq!(report.rejected_count, 1);
    assert_eq!(report.errors[0].field, "conversation.metadata");
    assert_eq!(
        digest(&fleet, team).await,
        before,
        "a refused declaration wrote"
    );
    // Up to 64 in all is fine.
    let report = ingest
        .ingest_events(tokio_stream::iter(vec![declare(entries(40, 24))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.rejected_count, 0);
    let stored = client
        .get_conversation(pb::GetConversationRequest {
            name: existing.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.metadata.len(), 64);
}

/// Pages through ListConversations with `page_size` 1000; returns every page's size and
/// token.
async fn list_all(client: &mut ConversationServiceClient<Channel>, team: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_conversations(pb::ListConversationsRequest {
                parent: format!("teams/{team}"),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("a page a stock client can read")
            .into_inner();
        assert!(
            page.encoded_len() < STOCK_LIMIT,
            "{} bytes",
            page.encoded_len()
        );
        assert!(!page.conversations.is_empty(), "an empty page");
        pages.push(page.conversations.into_iter().map(|c| c.name).collect());
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn pages_of_1_mib_conversations_stay_under_4_mib_and_page_through_every_row_once() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let team = "huge";
    let mut created = HashSet::new();
    for i in 0..5 {
        created.insert(
            create(&mut client, team, &format!("big {i}"), &body("needle", MIB))
                .await
                .name,
        );
    }
    for i in 0..20 {
        created.insert(
            create(&mut client, team, &format!("small {i}"), "needle")
                .await
                .name,
        );
    }

    let pages = list_all(&mut client, team).await;
    assert!(pages.len() >= 2, "5 MiB in one page: {pages:?}");
    let listed: Vec<&String> = pages.iter().flatten().collect();
    let unique: HashSet<&String> = listed.iter().copied().collect();
    assert_eq!(unique.len(), listed.len(), "a row was listed twice");
    assert_eq!(unique.len(), created.len(), "a row was skipped");

    // Search: the same bound, the same promise.
    let mut found = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .search_conversations(pb::SearchConversationsRequest {
                parent: format!("teams/{team}"),
                query: "needle".into(),
                page_size: 100,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("a search page a stock client can read")
            .into_inner();
        assert!(page.encoded_len() < STOCK_LIMIT);
        pages += 1;
        found.extend(
            page.results
                .into_iter()
                .map(|r| r.conversation.unwrap().name),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 2);
    let unique: HashSet<&String> = found.iter().collect();
    assert_eq!(unique.len(), found.len(), "a hit was returned twice");
    assert_eq!(unique.len(), created.len());

    // Events: 15 of 256 KiB (3.75 MiB), appended in batches under the 2.5 MiB bound.
    let conversation = create(&mut client, team, "events", "").await;
    for batch in 0..3 {
        let events = (0..5)
            .map(|i| message(1_700_000_000 + batch * 5 + i, &body("event", 256 << 10)))
            .collect();
        client
            .append_events(pb::AppendEventsRequest {
                parent: conversation.name.clone(),
                events,
            })
            .await
            .expect("1.25 MiB of events append, and the answer fits a stock client");
    }
    let mut sequences = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_events(pb::ListEventsRequest {
                parent: conversation.name.clone(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("an events page a stock client can read")
            .into_inner();
        assert!(page.encoded_len() < STOCK_LIMIT);
        pages += 1;
        sequences.extend(page.events.iter().map(|e| e.sequence));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 2);
    assert_eq!(sequences, (1..=15).collect::<Vec<_>>());
}

#[tokio::test]
async fn appends_past_2_5_mib_or_500_events_are_refused_and_write_nothing() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let team = "appends";
    let conversation = create(&mut client, team, "target", "").await;
    let before = digest(&fleet, team).await;

    let events = (0..11).map(|i| message(i, &body("x", 256 << 10))).collect();
    let status = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events,
        })
        .await
        .unwrap_err();
    assert_invalid(&status, &["events"]);

    let status = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events: vec![message(1, "m"); 501],
        })
        .await
        .unwrap_err();
    assert_invalid(&status, &["events"]);

    // 500 events, each wrong in several fields: ten listed, the rest counted.
    let bad = pb::ConversationEvent {
        kind: 99,
        role: 99,
        occur_time: None,
        ..Default::default()
    };
    let status = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events: vec![bad; 500],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let listed = status.get_details_bad_request().unwrap().field_violations;
    assert_eq!(listed.len(), MAX_REPORTED_VIOLATIONS);
    assert_eq!(listed[0].field, "events[0].kind");
    assert!(status.message().contains("more"), "{}", status.message());
    assert_bounded(&status);

    assert_eq!(digest(&fleet, team).await, before, "a refused append wrote");
}

#[tokio::test]
async fn over_range_token_counts_are_refused_and_stored_totals_saturate_instead_of_failing() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let team = "numbers";
    let conversation = create(&mut client, team, "tokens", "").await;
    // Events at noon (UTC) of today, so every one falls in one usage row.
    let now = chrono::Utc::now().timestamp();
    let midnight = now - now.rem_euclid(86_400);
    let noon = midnight + 43_200;
    let with_tokens = |seconds, input_tokens| pb::ConversationEvent {
        token_usage: Some(pb::TokenUsage {
            input_tokens,
            output_tokens: 1,
            ..Default::default()
        }),
        model: "model-a".into(),
        ..message(seconds, "m")
    };
    let before = digest(&fleet, team).await;

    // The shape seen in the wild: i64::MAX input tokens.
    let status = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events: vec![with_tokens(noon, i64::MAX)],
        })
        .await
        .unwrap_err();
    assert_invalid(&status, &["events[0].token_usage.input_tokens"]);
    let status = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events: vec![with_tokens(noon, 1), with_tokens(noon + 1, -1)],
        })
        .await
        .unwrap_err();
    assert_invalid(&status, &["events[1].token_usage.input_tokens"]);
    assert_eq!(digest(&fleet, team).await, before, "a refused append wrote");

    // The next append to the same conversation succeeds.
    let appended = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events: vec![with_tokens(noon, 1_000_000_000)],
        })
        .await
        .expect("the next append")
        .into_inner();
    let usage = appended.conversation.unwrap().token_usage.unwrap();
    assert_eq!(usage.input_tokens, 1_000_000_000);

    // Totals near i64::MAX (as a conversation stored before the bound may hold, with an
    // event of i64::MAX tokens): the next append saturates rather than fails.
    let pool = fleet.shard_pool(fleet.map.owner_of_team(team)).await;
    let id: uuid::Uuid = conversation
        .name
        .rsplit('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    sqlx::query(
        "UPDATE conversations SET input_tokens = 9223372036854775000, \
           message_count = 9223372036854775000 WHERE team_id = $1 AND id = $2",
    )
    .bind(team)
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE conversation_events SET input_tokens = 9223372036854775807 \
         WHERE team_id = $1 AND conversation_id = $2",
    )
    .bind(team)
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let appended = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events: vec![with_tokens(noon + 100, 1_000_000_000)],
        })
        .await
        .expect("an append past i64::MAX tokens saturates")
        .into_inner();
    let usage = appended.conversation.unwrap().token_usage.unwrap();
    assert_eq!(usage.input_tokens, i64::MAX);
    assert_eq!(usage.output_tokens, 2);

    // Analytics sums over those rows saturate too: no shard fails, no INTERNAL.
    let second = create(&mut client, team, "more", "").await;
    let second_id: uuid::Uuid = second.name.rsplit('/').next().unwrap().parse().unwrap();
    sqlx::query(
        "UPDATE conversations SET message_count = 9223372036854775000 \
         WHERE team_id = $1 AND id = $2",
    )
    .bind(team)
    .bind(second_id)
    .execute(&pool)
    .await
    .unwrap();
    let instance = fleet.start_analytics(&[]).await;
    let mut analytics = AnalyticsServiceClient::new(channel_to(instance.addr).await);
    let filter = Some(pb::AnalyticsFilter {
        parent: format!("teams/{team}"),
        start_time: Some(prost_types::Timestamp {
            seconds: midnight - 86_400,
            nanos: 0,
        }),
        end_time: Some(prost_types::Timestamp {
            seconds: midnight + 2 * 86_400,
            nanos: 0,
        }),
        require_complete: true,
        ..Default::default()
    });
    let usage = analytics
        .get_usage(pb::GetUsageRequest {
            filter: filter.clone(),
        })
        .await
        .expect("usage over i64::MAX tokens")
        .into_inner();
    let model_a: Vec<&pb::UsageRow> = usage.rows.iter().filter(|r| r.model == "model-a").collect();
    assert_eq!(model_a.len(), 1, "{:?}", usage.rows);
    assert_eq!(model_a[0].token_usage.unwrap().input_tokens, i64::MAX);
    let summary = analytics
        .get_team_summary(pb::GetTeamSummaryRequest { filter })
        .await
        .expect("a summary over i64::MAX messages")
        .into_inner();
    assert_eq!(summary.aggregates.unwrap().message_total, i64::MAX);
    assert!(summary.coverage.unwrap().missing_shards.is_empty());
}

#[tokio::test]
async fn forged_page_tokens_and_huge_names_get_invalid_argument_not_internal() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let team = "forger";
    create(&mut client, team, "one", "").await;
    // A List token whose position is i64::MIN microseconds, bound to the request's real
    // fingerprint: tokens are opaque, not secret, so a client can make one.
    let request = pb::ListConversationsRequest {
        parent: format!("teams/{team}"),
        ..Default::default()
    };
    let fingerprint = conversation::validate::list_token_fingerprint(
        &conversation::validate::list(&request).unwrap(),
    );
    let token = conversation::page_token::encode(
        fingerprint,
        &conversation::page_token::Cursor::List(conversation::model::ListCursor {
            created_at_micros: i64::MIN,
            id: uuid::Uuid::nil(),
        }),
    );
    let status = client
        .list_conversations(pb::ListConversationsRequest {
            parent: format!("teams/{team}"),
            page_token: token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&status, &["page_token"]);

    // A 3 MiB name is quoted back clipped, not whole.
    let status = client
        .get_conversation(pb::GetConversationRequest {
            name: format!("teams/{team}/conversations/{}", "n".repeat(3 << 20)),
        })
        .await
        .unwrap_err();
    assert_invalid(&status, &["name"]);
}
