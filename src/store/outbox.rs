//! The outbox: every message we send on our own (not as the answer to a
//! webhook: a timeout's reminder, later flow starts and broadcasts) is
//! recorded here before anything tries to send it.
//!
//! An entry's `key` is deterministic (for a timeout: the conversation, the
//! flow and step, which timeout, when the step started waiting, and the
//! part), and enqueueing a key that is already there changes nothing. That
//! makes the outbox the point where "send once" is decided: whoever
//! produces a message may crash and produce it again; only the first
//! enqueue of its key counts.
//!
//! Keys: `x\0` + key → [`OutboxEntry`] (versioned JSON).

use serde::{Deserialize, Serialize};

use crate::versioned::Versioned;

/// Where an outbound message is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum OutboxState {
    /// Waiting to be sent, not before `not_before` (unix seconds; the due
    /// time, pushed later by quiet hours, pacing and retries).
    Pending {
        /// Earliest time to try (unix seconds).
        not_before: i64,
        /// Attempts made so far.
        attempts: u32,
    },
    /// Claimed by the sender: a request to Twilio may be in flight. Found
    /// in this state after a restart, the message may or may not have
    /// reached Twilio.
    Sending {
        /// Unix seconds when the attempt started.
        since: i64,
        /// Attempts made so far, this one included.
        attempts: u32,
    },
    /// Twilio accepted it.
    Sent {
        /// Twilio's MessageSid (`SM…`).
        sid: String,
        /// Unix seconds when Twilio accepted it.
        at: i64,
    },
    /// Twilio refused it for good, or retries ran out.
    Failed {
        /// Twilio's error code, when it gave one.
        code: Option<u32>,
        /// What went wrong, for operators.
        reason: String,
        /// Unix seconds of the failure.
        at: i64,
    },
    /// Not sent on purpose (the recipient opted out, it would arrive
    /// later than `max_late`, …).
    Skipped {
        /// Why, as a short snake_case label.
        reason: String,
        /// Unix seconds of the decision.
        at: i64,
    },
    /// The request may have reached Twilio but no answer came back; it is
    /// not sent again (at most once).
    Unknown {
        /// What happened.
        reason: String,
        /// Unix seconds of the decision.
        at: i64,
    },
}

/// One message to send on our own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The deterministic key that makes enqueueing idempotent.
    pub key: String,
    /// The recipient (E.164).
    pub to: String,
    /// Our number it is sent from (the conversation's `To`).
    pub from: String,
    /// The Messaging Service to send through instead of `from`, if any.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// The message text (at most 1,600 characters).
    pub body: String,
    /// Media URLs to attach.
    #[serde(default)]
    pub media: Vec<String>,
    /// What produced it: `timeout`, later `start`, `broadcast`, ….
    pub cause: String,
    /// The flow and step that produced it, if a flow did.
    #[serde(default)]
    pub flow: Option<String>,
    /// The step within `flow`.
    #[serde(default)]
    pub step: Option<String>,
    /// Unix seconds when it was enqueued.
    pub created_at: i64,
    /// Unix seconds when it was meant to go (before any deferral).
    pub due_at: i64,
    /// Where it is in its life.
    #[serde(flatten)]
    pub state: OutboxState,
}

impl Versioned for OutboxEntry {
    const KIND: &'static str = "outbox entry";
    const VERSION: u32 = 1;
}

pub(super) const PREFIX: &[u8] = b"x\0";

pub(super) fn db_key(key: &str) -> Vec<u8> {
    super::records::prefixed(PREFIX, key)
}
