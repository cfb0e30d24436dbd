//! Persistent state: conversations, dedupe records and delivery statuses.
//!
//! This is the only module that knows sled. Everything above it talks to the
//! [`Store`] trait in terms of opaque, already-serialised records, so another
//! backend can be added without touching the pipeline. It knows nothing of
//! HTTP, Rhai or the flow format.
//!
//! Layout: one sled tree with key prefixes:
//!
//! | prefix | key | value |
//! | --- | --- | --- |
//! | `c\0` | to `\0` from | the conversation record: 8-byte big-endian last activity, 1 flag byte, 4-byte length, the conversation (caller's bytes), then the recent answers (JSON) |
//! | `s\0` | MessageSid | [`DeliveryStatus`]: latest status of a message we sent |
//! | `l\0` | MessageSid `\0` id | [`StatusEvent`]: every status callback received |
//! | `o\0` | scope `\0` number | [`OptOut`]: current consent state |
//! | `a\0` | 8-byte time, 8-byte id | [`AuditRecord`]: every consent change |
//!
//! Atomicity without batches: the conversation and the answers recently
//! given to that sender ([`RecentAnswer`], what a retried MessageSid
//! replays) live in ONE value, so a message's state change and its dedupe
//! record are a single insert. A sled batch would force a synchronous log
//! write per message (measured: 5-6x slower than an insert). Only a consent
//! change, which must be atomic with its message and is rare, uses a batch.
//!
//! The inbound message log is not in sled: it is an append-only JSON-lines
//! file (`messages.jsonl` beside the database). A new sled key per message
//! cost about a third of the server's throughput (tree growth and node
//! splits); appending a line to a buffered file costs next to nothing. The
//! log is informational: it is written after the record, flushed to the
//! file with each grouped flush (not fsynced), and a crash can lose its
//! last lines, never conversation state. It holds sender, number, outcome,
//! flow and step, not the TwiML.
//!
//! Durability: [`Store::commit`] writes; [`Store::flush`] makes it
//! durable. Flushes are grouped by [`GroupFlusher`]: while one fsync runs,
//! every caller that arrives waits for the next one, so N concurrent webhooks
//! cost about two fsyncs, not N.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Errors from the storage backend. Callers map these to a 503-style
/// failure; they never carry user input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend error: {0}")]
    Backend(String),
    #[error("corrupt record under {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("storage flusher stopped")]
    FlusherGone,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// The conversation key: one conversation per (our number, their number).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConvKey {
    pub to: String,
    pub from: String,
}

impl ConvKey {
    pub fn new(to: impl Into<String>, from: impl Into<String>) -> Self {
        ConvKey {
            to: to.into(),
            from: from.into(),
        }
    }

    fn db_key(&self) -> Vec<u8> {
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
    #[serde(default)]
    pub to: String,
    /// The flow and step that produced the answer, if any.
    #[serde(default)]
    pub flow: Option<String>,
    #[serde(default)]
    pub step: Option<String>,
}

/// The latest known delivery status of a message we sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryStatus {
    pub status: String,
    /// Rank of `status`; a callback only replaces a record of lower rank.
    pub rank: u8,
    pub error_code: Option<String>,
    pub to: Option<String>,
    pub from: Option<String>,
    /// Unix seconds of the last accepted update.
    pub updated_at: i64,
    /// The inbound MessageSid this reply answered, and the flow and step
    /// that produced it (from the callback URL we put on the reply).
    #[serde(default)]
    pub inbound_sid: Option<String>,
    #[serde(default)]
    pub flow: Option<String>,
    #[serde(default)]
    pub step: Option<String>,
}

/// One status callback as received (the delivery log keeps all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub status: String,
    pub error_code: Option<String>,
    pub at: i64,
}

/// Consent state of one number towards one of our numbers (or Messaging
/// Service: the scope Twilio applies opt-outs to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptOut {
    pub opted_out: bool,
    pub at: i64,
}

/// One consent change, kept for audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at: i64,
    pub scope: String,
    pub number: String,
    /// "opt_out" or "opt_in".
    pub action: String,
    /// What caused it: the keyword, `OptOutType=STOP`, or `error 21610`.
    pub cause: String,
    pub message_sid: String,
}

/// A consent change to write with a commit or on its own.
#[derive(Debug, Clone)]
pub struct ConsentChange {
    pub scope: String,
    pub number: String,
    pub state: OptOut,
    pub audit: AuditRecord,
}

/// What we answered to one recent inbound message of a conversation, kept
/// in the conversation record so a retried webhook replays it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentAnswer {
    pub sid: String,
    pub twiml: String,
    pub outcome: String,
    pub at: i64,
}

