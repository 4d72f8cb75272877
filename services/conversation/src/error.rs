//! The conversation service's errors, and their one mapping to `tonic::Status`.
//!
//! Handlers and the store return [`ApiError`]; [`ApiError::into_status`] is the only place a
//! gRPC status is made, with rich details (google.rpc.BadRequest field violations,
//! PreconditionFailure, ResourceInfo, RetryInfo) where they help the caller fix the call.
//! Every status it makes is bounded by [`convoy_proto::errors`]: at most 10 violations
//! listed, each clipped, and a clipped message, whatever the request carried.

use std::time::Duration;

use convoy_proto::errors;
use convoy_store::DbFailure;
use tonic::{Code, Status};
use tonic_types::ErrorDetails;

/// Resource type named in ResourceInfo details.
const CONVERSATION_TYPE: &str = "convoy.v1.Conversation";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: every field violation found, not only the first.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<Violation>),
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The resource (or the request id) exists already.
    #[error("{what} already exists: {why}")]
    AlreadyExists {
        /// The resource or key.
        what: String,
        /// Why this is a conflict.
        why: String,
    },
    /// The answer would be larger than one response may carry
    /// ([`crate::limits::MAX_RESPONSE_BYTES`]).
    #[error("{subject}: {why}")]
    TooLarge {
        /// The request field that asks for too much.
        subject: String,
        /// How much it asks for and what would fit.
        why: String,
    },
    /// The etag sent is not the current one.
    #[error("etag of {name} is stale: the conversation changed since it was read")]
    StaleEtag {
        /// The conversation.
        name: String,
    },
    /// The owning shard cannot be reached or is saturated.
    #[error("shard {shard} is unavailable: {detail}")]
    Unavailable {
        /// The shard.
        shard: String,
        /// What happened.
        detail: String,
    },
    /// The work ran out of time.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// A bug or an unexpected database error; details are logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

/// One malformed field: its path in the request and what would be right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Field path, e.g. `conversation.title` or `events[3].occur_time`.
    pub field: String,
    /// What is wrong and what would be right.
    pub description: String,
}

impl Violation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// The violations as (field, description) pairs, for [`convoy_proto::errors`].
fn pairs(violations: &[Violation]) -> Vec<(&str, &str)> {
    violations
        .iter()
        .map(|v| (v.field.as_str(), v.description.as_str()))
        .collect()
}

/// A bounded one-line description (see [`convoy_proto::errors::summary`]).
fn describe(violations: &[Violation]) -> String {
    errors::summary(&pairs(violations))
}

impl ApiError {
    /// A single-field INVALID_ARGUMENT.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![Violation::new(field, description)])
    }

    /// Classifies a database error from `shard`.
    pub fn from_db(shard: &str, error: sqlx::Error) -> Self {
        match DbFailure::classify(&error) {
            DbFailure::Unavailable => Self::Unavailable {
                shard: shard.to_owned(),
                detail: error.to_string(),
            },
            DbFailure::Timeout => {
                Self::DeadlineExceeded(format!("a statement on shard {shard} ran past its timeout"))
            }
            DbFailure::Fenced(fence) => Self::Unavailable {
                shard: shard.to_owned(),
                detail: format!("the team's slot is moving ({fence:?}); retry"),
            },
            DbFailure::Conflict => Self::Unavailable {
                shard: shard.to_owned(),
                detail: "transaction conflict; retry".into(),
            },
            DbFailure::UniqueViolation(_) | DbFailure::Internal => {
                Self::Internal(format!("shard {shard}: {error}"))
            }
        }
    }

    /// The gRPC status for this error, bounded as [`convoy_proto::errors`] says.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        match self {
            Self::InvalidArgument(violations) => errors::invalid_argument(&pairs(&violations)),
            Self::NotFound(name) => errors::with_details(
                Code::NotFound,
                &message,
                ErrorDetails::with_resource_info(CONVERSATION_TYPE, name, "", "not found"),
            ),
            Self::AlreadyExists { what, why } => errors::with_details(
                Code::AlreadyExists,
                &message,
                ErrorDetails::with_resource_info(CONVERSATION_TYPE, what, "", why),
            ),
            Self::TooLarge { subject, why } => errors::with_details(
                Code::FailedPrecondition,
                &message,
                ErrorDetails::with_precondition_failure_violation(
                    "RESPONSE_SIZE",
                    subject,
                    errors::clip(&why, errors::MAX_DESCRIPTION_BYTES),
                ),
            ),
            Self::StaleEtag { name } => errors::with_details(
                Code::FailedPrecondition,
                &message,
                ErrorDetails::with_precondition_failure_violation(
                    "ETAG",
                    name,
                    "read the conversation again and retry with its current etag",
                ),
            ),
            Self::Unavailable { .. } => errors::with_details(
                Code::Unavailable,
                &message,
                ErrorDetails::with_retry_info(Some(Duration::from_millis(500))),
            ),
            Self::DeadlineExceeded(_) => {
                Status::deadline_exceeded(errors::clip(&message, errors::MAX_MESSAGE_BYTES))
            }
            Self::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; the server logged the details")
            }
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        error.into_status()
    }
}
