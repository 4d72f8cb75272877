//! Token verification: signature, expiry and audience checked once per token, then its
//! claims cached until it expires, so the signature check stays off the hot path; and the
//! key directory read again every reload interval, failing closed.
//!
//! The cache is keyed by the token itself (the map hashes it; a hit compares the whole
//! token), so no crafted token can collide with a verified one. It belongs to the key set
//! it was filled under: a reload that changes the keys swaps both at once, so a token
//! verified with a removed key cannot be served from the cache after that reload, even one
//! whose verification raced the reload.
//!
//! What a reload does with what it finds ([`Reload`]):
//! - the files that read and parse are the keys in force; a bad file is skipped, logged
//!   and counted (`convoy_auth_key_files_skipped_total{kid, reason}`) while the others
//!   load; an empty directory means no keys, and every token is refused;
//! - a directory that is gone (or not a directory) means no keys at once: deleting it is
//!   how an operator revokes everything;
//! - a directory that exists but cannot be listed (permissions, an I/O error) keeps the
//!   keys in force for at most [`KEY_DIR_UNREADABLE_GRACE`], then means no keys: a
//!   transient error does not take the fleet down, and a lasting one does not keep keys
//!   alive that may have been removed meanwhile.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;

use crate::claims::Claims;
use crate::keys::{KeyError, KeySet};

/// Longest token accepted; longer ones are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Verified tokens remembered at most; past it the least used are verified again.
const CACHE_CAPACITY: u64 = 100_000;

/// How often the key directory is read again by default: 5 s, half of the 10 s within
/// which docs/security.md promises a removed key's tokens are refused, leaving the other
/// half as margin for one slow read of the directory.
pub const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The revocation bound docs/security.md promises with the default reload interval: a
/// removed key's tokens, cached ones included, are refused within this long.
pub const REVOCATION_BOUND: Duration = Duration::from_secs(10);

/// How long a key directory that exists but cannot be listed keeps the keys in force
/// before none are: 60 s, a dozen reloads, enough to ride out a remount or a storage
/// hiccup, short enough that keys do not outlive a broken directory for long. A directory
/// that is gone means no keys at once.
pub const KEY_DIR_UNREADABLE_GRACE: Duration = Duration::from_secs(60);

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

/// What one look at the key directory did.
#[derive(Debug)]
pub enum Reload {
    /// The same files with the same contents: nothing changed.
    Unchanged,
    /// The keys in force changed (files added, removed, changed, turned bad or good);
    /// every verified token is forgotten.
    Changed,
    /// The directory could not be listed; the keys in force stay, at most
    /// [`KEY_DIR_UNREADABLE_GRACE`] from the first failed listing.
    Kept(KeyError),
    /// The directory is gone, or could not be listed for longer than the grace: no key is
    /// in force (every token is refused).
    Closed(KeyError),
}

impl Reload {
    /// A stable label for `convoy_auth_key_reloads_total{outcome}`.
    pub fn label(&self) -> &'static str {
        match self {
            Reload::Unchanged => "unchanged",
            Reload::Changed => "changed",
            Reload::Kept(_) => "kept",
            Reload::Closed(_) => "closed",
        }
    }
}

/// The keys in force and the tokens verified with them, replaced together.
struct Snapshot {
    keys: KeySet,
    cache: moka::sync::Cache<Arc<str>, Arc<Claims>>,
}

impl Snapshot {
    fn new(keys: KeySet) -> Arc<Self> {
        Arc::new(Self {
            keys,
            cache: moka::sync::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .expire_after(UntilExpiry)
                .build(),
        })
    }
}