/// How long, and for how many messages, a conversation remembers its
/// answers for retries. Twilio's whole budget for a webhook, retries
/// included, is 15 s (connection overrides cap `tt` at 15000 ms), so ten
/// minutes and the last 8 messages leave a wide margin while keeping the
/// record small: it is read and rewritten on every message.
pub const DEDUPE_WINDOW_SECS: i64 = 600;
pub const DEDUPE_MAX_ANSWERS: usize = 8;

/// A conversation record as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredConversation {
    /// The caller's conversation bytes; `None` when there is no state (only
    /// recent answers).
    pub conversation: Option<Vec<u8>>,
    /// The recent answers, still encoded: they are read on every message
    /// but decoded only for a retry, so they stay in a compact binary form
    /// (per entry: 8-byte time, then sid, outcome and TwiML, each behind
    /// its length) rather than JSON.
    pub recent: RecentAnswers,
}

/// Encoded recent answers (see [`StoredConversation::recent`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecentAnswers(Vec<u8>);

/// One encoded entry: (time, sid, outcome, twiml, the entry's bytes).
type RawAnswer<'a> = (i64, &'a [u8], &'a [u8], &'a [u8], &'a [u8]);

impl RecentAnswers {
    fn entries(&self) -> impl Iterator<Item = RawAnswer<'_>> {
        let mut rest: &[u8] = &self.0;
        std::iter::from_fn(move || {
            let whole = rest;
            let at = i64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
            rest = &rest[8..];
            let mut field = || -> Option<&[u8]> {
                let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                let value = rest.get(4..4 + len)?;
                rest = &rest[4 + len..];
                Some(value)
            };
            let (sid, outcome, twiml) = (field()?, field()?, field()?);
            let used = whole.len() - rest.len();
            Some((at, sid, outcome, twiml, &whole[..used]))
        })
    }

    fn push(buf: &mut Vec<u8>, a: &RecentAnswer) {
        buf.extend_from_slice(&a.at.to_be_bytes());
        for field in [a.sid.as_bytes(), a.outcome.as_bytes(), a.twiml.as_bytes()] {
            buf.extend_from_slice(&(field.len() as u32).to_be_bytes());
            buf.extend_from_slice(field);
        }
    }

    /// The recorded answer to `sid`, if there is one.
    pub fn find(&self, sid: &str) -> Option<RecentAnswer> {
        self.entries().find(|(_, s, ..)| *s == sid.as_bytes()).map(
            |(at, sid, outcome, twiml, _)| RecentAnswer {
                sid: String::from_utf8_lossy(sid).into_owned(),
                outcome: String::from_utf8_lossy(outcome).into_owned(),
                twiml: String::from_utf8_lossy(twiml).into_owned(),
                at,
            },
        )
    }

    pub fn len(&self) -> usize {
        self.entries().count()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// These answers plus `new`, within the age and count bounds.
    fn keep_with(&self, new: &RecentAnswer) -> RecentAnswers {
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

/// Everything one processed inbound message changes, written atomically.
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    pub key: &'a ConvKey,
    /// The new conversation, or `None` when there is no state to keep.
    pub conversation: Option<&'a [u8]>,
    /// Whether the conversation has no running flow (purgeable when idle).
    pub ended: bool,
    /// The answers recorded before this message (from [`Store::load`],
    /// read under the conversation's lock); the new one is added to them.
    pub recent: &'a RecentAnswers,
    pub message_sid: &'a str,
    pub processed: &'a Processed,
    pub consent: Option<ConsentChange>,
}

/// How many records a purge removed, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub processed: usize,
    pub statuses: usize,
    pub status_events: usize,
    pub conversations: usize,
}

/// Result of offering a status callback to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusUpdate {
    /// The callback advanced the status (or was the first one).
    Applied,
    /// An equal or later status was already stored; nothing changed.
    Stale { current: String },
}

