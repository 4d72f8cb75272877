//! The analytics service's errors, and their one mapping to `tonic::Status`.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The domain in `google.rpc.ErrorInfo` details.
const ERROR_DOMAIN: &str = "convoy.dev";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: every field violation found, not only the first.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The caller asked for a complete answer and these shards did not give theirs.
    #[error("shards {} did not answer in time; the answer would be incomplete", .0.join(", "))]
    Incomplete(Vec<String>),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ApiError {
    /// A single-field INVALID_ARGUMENT.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The gRPC status for this error.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        match self {
            Self::InvalidArgument(violations) => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request(violations),
            ),
            Self::Incomplete(missing) => {
                let mut details = ErrorDetails::with_retry_info(Some(Duration::from_secs(1)));
                details.set_error_info(
                    "SHARDS_MISSING",
                    ERROR_DOMAIN,
                    [("missing_shards".to_owned(), missing.join(","))],
                );
                Status::with_error_details(Code::Unavailable, message, details)
            }
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        error.into_status()
    }
}
