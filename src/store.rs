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
//! | `m\0` | `marker` | the last flush marker, 8 bytes big-endian (see below) |
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
//! durable: sled's flush (which only `sync_file_range`s its log), then an
//! `fdatasync` of sled's files ([`files`]). Flushes are grouped by the
//! store's [`Worker`] thread: while one sync runs, every caller that arrives
//! waits for the next one, so N concurrent webhooks cost about two syncs,
//! not N.
//!
//! Faults, never silent: sled's recovery drops everything after the first
//! damaged entry of its log without a word, so once a second (and at
//! shutdown) the worker writes a flush marker into the database and, once
//! it is on disk, its number into the `checkpoint` file; a database that
//! opens with an older marker is refused. A record that does not decode is
//! kept aside ([`quarantine`]) before anything replaces it. A write, flush
//! or fsync that fails marks the store failed (nothing is acknowledged);
//! sled then fails every later write, so the worker reopens the database
//! once the filesystem takes writes again, and an [`Epoch`] makes sure
//! nothing read or written before the reopen is acknowledged after it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::unix_now;
use quarantine::{describe_key, Quarantine};

mod files;
mod open;
mod quarantine;
mod worker;

pub use open::OpenError;
use open::{check_marker, closed, open_db, read_marker, Open};
use worker::Worker;

/// Errors from the storage backend. Callers map these to a 503-style
/// failure; they never carry user input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend error: {0}")]
    Backend(String),
    /// A read or write reached the disk and failed (a full disk, an I/O
    /// error): the store is marked failed until it has reopened itself.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// The store failed and has not recovered yet, or was reopened since
    /// the caller's writes (which may then be lost).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("storage flusher stopped")]
    FlusherGone,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(e) => StoreError::Io(e.to_string()),
            other => StoreError::Backend(other.to_string()),
        }
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

    /// Whether the entries account for every byte (a damaged length field
    /// would end the walk early and hide the rest).
    fn is_well_formed(&self) -> bool {
        self.entries().map(|e| e.4.len()).sum::<usize>() == self.0.len()
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
    /// The conversation record for `key` (empty if none). A record that
    /// does not decode is kept aside first, then read as empty.
    fn load(&self, key: &ConvKey) -> Result<StoredConversation, StoreError>;
    /// Keep the record stored for `key` aside (its conversation does not
    /// decode), before a commit replaces it. Fails if it cannot be kept;
    /// then nothing may replace it.
    fn keep_aside(&self, key: &ConvKey, reason: &str) -> Result<(), StoreError>;
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
    /// The store's current incarnation; read it before the reads and
    /// writes a [`Store::flush`] is to cover.
    fn epoch(&self) -> Epoch;
    /// Make everything committed so far durable (fsynced, in `flush`
    /// durability). Concurrent callers share one fsync. Fails when the
    /// store was reopened after a failure since `since` was read: what was
    /// read or written before may be gone.
    fn flush(
        &self,
        since: Epoch,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
    /// Offer a delivery status; applied only if it ranks above the stored
    /// one. Every callback is appended to the delivery log either way.
    fn record_status(
        &self,
        message_sid: &str,
        status: &DeliveryStatus,
    ) -> Result<StatusUpdate, StoreError>;
    /// The latest delivery status stored for a MessageSid.
    fn delivery_status(&self, message_sid: &str) -> Result<Option<DeliveryStatus>, StoreError>;
    /// Number of stored conversations holding state, in constant time.
    fn conversation_count(&self) -> usize;
    /// Writability, records kept aside and counts, in constant time.
    fn health(&self) -> StoreHealth;
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
    /// sled flushes in the background every 200 ms (and the store fsyncs
    /// once a second); a crash can lose the last steps answered.
    Relaxed,
}

/// Settings for opening the sled store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// sled page cache size in bytes.
    pub cache_bytes: u64,
    pub durability: Durability,
    /// Opening gives up after this long (sled's recovery can spin over a
    /// damaged file).
    pub open_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_bytes: 8 * 1024 * 1024,
            durability: Durability::Flush,
            open_timeout: Duration::from_secs(60),
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
    fn open(path: std::path::PathBuf) -> io::Result<Self> {
        let file = files::open_append(&path)?;
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
        files::write_durably(&self.path, &kept).map_err(io)?;
        let file = files::open_append(&self.path).map_err(io)?;
        *writer = std::io::BufWriter::with_capacity(64 * 1024, file);
        Ok(dropped)
    }
}

/// The sled-backed [`Store`].
pub struct SledStore {
    shared: Arc<Shared>,
    /// The store's own thread: grouped flushes, checkpoints, and reopening
    /// after a failure. Joined on drop, so the database is closed (and
    /// everything flushed) when a `SledStore` is gone.
    worker: Worker,
}