/// The storage interface the pipeline relies on.
///
/// Implementations must make [`Store::commit`] atomic: either both the
/// conversation and the dedupe record are written, or neither.
pub trait Store: Send + Sync + 'static {
    /// The conversation record for `key` (empty if none).
    fn load(&self, key: &ConvKey) -> Result<StoredConversation, StoreError>;
    /// The stored conversation bytes for `key`, if any.
    fn conversation(&self, key: &ConvKey) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.load(key)?.conversation)
    }
    /// The message log entry of an inbound MessageSid, if it was processed.
    fn processed(&self, message_sid: &str) -> Result<Option<Processed>, StoreError>;
    /// Atomically store the new conversation, its answer to this message
    /// (for retries) and any consent change; then the log entry. Not yet
    /// durable: see `flush`.
    fn commit(&self, commit: Commit<'_>) -> Result<(), StoreError>;
    /// Make everything committed so far durable. Concurrent callers share
    /// one fsync.
    fn flush(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
    /// Offer a delivery status; applied only if it ranks above the stored
    /// one. Every callback is appended to the delivery log either way.
    fn record_status(
        &self,
        message_sid: &str,
        status: &DeliveryStatus,
    ) -> Result<StatusUpdate, StoreError>;
    /// The latest delivery status stored for a MessageSid.
    fn delivery_status(&self, message_sid: &str) -> Result<Option<DeliveryStatus>, StoreError>;
    /// Number of stored conversations (for status pages and tests).
    fn conversation_count(&self) -> usize;
    /// The current consent state of `number` within `scope`.
    fn opt_out(&self, scope: &str, number: &str) -> Result<Option<OptOut>, StoreError>;
    /// Record a consent change outside a message commit (status callbacks).
    fn record_consent(&self, change: &ConsentChange) -> Result<(), StoreError>;
    /// Consent changes, oldest first.
    fn audit_log(&self) -> Result<Vec<AuditRecord>, StoreError>;
    /// Every status callback received for a message, in arrival order.
    fn status_events(&self, message_sid: &str) -> Result<Vec<StatusEvent>, StoreError>;
    /// Inbound messages we answered, newest first (MessageSid, record).
    fn inbound_log(&self) -> Result<Vec<(String, Processed)>, StoreError>;
    /// Outbound messages with a known status, newest first.
    fn outbound_log(&self) -> Result<Vec<(String, DeliveryStatus)>, StoreError>;
    /// Remove dedupe records, delivery records and ended conversations last
    /// touched before `cutoff` (unix seconds). Consent records are kept.
    fn purge(&self, cutoff: i64) -> Result<Purged, StoreError>;
    /// Delete the conversation for `key` (contact fields and run); returns
    /// whether one was stored. Recorded answers stay, so a retried
    /// MessageSid still gets its answer. Not yet durable: see `flush`. Used
    /// by authoring tools; the webhook path changes state through `commit`.
    fn delete_conversation(&self, key: &ConvKey) -> Result<bool, StoreError>;
    /// Replace the conversation for `key` (`ended`: no flow running), keeping
    /// its recorded answers; `at` is its last-touched time. Not yet durable:
    /// see `flush`. Used by authoring tools (a transcript's seeded state);
    /// the webhook path changes state through `commit`.
    fn put_conversation(
        &self,
        key: &ConvKey,
        conversation: &[u8],
        ended: bool,
        at: i64,
    ) -> Result<(), StoreError>;
}

/// How hard a commit tries to reach the disk before we answer Twilio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every state change is fsynced (grouped) before the reply goes out.
    #[default]
    Flush,
    /// sled flushes in the background every `flush_every_ms`; a crash can
    /// lose the last few hundred milliseconds of conversation steps.
    Relaxed,
}

/// Settings for opening the sled store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// sled page cache size in bytes.
    pub cache_bytes: u64,
    pub durability: Durability,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_bytes: 8 * 1024 * 1024,
            durability: Durability::Flush,
        }
    }
}

/// One line of the inbound message log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LogLine {
    sid: String,
    at: i64,
    from: String,
    to: String,
    outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    flow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    step: Option<String>,
}

impl LogLine {
    fn into_processed(self) -> (String, Processed) {
        (
            self.sid,
            Processed {
                twiml: String::new(),
                outcome: self.outcome,
                at: self.at,
                from: self.from,
                to: self.to,
                flow: self.flow,
                step: self.step,
            },
        )
    }
}

/// The append-only inbound message log file.
struct MessageLog {
    path: std::path::PathBuf,
    writer: std::sync::Mutex<std::io::BufWriter<std::fs::File>>,
}

