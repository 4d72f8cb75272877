//! The public keys tokens are checked against, read from a directory and reloaded when it
//! changes.
//!
//! Each `*.pem` file in the directory is one public key (Ed25519 for EdDSA, or RSA for
//! RS256, as SPKI `PUBLIC KEY` PEM); its file stem is the key id (`kid`) that tokens
//! signed with the matching private key carry. Rotation is adding the new key's file,
//! moving issuers to it, and, once the old tokens have expired, deleting the old file: both
//! verify in between. In Kubernetes the directory is a mounted ConfigMap.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::claims::AUDIENCE;

/// How far a token's `exp` may lie in the past and still be accepted: clock skew between
/// issuer and service.
pub const LEEWAY_SECS: u64 = 30;

/// Why keys could not be loaded.
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
    /// The directory holds no key: every token would be refused.
    #[error("{0}: no *.pem public key")]
    Empty(PathBuf),
}

/// One verification key.
pub(crate) struct Key {
    pub(crate) key: DecodingKey,
    pub(crate) validation: Validation,
}

/// The keys of one directory, by key id, with the bytes they were read from (to notice
/// changes).
pub struct KeySet {
    pub(crate) keys: BTreeMap<String, Key>,
    fingerprint: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeySet {
    /// Reads every `*.pem` in `dir`.
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| KeyError::Io { path, source }
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            // Kubernetes' ConfigMap mounts hold `..data` links and dot-directories beside
            // the keys; only `*.pem` files count.
            if path.extension().is_some_and(|e| e == "pem") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        let mut keys = BTreeMap::new();
        let mut fingerprint = Vec::new();
        for path in files {
            let pem = std::fs::read(&path).map_err(io(&path))?;
            let kid = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            keys.insert(kid.clone(), parse(&path, &pem)?);
            fingerprint.push((kid, pem));
        }
        if keys.is_empty() {
            return Err(KeyError::Empty(dir.to_owned()));
        }
        Ok(Self { keys, fingerprint })
    }

    /// Whether `other` was read from the same files with the same contents.
    pub fn same_as(&self, other: &KeySet) -> bool {
        self.fingerprint == other.fingerprint
    }

    /// The key ids, in order.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
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
