//! The error type for starting, stopping and probing test servers.
//!
//! Not for errors of the code under test: only this crate's server handling
//! returns these.

/// What went wrong while starting, stopping or probing a test server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A server binary (or a helper such as `runuser`) is not installed.
    #[error("{binary} not found: {hint}")]
    MissingBinary {
        /// The program that was looked for, e.g. `initdb`.
        binary: String,
        /// Where it was looked for and how to install it.
        hint: String,
    },
    /// A file-system or process-spawning operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A helper command (initdb, chown, createdb, pg_ctl stop...) exited unsuccessfully.
    #[error("{what} failed:\n{output}")]
    CommandFailed {
        /// The command, in words.
        what: String,
        /// The tail of its stdout and stderr.
        output: String,
    },
    /// A server exited or refused to start.
    #[error("could not start {what}\n--- server log tail ---\n{log}")]
    StartFailed {
        /// The server, in words (e.g. `redis-server on 127.0.0.1:6380`).
        what: String,
        /// The tail of the server's log.
        log: String,
    },
    /// A server did not become ready in time.
    #[error("timed out waiting for {what}\n--- server log tail ---\n{log}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The tail of the server's log.
        log: String,
    },
}

/// Result of this crate's operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// Whether the server failed because its port was taken by someone else,
    /// in which case starting again on another port may work.
    pub(crate) fn is_address_in_use(&self) -> bool {
        match self {
            Error::StartFailed { log, .. } | Error::Timeout { log, .. } => {
                log.to_ascii_lowercase().contains("address already in use")
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn missing_binary_says_what_and_how() {
        let err = Error::MissingBinary {
            binary: "initdb".into(),
            hint: "looked in /usr/lib/postgresql/*/bin and PATH; install it with `apt-get install -y postgresql`".into(),
        };
        assert_eq!(
            err.to_string(),
            "initdb not found: looked in /usr/lib/postgresql/*/bin and PATH; install it with `apt-get install -y postgresql`"
        );
    }

    #[test]
    fn address_in_use_is_recognised_in_logs() {
        let err = Error::StartFailed {
            what: "x".into(),
            log: "listen tcp 127.0.0.1:5: bind: address already in use".into(),
        };
        assert!(err.is_address_in_use());
        let err = Error::Timeout {
            what: "x".into(),
            log: "fine".into(),
        };
        assert!(!err.is_address_in_use());
    }
}
