//! Broadcasts: one message, or one flow started, for every contact of one
//! of our numbers that matches a filter (a field equals a value, or is
//! set), or for an explicit list (`POST /broadcasts`, `smsflow broadcasts
//! send`).
//!
//! A message broadcast is its outbox entries: one per recipient, keyed
//! `broadcast:` + id + `:` + number (cause `broadcast`), so sending the
//! same broadcast again (after a crash, a timeout, or to catch contacts
//! imported since) adds only recipients not yet in it, and nobody gets a
//! second copy. A flow broadcast is one flow start per recipient
//! ([`crate::pipeline::Pipeline::start_flow`]) with the idempotency key
//! `broadcast:` + id + `:` + number, so the same again starts nobody
//! twice; the first step's messages are outbox entries keyed `start:` +
//! that key + `:` + part (cause `start`). The sender paces both per
//! number, defers them past quiet hours and skips opted-out contacts.
//! Progress (`GET /broadcasts`) is counted from those entries' states:
//! each message-broadcast entry, and each flow-broadcast recipient's first
//! message (part 0). The store keeps these counts per broadcast with every
//! outbox write ([`crate::store::OutboxTally`]), so listing reads one small
//! record per broadcast, whatever the size of the outbox. Cancelling marks
//! the entries still pending `skipped` (`canceled`), reading only the
//! broadcast's own key range.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::flow::ContactText;
use crate::starts::{check_field_name, check_names, normalize_phone, IfBusy, MAX_VALUE_CHARS};
use crate::store::{tally_prefixes, OutboxTally};
use crate::twilio::limits::MAX_BODY_CHARS;

/// Most recipients one explicit list may name.
pub const MAX_LIST: usize = 10_000;

/// Which contacts a broadcast goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// The contact field to look at.
    pub field: String,
    /// The value it must have; without it, the field must be set (not
    /// empty).
    #[serde(default)]
    pub equals: Option<String>,
}

/// A broadcast, as the API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    /// The caller's id for it (letters, digits, `_`, `-`, `.`; at most
    /// 100): the same id again adds only new recipients.
    pub id: String,
    /// Our number it is sent from; its contacts are the ones filtered.
    pub from: String,
    /// Send through this Messaging Service instead of `from`.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// The text (at most 1,600 characters); `{{contact.x}}` (or
    /// `{{contact.x|fallback}}`) is the recipient's field `x`
    /// ([`ContactText`]). Or `flow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Or the flow to start for each recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
    /// With `flow`: what to do for a contact already in a flow run
    /// (default `skip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_busy: Option<IfBusy>,
    /// Contacts of `from` whose field matches.
    #[serde(default, rename = "where")]
    pub filter: Option<Filter>,
    /// Or these numbers (E.164).
    #[serde(default)]
    pub to: Option<Vec<String>>,
    /// With `flow`: contact fields set for every recipient before the
    /// flow's first step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    /// With `flow`: run variables every recipient's run begins with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
}