impl MessageLog {
    fn open(path: std::path::PathBuf) -> Result<Self, StoreError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        Ok(MessageLog {
            path,
            writer: std::sync::Mutex::new(std::io::BufWriter::with_capacity(64 * 1024, file)),
        })
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, std::io::BufWriter<std::fs::File>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, line: &LogLine) -> Result<(), StoreError> {
        use std::io::Write;
        let mut bytes = encode(line);
        bytes.push(b'\n');
        self.writer()
            .write_all(&bytes)
            .map_err(|e| StoreError::Backend(format!("writing the message log: {e}")))
    }

    /// Hand buffered lines to the OS (not an fsync: the log is
    /// informational).
    fn flush(&self) -> Result<(), StoreError> {
        use std::io::Write;
        self.writer()
            .flush()
            .map_err(|e| StoreError::Backend(format!("writing the message log: {e}")))
    }

    /// Every readable line, oldest first. A torn last line (a crash mid
    /// write) is skipped.
    fn read(&self) -> Result<Vec<LogLine>, StoreError> {
        self.flush()?;
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(StoreError::Backend(format!("reading the message log: {e}"))),
        };
        Ok(text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect())
    }

    /// Rewrite the file without lines older than `cutoff`; returns how many
    /// were dropped.
    fn purge(&self, cutoff: i64) -> Result<usize, StoreError> {
        use std::io::Write;
        let io = |e: std::io::Error| StoreError::Backend(format!("purging the message log: {e}"));
        let mut writer = self.writer();
        writer.flush().map_err(io)?;
        let lines = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(e)),
        };
        let mut kept = Vec::with_capacity(lines.len());
        let mut dropped = 0;
        for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<LogLine>(line) {
                Ok(l) if l.at < cutoff => dropped += 1,
                Ok(_) => {
                    kept.extend_from_slice(line);
                    kept.push(b'\n');
                }
                Err(_) => dropped += 1,
            }
        }
        if dropped == 0 {
            return Ok(0);
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, &kept).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        *writer = std::io::BufWriter::with_capacity(64 * 1024, file);
        Ok(dropped)
    }
}

/// The sled-backed [`Store`].
pub struct SledStore {
    db: sled::Db,
    log: Arc<MessageLog>,
    durability: Durability,
    /// Grouped fsyncs; `None` in relaxed mode, where sled's own background
    /// flusher is the durability mechanism.
    flusher: Option<GroupFlusher>,
}

impl SledStore {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path, config: &StoreConfig) -> Result<Self, StoreError> {
        let flush_every = match config.durability {
            Durability::Flush => None,
            Durability::Relaxed => Some(200),
        };
        let sled_config = sled::Config::new()
            .path(dir)
            .cache_capacity(config.cache_bytes)
            .flush_every_ms(flush_every)
            .mode(sled::Mode::HighThroughput);
        // Reopening in the same process right after a store was dropped (a
        // restart in tests, the chat's reload) can find the file lock still
        // held by sled's background threads finishing their writes, for
        // seconds on a starved machine; wait rather than fail. Another
        // process holding it still fails, after about ten seconds.
        let mut attempts = 0;
        let db = loop {
            match sled_config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock && attempts < 500 =>
                {
                    attempts += 1;
                    thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let log = Arc::new(MessageLog::open(dir.join("messages.jsonl"))?);
        let flusher = match config.durability {
            Durability::Flush => Some(GroupFlusher::start(db.clone(), log.clone())),
            Durability::Relaxed => None,
        };
        Ok(SledStore {
            db,
            log,
            durability: config.durability,
            flusher,
        })
    }

    /// Blocking flush of everything, used at shutdown whatever the mode.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.log.flush()?;
        self.db.flush()?;
        Ok(())
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }
}

fn prefixed(prefix: &[u8], rest: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(rest.as_bytes());
    k
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Flag bits of a conversation record.
const ENDED: u8 = 1;
const HAS_CONVERSATION: u8 = 2;

/// Encode a conversation record. The 13-byte header (last activity, flags,
/// conversation length) lets purging and counting work without knowing
/// the caller's format.
fn conv_value(
    now: i64,
    ended: bool,
    conversation: Option<&[u8]>,
    recent: &RecentAnswers,
) -> Vec<u8> {
    let conv = conversation.unwrap_or_default();
    let recent = &recent.0;
    let mut v = Vec::with_capacity(13 + conv.len() + recent.len());
    v.extend_from_slice(&now.to_be_bytes());
    let mut flags = 0;
    if ended {
        flags |= ENDED;
    }
    if conversation.is_some() {
        flags |= HAS_CONVERSATION;
    }
    v.push(flags);
    v.extend_from_slice(&(conv.len() as u32).to_be_bytes());
    v.extend_from_slice(conv);
    v.extend_from_slice(recent);
    v
}

/// (last activity, flags) of a conversation record.
fn conv_header(v: &[u8]) -> Option<(i64, u8)> {
    let at = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    Some((at, *v.get(8)?))
}

fn decode_conv(key: &[u8], v: &[u8]) -> Result<StoredConversation, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: reason.to_string(),
    };
    let (_, flags) = conv_header(v).ok_or_else(|| corrupt("short header"))?;
    let len = v
        .get(9..13)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| corrupt("short header"))? as usize;
    let conv = v.get(13..13 + len).ok_or_else(|| corrupt("truncated"))?;
    let recent = RecentAnswers(v[13 + len..].to_vec());
    Ok(StoredConversation {
        conversation: (flags & HAS_CONVERSATION != 0).then(|| conv.to_vec()),
        recent,
    })
}

