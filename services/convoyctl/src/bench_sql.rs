//! The statements of `convoyctl bench`'s direct-SQL baseline: for each drawn request, what
//! the fleet's services send to the owning shard's primary for it, built by the services'
//! own code (validation and query builders), sent straight with sqlx:
//!
//! - a Get: the Get's statement;
//! - a List or a Search: the List or Search query for a page of 20;
//! - a team summary: the analytics aggregate the service runs on the team's shard;
//! - a write: the same rows (a conversation, then two messages and the counters they move)
//!   in two transactions, without the outbox rows, idempotency record and consistency token
//!   the service adds: what a durable write costs Postgres alone.
//!
//! Not here: offering the load or the other baselines (`convoy_loadgen`).

use std::sync::Arc;

use convoy_loadgen::baseline::SqlCall;
use convoy_loadgen::scenario::{Draw, PAGE_SIZE, summary_request};
use convoy_proto::v1 as pb;
use futures::FutureExt;
use rand::rngs::SmallRng;
use sqlx::PgPool;

/// The baseline's statements for every draw.
pub fn call() -> SqlCall {
    Arc::new(|draw, rng, pool| send(draw, rng, pool).boxed())
}

/// A drawn request the services' validation refuses (a bug of the generator's draws).
fn invalid(e: impl std::fmt::Display) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

async fn send(draw: Draw, mut rng: SmallRng, pool: PgPool) -> Result<bool, sqlx::Error> {
    match draw {
        Draw::Get { name } => {
            let name = conversation::validate::conversation_name("name", &name).map_err(invalid)?;
            let row = sqlx::query(conversation::store::GET_SQL)
                .bind(name.team.as_str())
                .bind(name.id)
                .fetch_optional(&pool)
                .await?;
            Ok(row.is_some())
        }
        Draw::List { parent } => {
            let query = conversation::validate::list(&pb::ListConversationsRequest {
                parent,
                page_size: PAGE_SIZE,
                ..Default::default()
            })
            .map_err(invalid)?;
            conversation::store::list_query("", &query)
                .build()
                .fetch_all(&pool)
                .await?;
            Ok(true)
        }
        Draw::Search { parent, query } => {
            let query = conversation::validate::search(&pb::SearchConversationsRequest {
                parent,
                query,
                page_size: PAGE_SIZE,
                ..Default::default()
            })
            .map_err(invalid)?;
            conversation::store::search_query("", &query)
                .build()
                .fetch_all(&pool)
                .await?;
            Ok(true)
        }
        Draw::Analytics { parent } => {
            let query =
                analytics::validate::team_summary(&summary_request(parent)).map_err(invalid)?;
            analytics::scatter::run(&pool, &query, &[]).await?;
            Ok(true)
        }
        Draw::Write { parent } => {
            let request = convoy_loadgen::seed::new_conversation(&parent, &mut rng);
            let new = conversation::validate::create(&request).map_err(invalid)?;
            let (team, id, fields) = (new.name.team.as_str(), new.name.id, &new.fields);
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO conversations (team_id, id, title, intent, status, content) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(team)
            .bind(id)
            .bind(&fields.title)
            .bind(fields.intent.as_str())
            .bind(fields.status.as_str())
            .bind(&fields.content)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;

            let messages = convoy_loadgen::seed::messages(2, &mut rng);
            let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            let now = chrono::Utc::now();
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO conversation_events \
                   (team_id, conversation_id, sequence, kind, role, occurred_at, content) \
                 SELECT $1, $2, sequence, 'message', 'user', $3, content \
                 FROM unnest($4::text[]) WITH ORDINALITY AS m(content, sequence)",
            )
            .bind(team)
            .bind(id)
            .bind(now)
            .bind(&contents)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE conversations SET message_count = message_count + $3, \
                   event_count = event_count + $3, version = version + 1, \
                   first_event_at = coalesce(first_event_at, $4), last_event_at = $4, \
                   updated_at = now() \
                 WHERE team_id = $1 AND id = $2",
            )
            .bind(team)
            .bind(id)
            .bind(contents.len() as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        }
    }
}
