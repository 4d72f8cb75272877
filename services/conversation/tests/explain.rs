//! Every query shape the service runs uses an index: proven with EXPLAIN on a real server,
//! over enough rows (and fresh statistics) that the planner's choice is the one it makes in
//! production, not the sequential scan it prefers for tiny tables.

use chrono::{TimeZone, Utc};
use conversation::model::*;
use conversation::names::{ConversationName, TeamId};
use conversation::store::{
    BATCH_GET_SQL, GET_SQL, LIST_EVENTS_SQL, SQL_BYTE_BUDGET, list_query, search_query,
};
use convoy_store::{PoolSettings, ShardMap, ShardPools};
use convoy_testkit::Postgres;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// Every (node type, relation, index) in a JSON plan.
fn nodes(plan: &Value, out: &mut Vec<(String, String, String)>) {
    if let Some(obj) = plan.as_object() {
        if let Some(Value::String(node)) = obj.get("Node Type") {
            let text = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            out.push((node.clone(), text("Relation Name"), text("Index Name")));
        }
        for value in obj.values() {
            nodes(value, out);
        }
    } else if let Some(items) = plan.as_array() {
        for item in items {
            nodes(item, out);
        }
    }
}

/// Asserts the plan scans no table sequentially and uses one of `indexes` (separated by `|`).
fn assert_uses_index(what: &str, plan: &Value, indexes: &str) {
    let mut found = Vec::new();
    nodes(plan, &mut found);
    for (node, relation, _) in &found {
        assert!(
            node != "Seq Scan",
            "{what}: sequential scan on {relation}: {found:?}"
        );
    }
    assert!(
        found
            .iter()
            .any(|(_, _, i)| indexes.split('|').any(|want| want == i)),
        "{what}: expected index {indexes}, plan used {found:?}"
    );
}

async fn seed() -> (Postgres, PgPool) {
    let pg = Postgres::start().await.unwrap();
    let pools = ShardPools::connect_lazy(
        ShardMap::evenly(&[pg.dsn()]).unwrap(),
        &PoolSettings::default(),
    )
    .unwrap();
    pools.migrate().await.unwrap();
    let pool = pools.pool(0).clone();
    // 50 teams x 600 conversations, a mix of statuses and intents, spread over a year;
    // 20 events for each of team-0's first 500 conversations.
    sqlx::query(
        "INSERT INTO conversations (team_id, id, title, intent, status, content, created_at)
         SELECT 'team-' || (i % 50),
                gen_random_uuid(),
                'conversation ' || i || CASE WHEN i % 97 = 0 THEN ' kubernetes' ELSE '' END,
                (ARRAY['debug','feature','refactor','review','explain','test','docs','other'])[1 + i % 8],
                (ARRAY['active','completed','abandoned','archived'])[1 + (i / 7) % 4],
                'body of conversation ' || i || CASE WHEN i % 89 = 0 THEN ' postgres tuning' ELSE '' END,
                timestamptz '2026-01-01' + (i || ' minutes')::interval * 17
         FROM generate_series(1, 30000) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO conversation_events (team_id, conversation_id, sequence, kind, occurred_at, content)
         SELECT c.team_id, c.id, s, 'message', c.created_at + (s || ' seconds')::interval, 'hello'
         FROM (SELECT team_id, id, created_at FROM conversations WHERE team_id = 'team-0' LIMIT 500) c,
              generate_series(1, 20) AS s",
    )
    .execute(&pool)
    .await
    .unwrap();
    // VACUUM also merges the GIN index's pending list, as autovacuum does in steady state;
    // before that, the planner rightly prices the unmerged list as expensive.
    sqlx::query("VACUUM ANALYZE").execute(&pool).await.unwrap();
    (pg, pool)
}

#[tokio::test]
async fn every_query_shape_uses_an_index() {
    let (_pg, pool) = seed().await;
    let team = TeamId::parse("team-0").unwrap();
    let some: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM conversations WHERE team_id = 'team-0' ORDER BY created_at DESC LIMIT 3",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    // Get by name.
    let get: (Value,) = sqlx::query_as(&format!("EXPLAIN (FORMAT JSON) {GET_SQL}"))
        .bind("team-0")
        .bind(some[0])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_uses_index("get", &get.0, "conversations_pkey");

    let batch: (Value,) = sqlx::query_as(&format!("EXPLAIN (FORMAT JSON) {}", *BATCH_GET_SQL))
        .bind("team-0")
        .bind(&some)
        .bind(SQL_BYTE_BUDGET)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_uses_index("batch get", &batch.0, "conversations_pkey");

    let events: (Value,) = sqlx::query_as(&format!("EXPLAIN (FORMAT JSON) {}", *LIST_EVENTS_SQL))
        .bind("team-0")
        .bind(some[0])
        .bind(0_i64)
        .bind(101_i64)
        .bind(SQL_BYTE_BUDGET)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_uses_index("list events", &events.0, "conversation_events_pkey");

    // Every List shape: no filter, each filter, a time range, and a later page.
    let list = |filters: Filters, cursor: Option<ListCursor>| ListQuery {
        team: team.clone(),
        filters,
        page_size: 50,
        cursor,
    };
    let cursor = ListCursor {
        created_at_micros: Utc
            .with_ymd_and_hms(2026, 6, 1, 0, 0, 0)
            .unwrap()
            .timestamp_micros(),
        id: Uuid::max(),
    };
    let shapes = [
        (
            "list",
            list(Filters::default(), None),
            "conversations_team_created_idx",
        ),
        (
            "list next page",
            list(Filters::default(), Some(cursor)),
            "conversations_team_created_idx",
        ),
        (
            "list active",
            list(
                Filters {
                    status: Some(Status::Active),
                    ..Filters::default()
                },
                None,
            ),
            "conversations_team_active_idx",
        ),
        (
            "list by intent",
            list(
                Filters {
                    intent: Some(Intent::Debug),
                    ..Filters::default()
                },
                Some(cursor),
            ),
            "conversations_team_created_idx",
        ),
        (
            "list by time range",
            list(
                Filters {
                    created_from: Some(Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()),
                    created_until: Some(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()),
                    ..Filters::default()
                },
                None,
            ),
            // A narrow range may be cheaper through the (team_id, created_at) analytics index.
            "conversations_team_created_idx|conversations_team_analytics_idx",
        ),
    ];
    for (what, query, index) in shapes {
        let (plan,): (Value,) = list_query("EXPLAIN (FORMAT JSON) ", &query)
            .build_query_as()
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_uses_index(what, &plan, index);
    }

    for (what, text, cursor) in [
        ("search", "kubernetes", None),
        ("search phrase", "\"postgres tuning\"", None),
        (
            "search next page",
            "kubernetes OR postgres",
            Some(SearchCursor {
                rank: 0.5,
                id: Uuid::max(),
            }),
        ),
    ] {
        let query = SearchQuery {
            team: team.clone(),
            query: text.into(),
            filters: Filters::default(),
            page_size: 20,
            cursor,
        };
        let (plan,): (Value,) = search_query("EXPLAIN (FORMAT JSON) ", &query)
            .build_query_as()
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_uses_index(what, &plan, "conversations_search_idx");
    }

    // The name type used by the store is the one the API parses.
    let name = ConversationName { team, id: some[0] };
    assert!(name.to_string().starts_with("teams/team-0/conversations/"));
}