fn two_part(prefix: &[u8], a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + a.len() + 1 + b.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

impl SledStore {
    fn add_consent(
        &self,
        batch: &mut sled::Batch,
        change: &ConsentChange,
    ) -> Result<(), StoreError> {
        batch.insert(
            two_part(b"o\0", &change.scope, &change.number),
            encode(&change.state),
        );
        let mut key = Vec::with_capacity(18);
        key.extend_from_slice(b"a\0");
        key.extend_from_slice(&change.audit.at.to_be_bytes());
        key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        batch.insert(key, encode(&change.audit));
        Ok(())
    }

    fn scan<T: for<'de> Deserialize<'de>>(
        &self,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(prefix) {
            let (k, v) = item?;
            out.push((k.to_vec(), decode(&k, &v)?));
        }
        Ok(out)
    }
}

impl Store for SledStore {
    fn load(&self, key: &ConvKey) -> Result<StoredConversation, StoreError> {
        let k = key.db_key();
        match self.db.get(&k)? {
            Some(v) => decode_conv(&k, &v),
            None => Ok(StoredConversation::default()),
        }
    }

    fn processed(&self, message_sid: &str) -> Result<Option<Processed>, StoreError> {
        Ok(self
            .log
            .read()?
            .into_iter()
            .rev()
            .find(|l| l.sid == message_sid)
            .map(|l| l.into_processed().1))
    }

    fn commit(&self, c: Commit<'_>) -> Result<(), StoreError> {
        let answer = RecentAnswer {
            sid: c.message_sid.to_string(),
            twiml: c.processed.twiml.clone(),
            outcome: c.processed.outcome.clone(),
            at: c.processed.at,
        };
        let recent = c.recent.keep_with(&answer);
        let record = conv_value(c.processed.at, c.ended, c.conversation, &recent);
        match &c.consent {
            // Rare, and must be atomic with the message: a batch.
            Some(change) => {
                let mut batch = sled::Batch::default();
                batch.insert(c.key.db_key(), record);
                self.add_consent(&mut batch, change)?;
                self.db.apply_batch(batch)?;
            }
            // The common case: one insert carries state and dedupe.
            None => {
                self.db.insert(c.key.db_key(), record)?;
            }
        }
        let p = c.processed;
        self.log.append(&LogLine {
            sid: c.message_sid.to_string(),
            at: p.at,
            from: p.from.clone(),
            to: p.to.clone(),
            outcome: p.outcome.clone(),
            flow: p.flow.clone(),
            step: p.step.clone(),
        })?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        match &self.flusher {
            Some(f) => f.flush().await,
            None => Ok(()),
        }
    }

    fn record_status(
        &self,
        message_sid: &str,
        status: &DeliveryStatus,
    ) -> Result<StatusUpdate, StoreError> {
        let mut log_key = two_part(b"l\0", message_sid, "");
        log_key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        let event = StatusEvent {
            status: status.status.clone(),
            error_code: status.error_code.clone(),
            at: status.updated_at,
        };
        self.db.insert(log_key, encode(&event))?;

        let key = prefixed(b"s\0", message_sid);
        // Compare-and-swap loop: two callbacks for one message arriving at
        // once must not let the lower-ranked one win.
        loop {
            let current = self.db.get(&key)?;
            let mut next = status.clone();
            if let Some(bytes) = &current {
                let old: DeliveryStatus = decode(&key, bytes)?;
                if status.rank <= old.rank {
                    return Ok(StatusUpdate::Stale {
                        current: old.status,
                    });
                }
                // Keep the link to the conversation if this callback lacks it.
                next.inbound_sid = next.inbound_sid.or(old.inbound_sid);
                next.flow = next.flow.or(old.flow);
                next.step = next.step.or(old.step);
            }
            let new = encode(&next);
            match self
                .db
                .compare_and_swap(&key, current.as_ref(), Some(new.as_slice()))?
            {
                Ok(()) => return Ok(StatusUpdate::Applied),
                Err(_) => continue,
            }
        }
    }

    fn delivery_status(&self, message_sid: &str) -> Result<Option<DeliveryStatus>, StoreError> {
        let key = prefixed(b"s\0", message_sid);
        match self.db.get(&key)? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    fn conversation_count(&self) -> usize {
        self.db
            .scan_prefix(b"c\0")
            .filter_map(Result::ok)
            .filter(|(_, v)| conv_header(v).is_some_and(|(_, f)| f & HAS_CONVERSATION != 0))
            .count()
    }

    fn opt_out(&self, scope: &str, number: &str) -> Result<Option<OptOut>, StoreError> {
        let key = two_part(b"o\0", scope, number);
        match self.db.get(&key)? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    fn record_consent(&self, change: &ConsentChange) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        self.add_consent(&mut batch, change)?;
        self.db.apply_batch(batch)?;
        Ok(())
    }

    fn audit_log(&self) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(self.scan(b"a\0")?.into_iter().map(|(_, v)| v).collect())
    }

    fn status_events(&self, message_sid: &str) -> Result<Vec<StatusEvent>, StoreError> {
        let prefix = two_part(b"l\0", message_sid, "");
        Ok(self.scan(&prefix)?.into_iter().map(|(_, v)| v).collect())
    }

    fn inbound_log(&self) -> Result<Vec<(String, Processed)>, StoreError> {
        let mut out: Vec<(String, Processed)> = self
            .log
            .read()?
            .into_iter()
            .map(LogLine::into_processed)
            .collect();
        out.sort_by(|a, b| b.1.at.cmp(&a.1.at).then_with(|| b.0.cmp(&a.0)));
        Ok(out)
    }

    fn outbound_log(&self) -> Result<Vec<(String, DeliveryStatus)>, StoreError> {
        let mut out: Vec<(String, DeliveryStatus)> = self
            .scan::<DeliveryStatus>(b"s\0")?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k[2..]).into_owned(), v))
            .collect();
        out.sort_by(|a, b| {
            b.1.updated_at
                .cmp(&a.1.updated_at)
                .then_with(|| b.0.cmp(&a.0))
        });
        Ok(out)
    }

    fn purge(&self, cutoff: i64) -> Result<Purged, StoreError> {
        let mut purged = Purged {
            processed: self.log.purge(cutoff)?,
            ..Purged::default()
        };
        for (k, v) in self.scan::<DeliveryStatus>(b"s\0")? {
            if v.updated_at < cutoff {
                self.db.remove(k)?;
                purged.statuses += 1;
            }
        }
        for (k, v) in self.scan::<StatusEvent>(b"l\0")? {
            if v.at < cutoff {
                self.db.remove(k)?;
                purged.status_events += 1;
            }
        }
        for item in self.db.scan_prefix(b"c\0") {
            let (k, v) = item?;
            if let Some((at, flags)) = conv_header(&v) {
                let idle = flags & ENDED != 0 || flags & HAS_CONVERSATION == 0;
                if idle && at < cutoff {
                    // Only if untouched since we read it: a message may have
                    // restarted this conversation in the meantime.
                    if self
                        .db
                        .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)?
                        .is_ok()
                    {
                        purged.conversations += 1;
                    }
                }
            }
        }
        Ok(purged)
    }

    fn delete_conversation(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let k = key.db_key();
        let Some(v) = self.db.get(&k)? else {
            return Ok(false);
        };
        let (at, _) = conv_header(&v).unwrap_or_default();
        let stored = decode_conv(&k, &v)?;
        self.db
            .insert(&k, conv_value(at, true, None, &stored.recent))?;
        Ok(stored.conversation.is_some())
    }

    fn put_conversation(
        &self,
        key: &ConvKey,
        conversation: &[u8],
        ended: bool,
        at: i64,
    ) -> Result<(), StoreError> {
        let k = key.db_key();
        let recent = match self.db.get(&k)? {
            Some(v) => decode_conv(&k, &v)?.recent,
            None => RecentAnswers::default(),
        };
        self.db
            .insert(&k, conv_value(at, ended, Some(conversation), &recent))?;
        Ok(())
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Whatever the durability mode, a clean shutdown loses nothing.
        if let Err(e) = self.log.flush() {
            tracing::error!(error = %e, "final message log flush failed");
        }
        if let Err(e) = self.db.flush() {
            tracing::error!(error = %e, "final store flush failed");
        }
    }
}

