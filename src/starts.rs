//! Starting conversations from outside: the request behind
//! `POST /flows/{name}/start` and `smsflow start`, its validation, and the
//! phone-number rules (E.164) that contact imports share.
//!
//! The work itself is [`crate::pipeline::Pipeline::start_flow`] (under the
//! conversation's lock; what the flow says goes to the outbox) and the
//! engine's pure [`crate::flow::start_flow`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::StartRecord;

/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 200;
/// Most contact fields or run variables one start may set (each).
pub const MAX_FIELDS: usize = 50;
/// Longest field or variable value, in characters.
pub const MAX_VALUE_CHARS: usize = 1600;
/// Longest field or variable name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// What to do when the contact is already in a flow run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IfBusy {
    /// End the current run and start (the default).
    #[default]
    Interrupt,
    /// Start nothing; the result says `skipped_busy`.
    Skip,
    /// Wait until the run ends (or expires), then start; the result says
    /// `queued`. Kept in the conversation, so it survives a restart.
    Queue,
}

/// A flow start, as the API takes it (the flow's name comes from the path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The contact to text (E.164; spaces, dashes, dots and parentheses
    /// after a leading `+` are removed).
    pub to: String,
    /// Our number the conversation is with (E.164); replies come to it.
    pub from: String,
    /// Send through this Messaging Service (`MG…`) instead of `from`.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// Contact fields to set before the flow's first step.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Run variables the new run begins with.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// The caller's key: a repeated request with the same key starts
    /// nothing new and gets the first one's result.
    pub idempotency_key: String,
    /// What to do when the contact is already in a flow run.
    #[serde(default)]
    pub if_busy: IfBusy,
}

impl StartRequest {
    /// Check and normalise the request: phone numbers to E.164, names and
    /// sizes within bounds. The error is a short reason for the caller.
    pub fn validate(&mut self) -> Result<(), String> {
        self.to = normalize_phone(&self.to).map_err(|e| format!("to: {e}"))?;
        self.from = normalize_phone(&self.from).map_err(|e| format!("from: {e}"))?;
        if self.to == self.from {
            return Err("to: the contact cannot be our own number".into());
        }
        if let Some(sid) = &self.messaging_service_sid {
            let ok = sid.len() == 34
                && sid.starts_with("MG")
                && sid[2..].bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err("messaging_service_sid: expected MG followed by 32 hex digits".into());
            }
        }
        let key = &self.idempotency_key;
        if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
            return Err(format!(
                "idempotency_key: required, 1 to {MAX_KEY_BYTES} bytes, no control characters"
            ));
        }
        check_names("fields", &self.fields)?;
        check_names("vars", &self.vars)?;
        Ok(())
    }
}

/// Check a map of contact fields or run variables (`what` names it in
/// the error): at most [`MAX_FIELDS`], valid names, bounded values.
pub(crate) fn check_names(what: &str, map: &BTreeMap<String, String>) -> Result<(), String> {
    if map.len() > MAX_FIELDS {
        return Err(format!("{what}: at most {MAX_FIELDS}"));
    }
    for (name, value) in map {
        check_field_name(name).map_err(|e| format!("{what}: {e}"))?;
        if value.chars().count() > MAX_VALUE_CHARS {
            return Err(format!(
                "{what}: {name}: longer than {MAX_VALUE_CHARS} characters"
            ));
        }
    }
    Ok(())
}

/// A contact field or variable name: a letter or `_`, then letters,
/// digits and `_`, at most [`MAX_NAME_BYTES`] (what `{{contact.x}}` can
/// name).
pub fn check_field_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok
        || name.len() > MAX_NAME_BYTES
        || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "{name:?} is not a valid name (a letter or _, then letters, digits, _; at most {MAX_NAME_BYTES})"
        ));
    }
    Ok(())
}

/// Normalise a phone number to E.164: a leading `+`, then 8 to 15 digits,
/// the first not 0. Spaces, dashes, dots and parentheses are removed, and a
/// leading `00` is read as `+`. A number without `+` (or `00`) is refused:
/// without a country it is ambiguous.
pub fn normalize_phone(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("missing phone number".into());
    }
    let cleaned: String = trimmed
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\u{a0}'))
        .collect();
    let digits = if let Some(d) = cleaned.strip_prefix('+') {
        d
    } else if let Some(d) = cleaned.strip_prefix("00") {
        d
    } else {
        return Err(format!(
            "{trimmed:?} has no country code: write it in E.164 (+ and country code)"
        ));
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{trimmed:?} is not a phone number"));
    }
    if digits.len() < 8 || digits.len() > 15 || digits.starts_with('0') {
        return Err(format!(
            "{trimmed:?} is not an E.164 number (+, then 8 to 15 digits, not starting with 0)"
        ));
    }
    Ok(format!("+{digits}"))
}

/// What [`crate::pipeline::Pipeline::start_flow`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// The flow set has no flow by that name; nothing recorded.
    UnknownFlow,
    /// This request's result (new: `duplicate` false), or the result
    /// recorded under its key by an earlier request (`duplicate` true).
    Done {
        /// The result, as recorded.
        record: Box<StartRecord>,
        /// Whether the key was already used.
        duplicate: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_are_normalised_or_refused() {
        assert_eq!(
            normalize_phone("+1 (555) 123-0001").unwrap(),
            "+15551230001"
        );
        assert_eq!(
            normalize_phone(" +44 20.7946.0018 ").unwrap(),
            "+442079460018"
        );
        assert_eq!(
            normalize_phone("0044 20 7946 0018").unwrap(),
            "+442079460018"
        );
        for bad in [
            "5551230001",
            "(555) 123-0001",
            "+0123456789",
            "+1555",
            "+1555abc0001",
            "",
            "+1234567890123456",
        ] {
            assert!(normalize_phone(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn requests_are_validated() {
        let mut r = StartRequest {
            to: "+1 555 123 0001".into(),
            from: "+15550001111".into(),
            messaging_service_sid: None,
            fields: BTreeMap::from([("appt".into(), "Tue 3pm".into())]),
            vars: BTreeMap::new(),
            idempotency_key: "k1".into(),
            if_busy: IfBusy::Skip,
        };
        r.validate().unwrap();
        assert_eq!(r.to, "+15551230001");
        let mut bad = r.clone();
        bad.idempotency_key.clear();
        assert!(bad.validate().unwrap_err().contains("idempotency_key"));
        let mut bad = r.clone();
        bad.fields.insert("not ok".into(), "x".into());
        assert!(bad.validate().unwrap_err().contains("fields"));
        let mut bad = r.clone();
        bad.to = "+1 555 000 1111".into();
        assert!(bad.validate().unwrap_err().contains("our own number"));
        let mut bad = r.clone();
        bad.messaging_service_sid = Some("MGnope".into());
        assert!(bad.validate().is_err());
    }
}
