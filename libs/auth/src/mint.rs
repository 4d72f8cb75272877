//! Making keys and tokens, for development set-ups, tests and `convoyctl token`.
//!
//! Production tokens come from the operator's issuer; anything that holds a private key in
//! PEM (Ed25519 PKCS#8 or RSA) can sign them with [`Signer`].

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::claims::{AUDIENCE, Claims, Role};

/// Why signing failed.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The private key could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The private key is not an Ed25519 or RSA private key in PEM.
    #[error("not an Ed25519 (PKCS#8) or RSA private key in PEM")]
    Malformed,
    /// Signing or key generation failed.
    #[error("signing: {0}")]
    Sign(String),
}

/// A freshly generated Ed25519 key pair, in PEM.
#[derive(Clone, Debug)]
pub struct KeyPair {
    /// The private key (PKCS#8), for the issuer.
    pub private_pem: String,
    /// The public key (SPKI), for the services' key directory.
    pub public_pem: String,
}

/// Generates an Ed25519 key pair.
pub fn generate_key_pair() -> Result<KeyPair, MintError> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| MintError::Sign(e.to_string()))?;
    Ok(KeyPair {
        private_pem: pair.serialize_pem(),
        public_pem: pair.public_key_pem(),
    })
}

/// Signs tokens with one private key under one key id.
pub struct Signer {
    kid: String,
    algorithm: Algorithm,
    key: EncodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl Signer {
    /// A signer from a PEM private key; `kid` must be the file stem of its public key in
    /// the services' key directory.
    pub fn from_pem(kid: impl Into<String>, pem: &[u8]) -> Result<Self, MintError> {
        let (key, algorithm) = match EncodingKey::from_ed_pem(pem) {
            Ok(key) => (key, Algorithm::EdDSA),
            Err(_) => (
                EncodingKey::from_rsa_pem(pem).map_err(|_| MintError::Malformed)?,
                Algorithm::RS256,
            ),
        };
        Ok(Self {
            kid: kid.into(),
            algorithm,
            key,
        })
    }

    /// A signer from a PEM file; the key id is the file stem.
    pub fn from_file(path: &Path) -> Result<Self, MintError> {
        let pem = std::fs::read(path).map_err(|source| MintError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let kid = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_pem(kid, &pem)
    }

    /// Signs `claims` as they are.
    pub fn sign(&self, claims: &Claims) -> Result<String, MintError> {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| MintError::Sign(e.to_string()))
    }

    /// Mints a token for `sub` reaching `teams` as `role`, valid for `ttl` from now,
    /// without the fleet-wide grant.
    pub fn mint(
        &self,
        sub: &str,
        teams: &[String],
        role: Role,
        ttl: Duration,
    ) -> Result<String, MintError> {
        self.sign(&claims(sub, teams, role, false, ttl))
    }

    /// Like [`Signer::mint`], with the fleet-wide grant ([`Claims::fleet`]): for fleet
    /// administrators and for the services' own token (the shard map and cache statistics
    /// are fleet-scoped).
    pub fn mint_fleet(
        &self,
        sub: &str,
        teams: &[String],
        role: Role,
        ttl: Duration,
    ) -> Result<String, MintError> {
        self.sign(&claims(sub, teams, role, true, ttl))
    }
}

fn claims(sub: &str, teams: &[String], role: Role, fleet: bool, ttl: Duration) -> Claims {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Claims {
        sub: sub.to_owned(),
        teams: teams.to_vec(),
        role,
        exp: now.saturating_add(ttl.as_secs()),
        iat: now,
        aud: AUDIENCE.to_owned(),
        fleet,
    }
}
