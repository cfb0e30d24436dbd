//! Persistent state: conversations, dedupe records, delivery statuses,
//! the outbox, flow results.
//!
//! This is the only module that knows sled and PostgreSQL. Everything
//! above it talks to the [`Store`] trait in terms of opaque,
//! already-serialised records, so the pipeline does not know which backend
//! it runs on. It knows nothing of HTTP, Rhai or the flow format.
//!
//! Two backends implement the trait, with the same semantics (one
//! conformance suite, `tests/it/conformance.rs`, runs against both):
//! [`SledStore`], embedded, the default, one process; and [`PgStore`]
//! (`pg/`), PostgreSQL, several instances on one database, whose tables
//! hold the same records (`pg/migrations/`). [`AnyStore`] is the one the
//! server holds: whichever `--store` chose. Conversations are serialised
//! by the pipeline's in-process lock, and across processes by
//! [`Store::lock_conversation`] (PostgreSQL: a session advisory lock, on
//! whose session the conversation's writes then commit, so a holder that
//! lost it cannot commit).
//!
//! sled's layout: one sled tree with key prefixes:
//!
//! | prefix | key | value |
//! | --- | --- | --- |
//! | `c\0` | to `\0` from | the conversation record: 1 version byte, 8-byte big-endian last activity, 1 flag byte, 8-byte due time of its next timer (version 2), 4-byte length, the conversation (the caller's bytes: versioned JSON of a `flow::Conversation`), then the recent answers (per answer: 8-byte time, then sid, outcome and TwiML, each behind a 4-byte length) |
//! | `s\0` | MessageSid | [`DeliveryStatus`]: latest status of a message we sent |
//! | `l\0` | MessageSid `\0` id | [`StatusEvent`]: every status callback received |
//! | `o\0` | scope `\0` number | [`OptOut`]: current consent state |
//! | `a\0` | 8-byte time, 8-byte id | [`AuditRecord`]: every consent change |
//! | `m\0` | `marker` | the last flush marker, 8 bytes big-endian (see below) |
//! | `t\0` | 8-byte big-endian due time, to `\0` from | nothing: the index of pending timers by due time; the conversation record's due time is authoritative (see "Timers") |
//! | `x\0` | outbox key | [`OutboxEntry`]: a message we send on our own, recorded before it is sent (`outbox.rs`) |
//! | `y\0` | 8-byte not_before, outbox key | empty: the due index of pending outbox entries (`outbox.rs`) |
//! | `y\x01` | outbox key | empty: the index of outbox entries being sent |
//! | `g\0` | tally name (a broadcast's id) | [`OutboxTally`]: how many of its outbox entries are in each state, written with each of them (`tallies.rs`); `m\0tallies` says they were counted |
//! | `h\0` | call job key | [`CallJob`]: an after-answer HTTP call, recorded before the answer and made by the call worker (`call_jobs.rs`) |
//! | `i\0` | 8-byte not_before, call job key | empty: the due index of pending call jobs |
//! | `f\0` | idempotency key | [`StartRecord`]: the result of a flow start (`starts.rs`) |
//! | `r\0` | flow `\0` 8-byte start time, to `\0` from `\0` 2-byte position | [`RunResult`]: what one ended flow run collected (`results.rs`), for about a second: then moved to `results/` (below) |
//!
//! Every key above is in sled's default tree except the flow results
//! (`r\0`): they are in the tree `results` of their own (`results.rs`
//! says why). Rows an older release wrote to the default tree are read
//! and moved on from there.
//!
//! # Format versions
//!
//! The stored format is a contract with every data directory already
//! written: a release reads what earlier releases wrote, and a change to a
//! record never makes a sender's conversation silently start afresh.
//!
//! - Every record says its version. A conversation record starts with its
//!   layout version byte (now 3: version 2 added the due time of the
//!   conversation's next timer to the header, version 3 stores the recent
//!   answers' TwiML without its constant parts); JSON records (the
//!   conversation inside it, now at version 3: version 2 added the run's
//!   timer fields, version 3 its path of steps and the queued starts; the
//!   lines of `messages.jsonl`, at version 2, which added the message
//!   texts; the lines of `results/<flow>.jsonl`, which are [`RunResult`]
//!   records with their position `"n"` and follow its version;
//!   [`DeliveryStatus`], [`StatusEvent`], [`OptOut`],
//!   [`AuditRecord`], [`OutboxEntry`], [`StartRecord`], [`OutboxTally`],
//!   [`RunResult`], at version 1) start with `"v":N`, written and read by
//!   `crate::versioned`. Records from before versions (version 0) have
//!   neither; each is version 1's shape without it and still reads.
//! - Decode by version, migrate on read: a reader dispatches on the version
//!   and turns an older record into the current value (for JSON, one
//!   `Versioned::upgrade` step per version); the record is rewritten in the current version the next time
//!   it is written anyway. Nothing is rewritten in bulk at startup.
//! - A record that does not decode, including one of a version newer than
//!   this release reads (after a downgrade), is kept aside in `quarantine/`
//!   before anything replaces it, logged and counted; a consent record that
//!   does not decode reads as opted out.
//! - To change a format: bump that kind's version, add the migration from
//!   the previous version (an `upgrade` arm, or an arm in
//!   `records::decode_conv` for the conversation layout), keep every older
//!   version's golden records under `src/store/golden/` decoding, and
//!   commit the new version's (`SMSFLOW_WRITE_GOLDEN=1 cargo test --lib
//!   golden` writes the missing files). The keys, the flush marker and the
//!   `checkpoint` file are fixed formats: changing one means a new key or
//!   file name, read alongside the old.
//!
//! # Timers
//!
//! A conversation's next timer (a waiting step's `timeout:`, a script's
//! wake) is due at the time in its record's header, written by the same
//! insert as the step that set it. The `t\0` index finds due timers
//! without scanning conversations: a commit writes the new index entry
//! first, then the record, then removes the old entry, so a crash leaves
//! at most a stale entry, never a pending timer without one. A stale entry
//! is harmless: firing re-reads the record, which says what is really
//! due, and the entry is removed then. The number of records with a due
//! time is counted at open and kept up to date by every write, like the
//! conversation count.
//!
//! Campaigns add no records: a contact's next campaign event is its
//! conversation's due time (the earlier of it and the run's timer), and a
//! fired event is a [`StartRecord`] under a key made of campaign, event,
//! contact and date. [`Store::conversation_keys`] pages through the
//! conversations when the campaigns change.
//!
//! Atomicity without batches: the conversation and the answers recently
//! given to that sender ([`RecentAnswer`], what a retried MessageSid
//! replays) live in ONE value, so a message's state change and its dedupe
//! record are a single insert. A sled batch would force a synchronous log
//! write per message (measured: 5-6x slower than an insert). Only a
//! consent change, which must be atomic with its message and is rare,
//! uses a transaction. The results of the runs a step ended (once per
//! run; a run in progress is only in its conversation) are inserted
//! just before the conversation record, in the same flush: sled's log
//! keeps the order, so a crash can leave a result whose step was not
//! acknowledged (Twilio retries it, and the retry writes the same key),
//! never a step without its result. (A transaction there doubled the
//! CPU per message of the loadgen's `multistep` scenario.)
//!
//! The inbound message log is not in sled: it is an append-only JSON-lines
//! file (`messages.jsonl` beside the database). A new sled key per message
//! cost about a third of the server's throughput (tree growth and node
//! splits); appending a line to a buffered file costs next to nothing. The
//! log is informational: it is written after the record, handed to the
//! file at each checkpoint (about once a second) and at close, never
//! fsynced, and a crash can lose its last second of lines, never
//! conversation state. It holds sender, number, outcome,
//! flow and step, not the TwiML; the texts of the message and of our
//! replies only when the operator chose `store_message_text`. Removing
//! lines (retention, [`Store::forget_contact`]) rewrites the file under
//! its lock (`message_log.rs`).
//!
//! Flow results do not stay in sled either: sled keeps a record in memory
//! for every page it ever wrote, and results only ever grow (two million
//! of them, five minutes of the loadgen's `multistep` soak, grew the
//! server by about 33 MiB). A result is committed into sled with its step
//! as above; about once a second the store's results thread
//! (`worker.rs`) moves the rows sled holds to one append-only JSON-lines
//! file per flow (`results/<flow>.jsonl`): append, `fdatasync`, then
//! remove each moved row if it is unchanged. Reads take the files and
//! then sled, the last copy of each run's key winning, so a crash
//! between the two steps, or a step handled again, never shows a run
//! twice (`result_files.rs`).
//!
//! Durability: [`Store::commit`] writes; [`Store::flush`] makes it
//! durable: sled's flush (which only `sync_file_range`s its log), then an
//! `fdatasync` of sled's files (`files.rs`). Flushes are grouped by the
//! store's worker thread (`worker.rs`): while one sync runs, every caller that arrives
//! waits for the next one, so N concurrent webhooks cost about two syncs,
//! not N. The worker syncs as soon as a caller comes, without waiting
//! for more to join (the measurements are in `worker.rs`).
//!
//! Faults, never silent: sled's recovery drops everything after the first
//! damaged entry of its log without a word, so once a second (and at
//! shutdown) the worker writes a flush marker into the database and, once
//! it is on disk, its number into the `checkpoint` file; a database that
//! opens with an older marker is refused. A record that does not decode is
//! kept aside (`quarantine.rs`) before anything replaces it. A write, flush
//! or fsync that fails marks the store failed (nothing is acknowledged);
//! sled then fails every later write, so the worker reopens the database
//! once the filesystem takes writes again, and an [`Epoch`] makes sure
//! nothing read or written before the reopen is acknowledged after it.
//!
//! Files: this one holds the contract (the [`Store`] trait and its types);
//! `any.rs` the server's choice of backend; `pg/` the PostgreSQL backend;
//! `sled_store.rs` the sled backend; `records.rs` the keys and record
//! layouts; `message_log.rs` the log file; `worker.rs` the flushing thread;
//! `open.rs` opening and its failures; `starts.rs` flow start results;
//! `tallies.rs` per-broadcast counts of outbox states; `results.rs` flow
//! results in sled, `result_files.rs` in their files; `files.rs` private files and real fsyncs; `quarantine.rs`
//! records kept aside.