/// Verifies tokens against a directory's keys; see the module docs.
pub struct Verifier {
    dir: PathBuf,
    reload_every: Duration,
    current: RwLock<Arc<Snapshot>>,
    /// Since when the directory could not be listed, while it cannot.
    unreadable_since: Mutex<Option<tokio::time::Instant>>,
    /// Counts changes of the keys in force, for holders of long-lived rights (open
    /// streams) that re-check them when the keys change.
    changes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("dir", &self.dir)
            .field("reload_every", &self.reload_every)
            .finish()
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
    /// Loads the keys in `dir`, read again every [`KEY_RELOAD_INTERVAL`] by
    /// [`Verifier::watch`]. Fails if the directory cannot be listed or holds no usable key
    /// (a configuration mistake at start-up); bad files beside good ones are skipped and
    /// reported.
    pub fn from_dir(dir: &Path) -> Result<Self, KeyError> {
        let keys = KeySet::load(dir)?.require_keys(dir)?;
        report_skipped(&keys);
        tracing::info!(dir = %dir.display(), kids = ?keys.kids().collect::<Vec<_>>(), "token keys loaded");
        metrics::gauge!("convoy_auth_keys").set(keys.len() as f64);
        Ok(Self {
            dir: dir.to_owned(),
            reload_every: KEY_RELOAD_INTERVAL,
            current: RwLock::new(Snapshot::new(keys)),
            unreadable_since: Mutex::new(None),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Reads the directory every `every` instead (at least 10 ms).
    pub fn with_reload_interval(mut self, every: Duration) -> Self {
        self.reload_every = every.max(Duration::from_millis(10));
        self
    }

    /// How often [`Verifier::watch`] reads the directory: a removed key's tokens are
    /// refused within this long, plus one read of the directory.
    pub fn reload_interval(&self) -> Duration {
        self.reload_every
    }

    /// A receiver that sees a new value each time the keys in force change: whoever holds
    /// rights granted by a token (an open stream) verifies it again then.
    pub fn key_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn current(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The claims of `token`, verified now or earlier under the keys in force.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        // One snapshot for the whole call: a reload meanwhile swaps in a new one, and what
        // this call caches goes down with the old.
        let snapshot = self.current();
        if let Some(claims) = snapshot.cache.get(token) {
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
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Invalid("the header names no key id (kid)".into()))?;
        let key = snapshot
            .keys
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
        snapshot.cache.insert(Arc::from(token), claims.clone());
        Ok(claims)
    }

    /// Reads the directory once, as [`Verifier::watch`] does every interval (it blocks on
    /// the reads: call it off the async workers), and applies what it found; see the
    /// module docs.
    pub fn reload(&self) -> Reload {
        match KeySet::load(&self.dir) {
            Ok(fresh) => {
                self.readable_again();
                if self.current().keys.same_as(&fresh) {
                    return Reload::Unchanged;
                }
                report_skipped(&fresh);
                if fresh.is_empty() {
                    tracing::warn!(dir = %self.dir.display(), "no usable token key: every token is refused");
                } else {
                    tracing::info!(kids = ?fresh.kids().collect::<Vec<_>>(), "token keys changed");
                }
                self.replace(fresh);
                Reload::Changed
            }
            Err(error) if error.is_gone() => {
                // A later unreadable spell gets its own grace.
                *self
                    .unreadable_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                if !self.current().keys.is_empty() {
                    tracing::warn!(%error, "the token key directory is gone: every token is refused");
                    self.replace(KeySet::empty());
                }
                Reload::Closed(error)
            }
            Err(error) => {
                let now = tokio::time::Instant::now();
                let since = *self
                    .unreadable_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(now);
                if now.duration_since(since) < KEY_DIR_UNREADABLE_GRACE {
                    if since == now {
                        tracing::warn!(%error, grace = ?KEY_DIR_UNREADABLE_GRACE, "the token key directory is unreadable; keeping the keys in force for now");
                    }
                    return Reload::Kept(error);
                }
                if !self.current().keys.is_empty() {
                    tracing::warn!(%error, grace = ?KEY_DIR_UNREADABLE_GRACE, "the token key directory stayed unreadable: every token is refused");
                    self.replace(KeySet::empty());
                }
                Reload::Closed(error)
            }
        }
    }

    fn readable_again(&self) {
        let mut since = self
            .unreadable_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if since.take().is_some() {
            tracing::info!(dir = %self.dir.display(), "the token key directory is readable again");
        }
    }

    /// Puts `keys` in force with an empty cache, and tells the holders of long-lived
    /// rights.
    fn replace(&self, keys: KeySet) {
        metrics::gauge!("convoy_auth_keys").set(keys.len() as f64);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Snapshot::new(keys);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Reloads every [`Verifier::reload_interval`] for as long as it runs, counting each
    /// outcome in `convoy_auth_key_reloads_total{outcome}` and each skipped file in
    /// `convoy_auth_key_files_skipped_total{kid, reason}`.
    pub async fn watch(self: Arc<Self>) {
        let every = self.reload_every;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let verifier = self.clone();
            // Reading files blocks; a slow volume must not hold up an async worker.
            let Ok(outcome) = tokio::task::spawn_blocking(move || verifier.reload()).await else {
                return; // the runtime is shutting down
            };
            self.record(&outcome);
        }
    }

    /// Counts one reload's outcome, and each file the keys in force skipped.
    fn record(&self, outcome: &Reload) {
        metrics::counter!("convoy_auth_key_reloads_total", "outcome" => outcome.label())
            .increment(1);
        for (kid, error) in self.current().keys.skipped() {
            metrics::counter!(
                "convoy_auth_key_files_skipped_total",
                "kid" => kid.clone(),
                "reason" => error.label(),
            )
            .increment(1);
        }
    }
}

/// Logs each file `keys` skipped (once per change of the directory: an unchanged
/// directory is not reported again, its files' counter is).
fn report_skipped(keys: &KeySet) {
    for (kid, error) in keys.skipped() {
        tracing::warn!(kid, %error, "token key file skipped; the other keys stay in force");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::Role;
    use crate::mint::{Signer, generate_key_pair};

    fn signer_in(dir: &Path, kid: &str) -> Signer {
        let pair = generate_key_pair().unwrap();
        std::fs::write(dir.join(format!("{kid}.pem")), &pair.public_pem).unwrap();
        Signer::from_pem(kid, pair.private_pem.as_bytes()).unwrap()
    }

    fn token(signer: &Signer) -> String {
        signer
            .mint(
                "u",
                &["acme".to_owned()],
                Role::Reader,
                Duration::from_secs(600),
            )
            .unwrap()
    }

    #[test]
    fn emptying_the_directory_refuses_every_token_cached_ones_included() {
        let dir = tempfile::tempdir().unwrap();
        let signer = signer_in(dir.path(), "k");
        let verifier = Verifier::from_dir(dir.path()).unwrap();
        let token = token(&signer);
        verifier.verify(&token).unwrap();
        std::fs::remove_file(dir.path().join("k.pem")).unwrap();
        assert!(matches!(verifier.reload(), Reload::Changed));
        assert_eq!(
            verifier.verify(&token),
            Err(TokenError::UnknownKey("k".into()))
        );
        assert!(matches!(verifier.reload(), Reload::Unchanged));
    }

    #[test]
    fn a_bad_file_is_skipped_while_the_good_keys_keep_verifying() {
        let dir = tempfile::tempdir().unwrap();
        let good = signer_in(dir.path(), "good");
        let verifier = Verifier::from_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join("bad.pem"), "not a key").unwrap();
        let fresh = signer_in(dir.path(), "fresh");
        assert!(matches!(verifier.reload(), Reload::Changed));
        verifier.verify(&token(&good)).unwrap();
        // The bad file stops nothing: a key added beside it loads.
        verifier.verify(&token(&fresh)).unwrap();
        // And later changes are still taken up.
        std::fs::remove_file(dir.path().join("good.pem")).unwrap();
        assert!(matches!(verifier.reload(), Reload::Changed));
        assert!(verifier.verify(&token(&good)).is_err());
        verifier.verify(&token(&fresh)).unwrap();
    }

    #[test]
    fn each_reload_counts_its_outcome_and_every_skipped_file_by_kid() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let dir = tempfile::tempdir().unwrap();
        signer_in(dir.path(), "good");
        let verifier = Verifier::from_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join("bad.pem"), "not a key").unwrap();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let outcome = verifier.reload();
            verifier.record(&outcome);
            let outcome = verifier.reload();
            verifier.record(&outcome);
        });
        let mut counters: Vec<(String, Vec<String>, u64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Counter(n) => Some((
                    key.key().name().to_owned(),
                    key.key()
                        .labels()
                        .map(|l| format!("{}={}", l.key(), l.value()))
                        .collect(),
                    n,
                )),
                _ => None,
            })
            .collect();
        counters.sort();
        let label = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            counters,
            vec![
                (
                    "convoy_auth_key_files_skipped_total".to_owned(),
                    label(&["kid=bad", "reason=malformed"]),
                    2
                ),
                (
                    "convoy_auth_key_reloads_total".to_owned(),
                    label(&["outcome=changed"]),
                    1
                ),
                (
                    "convoy_auth_key_reloads_total".to_owned(),
                    label(&["outcome=unchanged"]),
                    1
                ),
            ]
        );
    }

    #[test]
    fn a_deleted_directory_refuses_every_token_at_once() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("keys");
        std::fs::create_dir(&dir).unwrap();
        let signer = signer_in(&dir, "k");
        let verifier = Verifier::from_dir(&dir).unwrap();
        let old = token(&signer);
        verifier.verify(&old).unwrap();
        let changes = verifier.key_changes();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(verifier.reload(), Reload::Closed(_)));
        assert!(changes.has_changed().unwrap(), "holders of rights are told");
        assert_eq!(
            verifier.verify(&old),
            Err(TokenError::UnknownKey("k".into()))
        );
        // Back with a key: verifying again.
        std::fs::create_dir(&dir).unwrap();
        let again = signer_in(&dir, "k2");
        assert!(matches!(verifier.reload(), Reload::Changed));
        verifier.verify(&token(&again)).unwrap();
    }

    #[test]
    fn a_verification_racing_a_reload_caches_nothing_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let signer = signer_in(dir.path(), "k");
        let verifier = Verifier::from_dir(dir.path()).unwrap();
        let token = token(&signer);
        // A verification that took the snapshot before the reload finishes after it.
        let before = verifier.current();
        std::fs::remove_file(dir.path().join("k.pem")).unwrap();
        assert!(matches!(verifier.reload(), Reload::Changed));
        let key = before.keys.keys.get("k").unwrap();
        let claims = jsonwebtoken::decode::<Claims>(&token, &key.key, &key.validation).unwrap();
        before
            .cache
            .insert(Arc::from(token.as_str()), Arc::new(claims.claims));
        assert!(verifier.verify(&token).is_err());
    }

    /// Makes `path` exist but not list (a symbolic link to itself: ELOOP, neither missing nor
    /// a file, whoever runs the test); returns where the real directory went.
    #[cfg(unix)]
    fn make_unlistable(path: &Path) -> PathBuf {
        let aside = path.with_extension("aside");
        std::fs::rename(path, &aside).unwrap();
        std::os::unix::fs::symlink(path, path).unwrap();
        let error = KeySet::load(path).unwrap_err();
        assert!(!error.is_gone(), "{error}");
        aside
    }

    #[cfg(unix)]
    fn make_listable(path: &Path, aside: &Path) {
        std::fs::remove_file(path).unwrap();
        std::fs::rename(aside, path).unwrap();
    }

    #[cfg(unix)]
    #[tokio::test(start_paused = true)]
    async fn an_unreadable_directory_keeps_the_keys_for_the_grace_then_refuses() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("keys");
        std::fs::create_dir(&dir).unwrap();
        let signer = signer_in(&dir, "k");
        let verifier = Verifier::from_dir(&dir).unwrap();
        let token = token(&signer);
        let aside = make_unlistable(&dir);
        assert!(matches!(verifier.reload(), Reload::Kept(_)));
        tokio::time::advance(KEY_DIR_UNREADABLE_GRACE - Duration::from_millis(1)).await;
        assert!(matches!(verifier.reload(), Reload::Kept(_)));
        verifier.verify(&token).unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(verifier.reload(), Reload::Closed(_)));
        assert_eq!(
            verifier.verify(&token),
            Err(TokenError::UnknownKey("k".into()))
        );
        // Readable again: the keys are back, and a later outage gets a grace of its own.
        make_listable(&dir, &aside);
        assert!(matches!(verifier.reload(), Reload::Changed));
        verifier.verify(&token).unwrap();
        let aside = make_unlistable(&dir);
        assert!(matches!(verifier.reload(), Reload::Kept(_)));
        verifier.verify(&token).unwrap();
        make_listable(&dir, &aside);
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_key_is_refused_within_one_reload_interval() {
        let dir = tempfile::tempdir().unwrap();
        let signer = signer_in(dir.path(), "k");
        let verifier = Arc::new(Verifier::from_dir(dir.path()).unwrap());
        let token = token(&signer);
        verifier.verify(&token).unwrap();
        let watcher = tokio::spawn(verifier.clone().watch());
        // The worst moment: just after a reload found nothing to do.
        tokio::time::sleep(KEY_RELOAD_INTERVAL + Duration::from_millis(1)).await;
        verifier.verify(&token).unwrap();
        std::fs::remove_file(dir.path().join("k.pem")).unwrap();
        let removed = tokio::time::Instant::now();
        while verifier.verify(&token).is_ok() {
            assert!(
                removed.elapsed() <= KEY_RELOAD_INTERVAL,
                "still served {:?} after the key's removal",
                removed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(KEY_RELOAD_INTERVAL < REVOCATION_BOUND);
        watcher.abort();
    }
}
