//! The gRPC face of the conversation service: request → validation → store → reply.
//!
//! Each handler validates, then calls the store. Operations that open a transaction (an
//! append) run on a detached task, so a client that cancels or times out mid-call never
//! cancels a transaction half-way through (sqlx's known pitfall: a future dropped
//! inside `begin`/`commit` can return a connection to the pool inside a transaction). The
//! task is itself bounded by the store's operation timeout. Single-statement operations run
//! inline: dropping them mid-query is safe, and a task hop measured about 250 µs per call
//! on two cores (docs/benchmarks.md). Writes answer with the consistency token header.

use std::future::Future;
use std::sync::Arc;

use convoy_proto::consistency::{ConsistencyToken, HEADER};
use convoy_proto::v1 as pb;
use convoy_proto::v1::conversation_service_server::ConversationService;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::cached::ReadThrough;
use crate::error::ApiError;
use crate::model::Version;
use crate::names::ConversationName;
use crate::page_token::{self, Cursor};
use crate::sampler::Sampler;
use crate::store::{ConversationStore, ReadAt};
use crate::{validate, wire};

/// The ConversationService implementation.
#[derive(Clone, Debug)]
pub struct ConversationApi {
    store: Arc<ConversationStore>,
    reads: ReadThrough,
    sampler: Option<Arc<Sampler>>,
}

impl ConversationApi {
    /// A service over `store`, reading single conversations through `reads`.
    pub fn new(store: Arc<ConversationStore>, reads: ReadThrough) -> Self {
        Self {
            store,
            reads,
            sampler: None,
        }
    }

    /// Hands every acknowledged write to `sampler` (the consistency sampler).
    pub fn with_sampler(mut self, sampler: Arc<Sampler>) -> Self {
        self.sampler = Some(sampler);
        self
    }

    /// Runs a single-statement operation on the caller's task.
    async fn inline<T, F>(
        &self,
        work: impl FnOnce(Arc<ConversationStore>) -> F,
    ) -> Result<T, Status>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        work(self.store.clone())
            .await
            .map_err(ApiError::into_status)
    }

    /// Runs a transactional operation on a detached task; see the module docs.
    async fn detached<T, F>(
        &self,
        work: impl FnOnce(Arc<ConversationStore>) -> F,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let task = tokio::spawn(work(self.store.clone()));
        match task.await {
            Ok(result) => result.map_err(ApiError::into_status),
            Err(e) => Err(ApiError::Internal(format!("request task failed: {e}")).into_status()),
        }
    }

    /// The token of a write of `name` that made `version`, with `lsn`, the primary's WAL
    /// position after it (0 when the shard has no replicas), so reads with it skip replicas
    /// behind it.
    fn token(&self, name: &ConversationName, version: Version, lsn: u64) -> ConsistencyToken {
        ConsistencyToken {
            shard: self.store.shard(&name.team),
            lsn,
            conversation: name.id,
            version: version.0,
        }
    }

    /// The answer to a write of `name` that made `version` at WAL position `lsn`: `message`
    /// with its consistency token; the write is offered to the sampler.
    fn written<T>(
        &self,
        message: T,
        name: &ConversationName,
        version: Version,
        lsn: u64,
    ) -> Response<T> {
        if let Some(sampler) = &self.sampler {
            sampler.observe(name, version.0);
        }
        let token = self.token(name, version, lsn);
        let mut response = Response::new(message);
        if let Ok(value) = MetadataValue::try_from(token.encode()) {
            response.metadata_mut().insert(HEADER, value);
        }
        response
    }
}

