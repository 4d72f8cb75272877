//! The typed client of `convoy.v1.ConversationService`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use convoy_mesh::RetryPolicy;
use convoy_proto::consistency::HEADER;
use convoy_proto::methods::idempotency;
use convoy_proto::v1 as pb;
use convoy_proto::v1::conversation_service_client::ConversationServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{IntoRequest, Response, Status};
use tower::ServiceExt;
use tower::retry::Retry;

use crate::{Stack, Transport};

/// ConversationService through the mesh; cheap to clone.
#[derive(Clone)]
pub struct ConversationClient {
    stack: Stack,
    inner: ConversationServiceClient<Transport>,
    /// What this session's writes returned (shared by clones).
    session: Arc<Mutex<Session>>,
}

/// Conversations whose latest write token a session remembers, at most.
const SESSION_CONVERSATIONS: usize = 4096;

/// The consistency tokens a session's writes returned.
#[derive(Debug, Default)]
struct Session {
    /// The newest, for reads across a team (List, Search, BatchGet).
    newest: Option<MetadataValue<Ascii>>,
    /// Per conversation, the token of the session's latest write to it, for reads of that
    /// conversation: a token names one conversation's version, which the caches check.
    by_conversation: HashMap<String, MetadataValue<Ascii>>,
}

impl Session {
    fn record(&mut self, scope: &Scope, token: &MetadataValue<Ascii>) {
        self.newest = Some(token.clone());
        if let Scope::Conversation(name) = scope {
            if self.by_conversation.len() >= SESSION_CONVERSATIONS
                && !self.by_conversation.contains_key(name)
                && let Some(evicted) = self.by_conversation.keys().next().cloned()
            {
                self.by_conversation.remove(&evicted);
            }
            self.by_conversation.insert(name.clone(), token.clone());
        }
    }

    fn token_for(&self, scope: &Scope) -> Option<MetadataValue<Ascii>> {
        match scope {
            Scope::Conversation(name) => self.by_conversation.get(name).cloned(),
            Scope::Team => self.newest.clone(),
        }
    }
}

/// What a call reads or writes, for the session's tokens.
#[derive(Clone, Debug)]
enum Scope {
    /// One conversation (by name): it carries that conversation's latest token, if the
    /// session wrote it (a conversation it never wrote has nothing of its to read back).
    Conversation(String),
    /// A team's conversations: the newest token.
    Team,
}

impl ConversationClient {
    pub(crate) fn new(stack: Stack) -> Self {
        let inner = ConversationServiceClient::new(stack.transport.clone());
        Self {
            stack,
            inner,
            session: Arc::default(),
        }
    }

