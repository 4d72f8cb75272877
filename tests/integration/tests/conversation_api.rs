//! The conversation API end to end: a real gRPC client, the service, two real Postgres
//! shards.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use convoy_integration_tests::{Fleet, message, new_conversation, violated_fields};
use convoy_proto::v1 as pb;
use convoy_proto::v1::conversation_service_client::ConversationServiceClient;
use convoy_store::Slot;
use tonic::{Code, Request};

async fn create(fleet: &Fleet, team: &str, title: &str, content: &str) -> pb::Conversation {
    fleet
        .client()
        .await
        .create_conversation(new_conversation(team, title, content))
        .await
        .expect("create")
        .into_inner()
}

#[tokio::test]
async fn routing_puts_each_team_on_the_shard_its_slot_maps_to() {
    let fleet = Fleet::start(2).await;
    let teams: Vec<String> = (0..40).map(|i| format!("team-{i}")).collect();
    for team in &teams {
        create(&fleet, team, "routing", "").await;
    }
    let mut seen = HashMap::new();
    for index in 0..2 {
        let pool = fleet.shard_pool(index).await;
        let rows: Vec<(String, i16)> = sqlx::query_as("SELECT team_id, slot FROM conversations")
            .fetch_all(&pool)
            .await
            .unwrap();
        for (team, slot) in rows {
            assert_eq!(
                slot as u16,
                Slot::for_team(&team).get(),
                "stored slot of {team}"
            );
            assert_eq!(
                fleet.map.owner_of_team(&team),
                index,
                "{team} is on the wrong shard"
            );
            assert!(
                seen.insert(team.clone(), index).is_none(),
                "{team} stored twice"
            );
        }
    }
    assert_eq!(seen.len(), teams.len());
    // Both shards got some teams: the split is by slot, not everything on one shard.
    assert!(seen.values().any(|&s| s == 0) && seen.values().any(|&s| s == 1));
}

