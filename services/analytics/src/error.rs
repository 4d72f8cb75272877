//! The analytics service's errors, and their one mapping to `tonic::Status`, bounded by
//! [`convoy_proto::errors`] (at most 10 violations listed, each clipped, and a clipped
//! message).

use std::time::Duration;

use convoy_proto::errors;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation};

/// The domain in `google.rpc.ErrorInfo` details.
const ERROR_DOMAIN: &str = "convoy.dev";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: every field violation found, not only the first.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The answer would be larger than one response may carry.
    #[error("{subject}: {why}")]
    TooLarge {
        /// The request field whose value asks for too much.
        subject: String,
        /// How much it asks for and what would fit.
        why: String,
    },
    /// The caller asked for a complete answer and these shards did not give theirs.
    #[error("shards {} did not answer in time; the answer would be incomplete", .0.join(", "))]
    Incomplete(Vec<String>),
}

/// The violations as (field, description) pairs, for [`convoy_proto::errors`].
fn pairs(violations: &[FieldViolation]) -> Vec<(&str, &str)> {
    violations
        .iter()
        .map(|v| (v.field.as_str(), v.description.as_str()))
        .collect()
}

/// A bounded one-line description (see [`convoy_proto::errors::summary`]).
fn describe(violations: &[FieldViolation]) -> String {
    errors::summary(&pairs(violations))
}

impl ApiError {
    /// A single-field INVALID_ARGUMENT.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The gRPC status for this error, bounded as [`convoy_proto::errors`] says.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        match self {
            Self::InvalidArgument(violations) => errors::invalid_argument(&pairs(&violations)),
            Self::TooLarge { subject, why } => errors::with_details(
                Code::FailedPrecondition,
                &message,
                ErrorDetails::with_precondition_failure_violation(
                    "RESPONSE_SIZE",
                    subject,
                    errors::clip(&why, errors::MAX_DESCRIPTION_BYTES),
                ),
            ),
            Self::Incomplete(missing) => {
                let mut details = ErrorDetails::with_retry_info(Some(Duration::from_secs(1)));
                details.set_error_info(
                    "SHARDS_MISSING",
                    ERROR_DOMAIN,
                    [("missing_shards".to_owned(), missing.join(","))],
                );
                errors::with_details(Code::Unavailable, &message, details)
            }
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        error.into_status()
    }
}
