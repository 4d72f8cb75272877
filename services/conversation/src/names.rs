//! Resource names of the conversation API, parsed into typed ids.
//!
//! `teams/{team}` and `teams/{team}/conversations/{conversation}`: the team is an RFC-1034
//! label (AIP-122), the conversation a UUID. Parsing is the only way to get a [`TeamId`] or
//! a [`ConversationName`], so code past this module never sees an unchecked name.

use std::fmt;

use uuid::Uuid;

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

/// A conversation's full name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConversationName {
    /// The owning team.
    pub team: TeamId,
    /// The conversation's id.
    pub id: Uuid,
}

impl ConversationName {
    /// Parses `teams/{team}/conversations/{uuid}`.
    pub fn parse(name: &str) -> Result<Self, String> {
        let expected = "expected `teams/{team}/conversations/{uuid}`";
        let mut parts = name.split('/');
        let (Some("teams"), Some(team), Some("conversations"), Some(id), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(format!("{name:?} is not a conversation name: {expected}"));
        };
        let team =
            TeamId::parse(team).map_err(|why| format!("{name:?} has an invalid team: {why}"))?;
        let id = parse_uuid(id).ok_or_else(|| format!("{name:?} has an invalid id: {expected}"))?;
        Ok(Self { team, id })
    }
}

impl fmt::Display for ConversationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "teams/{}/conversations/{}", self.team, self.id)
    }
}

/// The name of one event: `teams/{team}/conversations/{id}/events/{sequence}`.
pub fn event_name(conversation: &ConversationName, sequence: i64) -> String {
    format!("{conversation}/events/{sequence}")
}

/// Parses a UUID in its canonical hyphenated form only (36 characters), so one
/// conversation has exactly one name.
pub fn parse_uuid(text: &str) -> Option<Uuid> {
    if text.len() != 36 {
        return None;
    }
    Uuid::try_parse(text)
        .ok()
        .filter(|id| id.hyphenated().to_string() == text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_names_parse_and_print_back() {
        let id = Uuid::now_v7();
        let text = format!("teams/acme-1/conversations/{id}");
        let name = ConversationName::parse(&text).unwrap();
        assert_eq!(name.team.as_str(), "acme-1");
        assert_eq!(name.to_string(), text);
        assert_eq!(parse_team_name("teams/acme").unwrap().as_str(), "acme");
    }

    #[test]
    fn malformed_names_are_refused() {
        let id = Uuid::now_v7();
        for bad in [
            String::new(),
            "teams/".into(),
            "teams/Acme".into(),
            "teams/1acme".into(),
            "teams/acme-".into(),
            format!("teams/{}", "a".repeat(64)),
            "teams/acme/conversations/".into(),
            "teams/acme/conversations/not-a-uuid".into(),
            format!("teams/acme/conversations/{}", id.simple()),
            format!("teams/acme/conversations/{}", id.to_string().to_uppercase()),
            format!("teams/acme/conversations/{id}/extra"),
            format!("projects/acme/conversations/{id}"),
        ] {
            assert!(ConversationName::parse(&bad).is_err(), "{bad:?}");
        }
        assert!(parse_team_name("teams/acme/conversations").is_err());
        assert!(parse_team_name("acme").is_err());
    }
}
