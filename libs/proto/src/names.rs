//! Team names, shared by every API that scopes data by team (AIP-122).
//!
//! `teams/{team}`, where the team is an RFC-1034 label. Parsing is the only way to get a
//! [`TeamId`], so code past a service's validation never sees an unchecked name.

use std::fmt;

/// A team's id: 1 to 63 characters, `[a-z0-9-]`, starting with a letter and not ending
/// with a hyphen.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TeamId(String);

impl TeamId {
    /// Parses a team id.
    pub fn parse(id: &str) -> Result<Self, &'static str> {
        let bytes = id.as_bytes();
        if bytes.is_empty() || bytes.len() > 63 {
            return Err("a team id has 1 to 63 characters");
        }
        if !bytes[0].is_ascii_lowercase() {
            return Err("a team id starts with a lowercase letter");
        }
        if bytes[bytes.len() - 1] == b'-' {
            return Err("a team id does not end with a hyphen");
        }
        if !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        {
            return Err("a team id has only lowercase letters, digits and hyphens");
        }
        Ok(Self(id.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TeamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `teams/{team}`: parses a parent name.
pub fn parse_team_name(name: &str) -> Result<TeamId, String> {
    let Some(team) = name.strip_prefix("teams/") else {
        return Err(format!(
            "{name:?} is not a team name: expected `teams/{{team}}`"
        ));
    };
    TeamId::parse(team).map_err(|why| format!("{name:?} is not a valid team name: {why}"))
}
