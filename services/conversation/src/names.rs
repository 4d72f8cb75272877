//! Resource names of the conversation API, parsed into typed ids.
//!
//! `teams/{team}` and `teams/{team}/conversations/{conversation}`: the team is an RFC-1034
//! label (AIP-122), the conversation a UUID. Parsing is the only way to get a [`TeamId`] or
//! a [`ConversationName`], so code past this module never sees an unchecked name.

use std::fmt;

use uuid::Uuid;

pub use convoy_proto::names::{TeamId, parse_team_name};

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
