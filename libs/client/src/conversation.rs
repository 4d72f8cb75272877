//! The typed client of `convoy.v1.ConversationService`.

use std::future::Future;

use convoy_proto::consistency::HEADER;
use convoy_proto::v1 as pb;
use convoy_proto::v1::conversation_service_client::ConversationServiceClient;
use tonic::{IntoRequest, Response, Status};

use crate::session::{self, Scope, SharedSession};
use crate::{Stack, Transport};

/// ConversationService through the mesh; cheap to clone.
#[derive(Clone)]
pub struct ConversationClient {
    stack: Stack,
    inner: ConversationServiceClient<Transport>,
    /// What this session's writes returned (shared with the fleet's other clients).
    session: SharedSession,
}

impl ConversationClient {
    pub(crate) fn new(stack: Stack, session: SharedSession) -> Self {
        let inner = ConversationServiceClient::new(stack.transport.clone());
        Self {
            stack,
            inner,
            session,
        }
    }

    /// Requests made, retries spent and retries refused by the budget, so far.
    pub fn retry_counts(&self) -> (u64, u64, u64) {
        self.stack.retry_counts()
    }

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
        self.stack
            .call(&self.inner, &self.session, path, scope, request, send)
            .await
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
            session::lock(&self.session).record(&scope, token);
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
