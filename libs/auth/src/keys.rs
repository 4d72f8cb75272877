//! The public keys tokens are checked against, read from a directory.
//!
//! Each `*.pem` file in the directory is one public key (Ed25519 for EdDSA, or RSA for
//! RS256, as SPKI `PUBLIC KEY` PEM); its file stem is the key id (`kid`) that tokens
//! signed with the matching private key carry. Rotation is adding the new key's file,
//! moving issuers to it, and, once the old tokens have expired, deleting the old file: both
//! verify in between. In Kubernetes the directory is a mounted ConfigMap.
//!
//! Reading fails closed: the keys are exactly the files that read and parse now. A file
//! that does not is skipped and reported ([`KeySet::skipped`]) while the others load, and
//! an empty directory is an empty set (every token refused). Only a directory that cannot
//! be listed at all is an error; what the verifier then does is [`crate::Verifier`]'s
//! decision.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::claims::AUDIENCE;

/// How far a token's `exp` may lie in the past and still be accepted: clock skew between
/// issuer and service.
pub const LEEWAY_SECS: u64 = 30;

/// Largest key file read; a larger one is skipped unread. 64 KiB: an RSA-16384 public key
/// in PEM is under 3 KiB, so only a file that is not a public key comes near it, and no
/// stray file in the directory makes every reload read megabytes.
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Why keys could not be loaded, or why one file was skipped.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The directory or a file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is neither an Ed25519 nor an RSA public key in PEM.
    #[error("{path}: not an Ed25519 or RSA public key in PEM ({reason})")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The directory holds no usable key: every token would be refused.
    #[error("{0}: no usable *.pem public key")]
    Empty(PathBuf),
}

impl KeyError {
    /// Whether this says the directory is gone (or is not a directory any more): how an
    /// operator revokes every key at once.
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            KeyError::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                )
        )
    }

    /// A stable label for metrics: `unreadable`, `malformed` or `empty`.
    pub fn label(&self) -> &'static str {
        match self {
            KeyError::Io { .. } => "unreadable",
            KeyError::Malformed { .. } => "malformed",
            KeyError::Empty(_) => "empty",
        }
    }
}

/// One verification key.
pub(crate) struct Key {
    pub(crate) key: DecodingKey,
    pub(crate) validation: Validation,
}

/// What reading one `*.pem` file gave: its bytes, or why they could not be read. Part of
/// a set's fingerprint, so a file that turns unreadable is a change too.
type FileRead = Result<Vec<u8>, String>;

/// The keys of one directory, by key id, with what each file read gave (to notice
/// changes) and the files that were skipped.
pub struct KeySet {
    pub(crate) keys: BTreeMap<String, Key>,
    fingerprint: Vec<(String, FileRead)>,
    skipped: Vec<(String, KeyError)>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl KeySet {
    /// No key: every token is refused.
    pub fn empty() -> Self {
        Self {
            keys: BTreeMap::new(),
            fingerprint: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Reads every `*.pem` in `dir`. A file that cannot be read or is not a public key is
    /// skipped (see [`KeySet::skipped`]); only a directory that cannot be listed is an
    /// error. An empty directory is an empty set.
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        let listing = |source| KeyError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(listing)? {
            let path = entry.map_err(listing)?.path();
            // Kubernetes' ConfigMap mounts hold `..data` links and dot-directories beside
            // the keys; only `*.pem` files count.
            if path.extension().is_some_and(|e| e == "pem") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        let mut set = Self::empty();
        for path in files {
            let kid = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parsed = match read_capped(&path) {
                Ok(pem) => {
                    let parsed = parse(&path, &pem);
                    set.fingerprint.push((kid.clone(), Ok(pem)));
                    parsed
                }
                Err(source) => {
                    set.fingerprint.push((kid.clone(), Err(source.to_string())));
                    Err(KeyError::Io { path, source })
                }
            };
            match parsed {
                Ok(key) => {
                    set.keys.insert(kid, key);
                }
                Err(error) => set.skipped.push((kid, error)),
            }
        }
        Ok(set)
    }

    /// Whether `other` was read from the same files with the same outcomes.
    pub fn same_as(&self, other: &KeySet) -> bool {
        self.fingerprint == other.fingerprint
    }

    /// The key ids in force, in order.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// How many keys are in force.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is in force (every token is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The files that were skipped, by key id (file stem), with why.
    pub fn skipped(&self) -> &[(String, KeyError)] {
        &self.skipped
    }

    /// The set, or why it verifies nothing: the first skipped file's error if there was
    /// one, else [`KeyError::Empty`]. For start-up, where a directory without one usable
    /// key is a configuration mistake worth stopping for.
    pub fn require_keys(mut self, dir: &Path) -> Result<Self, KeyError> {
        if !self.is_empty() {
            return Ok(self);
        }
        Err(match self.skipped.drain(..).next() {
            Some((_, error)) => error,
            None => KeyError::Empty(dir.to_owned()),
        })
    }
}

/// The file's bytes, refusing (unread) one over [`MAX_KEY_FILE_BYTES`].
fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_KEY_FILE_BYTES} bytes: not a public key"),
        ));
    }
    Ok(bytes)
}