/// What the store's callers and its worker thread share.
struct Shared {
    dir: PathBuf,
    config: StoreConfig,
    /// The open database; `None` only while it is reopened after a
    /// failure. Operations hold the read lock for their duration, so a
    /// reopen never pulls the database from under one.
    db: RwLock<Option<Open>>,
    /// Bumped whenever the database is closed for a reopen: writes not yet
    /// flushed may be gone, so a flush for an older [`Epoch`] fails.
    generation: AtomicU64,
    log: MessageLog,
    quarantine: Quarantine,
    /// Conversations holding state: counted at open, then kept up to date
    /// by every write, so health checks never scan the store.
    conversations: AtomicI64,
    /// Set when a write, flush or fsync fails; cleared by a successful
    /// reopen. While set, nothing is acknowledged.
    failed: AtomicBool,
    failure: Mutex<Option<Failure>>,
    /// Writes since the last checkpoint.
    writes: AtomicU64,
    /// The last flush marker written to the database (see `checkpoint`).
    marker: AtomicU64,
    /// One checkpoint at a time (the worker, and a shutdown's final one).
    checkpointing: Mutex<()>,
    fsyncs: AtomicU64,
    reopens: AtomicU64,
}

#[derive(Debug, Clone)]
struct Failure {
    error: String,
    since: i64,
}

/// Names the store's current incarnation. After a failure the database is
/// reopened from disk, and writes made before that were not necessarily
/// flushed: a flush asked for with an older epoch fails, so nothing read
/// or written before a reopen is acknowledged after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

/// The store's state for health checks; every field is read in constant
/// time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    /// False while writes fail (full disk, I/O errors): webhooks get 503
    /// until the store has reopened itself.
    pub writable: bool,
    /// The failure, while there is one.
    pub error: Option<String>,
    /// Unix seconds when the current failure began.
    pub failed_since: Option<i64>,
    /// Undecodable records kept aside in `quarantine/`.
    pub quarantined: u64,
    /// Conversations holding state.
    pub conversations: usize,
    /// Times the store reopened itself after a failure.
    pub reopens: u64,
    /// Completed grouped fsyncs.
    pub fsyncs: u64,
}

/// The meta key holding the last flush marker (see `Shared::checkpoint`).
const MARKER_KEY: &[u8] = b"m\0marker";

