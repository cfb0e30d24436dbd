//! The store's records and their byte layout: the keys, the conversation
//! record (header, the caller's conversation bytes, the recent answers) and
//! the JSON records (delivery statuses and events, consent states and
//! their audit trail). See the store's module doc for the table of keys
//! and the format versions.

use serde::{Deserialize, Serialize};

use crate::versioned::Versioned;

/// The conversation key: one conversation per (our number, their number).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConvKey {
    /// Our number (Twilio's `To`).
    pub to: String,
    /// The sender's number (Twilio's `From`).
    pub from: String,
}

impl ConvKey {
    /// The key of the conversation between our number `to` and the sender `from`.
    pub fn new(to: impl Into<String>, from: impl Into<String>) -> Self {
        ConvKey {
            to: to.into(),
            from: from.into(),
        }
    }

    /// The key of a conversation record (`c\0` to `\0` from), if `k` is one.
    pub(super) fn from_db_key(k: &[u8]) -> Option<ConvKey> {
        let rest = k.strip_prefix(b"c\0")?;
        let split = rest.iter().position(|b| *b == 0)?;
        Some(ConvKey::new(
            std::str::from_utf8(&rest[..split]).ok()?,
            std::str::from_utf8(&rest[split + 1..]).ok()?,
        ))
    }

    pub(super) fn db_key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(3 + self.to.len() + self.from.len());
        k.extend_from_slice(b"c\0");
        k.extend_from_slice(self.to.as_bytes());
        k.push(0);
        k.extend_from_slice(self.from.as_bytes());
        k
    }
}

/// What we answered to one inbound MessageSid: replayed verbatim when Twilio
/// retries the webhook, so a retry never runs the flow again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Processed {
    /// The exact TwiML document we answered with.
    pub twiml: String,
    /// Short outcome label for logs ("reply", "silence:no_match", …).
    pub outcome: String,
    /// Unix seconds when it was processed.
    pub at: i64,
    /// Sender and our number, for the message log.
    #[serde(default)]
    pub from: String,
    /// Our number the message was sent to.
    #[serde(default)]
    pub to: String,
    /// The flow and step that produced the answer, if any.
    #[serde(default)]
    pub flow: Option<String>,
    /// The step within `flow` that produced the answer, if any.
    #[serde(default)]
    pub step: Option<String>,
    /// The inbound text, kept in the message log only when the operator
    /// chose `store_message_text` (else `None`).
    #[serde(default)]
    pub body: Option<String>,
    /// The texts of our replies, likewise (empty when not kept).
    #[serde(default)]
    pub replies: Vec<String>,
}

/// The latest known delivery status of a message we sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryStatus {
    /// Twilio's status name (`delivered`, `failed`, ...).
    pub status: String,
    /// Rank of `status`; a callback only replaces a record of lower rank.
    pub rank: u8,
    /// Twilio's `ErrorCode`, when delivery failed.
    pub error_code: Option<String>,
    /// The recipient of the message we sent.
    pub to: Option<String>,
    /// The number we sent it from.
    pub from: Option<String>,
    /// Unix seconds of the last accepted update.
    pub updated_at: i64,
    /// The inbound MessageSid this reply answered, and the flow and step
    /// that produced it (from the callback URL we put on the reply).
    #[serde(default)]
    pub inbound_sid: Option<String>,
    /// The flow that produced the reply, if known.
    #[serde(default)]
    pub flow: Option<String>,
    /// The step within `flow` that produced the reply, if known.
    #[serde(default)]
    pub step: Option<String>,
}

/// One status callback as received (the delivery log keeps all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    /// Twilio's status name in this callback.
    pub status: String,
    /// Twilio's `ErrorCode` in this callback, if any.
    pub error_code: Option<String>,
    /// Unix seconds when the callback was received.
    pub at: i64,
}

/// Consent state of one number towards one of our numbers (or Messaging
/// Service: the scope Twilio applies opt-outs to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptOut {
    /// Whether the number is opted out.
    pub opted_out: bool,
    /// Unix seconds of the last change.
    pub at: i64,
}

