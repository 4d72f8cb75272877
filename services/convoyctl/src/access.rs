//! How convoyctl reaches the fleet's services: mutual TLS and the token its calls carry.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use convoy_auth::{Credentials, TokenFile};
use convoy_client::{ClientConfig, MeshTls, TlsArgs};

/// convoyctl's `--token`, `--token-file` and TLS options.
#[derive(Debug, Default, clap::Args)]
pub struct AccessArgs {
    /// The bearer token convoyctl's calls carry (see `convoyctl token mint`); the local
    /// fleet writes one to `.convoy/auth/admin.token`.
    #[arg(long, env = "CONVOY_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// A file holding the bearer token (read again when it changes).
    #[arg(
        long,
        env = "CONVOY_TOKEN_FILE",
        conflicts_with = "token",
        global = true
    )]
    pub token_file: Option<PathBuf>,
    /// Mutual TLS with the fleet's services (`--tls-cert`, `--tls-key`, `--tls-ca`).
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// What convoyctl's service calls run with.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Mutual TLS, or plain text.
    pub tls: Option<MeshTls>,
    /// The token calls carry.
    pub credentials: Credentials,
}

impl AccessArgs {
    /// Loads the certificates and the token.
    pub fn load(&self) -> anyhow::Result<Access> {
        let credentials = match (&self.token, &self.token_file) {
            (Some(token), _) => Credentials::token(token)
                .context("--token: a token is visible ASCII (a JWT's three base64url parts)")?,
            (None, Some(path)) => Credentials::File(Arc::new(
                TokenFile::open(path)
                    .with_context(|| format!("--token-file {}", path.display()))?,
            )),
            (None, None) => Credentials::None,
        };
        Ok(Access {
            tls: self.tls.load()?,
            credentials,
        })
    }
}

impl Access {
    /// The SDK's settings with this access.
    pub fn client_config(&self) -> ClientConfig {
        self.with(ClientConfig::default())
    }

    /// `config` with this access.
    pub fn with(&self, config: ClientConfig) -> ClientConfig {
        ClientConfig {
            credentials: self.credentials.clone(),
            ..config.with_tls(self.tls.clone())
        }
    }
}
