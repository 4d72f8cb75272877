//! The client side: which token a call carries, and the forwarded user's.
//!
//! [`CredentialsLayer`] sits in convoy's client stacks. It sets `authorization` from the
//! client's [`Credentials`] and, inside a call the server layer let through, the user's
//! token as [`crate::SUBJECT_HEADER`], so the next hop enforces that user's teams.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Request};
use tower::{Layer, Service};

use crate::layer::{SUBJECT_HEADER, forwarded_token};

/// How often a token file is looked at again.
const TOKEN_FILE_RECHECK: Duration = Duration::from_secs(5);

/// The token a client presents.
#[derive(Clone, Debug, Default)]
pub enum Credentials {
    /// None: for servers running `--no-auth`.
    #[default]
    None,
    /// A fixed token, as its `authorization` value (see [`Credentials::token`]).
    Token(HeaderValue),
    /// A token read from a file and read again when the file changes (a service's own
    /// token, mounted from a Kubernetes Secret that the operator rotates).
    File(Arc<TokenFile>),
}

impl Credentials {
    /// A fixed token; `None` if it cannot be a header value (not visible ASCII).
    pub fn token(token: &str) -> Option<Self> {
        bearer(token).map(Credentials::Token)
    }

    /// `authorization`'s value now, if any (built once per token, not per call).
    pub fn header(&self) -> Option<HeaderValue> {
        match self {
            Credentials::None => None,
            Credentials::Token(value) => Some(value.clone()),
            Credentials::File(file) => file.current(),
        }
    }
}

fn bearer(token: &str) -> Option<HeaderValue> {
    HeaderValue::try_from(format!("Bearer {}", token.trim())).ok()
}

/// A token file; see [`Credentials::File`].
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenState>,
}

#[derive(Debug)]
struct TokenState {
    /// `Bearer <token>`, ready to send.
    token: Option<HeaderValue>,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// Why a token file could not be read at start.
#[derive(Debug, thiserror::Error)]
#[error("reading the token file {path}: {source}")]
pub struct TokenFileError {
    path: String,
    source: std::io::Error,
}

impl TokenFile {
    /// Reads `path` now (it must exist) and again, when it changed, at most every 5 s.
    pub fn open(path: &Path) -> Result<Self, TokenFileError> {
        let error = |source| TokenFileError {
            path: path.display().to_string(),
            source,
        };
        let token = std::fs::read_to_string(path).map_err(error)?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(Self {
            path: path.to_owned(),
            state: Mutex::new(TokenState {
                token: bearer(&token),
                modified,
                checked: Instant::now(),
            }),
        })
    }

    /// `Bearer <token>`, read again first if the file changed since the last look.
    pub fn current(&self) -> Option<HeaderValue> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= TOKEN_FILE_RECHECK {
            state.checked = Instant::now();
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified != state.modified {
                match std::fs::read_to_string(&self.path) {
                    Ok(token) => {
                        state.token = bearer(&token);
                        state.modified = modified;
                    }
                    // Mid-swap or gone: keep the last token.
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "token file unreadable")
                    }
                }
            }
        }
        state.token.clone()
    }
}

/// Adds credentials to every request; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct CredentialsLayer {
    credentials: Credentials,
}

impl CredentialsLayer {
    /// Requests carry `credentials` (and the forwarded user's token, inside a call).
    pub fn new(credentials: Credentials) -> Self {
        Self { credentials }
    }
}

impl<S> Layer<S> for CredentialsLayer {
    type Service = WithCredentials<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithCredentials {
            inner,
            credentials: self.credentials.clone(),
        }
    }
}

/// The service made by [`CredentialsLayer`].
#[derive(Clone, Debug)]
pub struct WithCredentials<S> {
    inner: S,
    credentials: Credentials,
}

impl<S, B> Service<Request<B>> for WithCredentials<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let headers = request.headers_mut();
        if !headers.contains_key(http::header::AUTHORIZATION)
            && let Some(value) = self.credentials.header()
        {
            headers.insert(http::header::AUTHORIZATION, value);
        }
        if !headers.contains_key(SUBJECT_HEADER)
            && let Some(user) = forwarded_token()
        {
            headers.insert(SUBJECT_HEADER, user);
        }
        self.inner.call(request)
    }
}
