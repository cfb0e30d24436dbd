//! [`AnyStore`]: the store the server runs on, sled or PostgreSQL, chosen
//! at startup. It implements [`Store`] by handing each call to the one
//! it holds, so the pipeline, the app and the HTTP layer name one type.

use super::pg::{PgConfig, PgStore};
use super::{
    AuditRecord, CallJob, CallJobState, Commit, ConsentChange, ConvKey, ConvLock, DeliveryStatus,
    DueTimer, Durability, Epoch, Forgotten, OptOut, OutboxEntry, OutboxState, OutboxTally,
    Processed, Purged, RunResult, SledStore, StartRecord, StateCommit, StatusEvent, StatusUpdate,
    Store, StoreError, StoreHealth, StoredConversation,
};
use crate::metrics::Histogram;

/// The server's store: the embedded sled store (the default) or
/// PostgreSQL (`--store postgres://…`).
pub enum AnyStore {
    /// sled in the data directory: one process.
    Sled(SledStore),
    /// PostgreSQL: several instances on one database.
    Pg(PgStore),
}

/// Call `$method` on whichever store `$self` holds.
macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sled($s) => $e,
            AnyStore::Pg($s) => $e,
        }
    };
}

impl AnyStore {
    /// Open PostgreSQL at `url` (applying its migrations) with `config`.
    pub fn open_pg(url: &str, config: &PgConfig) -> Result<AnyStore, StoreError> {
        PgStore::open(url, config).map(AnyStore::Pg)
    }

    /// Blocking flush of everything, at shutdown (sled: synced and
    /// checkpointed; PostgreSQL: every commit already is).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sled(s) => s.flush_blocking(),
            AnyStore::Pg(_) => Ok(()),
        }
    }

    /// The store's health, in constant time.
    pub fn health(&self) -> StoreHealth {
        each!(self, s => s.health())
    }

    /// The durability mode the store was opened with.
    pub fn durability(&self) -> Durability {
        each!(self, s => s.durability())
    }

    /// Where the data is, for `/status`: the data directory or the
    /// database URL without its password.
    pub fn location(&self, data_dir: &std::path::Path) -> String {
        match self {
            AnyStore::Sled(_) => std::path::absolute(data_dir)
                .unwrap_or_else(|_| data_dir.to_path_buf())
                .display()
                .to_string(),
            AnyStore::Pg(p) => p.url().to_string(),
        }
    }

    /// `sled` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyStore::Sled(_) => "sled",
            AnyStore::Pg(_) => "postgres",
        }
    }

    /// How long the grouped flushes took (for `/metrics`).
    pub(crate) fn flush_latency(&self) -> &Histogram {
        each!(self, s => s.flush_latency())
    }
}

impl From<SledStore> for AnyStore {
    fn from(s: SledStore) -> Self {
        AnyStore::Sled(s)
    }
}

impl From<PgStore> for AnyStore {
    fn from(s: PgStore) -> Self {
        AnyStore::Pg(s)
    }
}