/// One consent change, kept for audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix seconds of the change.
    pub at: i64,
    /// Our number or Messaging Service the change applies to.
    pub scope: String,
    /// The sender's number.
    pub number: String,
    /// "opt_out" or "opt_in".
    pub action: String,
    /// What caused it: the keyword, `OptOutType=STOP`, or `error 21610`.
    pub cause: String,
    /// The inbound MessageSid that caused the change.
    pub message_sid: String,
}

/// A consent change to write with a commit or on its own.
#[derive(Debug, Clone)]
pub struct ConsentChange {
    /// Our number or Messaging Service the change applies to.
    pub scope: String,
    /// The sender's number.
    pub number: String,
    /// The new consent state.
    pub state: OptOut,
    /// The audit entry recorded with it.
    pub audit: AuditRecord,
}

/// What we answered to one recent inbound message of a conversation, kept
/// in the conversation record so a retried webhook replays it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentAnswer {
    /// The inbound MessageSid answered.
    pub sid: String,
    /// The exact TwiML document we answered with.
    pub twiml: String,
    /// Short outcome label for logs.
    pub outcome: String,
    /// Unix seconds when it was answered.
    pub at: i64,
}

/// How long, and for how many messages, a conversation remembers its
/// answers for retries. Twilio's whole budget for a webhook, retries
/// included, is 15 s (connection overrides cap `tt` at 15000 ms), so ten
/// minutes and the last 8 messages leave a wide margin while keeping the
/// record small: it is read and rewritten on every message.
pub const DEDUPE_WINDOW_SECS: i64 = 600;
/// At most this many recent answers are kept per conversation.
pub const DEDUPE_MAX_ANSWERS: usize = 8;

/// A conversation record as stored (any version, decoded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredConversation {
    /// The caller's conversation bytes; `None` when there is no state (only
    /// recent answers).
    pub conversation: Option<Vec<u8>>,
    /// When the conversation's next timer is due (unix seconds), as the
    /// last commit set it: the authoritative due time (the index by due
    /// time only points here).
    pub due: Option<i64>,
    /// The recent answers, still encoded: they are read on every message
    /// but decoded only for a retry, so they stay in a compact binary form
    /// (per entry: 8-byte time, then sid, outcome and TwiML, each behind
    /// its length, the TwiML without its constant parts) rather than JSON.
    pub recent: RecentAnswers,
}

/// A [`RecentAnswer`] borrowed from where it was made.
#[derive(Debug, Clone, Copy)]
pub(super) struct AnswerRef<'a> {
    pub(super) sid: &'a str,
    pub(super) twiml: &'a str,
    pub(super) outcome: &'a str,
    pub(super) at: i64,
}

/// Encoded recent answers (see [`StoredConversation::recent`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecentAnswers(pub(super) Vec<u8>);

/// One encoded entry: (time, sid, outcome, twiml as stored, the entry's
/// bytes).
pub(super) type RawAnswer<'a> = (i64, &'a [u8], &'a [u8], StoredTwiml<'a>, &'a [u8]);

/// Every TwiML document we answer with starts with this declaration.
const TWIML_PROLOG: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>";
/// What a document of replies has between [`TWIML_PROLOG`] and the end.
const TWIML_OPEN: &str = "<Response>";
const TWIML_CLOSE: &str = "</Response>";
/// Layout version 3: flags in the top bits of a recent answer's TwiML
/// length say which constant parts were left out (the lengths of real
/// answers are far below 2^30). 59 of the ~110 bytes of a one-message
/// answer are constant, and the conversation record, with its eight
/// answers, is rewritten (and its leaf copied and logged by sled) on every
/// message: the smaller record costs less CPU per message.
const ELIDED_PROLOG: u32 = 1 << 31;
/// With [`ELIDED_PROLOG`]: the stored part also sat inside
/// [`TWIML_OPEN`] and [`TWIML_CLOSE`].
const ELIDED_RESPONSE: u32 = 1 << 30;
const TWIML_LEN: u32 = ELIDED_RESPONSE - 1;

/// A recent answer's TwiML as stored: the part kept and what was left out
/// around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StoredTwiml<'a> {
    flags: u32,
    kept: &'a [u8],
}

