//! What a verified token says about its bearer: who, which teams, which role.

use std::sync::Arc;

use convoy_proto::v1::AccessRole;
use serde::{Deserialize, Serialize};

/// The audience every convoy token carries and every convoy service requires, so a token
/// issued for another system by the same key is refused.
pub const AUDIENCE: &str = "convoy";

/// The `teams` entry that reaches every team (admins, services).
pub const ALL_TEAMS: &str = "*";

/// A bearer's role. The order of satisfaction is reader < writer < admin, with service
/// beside admin: a service satisfies reader, writer and service, never admin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads its teams' conversations and analytics.
    Reader,
    /// Reader, plus creates, updates, deletes and appends.
    Writer,
    /// Fleet operations (resharding, cache flushes, fleet-wide analytics), and everything
    /// else.
    Admin,
    /// A convoy service calling another one.
    Service,
}

impl Role {
    /// Whether this role may call an RPC whose policy asks for `needed`.
    /// `ACCESS_ROLE_UNSPECIFIED` is treated as admin: an RPC that forgot its role is closed.
    pub fn satisfies(self, needed: AccessRole) -> bool {
        match needed {
            AccessRole::Reader => true,
            AccessRole::Writer => self != Role::Reader,
            AccessRole::Service => matches!(self, Role::Service | Role::Admin),
            AccessRole::Admin | AccessRole::Unspecified => self == Role::Admin,
        }
    }

    /// The lower-case name, as tokens and metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }
}

/// The claims of a convoy token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The bearer (a user, a CI job, a service's name).
    pub sub: String,
    /// Teams the bearer may reach; `"*"` reaches every team.
    pub teams: Vec<String>,
    /// What the bearer may do there.
    pub role: Role,
    /// Expiry, seconds since the Unix epoch (required).
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
    /// Audience; convoy requires [`AUDIENCE`].
    pub aud: String,
}

impl Claims {
    /// Whether the bearer may reach `team`.
    pub fn reaches(&self, team: &str) -> bool {
        self.teams.iter().any(|t| t == ALL_TEAMS || t == team)
    }
}

/// Who a call acts for, once its tokens are verified: the direct caller and, when a service
/// calls on a user's behalf, that user.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The bearer of the `authorization` token.
    pub actor: Arc<Claims>,
    /// The user a service acts for (the forwarded token), if any.
    pub subject: Option<Arc<Claims>>,
}

impl Caller {
    /// The identity whose role user-facing RPCs check: the forwarded user if a service
    /// acts for one, else the caller.
    pub fn acting(&self) -> &Claims {
        self.subject.as_deref().unwrap_or(&self.actor)
    }

    /// Whether the call may touch `team`: both the caller and the user it acts for must
    /// reach it, so a service's own identity never widens what its user may see.
    pub fn reaches(&self, team: &str) -> bool {
        self.actor.reaches(team) && self.subject.as_ref().is_none_or(|s| s.reaches(team))
    }

    /// Whether the call may invoke an RPC needing `needed`. Service-only RPCs check the
    /// caller (a user's forwarded token does not make a call a service's); the others check
    /// the user a service acts for, and the caller too, so neither side widens the other.
    pub fn may_call(&self, needed: AccessRole) -> bool {
        match needed {
            AccessRole::Service => self.actor.role.satisfies(needed),
            _ => {
                self.actor.role.satisfies(needed)
                    && self
                        .subject
                        .as_ref()
                        .is_none_or(|s| s.role.satisfies(needed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(role: Role, teams: &[&str]) -> Arc<Claims> {
        Arc::new(Claims {
            sub: "t".into(),
            teams: teams.iter().map(|t| (*t).to_owned()).collect(),
            role,
            exp: 0,
            iat: 0,
            aud: AUDIENCE.into(),
        })
    }

    #[test]
    fn roles_satisfy_in_order_and_service_never_satisfies_admin() {
        use AccessRole::*;
        let table = [
            (Role::Reader, [true, false, false, false, false]),
            (Role::Writer, [true, true, false, false, false]),
            (Role::Service, [true, true, false, true, false]),
            (Role::Admin, [true, true, true, true, true]),
        ];
        for (role, expected) in table {
            let got = [Reader, Writer, Admin, Service, Unspecified].map(|n| role.satisfies(n));
            assert_eq!(got, expected, "{role:?}");
        }
    }

    #[test]
    fn a_service_acting_for_a_user_is_bounded_by_the_user() {
        let caller = Caller {
            actor: claims(Role::Service, &["*"]),
            subject: Some(claims(Role::Reader, &["acme"])),
        };
        assert!(caller.reaches("acme"));
        assert!(!caller.reaches("globex"));
        assert!(caller.may_call(AccessRole::Service));
        assert!(caller.may_call(AccessRole::Reader));
        assert!(!caller.may_call(AccessRole::Writer));
        assert!(!caller.may_call(AccessRole::Admin));
        // On its own the service reaches every team but is still not an admin.
        let alone = Caller {
            actor: claims(Role::Service, &["*"]),
            subject: None,
        };
        assert!(alone.reaches("globex"));
        assert!(!alone.may_call(AccessRole::Admin));
    }
}