    /// Requests made, retries spent and retries refused by the budget, so far.
    pub fn retry_counts(&self) -> (u64, u64, u64) {
        self.stack.retry_counts()
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one call: deadline over every attempt, retries by the method's idempotency.
    async fn call<M, R, F, Fut>(
        &self,
        path: &'static str,
        scope: Scope,
        request: impl IntoRequest<M>,
        send: F,
    ) -> Result<Response<R>, Status>
    where
        M: Clone + Send + 'static,
        F: Fn(ConversationServiceClient<Transport>, tonic::Request<M>) -> Fut
            + Clone
            + Send
            + 'static,
        Fut: Future<Output = Result<Response<R>, Status>> + Send + 'static,
    {
        let mut request = request.into_request();
        // Session consistency: a call without a token of its own carries the newest one
        // this session's writes returned, so it reads them (replicas that have not replayed
        // them are skipped).
        let session = self.stack.config.session_consistency;
        if session && request.metadata().get(HEADER).is_none() {
            let token = self.session().token_for(&scope);
            if let Some(token) = token {
                request.metadata_mut().insert(HEADER, token);
            }
        }
        let deadline = self.stack.deadline_for(&request);
        request.extensions_mut().insert(deadline);
        let policy = RetryPolicy::new(
            self.stack.retry.clone(),
            self.stack.budget.clone(),
            idempotency(path),
        );
        let client = self.inner.clone();
        let attempt = tower::service_fn(move |request: tonic::Request<M>| {
            send.clone()(client.clone(), request)
        });
        match tokio::time::timeout_at(deadline.0, Retry::new(policy, attempt).oneshot(request))
            .await
        {
            Ok(result) => {
                if session
                    && let Ok(response) = &result
                    && let Some(token) = response.metadata().get(HEADER)
                {
                    self.session().record(&scope, token);
                }
                result
            }
            Err(_) => Err(Status::deadline_exceeded(
                "the call's deadline passed (all attempts included)",
            )),
        }
    }
}

macro_rules! rpc {
    ($(#[$doc:meta])* $name:ident, $path:literal, $req:ty => $res:ty, $scope:expr) => {
        $(#[$doc])*
        pub async fn $name(
            &self,
            request: impl IntoRequest<$req>,
        ) -> Result<Response<$res>, Status> {
            let request = request.into_request();
            let scope: fn(&$req) -> Scope = $scope;
            let scope = scope(request.get_ref());
            self.call(
                concat!("/convoy.v1.ConversationService/", $path),
                scope,
                request,
                |mut client, request| async move { client.$name(request).await },
            )
            .await
        }
    };
}

impl ConversationClient {
    /// CreateConversation. A missing `request_id` is filled in (AIP-155), so retries of
    /// this call never create twice.
    pub async fn create_conversation(
        &self,
        request: impl IntoRequest<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let mut request = request.into_request();
        if request.get_ref().request_id.is_empty() {
            request.get_mut().request_id = uuid::Uuid::now_v7().to_string();
        }
        let response = self
            .call(
                "/convoy.v1.ConversationService/CreateConversation",
                Scope::Team,
                request,
                |mut client, request| async move { client.create_conversation(request).await },
            )
            .await?;
        // The new conversation's own token, for reads of it.
        if self.stack.config.session_consistency
            && let Some(token) = response.metadata().get(HEADER)
        {
            let scope = Scope::Conversation(response.get_ref().name.clone());
            self.session().record(&scope, token);
        }
        Ok(response)
    }

    rpc!(
        /// GetConversation.
        get_conversation, "GetConversation", pb::GetConversationRequest => pb::Conversation,
        |r| Scope::Conversation(r.name.clone())
    );
    rpc!(
        /// BatchGetConversations.
        batch_get_conversations, "BatchGetConversations",
        pb::BatchGetConversationsRequest => pb::BatchGetConversationsResponse,
        |_| Scope::Team
    );
    rpc!(
        /// ListConversations.
        list_conversations, "ListConversations",
        pb::ListConversationsRequest => pb::ListConversationsResponse,
        |_| Scope::Team
    );
    rpc!(
        /// SearchConversations.
        search_conversations, "SearchConversations",
        pb::SearchConversationsRequest => pb::SearchConversationsResponse,
        |_| Scope::Team
    );
    rpc!(
        /// UpdateConversation (not retried: not declared idempotent).
        update_conversation, "UpdateConversation", pb::UpdateConversationRequest => pb::Conversation,
        |r| Scope::Conversation(r.conversation.as_ref().map(|c| c.name.clone()).unwrap_or_default())
    );
    rpc!(
        /// DeleteConversation.
        delete_conversation, "DeleteConversation", pb::DeleteConversationRequest => (),
        |r| Scope::Conversation(r.name.clone())
    );
    rpc!(
        /// AppendEvents (not retried: not declared idempotent).
        append_events, "AppendEvents", pb::AppendEventsRequest => pb::AppendEventsResponse,
        |r| Scope::Conversation(r.parent.clone())
    );
    rpc!(
        /// ListEvents.
        list_events, "ListEvents", pb::ListEventsRequest => pb::ListEventsResponse,
        |r| Scope::Conversation(r.parent.clone())
    );
}