type FlushReply = oneshot::Sender<Result<(), String>>;

/// Group commit: one thread performs fsyncs; every request that arrives while
/// a flush is running is answered by the next flush, so concurrent webhooks
/// share disk syncs instead of queueing one each.
struct GroupFlusher {
    /// `None` once dropped, which ends the thread's receive loop.
    tx: Option<mpsc::Sender<FlushReply>>,
    /// Joined on drop so the thread's handle on the database is gone before
    /// anyone reopens the same directory.
    thread: Option<thread::JoinHandle<()>>,
}

impl GroupFlusher {
    fn start(db: sled::Db, log: Arc<MessageLog>) -> Self {
        let (tx, rx) = mpsc::channel::<FlushReply>();
        let spawned = thread::Builder::new()
            .name("smsflow-flusher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    // The log lines of these messages go to the file too
                    // (buffered until now, not fsynced: informational).
                    if let Err(e) = log.flush() {
                        tracing::warn!(error = %e, "message log write failed");
                    }
                    let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
            });
        let thread = match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Without the thread every flush reports FlusherGone, which the
                // pipeline turns into a 503: loud, and nothing is acknowledged.
                tracing::error!(error = %e, "could not start the flusher thread");
                None
            }
        };
        GroupFlusher {
            tx: Some(tx),
            thread,
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or(StoreError::FlusherGone)?
            .send(reply)
            .map_err(|_| StoreError::FlusherGone)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Backend(e)),
            Err(_) => Err(StoreError::FlusherGone),
        }
    }
}