impl SledStore {
    /// Open (or create) the store in `dir`, private to this user. Fails
    /// with a cause an operator can act on; never starts on a database
    /// that lost checkpointed data.
    pub fn open(dir: &Path, config: &StoreConfig) -> Result<Self, OpenError> {
        let created = files::create_private_dir(dir)
            .map_err(|e| OpenError::io("creating the data directory", dir, e))?;
        let expected = files::read_checkpoint(dir)
            .map_err(|e| OpenError::io("reading the checkpoint in", dir, e))?;
        let open = open_db(dir, config)?;
        let recovered = read_marker(&open.db).map_err(|e| OpenError::from_sled(dir, e))?;
        check_marker(dir, recovered, expected)?;
        let log = MessageLog::open(dir.join("messages.jsonl"))
            .map_err(|e| OpenError::io("opening the message log in", dir, e))?;
        // sled creates its files with the process's umask.
        match files::make_private(dir) {
            Ok(n) if n == 0 || created => {}
            Ok(n) => tracing::info!(
                dir = %dir.display(),
                entries = n,
                "made the data directory private (0700 directories, 0600 files)"
            ),
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "could not make the data directory private"
            ),
        }
        // The entries sled may just have created (db, conf, blobs).
        files::sync_dir(dir).map_err(|e| OpenError::io("syncing", dir, e))?;
        let quarantine = Quarantine::open(dir)
            .map_err(|e| OpenError::io("reading the quarantine in", dir, e))?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            config: config.clone(),
            db: RwLock::new(None),
            generation: AtomicU64::new(0),
            log,
            quarantine,
            conversations: AtomicI64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            writes: AtomicU64::new(0),
            marker: AtomicU64::new(recovered),
            checkpointing: Mutex::new(()),
            fsyncs: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
        });
        let count = shared.scan_conversations(&open.db).map_err(|e| match e {
            // Keeping an undecodable record aside failed (a full disk?).
            StoreError::Io(detail) => OpenError::Io {
                what: "reading the conversations in",
                path: dir.to_path_buf(),
                source: io::Error::other(detail),
            },
            other => OpenError::Damaged {
                dir: dir.to_path_buf(),
                detail: other.to_string(),
            },
        })?;
        shared.conversations.store(count, Ordering::Relaxed);
        *write(&shared.db) = Some(open);
        let worker = Worker::start(shared.clone());
        Ok(SledStore { shared, worker })
    }

    /// Blocking flush of everything, used at shutdown whatever the mode:
    /// synced to disk, then checkpointed.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.shared.sync()?;
        self.shared.checkpoint()
    }

    pub fn durability(&self) -> Durability {
        self.shared.config.durability
    }

    /// The store's health, in constant time.
    pub fn health(&self) -> StoreHealth {
        let failure = lock(&self.shared.failure).clone();
        StoreHealth {
            writable: failure.is_none(),
            error: failure.as_ref().map(|f| f.error.clone()),
            failed_since: failure.map(|f| f.since),
            quarantined: self.shared.quarantine.count(),
            conversations: self.shared.conversations.load(Ordering::Relaxed).max(0) as usize,
            reopens: self.shared.reopens.load(Ordering::Relaxed),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read(l: &RwLock<Option<Open>>) -> std::sync::RwLockReadGuard<'_, Option<Open>> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(l: &RwLock<Option<Open>>) -> std::sync::RwLockWriteGuard<'_, Option<Open>> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Run `f` on the open database. An I/O error marks the store failed
    /// (the worker then reopens it once writes succeed again).
    fn with_db<T>(
        &self,
        f: impl FnOnce(&sled::Db) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = read(&self.db);
        let open = guard.as_ref().ok_or_else(reopening)?;
        let result = f(&open.db);
        if let Err(StoreError::Io(e)) = &result {
            self.fail(e);
        }
        result
    }

    fn fail(&self, error: &str) {
        let mut failure = lock(&self.failure);
        if failure.is_none() {
            tracing::error!(
                dir = %self.dir.display(),
                error,
                "store failed: webhooks get 503 until writes succeed again (retried every second)"
            );
            *failure = Some(Failure {
                error: error.to_string(),
                since: unix_now(),
            });
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// One grouped flush: sled's flush, then fsyncs of its files. Returns
    /// the generation it made durable.
    fn sync(&self) -> Result<u64, StoreError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the store failed and is not reopened yet".into(),
            ));
        }
        // The log lines of these messages go to the file too (buffered
        // until now, not fsynced: informational).
        if let Err(e) = self.log.flush() {
            tracing::warn!(error = %e, "message log write failed");
        }
        let guard = read(&self.db);
        let open = guard.as_ref().ok_or_else(reopening)?;
        let generation = self.generation.load(Ordering::SeqCst);
        let synced = open.db.flush().map_err(StoreError::from).and_then(|_| {
            lock(&open.files)
                .sync()
                .map_err(|e| StoreError::Io(format!("fsync: {e}")))
        });
        if let Err(e) = &synced {
            self.fail(&e.to_string());
        }
        synced?;
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(generation)
    }

    /// Write the next flush marker into the database, make it durable,
    /// then record it in the checkpoint file. On open, a database holding
    /// an older marker than the file names has lost data that was on disk.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let _one = lock(&self.checkpointing);
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the store failed".into()));
        }
        let writes = self.writes.swap(0, Ordering::Relaxed);
        let seq = self.marker.load(Ordering::Relaxed) + 1;
        let result = self
            .with_db(|db| Ok(db.insert(MARKER_KEY, &seq.to_be_bytes())?))
            .and_then(|_| self.sync())
            .and_then(|_| {
                files::write_checkpoint(&self.dir, seq)
                    .map_err(|e| StoreError::Io(format!("writing the checkpoint: {e}")))
            });
        // sled creates snapshot files from time to time, with the
        // process's umask; the directory is private anyway, its files too.
        if let Err(e) = files::make_private(&self.dir) {
            tracing::debug!(error = %e, "could not make the data directory private");
        }
        match result {
            Ok(_) => {
                self.marker.store(seq, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.writes.fetch_add(writes.max(1), Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Reopen the database after a failure, once the filesystem takes
    /// writes again. sled keeps the first I/O error it meets and fails
    /// every later write with it, so only a reopen recovers; it rebuilds
    /// the state from what is on disk, which is everything acknowledged.
    fn heal(&self) -> Result<(), String> {
        files::probe_writable(&self.dir).map_err(|e| format!("probe write: {e}"))?;
        self.log.flush().map_err(|e| format!("message log: {e}"))?;
        let old = write(&self.db).take();
        if let Some(old) = old {
            self.generation.fetch_add(1, Ordering::SeqCst);
            drop(old);
            closed(&self.dir);
        }
        let open = open_db(&self.dir, &self.config).map_err(|e| e.to_string())?;
        let recovered = read_marker(&open.db).map_err(|e| e.to_string())?;
        let expected = files::read_checkpoint(&self.dir).map_err(|e| e.to_string())?;
        check_marker(&self.dir, recovered, expected).map_err(|e| e.to_string())?;
        let count = self
            .scan_conversations(&open.db)
            .map_err(|e| e.to_string())?;
        // Recovered only when a write reaches the disk.
        let seq = recovered + 1;
        open.db
            .insert(MARKER_KEY, &seq.to_be_bytes())
            .and_then(|_| open.db.flush())
            .map_err(|e| e.to_string())?;
        lock(&open.files).sync().map_err(|e| e.to_string())?;
        self.marker.store(seq, Ordering::Relaxed);
        self.conversations.store(count, Ordering::Relaxed);
        *write(&self.db) = Some(open);
        let was = lock(&self.failure).take();
        self.failed.store(false, Ordering::SeqCst);
        self.reopens.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            dir = %self.dir.display(),
            failed_for_secs = was.map(|f| unix_now() - f.since).unwrap_or(0),
            "store recovered: writes succeed again"
        );
        Ok(())
    }

    /// Count the conversations holding state and check every record's
    /// layout; undecodable records are kept aside (they stay in place
    /// until their conversation's next message replaces them).
    fn scan_conversations(&self, db: &sled::Db) -> Result<i64, StoreError> {
        let (mut count, mut damaged) = (0, 0);
        for item in db.scan_prefix(b"c\0") {
            let (k, v) = item?;
            count += i64::from(has_conversation(&v));
            if let Err(reason) = decode_conv(&v) {
                damaged += 1;
                self.keep_aside(&k, &v, reason, "the conversation starts afresh")?;
            }
        }
        if damaged > 0 {
            tracing::error!(
                dir = %self.dir.display(),
                damaged,
                quarantined = self.quarantine.count(),
                "undecodable conversation records found at open (kept aside in quarantine/)"
            );
        }
        Ok(count)
    }

    /// Keep an undecodable record aside before anything replaces it; if
    /// that fails, the caller must not replace it (the error says so).
    fn keep_aside(
        &self,
        key: &[u8],
        value: &[u8],
        reason: &str,
        then: &str,
    ) -> Result<(), StoreError> {
        match self.quarantine.keep(key, value, reason) {
            Ok((path, true)) => {
                tracing::error!(
                    record = %describe_key(key),
                    reason,
                    kept_in = %path.display(),
                    then,
                    "undecodable record kept aside"
                );
                Ok(())
            }
            Ok((_, false)) => Ok(()),
            Err(e) => Err(StoreError::Io(format!(
                "keeping an undecodable record ({}) aside: {e}",
                describe_key(key)
            ))),
        }
    }

    fn count_change(&self, old: Option<&[u8]>, new: Option<&[u8]>) {
        let delta = i64::from(new.is_some_and(has_conversation))
            - i64::from(old.is_some_and(has_conversation));
        if delta != 0 {
            self.conversations.fetch_add(delta, Ordering::Relaxed);
        }
        self.wrote();
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// A clean close: whatever the durability mode, nothing is lost.
    fn close(&self) {
        if self.failed.load(Ordering::SeqCst) {
            let _ = self.log.flush();
            tracing::error!(dir = %self.dir.display(), "store closed while failed");
            return;
        }
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "final store flush failed");
        } else if self.writes.load(Ordering::Relaxed) > 0 {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "final checkpoint failed");
            }
        }
    }
}