impl Store for AnyStore {
    fn load(&self, key: &ConvKey) -> Result<StoredConversation, StoreError> {
        each!(self, s => s.load(key))
    }
    fn keep_aside(&self, key: &ConvKey, reason: &str) -> Result<(), StoreError> {
        each!(self, s => s.keep_aside(key, reason))
    }
    fn conversation(&self, key: &ConvKey) -> Result<Option<Vec<u8>>, StoreError> {
        each!(self, s => s.conversation(key))
    }
    fn processed(&self, message_sid: &str) -> Result<Option<Processed>, StoreError> {
        each!(self, s => s.processed(message_sid))
    }
    fn commit(&self, commit: Commit<'_>) -> Result<(), StoreError> {
        each!(self, s => s.commit(commit))
    }
    fn epoch(&self) -> Epoch {
        each!(self, s => s.epoch())
    }
    async fn flush(&self, since: Epoch) -> Result<(), StoreError> {
        each!(self, s => s.flush(since).await)
    }
    fn record_status(
        &self,
        message_sid: &str,
        status: &DeliveryStatus,
    ) -> Result<StatusUpdate, StoreError> {
        each!(self, s => s.record_status(message_sid, status))
    }
    fn delivery_status(&self, message_sid: &str) -> Result<Option<DeliveryStatus>, StoreError> {
        each!(self, s => s.delivery_status(message_sid))
    }
    fn conversation_count(&self) -> usize {
        each!(self, s => s.conversation_count())
    }
    fn health(&self) -> StoreHealth {
        each!(self, s => Store::health(s))
    }
    fn opt_out(&self, scope: &str, number: &str) -> Result<Option<OptOut>, StoreError> {
        each!(self, s => s.opt_out(scope, number))
    }
    fn record_consent(&self, change: &ConsentChange) -> Result<(), StoreError> {
        each!(self, s => s.record_consent(change))
    }
    fn audit_log(&self) -> Result<Vec<AuditRecord>, StoreError> {
        each!(self, s => s.audit_log())
    }
    fn status_events(&self, message_sid: &str) -> Result<Vec<StatusEvent>, StoreError> {
        each!(self, s => s.status_events(message_sid))
    }
    fn inbound_log(&self) -> Result<Vec<(String, Processed)>, StoreError> {
        each!(self, s => s.inbound_log())
    }
    fn outbound_log(&self) -> Result<Vec<(String, DeliveryStatus)>, StoreError> {
        each!(self, s => s.outbound_log())
    }
    fn purge(&self, cutoff: i64) -> Result<Purged, StoreError> {
        each!(self, s => s.purge(cutoff))
    }
    fn delete_conversation(&self, key: &ConvKey) -> Result<bool, StoreError> {
        each!(self, s => s.delete_conversation(key))
    }
    fn put_conversation(
        &self,
        key: &ConvKey,
        conversation: &[u8],
        ended: bool,
        at: i64,
    ) -> Result<(), StoreError> {
        each!(self, s => s.put_conversation(key, conversation, ended, at))
    }
    fn commit_state(&self, commit: StateCommit<'_>) -> Result<(), StoreError> {
        each!(self, s => s.commit_state(commit))
    }
    fn due_timers(&self, now: i64, limit: usize) -> Result<Vec<DueTimer>, StoreError> {
        each!(self, s => s.due_timers(now, limit))
    }
    fn next_timer(&self) -> Result<Option<i64>, StoreError> {
        each!(self, s => s.next_timer())
    }
    fn remove_timer(&self, timer: &DueTimer) -> Result<(), StoreError> {
        each!(self, s => s.remove_timer(timer))
    }
    fn pending_timers(&self) -> usize {
        each!(self, s => s.pending_timers())
    }
    fn enqueue_outbound(&self, entries: &[OutboxEntry]) -> Result<usize, StoreError> {
        each!(self, s => s.enqueue_outbound(entries))
    }
    fn outbound(&self, key: &str) -> Result<Option<OutboxEntry>, StoreError> {
        each!(self, s => s.outbound(key))
    }
    fn enqueue_call_jobs(&self, jobs: &[CallJob]) -> Result<usize, StoreError> {
        each!(self, s => s.enqueue_call_jobs(jobs))
    }
    fn due_call_jobs(&self, now: i64, limit: usize) -> Result<Vec<CallJob>, StoreError> {
        each!(self, s => s.due_call_jobs(now, limit))
    }
    fn update_call_job(&self, job: &CallJob) -> Result<(), StoreError> {
        each!(self, s => s.update_call_job(job))
    }
    fn claim_call_job(&self, job: &CallJob, from: &CallJobState) -> Result<bool, StoreError> {
        each!(self, s => s.claim_call_job(job, from))
    }
    fn call_job(&self, key: &str) -> Result<Option<CallJob>, StoreError> {
        each!(self, s => s.call_job(key))
    }
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        each!(self, s => s.outbox())
    }
    fn due_outbound(&self, now: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        each!(self, s => s.due_outbound(now, limit))
    }
    fn update_outbound(
        &self,
        key: &str,
        from: &OutboxState,
        to: OutboxState,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        each!(self, s => s.update_outbound(key, from, to))
    }
    fn sending_outbound(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        each!(self, s => s.sending_outbound())
    }
    fn outbox_depth(&self) -> usize {
        each!(self, s => s.outbox_depth())
    }
    async fn flush_durable(&self, since: Epoch) -> Result<(), StoreError> {
        each!(self, s => s.flush_durable(since).await)
    }
    fn conversations_of(&self, to: &str) -> Result<Vec<(String, StoredConversation)>, StoreError> {
        each!(self, s => s.conversations_of(to))
    }
    fn start_record(&self, key: &str) -> Result<Option<StartRecord>, StoreError> {
        each!(self, s => s.start_record(key))
    }
    fn commit_start(
        &self,
        commit: Option<StateCommit<'_>>,
        entries: &[OutboxEntry],
        record: &StartRecord,
    ) -> Result<Option<StartRecord>, StoreError> {
        each!(self, s => s.commit_start(commit, entries, record))
    }
    fn call_jobs_pending(&self) -> usize {
        each!(self, s => s.call_jobs_pending())
    }
    fn outbox_with_prefix(&self, prefix: &str) -> Result<Vec<OutboxEntry>, StoreError> {
        each!(self, s => s.outbox_with_prefix(prefix))
    }
    fn outbox_tallies(&self) -> Result<Vec<(String, OutboxTally)>, StoreError> {
        each!(self, s => s.outbox_tallies())
    }
    fn results(&self, flow: &str, since: i64) -> Result<Vec<RunResult>, StoreError> {
        each!(self, s => s.results(flow, since))
    }
    fn contact_conversations(&self, number: &str) -> Result<Vec<ConvKey>, StoreError> {
        each!(self, s => s.contact_conversations(number))
    }
    fn forget_contact(&self, number: &str, audit: &AuditRecord) -> Result<Forgotten, StoreError> {
        each!(self, s => s.forget_contact(number, audit))
    }
    fn all_conversations(&self) -> Result<Vec<(ConvKey, i64, StoredConversation)>, StoreError> {
        each!(self, s => s.all_conversations())
    }
    fn conversation_keys(
        &self,
        after: Option<&ConvKey>,
        limit: usize,
    ) -> Result<Vec<ConvKey>, StoreError> {
        each!(self, s => s.conversation_keys(after, limit))
    }
    async fn lock_conversation(&self, key: &ConvKey) -> Result<Option<ConvLock>, StoreError> {
        match self {
            AnyStore::Sled(_) => Ok(None),
            AnyStore::Pg(p) => p.lock_conversation(key).await.map(Some),
        }
    }
    async fn lock_contact(
        &self,
        number: &str,
        keys: &[ConvKey],
    ) -> Result<Option<ConvLock>, StoreError> {
        match self {
            AnyStore::Sled(_) => Ok(None),
            AnyStore::Pg(p) => p.lock_contact(number, keys).await.map(Some),
        }
    }
}