impl StoredTwiml<'_> {
    /// The TwiML document, byte for byte as answered.
    fn document(&self) -> String {
        let kept = String::from_utf8_lossy(self.kept);
        match self.flags {
            0 => kept.into_owned(),
            ELIDED_PROLOG => format!("{TWIML_PROLOG}{kept}"),
            _ => format!("{TWIML_PROLOG}{TWIML_OPEN}{kept}{TWIML_CLOSE}"),
        }
    }

    /// How `twiml` is stored: its flags and the part kept.
    fn of(twiml: &str) -> (u32, &[u8]) {
        let Some(rest) = twiml.strip_prefix(TWIML_PROLOG) else {
            return (0, twiml.as_bytes());
        };
        match rest
            .strip_prefix(TWIML_OPEN)
            .and_then(|r| r.strip_suffix(TWIML_CLOSE))
        {
            Some(inner) => (ELIDED_PROLOG | ELIDED_RESPONSE, inner.as_bytes()),
            None => (ELIDED_PROLOG, rest.as_bytes()),
        }
    }
}

impl RecentAnswers {
    pub(super) fn entries(&self) -> impl Iterator<Item = RawAnswer<'_>> {
        let mut rest: &[u8] = &self.0;
        std::iter::from_fn(move || {
            let whole = rest;
            let at = i64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
            rest = &rest[8..];
            // Each field behind its length; the TwiML's length carries
            // its flags (layout version 3; none are set in older ones).
            let mut field = |flagged: bool| -> Option<(u32, &[u8])> {
                let raw = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
                let (flags, len) = match flagged {
                    true => (raw & !TWIML_LEN, (raw & TWIML_LEN) as usize),
                    false => (0, raw as usize),
                };
                if flags == ELIDED_RESPONSE {
                    return None;
                }
                let value = rest.get(4..4 + len)?;
                rest = &rest[4 + len..];
                Some((flags, value))
            };
            let ((_, sid), (_, outcome)) = (field(false)?, field(false)?);
            let (flags, kept) = field(true)?;
            let used = whole.len() - rest.len();
            let twiml = StoredTwiml { flags, kept };
            Some((at, sid, outcome, twiml, &whole[..used]))
        })
    }

    fn push(buf: &mut Vec<u8>, a: AnswerRef<'_>) {
        buf.extend_from_slice(&a.at.to_be_bytes());
        let (mut flags, mut twiml) = StoredTwiml::of(a.twiml);
        if twiml.len() > TWIML_LEN as usize {
            // Never for a real answer (a few KiB at most); stored whole
            // rather than cut, and a length this large then makes the
            // record fail to decode: kept aside, never misread.
            (flags, twiml) = (0, a.twiml.as_bytes());
        }
        let fields = [
            (0, a.sid.as_bytes()),
            (0, a.outcome.as_bytes()),
            (flags, twiml),
        ];
        for (flags, field) in fields {
            buf.extend_from_slice(&(flags | field.len() as u32).to_be_bytes());
            buf.extend_from_slice(field);
        }
    }

    /// The recorded answer to `sid`, if there is one.
    pub fn find(&self, sid: &str) -> Option<RecentAnswer> {
        self.entries().find(|(_, s, ..)| *s == sid.as_bytes()).map(
            |(at, sid, outcome, twiml, _)| RecentAnswer {
                sid: String::from_utf8_lossy(sid).into_owned(),
                outcome: String::from_utf8_lossy(outcome).into_owned(),
                twiml: twiml.document(),
                at,
            },
        )
    }

    /// How many answers are recorded.
    pub fn len(&self) -> usize {
        self.entries().count()
    }

    /// Whether the entries account for every byte (a damaged length field
    /// would end the walk early and hide the rest).
    fn is_well_formed(&self) -> bool {
        self.entries().map(|e| e.4.len()).sum::<usize>() == self.0.len()
    }

    /// Whether no answer is recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// These answers plus `new`, within the age and count bounds.
    #[cfg(test)]
    pub(super) fn keep_with(&self, new: &RecentAnswer) -> RecentAnswers {
        self.keep(AnswerRef {
            sid: &new.sid,
            twiml: &new.twiml,
            outcome: &new.outcome,
            at: new.at,
        })
    }

    /// [`RecentAnswers::keep_with`] of a borrowed answer (a commit's, with
    /// nothing copied but into the new record).
    pub(super) fn keep(&self, new: AnswerRef<'_>) -> RecentAnswers {
        let cutoff = new.at - DEDUPE_WINDOW_SECS;
        let kept: Vec<&[u8]> = self
            .entries()
            .filter(|(at, sid, ..)| *at >= cutoff && *sid != new.sid.as_bytes())
            .map(|(.., raw)| raw)
            .collect();
        let skip = (kept.len() + 1).saturating_sub(DEDUPE_MAX_ANSWERS);
        let mut buf = Vec::with_capacity(
            kept.iter().skip(skip).map(|r| r.len()).sum::<usize>() + 20 + new.twiml.len(),
        );
        for raw in kept.into_iter().skip(skip) {
            buf.extend_from_slice(raw);
        }
        Self::push(&mut buf, new);
        RecentAnswers(buf)
    }
}