use std::time::Duration;

use serde::{Deserialize, Serialize};

mod any;
mod call_jobs;
mod consent_filter;
mod files;
mod message_log;
mod open;
mod outbox;
pub mod pg;
mod quarantine;
mod records;
mod result_files;
mod results;
mod sled_store;
mod starts;
mod tallies;
mod worker;

pub use any::AnyStore;
pub use call_jobs::{CallJob, CallJobState};
pub use open::OpenError;
pub use outbox::{OutboxEntry, OutboxState};
pub use pg::{ConvLock, PgConfig, PgStore};
pub use records::{
    AuditRecord, ConsentChange, ConvKey, DeliveryStatus, OptOut, Processed, RecentAnswer,
    RecentAnswers, StatusEvent, StoredConversation, DEDUPE_MAX_ANSWERS, DEDUPE_WINDOW_SECS,
};
pub use results::RunResult;
pub use starts::StartRecord;
pub use tallies::{tally_of, tally_prefixes, OutboxTally};

/// One entry of the timer index: a conversation whose timer is due at
/// `due` (unless the entry is stale: the record's own due time decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueTimer {
    /// Unix seconds the timer is due.
    pub due: i64,
    /// The conversation.
    pub key: ConvKey,
}

/// A conversation change that answers no inbound message (a timer fired,
/// a tool seeded it): the record is rewritten with its recent answers
/// kept, atomically, like [`Commit`].
#[derive(Debug, Clone)]
pub struct StateCommit<'a> {
    /// The conversation.
    pub key: &'a ConvKey,
    /// The new conversation, or `None` when there is no state to keep.
    pub conversation: Option<&'a [u8]>,
    /// Whether the conversation has no running flow.
    pub ended: bool,
    /// When its next timer is due, if one is pending.
    pub due: Option<i64>,
    /// The answers recorded so far (from [`Store::load`], under the
    /// conversation's lock); kept as they are.
    pub recent: &'a RecentAnswers,
    /// Unix seconds: the record's last-touched time.
    pub at: i64,
    /// The results of the runs this change ended, written with it (see
    /// [`Commit::results`]).
    pub results: &'a [RunResult],
}
pub use sled_store::SledStore;