fn reopening() -> StoreError {
    StoreError::Unavailable("the store is being reopened after a failure".into())
}

impl Drop for Shared {
    fn drop(&mut self) {
        let open = self
            .db
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(open) = open {
            drop(open);
            closed(&self.dir);
        }
    }
}

fn prefixed(prefix: &[u8], rest: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(rest.as_bytes());
    k
}

/// A JSON record, or why it does not decode.
fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
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

/// Decode a conversation record's layout, or say why it does not decode.
/// (The conversation bytes inside are the caller's to decode.)
fn decode_conv(v: &[u8]) -> Result<StoredConversation, &'static str> {
    let (_, flags) = conv_header(v).ok_or("short header")?;
    if flags & !(ENDED | HAS_CONVERSATION) != 0 {
        return Err("unknown flags");
    }
    let len = v
        .get(9..13)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or("short header")? as usize;
    let conv = v.get(13..13 + len).ok_or("truncated conversation")?;
    let recent = RecentAnswers(v[13 + len..].to_vec());
    if !recent.is_well_formed() {
        return Err("malformed recent answers");
    }
    Ok(StoredConversation {
        conversation: (flags & HAS_CONVERSATION != 0).then(|| conv.to_vec()),
        recent,
    })
}

/// Whether a conversation record says it holds a conversation.
fn has_conversation(v: &[u8]) -> bool {
    conv_header(v).is_some_and(|(_, f)| f & HAS_CONVERSATION != 0)
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
    fn scan<T: for<'de> Deserialize<'de>>(
        &self,
        db: &sled::Db,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let mut out = Vec::new();
        for item in db.scan_prefix(prefix) {
            let (k, v) = item?;
            match decode(&v) {
                Ok(value) => out.push((k.to_vec(), value)),
                Err(reason) => {
                    self.shared
                        .keep_aside(&k, &v, &reason, "it is left out of listings")?
                }
            }
        }
        Ok(out)
    }

    /// The entries a consent change writes: the state and its audit record.
    fn consent_entries(db: &sled::Db, change: &ConsentChange) -> Result<[Entry; 2], StoreError> {
        let mut audit_key = Vec::with_capacity(18);
        audit_key.extend_from_slice(b"a\0");
        audit_key.extend_from_slice(&change.audit.at.to_be_bytes());
        audit_key.extend_from_slice(&db.generate_id()?.to_be_bytes());
        Ok([
            (
                two_part(b"o\0", &change.scope, &change.number),
                encode(&change.state),
            ),
            (audit_key, encode(&change.audit)),
        ])
    }
}