impl Drop for GroupFlusher {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        (dir, store)
    }

    fn status(s: &str, rank: u8) -> DeliveryStatus {
        DeliveryStatus {
            status: s.into(),
            rank,
            error_code: None,
            to: None,
            from: None,
            updated_at: 0,
            inbound_sid: None,
            flow: None,
            step: None,
        }
    }

    fn processed(at: i64) -> Processed {
        Processed {
            twiml: "<Response/>".into(),
            outcome: "silence".into(),
            at,
            from: "+1666".into(),
            to: "+1555".into(),
            flow: None,
            step: None,
        }
    }

    static EMPTY: RecentAnswers = RecentAnswers(Vec::new());

    fn commit<'a>(
        key: &'a ConvKey,
        conversation: Option<&'a [u8]>,
        sid: &'a str,
        processed: &'a Processed,
    ) -> Commit<'a> {
        Commit {
            key,
            conversation,
            ended: true,
            recent: &EMPTY,
            message_sid: sid,
            processed,
            consent: None,
        }
    }

    #[test]
    fn a_commit_records_its_answer_in_the_conversation() {
        let (_d, store) = open();
        let key = ConvKey::new("+1", "+2");
        let mut p = processed(10);
        p.twiml = "<first/>".into();
        store
            .commit(commit(&key, Some(b"{\"a\":1}"), "SM1", &p))
            .unwrap();
        let rec = store.load(&key).unwrap();
        assert_eq!(rec.conversation.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(rec.answer_to("SM1").unwrap().twiml, "<first/>");
        // The next commit keeps earlier answers (within the bounds).
        let mut c = commit(&key, None, "SM2", &p);
        c.recent = &rec.recent;
        store.commit(c).unwrap();
        let rec = store.load(&key).unwrap();
        assert_eq!(rec.conversation, None);
        assert!(rec.answer_to("SM1").is_some());
        assert!(rec.answer_to("SM2").is_some());
        assert_eq!(store.conversation_count(), 0);
    }

    #[test]
    fn recent_answers_are_bounded_by_age_and_count() {
        let answer = |sid: &str, at: i64| RecentAnswer {
            sid: sid.into(),
            twiml: String::new(),
            outcome: String::new(),
            at,
        };
        let mut r = RecentAnswers::default();
        for a in [answer("SMold", 0), answer("SMmid", DEDUPE_WINDOW_SECS)] {
            r = r.keep_with(&a);
        }
        let kept = r.keep_with(&answer("SMnew", DEDUPE_WINDOW_SECS + 10));
        let sids: Vec<String> = kept
            .entries()
            .map(|(_, sid, ..)| String::from_utf8_lossy(sid).into_owned())
            .collect();
        assert_eq!(sids, vec!["SMmid", "SMnew"]);
        let mut r = RecentAnswers::default();
        for i in 0..100 {
            r = r.keep_with(&answer(&format!("SM{i}"), 5));
        }
        let kept = r.keep_with(&answer("SMlast", 6));
        assert_eq!(kept.len(), DEDUPE_MAX_ANSWERS);
        assert!(kept.find("SMlast").is_some());
        assert!(kept.find("SM99").is_some());
        assert!(kept.find("SM0").is_none());
        // A retried sid replaces its entry rather than adding one.
        let again = kept.keep_with(&answer("SMlast", 7));
        assert_eq!(again.len(), DEDUPE_MAX_ANSWERS);
    }

    #[test]
    fn purge_removes_old_records_and_ended_conversations_only() {
        let (_d, store) = open();
        let (old, new) = (processed(100), processed(1000));
        let k_old = ConvKey::new("+1", "+old");
        let k_run = ConvKey::new("+1", "+running");
        let k_new = ConvKey::new("+1", "+new");
        store
            .commit(commit(&k_old, Some(b"{}"), "SM1", &old))
            .unwrap();
        let mut running = commit(&k_run, Some(b"{}"), "SM2", &old);
        running.ended = false;
        running.consent = Some(ConsentChange {
            scope: "+1".into(),
            number: "+running".into(),
            state: OptOut {
                opted_out: true,
                at: 100,
            },
            audit: AuditRecord {
                at: 100,
                scope: "+1".into(),
                number: "+running".into(),
                action: "opt_out".into(),
                cause: "STOP".into(),
                message_sid: "SM2".into(),
            },
        });
        store.commit(running).unwrap();
        store
            .commit(commit(&k_new, Some(b"{}"), "SM3", &new))
            .unwrap();
        let mut st = status("sent", 3);
        st.updated_at = 100;
        store.record_status("SMout", &st).unwrap();

        let purged = store.purge(500).unwrap();
        assert_eq!(
            purged,
            Purged {
                processed: 2,
                statuses: 1,
                status_events: 1,
                conversations: 1
            }
        );
        assert!(store.conversation(&k_old).unwrap().is_none());
        assert!(store.conversation(&k_run).unwrap().is_some());
        assert!(store.conversation(&k_new).unwrap().is_some());
        assert!(store.processed("SM3").unwrap().is_some());
        // Consent is never purged.
        assert!(store.opt_out("+1", "+running").unwrap().unwrap().opted_out);
        assert_eq!(store.audit_log().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn commit_is_visible_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = ConvKey::new("+1555", "+1666");
        let rec = processed(1);
        {
            let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
            store
                .commit(commit(&key, Some(b"{}"), "SM1", &rec))
                .unwrap();
            store.flush().await.unwrap();
        }
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(
            store.conversation(&key).unwrap().as_deref(),
            Some(&b"{}"[..])
        );
        // The log keeps everything but the TwiML (the record has that).
        let logged = store.processed("SM1").unwrap().unwrap();
        assert_eq!(logged.outcome, rec.outcome);
        assert_eq!(
            (logged.from, logged.to, logged.at),
            (rec.from, rec.to, rec.at)
        );
        assert_eq!(
            store.load(&key).unwrap().answer_to("SM1").unwrap().twiml,
            rec.twiml
        );
        assert_eq!(store.conversation_count(), 1);
    }

    #[test]
    fn keys_do_not_collide_across_numbers() {
        let (_d, store) = open();
        let rec = processed(0);
        let (k1, k2) = (ConvKey::new("+1", "+23"), ConvKey::new("+12", "+3"));
        store.commit(commit(&k1, Some(b"a"), "SM1", &rec)).unwrap();
        store.commit(commit(&k2, Some(b"b"), "SM2", &rec)).unwrap();
        assert_eq!(
            store.conversation(&ConvKey::new("+1", "+23")).unwrap(),
            Some(b"a".to_vec())
        );
        assert_eq!(
            store.conversation(&ConvKey::new("+12", "+3")).unwrap(),
            Some(b"b".to_vec())
        );
    }

    #[test]
    fn delete_conversation_removes_only_that_key() {
        let (_d, store) = open();
        let rec = processed(0);
        let a = ConvKey::new("+1", "+2");
        let b = ConvKey::new("+1", "+3");
        store.commit(commit(&a, Some(b"a"), "SM1", &rec)).unwrap();
        store.commit(commit(&b, Some(b"b"), "SM2", &rec)).unwrap();
        assert!(store.delete_conversation(&a).unwrap());
        assert!(!store.delete_conversation(&a).unwrap());
        assert_eq!(store.conversation(&a).unwrap(), None);
        assert_eq!(store.conversation(&b).unwrap(), Some(b"b".to_vec()));
        // The dedupe record outlives the conversation.
        assert!(store.processed("SM1").unwrap().is_some());
    }

    #[test]
    fn status_is_monotonic() {
        let (_d, store) = open();
        assert_eq!(
            store.record_status("SM1", &status("sent", 3)).unwrap(),
            StatusUpdate::Applied
        );
        assert_eq!(
            store.record_status("SM1", &status("delivered", 5)).unwrap(),
            StatusUpdate::Applied
        );
        assert_eq!(
            store.record_status("SM1", &status("sent", 3)).unwrap(),
            StatusUpdate::Stale {
                current: "delivered".into()
            }
        );
        assert_eq!(
            store.delivery_status("SM1").unwrap().unwrap().status,
            "delivered"
        );
    }

    #[tokio::test]
    async fn concurrent_flushes_all_complete() {
        let (_d, store) = open();
        let store = std::sync::Arc::new(store);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move { s.flush().await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
}
