//! Bounds on what an error status carries back to a client, shared by every service.
//!
//! A status travels in HTTP/2 trailers: `grpc-message` (percent-encoded) and
//! `grpc-status-details-bin` (base64 of a `google.rpc.Status` that repeats the message).
//! gRPC's C core, under Python's and Ruby's clients, refuses trailers over 8 KiB by default,
//! and a refused trailer hides the status. So a status lists at most
//! [`MAX_REPORTED_VIOLATIONS`] field violations, clips each field path and description,
//! clips the message, and counts what it left out; the worst case (every clipped byte a
//! 3-byte percent escape in the message) stays under 6.5 KiB. Client input quoted in a
//! description is clipped with it, so no status carries more than these bounds of it.
//!
//! Not here: which status a failure gets (each service's `error` module decides).

use std::borrow::Cow;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// Most field violations one status lists: 10, enough to fix a request in a round or two;
/// the message counts the rest.
pub const MAX_REPORTED_VIOLATIONS: usize = 10;
/// Longest field path of a listed violation, in bytes: 100 (the longest path a convoy
/// request has, `events[499].token_usage.cache_creation_input_tokens`, has 52).
pub const MAX_FIELD_BYTES: usize = 100;
/// Longest description of a listed violation, in bytes: 200, room for what is wrong, what
/// would be right and a short quote of the value.
pub const MAX_DESCRIPTION_BYTES: usize = 200;
/// Longest `grpc-message`, in bytes: 512. The details carry the rest.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// What marks a clipped text.
const ELLIPSIS: &str = "…";

/// `text`, clipped to at most `max` bytes at a character boundary and marked with `…`
/// when clipped.
pub fn clip(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{ELLIPSIS}", &text[..end]))
}

/// What an INVALID_ARGUMENT message starts with.
const INVALID_PREFIX: &str = "invalid argument: ";

/// A one-line summary of `violations` (field, description) that fits a message after
/// `invalid argument: ` ([`MAX_MESSAGE_BYTES`] in all): the first few (clipped), then how
/// many more there are.
pub fn summary<F, D>(violations: &[(F, D)]) -> String
where
    F: AsRef<str>,
    D: AsRef<str>,
{
    let room = MAX_MESSAGE_BYTES - INVALID_PREFIX.len();
    // Kept free for the count of the rest.
    let tail = 64;
    let mut text = String::new();
    let mut listed = 0;
    for (field, description) in violations.iter().take(MAX_REPORTED_VIOLATIONS) {
        let entry = format!(
            "{}{}: {}",
            if listed == 0 { "" } else { "; " },
            clip(field.as_ref(), MAX_FIELD_BYTES),
            clip(description.as_ref(), MAX_DESCRIPTION_BYTES)
        );
        if listed > 0 && text.len() + entry.len() > room - tail {
            break;
        }
        text.push_str(&entry);
        listed += 1;
    }
    if violations.len() > listed {
        text.push_str(&format!("; and {} more", violations.len() - listed));
        if violations.len() > MAX_REPORTED_VIOLATIONS {
            text.push_str(&format!(
                " (the details list the first {MAX_REPORTED_VIOLATIONS})"
            ));
        }
    }
    clip(&text, room).into_owned()
}

/// INVALID_ARGUMENT for `violations` (field, description), with google.rpc.BadRequest
/// details listing the first [`MAX_REPORTED_VIOLATIONS`], each clipped, and a bounded
/// message ([`summary`]).
pub fn invalid_argument<F, D>(violations: &[(F, D)]) -> Status
where
    F: AsRef<str>,
    D: AsRef<str>,
{
    let listed: Vec<FieldViolation> = violations
        .iter()
        .take(MAX_REPORTED_VIOLATIONS)
        .map(|(field, description)| {
            FieldViolation::new(
                clip(field.as_ref(), MAX_FIELD_BYTES),
                clip(description.as_ref(), MAX_DESCRIPTION_BYTES),
            )
        })
        .collect();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{INVALID_PREFIX}{}", summary(violations)),
        ErrorDetails::with_bad_request(listed),
    )
}

/// A status with `code`, `message` clipped to [`MAX_MESSAGE_BYTES`], and `details`.
pub fn with_details(code: Code, message: &str, details: ErrorDetails) -> Status {
    Status::with_error_details(code, clip(message, MAX_MESSAGE_BYTES), details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_cuts_long_text_at_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(100);
        let clipped = clip(&long, 11);
        assert!(clipped.len() <= 11, "{clipped}");
        assert!(clipped.ends_with(ELLIPSIS));
        assert_eq!(clip("abcdef", 5), "ab…");
    }

    #[test]
    fn a_flood_of_long_violations_lists_ten_clipped_and_counts_the_rest() {
        let huge = "x".repeat(1 << 20);
        let violations: Vec<(String, String)> = (0..400_000)
            .map(|i| (format!("update_mask.paths[{i}]"), huge.clone()))
            .take(1000)
            .collect();
        let status = invalid_argument(&violations);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            status.message()
        );
        assert!(
            status
                .message()
                .contains("more (the details list the first 10)"),
            "{}",
            status.message()
        );
        let listed = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(listed.len(), MAX_REPORTED_VIOLATIONS);
        assert!(
            listed
                .iter()
                .all(|v| v.description.len() <= MAX_DESCRIPTION_BYTES)
        );
        // What travels in the trailers: the encoded details (which repeat the message).
        assert!(status.details().len() < 4096, "{}", status.details().len());
    }

    #[test]
    fn a_few_short_violations_are_listed_whole() {
        let status = invalid_argument(&[("title", "is required"), ("intent", "is unknown")]);
        assert_eq!(
            status.message(),
            "invalid argument: title: is required; intent: is unknown"
        );
        assert_eq!(
            status
                .get_details_bad_request()
                .unwrap()
                .field_violations
                .len(),
            2
        );
    }
}
