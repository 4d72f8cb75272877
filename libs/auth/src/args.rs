//! The authorization flags every convoy service takes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::client::{Credentials, TokenFile};
use crate::layer::Authorizer;
use crate::limit::{Rate, RateLimitConfig, RateLimits};
use crate::verify::Verifier;

/// Why the flags do not make an authorizer.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// Neither keys nor an explicit opt-out: refusing to serve everyone by accident.
    #[error(
        "no --auth-keys: give the directory of token issuers' public keys, or --no-auth to \
         serve every caller unauthenticated (tests and throwaway set-ups only)"
    )]
    Unconfigured,
    /// Both keys and the opt-out.
    #[error("--auth-keys and --no-auth contradict each other")]
    Contradictory,
    /// The keys did not load.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// The service's own token did not load.
    #[error(transparent)]
    TokenFile(#[from] crate::client::TokenFileError),
}

/// Authorization flags, with `CONVOY_*` environment fallbacks.
#[derive(Clone, Debug, clap::Args)]
pub struct AuthArgs {
    /// Directory of the public keys tokens are verified against (`<kid>.pem`, Ed25519 or
    /// RSA); read again every --auth-key-reload-ms, so keys rotate without a restart. A
    /// bad file is skipped (the others load); an empty or deleted directory refuses every
    /// token.
    #[arg(long, env = "CONVOY_AUTH_KEYS")]
    pub auth_keys: Option<PathBuf>,

    /// How often the key directory is read again, in milliseconds: a removed key's tokens
    /// (cached ones too) are refused within this long. 5000 keeps the 10 s revocation
    /// bound of docs/security.md with a margin.
    #[arg(
        long,
        env = "CONVOY_AUTH_KEY_RELOAD_MS",
        default_value_t = crate::verify::KEY_RELOAD_INTERVAL.as_millis() as u64,
        value_parser = clap::value_parser!(u64).range(10..)
    )]
    pub auth_key_reload_ms: u64,

    /// Serve every caller without authentication or rate limits. Tests and throwaway
    /// set-ups only; a service without --auth-keys refuses to start unless this is given.
    #[arg(long, env = "CONVOY_NO_AUTH")]
    pub no_auth: bool,

    /// File holding this service's own token (role `service`), sent on its calls to other
    /// convoy services; read again when it changes.
    #[arg(long, env = "CONVOY_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Calls per team by readers (COUNT/s, /m or /h; a bucket holds one period's worth).
    #[arg(long, env = "CONVOY_RATE_LIMIT_READER", default_value = "2000/s")]
    pub rate_limit_reader: Rate,

    /// Calls per team by writers.
    #[arg(long, env = "CONVOY_RATE_LIMIT_WRITER", default_value = "1000/s")]
    pub rate_limit_writer: Rate,

    /// Calls per team (or on the fleet) by admins.
    #[arg(long, env = "CONVOY_RATE_LIMIT_ADMIN", default_value = "100/s")]
    pub rate_limit_admin: Rate,
}

impl AuthArgs {
    /// The server's authorizer (`None` with `--no-auth`), buffering at most
    /// `max_message_bytes` of a request.
    pub fn authorizer(
        &self,
        max_message_bytes: usize,
    ) -> Result<Option<Arc<Authorizer>>, AuthConfigError> {
        let dir = match (&self.auth_keys, self.no_auth) {
            (Some(_), true) => return Err(AuthConfigError::Contradictory),
            (None, false) => return Err(AuthConfigError::Unconfigured),
            (None, true) => {
                tracing::warn!("--no-auth: every caller may call everything");
                return Ok(None);
            }
            (Some(dir), false) => dir,
        };
        let verifier = Arc::new(
            Verifier::from_dir(dir)?
                .with_reload_interval(Duration::from_millis(self.auth_key_reload_ms)),
        );
        let limits = RateLimits::new(RateLimitConfig {
            reader: Some(self.rate_limit_reader),
            writer: Some(self.rate_limit_writer),
            admin: Some(self.rate_limit_admin),
        });
        Ok(Some(Arc::new(Authorizer::new(
            verifier,
            limits,
            max_message_bytes,
        ))))
    }

    /// What this service presents on its own calls.
    pub fn credentials(&self) -> Result<Credentials, AuthConfigError> {
        Ok(match &self.auth_token_file {
            Some(path) => Credentials::File(Arc::new(TokenFile::open(path)?)),
            None => Credentials::None,
        })
    }
}
