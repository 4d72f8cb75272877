//! What an open stream's rights rest on, and the moment they end.
//!
//! A unary call is authorized once and is over in moments; a stream may stay open for
//! hours, past its token's expiry and past the removal of the key that signed it. So the
//! layer hands every streaming call a [`StreamRights`]: the tokens it was let in with. Its
//! [`StreamRights::ended`] resolves when they stop being valid: at the earliest expiry
//! among them (plus [`LEEWAY_SECS`], as for any call), or when a key reload makes one of
//! them fail verification again. That costs one timer per stream and one shared wake-up per
//! key change ([`Verifier::key_changes`]), never a periodic check per stream; verifying
//! again is a cache lookup, or one signature check after the cache was emptied by the
//! change. The server's stream layer (`convoy_mesh::streams`) races it against the call
//! and ends the stream with its status.
//!
//! This module does not decide what a stream may do (the layer checked that when it
//! opened, and checks every message of a client stream); only how long it may go on.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tonic::Status;

use crate::keys::LEEWAY_SECS;
use crate::layer::{SUBJECT_HEADER, unauthenticated};
use crate::verify::{TokenError, Verifier};

/// The team a streaming call was admitted for: the team its request names (for a client
/// stream, its first message's). The key of the server's per-team stream limits; absent
/// when the call names no team (fleet-scoped streams).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamTeam(pub Arc<str>);