/// Errors from the storage backend. Callers map these to a 503-style
/// failure; they never carry user input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Any other error reported by the backend (sled, PostgreSQL).
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
    /// The background flusher thread has stopped.
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

/// Everything one processed inbound message changes, written atomically.
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    /// The conversation the message belongs to.
    pub key: &'a ConvKey,
    /// The new conversation, or `None` when there is no state to keep.
    pub conversation: Option<&'a [u8]>,
    /// Whether the conversation has no running flow (purgeable when idle).
    pub ended: bool,
    /// The answers recorded before this message (from [`Store::load`],
    /// read under the conversation's lock); the new one is added to them.
    pub recent: &'a RecentAnswers,
    /// The inbound MessageSid processed.
    pub message_sid: &'a str,
    /// What we answered to it (replayed on a retry).
    pub processed: &'a Processed,
    /// A consent change (STOP/START) to record with it, if any.
    pub consent: Option<ConsentChange>,
    /// When the conversation's next timer is due, if one is pending
    /// (indexed by due time; see the store's "Timers").
    pub due: Option<i64>,
    /// The results of the flow runs this message ended (usually none),
    /// written with the conversation and made durable by the same flush:
    /// after a crash the conversation change is never there without
    /// them (a backend may write them in the same transaction; sled
    /// writes them just before the record). A result is named by its
    /// flow, conversation, start time and position in this list, so
    /// handling the same step again (a retried message) replaces it:
    /// nothing is doubled.
    pub results: &'a [RunResult],
}