#[tonic::async_trait]
impl ConversationService for ConversationApi {
    async fn create_conversation(
        &self,
        request: Request<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let new = validate::create(request.get_ref())?;
        // One statement with or without a request id: inline (see the module docs).
        let created = self
            .inline(|store| async move { store.create(new).await })
            .await?;
        let conversation = created.value.conversation;
        let (name, version) = (conversation.name.clone(), conversation.version);
        Ok(self.written(
            wire::conversation(conversation),
            &name,
            version,
            created.lsn,
        ))
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        // Through the caches, never older than the token's version (see `cached`).
        let token = validate::consistency_token(request.metadata())?;
        let name = validate::conversation_name("name", &request.get_ref().name)?;
        let (conversation, _) = self
            .reads
            .get(&self.store, &name, token.as_ref())
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(conversation))
    }

    async fn batch_get_conversations(
        &self,
        request: Request<pb::BatchGetConversationsRequest>,
    ) -> Result<Response<pb::BatchGetConversationsResponse>, Status> {
        let at = ReadAt::from_token(validate::consistency_token(request.metadata())?.as_ref());
        let (team, names) = validate::batch_get(request.get_ref())?;
        let conversations = self
            .inline(|store| async move {
                store
                    .batch_get(&team, &names, &at, wire::conversation)
                    .await
            })
            .await?;
        Ok(Response::new(pb::BatchGetConversationsResponse {
            conversations,
        }))
    }

    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        let at = ReadAt::from_token(validate::consistency_token(request.metadata())?.as_ref());
        let query = validate::list(request.get_ref())?;
        let fingerprint = validate::list_token_fingerprint(&query);
        let page = self
            .inline(|store| async move { store.list(&query, &at, wire::conversation).await })
            .await?;
        Ok(Response::new(pb::ListConversationsResponse {
            conversations: page.items,
            next_page_token: next_page_token(fingerprint, page.next.map(Cursor::List)),
        }))
    }

    async fn search_conversations(
        &self,
        request: Request<pb::SearchConversationsRequest>,
    ) -> Result<Response<pb::SearchConversationsResponse>, Status> {
        let at = ReadAt::from_token(validate::consistency_token(request.metadata())?.as_ref());
        let query = validate::search(request.get_ref())?;
        let fingerprint = validate::search_token_fingerprint(&query);
        let page = self
            .inline(|store| async move {
                store
                    .search(&query, &at, |c, rank| pb::SearchResult {
                        conversation: Some(wire::conversation(c)),
                        rank,
                    })
                    .await
            })
            .await?;
        Ok(Response::new(pb::SearchConversationsResponse {
            results: page.items,
            next_page_token: next_page_token(fingerprint, page.next.map(Cursor::Search)),
        }))
    }

    async fn update_conversation(
        &self,
        request: Request<pb::UpdateConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let (name, patch, expected) = validate::update(request.get_ref())?;
        let updated = self
            .inline(|store| async move { store.update(&name, &patch, expected).await })
            .await?;
        let conversation = updated.value;
        let (name, version) = (conversation.name.clone(), conversation.version);
        Ok(self.written(
            wire::conversation(conversation),
            &name,
            version,
            updated.lsn,
        ))
    }

    async fn delete_conversation(
        &self,
        request: Request<pb::DeleteConversationRequest>,
    ) -> Result<Response<()>, Status> {
        let (name, expected) = validate::delete(request.get_ref())?;
        let target = name.clone();
        let deleted = self
            .inline(|store| async move { store.delete(&target, expected).await })
            .await?;
        // The deletion is the version after the last one the row had.
        Ok(self.written((), &name, Version(deleted.value.0 + 1), deleted.lsn))
    }

    async fn append_events(
        &self,
        request: Request<pb::AppendEventsRequest>,
    ) -> Result<Response<pb::AppendEventsResponse>, Status> {
        let (name, events) = validate::append(request.get_ref())?;
        let target = name.clone();
        let appended = self
            .detached(|store| async move { store.append_events(&target, events).await })
            .await?;
        let lsn = appended.lsn;
        let appended = appended.value;
        let version = appended.conversation.version;
        let response = pb::AppendEventsResponse {
            events: appended
                .events
                .into_iter()
                .map(|e| wire::event(&name, e))
                .collect(),
            conversation: Some(wire::conversation(appended.conversation)),
            duplicate_count: appended.duplicates as i32,
        };
        Ok(self.written(response, &name, version, lsn))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let at = ReadAt::from_token(validate::consistency_token(request.metadata())?.as_ref());
        let original_after = request.get_ref().after_sequence;
        let query = validate::list_events(request.get_ref())?;
        let fingerprint = validate::events_token_fingerprint(&query, original_after);
        let name = query.conversation.clone();
        let page = self
            .inline(|store| async move {
                store
                    .list_events_page(&query, &at, |e| wire::event(&name, e))
                    .await
            })
            .await?;
        Ok(Response::new(pb::ListEventsResponse {
            events: page.items,
            next_page_token: next_page_token(fingerprint, page.next.map(Cursor::Events)),
        }))
    }
}

/// The token of the page after `next` (the position of a page's last item when more
/// follow), for the request with fingerprint `fingerprint`; empty on the last page.
fn next_page_token(fingerprint: u64, next: Option<Cursor>) -> String {
    next.map(|cursor| page_token::encode(fingerprint, &cursor))
        .unwrap_or_default()
}
