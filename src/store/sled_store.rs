//! [`SledStore`]: the [`Store`] on sled. Its callers and its worker thread
//! share one [`Shared`]: the open database (reopened after a failure), the
//! message log, the quarantine, and the counters health checks read. See
//! the store's module doc for the layout, durability and faults.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::call_jobs::{self, CallJob, CallJobState};
use super::consent_filter::ConsentFilter;
use super::message_log::{LogLine, LogLineRef, MessageLog};
use super::open::{check_marker, closed, open_db, read_marker, Open, OpenError};
use super::outbox;
use super::quarantine::{describe_key, Quarantine};
use super::records::{
    conv_due, conv_header, conv_value, decode, decode_conv, encode, has_conversation,
    parse_timer_key, prefixed, timer_key, two_part, ENDED, HAS_CONVERSATION, TIMER_PREFIX,
};
use super::result_files::{self, ResultFiles, RunKey};
use super::results::{self, RunResult};
use super::starts::{self, StartRecord};
use super::tallies::{self, OutboxTally};
use super::worker::{ResultsMover, Worker};
use super::{
    files, AuditRecord, Commit, ConsentChange, ConvKey, DeliveryStatus, DueTimer, Durability,
    Epoch, Forgotten, OptOut, OutboxEntry, OutboxState, Processed, Purged, RecentAnswers,
    StateCommit, StatusEvent, StatusUpdate, Store, StoreConfig, StoreError, StoreHealth,
    StoredConversation,
};
use crate::clock::unix_now;
use crate::metrics::Histogram;

/// The sled-backed [`Store`].
pub struct SledStore {
    pub(super) shared: Arc<Shared>,
    /// Moves flow results to their files; stopped (dropped) before the
    /// worker closes the database.
    _results: ResultsMover,
    /// The store's own thread: grouped flushes, checkpoints, and reopening
    /// after a failure. Joined on drop, so the database is closed (and
    /// everything flushed) when a `SledStore` is gone.
    worker: Worker,
}

/// What the store's callers and its worker thread share.
pub(super) struct Shared {
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
    /// Flow results moved out of the database (`result_files.rs`).
    pub(super) result_files: ResultFiles,
    quarantine: Quarantine,
    /// Conversations holding state: counted at open, then kept up to date
    /// by every write, so health checks never scan the store.
    conversations: AtomicI64,
    /// Conversations with a pending timer (a due time in their record):
    /// counted at open with the conversations, then kept up to date by
    /// every write, so the gauge never scans.
    timers: AtomicI64,
    /// Set when a write, flush or fsync fails; cleared by a successful
    /// reopen. While set, nothing is acknowledged.
    pub(super) failed: AtomicBool,
    failure: Mutex<Option<Failure>>,
    /// Writes since the last checkpoint.
    pub(super) writes: AtomicU64,
    /// The last flush marker written to the database (see `checkpoint`).
    marker: AtomicU64,
    /// One checkpoint at a time (the worker, and a shutdown's final one).
    checkpointing: Mutex<()>,
    fsyncs: AtomicU64,
    /// Flow result rows moved to their files, and moves that failed.
    results_moved: AtomicU64,
    results_move_failures: AtomicU64,
    reopens: AtomicU64,
    /// Outbox entries pending or being sent (its index entries): counted
    /// at open, then kept up to date by every outbox write.
    outbox_depth: AtomicI64,
    /// Pending call jobs (their due-index entries): counted at open, then
    /// kept up to date by every call job write.
    call_jobs_pending: AtomicI64,
    /// How long each grouped flush (sled's flush and the fsyncs) took,
    /// for `/metrics`.
    flush_latency: Histogram,
    /// The senders that may have a consent record (`consent_filter.rs`).
    consents: ConsentFilter,
}

#[derive(Debug, Clone)]
struct Failure {
    error: String,
    since: i64,
}

/// Flow result rows per move of the results thread (one append and one
/// `fdatasync` per flow), then it takes the next. Removing rows costs
/// sled memory in bursts: in 25-second runs of the durable multi-step
/// soak the server held 80-90 MiB moving everything at once, 68-76 MiB
/// in moves of 4,096 rows, 61-70 MiB in moves of 512, and 51-56 MiB not
/// moving at all (for now; it then grows with every result).
const RESULTS_BATCH: usize = 1024;

/// The key prefix of consent records: `o\0` scope `\0` number.
const CONSENT_PREFIX: &[u8] = b"o\0";