/// A raw key and value to write.
type Entry = (Vec<u8>, Vec<u8>);

fn transaction_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => e.into(),
        sled::transaction::TransactionError::Abort(()) => {
            StoreError::Backend("transaction aborted".into())
        }
    }
}

impl Store for SledStore {
    fn load(&self, key: &ConvKey) -> Result<StoredConversation, StoreError> {
        let k = key.db_key();
        self.shared.with_db(|db| match db.get(&k)? {
            Some(v) => match decode_conv(&v) {
                Ok(stored) => Ok(stored),
                Err(reason) => {
                    self.shared
                        .keep_aside(&k, &v, reason, "the conversation starts afresh")?;
                    Ok(StoredConversation::default())
                }
            },
            None => Ok(StoredConversation::default()),
        })
    }

    fn keep_aside(&self, key: &ConvKey, reason: &str) -> Result<(), StoreError> {
        let k = key.db_key();
        self.shared.with_db(|db| match db.get(&k)? {
            Some(v) => self
                .shared
                .keep_aside(&k, &v, reason, "the conversation starts afresh"),
            None => Ok(()),
        })
    }

    fn processed(&self, message_sid: &str) -> Result<Option<Processed>, StoreError> {
        Ok(self
            .shared
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
        let k = c.key.db_key();
        let old = self.shared.with_db(|db| match &c.consent {
            // Rare, and must be atomic with the message: a transaction
            // (which also tells us what it replaced).
            Some(change) => {
                let [state, audit] = Self::consent_entries(db, change)?;
                db.transaction(|tx| {
                    let old = tx.insert(k.as_slice(), record.as_slice())?;
                    tx.insert(state.0.as_slice(), state.1.as_slice())?;
                    tx.insert(audit.0.as_slice(), audit.1.as_slice())?;
                    Ok(old)
                })
                .map_err(transaction_error)
            }
            // The common case: one insert carries state and dedupe.
            None => Ok(db.insert(&k, record.as_slice())?),
        })?;
        self.shared.count_change(old.as_deref(), Some(&record));
        let p = c.processed;
        self.shared.log.append(&LogLine {
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

    fn epoch(&self) -> Epoch {
        Epoch(self.shared.generation.load(Ordering::SeqCst))
    }

    async fn flush(&self, since: Epoch) -> Result<(), StoreError> {
        match self.shared.config.durability {
            Durability::Flush => self.worker.flush(since).await,
            // sled's own flusher writes in the background; only a reopen
            // (which may have dropped unflushed writes) is reported.
            Durability::Relaxed => {
                if self.shared.failed.load(Ordering::SeqCst) || self.epoch() != since {
                    return Err(reopened());
                }
                Ok(())
            }
        }
    }

    fn record_status(
        &self,
        message_sid: &str,
        status: &DeliveryStatus,
    ) -> Result<StatusUpdate, StoreError> {
        self.shared.with_db(|db| {
            let mut log_key = two_part(b"l\0", message_sid, "");
            log_key.extend_from_slice(&db.generate_id()?.to_be_bytes());
            let event = StatusEvent {
                status: status.status.clone(),
                error_code: status.error_code.clone(),
                at: status.updated_at,
            };
            db.insert(log_key, encode(&event))?;
            self.shared.wrote();

            let key = prefixed(b"s\0", message_sid);
            // Compare-and-swap loop: two callbacks for one message arriving
            // at once must not let the lower-ranked one win.
            loop {
                let current = db.get(&key)?;
                let mut next = status.clone();
                if let Some(bytes) = &current {
                    match decode::<DeliveryStatus>(bytes) {
                        Ok(old) => {
                            if status.rank <= old.rank {
                                return Ok(StatusUpdate::Stale {
                                    current: old.status,
                                });
                            }
                            // Keep the link to the conversation if this
                            // callback lacks it.
                            next.inbound_sid = next.inbound_sid.or(old.inbound_sid);
                            next.flow = next.flow.or(old.flow);
                            next.step = next.step.or(old.step);
                        }
                        Err(reason) => self.shared.keep_aside(
                            &key,
                            bytes,
                            &reason,
                            "this callback's status replaces it",
                        )?,
                    }
                }
                let new = encode(&next);
                if db
                    .compare_and_swap(&key, current.as_ref(), Some(new.as_slice()))?
                    .is_ok()
                {
                    return Ok(StatusUpdate::Applied);
                }
            }
        })
    }

    fn delivery_status(&self, message_sid: &str) -> Result<Option<DeliveryStatus>, StoreError> {
        let key = prefixed(b"s\0", message_sid);
        self.shared.with_db(|db| match db.get(&key)? {
            Some(v) => match decode(&v) {
                Ok(status) => Ok(Some(status)),
                Err(reason) => {
                    self.shared
                        .keep_aside(&key, &v, &reason, "it reads as unknown")?;
                    Ok(None)
                }
            },
            None => Ok(None),
        })
    }

    fn conversation_count(&self) -> usize {
        self.shared.conversations.load(Ordering::Relaxed).max(0) as usize
    }

    fn health(&self) -> StoreHealth {
        SledStore::health(self)
    }

    fn opt_out(&self, scope: &str, number: &str) -> Result<Option<OptOut>, StoreError> {
        let key = two_part(b"o\0", scope, number);
        self.shared.with_db(|db| match db.get(&key)? {
            Some(v) => match decode(&v) {
                Ok(state) => Ok(Some(state)),
                // Never text someone who may have opted out: an unreadable
                // consent record counts as an opt-out (START clears it).
                Err(reason) => {
                    self.shared.keep_aside(
                        &key,
                        &v,
                        &reason,
                        "the number is treated as opted out until it texts START",
                    )?;
                    Ok(Some(OptOut {
                        opted_out: true,
                        at: 0,
                    }))
                }
            },
            None => Ok(None),
        })
    }

    fn record_consent(&self, change: &ConsentChange) -> Result<(), StoreError> {
        self.shared.with_db(|db| {
            let mut batch = sled::Batch::default();
            for (k, v) in Self::consent_entries(db, change)? {
                batch.insert(k, v);
            }
            db.apply_batch(batch)?;
            Ok(())
        })?;
        self.shared.wrote();
        Ok(())
    }

    fn audit_log(&self) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = self.shared.with_db(|db| self.scan(db, b"a\0"))?;
        Ok(rows.into_iter().map(|(_, v)| v).collect())
    }

    fn status_events(&self, message_sid: &str) -> Result<Vec<StatusEvent>, StoreError> {
        let prefix = two_part(b"l\0", message_sid, "");
        let rows = self.shared.with_db(|db| self.scan(db, &prefix))?;
        Ok(rows.into_iter().map(|(_, v)| v).collect())
    }

    fn inbound_log(&self) -> Result<Vec<(String, Processed)>, StoreError> {
        let mut out: Vec<(String, Processed)> = self
            .shared
            .log
            .read()?
            .into_iter()
            .map(LogLine::into_processed)
            .collect();
        out.sort_by(|a, b| b.1.at.cmp(&a.1.at).then_with(|| b.0.cmp(&a.0)));
        Ok(out)
    }

    fn outbound_log(&self) -> Result<Vec<(String, DeliveryStatus)>, StoreError> {
        let rows = self
            .shared
            .with_db(|db| self.scan::<DeliveryStatus>(db, b"s\0"))?;
        let mut out: Vec<(String, DeliveryStatus)> = rows
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
            processed: self.shared.log.purge(cutoff)?,
            ..Purged::default()
        };
        self.shared.with_db(|db| {
            for (k, v) in self.scan::<DeliveryStatus>(db, b"s\0")? {
                if v.updated_at < cutoff {
                    db.remove(k)?;
                    purged.statuses += 1;
                }
            }
            for (k, v) in self.scan::<StatusEvent>(db, b"l\0")? {
                if v.at < cutoff {
                    db.remove(k)?;
                    purged.status_events += 1;
                }
            }
            for item in db.scan_prefix(b"c\0") {
                let (k, v) = item?;
                if let Some((at, flags)) = conv_header(&v) {
                    let idle = flags & ENDED != 0 || flags & HAS_CONVERSATION == 0;
                    // Only if untouched since we read it: a message may
                    // have restarted this conversation in the meantime.
                    if idle
                        && at < cutoff
                        && db
                            .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)?
                            .is_ok()
                    {
                        self.shared.count_change(Some(&v), None);
                        purged.conversations += 1;
                    }
                }
            }
            Ok(())
        })?;
        if purged != Purged::default() {
            self.shared.wrote();
        }
        Ok(purged)
    }

    fn delete_conversation(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let k = key.db_key();
        self.shared.with_db(|db| {
            let Some(v) = db.get(&k)? else {
                return Ok(false);
            };
            let (at, _) = conv_header(&v).unwrap_or_default();
            let stored = match decode_conv(&v) {
                Ok(stored) => stored,
                Err(reason) => {
                    self.shared
                        .keep_aside(&k, &v, reason, "the conversation is deleted")?;
                    StoredConversation::default()
                }
            };
            let new = conv_value(at, true, None, &stored.recent);
            let old = db.insert(&k, new.as_slice())?;
            self.shared.count_change(old.as_deref(), Some(&new));
            Ok(stored.conversation.is_some())
        })
    }

    fn put_conversation(
        &self,
        key: &ConvKey,
        conversation: &[u8],
        ended: bool,
        at: i64,
    ) -> Result<(), StoreError> {
        let k = key.db_key();
        self.shared.with_db(|db| {
            let recent = match db.get(&k)? {
                Some(v) => match decode_conv(&v) {
                    Ok(stored) => stored.recent,
                    Err(reason) => {
                        self.shared
                            .keep_aside(&k, &v, reason, "the conversation is replaced")?;
                        RecentAnswers::default()
                    }
                },
                None => RecentAnswers::default(),
            };
            let new = conv_value(at, ended, Some(conversation), &recent);
            let old = db.insert(&k, new.as_slice())?;
            self.shared.count_change(old.as_deref(), Some(&new));
            Ok(())
        })
    }
}

fn reopened() -> StoreError {
    StoreError::Unavailable(
        "the store was reopened after a failure; writes before it may be lost".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Instant;

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
            store.flush(store.epoch()).await.unwrap();
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
            tasks.push(tokio::spawn(async move { s.flush(s.epoch()).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }

    /// Count conversations the slow way, for comparison.
    fn recount(store: &SledStore) -> usize {
        store
            .shared
            .with_db(|db| {
                Ok(db
                    .scan_prefix(b"c\0")
                    .filter_map(Result::ok)
                    .filter(|(_, v)| has_conversation(v))
                    .count())
            })
            .unwrap()
    }

    fn opt_out_change(number: &str) -> ConsentChange {
        ConsentChange {
            scope: "+1".into(),
            number: number.into(),
            state: OptOut {
                opted_out: true,
                at: 1,
            },
            audit: AuditRecord {
                at: 1,
                scope: "+1".into(),
                number: number.into(),
                action: "opt_out".into(),
                cause: "STOP".into(),
                message_sid: "SMx".into(),
            },
        }
    }

    #[test]
    fn the_conversation_count_is_maintained_not_scanned() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let (old, new) = (processed(100), processed(1000));
        let keys: Vec<ConvKey> = (0..6)
            .map(|i| ConvKey::new("+1", format!("+{i}")))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            let mut c = commit(k, Some(b"{}"), "SMa", if i < 3 { &old } else { &new });
            c.ended = i % 2 == 0;
            store.commit(c).unwrap();
        }
        assert_eq!(store.conversation_count(), 6);
        // A commit without state, one with a consent change, a rewrite.
        store.commit(commit(&keys[0], None, "SMb", &old)).unwrap();
        let mut stop = commit(&keys[1], None, "SMc", &old);
        stop.consent = Some(opt_out_change("+1"));
        store.commit(stop).unwrap();
        store
            .commit(commit(&keys[3], Some(b"{}"), "SMd", &new))
            .unwrap();
        assert_eq!(store.conversation_count(), 4);
        assert_eq!(store.conversation_count(), recount(&store));
        assert!(store.delete_conversation(&keys[4]).unwrap());
        assert_eq!(store.conversation_count(), 3);
        store.purge(500).unwrap();
        assert_eq!(store.conversation_count(), recount(&store));
        assert_eq!(store.conversation_count(), 2);
        drop(store);
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(store.conversation_count(), 2);
        assert_eq!(store.health().conversations, 2);
    }

    /// Rewrite one raw record with sled itself, as a damaged disk or a
    /// buggy older version would have left it.
    fn damage(dir: &Path, key: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let db = (0..500)
            .find_map(|_| match sled::Config::new().path(dir).open() {
                Ok(db) => Some(db),
                Err(_) => {
                    thread::sleep(Duration::from_millis(20));
                    None
                }
            })
            .expect("sled reopens");
        let mut v = db.get(key).unwrap().expect("record present").to_vec();
        edit(&mut v);
        db.insert(key, v.as_slice()).unwrap();
        db.flush().unwrap();
        v
    }

    #[test]
    fn an_undecodable_record_is_kept_aside_before_it_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let key = ConvKey::new("+1555", "+1666");
        {
            let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
            store
                .commit(commit(
                    &key,
                    Some(b"{\"name\":\"Ada\"}"),
                    "SM1",
                    &processed(1),
                ))
                .unwrap();
        }
        // An unknown flag bit: the layout does not decode.
        let damaged = damage(dir.path(), &key.db_key(), |v| v[8] |= 0x80);
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        // Found while counting at open, kept aside, still in place.
        assert_eq!(store.health().quarantined, 1);
        let kept = std::fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>();
        assert_eq!(kept.len(), 1);
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&kept[0]).unwrap()).unwrap();
        use base64::Engine as _;
        let value = base64::engine::general_purpose::STANDARD
            .decode(record["value_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(value, damaged);
        assert_eq!(record["reason"], "unknown flags");
        // Reading it again keeps nothing twice; the conversation reads as
        // empty only now that its bytes are safe.
        assert_eq!(store.load(&key).unwrap(), StoredConversation::default());
        assert_eq!(store.health().quarantined, 1);
        store
            .commit(commit(&key, Some(b"{}"), "SM2", &processed(2)))
            .unwrap();
        assert_eq!(
            store.conversation(&key).unwrap().as_deref(),
            Some(&b"{}"[..])
        );
    }

    #[test]
    fn an_unreadable_consent_record_counts_as_an_opt_out() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
            let mut change = opt_out_change("+1666");
            change.state.opted_out = false;
            store.record_consent(&change).unwrap();
        }
        damage(dir.path(), &two_part(b"o\0", "+1", "+1666"), |v| {
            v.truncate(3)
        });
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        assert!(store.opt_out("+1", "+1666").unwrap().unwrap().opted_out);
        assert_eq!(store.health().quarantined, 1);
    }

    #[test]
    fn a_database_that_lost_checkpointed_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
            for i in 0..300 {
                let key = ConvKey::new("+1555", format!("+1{i:09}"));
                store
                    .commit(commit(&key, Some(b"{\"fields\":{}}"), "SM1", &processed(1)))
                    .unwrap();
            }
        }
        // sled's recovery stops at the first damaged entry and drops the
        // rest without a word; the checkpoint notices.
        let db = dir.path().join("db");
        let len = std::fs::metadata(&db).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let err = SledStore::open(dir.path(), &StoreConfig::default())
            .err()
            .expect("a truncated store is refused");
        assert!(
            matches!(err, OpenError::LostData { .. } | OpenError::Damaged { .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("restore the directory from a backup"),
            "{err}"
        );
        // Refused again: nothing was reset by the first attempt.
        assert!(SledStore::open(dir.path(), &StoreConfig::default()).is_err());
    }

    #[test]
    fn open_failures_name_their_cause() {
        let dir = tempfile::tempdir().unwrap();
        let first = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let started = Instant::now();
        let err = SledStore::open(dir.path(), &StoreConfig::default())
            .err()
            .expect("a held store is refused");
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a lock held by someone else fails fast"
        );
        drop(first);

        let denied = OpenError::from_sled(
            dir.path(),
            sled::Error::Io(io::Error::from(io::ErrorKind::PermissionDenied)),
        );
        assert!(
            denied.to_string().starts_with("permission denied on"),
            "{denied}"
        );
        let damaged = OpenError::from_sled(
            dir.path(),
            sled::Error::Corruption {
                at: None,
                bt: Default::default(),
            },
        );
        assert!(damaged.to_string().contains("is damaged"), "{damaged}");

        // A recovery that does not end is an error, not a hung start.
        let config = StoreConfig {
            open_timeout: Duration::ZERO,
            ..StoreConfig::default()
        };
        let other = tempfile::tempdir().unwrap();
        let err = SledStore::open(other.path(), &config)
            .err()
            .expect("times out");
        assert!(matches!(err, OpenError::TimedOut { .. }), "{err}");
    }
}
