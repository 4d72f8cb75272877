//! A client session's consistency tokens: what its writes returned, and which one a read
//! carries. One session is shared by every typed client of a [`crate::ConvoyClient`], so a
//! write through the conversation client is read back by the analytics client too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tonic::metadata::{Ascii, MetadataValue};

/// Conversations whose latest write token a session remembers, at most.
const SESSION_CONVERSATIONS: usize = 4096;

/// A session shared by clones and by the typed clients of one connection.
pub(crate) type SharedSession = Arc<Mutex<Session>>;

/// The session, even if a panicking holder poisoned the lock (it holds only tokens).
pub(crate) fn lock(session: &SharedSession) -> MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(|e| e.into_inner())
}

/// The consistency tokens a session's writes returned.
#[derive(Debug, Default)]
pub(crate) struct Session {
    /// The newest, for reads across a team (List, Search, BatchGet, analytics).
    newest: Option<MetadataValue<Ascii>>,
    /// Per conversation, the token of the session's latest write to it, for reads of that
    /// conversation: a token names one conversation's version, which the caches check.
    by_conversation: HashMap<String, MetadataValue<Ascii>>,
}

impl Session {
    /// Remembers `token`, returned by a call on `scope`.
    pub(crate) fn record(&mut self, scope: &Scope, token: &MetadataValue<Ascii>) {
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

    /// The token a read of `scope` carries.
    pub(crate) fn token_for(&self, scope: &Scope) -> Option<MetadataValue<Ascii>> {
        match scope {
            Scope::Conversation(name) => self.by_conversation.get(name).cloned(),
            Scope::Team => self.newest.clone(),
        }
    }
}

/// What a call reads or writes, for the session's tokens.
#[derive(Clone, Debug)]
pub(crate) enum Scope {
    /// One conversation (by name): it carries that conversation's latest token, if the
    /// session wrote it (a conversation it never wrote has nothing of its to read back).
    Conversation(String),
    /// A team's conversations: the newest token.
    Team,
}
