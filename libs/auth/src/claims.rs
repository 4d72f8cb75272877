//! What a verified token says about its bearer: who, which teams, which role, and whether
//! it holds the fleet-wide grant.

use std::sync::Arc;

use convoy_proto::v1::AccessRole;
use serde::{Deserialize, Serialize};

/// The audience every convoy token carries and every convoy service requires, so a token
/// issued for another system by the same key is refused.
pub const AUDIENCE: &str = "convoy";

/// The `teams` entry that reaches every team's data (admins, services). It does not grant
/// fleet-wide operations: that takes [`Claims::fleet`].
pub const ALL_TEAMS: &str = "*";

/// The pseudo-team under which fleet-wide answers are kept (the fleet overview in the cache
/// tier: `analytics:_fleet:...`). Only holders of the fleet-wide grant reach it; no team
/// id can take this name (team ids do not start with `_`).
pub const FLEET_TEAM: &str = "_fleet";

/// A bearer's role. The order of satisfaction is reader < writer < admin, with service
/// beside admin: a service satisfies reader, writer and service, never admin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads its teams' conversations and analytics.
    Reader,
    /// Reader, plus creates, updates, deletes and appends.
    Writer,
    /// Administers its teams, and everything a writer does there; with the fleet-wide
    /// grant (the token's `fleet` claim) also runs the fleet (resharding, cache flushes,
    /// fleet-wide analytics).
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
    /// The fleet-wide grant: the bearer may call fleet-scoped RPCs (those whose policy is
    /// `TEAM_SCOPE_FLEET`: the fleet overview, the shard map and its administration, cache
    /// statistics and flushes), as far as its role allows. Absent means false; `teams:
    /// ["*"]` does not imply it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fleet: bool,
}

impl Claims {
    /// Whether the bearer may reach `team`: a team its `teams` name (or `"*"`), or the
    /// fleet's own [`FLEET_TEAM`] with the fleet-wide grant.
    pub fn reaches(&self, team: &str) -> bool {
        if team == FLEET_TEAM {
            return self.fleet;
        }
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

    /// Whether the call holds the fleet-wide grant a fleet-scoped RPC needing `needed`
    /// asks for. Service-only RPCs check the caller (as [`Caller::may_call`] does); the
    /// others check the caller and the user it acts for, so neither side widens the other.
    pub fn holds_fleet_grant(&self, needed: AccessRole) -> bool {
        match needed {
            AccessRole::Service => self.actor.fleet,
            _ => self.actor.fleet && self.subject.as_ref().is_none_or(|s| s.fleet),
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
            fleet: false,
        })
    }

    fn fleet(role: Role, teams: &[&str]) -> Arc<Claims> {
        let mut claims = Arc::unwrap_or_clone(claims(role, teams));
        claims.fleet = true;
        Arc::new(claims)
    }

    fn alone(actor: Arc<Claims>) -> Caller {
        Caller {
            actor,
            subject: None,
        }
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

    #[test]
    fn only_the_fleet_grant_opens_fleet_rpcs_whatever_the_teams() {
        use AccessRole::*;
        // An admin of some teams, or of every team, without the grant: no fleet RPC.
        for teams in [&["acme"][..], &["*"]] {
            let admin = alone(claims(Role::Admin, teams));
            assert!(!admin.holds_fleet_grant(Admin), "{teams:?}");
            assert!(!admin.holds_fleet_grant(Service), "{teams:?}");
            assert!(!admin.reaches(FLEET_TEAM), "{teams:?}");
        }
        let admin = alone(fleet(Role::Admin, &["*"]));
        assert!(admin.holds_fleet_grant(Admin) && admin.reaches(FLEET_TEAM));
        // The grant is about the fleet, not about teams: it adds none.
        let ops = alone(fleet(Role::Admin, &["ops"]));
        assert!(ops.holds_fleet_grant(Admin) && !ops.reaches("acme"));
    }

    #[test]
    fn a_service_acting_for_a_user_holds_the_grant_only_if_both_do_except_service_rpcs() {
        use AccessRole::*;
        let service = fleet(Role::Service, &["*"]);
        let for_user = Caller {
            actor: service.clone(),
            subject: Some(claims(Role::Admin, &["acme"])),
        };
        // Service-only fleet RPCs (the shard map, cache statistics) are the service's own.
        assert!(for_user.holds_fleet_grant(Service));
        assert!(!for_user.holds_fleet_grant(Admin));
        assert!(!for_user.reaches(FLEET_TEAM));
        let for_fleet_admin = Caller {
            actor: service,
            subject: Some(fleet(Role::Admin, &["*"])),
        };
        assert!(for_fleet_admin.holds_fleet_grant(Admin));
        assert!(for_fleet_admin.reaches(FLEET_TEAM));
        // A service token minted without the grant does not get the shard map.
        assert!(!alone(claims(Role::Service, &["*"])).holds_fleet_grant(Service));
    }

    #[test]
    fn the_grant_is_absent_unless_a_token_says_true() {
        let without: Claims = serde_json::from_str(
            r#"{"sub":"u","teams":["*"],"role":"admin","exp":1,"aud":"convoy"}"#,
        )
        .unwrap();
        assert!(!without.fleet);
        let with: Claims = serde_json::from_str(
            r#"{"sub":"u","teams":[],"role":"admin","exp":1,"aud":"convoy","fleet":true}"#,
        )
        .unwrap();
        assert!(with.fleet);
        // Not written when false: tokens without the grant look as they always did.
        assert!(!serde_json::to_string(&without).unwrap().contains("fleet"));
        assert!(
            serde_json::from_str::<Claims>(
                r#"{"sub":"u","teams":[],"role":"admin","exp":1,"aud":"convoy","fleet":"yes"}"#
            )
            .is_err()
        );
    }
}
