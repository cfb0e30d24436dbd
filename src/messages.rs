//! The message log view: inbound messages we answered, outbound replies
//! and messages we sent on our own with their delivery status, and outbox
//! messages not sent (pending, failed, skipped, unknown), newest first,
//! filtered by number and status.
//!
//! Shared by `GET /messages` and `smsflow messages`. Reads through the
//! [`Store`] trait; knows nothing of HTTP or sled.

use serde::{Deserialize, Serialize};

use crate::store::{OutboxState, Store, StoreError};

/// One row of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// "inbound" or "outbound".
    pub direction: String,
    /// The MessageSid.
    pub sid: String,
    /// Unix seconds: when we answered (inbound) or the last status update.
    pub at: i64,
    /// The sender's number, if known.
    pub from: Option<String>,
    /// The recipient's number, if known.
    pub to: Option<String>,
    /// Inbound: our outcome (`reply`, `silence:<reason>`). Outbound: the
    /// latest delivery status.
    pub status: String,
    /// Twilio's `ErrorCode` for a failed delivery (outbound).
    pub error_code: Option<String>,
    /// Outbound: the inbound message this reply answered.
    pub inbound_sid: Option<String>,
    /// The flow that produced the answer, if any.
    pub flow: Option<String>,
    /// The step within `flow`, if any.
    pub step: Option<String>,
    /// A message we sent on our own: its outbox key (absent on replies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<String>,
    /// Inbound: the message's text, when `store_message_text` kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Inbound: the texts of our replies to it, when kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replies: Vec<String>,
}

/// Which rows to return.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Filter {
    /// Matches either side (from or to).
    pub number: Option<String>,
    /// Matches the status exactly, or the outcome prefix for inbound rows
    /// (`silence` matches every `silence:<reason>`).
    pub status: Option<String>,
    /// At most this many rows (newest first); the default is 50, at most 1000.
    pub limit: Option<usize>,
    /// Only rows at or after this time (unix seconds).
    pub since: Option<i64>,
    /// Only rows before this time (unix seconds).
    pub until: Option<i64>,
    /// Only inbound rows whose kept text (the message or a reply to it)
    /// contains this, ignoring case.
    pub text: Option<String>,
}

pub(crate) const DEFAULT_LIMIT: usize = 50;
pub(crate) const MAX_LIMIT: usize = 1000;

/// The rows of the message log in `store` that match `filter`, newest first.
pub fn list(store: &impl Store, filter: &Filter) -> Result<Vec<MessageView>, StoreError> {
    let mut rows: Vec<MessageView> = store
        .inbound_log()?
        .into_iter()
        .map(|(sid, p)| MessageView {
            direction: "inbound".into(),
            sid,
            at: p.at,
            from: Some(p.from),
            to: Some(p.to),
            status: p.outcome,
            error_code: None,
            inbound_sid: None,
            flow: p.flow,
            step: p.step,
            outbox: None,
            body: p.body,
            replies: p.replies,
        })
        .collect();
    // Messages we send on our own: sent ones are linked to their delivery
    // rows below; the others (no MessageSid yet, or never) are rows here.
    let mut sent_from_outbox = std::collections::HashMap::new();
    for entry in store.outbox()? {
        let (status, error_code, at) = match entry.state {
            OutboxState::Sent { sid, .. } => {
                sent_from_outbox.insert(sid, entry.key);
                continue;
            }
            OutboxState::Pending { not_before, .. } => ("pending".to_owned(), None, not_before),
            OutboxState::Sending { since, .. } => ("sending".to_owned(), None, since),
            OutboxState::Failed { code, at, .. } => {
                ("failed".to_owned(), code.map(|c| c.to_string()), at)
            }
            OutboxState::Skipped { reason, at } => (format!("skipped:{reason}"), None, at),
            OutboxState::Unknown { at, .. } => ("unknown".to_owned(), None, at),
        };
        rows.push(MessageView {
            direction: "outbound".into(),
            sid: "-".into(),
            at,
            from: Some(entry.from),
            to: Some(entry.to),
            status,
            error_code,
            inbound_sid: None,
            flow: entry.flow,
            step: entry.step,
            outbox: Some(entry.key),
            body: None,
            replies: Vec::new(),
        });
    }
    rows.extend(
        store
            .outbound_log()?
            .into_iter()
            .map(|(sid, d)| MessageView {
                direction: "outbound".into(),
                at: d.updated_at,
                from: d.from,
                to: d.to,
                status: d.status,
                error_code: d.error_code,
                inbound_sid: d.inbound_sid,
                flow: d.flow,
                step: d.step,
                outbox: sent_from_outbox.remove(&sid),
                sid,
                body: None,
                replies: Vec::new(),
            }),
    );
    let needle = filter.text.as_deref().map(str::to_lowercase);
    rows.retain(|r| {
        let number_ok = filter
            .number
            .as_deref()
            .is_none_or(|n| r.from.as_deref() == Some(n) || r.to.as_deref() == Some(n));
        let status_ok = filter
            .status
            .as_deref()
            .is_none_or(|s| r.status == s || r.status.split(':').next() == Some(s));
        let time_ok =
            filter.since.is_none_or(|t| r.at >= t) && filter.until.is_none_or(|t| r.at < t);
        let text_ok = needle.as_deref().is_none_or(|n| {
            r.body
                .iter()
                .chain(&r.replies)
                .any(|t| t.to_lowercase().contains(n))
        });
        number_ok && status_ok && time_ok && text_ok
    });
    rows.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| b.sid.cmp(&a.sid)));
    rows.truncate(filter.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT));
    Ok(rows)
}

/// Plain-text table for the terminal.
pub fn render_table(rows: &[MessageView]) -> String {
    let mut out = String::from("time        dir  sid                                  from             to               status                 error  linked\n");
    for r in rows {
        let linked = match (&r.inbound_sid, &r.flow, &r.step) {
            (Some(i), f, s) => format!(
                "reply to {i} ({}/{})",
                f.as_deref().unwrap_or("-"),
                s.as_deref().unwrap_or("-")
            ),
            (None, Some(f), s) => format!("{f}/{}", s.as_deref().unwrap_or("-")),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:<11} {:<4} {:<36} {:<16} {:<16} {:<22} {:<6} {}\n",
            r.at,
            if r.direction == "inbound" {
                "in"
            } else {
                "out"
            },
            r.sid,
            r.from.as_deref().unwrap_or("-"),
            r.to.as_deref().unwrap_or("-"),
            r.status,
            r.error_code.as_deref().unwrap_or("-"),
            linked
        ));
        // Kept texts (store_message_text), each on its own indented line.
        if let Some(body) = &r.body {
            out.push_str(&format!("            > {}\n", one_line(body)));
        }
        for reply in &r.replies {
            out.push_str(&format!("            < {}\n", one_line(reply)));
        }
    }
    out
}

/// A text on one terminal line: line breaks and other control
/// characters shown as spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