impl Commit<'_> {
    /// The recent answers to store with this commit: those read, plus
    /// this message's (what every backend writes for [`Commit::recent`]).
    pub(crate) fn recent_answers(&self) -> RecentAnswers {
        self.recent.keep(records::AnswerRef {
            sid: self.message_sid,
            twiml: &self.processed.twiml,
            outcome: &self.processed.outcome,
            at: self.processed.at,
        })
    }
}

/// How many records a purge removed, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Processed-message records removed.
    pub processed: usize,
    /// Delivery status records removed.
    pub statuses: usize,
    /// Status callback events removed.
    pub status_events: usize,
    /// Idle conversations removed.
    pub conversations: usize,
    /// Finished (delivered or failed) after-answer call jobs removed.
    pub call_jobs: usize,
    /// Flow results removed.
    pub results: usize,
}

/// What [`Store::forget_contact`] removed, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    /// Conversation records (one per number of ours), with any pending
    /// timer.
    pub conversations: usize,
    /// Flow results.
    pub results: usize,
    /// Lines of the message log (inbound messages, with their text).
    pub log_lines: usize,
    /// Delivery status records of messages sent to the number.
    pub statuses: usize,
    /// Status callback events of those messages.
    pub status_events: usize,
    /// Outbox entries to the number, whatever their state (pending ones
    /// are never sent).
    pub outbox: usize,
    /// Flow start records naming the number.
    pub starts: usize,
}

/// Result of offering a status callback to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusUpdate {
    /// The callback advanced the status (or was the first one).
    Applied,
    /// An equal or later status was already stored; nothing changed.
    Stale {
        /// The status already stored.
        current: String,
    },
}

