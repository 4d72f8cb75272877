//! Who may call convoy, which teams' data they may touch, and how often.
//!
//! Every convoy server runs [`AuthLayer`]: bearer tokens (signed JWTs, EdDSA or RS256) are
//! verified against a directory of public keys ([`Verifier`], claims cached until expiry,
//! keys reloaded failing closed), each RPC is checked against the policy its `.proto`
//! declares ([`policy`]; fleet-scoped ones need the token's fleet-wide grant), the teams a
//! request names are read from its encoding before it is decoded ([`wire`]), and each
//! team's calls are rate-limited per role ([`RateLimits`]). The messages read for this are
//! held within a per-instance budget of bytes and a read timeout ([`BodyBudget`]), and a
//! stream's rights end when its tokens stop being valid ([`StreamRights`]). Clients present
//! tokens and forward their user's with [`CredentialsLayer`]. The model is in
//! docs/security.md.

#![forbid(unsafe_code)]

mod args;
mod budget;
mod claims;
mod client;
mod keys;
mod layer;
mod limit;
mod mint;
pub mod policy;
mod rights;
mod verify;
pub mod wire;

pub use args::{AuthArgs, AuthConfigError};
pub use budget::{
    BUDGET_WAIT, BodyBudget, BufferArgs, BufferConfig, DEFAULT_AUTH_BUFFER_MIB,
    DEFAULT_AUTH_READ_TIMEOUT_MS, MIN_RESERVATION,
};
pub use claims::{ALL_TEAMS, AUDIENCE, Caller, Claims, FLEET_TEAM, Role};
pub use client::{Credentials, CredentialsLayer, TokenFile, TokenFileError, WithCredentials};
pub use keys::{KeyError, KeySet, LEEWAY_SECS, MAX_KEY_FILE_BYTES};
pub use layer::{
    AuthLayer, AuthService, Authorizer, ERROR_DOMAIN, SUBJECT_HEADER, exhausted, forwarded_token,
    with_forwarded_token,
};
pub use limit::{Rate, RateLimitConfig, RateLimits};
pub use mint::{KeyPair, MintError, Signer, generate_key_pair};
pub use rights::{StreamRights, StreamTeam};
pub use verify::{
    KEY_DIR_UNREADABLE_GRACE, KEY_RELOAD_INTERVAL, MAX_TOKEN_BYTES, REVOCATION_BOUND, Reload,
    TokenError, Verifier,
};