impl StoredConversation {
    /// The recorded answer to `sid`, if this conversation gave one.
    pub fn answer_to(&self, sid: &str) -> Option<RecentAnswer> {
        self.recent.find(sid)
    }
}

pub(super) fn prefixed(prefix: &[u8], rest: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(rest.as_bytes());
    k
}

// The store's JSON records are versioned (see `crate::versioned`).
pub(super) use crate::versioned::{decode, encode};

impl Versioned for DeliveryStatus {
    const KIND: &'static str = "delivery status";
    const VERSION: u32 = 1;
}

impl Versioned for StatusEvent {
    const KIND: &'static str = "status event";
    const VERSION: u32 = 1;
}

impl Versioned for OptOut {
    const KIND: &'static str = "consent state";
    const VERSION: u32 = 1;
}

impl Versioned for AuditRecord {
    const KIND: &'static str = "consent audit record";
    const VERSION: u32 = 1;
}

/// Flag bits of a conversation record.
pub(super) const ENDED: u8 = 1;
pub(super) const HAS_CONVERSATION: u8 = 2;
/// Version 2: the record's due time is set (a timer is pending).
pub(super) const HAS_DUE: u8 = 4;

/// The layout version of the conversation records this release writes:
/// their first byte. Version 2 added the due time to the header; version
/// 3 stores the recent answers' TwiML without its constant parts (flags
/// in the length: see [`ELIDED_PROLOG`]). Version 3 reads version 2's
/// answers as they are (no flag set); a release before it refuses a
/// version 3 record instead of misreading the flags.
pub(super) const CONV_VERSION: u8 = 3;

/// Encode a conversation record: the version byte, then a 21-byte header
/// (last activity, flags, the next timer's due time, conversation length)
/// that lets purging, counting and the timer index work without knowing
/// the caller's format, the conversation, and the recent answers.
pub(super) fn conv_value(
    now: i64,
    ended: bool,
    conversation: Option<&[u8]>,
    due: Option<i64>,
    recent: &RecentAnswers,
) -> Vec<u8> {
    let conv = conversation.unwrap_or_default();
    let recent = &recent.0;
    let mut v = Vec::with_capacity(22 + conv.len() + recent.len());
    v.push(CONV_VERSION);
    v.extend_from_slice(&now.to_be_bytes());
    let mut flags = 0;
    if ended {
        flags |= ENDED;
    }
    if conversation.is_some() {
        flags |= HAS_CONVERSATION;
    }
    if due.is_some() {
        flags |= HAS_DUE;
    }
    v.push(flags);
    v.extend_from_slice(&due.unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&(conv.len() as u32).to_be_bytes());
    v.extend_from_slice(conv);
    v.extend_from_slice(recent);
    v
}

/// A conversation record's layout version and the bytes after its version
/// byte. Version 0, from releases before versions, has no version byte: it
/// starts with the big-endian last-activity time, whose first byte is 0x00
/// for any time from 1970 to the year 2 billion (0xFF before 1970), a
/// value no version byte takes. Version 1 is version 0 behind a version
/// byte; version 2 adds the due time after the flags; version 3 only flags
/// the recent answers' TwiML (see [`CONV_VERSION`]).
fn conv_version(v: &[u8]) -> Result<(u8, &[u8]), &'static str> {
    match v.first() {
        Some(&n) if (1..=CONV_VERSION).contains(&n) => Ok((n, &v[1..])),
        Some(0x00 | 0xFF) => Ok((0, v)),
        Some(_) => Err("unknown record version (written by a newer release?)"),
        None => Err("empty record"),
    }
}

