//! Token verification: signature, expiry and audience checked once per token, then its
//! claims cached until it expires, so the signature check stays off the hot path.
//!
//! The cache is keyed by the token itself (the map hashes it; a hit compares the whole
//! token), so no crafted token can collide with a verified one. Reloading keys that changed
//! empties the cache: a removed key stops verifying at once, not when its tokens expire.
//! Each such change is announced ([`Verifier::key_changes`]), so whatever holds rights past
//! one verification (an open stream) can check its tokens again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;

use crate::claims::Claims;
use crate::keys::{KeyError, KeySet};

/// Longest token accepted; longer ones are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Verified tokens remembered at most; past it the least used are verified again.
const CACHE_CAPACITY: u64 = 100_000;

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Its `exp` has passed.
    #[error("the token expired")]
    Expired,
    /// It names a key id no configured key has.
    #[error("the token's key id {0:?} is not a configured key")]
    UnknownKey(String),
    /// Anything else: malformed, badly signed, wrong audience, missing claims.
    #[error("the token is invalid: {0}")]
    Invalid(String),
}

impl TokenError {
    /// A stable reason for `google.rpc.ErrorInfo`.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Expired => "TOKEN_EXPIRED",
            TokenError::UnknownKey(_) => "TOKEN_UNKNOWN_KEY",
            TokenError::Invalid(_) => "TOKEN_INVALID",
        }
    }
}

/// Verifies tokens against a directory's keys; see the module docs.
pub struct Verifier {
    dir: PathBuf,
    keys: RwLock<Arc<KeySet>>,
    cache: moka::sync::Cache<Arc<str>, Arc<Claims>>,
    /// How many times the keys changed: bumped by every reload that changes them.
    generation: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("dir", &self.dir).finish()
    }
}

/// Cached claims live until their token expires.
struct UntilExpiry;

impl moka::Expiry<Arc<str>, Arc<Claims>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _token: &Arc<str>,
        claims: &Arc<Claims>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(claims.exp.saturating_sub(unix_now())))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Verifier {
    /// Loads the keys in `dir`; fails if there are none or one is unreadable.
    pub fn from_dir(dir: &Path) -> Result<Self, KeyError> {
        let keys = KeySet::load(dir)?;
        tracing::info!(dir = %dir.display(), kids = ?keys.kids().collect::<Vec<_>>(), "token keys loaded");
        Ok(Self {
            dir: dir.to_owned(),
            keys: RwLock::new(Arc::new(keys)),
            cache: moka::sync::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .expire_after(UntilExpiry)
                .build(),
            generation: tokio::sync::watch::Sender::new(0),
        })
    }

    fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The claims of `token`, verified now or earlier.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        if let Some(claims) = self.cache.get(token) {
            // The cache drops entries at expiry, but only as precisely as its clock.
            if claims.exp > unix_now() {
                return Ok(claims);
            }
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let keys = self.keys();
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Invalid("the header names no key id (kid)".into()))?;
        let key = keys
            .keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            },
        )?;
        let claims = Arc::new(data.claims);
        self.cache.insert(Arc::from(token), claims.clone());
        Ok(claims)
    }

    /// Reads the directory again; when its keys changed, uses the new ones and forgets
    /// every verified token. Returns whether anything changed. A directory that no longer
    /// loads keeps the old keys (and the error is returned).
    pub fn reload(&self) -> Result<bool, KeyError> {
        let fresh = KeySet::load(&self.dir)?;
        if self.keys().same_as(&fresh) {
            return Ok(false);
        }
        tracing::info!(kids = ?fresh.kids().collect::<Vec<_>>(), "token keys changed");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        self.cache.invalidate_all();
        self.generation.send_modify(|g| *g += 1);
        Ok(true)
    }

    /// Wakes on every change of the keys (after the cache is emptied): the moment to verify
    /// again a token accepted earlier.
    pub fn key_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Reloads every `every` for as long as it runs.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let outcome = match self.reload() {
                Ok(true) => "changed",
                Ok(false) => "unchanged",
                Err(e) => {
                    tracing::warn!(error = %e, "reloading token keys failed; keeping the old ones");
                    "failed"
                }
            };
            metrics::counter!("convoy_auth_key_reloads_total", "outcome" => outcome).increment(1);
        }
    }
}