fn parse(path: &Path, pem: &[u8]) -> Result<Key, KeyError> {
    let (key, algorithm) = match DecodingKey::from_ed_pem(pem) {
        Ok(key) => (key, Algorithm::EdDSA),
        Err(ed) => match DecodingKey::from_rsa_pem(pem) {
            Ok(key) => (key, Algorithm::RS256),
            Err(rsa) => {
                return Err(KeyError::Malformed {
                    path: path.to_owned(),
                    reason: format!("as Ed25519: {ed}; as RSA: {rsa}"),
                });
            }
        },
    };
    // One algorithm per key: a token cannot pick a weaker one than its key's.
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_SECS;
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    Ok(Key { key, validation })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mint::generate_key_pair;

    fn write_key(dir: &Path, kid: &str) {
        let pair = generate_key_pair().unwrap();
        std::fs::write(dir.join(format!("{kid}.pem")), pair.public_pem).unwrap();
    }

    #[test]
    fn an_empty_directory_is_an_empty_set_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // Files that are not `*.pem` do not count.
        std::fs::write(dir.path().join("README"), "keys go here").unwrap();
        let set = KeySet::load(dir.path()).unwrap();
        assert!(set.is_empty());
        assert!(set.skipped().is_empty());
        assert!(matches!(
            set.require_keys(dir.path()),
            Err(KeyError::Empty(_))
        ));
    }

    #[test]
    fn a_bad_file_is_skipped_and_reported_while_the_others_load() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "a");
        std::fs::write(dir.path().join("b.pem"), "not a key").unwrap();
        write_key(dir.path(), "c");
        let huge = vec![b'A'; usize::try_from(MAX_KEY_FILE_BYTES).unwrap() + 1];
        std::fs::write(dir.path().join("d.pem"), huge).unwrap();
        let set = KeySet::load(dir.path()).unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), ["a", "c"]);
        let skipped: Vec<_> = set
            .skipped()
            .iter()
            .map(|(kid, e)| (kid.as_str(), e.label()))
            .collect();
        assert_eq!(skipped, [("b", "malformed"), ("d", "unreadable")]);
        assert_eq!(set.require_keys(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn only_bad_files_fail_start_up_with_the_first_files_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.pem"), "not a key").unwrap();
        let set = KeySet::load(dir.path()).unwrap();
        assert!(set.is_empty());
        assert!(matches!(
            set.require_keys(dir.path()),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn a_missing_directory_is_gone_and_a_file_in_its_place_too() {
        let dir = tempfile::tempdir().unwrap();
        let error = KeySet::load(&dir.path().join("nowhere")).unwrap_err();
        assert!(error.is_gone(), "{error}");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let error = KeySet::load(&file).unwrap_err();
        assert!(error.is_gone(), "{error}");
    }

    #[test]
    fn a_file_turning_bad_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "a");
        let before = KeySet::load(dir.path()).unwrap();
        assert!(before.same_as(&KeySet::load(dir.path()).unwrap()));
        std::fs::write(dir.path().join("a.pem"), "torn").unwrap();
        let after = KeySet::load(dir.path()).unwrap();
        assert!(!before.same_as(&after));
        assert!(after.is_empty());
    }
}