#[tokio::test]
async fn list_pagination_returns_every_row_exactly_once_while_rows_are_inserted() {
    let fleet = Fleet::start(2).await;
    let team = "pager";
    let mut existing = HashSet::new();
    for i in 0..60 {
        existing.insert(create(&fleet, team, &format!("c{i}"), "").await.name);
    }

    // Insert concurrently for the whole time the listing runs.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut writer = fleet.client().await;
    let inserter = tokio::spawn(async move {
        let mut inserted = 0;
        loop {
            if stop_rx.try_recv().is_ok() {
                break inserted;
            }
            writer
                .create_conversation(new_conversation(team, "concurrent", ""))
                .await
                .unwrap();
            inserted += 1;
        }
    });

    let mut client = fleet.client().await;
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_conversations(pb::ListConversationsRequest {
                parent: format!("teams/{team}"),
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.conversations.len() <= 7);
        listed.extend(page.conversations);
        // Let the inserter get in between pages.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    stop_tx.send(()).unwrap();
    let inserted = inserter.await.unwrap();
    assert!(inserted > 0, "the inserter never ran");

    let names: Vec<&String> = listed.iter().map(|c| &c.name).collect();
    let unique: HashSet<&String> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "a row was listed twice");
    for name in &existing {
        assert!(
            unique.contains(name),
            "{name} existed before the listing but was skipped"
        );
    }
    // Newest first.
    let times: Vec<_> = listed
        .iter()
        .map(|c| {
            let t = c.create_time.unwrap();
            (t.seconds, t.nanos)
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "not newest first");
}

#[tokio::test]
async fn list_filters_by_status_intent_and_time() {
    let fleet = Fleet::start(2).await;
    let mut client = fleet.client().await;
    let team = "filters";
    let a = create(&fleet, team, "a", "").await;
    let mut b_req = new_conversation(team, "b", "");
    b_req.conversation.as_mut().unwrap().intent = pb::Intent::Feature as i32;
    b_req.conversation.as_mut().unwrap().status = pb::ConversationStatus::Completed as i32;
    let b = client
        .create_conversation(b_req)
        .await
        .unwrap()
        .into_inner();

    let list = |req: pb::ListConversationsRequest| {
        let mut client = client.clone();
        async move {
            client
                .list_conversations(req)
                .await
                .unwrap()
                .into_inner()
                .conversations
                .into_iter()
                .map(|c| c.name)
                .collect::<Vec<_>>()
        }
    };
    let base = pb::ListConversationsRequest {
        parent: format!("teams/{team}"),
        ..Default::default()
    };
    assert_eq!(
        list(pb::ListConversationsRequest {
            status: pb::ConversationStatus::Completed as i32,
            ..base.clone()
        })
        .await,
        vec![b.name.clone()]
    );
    assert_eq!(
        list(pb::ListConversationsRequest {
            intent: pb::Intent::Debug as i32,
            ..base.clone()
        })
        .await,
        vec![a.name.clone()]
    );
    assert_eq!(
        list(pb::ListConversationsRequest {
            create_time_end: a.create_time,
            ..base.clone()
        })
        .await,
        Vec::<String>::new(),
        "the end of the range is exclusive"
    );
    assert_eq!(
        list(pb::ListConversationsRequest {
            create_time_start: b.create_time,
            ..base.clone()
        })
        .await,
        vec![b.name.clone()]
    );
    // Another team sees nothing of this one.
    assert!(
        list(pb::ListConversationsRequest {
            parent: "teams/someone-else".into(),
            ..Default::default()
        })
        .await
        .is_empty()
    );
}

#[tokio::test]
async fn search_ranks_a_title_match_above_a_body_only_match() {
    let fleet = Fleet::start(2).await;
    let team = "search";
    let body = create(
        &fleet,
        team,
        "Pipeline notes",
        "we saw the kubernetes operator restart twice during the rollout",
    )
    .await;
    let title = create(
        &fleet,
        team,
        "Kubernetes probes failing",
        "readiness is flaky",
    )
    .await;
    create(&fleet, team, "Unrelated", "nothing to see here").await;

    let mut client = fleet.client().await;
    let response = client
        .search_conversations(pb::SearchConversationsRequest {
            parent: format!("teams/{team}"),
            query: "kubernetes".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = response
        .results
        .iter()
        .map(|r| r.conversation.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, vec![title.name.clone(), body.name.clone()]);
    assert!(response.results[0].rank > response.results[1].rank);

    // Paginated one hit at a time: the same order, nothing twice.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .search_conversations(pb::SearchConversationsRequest {
                parent: format!("teams/{team}"),
                query: "kubernetes".into(),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        paged.extend(
            page.results
                .into_iter()
                .map(|r| r.conversation.unwrap().name),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, names);

    // websearch syntax: exclusion.
    let excluded = client
        .search_conversations(pb::SearchConversationsRequest {
            parent: format!("teams/{team}"),
            query: "kubernetes -probes".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(excluded.results.len(), 1);
    assert_eq!(
        excluded.results[0].conversation.as_ref().unwrap().name,
        body.name
    );
}

#[tokio::test]
async fn concurrent_updates_with_the_same_etag_let_exactly_one_win() {
    let fleet = Fleet::start(2).await;
    let original = create(&fleet, "etags", "v1", "").await;
    let client = fleet.client().await;
    let attempts = (0..8).map(|i| {
        let mut client = client.clone();
        let conversation = pb::Conversation {
            name: original.name.clone(),
            etag: original.etag.clone(),
            title: format!("writer {i}"),
            ..Default::default()
        };
        async move {
            client
                .update_conversation(pb::UpdateConversationRequest {
                    conversation: Some(conversation),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["title".into()],
                    }),
                })
                .await
        }
    });
    let results = futures::future::join_all(attempts).await;
    let wins: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(wins.len(), 1, "exactly one writer wins");
    for r in &results {
        if let Err(status) = r {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        }
    }
    let winner = wins[0].get_ref();
    assert_eq!(winner.version, original.version + 1);
    assert_ne!(winner.etag, original.etag);

    // Without an etag an update always applies; a stale etag on delete is refused.
    let mut client = client.clone();
    let status = client
        .delete_conversation(pb::DeleteConversationRequest {
            name: original.name.clone(),
            etag: original.etag.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    client
        .delete_conversation(pb::DeleteConversationRequest {
            name: original.name.clone(),
            etag: winner.etag.clone(),
        })
        .await
        .unwrap();
    let status = client
        .get_conversation(pb::GetConversationRequest {
            name: original.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn update_applies_only_the_masked_fields() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let created = create(&fleet, "masks", "before", "body before").await;
    let updated = client
        .update_conversation(pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: created.name.clone(),
                title: "after".into(),
                content: "ignored: not in the mask".into(),
                status: pb::ConversationStatus::Completed as i32,
                effectiveness_score: Some(0.75),
                metadata: [("branch".to_string(), "main".to_string())].into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![
                    "title".into(),
                    "status".into(),
                    "effectiveness_score".into(),
                    "metadata".into(),
                ],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.title, "after");
    assert_eq!(updated.content, "body before");
    assert_eq!(updated.status, pb::ConversationStatus::Completed as i32);
    assert_eq!(updated.effectiveness_score, Some(0.75));
    assert_eq!(
        updated.metadata.get("branch").map(String::as_str),
        Some("main")
    );

    // No mask: every populated field (AIP-134).
    let updated = client
        .update_conversation(pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: created.name.clone(),
                content: "body after".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.content, "body after");
    assert_eq!(updated.title, "after");
    assert_eq!(updated.effectiveness_score, Some(0.75));
}

#[tokio::test]
async fn append_events_is_all_or_nothing_and_keeps_counters_exact() {
    let fleet = Fleet::start(2).await;
    let mut client = fleet.client().await;
    let conversation = create(&fleet, "events", "events", "").await;

    let mut bad = vec![message(1_000, "one"), message(1_010, "two")];
    let mut broken = message(1_020, "three");
    broken.occur_time = None;
    bad.push(broken);
    let status = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events: bad,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), vec!["events[2].occur_time"]);
    let after = client
        .get_conversation(pb::GetConversationRequest {
            name: conversation.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.event_count, after.message_count, after.version),
        (0, 0, 1)
    );

    let mut tool = message(1_030, "ls -la");
    tool.kind = pb::EventKind::ToolCall as i32;
    tool.tool_name = "Bash".into();
    tool.event_id = "evt-tool".into();
    let mut first = message(1_000, "hi");
    first.event_id = "evt-1".into();
    first.token_usage = Some(pb::TokenUsage {
        input_tokens: 10,
        output_tokens: 20,
        ..Default::default()
    });
    // Out of order on purpose: duration is first-to-last by time, not by arrival.
    let batch = vec![message(1_060, "last"), first.clone(), tool.clone()];
    let appended = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events: batch,
        })
        .await
        .unwrap();
    assert!(
        appended
            .metadata()
            .get(convoy_proto::consistency::HEADER)
            .is_some()
    );
    let appended = appended.into_inner();
    let c = appended.conversation.unwrap();
    assert_eq!(c.event_count, 3);
    assert_eq!(c.message_count, 2);
    assert_eq!(c.duration.unwrap().seconds, 60);
    assert_eq!(c.token_usage.unwrap().output_tokens, 20);
    assert_eq!(
        appended
            .events
            .iter()
            .map(|e| e.sequence)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // Re-sending events with stored ids changes nothing.
    let resent = client
        .append_events(pb::AppendEventsRequest {
            parent: conversation.name.clone(),
            events: vec![first, tool],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resent.duplicate_count, 2);
    assert!(resent.events.is_empty());
    assert_eq!(resent.conversation.unwrap().event_count, 3);

    let listed = client
        .list_events(pb::ListEventsRequest {
            parent: conversation.name.clone(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.events.len(), 2);
    let rest = client
        .list_events(pb::ListEventsRequest {
            parent: conversation.name.clone(),
            page_size: 2,
            page_token: listed.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.events.len(), 1);
    assert_eq!(rest.events[0].tool_name, "Bash");
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test]
async fn create_is_idempotent_by_request_id() {
    let fleet = Fleet::start(2).await;
    let mut client = fleet.client().await;
    let mut req = new_conversation("idem", "once", "");
    req.request_id = uuid::Uuid::now_v7().to_string();
    let first = client
        .create_conversation(req.clone())
        .await
        .unwrap()
        .into_inner();
    let again = client
        .create_conversation(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.name, again.name);
    assert_eq!(first.etag, again.etag);

    // Concurrent retries of one request create one conversation.
    let mut concurrent = req.clone();
    concurrent.request_id = uuid::Uuid::now_v7().to_string();
    let results = futures::future::join_all((0..6).map(|_| {
        let mut client = client.clone();
        let req = concurrent.clone();
        async move {
            client
                .create_conversation(req)
                .await
                .unwrap()
                .into_inner()
                .name
        }
    }))
    .await;
    assert!(results.iter().all(|n| *n == results[0]));

    let listed = client
        .list_conversations(pb::ListConversationsRequest {
            parent: "teams/idem".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.conversations.len(), 2);

    // The same request_id with another request is a conflict.
    let mut other = req.clone();
    other.conversation.as_mut().unwrap().title = "different".into();
    let status = client.create_conversation(other).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // A client-chosen id that is taken is a conflict.
    let mut chosen = new_conversation("idem", "chosen", "");
    chosen.conversation_id = uuid::Uuid::now_v7().to_string();
    client.create_conversation(chosen.clone()).await.unwrap();
    let status = client
        .create_conversation(chosen.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // With a request id too: the refused create keeps no claim of it, so its retry is
    // refused again rather than replayed as a success that names the other conversation.
    let mut chosen_again = chosen;
    chosen_again.request_id = uuid::Uuid::now_v7().to_string();
    for _ in 0..2 {
        let status = client
            .create_conversation(chosen_again.clone())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    }
}

#[tokio::test]
async fn batch_get_returns_in_request_order_and_is_all_or_nothing() {
    let fleet = Fleet::start(2).await;
    let mut client = fleet.client().await;
    let a = create(&fleet, "batch", "a", "").await;
    let b = create(&fleet, "batch", "b", "").await;
    let got = client
        .batch_get_conversations(pb::BatchGetConversationsRequest {
            parent: "teams/batch".into(),
            names: vec![b.name.clone(), a.name.clone(), b.name.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = got.conversations.into_iter().map(|c| c.name).collect();
    assert_eq!(names, vec![b.name.clone(), a.name.clone(), b.name.clone()]);

    let missing = format!("teams/batch/conversations/{}", uuid::Uuid::now_v7());
    let status = client
        .batch_get_conversations(pb::BatchGetConversationsRequest {
            parent: "teams/batch".into(),
            names: vec![a.name.clone(), missing.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains(&missing));
}

/// Each malformed input gets INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn bad_input_gets_invalid_argument_with_the_field_named() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let existing = create(&fleet, "bad", "ok", "").await;

    let with = |f: fn(&mut pb::Conversation)| {
        let mut req = new_conversation("bad", "title", "");
        f(req.conversation.as_mut().unwrap());
        req
    };
    let creates: Vec<(pb::CreateConversationRequest, &str)> = vec![
        (with(|c| c.title = String::new()), "conversation.title"),
        (with(|c| c.title = "t".repeat(513)), "conversation.title"),
        (with(|c| c.intent = 0), "conversation.intent"),
        (with(|c| c.intent = 99), "conversation.intent"),
        (with(|c| c.status = 42), "conversation.status"),
        (
            with(|c| c.content = "x".repeat((1 << 20) + 1)),
            "conversation.content",
        ),
        (
            with(|c| c.content = "nul\0byte".into()),
            "conversation.content",
        ),
        (
            with(|c| {
                c.metadata = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
            }),
            "conversation.metadata",
        ),
        (
            with(|c| c.effectiveness_score = Some(1.5)),
            "conversation.effectiveness_score",
        ),
        (
            with(|c| c.effectiveness_score = Some(f64::NAN)),
            "conversation.effectiveness_score",
        ),
        (
            pb::CreateConversationRequest {
                parent: "teams/Bad_Team".into(),
                ..new_conversation("bad", "t", "")
            },
            "parent",
        ),
        (
            pb::CreateConversationRequest {
                conversation: None,
                ..new_conversation("bad", "t", "")
            },
            "conversation",
        ),
        (
            pb::CreateConversationRequest {
                request_id: "not-a-uuid".into(),
                ..new_conversation("bad", "t", "")
            },
            "request_id",
        ),
        (
            pb::CreateConversationRequest {
                conversation_id: "123".into(),
                ..new_conversation("bad", "t", "")
            },
            "conversation_id",
        ),
    ];
    for (req, field) in creates {
        let status = client.create_conversation(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(
            violated_fields(&status),
            vec![field.to_owned()],
            "{status:?}"
        );
    }

    // Several bad fields at once are all reported.
    let status = client
        .create_conversation(with(|c| {
            c.title = String::new();
            c.intent = 0;
        }))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        vec![
            "conversation.title".to_owned(),
            "conversation.intent".to_owned()
        ]
    );

    let status = client
        .get_conversation(pb::GetConversationRequest {
            name: "teams/bad/conversations/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["name"]);

    let status = client
        .list_conversations(pb::ListConversationsRequest {
            parent: "teams/bad".into(),
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["page_size"]);

    let status = client
        .list_conversations(pb::ListConversationsRequest {
            parent: "teams/bad".into(),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["page_token"]);

    // A token reused with other filters is refused, not silently reinterpreted.
    for i in 0..3 {
        create(&fleet, "bad", &format!("more {i}"), "").await;
    }
    let page = client
        .list_conversations(pb::ListConversationsRequest {
            parent: "teams/bad".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = client
        .list_conversations(pb::ListConversationsRequest {
            parent: "teams/bad".into(),
            page_size: 1,
            page_token: page.next_page_token.clone(),
            intent: pb::Intent::Feature as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["page_token"]);

    // Oversized page sizes are clamped, not refused.
    client
        .list_conversations(pb::ListConversationsRequest {
            parent: "teams/bad".into(),
            page_size: i32::MAX,
            ..Default::default()
        })
        .await
        .unwrap();

    let status = client
        .batch_get_conversations(pb::BatchGetConversationsRequest {
            parent: "teams/bad".into(),
            names: vec![existing.name.clone(); 101],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["names"]);

    let status = client
        .batch_get_conversations(pb::BatchGetConversationsRequest {
            parent: "teams/other".into(),
            names: vec![existing.name.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["names[0]"]);

    let status = client
        .append_events(pb::AppendEventsRequest {
            parent: existing.name.clone(),
            events: vec![message(1, "x"); 501],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["events"]);

    let mut bad_json = message(1, "x");
    bad_json.raw_json = "{not json".into();
    let status = client
        .append_events(pb::AppendEventsRequest {
            parent: existing.name.clone(),
            events: vec![bad_json],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["events[0].raw_json"]);

    let status = client
        .search_conversations(pb::SearchConversationsRequest {
            parent: "teams/bad".into(),
            query: "   ".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["query"]);

    let status = client
        .update_conversation(pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: existing.name.clone(),
                title: "x".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["message_count".into(), "nonsense".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        vec!["update_mask.paths[0]", "update_mask.paths[1]"]
    );

    let status = client
        .delete_conversation(pb::DeleteConversationRequest {
            name: existing.name.clone(),
            etag: "W/whatever".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["etag"]);

    let mut get = Request::new(pb::GetConversationRequest {
        name: existing.name.clone(),
    });
    get.metadata_mut()
        .insert(convoy_proto::consistency::HEADER, "bogus".parse().unwrap());
    let status = client.get_conversation(get).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Nothing above wrote anything.
    let pool = fleet.shard_pool(0).await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations WHERE team_id = 'bad'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 4);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 0);
}

#[tokio::test]
async fn writes_answer_with_a_consistency_token_that_reads_accept() {
    let fleet = Fleet::start(2).await;
    let mut client = fleet.client().await;
    let created = client
        .create_conversation(new_conversation("tokens", "t", ""))
        .await
        .unwrap();
    let token = created
        .metadata()
        .get(convoy_proto::consistency::HEADER)
        .expect("a write returns a consistency token")
        .clone();
    let decoded =
        convoy_proto::consistency::ConsistencyToken::decode(token.to_str().unwrap()).unwrap();
    let created = created.into_inner();
    assert_eq!(decoded.version, created.version);
    assert_eq!(
        decoded.shard,
        format!("shard-{}", fleet.map.owner_of_team("tokens"))
    );
    let mut get = Request::new(pb::GetConversationRequest {
        name: created.name.clone(),
    });
    get.metadata_mut()
        .insert(convoy_proto::consistency::HEADER, token);
    let read = client.get_conversation(get).await.unwrap().into_inner();
    assert!(read.version >= decoded.version);
}

#[tokio::test]
async fn a_down_shard_gives_unavailable_for_its_teams_only() {
    let mut fleet = Fleet::start(2).await;
    let mut client = fleet.client().await;
    let team_on = |shard: usize| {
        (0..)
            .map(|i| format!("team-{i}"))
            .find(|t| fleet.map.owner_of_team(t) == shard)
            .unwrap()
    };
    let (up, down) = (team_on(0), team_on(1));
    fleet.shards[1].stop().await.unwrap();

    let status = client
        .create_conversation(new_conversation(&down, "t", ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    client
        .create_conversation(new_conversation(&up, "t", ""))
        .await
        .expect("the other shard still serves");

    fleet.shards[1].restart().await.unwrap();
    // Pooled connections to the restarted server are stale; the pool's liveness check
    // replaces them, so the next call succeeds.
    let mut last = None;
    for _ in 0..20 {
        match client
            .create_conversation(new_conversation(&down, "t", ""))
            .await
        {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        last.is_none(),
        "the shard's teams recover once it is back: {last:?}"
    );
}

#[tokio::test]
async fn a_call_past_its_deadline_gets_deadline_exceeded() {
    let fleet = Fleet::start(1).await;
    let created = create(&fleet, "slow", "t", "").await;

    // Hold the row lock so the update blocks.
    let pool = fleet.shard_pool(0).await;
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM conversations WHERE team_id = 'slow' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();

    // A client without a timer of its own (tonic's channel would also enforce the header,
    // racing the server): only the server's answer can end this call.
    let connector =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<tonic::body::Body>();
    let origin: http::Uri = format!("http://{}", fleet.addr).parse().unwrap();
    let mut client = ConversationServiceClient::with_origin(connector, origin);
    let mut update = Request::new(pb::UpdateConversationRequest {
        conversation: Some(pb::Conversation {
            name: created.name.clone(),
            title: "late".into(),
            ..Default::default()
        }),
        update_mask: None,
    });
    update
        .metadata_mut()
        .insert("grpc-timeout", "300m".parse().unwrap());
    let status = client.update_conversation(update).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    blocker.rollback().await.unwrap();
}

#[tokio::test]
async fn health_reports_serving_then_not_serving_on_shutdown() {
    let mut fleet = Fleet::start(1).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(fleet.channel().await);
    for service in ["", convoy_proto::service_names::CONVERSATION] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: convoy_proto::service_names::CONVERSATION.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(
        first.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let stopping = tokio::spawn(async move { fleet.stop_service().await });
    // Watchers see NOT_SERVING as soon as shutdown begins, while the server drains.
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(
        next.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    // An open stream would hold the drain until its timeout; a watcher that hears
    // NOT_SERVING goes away.
    drop(watch);
    drop(health);
    stopping.await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish_before_exiting() {
    let mut fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let created = create(&fleet, "drain", "t", "").await;

    // An update blocked on a row lock is in flight when shutdown begins.
    let pool = fleet.shard_pool(0).await;
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM conversations WHERE team_id = 'drain' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let in_flight = tokio::spawn(async move {
        client
            .update_conversation(pb::UpdateConversationRequest {
                conversation: Some(pb::Conversation {
                    name: created.name.clone(),
                    title: "finished during drain".into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(async move {
        fleet.stop_service().await;
        fleet
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stopping.is_finished(),
        "the server exited with a call in flight"
    );
    blocker.rollback().await.unwrap();

    let updated = in_flight
        .await
        .unwrap()
        .expect("the in-flight call completes");
    assert_eq!(updated.into_inner().title, "finished during drain");
    let fleet = stopping.await.unwrap();
    // Stopped: new connections are refused.
    assert!(
        tonic::transport::Channel::from_shared(format!("http://{}", fleet.addr))
            .unwrap()
            .connect()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn past_the_bulkhead_calls_are_shed_at_once_with_pushback() {
    const LIMIT: usize = 2;
    const EXTRA: usize = 3;
    // No queue, so that past the limit a call is refused on arrival (the queue's waits are
    // tested under tokio's paused clock in convoy_mesh::bulkhead).
    let fleet = Fleet::start_with(
        1,
        &["--max-concurrent-calls", "2", "--max-queued-calls", "0"],
    )
    .await;
    let created = create(&fleet, "bulkhead", "t", "").await;

    // LIMIT updates block on a row lock and hold the bulkhead's permits.
    let pool = fleet.shard_pool(0).await;
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM conversations WHERE team_id = 'bulkhead' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let client = fleet.client().await;
    let update = |title: &str| pb::UpdateConversationRequest {
        conversation: Some(pb::Conversation {
            name: created.name.clone(),
            title: title.into(),
            ..Default::default()
        }),
        update_mask: None,
    };
    let holders: Vec<_> = (0..LIMIT)
        .map(|i| {
            let mut client = client.clone();
            let request = update(&format!("holder {i}"));
            tokio::spawn(async move { client.update_conversation(request).await })
        })
        .collect();
    // Wait until both hold a permit (their statements wait on the lock).
    for _ in 0..100 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting as usize == LIMIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for i in 0..EXTRA {
        let mut client = client.clone();
        let status = client
            .update_conversation(update(&format!("extra {i}")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
    }
    blocker.rollback().await.unwrap();
    for holder in holders {
        holder
            .await
            .unwrap()
            .expect("calls within the limit complete");
    }
}

/// The outbox rows of `team` on its shard, as (kind, version), in order.
async fn outbox(fleet: &Fleet, team: &str) -> Vec<(String, i64)> {
    let pool = fleet.shard_pool(fleet.map.owner_of_team(team)).await;
    sqlx::query_as("SELECT kind, version FROM outbox WHERE team_id = $1 ORDER BY id")
        .bind(team)
        .fetch_all(&pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_committed_write_leaves_exactly_one_outbox_row_and_refused_ones_none() {
    let fleet = Fleet::start(2).await;
    let mut client = fleet.client().await;
    let team = "outboxed";
    let created = create(&fleet, team, "t", "").await;
    let mut with_request = new_conversation(team, "idempotent", "");
    with_request.request_id = uuid::Uuid::now_v7().to_string();
    client
        .create_conversation(with_request.clone())
        .await
        .unwrap();
    client.create_conversation(with_request).await.unwrap(); // a replay writes nothing

    let updated = client
        .update_conversation(pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: created.name.clone(),
                title: "t2".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    // Refused writes: a stale etag, an invalid event batch.
    client
        .update_conversation(pb::UpdateConversationRequest {
            conversation: Some(pb::Conversation {
                name: created.name.clone(),
                title: "t3".into(),
                etag: created.etag.clone(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap_err();
    client
        .append_events(pb::AppendEventsRequest {
            parent: created.name.clone(),
            events: vec![pb::ConversationEvent::default()],
        })
        .await
        .unwrap_err();
    let mut event = message(1_000, "hi");
    event.event_id = "e1".into();
    client
        .append_events(pb::AppendEventsRequest {
            parent: created.name.clone(),
            events: vec![event.clone()],
        })
        .await
        .unwrap();
    // All duplicates: no change, so no row.
    client
        .append_events(pb::AppendEventsRequest {
            parent: created.name.clone(),
            events: vec![event],
        })
        .await
        .unwrap();
    client
        .delete_conversation(pb::DeleteConversationRequest {
            name: created.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();

    let rows = outbox(&fleet, team).await;
    assert_eq!(
        rows,
        vec![
            ("created".to_owned(), 1),
            ("created".to_owned(), 1),
            ("updated".to_owned(), updated.version),
            ("events_appended".to_owned(), updated.version + 1),
            ("deleted".to_owned(), updated.version + 2),
        ]
    );
    let pool = fleet.shard_pool(fleet.map.owner_of_team(team)).await;
    let tags: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT unnest(tags) FROM outbox WHERE team_id = $1")
            .bind(team)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(tags, vec![format!("team:{team}")]);
}

/// sqlx's cancellation pitfall: a call dropped mid-transaction (its caller's deadline
/// passes) must never leave a pooled connection inside that transaction, nor half a write.
/// Transactional operations run to their end on a detached task, so no backend of the
/// service stays "idle in transaction" and the counters match the events stored.
#[tokio::test]
async fn calls_cancelled_mid_transaction_leave_no_connection_in_a_transaction() {
    let fleet = Fleet::start(1).await;
    let mut client = fleet.client().await;
    let created = client
        .create_conversation(new_conversation("cancelled", "Cut short", ""))
        .await
        .unwrap()
        .into_inner();
    // AppendEvents is a transaction; deadlines of 1-3 ms cut most calls short in flight.
    let mut cut_short = 0;
    for i in 0..60 {
        let mut request = Request::new(pb::AppendEventsRequest {
            parent: created.name.clone(),
            events: vec![message(1_800_000_000 + i, "cut short?")],
        });
        request.set_timeout(Duration::from_millis(1 + (i as u64 % 3)));
        match client.append_events(request).await {
            Ok(_) => {}
            // The server's DEADLINE_EXCEEDED, or the client giving up first.
            Err(status) if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                cut_short += 1
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    assert!(cut_short > 0, "some calls were cut short");

    let pool = fleet.shard_pool(0).await;
    let in_transaction = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'convoy-conversation' AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    // A detached transaction may still be finishing; none may stay.
    let mut left = in_transaction().await;
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = in_transaction().await;
    }
    assert_eq!(left, 0, "connections left inside a transaction");

    // Every later call works, and nothing was half written: the counter is the rows.
    let got = client
        .get_conversation(pb::GetConversationRequest {
            name: created.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversation_events WHERE team_id = 'cancelled'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(got.event_count, stored);
}