/// The tokens a stream was authorized with; see the module docs.
#[derive(Clone, Debug)]
pub struct StreamRights {
    verifier: Arc<Verifier>,
    /// Each token with the header it came in, for the refusal's message.
    tokens: Vec<(&'static str, Arc<str>)>,
    /// The earliest `exp` among them, seconds since the Unix epoch.
    exp: u64,
    /// Subscribed when the stream was authorized, so a change from then on is seen.
    changes: watch::Receiver<u64>,
}

impl StreamRights {
    /// The rights of a stream let in with `tokens` (the caller's, and the forwarded user's
    /// if any, each with its header's name), verified by `verifier`, the earliest of which
    /// expires at `exp`. The authorization layer makes these; other layers' tests may too.
    pub fn new(verifier: Arc<Verifier>, tokens: Vec<(&'static str, Arc<str>)>, exp: u64) -> Self {
        let changes = verifier.key_changes();
        Self {
            verifier,
            tokens,
            exp,
            changes,
        }
    }

    /// Resolves when the stream's rights end, with the status to end it with:
    /// UNAUTHENTICATED, with an `ErrorInfo` reason `TOKEN_EXPIRED`, `TOKEN_UNKNOWN_KEY` or
    /// `TOKEN_INVALID`. Pending for as long as they hold.
    pub async fn ended(mut self) -> Status {
        // The verifier accepts a token up to the leeway past its `exp`; so does a stream.
        let last = UNIX_EPOCH + Duration::from_secs(self.exp.saturating_add(LEEWAY_SECS + 1));
        let left = last
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let expiry = tokio::time::sleep(left);
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                () = &mut expiry => return self.refusal(None, &TokenError::Expired),
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        // The verifier is gone (the server is stopping): only expiry is left.
                        expiry.as_mut().await;
                        continue;
                    }
                    for (header, token) in &self.tokens {
                        if let Err(e) = self.verifier.verify(token) {
                            return self.refusal(Some(header), &e);
                        }
                    }
                }
            }
        }
    }

    /// The status ending the stream because `header`'s token (for an expiry: the first of
    /// its tokens to expire) failed with `e`.
    fn refusal(&self, header: Option<&str>, e: &TokenError) -> Status {
        let which = match header {
            None if self.tokens.len() > 1 => "a token of this stream",
            Some(SUBJECT_HEADER) => "the forwarded token of this stream",
            _ => "the stream's token",
        };
        let what = match e {
            TokenError::Expired => "expired".to_owned(),
            TokenError::UnknownKey(kid) => format!("was signed by key {kid:?}, which was removed"),
            TokenError::Invalid(why) => format!("no longer verifies: {why}"),
        };
        unauthenticated(
            e.reason(),
            format!("{which} {what}; open a new stream with a valid token"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::{AUDIENCE, Claims, Role};
    use crate::mint::{Signer, generate_key_pair};
    use tonic::Code;
    use tonic_types::StatusExt;

    fn unix_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    struct Keys {
        dir: tempfile::TempDir,
        signer: Signer,
        verifier: Arc<Verifier>,
    }

    fn keys() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let pair = generate_key_pair().unwrap();
        std::fs::write(dir.path().join("k1.pem"), &pair.public_pem).unwrap();
        let signer = Signer::from_pem("k1", pair.private_pem.as_bytes()).unwrap();
        let verifier = Arc::new(Verifier::from_dir(dir.path()).unwrap());
        Keys {
            dir,
            signer,
            verifier,
        }
    }

    impl Keys {
        /// A verified token expiring at `exp`, and its rights.
        fn rights(&self, exp: u64) -> StreamRights {
            let token: Arc<str> = self
                .signer
                .sign(&Claims {
                    sub: "t".into(),
                    teams: vec!["acme".into()],
                    role: Role::Reader,
                    exp,
                    iat: 0,
                    aud: AUDIENCE.into(),
                    fleet: false,
                })
                .unwrap()
                .into();
            self.verifier.verify(&token).expect("valid when opened");
            StreamRights::new(self.verifier.clone(), vec![("authorization", token)], exp)
        }

        /// Replaces the signing key with another one (another kid).
        fn rotate(&self) {
            let pair = generate_key_pair().unwrap();
            std::fs::write(self.dir.path().join("k2.pem"), &pair.public_pem).unwrap();
            std::fs::remove_file(self.dir.path().join("k1.pem")).unwrap();
            assert!(
                matches!(self.verifier.reload(), crate::Reload::Changed),
                "the keys changed"
            );
        }
    }

    fn reason(status: &Status) -> String {
        status
            .get_error_details()
            .error_info()
            .unwrap()
            .reason
            .clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_s_rights_end_when_its_token_expires_past_the_leeway() {
        let keys = keys();
        let rights = keys.rights(unix_now() + 60);
        let ended = tokio::spawn(rights.ended());
        let opened = tokio::time::Instant::now();
        let status = ended.await.unwrap();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "TOKEN_EXPIRED");
        // The wall clock stands still under the paused clock: the wait is the token's
        // remaining life plus the leeway, within the second `exp` is counted in (it was set
        // from a wall-clock second already partly gone).
        let waited = opened.elapsed();
        let expected = Duration::from_secs(60 + LEEWAY_SECS);
        let second = Duration::from_secs(1);
        assert!(
            waited + second >= expected && waited <= expected + second,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_s_rights_end_at_the_reload_that_removes_its_key() {
        let keys = keys();
        let rights = keys.rights(unix_now() + 3600);
        let mut ended = tokio::spawn(rights.ended());
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(
            futures_poll(&mut ended).await.is_none(),
            "still valid after 10 min"
        );
        keys.rotate();
        let status = tokio::time::timeout(Duration::from_millis(1), ended)
            .await
            .expect("ends at the reload, not at expiry")
            .unwrap();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "TOKEN_UNKNOWN_KEY");
        assert!(status.message().contains("k1"), "{}", status.message());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_that_keeps_the_stream_s_key_leaves_it_open() {
        let keys = keys();
        let rights = keys.rights(unix_now() + 3600);
        let mut ended = tokio::spawn(rights.ended());
        // Another key added: the keys changed, this stream's did not.
        let pair = generate_key_pair().unwrap();
        std::fs::write(keys.dir.path().join("k3.pem"), &pair.public_pem).unwrap();
        assert!(matches!(keys.verifier.reload(), crate::Reload::Changed));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(futures_poll(&mut ended).await.is_none());
        ended.abort();
    }

    /// The task's output if it has finished, without waiting.
    async fn futures_poll(task: &mut tokio::task::JoinHandle<Status>) -> Option<Status> {
        tokio::task::yield_now().await;
        if task.is_finished() {
            Some(task.await.unwrap())
        } else {
            None
        }
    }
}