/// The due time in a conversation record's header, if a timer is pending
/// (only records of version 2 and later have one).
pub(super) fn conv_due(v: &[u8]) -> Option<i64> {
    match conv_version(v).ok()? {
        (2.., body) if body.get(8)? & HAS_DUE != 0 => {
            Some(i64::from_be_bytes(body.get(9..17)?.try_into().ok()?))
        }
        _ => None,
    }
}

/// The timer index key: `t\0`, the due time (8 bytes big-endian, times
/// before 1970 as 0), then the conversation key after its own `c\0`
/// prefix: sled keeps them in due order.
pub(super) fn timer_key(due: i64, key: &ConvKey) -> Vec<u8> {
    let conv = key.db_key();
    let mut k = Vec::with_capacity(10 + conv.len());
    k.extend_from_slice(TIMER_PREFIX);
    k.extend_from_slice(&(due.max(0) as u64).to_be_bytes());
    k.extend_from_slice(&conv[2..]);
    k
}

/// The timer index's key prefix.
pub(super) const TIMER_PREFIX: &[u8] = b"t\0";

/// The due time and conversation of a timer index key.
pub(super) fn parse_timer_key(k: &[u8]) -> Option<(i64, ConvKey)> {
    let rest = k.strip_prefix(TIMER_PREFIX)?;
    let due = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?) as i64;
    let conv = &rest[8..];
    let split = conv.iter().position(|b| *b == 0)?;
    Some((
        due,
        ConvKey::new(
            String::from_utf8_lossy(&conv[..split]).into_owned(),
            String::from_utf8_lossy(&conv[split + 1..]).into_owned(),
        ),
    ))
}

/// (last activity, flags) of a conversation record of any version.
pub(super) fn conv_header(v: &[u8]) -> Option<(i64, u8)> {
    let (_, body) = conv_version(v).ok()?;
    let at = i64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    Some((at, *body.get(8)?))
}

/// Decode a conversation record's layout, of any version this release
/// reads, or say why it does not decode. (The conversation bytes inside
/// are the caller's to decode.)
pub(super) fn decode_conv(v: &[u8]) -> Result<StoredConversation, &'static str> {
    match conv_version(v)? {
        (0 | 1, body) => decode_conv_body(body, false),
        (2.., body) => decode_conv_body(body, true),
    }
}

/// The bytes after the version byte: header, conversation, recent
/// answers. Versions 0 and 1 have no due time in the header (no timers
/// existed); version 2 has it after the flags.
fn decode_conv_body(v: &[u8], has_due: bool) -> Result<StoredConversation, &'static str> {
    // 8 bytes of last activity, then the flags.
    let flags = *v.get(8).ok_or("short header")?;
    let known = if has_due {
        ENDED | HAS_CONVERSATION | HAS_DUE
    } else {
        ENDED | HAS_CONVERSATION
    };
    if flags & !known != 0 {
        return Err("unknown flags");
    }
    let mut at = 9;
    let mut due = None;
    if has_due {
        let raw = v
            .get(9..17)
            .and_then(|b| b.try_into().ok())
            .map(i64::from_be_bytes)
            .ok_or("short header")?;
        due = (flags & HAS_DUE != 0).then_some(raw);
        at = 17;
    }
    let len = v
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or("short header")? as usize;
    let start = at + 4;
    let conv = v.get(start..start + len).ok_or("truncated conversation")?;
    let recent = RecentAnswers(v[start + len..].to_vec());
    if !recent.is_well_formed() {
        return Err("malformed recent answers");
    }
    Ok(StoredConversation {
        conversation: (flags & HAS_CONVERSATION != 0).then(|| conv.to_vec()),
        due,
        recent,
    })
}

/// Whether a conversation record says it holds a conversation.
pub(super) fn has_conversation(v: &[u8]) -> bool {
    conv_header(v).is_some_and(|(_, f)| f & HAS_CONVERSATION != 0)
}

pub(super) fn two_part(prefix: &[u8], a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + a.len() + 1 + b.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}
