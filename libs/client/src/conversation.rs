//! The typed client of `convoy.v1.ConversationService`.

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
    /// The newest consistency token a write of this session returned (shared by clones).
    session: Arc<Mutex<Option<MetadataValue<Ascii>>>>,
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

    /// Runs one call: deadline over every attempt, retries by the method's idempotency.
    async fn call<M, R, F, Fut>(
        &self,
        path: &'static str,
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
        if self.stack.config.session_consistency && request.metadata().get(HEADER).is_none() {
            let token = self
                .session
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
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
                if let Ok(response) = &result
                    && let Some(token) = response.metadata().get(HEADER)
                {
                    *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
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
    ($(#[$doc:meta])* $name:ident, $path:literal, $req:ty => $res:ty) => {
        $(#[$doc])*
        pub async fn $name(
            &self,
            request: impl IntoRequest<$req>,
        ) -> Result<Response<$res>, Status> {
            self.call(
                concat!("/convoy.v1.ConversationService/", $path),
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
        self.call(
            "/convoy.v1.ConversationService/CreateConversation",
            request,
            |mut client, request| async move { client.create_conversation(request).await },
        )
        .await
    }

    rpc!(
        /// GetConversation.
        get_conversation, "GetConversation", pb::GetConversationRequest => pb::Conversation
    );
    rpc!(
        /// BatchGetConversations.
        batch_get_conversations, "BatchGetConversations",
        pb::BatchGetConversationsRequest => pb::BatchGetConversationsResponse
    );
    rpc!(
        /// ListConversations.
        list_conversations, "ListConversations",
        pb::ListConversationsRequest => pb::ListConversationsResponse
    );
    rpc!(
        /// SearchConversations.
        search_conversations, "SearchConversations",
        pb::SearchConversationsRequest => pb::SearchConversationsResponse
    );
    rpc!(
        /// UpdateConversation (not retried: not declared idempotent).
        update_conversation, "UpdateConversation", pb::UpdateConversationRequest => pb::Conversation
    );
    rpc!(
        /// DeleteConversation.
        delete_conversation, "DeleteConversation", pb::DeleteConversationRequest => ()
    );
    rpc!(
        /// AppendEvents (not retried: not declared idempotent).
        append_events, "AppendEvents", pb::AppendEventsRequest => pb::AppendEventsResponse
    );
    rpc!(
        /// ListEvents.
        list_events, "ListEvents", pb::ListEventsRequest => pb::ListEventsResponse
    );
}