/// The meta key holding the last flush marker (see `Shared::checkpoint`).
pub(super) const MARKER_KEY: &[u8] = b"m\0marker";

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
        let result_files = ResultFiles::open(dir.join("results"))
            .map_err(|e| OpenError::io("opening the results directory in", dir, e))?;
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
            result_files,
            quarantine,
            conversations: AtomicI64::new(0),
            timers: AtomicI64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            writes: AtomicU64::new(0),
            marker: AtomicU64::new(recovered),
            checkpointing: Mutex::new(()),
            fsyncs: AtomicU64::new(0),
            results_moved: AtomicU64::new(0),
            results_move_failures: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
            outbox_depth: AtomicI64::new(0),
            call_jobs_pending: AtomicI64::new(0),
            flush_latency: Histogram::default(),
            consents: ConsentFilter::new(),
        });
        let (count, timers) = shared.scan_conversations(&open.db).map_err(|e| match e {
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
        let depth = outbox::count_indexed(&open.db).map_err(|e| OpenError::Damaged {
            dir: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        shared.outbox_depth.store(depth, Ordering::Relaxed);
        let pending = call_jobs::count_pending(&open.db).map_err(|e| OpenError::Damaged {
            dir: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        shared.call_jobs_pending.store(pending, Ordering::Relaxed);
        shared.timers.store(timers, Ordering::Relaxed);
        shared
            .consents
            .add_all(&open.db, CONSENT_PREFIX)
            .map_err(|e| OpenError::from_sled(dir, e))?;
        let counted = tallies::count_once(&open.db).map_err(|e| OpenError::Damaged {
            dir: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        if counted > 0 {
            tracing::info!(
                broadcasts = counted,
                "counted the outbox tallies of an older store once"
            );
        }
        *write(&shared.db) = Some(open);
        let worker = Worker::start(shared.clone());
        Ok(SledStore {
            _results: ResultsMover::start(shared.clone()),
            shared,
            worker,
        })
    }

    /// Blocking flush of everything, used at shutdown whatever the mode:
    /// synced to disk, then checkpointed.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.shared.sync()?;
        self.shared.checkpoint()
    }

    /// Every flow's results, files and sled together (the last copy of
    /// each run), with their positions in their commits: what `store
    /// copy` moves.
    pub(super) fn all_results(&self) -> Result<Vec<(RunResult, u16)>, StoreError> {
        let held = self.shared.result_files.lock();
        let mut flows = self
            .shared
            .result_files
            .flows(&held)
            .map_err(|e| StoreError::Backend(format!("listing the results files: {e}")))?;
        self.shared.with_trees(|db, tree| {
            for rows in results::trees(db, tree) {
                for item in rows.scan_prefix(results::PREFIX) {
                    let (k, _) = item?;
                    if let Some((flow, _)) = results::parse_key(&k) {
                        if !flows.iter().any(|f| f == flow) {
                            flows.push(flow.to_string());
                        }
                    }
                }
            }
            let mut out = Vec::new();
            for flow in &flows {
                for ((.., n), r) in self.flow_results(&held, db, tree, flow)? {
                    out.push((r, n));
                }
            }
            Ok(out)
        })
    }

    /// `flow`'s results, files and sled together, the last copy of each
    /// run kept (see `result_files.rs`).
    fn flow_results(
        &self,
        held: &result_files::Held<'_>,
        db: &sled::Db,
        tree: &sled::Tree,
        flow: &str,
    ) -> Result<std::collections::BTreeMap<RunKey, RunResult>, StoreError> {
        let mut out = self
            .shared
            .result_files
            .read(held, flow)
            .map_err(|e| StoreError::Backend(format!("reading the results of {flow}: {e}")))?;
        for rows in results::trees(db, tree) {
            for (k, r) in self.scan::<RunResult>(rows, &results::flow_prefix(flow))? {
                if let Some((_, n)) = results::parse_key(&k) {
                    out.insert(result_files::run_key(&r, n), r);
                }
            }
        }
        Ok(out)
    }

    /// Move the results sled holds into their files now (the results
    /// thread does it about once a second); returns how many moved.
    pub fn move_results(&self) -> Result<usize, StoreError> {
        self.shared.move_results()
    }

    /// The durability mode the store was opened with.
    pub fn durability(&self) -> Durability {
        self.shared.config.durability
    }

    /// How long the grouped flushes took (for `/metrics`).
    pub(crate) fn flush_latency(&self) -> &Histogram {
        &self.shared.flush_latency
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
            results_moved: self.shared.results_moved.load(Ordering::Relaxed),
            results_move_failures: self.shared.results_move_failures.load(Ordering::Relaxed),
            pending_timers: self.shared.timers.load(Ordering::Relaxed).max(0) as usize,
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
    pub(super) fn with_db<T>(
        &self,
        f: impl FnOnce(&sled::Db) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_trees(|db, _| f(db))
    }

    /// [`Shared::with_db`], with the flow results' tree too
    /// (`results::TREE`).
    pub(super) fn with_trees<T>(
        &self,
        f: impl FnOnce(&sled::Db, &sled::Tree) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = read(&self.db);
        let open = guard.as_ref().ok_or_else(reopening)?;
        let result = f(&open.db, &open.results);
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
    pub(super) fn sync(&self) -> Result<u64, StoreError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the store failed and is not reopened yet".into(),
            ));
        }
        let guard = read(&self.db);
        let open = guard.as_ref().ok_or_else(reopening)?;
        let generation = self.generation.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        let synced = open.db.flush().map_err(StoreError::from).and_then(|_| {
            lock(&open.files)
                .sync()
                .map_err(|e| StoreError::Io(format!("fsync: {e}")))
        });
        if let Err(e) = &synced {
            self.fail(&e.to_string());
        }
        synced?;
        self.flush_latency.observe(started.elapsed());
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(generation)
    }

    /// Move the flow results sled holds into their flows' files (see
    /// `result_files.rs`): append and sync each flow's lines, then remove
    /// each moved row if it still holds the moved bytes. Returns how many
    /// rows went; a flow whose file fails keeps its rows for the next
    /// move.
    pub(super) fn move_results(&self) -> Result<usize, StoreError> {
        let started = std::time::Instant::now();
        let mut total = 0;
        // The default tree's rows first (an older release's), then the
        // results' own tree.
        for which in 0..2 {
            loop {
                let (rows, moved) = self.move_results_batch(which).inspect_err(|_| {
                    self.results_move_failures.fetch_add(1, Ordering::Relaxed);
                })?;
                total += moved;
                // A batch of rows none of which can move (not written as
                // this release writes them) would come back every time.
                if rows < RESULTS_BATCH || moved == 0 {
                    break;
                }
            }
        }
        if total > 0 {
            tracing::debug!(
                moved = total,
                ms = started.elapsed().as_millis() as u64,
                "moved flow results to their files"
            );
        }
        Ok(total)
    }

    /// Move at most [`RESULTS_BATCH`] rows of `results::trees`'s
    /// `which`th; returns how many were read and how many moved.
    fn move_results_batch(&self, which: usize) -> Result<(usize, usize), StoreError> {
        let held = self.result_files.lock();
        if self.failed.load(Ordering::SeqCst) {
            return Ok((0, 0));
        }
        let rows = self.with_trees(|db, tree| {
            let mut rows = Vec::new();
            let from = results::trees(db, tree)[which];
            for item in from.scan_prefix(results::PREFIX).take(RESULTS_BATCH) {
                rows.push(item?);
            }
            Ok(rows)
        })?;
        // Each flow's lines, and the rows they came from.
        let mut flows: std::collections::BTreeMap<&str, (Vec<u8>, Vec<usize>)> =
            std::collections::BTreeMap::new();
        for (i, (k, v)) in rows.iter().enumerate() {
            let line =
                results::parse_key(k).and_then(|(flow, n)| Some((flow, result_files::line(v, n)?)));
            if let Some((flow, line)) = line {
                let (bytes, moved) = flows.entry(flow).or_default();
                bytes.extend_from_slice(&line);
                moved.push(i);
            }
        }
        let mut moved = Vec::new();
        let mut failed = None;
        for (flow, (bytes, rows)) in &flows {
            match self.result_files.append(&held, flow, bytes) {
                Ok(()) => moved.extend_from_slice(rows),
                Err(e) => failed = Some(format!("appending to the results of {flow}: {e}")),
            }
        }
        self.with_trees(|db, tree| {
            let from = results::trees(db, tree)[which];
            for &i in &moved {
                let (k, v) = &rows[i];
                // Not if a step handled again wrote its run anew meanwhile.
                let _ = from.compare_and_swap(k, Some(v), None as Option<&[u8]>)?;
            }
            Ok(())
        })?;
        if !moved.is_empty() {
            self.wrote();
            self.results_moved
                .fetch_add(moved.len() as u64, Ordering::Relaxed);
        }
        match failed {
            Some(e) => Err(StoreError::Io(e)),
            None => Ok((rows.len(), moved.len())),
        }
    }

    /// Write the next flush marker into the database, make it durable,
    /// then record it in the checkpoint file. On open, a database holding
    /// an older marker than the file names has lost data that was on disk.
    pub(super) fn checkpoint(&self) -> Result<(), StoreError> {
        let _one = lock(&self.checkpointing);
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the store failed".into()));
        }
        self.flush_log();
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

    /// Hand the message log's buffered lines to the file: at each
    /// checkpoint (about once a second while messages come) and at close,
    /// not with every grouped flush. The log is informational (never
    /// fsynced); its `write` with every flush was 4.7% of the store
    /// thread's CPU under the durable multi-step load (`perf record`),
    /// about 1% of the server's.
    fn flush_log(&self) {
        if let Err(e) = self.log.flush() {
            tracing::warn!(error = %e, "message log write failed");
        }
    }

    /// Reopen the database after a failure, once the filesystem takes
    /// writes again. sled keeps the first I/O error it meets and fails
    /// every later write with it, so only a reopen recovers; it rebuilds
    /// the state from what is on disk, which is everything acknowledged.
    pub(super) fn heal(&self) -> Result<(), String> {
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
        let (count, timers) = self
            .scan_conversations(&open.db)
            .map_err(|e| e.to_string())?;
        let depth = outbox::count_indexed(&open.db).map_err(|e| e.to_string())?;
        let pending = call_jobs::count_pending(&open.db).map_err(|e| e.to_string())?;
        self.consents
            .add_all(&open.db, CONSENT_PREFIX)
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
        self.outbox_depth.store(depth, Ordering::Relaxed);
        self.call_jobs_pending.store(pending, Ordering::Relaxed);
        self.timers.store(timers, Ordering::Relaxed);
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

    /// Count the conversations holding state and those with a pending
    /// timer, and check every record's layout; undecodable records are
    /// kept aside (they stay in place until their conversation's next
    /// message replaces them).
    fn scan_conversations(&self, db: &sled::Db) -> Result<(i64, i64), StoreError> {
        let (mut count, mut timers, mut damaged) = (0, 0, 0);
        for item in db.scan_prefix(b"c\0") {
            let (k, v) = item?;
            count += i64::from(has_conversation(&v));
            timers += i64::from(conv_due(&v).is_some());
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
        Ok((count, timers))
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

    /// A conversation record, or (kept aside first, then `then`) an empty
    /// one when it does not decode.
    fn decode_or_keep_aside(
        &self,
        key: &[u8],
        value: &[u8],
        then: &str,
    ) -> Result<StoredConversation, StoreError> {
        match decode_conv(value) {
            Ok(stored) => Ok(stored),
            Err(reason) => {
                self.keep_aside(key, value, reason, then)?;
                Ok(StoredConversation::default())
            }
        }
    }

    fn count_change(&self, old: Option<&[u8]>, new: Option<&[u8]>) {
        let delta = i64::from(new.is_some_and(has_conversation))
            - i64::from(old.is_some_and(has_conversation));
        if delta != 0 {
            self.conversations.fetch_add(delta, Ordering::Relaxed);
        }
        let timed = |v: Option<&[u8]>| i64::from(v.and_then(conv_due).is_some());
        let delta = timed(new) - timed(old);
        if delta != 0 {
            self.timers.fetch_add(delta, Ordering::Relaxed);
        }
        self.wrote();
    }

    /// Write conversation record `record` for `key` (due `due`) with the
    /// timer index kept in step: the new index entry first, then the
    /// record (by `write`, which returns the record it replaced), then the
    /// old entry removed. A crash in between leaves at most a stale index
    /// entry, never a due record without one.
    fn write_conversation(
        &self,
        db: &sled::Db,
        key: &ConvKey,
        due: Option<i64>,
        write: impl FnOnce() -> Result<Option<sled::IVec>, StoreError>,
    ) -> Result<Option<sled::IVec>, StoreError> {
        if let Some(due) = due {
            db.insert(timer_key(due, key), &[])?;
        }
        let old = write()?;
        if let Some(old_due) = old.as_deref().and_then(conv_due) {
            if Some(old_due) != due {
                db.remove(timer_key(old_due, key))?;
            }
        }
        Ok(old)
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    fn outbox_changed(&self, depth: i64) {
        if depth != 0 {
            self.outbox_depth.fetch_add(depth, Ordering::Relaxed);
        }
    }

    /// A clean close: whatever the durability mode, nothing is lost.
    pub(super) fn close(&self) {
        self.flush_log();
        if self.failed.load(Ordering::SeqCst) {
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

impl SledStore {
    /// The outbox entry `key` read inside `with_db`; an undecodable one is
    /// kept aside and reads as absent.
    fn outbound_in(&self, db: &sled::Db, key: &str) -> Result<Option<OutboxEntry>, StoreError> {
        let k = outbox::db_key(key);
        Ok(self
            .get(db, &k, "the outbox entry is left unsent")?
            .and_then(Result::ok))
    }

    /// The versioned record stored under `key`: `Ok` when it decodes,
    /// `Err(())` when it did not (it has been kept aside first, and `then`
    /// says what that means for the reader), `None` when there is none.
    fn get<T: crate::versioned::Versioned>(
        &self,
        db: &sled::Db,
        key: &[u8],
        then: &str,
    ) -> Result<Option<Result<T, ()>>, StoreError> {
        let Some(v) = db.get(key)? else {
            return Ok(None);
        };
        match decode(&v) {
            Ok(value) => Ok(Some(Ok(value))),
            Err(reason) => {
                self.shared.keep_aside(key, &v, &reason, then)?;
                Ok(Some(Err(())))
            }
        }
    }

    /// The call job `key` read inside `with_db`; an undecodable one is
    /// kept aside and reads as absent.
    fn call_job_in(&self, db: &sled::Db, key: &str) -> Result<Option<CallJob>, StoreError> {
        let k = call_jobs::db_key(key);
        match db.get(&k)? {
            Some(v) => match decode(&v) {
                Ok(job) => Ok(Some(job)),
                Err(reason) => {
                    self.shared
                        .keep_aside(&k, &v, &reason, "the call is not made")?;
                    Ok(None)
                }
            },
            None => Ok(None),
        }
    }

    fn scan<T: crate::versioned::Versioned>(
        &self,
        tree: &sled::Tree,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let mut out = Vec::new();
        for item in tree.scan_prefix(prefix) {
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

    /// The entries a consent change writes: the state and its audit
    /// record. The state's key goes into the consent filter now, before
    /// it is written.
    fn consent_entries(
        &self,
        db: &sled::Db,
        change: &ConsentChange,
    ) -> Result<[Entry; 2], StoreError> {
        let key = two_part(CONSENT_PREFIX, &change.scope, &change.number);
        self.shared.consents.add(&key);
        let mut audit_key = Vec::with_capacity(18);
        audit_key.extend_from_slice(b"a\0");
        audit_key.extend_from_slice(&change.audit.at.to_be_bytes());
        audit_key.extend_from_slice(&db.generate_id()?.to_be_bytes());
        Ok([
            (key, encode(&change.state)),
            (audit_key, encode(&change.audit)),
        ])
    }
}

/// A raw key and value to write.
type Entry = (Vec<u8>, Vec<u8>);

impl SledStore {
    /// Write the results of the runs a commit ended into their tree,
    /// before its conversation record: sled's one log for all trees keeps
    /// the order, so a crash leaves at most results whose conversation has
    /// not moved yet, and handling that step again writes the same keys
    /// (a transaction with the record would cost a synchronous log write,
    /// once per run).
    fn write_results(tree: &sled::Tree, rows: &[Entry]) -> Result<(), StoreError> {
        for (k, v) in rows {
            tree.insert(k.as_slice(), v.as_slice())?;
        }
        Ok(())
    }

    /// Insert the conversation record `record` under `k`, and `extra`
    /// with it in one transaction when there is any; returns the record
    /// it replaced.
    fn insert_with(
        db: &sled::Db,
        k: &[u8],
        record: &[u8],
        extra: &[Entry],
    ) -> Result<Option<sled::IVec>, StoreError> {
        if extra.is_empty() {
            return Ok(db.insert(k, record)?);
        }
        db.transaction(|tx| {
            let old = tx.insert(k, record)?;
            for (ek, ev) in extra {
                tx.insert(ek.as_slice(), ev.as_slice())?;
            }
            Ok(old)
        })
        .map_err(transaction_error)
    }
}

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
            Some(v) => self
                .shared
                .decode_or_keep_aside(&k, &v, "the conversation starts afresh"),
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
        let recent = c.recent_answers();
        let record = conv_value(c.processed.at, c.ended, c.conversation, c.due, &recent);
        let k = c.key.db_key();
        let results = results::rows(c.results);
        let old = self.shared.with_trees(|db, tree| {
            Self::write_results(tree, &results)?;
            self.shared.write_conversation(db, c.key, c.due, || {
                // A consent change is rare, and must be atomic with the
                // message: a transaction. The common case is one insert
                // carrying state and dedupe.
                let extra = match &c.consent {
                    Some(change) => self.consent_entries(db, change)?.to_vec(),
                    None => Vec::new(),
                };
                Self::insert_with(db, &k, &record, &extra)
            })
        })?;
        self.shared.count_change(old.as_deref(), Some(&record));
        let p = c.processed;
        self.shared.log.append(&LogLineRef {
            sid: c.message_sid,
            at: p.at,
            from: &p.from,
            to: &p.to,
            outcome: &p.outcome,
            flow: p.flow.as_deref(),
            step: p.step.as_deref(),
            body: p.body.as_deref(),
            replies: &p.replies,
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
        self.shared.with_db(|db| {
            Ok(self
                .get(db, &key, "it reads as unknown")?
                .and_then(Result::ok))
        })
    }

    fn conversation_count(&self) -> usize {
        self.shared.conversations.load(Ordering::Relaxed).max(0) as usize
    }

    fn health(&self) -> StoreHealth {
        SledStore::health(self)
    }

    fn opt_out(&self, scope: &str, number: &str) -> Result<Option<OptOut>, StoreError> {
        let key = two_part(CONSENT_PREFIX, scope, number);
        if !self.shared.consents.may_hold(&key) {
            return Ok(None);
        }
        self.shared.with_db(|db| {
            let then = "the number is treated as opted out until it texts START";
            // Never text someone who may have opted out: an unreadable
            // consent record counts as an opt-out (START clears it).
            Ok(self.get(db, &key, then)?.map(|state| {
                state.unwrap_or(OptOut {
                    opted_out: true,
                    at: 0,
                })
            }))
        })
    }

    fn record_consent(&self, change: &ConsentChange) -> Result<(), StoreError> {
        self.shared.with_db(|db| {
            let mut batch = sled::Batch::default();
            for (k, v) in self.consent_entries(db, change)? {
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
        let held = self.shared.result_files.lock();
        let mut purged = Purged {
            processed: self.shared.log.purge(cutoff)?,
            results: self
                .shared
                .result_files
                .remove(&held, |r| r.ended_at < cutoff)
                .map_err(|e| StoreError::Backend(format!("purging flow results: {e}")))?,
            ..Purged::default()
        };
        self.shared.with_trees(|db, tree| {
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
            for (k, job) in self.scan::<CallJob>(db, call_jobs::PREFIX)? {
                // Finished jobs only: a pending one has its index entry
                // and is still to be made, however old.
                if call_jobs::finished_before(&job, cutoff) {
                    db.remove(k)?;
                    purged.call_jobs += 1;
                }
            }
            for rows in results::trees(db, tree) {
                for (k, v) in self.scan::<RunResult>(rows, results::PREFIX)? {
                    if v.ended_at < cutoff {
                        rows.remove(k)?;
                        purged.results += 1;
                    }
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
            let stored = self
                .shared
                .decode_or_keep_aside(&k, &v, "the conversation is deleted")?;
            let new = conv_value(at, true, None, None, &stored.recent);
            let old = self
                .shared
                .write_conversation(db, key, None, || Ok(db.insert(&k, new.as_slice())?))?;
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
                Some(v) => {
                    self.shared
                        .decode_or_keep_aside(&k, &v, "the conversation is replaced")?
                        .recent
                }
                None => RecentAnswers::default(),
            };
            let new = conv_value(at, ended, Some(conversation), None, &recent);
            let old = self
                .shared
                .write_conversation(db, key, None, || Ok(db.insert(&k, new.as_slice())?))?;
            self.shared.count_change(old.as_deref(), Some(&new));
            Ok(())
        })
    }

    fn commit_state(&self, c: StateCommit<'_>) -> Result<(), StoreError> {
        let record = conv_value(c.at, c.ended, c.conversation, c.due, c.recent);
        let k = c.key.db_key();
        let results = results::rows(c.results);
        let old = self.shared.with_trees(|db, tree| {
            Self::write_results(tree, &results)?;
            self.shared
                .write_conversation(db, c.key, c.due, || Ok(db.insert(&k, record.as_slice())?))
        })?;
        self.shared.count_change(old.as_deref(), Some(&record));
        Ok(())
    }

    fn due_timers(&self, now: i64, limit: usize) -> Result<Vec<DueTimer>, StoreError> {
        self.shared.with_db(|db| {
            let mut out = Vec::new();
            for item in db.scan_prefix(TIMER_PREFIX) {
                let (k, _) = item?;
                let Some((due, key)) = parse_timer_key(&k) else {
                    // Not one of ours; never blocks the entries after it.
                    db.remove(&k)?;
                    continue;
                };
                if due > now || out.len() >= limit {
                    break;
                }
                out.push(DueTimer { due, key });
            }
            Ok(out)
        })
    }

    fn next_timer(&self) -> Result<Option<i64>, StoreError> {
        self.shared.with_db(|db| {
            for item in db.scan_prefix(TIMER_PREFIX) {
                let (k, _) = item?;
                if let Some((due, _)) = parse_timer_key(&k) {
                    return Ok(Some(due));
                }
            }
            Ok(None)
        })
    }

    fn remove_timer(&self, timer: &DueTimer) -> Result<(), StoreError> {
        self.shared.with_db(|db| {
            db.remove(timer_key(timer.due, &timer.key))?;
            Ok(())
        })?;
        self.shared.wrote();
        Ok(())
    }

    fn pending_timers(&self) -> usize {
        self.shared.timers.load(Ordering::Relaxed).max(0) as usize
    }

    fn enqueue_outbound(&self, entries: &[OutboxEntry]) -> Result<usize, StoreError> {
        let (mut new, mut depth) = (0, 0);
        let result = self.shared.with_db(|db| {
            // The entries, their index entries and tallies: one
            // transaction per chunk.
            for chunk in entries.chunks(1000) {
                let (n, d) = outbox::insert_new(db, chunk)?;
                new += n;
                depth += d;
            }
            Ok(())
        });
        self.shared.outbox_changed(depth);
        if new > 0 {
            self.shared.wrote();
        }
        result.map(|()| new)
    }

    fn enqueue_call_jobs(&self, jobs: &[CallJob]) -> Result<usize, StoreError> {
        let mut new = 0;
        let result = self.shared.with_db(|db| {
            for job in jobs {
                if call_jobs::insert_new(db, job)? {
                    new += 1;
                    if matches!(job.state, call_jobs::CallJobState::Pending { .. }) {
                        self.shared
                            .call_jobs_pending
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(())
        });
        if new > 0 {
            self.shared.wrote();
        }
        result.map(|()| new)
    }

    fn due_call_jobs(&self, now: i64, limit: usize) -> Result<Vec<CallJob>, StoreError> {
        let end = call_jobs::due_key(now.saturating_add(1), "");
        self.shared.with_db(|db| {
            let mut due = Vec::new();
            for item in db.range(call_jobs::DUE.to_vec()..end) {
                if due.len() >= limit {
                    break;
                }
                let (ix, _) = item?;
                let live = match call_jobs::parse_due_key(&ix) {
                    Some(key) => self.call_job_in(db, &key)?,
                    None => None,
                }
                .filter(|job| call_jobs::indexed_by(job, &ix));
                match live {
                    Some(job) => due.push(job),
                    // Points at nothing, or at a job in another state.
                    None => {
                        if db.remove(&ix)?.is_some() {
                            self.shared
                                .call_jobs_pending
                                .fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Ok(due)
        })
    }

    fn update_call_job(&self, job: &CallJob) -> Result<(), StoreError> {
        let change = self.shared.with_db(|db| call_jobs::replace(db, job))?;
        self.shared
            .call_jobs_pending
            .fetch_add(change, Ordering::Relaxed);
        self.shared.wrote();
        Ok(())
    }

    fn claim_call_job(&self, job: &CallJob, from: &CallJobState) -> Result<bool, StoreError> {
        let claimed = self
            .shared
            .with_db(|db| call_jobs::replace_if(db, job, Some(from)))?;
        let Some(change) = claimed else {
            return Ok(false);
        };
        self.shared
            .call_jobs_pending
            .fetch_add(change, Ordering::Relaxed);
        self.shared.wrote();
        Ok(true)
    }

    fn call_jobs_pending(&self) -> usize {
        self.shared.call_jobs_pending.load(Ordering::Relaxed).max(0) as usize
    }

    fn call_job(&self, key: &str) -> Result<Option<CallJob>, StoreError> {
        self.shared.with_db(|db| self.call_job_in(db, key))
    }

    fn outbound(&self, key: &str) -> Result<Option<OutboxEntry>, StoreError> {
        self.shared.with_db(|db| self.outbound_in(db, key))
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = self
            .shared
            .with_db(|db| self.scan::<OutboxEntry>(db, outbox::PREFIX))?;
        Ok(rows.into_iter().map(|(_, entry)| entry).collect())
    }

    fn outbox_with_prefix(&self, prefix: &str) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = self
            .shared
            .with_db(|db| self.scan::<OutboxEntry>(db, &outbox::db_key(prefix)))?;
        Ok(rows.into_iter().map(|(_, entry)| entry).collect())
    }

    fn outbox_tallies(&self) -> Result<Vec<(String, OutboxTally)>, StoreError> {
        self.shared.with_db(tallies::all)
    }

    fn due_outbound(&self, now: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let end = outbox::due_key(now.saturating_add(1), "");
        let mut stale = 0;
        let result = self.shared.with_db(|db| {
            let mut due = Vec::new();
            for item in db.range(outbox::DUE.to_vec()..end) {
                if due.len() >= limit {
                    break;
                }
                let (ix, _) = item?;
                let live = match outbox::parse_due_key(&ix) {
                    Some((_, key)) => self.outbound_in(db, &key)?,
                    None => None,
                }
                .filter(|entry| outbox::indexed_by(entry, &ix));
                match live {
                    Some(entry) => due.push(entry),
                    // Points at nothing, or at an entry in another state.
                    None => stale += i64::from(db.remove(&ix)?.is_some()),
                }
            }
            Ok(due)
        });
        if stale > 0 {
            tracing::warn!(stale, "removed stale outbox index entries");
            self.shared.outbox_changed(-stale);
            self.shared.wrote();
        }
        result
    }

    fn update_outbound(
        &self,
        key: &str,
        from: &OutboxState,
        to: OutboxState,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        self.shared
            .with_db(|db| match outbox::transition(db, key, from, &to)? {
                outbox::Transition::Done { entry, depth } => {
                    self.shared.outbox_changed(depth);
                    self.shared.wrote();
                    Ok(Some(*entry))
                }
                outbox::Transition::Refused => Ok(None),
                outbox::Transition::Undecodable { raw, reason } => {
                    self.shared.keep_aside(
                        &outbox::db_key(key),
                        &raw,
                        &reason,
                        "the outbox entry is left unsent",
                    )?;
                    Ok(None)
                }
            })
    }

    fn sending_outbound(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut stale = 0;
        let result = self.shared.with_db(|db| {
            let mut out = Vec::new();
            for item in db.scan_prefix(outbox::IN_FLIGHT) {
                let (ix, _) = item?;
                let key = String::from_utf8_lossy(&ix[outbox::IN_FLIGHT.len()..]).into_owned();
                match self
                    .outbound_in(db, &key)?
                    .filter(|entry| outbox::indexed_by(entry, &ix))
                {
                    Some(entry) => out.push(entry),
                    None => stale += i64::from(db.remove(&ix)?.is_some()),
                }
            }
            Ok(out)
        });
        if stale > 0 {
            self.shared.outbox_changed(-stale);
            self.shared.wrote();
        }
        result
    }

    fn outbox_depth(&self) -> usize {
        self.shared.outbox_depth.load(Ordering::Relaxed).max(0) as usize
    }

    async fn flush_durable(&self, since: Epoch) -> Result<(), StoreError> {
        // The worker syncs whenever asked, in either mode.
        self.worker.flush(since).await
    }

    fn conversations_of(&self, to: &str) -> Result<Vec<(String, StoredConversation)>, StoreError> {
        let prefix = ConvKey::new(to, "").db_key();
        self.shared.with_db(|db| {
            let mut out = Vec::new();
            for item in db.scan_prefix(&prefix) {
                let (k, v) = item?;
                let Ok(from) = std::str::from_utf8(&k[prefix.len()..]) else {
                    continue;
                };
                let stored =
                    self.shared
                        .decode_or_keep_aside(&k, &v, "the conversation starts afresh")?;
                if stored.conversation.is_some() {
                    out.push((from.to_owned(), stored));
                }
            }
            Ok(out)
        })
    }

    fn conversation_keys(
        &self,
        after: Option<&ConvKey>,
        limit: usize,
    ) -> Result<Vec<ConvKey>, StoreError> {
        const PREFIX: &[u8] = b"c\0";
        self.shared.with_db(|db| {
            let start = match after {
                // The smallest key after `after`'s.
                Some(k) => {
                    let mut s = k.db_key();
                    s.push(0);
                    s
                }
                None => PREFIX.to_vec(),
            };
            let mut out = Vec::new();
            for item in db.range(start..) {
                if out.len() >= limit {
                    break;
                }
                let (k, _) = item?;
                let Some(rest) = k.strip_prefix(PREFIX) else {
                    break;
                };
                let Some(i) = rest.iter().position(|b| *b == 0) else {
                    continue;
                };
                let (Ok(to), Ok(from)) = (
                    std::str::from_utf8(&rest[..i]),
                    std::str::from_utf8(&rest[i + 1..]),
                ) else {
                    continue;
                };
                out.push(ConvKey::new(to, from));
            }
            Ok(out)
        })
    }

    fn start_record(&self, key: &str) -> Result<Option<StartRecord>, StoreError> {
        self.shared.with_db(|db| starts::get(db, key))
    }

    fn commit_start(
        &self,
        commit: Option<StateCommit<'_>>,
        entries: &[OutboxEntry],
        record: &StartRecord,
    ) -> Result<Option<StartRecord>, StoreError> {
        let Some(c) = commit else {
            let done = self
                .shared
                .with_trees(|db, tree| starts::commit(db, tree, entries, None, &[], record))?;
            self.shared.outbox_changed(done.depth);
            if done.taken.is_none() {
                self.shared.wrote();
            }
            return Ok(done.taken);
        };
        let value = conv_value(c.at, c.ended, c.conversation, c.due, c.recent);
        let k = c.key.db_key();
        let extra = results::rows(c.results);
        let mut taken = None;
        let mut depth = 0;
        let old = self.shared.with_trees(|db, tree| {
            self.shared.write_conversation(db, c.key, c.due, || {
                let done = starts::commit(db, tree, entries, Some((&k, &value)), &extra, record)?;
                taken = done.taken;
                depth = done.depth;
                Ok(done.old)
            })
        })?;
        self.shared.outbox_changed(depth);
        if taken.is_none() {
            self.shared.count_change(old.as_deref(), Some(&value));
        }
        Ok(taken)
    }

    fn results(&self, flow: &str, since: i64) -> Result<Vec<RunResult>, StoreError> {
        let held = self.shared.result_files.lock();
        let mut out: Vec<RunResult> = self
            .shared
            .with_trees(|db, tree| self.flow_results(&held, db, tree, flow))?
            .into_values()
            .filter(|r| r.ended_at >= since)
            .collect();
        out.sort_by(|a, b| {
            (a.ended_at, &a.to, &a.contact, a.started_at).cmp(&(
                b.ended_at,
                &b.to,
                &b.contact,
                b.started_at,
            ))
        });
        Ok(out)
    }

    fn contact_conversations(&self, number: &str) -> Result<Vec<ConvKey>, StoreError> {
        self.shared.with_db(|db| {
            let mut out = Vec::new();
            for item in db.scan_prefix(b"c\0") {
                let (k, _) = item?;
                if let Some(key) = ConvKey::from_db_key(&k) {
                    if key.from == number {
                        out.push(key);
                    }
                }
            }
            Ok(out)
        })
    }

    fn all_conversations(&self) -> Result<Vec<(ConvKey, i64, StoredConversation)>, StoreError> {
        self.shared.with_db(|db| {
            let mut out = Vec::new();
            for item in db.scan_prefix(b"c\0") {
                let (k, v) = item?;
                let Some(key) = ConvKey::from_db_key(&k) else {
                    continue;
                };
                let at = conv_header(&v).map_or(0, |(at, _)| at);
                match decode_conv(&v) {
                    Ok(stored) => out.push((key, at, stored)),
                    Err(reason) => {
                        self.shared
                            .keep_aside(&k, &v, reason, "it is left out of exports")?
                    }
                }
            }
            Ok(out)
        })
    }

    fn forget_contact(&self, number: &str, audit: &AuditRecord) -> Result<Forgotten, StoreError> {
        let held = self.shared.result_files.lock();
        let mut gone = Forgotten {
            log_lines: self.shared.log.forget(number)?,
            results: self
                .shared
                .result_files
                .remove(&held, |r| r.contact == number)
                .map_err(|e| StoreError::Backend(format!("erasing flow results: {e}")))?,
            ..Forgotten::default()
        };
        let mut depth = 0;
        let result = self.shared.with_trees(|db, tree| {
            for key in self.contact_conversations(number)? {
                let k = key.db_key();
                if let Some(old) = db.remove(&k)? {
                    if let Some(due) = conv_due(&old) {
                        db.remove(timer_key(due, &key))?;
                    }
                    self.shared.count_change(Some(&old[..]), None);
                    gone.conversations += 1;
                }
            }
            for rows in results::trees(db, tree) {
                for (k, r) in self.scan::<RunResult>(rows, results::PREFIX)? {
                    if r.contact == number {
                        rows.remove(k)?;
                        gone.results += 1;
                    }
                }
            }
            for (k, s) in self.scan::<DeliveryStatus>(db, b"s\0")? {
                if s.to.as_deref() == Some(number) {
                    let sid = String::from_utf8_lossy(&k[2..]).into_owned();
                    for item in db.scan_prefix(two_part(b"l\0", &sid, "")) {
                        let (ek, _) = item?;
                        db.remove(ek)?;
                        gone.status_events += 1;
                    }
                    db.remove(k)?;
                    gone.statuses += 1;
                }
            }
            for (_, e) in self.scan::<OutboxEntry>(db, outbox::PREFIX)? {
                if e.to == number {
                    // With its index entry and its broadcast's count, at
                    // once: a broadcast never waits for an erased entry.
                    let (removed, change) = outbox::remove(db, &e.key)?;
                    depth += change;
                    gone.outbox += usize::from(removed);
                }
            }
            for (k, s) in self.scan::<StartRecord>(db, starts::PREFIX)? {
                if s.to == number {
                    db.remove(k)?;
                    gone.starts += 1;
                }
            }
            let mut audit_key = Vec::with_capacity(18);
            audit_key.extend_from_slice(b"a\0");
            audit_key.extend_from_slice(&audit.at.to_be_bytes());
            audit_key.extend_from_slice(&db.generate_id()?.to_be_bytes());
            db.insert(audit_key, encode(audit))?;
            Ok(())
        });
        self.shared.outbox_changed(depth);
        self.shared.wrote();
        result.map(|()| gone)
    }
}

pub(super) fn reopened() -> StoreError {
    StoreError::Unavailable(
        "the store was reopened after a failure; writes before it may be lost".into(),
    )
}