/// The storage interface the pipeline relies on.
///
/// Implementations must make [`Store::commit`] atomic: either both the
/// conversation and the dedupe record are written, or neither (with its
/// consent change, when it has one); its run results are never missing
/// when its conversation change is there (see [`Commit::results`]);
/// likewise for [`Store::commit_state`] and [`Store::commit_start`].
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
    /// Remove dedupe records and message log lines (with their text),
    /// delivery records, ended conversations last touched before `cutoff`
    /// (unix seconds), flow results of runs that ended before it, and call
    /// jobs delivered or failed before it. Consent records and pending
    /// call jobs are kept.
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
    /// Write a conversation change that answers no inbound message (a
    /// timer fired, a tool seeded it), with its next due time, keeping the
    /// recorded answers. Not yet durable: see `flush`.
    fn commit_state(&self, commit: StateCommit<'_>) -> Result<(), StoreError>;
    /// Timer index entries due at or before `now`, earliest first, at most
    /// `limit`. Reads the index only, never every conversation; an entry
    /// may be stale (check the record's due time).
    fn due_timers(&self, now: i64, limit: usize) -> Result<Vec<DueTimer>, StoreError>;
    /// The earliest timer index entry's due time, if any.
    fn next_timer(&self) -> Result<Option<i64>, StoreError>;
    /// Remove a timer index entry (a stale one, found while firing).
    fn remove_timer(&self, timer: &DueTimer) -> Result<(), StoreError>;
    /// Conversations with a pending timer, in constant time.
    fn pending_timers(&self) -> usize;
    /// Record messages to send on our own. An entry whose key is already
    /// in the outbox is left as it is (whatever its state): enqueueing is
    /// idempotent. Returns how many entries were new. Not yet durable: see
    /// `flush`.
    fn enqueue_outbound(&self, entries: &[OutboxEntry]) -> Result<usize, StoreError>;
    /// The outbox entry stored under `key`, if any.
    fn outbound(&self, key: &str) -> Result<Option<OutboxEntry>, StoreError>;
    /// Record after-answer call jobs; a key already recorded is left as it
    /// is. Returns how many were new.
    fn enqueue_call_jobs(&self, jobs: &[CallJob]) -> Result<usize, StoreError>;
    /// Pending call jobs due at `now` (earliest first), at most `limit`,
    /// read from the due index.
    fn due_call_jobs(&self, now: i64, limit: usize) -> Result<Vec<CallJob>, StoreError>;
    /// Replace the stored call job `job.key` by `job` (its index follows).
    fn update_call_job(&self, job: &CallJob) -> Result<(), StoreError>;
    /// Replace the stored call job `job.key` by `job` only while it is in
    /// state `from` (compare and swap, atomically): how the call worker
    /// claims a due job, so that of several workers (instances on one
    /// PostgreSQL) exactly one makes the call. Whether it was replaced.
    fn claim_call_job(&self, job: &CallJob, from: &CallJobState) -> Result<bool, StoreError>;
    /// The call job stored under `key`, if any.
    fn call_job(&self, key: &str) -> Result<Option<CallJob>, StoreError>;
    /// Call jobs still to be made (pending), for `/metrics`. This default
    /// reads the whole due index; a backend that can count them in
    /// constant time (the sled store keeps a counter) overrides it.
    fn call_jobs_pending(&self) -> usize {
        self.due_call_jobs(i64::MAX, usize::MAX)
            .map_or(0, |jobs| jobs.len())
    }
    /// Every outbox entry, by key.
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError>;
    /// The outbox entries whose key starts with `prefix`, by key (one
    /// broadcast's entries: [`tally_prefixes`]). Reads that key range
    /// only.
    fn outbox_with_prefix(&self, prefix: &str) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Per tally (a broadcast's id: [`tally_of`] names the entries that
    /// count), how many entries are in each state, by name. Kept with
    /// every outbox write; reads one record per tally, never the outbox.
    fn outbox_tallies(&self) -> Result<Vec<(String, OutboxTally)>, StoreError>;
    /// Pending entries due at `now` (`not_before <= now`), earliest first,
    /// at most `limit`. Reads the due index, never the whole outbox; stale
    /// index entries met on the way are removed.
    fn due_outbound(&self, now: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Move the outbox entry `key` from state `from` to `to` (compare and
    /// swap, with its index entries, atomically). `None` when it is not in
    /// state `from` (or not there): nothing changed. Not yet durable: see
    /// `flush`.
    fn update_outbound(
        &self,
        key: &str,
        from: &OutboxState,
        to: OutboxState,
    ) -> Result<Option<OutboxEntry>, StoreError>;
    /// The entries in state `Sending` (a request may be in flight), from
    /// their index.
    fn sending_outbound(&self) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Outbox entries pending or being sent, in constant time.
    fn outbox_depth(&self) -> usize;
    /// [`Store::flush`] that reaches the disk whatever the durability
    /// mode: for what must be on disk before something leaves the process
    /// (an outbox entry marked `Sending` before its request), even under
    /// relaxed durability. Same failure rule as `flush`.
    fn flush_durable(
        &self,
        since: Epoch,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
    /// The stored conversations of our number `to`, by contact number
    /// (the contact's `From`), in key order. A record that does not
    /// decode is kept aside and left out. Reads every conversation of
    /// `to`: for exports, not for the message path.
    fn conversations_of(&self, to: &str) -> Result<Vec<(String, StoredConversation)>, StoreError>;
    /// The recorded result of the flow start with idempotency key `key`.
    fn start_record(&self, key: &str) -> Result<Option<StartRecord>, StoreError>;
    /// Record a flow start: its outbox entries (keys already there are
    /// left as they are), the conversation change (`commit`, when the
    /// start changed one) and `record`, in one transaction, unless a record
    /// is already under `record.key`: then nothing is written and that
    /// record is returned. Not yet durable: see `flush`.
    fn commit_start(
        &self,
        commit: Option<StateCommit<'_>>,
        entries: &[OutboxEntry],
        record: &StartRecord,
    ) -> Result<Option<StartRecord>, StoreError>;
    /// Take `key`'s conversation lock across every process sharing this
    /// store, held until the returned guard is dropped; the caller takes
    /// its in-process lock first. `None` when the store is one process's
    /// (sled: the in-process lock is the whole lock). Fails when the
    /// lock cannot be had (the database is unreachable). While it is held,
    /// the conversation writes for `key` (`commit`, `commit_state`,
    /// `commit_start`, `delete_conversation`) are fenced by it: they fail,
    /// writing nothing, once the lock has been lost (PostgreSQL: they run
    /// on the lock's own session).
    fn lock_conversation(
        &self,
        key: &ConvKey,
    ) -> impl std::future::Future<Output = Result<Option<ConvLock>, StoreError>> + Send {
        let _ = key;
        std::future::ready(Ok(None))
    }
    /// [`Store::lock_conversation`] for all of `keys`, the conversations
    /// of the contact `number`, as one guard, to erase them: while it is
    /// held, `forget_contact(number)` is fenced by all of them. The
    /// caller holds the in-process locks of `keys` first.
    fn lock_contact(
        &self,
        number: &str,
        keys: &[ConvKey],
    ) -> impl std::future::Future<Output = Result<Option<ConvLock>, StoreError>> + Send {
        let _ = (number, keys);
        std::future::ready(Ok(None))
    }

    // Flow results and erasure (issue 20). Results are written by
    // `commit`, `commit_state` and `commit_start` (their `results`) and
    // removed by `purge` and `forget_contact`.

    /// The results of `flow`'s runs that ended at or after `since` (unix
    /// seconds), in end-time order (then our number, the contact's number,
    /// start time). A record that does not decode is kept aside and left
    /// out. Reads all of that flow's results, no other flow's.
    fn results(&self, flow: &str, since: i64) -> Result<Vec<RunResult>, StoreError>;
    /// The keys of every stored conversation whose contact (`from`) is
    /// `number`, on any of our numbers, in key order. Reads every
    /// conversation key: for erasure, not for the message path.
    fn contact_conversations(&self, number: &str) -> Result<Vec<ConvKey>, StoreError>;
    /// Erase everything stored about `number`: its conversation records on
    /// every number of ours (with their recent answers and timer index
    /// entries), flow results whose contact it is, message log lines from
    /// or to it (the file is rewritten), delivery records and status
    /// events of messages sent to it, outbox entries to it in any state
    /// (with their index entries), and flow start records naming it.
    /// Kept: its consent state and consent audit records (the legal
    /// record of an opt-out). `audit` (action `forget`, counts only) is
    /// added to the audit log. Idempotent: a second call removes nothing
    /// and still adds its audit record. The caller holds the
    /// conversations' locks (see `Pipeline::forget_contact`) so that no
    /// message in flight writes them back. Not yet durable: see
    /// `flush_durable`.
    fn forget_contact(&self, number: &str, audit: &AuditRecord) -> Result<Forgotten, StoreError>;
    /// Every stored conversation record, on every number of ours, in key
    /// order, each with its last activity (unix seconds: the record's
    /// last-touched time); one without state (only recent answers, e.g.
    /// after a STOP) has `conversation: None`. A record that does not
    /// decode is kept aside and left out. Reads every conversation: for exports
    /// (`smsflow export contacts`), not for the message path.
    fn all_conversations(&self) -> Result<Vec<(ConvKey, i64, StoredConversation)>, StoreError>;

    // ---- campaigns (the schedule itself is the timer index above) ----

    /// The keys of stored conversations after `after` (exclusive; from the
    /// first when `None`), in key order (our number, then the contact), at
    /// most `limit`. Reads keys, not records: for walking every
    /// conversation in pages when the campaign set changed, never on the
    /// message path.
    fn conversation_keys(
        &self,
        after: Option<&ConvKey>,
        limit: usize,
    ) -> Result<Vec<ConvKey>, StoreError>;
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
    /// When a write counts as done: fsynced before answering, or relaxed.
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
    /// Conversations with a pending timer.
    pub pending_timers: usize,
    /// Completed grouped fsyncs.
    pub fsyncs: u64,
    /// Flow results the embedded store moved from its database to their
    /// files (0 on PostgreSQL, which keeps them in a table).
    pub results_moved: u64,
    /// Moves of flow results that failed; their rows stay in the database
    /// and are moved again (said at warn once a minute).
    pub results_move_failures: u64,
}

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;
