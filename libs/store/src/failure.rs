//! What a database error means for the caller: retry elsewhere, give up, or fix the input.
//!
//! Services map these classes to gRPC codes in their own error modules; the classification
//! itself (which SQLSTATEs and I/O failures mean what) lives here once.

/// The meaning of a failed database call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbFailure {
    /// The shard could not be reached or had no free connection: try again later.
    Unavailable,
    /// The statement ran past `statement_timeout` or was cancelled.
    Timeout,
    /// A unique constraint rejected the write (the constraint's name).
    UniqueViolation(String),
    /// A serialization failure or deadlock: the transaction may be retried as a whole.
    Conflict,
    /// The write fence refused the write: the caller's map is stale, or the slot is
    /// frozen for a move.
    Fenced(crate::ownership::Fence),
    /// Anything else: a bug or a schema mismatch.
    Internal,
}

impl DbFailure {
    /// Classifies an error from sqlx.
    pub fn classify(error: &sqlx::Error) -> Self {
        if let Some(fence) = crate::ownership::Fence::from_error(error) {
            return Self::Fenced(fence);
        }
        match error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable,
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("23505") => Self::UniqueViolation(db.constraint().unwrap_or_default().into()),
                // query_canceled (statement_timeout, or a cancel request)
                Some("57014") => Self::Timeout,
                Some("40001" | "40P01") => Self::Conflict,
                // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections,
                // read_only_sql_transaction (a demoted primary)
                Some("57P01" | "57P02" | "57P03" | "53300" | "25006") => Self::Unavailable,
                // The service's own credentials were refused (for example mid-rotation): this
                // process cannot reach the shard, another instance may. Not the caller's fault.
                Some("28000" | "28P01") => Self::Unavailable,
                Some(code) if code.starts_with("08") => Self::Unavailable,
                _ => Self::Internal,
            },
            _ => Self::Internal,
        }
    }
}