impl BroadcastRequest {
    /// Check and normalise; the error is a short reason for the caller.
    pub fn validate(&mut self) -> Result<(), String> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 100
            && self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !id_ok {
            return Err("id: 1 to 100 letters, digits, `_`, `-` or `.`".into());
        }
        self.from = normalize_phone(&self.from).map_err(|e| format!("from: {e}"))?;
        match (&self.message, &self.flow) {
            (Some(m), None) => {
                if m.trim().is_empty() || m.chars().count() > MAX_VALUE_CHARS {
                    return Err(format!("message: 1 to {MAX_VALUE_CHARS} characters"));
                }
                ContactText::parse(m, MAX_BODY_CHARS).map_err(|e| format!("message: {e}"))?;
                if self.if_busy.is_some() {
                    return Err("if_busy: only with `flow`".into());
                }
                if !self.fields.is_empty() || !self.vars.is_empty() {
                    return Err("fields, vars: only with `flow`".into());
                }
            }
            (None, Some(f)) => {
                if f.is_empty() || f.len() > 200 || f.chars().any(char::is_control) {
                    return Err("flow: 1 to 200 bytes, no control characters".into());
                }
                check_names("fields", &self.fields)?;
                check_names("vars", &self.vars)?;
            }
            _ => return Err("give exactly one of `message` and `flow`".into()),
        }
        match (&self.filter, &mut self.to) {
            (Some(f), None) => check_field_name(&f.field).map_err(|e| format!("where: {e}"))?,
            (None, Some(list)) => {
                if list.is_empty() || list.len() > MAX_LIST {
                    return Err(format!("to: 1 to {MAX_LIST} numbers"));
                }
                for n in list.iter_mut() {
                    *n = normalize_phone(n).map_err(|e| format!("to: {e}"))?;
                }
                list.sort();
                list.dedup();
            }
            _ => return Err("give exactly one of `where` and `to`".into()),
        }
        Ok(())
    }

    /// Whether a contact with `fields` is a recipient under `where`.
    pub fn matches(&self, fields: &BTreeMap<String, String>) -> bool {
        match &self.filter {
            Some(f) => match (&f.equals, fields.get(&f.field)) {
                (Some(want), Some(have)) => want == have,
                (None, Some(have)) => !have.is_empty(),
                (_, None) => false,
            },
            None => false,
        }
    }
}

/// The outbox key prefix of message broadcast `id`, and the idempotency
/// key prefix of flow broadcast `id`'s starts.
pub fn key_prefix(id: &str) -> String {
    let [prefix, _] = tally_prefixes(id);
    prefix
}

/// What sending a broadcast did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// The broadcast's id.
    pub id: String,
    /// Recipients matched now.
    pub recipients: usize,
    /// Of those, newly put in the outbox.
    pub enqueued: usize,
    /// Of those, already in it from an earlier request with this id.
    pub already: usize,
    /// A flow broadcast: of the new recipients, those whose flow started
    /// (the same as `enqueued`).
    #[serde(default)]
    pub started: usize,
    /// A flow broadcast: new recipients skipped as already in a flow run
    /// (`if_busy: skip`).
    #[serde(default)]
    pub skipped_busy: usize,
    /// A flow broadcast: new recipients skipped as opted out.
    #[serde(default)]
    pub opted_out: usize,
    /// A flow broadcast: new recipients whose start waits for their
    /// current run to end (`if_busy: queue`).
    #[serde(default)]
    pub queued: usize,
}

/// A broadcast's progress, from its outbox entries (a flow broadcast's:
/// each started recipient's first message).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The broadcast's id.
    pub id: String,
    /// Recipients in the outbox.
    pub total: usize,
    /// Accepted by Twilio.
    pub sent: usize,
    /// Not sent on purpose (opted out, canceled, too late).
    pub skipped: usize,
    /// Refused by Twilio, or retries ran out.
    pub failed: usize,
    /// The request may have reached Twilio; not sent again.
    pub unknown: usize,
    /// Still to send (pending or being sent).
    pub remaining: usize,
}

/// Progress of every broadcast, from the store's outbox tallies.
pub fn progress(tallies: Vec<(String, OutboxTally)>) -> Vec<Progress> {
    tallies
        .into_iter()
        .map(|(id, t)| Progress {
            id,
            total: t.total() as usize,
            sent: t.sent as usize,
            skipped: t.skipped as usize,
            failed: t.failed as usize,
            unknown: t.unknown as usize,
            remaining: (t.pending + t.sending) as usize,
        })
        .collect()
}

/// The progress rows as a table for the terminal.
pub fn render_table(rows: &[Progress]) -> String {
    let mut out = format!(
        "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
        "ID", "TOTAL", "SENT", "SKIPPED", "FAILED", "UNKNOWN", "REMAINING"
    );
    for p in rows {
        out.push_str(&format!(
            "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
            p.id, p.total, p.sent, p.skipped, p.failed, p.unknown, p.remaining
        ));
    }
    out
}
