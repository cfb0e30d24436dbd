//! [`PgStore`]: the [`Store`] on PostgreSQL, for several smsflow
//! instances behind one URL (sled allows one process). Chosen with
//! `--store postgres://…` (or `SMSFLOW_DATABASE_URL`).
//!
//! The tables (`migrations/0001_init.sql`, `0002_…`) hold the same
//! records as sled's key prefixes: a row per conversation (its bytes, its
//! next due time and its recent answers, written by one statement, so a
//! message's state change and its dedupe record are atomic as in sled),
//! the message log as a table (sled: `messages.jsonl`; with the message
//! texts when kept), delivery statuses and events, consent and its audit,
//! the outbox, call jobs, flow starts, flow results (written in the
//! transaction of the conversation change that ended the run), and
//! records kept aside. Outbox tallies are not stored: each outbox row
//! names its tally ([`super::tally_of`]) and `outbox_tallies` counts them
//! by an index, so they change in the transaction of every outbox write. JSON records are the same versioned bytes as in sled
//! (`crate::versioned`), beside the columns the queries need.
//!
//! Schema: versioned SQL files in `migrations/`, applied in order at
//! startup under a session advisory lock (two instances starting together
//! do not race) and recorded in `schema_migrations`; `smsflow migrate`
//! applies them explicitly. A database already at a version newer than
//! this release knows is refused.
//!
//! Durability: a commit is durable once its transaction committed. In
//! `flush` durability every session runs with `synchronous_commit = on`,
//! so [`Store::flush`] has nothing left to do; in `relaxed` with `off`
//! (PostgreSQL writes the WAL within a few hundred milliseconds), and
//! [`Store::flush_durable`] commits a transaction with
//! `synchronous_commit = on`, which waits for the WAL up to it, everything
//! earlier included.
//!
//! The trait's methods are synchronous (sled answers from memory); here
//! each runs its queries on the store's own small tokio runtime, which
//! also owns the connection pool (`Bridge`): the caller's thread waits,
//! through `block_in_place` on a multi-thread runtime worker, so no
//! runtime is ever started from within another one. Every operation gives
//! up after [`OP_TIMEOUT`].
//!
//! Faults: an operation that cannot reach the database marks the store
//! failed (`/readyz` answers 503, webhooks get 503 and Twilio retries);
//! a probe once a second clears it when the database answers again, with
//! no restart. The counts health checks read (conversations, pending
//! timers, outbox depth) are counted by the same probe, so they are up to
//! a second old after this instance's writes, up to five after other
//! instances'.
//!
//! Several instances: conversations are serialised across instances by a
//! per-conversation session advisory lock ([`PgStore::lock_conversation`]),
//! and every conversation write made under it commits on the lock's own
//! session, so a holder whose session died (and with it the lock) cannot
//! commit (`lock.rs`); the outbox is claimed by compare-and-swap in a
//! transaction holding the row (`update_outbound`), so two instances never
//! send one entry.

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::call_jobs::{CallJob, CallJobState};
use super::outbox::{OutboxEntry, OutboxState};
use super::records::{decode, encode, RecentAnswers};
use super::starts::StartRecord;
use super::{
    tally_of, AuditRecord, Commit, ConsentChange, ConvKey, DeliveryStatus, DueTimer, Durability,
    Epoch, Forgotten, OptOut, OutboxTally, Processed, Purged, RunResult, StateCommit, StatusEvent,
    StatusUpdate, Store, StoreError, StoreHealth, StoredConversation,
};
use crate::clock::unix_now;

mod copy;
mod lock;
mod schema;

pub use copy::{copy_from_sled, Copied};
pub use lock::ConvLock;
pub use schema::{migrate, MIGRATIONS};

/// How long one store operation may take before it fails (the database
/// is then unreachable or overloaded; the webhook gets 503).
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings for opening the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// When a write counts as done (`synchronous_commit` on or off).
    pub durability: Durability,
    /// Most connections this instance holds for queries; as many again
    /// may hold conversation locks.
    pub pool_size: usize,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            durability: Durability::Flush,
            pool_size: 16,
        }
    }
}

/// The URL with its password replaced by `***` (in the user part and in
/// a `password=` parameter), for logs and `/status`.
pub fn redact_url(url: &str) -> String {
    // postgres://user:password@host/db?password=…
    let (url, query) = match url.split_once('?') {
        Some((u, q)) => (u, Some(q)),
        None => (url, None),
    };
    let mut out = match url.split_once("://") {
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) => {
                let (creds, host) = rest.split_at(at);
                match creds.split_once(':') {
                    Some((user, _)) => format!("{scheme}://{user}:***{host}"),
                    None => format!("{scheme}://{rest}"),
                }
            }
            None => format!("{scheme}://{rest}"),
        },
        None => url.to_string(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Whether `s` names a PostgreSQL database (`postgres://` or
/// `postgresql://`).
pub fn is_database_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The PostgreSQL-backed [`Store`].
pub struct PgStore {
    inner: Arc<Inner>,
    bridge: Bridge,
}

/// What the store's callers and its probe share.
struct Inner {
    pool: Pool,
    /// The connections holding conversation locks (`lock.rs`): a pool of
    /// their own, so that conversations holding every lock connection
    /// still find connections for their queries.
    locks: Pool,
    /// The sessions of the conversation locks this instance holds: the
    /// conversation writes made under a lock run on its session
    /// (`lock.rs`).
    held: Arc<lock::Registry>,
    durability: Durability,
    url: String,
    failure: Mutex<Option<(String, i64)>>,
    quarantined: AtomicU64,
    conversations: AtomicI64,
    timers: AtomicI64,
    outbox_depth: AtomicI64,
    /// A write happened since the last count: the probe counts again.
    dirty: AtomicBool,
    /// Durable flushes in relaxed durability (`/metrics`).
    flush_latency: crate::metrics::Histogram,
}

/// The store's own runtime: the pool's connections live on it, and every
/// operation runs on it while the caller's thread waits.
struct Bridge {
    rt: Option<tokio::runtime::Runtime>,
}

impl Bridge {
    fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("smsflow-pg")
            .enable_all()
            .build()?;
        Ok(Bridge { rt: Some(rt) })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the store")
    }

    /// Run `fut` on the store's runtime and wait for it, from any thread:
    /// outside a runtime directly; on a multi-thread runtime's worker
    /// through `block_in_place` (its other tasks move to another thread
    /// meanwhile); on a current-thread runtime (tests, tools) from a
    /// scoped thread, since that runtime cannot be blocked in place.
    fn block<T: Send>(&self, fut: impl Future<Output = T> + Send) -> T {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let rt = self.rt();
        match Handle::try_current() {
            Err(_) => rt.block_on(fut),
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| rt.block_on(fut))
            }
            Ok(_) => std::thread::scope(|s| {
                s.spawn(|| rt.block_on(fut))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            }),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's context panics; this
        // never blocks.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let transient = match e.code() {
            None => true,
            Some(code) => {
                let c = code.code();
                // Connection, operator intervention (a restart), resources,
                // and serialisation conflicts: retrying later may succeed.
                c.starts_with("08")
                    || c.starts_with("57")
                    || c.starts_with("53")
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
            }
        };
        if transient {
            StoreError::Unavailable(format!("database: {e}"))
        } else {
            StoreError::Backend(format!("database: {e}"))
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Unavailable(format!("database: {other}")),
        }
    }
}

/// A text column's value as an `i64` row cell (counts come back as
/// `bigint`).
fn int(row: &Row, i: usize) -> i64 {
    row.get::<_, i64>(i)
}

/// The `state` column and due time of an outbox entry.
fn outbox_columns(state: &OutboxState) -> (&'static str, Option<i64>) {
    match state {
        OutboxState::Pending { not_before, .. } => ("pending", Some(*not_before)),
        OutboxState::Sending { .. } => ("sending", None),
        OutboxState::Sent { .. } => ("sent", None),
        OutboxState::Failed { .. } => ("failed", None),
        OutboxState::Skipped { .. } => ("skipped", None),
        OutboxState::Unknown { .. } => ("unknown", None),
    }
}

/// A call job's due time while it is pending.
fn call_job_due(job: &CallJob) -> Option<i64> {
    match job.state {
        CallJobState::Pending { not_before, .. } => Some(not_before),
        _ => None,
    }
}

const UPSERT_CONVERSATION: &str = "INSERT INTO conversations \
     (to_number, from_number, at, ended, conversation, due, recent) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (to_number, from_number) DO UPDATE SET at = EXCLUDED.at, \
     ended = EXCLUDED.ended, conversation = EXCLUDED.conversation, \
     due = EXCLUDED.due, recent = EXCLUDED.recent";

const INSERT_LOG: &str = "INSERT INTO message_log \
     (sid, at, from_number, to_number, outcome, flow, step, body, replies) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

const INSERT_OUTBOX: &str = "INSERT INTO outbox (key, state, not_before, record, tally) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING";

/// A run result written again (same flow, start, conversation and
/// position) replaces itself, as sled's key does.
const UPSERT_RESULT: &str = "INSERT INTO results \
     (flow, started_at, to_number, from_number, position, ended_at, record) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (flow, started_at, to_number, from_number, position) \
     DO UPDATE SET ended_at = EXCLUDED.ended_at, record = EXCLUDED.record";

/// The columns of the message log a [`Processed`] is read from.
const LOG_COLUMNS: &str = "at, from_number, to_number, outcome, flow, step, body, replies";

/// A [`Processed`] from [`LOG_COLUMNS`], starting at column `i`.
fn processed_at(r: &Row, i: usize) -> Processed {
    Processed {
        twiml: String::new(),
        at: r.get(i),
        from: r.get(i + 1),
        to: r.get(i + 2),
        outcome: r.get(i + 3),
        flow: r.get(i + 4),
        step: r.get(i + 5),
        body: r.get(i + 6),
        replies: r.get(i + 7),
    }
}

/// Count `n` entries in the state named `state` (the `state` column).
fn tally_add(tally: &mut OutboxTally, state: &str, n: u64) {
    let slot = match state {
        "pending" => &mut tally.pending,
        "sending" => &mut tally.sending,
        "sent" => &mut tally.sent,
        "failed" => &mut tally.failed,
        "skipped" => &mut tally.skipped,
        "unknown" => &mut tally.unknown,
        _ => return,
    };
    *slot += n;
}

/// Run `sql` with `params` on `c`, the statement prepared once per
/// connection.
async fn exec(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.execute(&st, params).await?)
}

async fn query(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, params).await?)
}

async fn query_opt(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&st, params).await?)
}

/// Write a consent change: its state and its audit record.
async fn write_consent(c: &impl GenericClient, change: &ConsentChange) -> Result<(), StoreError> {
    exec(
        c,
        "INSERT INTO consent (scope, number, record) VALUES ($1, $2, $3) \
         ON CONFLICT (scope, number) DO UPDATE SET record = EXCLUDED.record",
        &[&change.scope, &change.number, &encode(&change.state)],
    )
    .await?;
    exec(
        c,
        "INSERT INTO consent_audit (at, record) VALUES ($1, $2)",
        &[&change.audit.at, &encode(&change.audit)],
    )
    .await?;
    Ok(())
}

/// Write a conversation row (a [`StateCommit`]) and its run results; the
/// caller's transaction makes them one write.
async fn write_state(c: &impl GenericClient, s: &StateCommit<'_>) -> Result<(), StoreError> {
    for (n, r) in s.results.iter().enumerate() {
        let position = i16::try_from(n).unwrap_or(i16::MAX);
        exec(
            c,
            UPSERT_RESULT,
            &[
                &r.flow,
                &r.started_at.max(0),
                &r.to,
                &r.contact,
                &position,
                &r.ended_at,
                &encode(r),
            ],
        )
        .await?;
    }
    exec(
        c,
        UPSERT_CONVERSATION,
        &[
            &s.key.to,
            &s.key.from,
            &s.at,
            &s.ended,
            &s.conversation,
            &s.due,
            &s.recent.0,
        ],
    )
    .await?;
    Ok(())
}

/// Insert outbox entries whose keys are new; how many were.
async fn insert_outbox(
    c: &impl GenericClient,
    entries: &[OutboxEntry],
) -> Result<usize, StoreError> {
    let mut new = 0;
    for e in entries {
        let (state, due) = outbox_columns(&e.state);
        let tally = tally_of(&e.key);
        new += exec(
            c,
            INSERT_OUTBOX,
            &[&e.key, &state, &due, &encode(e), &tally],
        )
        .await? as usize;
    }
    Ok(new)
}

impl PgStore {
    /// Connect to the database at `url` (`postgres://user:password@host:port/db`;
    /// `?sslmode=require` for TLS, the server's certificate checked against
    /// the Mozilla root certificates), apply the migrations this release
    /// has that the database lacks, and start the health probe.
    pub fn open(url: &str, config: &PgConfig) -> Result<PgStore, StoreError> {
        let store = PgStore::connect(url, config)?;
        store.run(async {
            let client = store.inner.pool.get().await?;
            schema::apply(&client).await?;
            store.inner.count(&client).await
        })?;
        let probe = store.inner.clone();
        store
            .bridge
            .rt()
            .spawn(async move { probe.probe_forever().await });
        Ok(store)
    }

    /// The pool and runtime, before migrations and without the probe.
    fn connect(url: &str, config: &PgConfig) -> Result<PgStore, StoreError> {
        let bridge = Bridge::new().map_err(|e| StoreError::Io(format!("starting: {e}")))?;
        let inner = Arc::new(Inner {
            pool: pool(url, config)?,
            locks: pool(url, config)?,
            held: Arc::default(),
            durability: config.durability,
            url: redact_url(url),
            failure: Mutex::new(None),
            quarantined: AtomicU64::new(0),
            conversations: AtomicI64::new(0),
            timers: AtomicI64::new(0),
            outbox_depth: AtomicI64::new(0),
            dirty: AtomicBool::new(false),
            flush_latency: crate::metrics::Histogram::default(),
        });
        Ok(PgStore { inner, bridge })
    }

    /// Connect to use what the servers on `url` keep there, from a
    /// command that runs without a server (`smsflow messages`, `export`,
    /// `forget` with `--store`): nothing is migrated, and a database whose
    /// schema is not this release's is refused. No health probe runs.
    pub fn open_existing(url: &str) -> Result<PgStore, StoreError> {
        let store = PgStore::open_unmigrated(url)?;
        let version = store.run(async {
            let c = store.inner.pool.get().await?;
            let row = query_opt(
                &c,
                "SELECT to_regclass('schema_migrations') IS NOT NULL",
                &[],
            )
            .await?;
            if !row.is_some_and(|r| r.get::<_, bool>(0)) {
                return Ok(0);
            }
            schema::current(&c).await
        })?;
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        match version.cmp(&newest) {
            std::cmp::Ordering::Equal => Ok(store),
            std::cmp::Ordering::Less => Err(StoreError::Backend(format!(
                "the database's schema is at version {version}, this release's is {newest}: \
                 run `smsflow migrate` (or start a server of this release on it) first"
            ))),
            std::cmp::Ordering::Greater => Err(StoreError::Backend(format!(
                "the database's schema is at version {version}, newer than this release \
                 knows ({newest}): use the release that migrated it, or a newer one"
            ))),
        }
    }

    /// Connected, not migrated (`smsflow migrate`).
    fn open_unmigrated(url: &str) -> Result<PgStore, StoreError> {
        PgStore::connect(
            url,
            &PgConfig {
                pool_size: 2,
                ..PgConfig::default()
            },
        )
    }

    /// Run `fut` on the store's runtime within [`OP_TIMEOUT`]; a failure
    /// to reach the database marks the store failed until the probe
    /// reaches it again.
    fn run<T: Send>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        let result = self.bridge.block(async {
            match tokio::time::timeout(OP_TIMEOUT, fut).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Unavailable(format!(
                    "the database did not answer within {} s",
                    OP_TIMEOUT.as_secs()
                ))),
            }
        });
        if let Err(StoreError::Unavailable(e)) = &result {
            self.inner.fail(e);
        }
        result
    }

    /// The durability mode the store was opened with.
    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// How long durable flushes took (relaxed durability; in flush
    /// durability each commit waits for its WAL instead).
    pub(crate) fn flush_latency(&self) -> &crate::metrics::Histogram {
        &self.inner.flush_latency
    }

    /// The database URL, its password hidden.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The schema version the database is at (the newest migration
    /// applied).
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            schema::current(&c).await
        })
    }

    /// Count the conversations, timers and outbox entries now, rather
    /// than at the probe's next round (tests, tools).
    pub fn recount(&self) -> Result<(), StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            self.inner.count(&c).await
        })
    }

    /// The store's health, in constant time (see the module doc).
    pub fn health(&self) -> StoreHealth {
        let failure = self
            .inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        StoreHealth {
            writable: failure.is_none(),
            error: failure.as_ref().map(|f| f.0.clone()),
            failed_since: failure.map(|f| f.1),
            quarantined: self.inner.quarantined.load(Ordering::Relaxed),
            conversations: self.inner.conversations.load(Ordering::Relaxed).max(0) as usize,
            reopens: 0,
            pending_timers: self.inner.timers.load(Ordering::Relaxed).max(0) as usize,
            fsyncs: 0,
            results_moved: 0,
            results_move_failures: 0,
        }
    }

    /// Decode a record read from `table`, or keep it aside (in the
    /// `quarantine` table) and say so: `then` is what that means.
    async fn decoded<T: crate::versioned::Versioned>(
        &self,
        c: &impl GenericClient,
        (table, key): (&str, &str),
        bytes: &[u8],
        then: &str,
    ) -> Result<Option<T>, StoreError> {
        match decode::<T>(bytes) {
            Ok(v) => Ok(Some(v)),
            Err(reason) => {
                self.keep(c, table, key, bytes, &reason, then).await?;
                Ok(None)
            }
        }
    }

    async fn keep(
        &self,
        c: &impl GenericClient,
        kind: &str,
        key: &str,
        bytes: &[u8],
        reason: &str,
        then: &str,
    ) -> Result<(), StoreError> {
        // Once per record and reason: a record read again and again is
        // kept once.
        let new = exec(
            c,
            "INSERT INTO quarantine (at, kind, key, reason, record) \
             SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM quarantine \
             WHERE kind = $2 AND key = $3 AND reason = $4 AND record = $5)",
            &[&unix_now(), &kind, &key, &reason, &bytes],
        )
        .await?;
        if new > 0 {
            self.inner.quarantined.fetch_add(1, Ordering::Relaxed);
            tracing::error!(kind, key, reason, then, "undecodable record kept aside");
        }
        Ok(())
    }

    fn wrote(&self) {
        self.inner.dirty.store(true, Ordering::Relaxed);
    }
}

fn pool(url: &str, config: &PgConfig) -> Result<Pool, StoreError> {
    let mut pg = tokio_postgres::Config::from_str(url).map_err(|e| {
        StoreError::Backend(format!(
            "the database URL {} does not parse: {e}",
            redact_url(url)
        ))
    })?;
    let sync = match config.durability {
        Durability::Flush => "on",
        Durability::Relaxed => "off",
    };
    let options = format!(
        "{} -c synchronous_commit={sync}",
        pg.get_options().unwrap_or_default()
    );
    pg.options(options.trim_start());
    if pg.get_application_name().is_none() {
        pg.application_name("smsflow");
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    pg.keepalives(true);
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match pg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Require => {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Backend(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Manager::from_config(
                pg,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                manager_config,
            )
        }
        _ => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(config.pool_size.max(2))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(OP_TIMEOUT))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StoreError::Backend(format!("database pool: {e}")))
}

impl Inner {
    fn fail(&self, error: &str) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_none() {
            tracing::error!(
                database = %self.url,
                error,
                "database unreachable: webhooks get 503 until it answers again (probed every second)"
            );
            *failure = Some((error.to_string(), unix_now()));
        }
    }

    fn recovered(&self) {
        let was = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((_, since)) = was {
            tracing::info!(
                database = %self.url,
                failed_for_secs = unix_now() - since,
                "database reachable again"
            );
        }
    }

    async fn count(&self, c: &impl GenericClient) -> Result<(), StoreError> {
        self.dirty.store(false, Ordering::Relaxed);
        let row = query_opt(
            c,
            "SELECT (SELECT count(*) FROM conversations WHERE conversation IS NOT NULL), \
             (SELECT count(*) FROM conversations WHERE due IS NOT NULL), \
             (SELECT count(*) FROM outbox WHERE state IN ('pending', 'sending')), \
             (SELECT count(*) FROM quarantine)",
            &[],
        )
        .await?
        .ok_or_else(|| StoreError::Backend("counting returned no row".into()))?;
        self.conversations.store(int(&row, 0), Ordering::Relaxed);
        self.timers.store(int(&row, 1), Ordering::Relaxed);
        self.outbox_depth.store(int(&row, 2), Ordering::Relaxed);
        self.quarantined
            .store(int(&row, 3).max(0) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Once a second: reach the database (clearing a failure when it
    /// answers) and, when this instance wrote since or five seconds
    /// passed (other instances write too), count.
    async fn probe_forever(self: Arc<Self>) {
        let mut counted = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let recount =
                self.dirty.load(Ordering::Relaxed) || counted.elapsed() >= Duration::from_secs(5);
            let round = async {
                let c = self.pool.get().await?;
                if recount {
                    self.count(&c).await
                } else {
                    c.simple_query("SELECT 1").await?;
                    Ok(())
                }
            };
            match tokio::time::timeout(Duration::from_secs(3), round).await {
                Ok(Ok(())) => {
                    if recount {
                        counted = std::time::Instant::now();
                    }
                    self.recovered();
                }
                Ok(Err(e)) => self.fail(&e.to_string()),
                Err(_) => self.fail("the database did not answer the probe within 3 s"),
            }
        }
    }
}

impl Store for PgStore {
    fn load(&self, key: &ConvKey) -> Result<StoredConversation, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let row = query_opt(
                &c,
                "SELECT conversation, due, recent FROM conversations \
                 WHERE to_number = $1 AND from_number = $2",
                &[&key.to, &key.from],
            )
            .await?;
            Ok(match row {
                Some(row) => StoredConversation {
                    conversation: row.get(0),
                    due: row.get(1),
                    recent: RecentAnswers(row.get(2)),
                },
                None => StoredConversation::default(),
            })
        })
    }

    fn keep_aside(&self, key: &ConvKey, reason: &str) -> Result<(), StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let row = query_opt(
                &c,
                "SELECT conversation FROM conversations WHERE to_number = $1 AND from_number = $2",
                &[&key.to, &key.from],
            )
            .await?;
            if let Some(bytes) = row.and_then(|r| r.get::<_, Option<Vec<u8>>>(0)) {
                let k = format!("{}/{}", key.to, key.from);
                self.keep(
                    &c,
                    "conversation",
                    &k,
                    &bytes,
                    reason,
                    "the conversation starts afresh",
                )
                .await?;
            }
            Ok(())
        })
    }

    fn processed(&self, message_sid: &str) -> Result<Option<Processed>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let sql = format!(
                "SELECT {LOG_COLUMNS} FROM message_log WHERE sid = $1 ORDER BY id DESC LIMIT 1"
            );
            let row = query_opt(&c, &sql, &[&message_sid]).await?;
            Ok(row.map(|r| processed_at(&r, 0)))
        })
    }

    fn commit(&self, c: Commit<'_>) -> Result<(), StoreError> {
        let recent = c.recent_answers();
        let p = c.processed;
        let state = StateCommit {
            key: c.key,
            conversation: c.conversation,
            ended: c.ended,
            due: c.due,
            recent: &recent,
            at: p.at,
            results: c.results,
        };
        // On the lock's session when this instance holds the lock (it
        // does, under the pipeline): a holder whose lock is gone cannot
        // commit (`lock.rs`).
        let session = self.held_session(c.key);
        self.run(async {
            let mut client = self.conn(session).await?;
            let written = async {
                let tx = client.transaction().await?;
                write_state(&tx, &state).await?;
                if let Some(change) = &c.consent {
                    write_consent(&tx, change).await?;
                }
                exec(
                    &tx,
                    INSERT_LOG,
                    &[
                        &c.message_sid,
                        &p.at,
                        &p.from,
                        &p.to,
                        &p.outcome,
                        &p.flow,
                        &p.step,
                        &p.body,
                        &p.replies,
                    ],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }
            .await;
            client.fenced(written)
        })?;
        self.wrote();
        Ok(())
    }

    fn epoch(&self) -> Epoch {
        // Nothing is reopened: a committed transaction stays committed.
        Epoch(0)
    }

    async fn flush(&self, _since: Epoch) -> Result<(), StoreError> {
        // Flush: every commit waited for its WAL (synchronous_commit on).
        // Relaxed: PostgreSQL writes the WAL on its own shortly.
        Ok(())
    }

    fn record_status(
        &self,
        message_sid: &str,
        status: &DeliveryStatus,
    ) -> Result<StatusUpdate, StoreError> {
        let event = StatusEvent {
            status: status.status.clone(),
            error_code: status.error_code.clone(),
            at: status.updated_at,
        };
        let update = self.run(async {
            let mut client = self.inner.pool.get().await?;
            exec(
                &client,
                "INSERT INTO status_events (message_sid, at, record) VALUES ($1, $2, $3)",
                &[&message_sid, &event.at, &encode(&event)],
            )
            .await?;
            // The row locked (or inserted) in one transaction: two
            // callbacks for one message at once cannot let the lower rank
            // win.
            loop {
                let tx = client.transaction().await?;
                let row = query_opt(
                    &tx,
                    "SELECT record FROM delivery_status WHERE message_sid = $1 FOR UPDATE",
                    &[&message_sid],
                )
                .await?;
                let mut next = status.clone();
                let existed = row.is_some();
                if let Some(row) = row {
                    let bytes: Vec<u8> = row.get(0);
                    let old: Option<DeliveryStatus> = self
                        .decoded(
                            &tx,
                            ("delivery_status", message_sid),
                            &bytes,
                            "this callback's status replaces it",
                        )
                        .await?;
                    if let Some(old) = old {
                        if status.rank <= old.rank {
                            return Ok(StatusUpdate::Stale {
                                current: old.status,
                            });
                        }
                        next.inbound_sid = next.inbound_sid.or(old.inbound_sid);
                        next.flow = next.flow.or(old.flow);
                        next.step = next.step.or(old.step);
                    }
                }
                let rank = i16::from(next.rank);
                let sql = if existed {
                    "UPDATE delivery_status SET rank = $2, updated_at = $3, record = $4 \
                     WHERE message_sid = $1"
                } else {
                    "INSERT INTO delivery_status (message_sid, rank, updated_at, record) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (message_sid) DO NOTHING"
                };
                let n = exec(
                    &tx,
                    sql,
                    &[&message_sid, &rank, &next.updated_at, &encode(&next)],
                )
                .await?;
                if n == 1 {
                    tx.commit().await?;
                    return Ok(StatusUpdate::Applied);
                }
                // Another instance inserted it meanwhile: read it again.
            }
        })?;
        self.wrote();
        Ok(update)
    }

    fn delivery_status(&self, message_sid: &str) -> Result<Option<DeliveryStatus>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let row = query_opt(
                &c,
                "SELECT record FROM delivery_status WHERE message_sid = $1",
                &[&message_sid],
            )
            .await?;
            match row {
                Some(row) => {
                    let bytes: Vec<u8> = row.get(0);
                    self.decoded(
                        &c,
                        ("delivery_status", message_sid),
                        &bytes,
                        "it reads as unknown",
                    )
                    .await
                }
                None => Ok(None),
            }
        })
    }

    fn conversation_count(&self) -> usize {
        self.inner.conversations.load(Ordering::Relaxed).max(0) as usize
    }

    fn health(&self) -> StoreHealth {
        PgStore::health(self)
    }

    fn opt_out(&self, scope: &str, number: &str) -> Result<Option<OptOut>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let row = query_opt(
                &c,
                "SELECT record FROM consent WHERE scope = $1 AND number = $2",
                &[&scope, &number],
            )
            .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let bytes: Vec<u8> = row.get(0);
            let key = format!("{scope}/{number}");
            let then = "the number is treated as opted out until it texts START";
            // Never text someone who may have opted out.
            Ok(Some(
                self.decoded::<OptOut>(&c, ("consent", &key), &bytes, then)
                    .await?
                    .unwrap_or(OptOut {
                        opted_out: true,
                        at: 0,
                    }),
            ))
        })
    }

    fn record_consent(&self, change: &ConsentChange) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.inner.pool.get().await?;
            let tx = client.transaction().await?;
            write_consent(&tx, change).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn audit_log(&self) -> Result<Vec<AuditRecord>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT id, record FROM consent_audit ORDER BY at, id",
                &[],
            )
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let id: i64 = row.get(0);
                let bytes: Vec<u8> = row.get(1);
                let key = id.to_string();
                let then = "it is left out of listings";
                if let Some(r) = self
                    .decoded(&c, ("consent_audit", &key), &bytes, then)
                    .await?
                {
                    out.push(r);
                }
            }
            Ok(out)
        })
    }

    fn status_events(&self, message_sid: &str) -> Result<Vec<StatusEvent>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT id, record FROM status_events WHERE message_sid = $1 ORDER BY id",
                &[&message_sid],
            )
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let id: i64 = row.get(0);
                let bytes: Vec<u8> = row.get(1);
                let key = format!("{message_sid}/{id}");
                let then = "it is left out of listings";
                if let Some(r) = self
                    .decoded(&c, ("status_events", &key), &bytes, then)
                    .await?
                {
                    out.push(r);
                }
            }
            Ok(out)
        })
    }

    fn inbound_log(&self) -> Result<Vec<(String, Processed)>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let sql =
                format!("SELECT sid, {LOG_COLUMNS} FROM message_log ORDER BY at DESC, sid DESC");
            let rows = query(&c, &sql, &[]).await?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get(0), processed_at(&r, 1)))
                .collect())
        })
    }

    fn outbound_log(&self) -> Result<Vec<(String, DeliveryStatus)>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT message_sid, record FROM delivery_status \
                 ORDER BY updated_at DESC, message_sid DESC",
                &[],
            )
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let sid: String = row.get(0);
                let bytes: Vec<u8> = row.get(1);
                let then = "it is left out of listings";
                if let Some(s) = self
                    .decoded(&c, ("delivery_status", &sid), &bytes, then)
                    .await?
                {
                    out.push((sid, s));
                }
            }
            Ok(out)
        })
    }

    fn purge(&self, cutoff: i64) -> Result<Purged, StoreError> {
        let purged = self.run(async {
            let mut client = self.inner.pool.get().await?;
            let tx = client.transaction().await?;
            let n = |v: u64| v as usize;
            let purged = Purged {
                processed: n(exec(&tx, "DELETE FROM message_log WHERE at < $1", &[&cutoff]).await?),
                statuses: n(exec(
                    &tx,
                    "DELETE FROM delivery_status WHERE updated_at < $1",
                    &[&cutoff],
                )
                .await?),
                status_events: n(
                    exec(&tx, "DELETE FROM status_events WHERE at < $1", &[&cutoff]).await?,
                ),
                conversations: n(exec(
                    &tx,
                    "DELETE FROM conversations WHERE at < $1 \
                     AND (ended OR conversation IS NULL)",
                    &[&cutoff],
                )
                .await?),
                results: n(exec(&tx, "DELETE FROM results WHERE ended_at < $1", &[&cutoff]).await?),
                call_jobs: self.purge_call_jobs(&tx, cutoff).await?,
            };
            tx.commit().await?;
            Ok(purged)
        })?;
        if purged != Purged::default() {
            self.wrote();
        }
        Ok(purged)
    }

    fn delete_conversation(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let session = self.held_session(key);
        let existed = self.run(async {
            let mut client = self.conn(session).await?;
            let deleted = async {
                let tx = client.transaction().await?;
                let row = query_opt(
                    &tx,
                    "SELECT conversation IS NOT NULL FROM conversations \
                     WHERE to_number = $1 AND from_number = $2 FOR UPDATE",
                    &[&key.to, &key.from],
                )
                .await?;
                let Some(row) = row else {
                    return Ok(false);
                };
                exec(
                    &tx,
                    "UPDATE conversations SET conversation = NULL, ended = true, due = NULL \
                     WHERE to_number = $1 AND from_number = $2",
                    &[&key.to, &key.from],
                )
                .await?;
                tx.commit().await?;
                Ok(row.get::<_, bool>(0))
            }
            .await;
            client.fenced(deleted)
        })?;
        self.wrote();
        Ok(existed)
    }

    fn put_conversation(
        &self,
        key: &ConvKey,
        conversation: &[u8],
        ended: bool,
        at: i64,
    ) -> Result<(), StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            exec(
                &c,
                "INSERT INTO conversations (to_number, from_number, at, ended, conversation, due) \
                 VALUES ($1, $2, $3, $4, $5, NULL) \
                 ON CONFLICT (to_number, from_number) DO UPDATE SET at = EXCLUDED.at, \
                 ended = EXCLUDED.ended, conversation = EXCLUDED.conversation, due = NULL",
                &[&key.to, &key.from, &at, &ended, &conversation],
            )
            .await?;
            Ok(())
        })?;
        self.wrote();
        Ok(())
    }

    fn commit_state(&self, s: StateCommit<'_>) -> Result<(), StoreError> {
        let session = self.held_session(s.key);
        self.run(async {
            let mut client = self.conn(session).await?;
            let written = async {
                let tx = client.transaction().await?;
                write_state(&tx, &s).await?;
                tx.commit().await?;
                Ok(())
            }
            .await;
            client.fenced(written)
        })?;
        self.wrote();
        Ok(())
    }

    fn due_timers(&self, now: i64, limit: usize) -> Result<Vec<DueTimer>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT due, to_number, from_number FROM conversations \
                 WHERE due IS NOT NULL AND due <= $1 \
                 ORDER BY due, to_number, from_number LIMIT $2",
                &[&now, &limit],
            )
            .await?;
            Ok(rows
                .into_iter()
                .map(|r| DueTimer {
                    due: r.get(0),
                    key: ConvKey::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                })
                .collect())
        })
    }

    fn next_timer(&self) -> Result<Option<i64>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let row = query_opt(
                &c,
                "SELECT min(due) FROM conversations WHERE due IS NOT NULL",
                &[],
            )
            .await?;
            Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
        })
    }

    fn remove_timer(&self, _timer: &DueTimer) -> Result<(), StoreError> {
        // The due time lives in the conversation's row only: there is no
        // separate index entry that could go stale.
        Ok(())
    }

    fn pending_timers(&self) -> usize {
        self.inner.timers.load(Ordering::Relaxed).max(0) as usize
    }

    fn enqueue_outbound(&self, entries: &[OutboxEntry]) -> Result<usize, StoreError> {
        let new = self.run(async {
            let c = self.inner.pool.get().await?;
            insert_outbox(&c, entries).await
        })?;
        if new > 0 {
            self.wrote();
        }
        Ok(new)
    }

    fn outbound(&self, key: &str) -> Result<Option<OutboxEntry>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let row = query_opt(&c, "SELECT record FROM outbox WHERE key = $1", &[&key]).await?;
            match row {
                Some(row) => {
                    let bytes: Vec<u8> = row.get(0);
                    let then = "the outbox entry is left unsent";
                    self.decoded(&c, ("outbox", key), &bytes, then).await
                }
                None => Ok(None),
            }
        })
    }

    fn enqueue_call_jobs(&self, jobs: &[CallJob]) -> Result<usize, StoreError> {
        let new = self.run(async {
            let c = self.inner.pool.get().await?;
            let mut new = 0;
            for job in jobs {
                new += exec(
                    &c,
                    "INSERT INTO call_jobs (key, not_before, record) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO NOTHING",
                    &[&job.key, &call_job_due(job), &encode(job)],
                )
                .await? as usize;
            }
            Ok(new)
        })?;
        if new > 0 {
            self.wrote();
        }
        Ok(new)
    }

    fn due_call_jobs(&self, now: i64, limit: usize) -> Result<Vec<CallJob>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT key, record FROM call_jobs WHERE not_before IS NOT NULL \
                 AND not_before <= $1 ORDER BY not_before, key LIMIT $2",
                &[&now, &limit],
            )
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let key: String = row.get(0);
                let bytes: Vec<u8> = row.get(1);
                let then = "the call is not made";
                if let Some(job) = self.decoded(&c, ("call_jobs", &key), &bytes, then).await? {
                    out.push(job);
                }
            }
            Ok(out)
        })
    }

    fn update_call_job(&self, job: &CallJob) -> Result<(), StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            exec(
                &c,
                "INSERT INTO call_jobs (key, not_before, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO UPDATE SET not_before = EXCLUDED.not_before, \
                 record = EXCLUDED.record",
                &[&job.key, &call_job_due(job), &encode(job)],
            )
            .await?;
            Ok(())
        })?;
        self.wrote();
        Ok(())
    }

    fn claim_call_job(&self, job: &CallJob, from: &CallJobState) -> Result<bool, StoreError> {
        let claimed = self.run(async {
            let mut client = self.inner.pool.get().await?;
            let tx = client.transaction().await?;
            // The row held until the commit: of two instances claiming
            // it, the second reads the first one's claim and is refused.
            let row = query_opt(
                &tx,
                "SELECT record FROM call_jobs WHERE key = $1 FOR UPDATE",
                &[&job.key],
            )
            .await?;
            let Some(row) = row else {
                return Ok(false);
            };
            let bytes: Vec<u8> = row.get(0);
            let then = "the call is not made";
            let stored: Option<CallJob> = self
                .decoded(&tx, ("call_jobs", &job.key), &bytes, then)
                .await?;
            if stored.map(|s| s.state).as_ref() != Some(from) {
                return Ok(false);
            }
            exec(
                &tx,
                "UPDATE call_jobs SET not_before = $2, record = $3 WHERE key = $1",
                &[&job.key, &call_job_due(job), &encode(job)],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })?;
        if claimed {
            self.wrote();
        }
        Ok(claimed)
    }

    fn call_job(&self, key: &str) -> Result<Option<CallJob>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let row = query_opt(&c, "SELECT record FROM call_jobs WHERE key = $1", &[&key]).await?;
            match row {
                Some(row) => {
                    let bytes: Vec<u8> = row.get(0);
                    self.decoded(&c, ("call_jobs", key), &bytes, "the call is not made")
                        .await
                }
                None => Ok(None),
            }
        })
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.outbox_where("true", &[])
    }

    fn due_outbound(&self, now: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT key, record FROM outbox WHERE state = 'pending' AND not_before <= $1 \
                 ORDER BY not_before, key LIMIT $2",
                &[&now, &limit],
            )
            .await?;
            self.outbox_rows(&c, rows).await
        })
    }

    fn update_outbound(
        &self,
        key: &str,
        from: &OutboxState,
        to: OutboxState,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        let moved = self.run(async {
            let mut client = self.inner.pool.get().await?;
            let tx = client.transaction().await?;
            // The row held until the commit: of two instances claiming it,
            // the second reads the first one's state and is refused.
            let row = query_opt(
                &tx,
                "SELECT record FROM outbox WHERE key = $1 FOR UPDATE",
                &[&key],
            )
            .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let bytes: Vec<u8> = row.get(0);
            let then = "the outbox entry is left unsent";
            let Some(mut entry) = self
                .decoded::<OutboxEntry>(&tx, ("outbox", key), &bytes, then)
                .await?
            else {
                tx.commit().await?;
                return Ok(None);
            };
            if entry.state != *from {
                return Ok(None);
            }
            entry.state = to;
            let (state, due) = outbox_columns(&entry.state);
            let tally = tally_of(key);
            exec(
                &tx,
                "UPDATE outbox SET state = $2, not_before = $3, record = $4, tally = $5 \
                 WHERE key = $1",
                &[&key, &state, &due, &encode(&entry), &tally],
            )
            .await?;
            tx.commit().await?;
            Ok(Some(entry))
        })?;
        if moved.is_some() {
            self.wrote();
        }
        Ok(moved)
    }

    fn sending_outbound(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.outbox_where("state = 'sending'", &[])
    }

    fn outbox_depth(&self) -> usize {
        self.inner.outbox_depth.load(Ordering::Relaxed).max(0) as usize
    }

    async fn flush_durable(&self, _since: Epoch) -> Result<(), StoreError> {
        if self.inner.durability == Durability::Flush {
            return Ok(());
        }
        // A transaction that writes (an xid) and commits with
        // synchronous_commit on waits for the WAL up to its commit
        // record, so everything committed before it is durable too.
        let inner = self.inner.clone();
        let started = std::time::Instant::now();
        let synced = self.bridge.rt().spawn(async move {
            let round = async {
                let mut client = inner.pool.get().await?;
                let tx = client.transaction().await?;
                tx.batch_execute("SET LOCAL synchronous_commit = on; SELECT txid_current()")
                    .await?;
                tx.commit().await?;
                Ok::<_, StoreError>(())
            };
            match tokio::time::timeout(OP_TIMEOUT, round).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Unavailable(
                    "the database did not answer a durable flush in time".into(),
                )),
            }
        });
        match synced.await {
            Ok(r) => {
                self.inner.flush_latency.observe(started.elapsed());
                r
            }
            Err(e) => Err(StoreError::Backend(format!("durable flush: {e}"))),
        }
    }

    fn conversations_of(&self, to: &str) -> Result<Vec<(String, StoredConversation)>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT from_number, conversation, due, recent FROM conversations \
                 WHERE to_number = $1 AND conversation IS NOT NULL ORDER BY from_number",
                &[&to],
            )
            .await?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    (
                        r.get(0),
                        StoredConversation {
                            conversation: r.get(1),
                            due: r.get(2),
                            recent: RecentAnswers(r.get(3)),
                        },
                    )
                })
                .collect())
        })
    }

    fn start_record(&self, key: &str) -> Result<Option<StartRecord>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let row = query_opt(&c, "SELECT record FROM starts WHERE key = $1", &[&key]).await?;
            row.map(|r| decode_start(key, &r.get::<_, Vec<u8>>(0)))
                .transpose()
        })
    }

    fn commit_start(
        &self,
        commit: Option<StateCommit<'_>>,
        entries: &[OutboxEntry],
        record: &StartRecord,
    ) -> Result<Option<StartRecord>, StoreError> {
        // The start's conversation (ours is `from`, the contact `to`): its
        // decision was made under that conversation's lock.
        let session = match &commit {
            Some(s) => self.held_session(s.key),
            None => self.held_session(&ConvKey::new(record.from.as_str(), record.to.as_str())),
        };
        let taken = self.run(async {
            let mut client = self.conn(session).await?;
            let written = async {
                let tx = client.transaction().await?;
                // Claims the key; a concurrent start with the same key waits
                // here for this transaction, then finds it taken.
                let new = exec(
                    &tx,
                    "INSERT INTO starts (key, record) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    &[&record.key, &encode(record)],
                )
                .await?;
                if new == 0 {
                    let row = query_opt(
                        &tx,
                        "SELECT record FROM starts WHERE key = $1",
                        &[&record.key],
                    )
                    .await?
                    .ok_or_else(|| StoreError::Backend("flow start record vanished".into()))?;
                    return decode_start(&record.key, &row.get::<_, Vec<u8>>(0)).map(Some);
                }
                insert_outbox(&tx, entries).await?;
                if let Some(s) = &commit {
                    write_state(&tx, s).await?;
                }
                tx.commit().await?;
                Ok(None)
            }
            .await;
            client.fenced(written)
        })?;
        if taken.is_none() {
            self.wrote();
        }
        Ok(taken)
    }

    fn call_jobs_pending(&self) -> usize {
        // The due index (partial, pending jobs only) counted, not read.
        self.run(async {
            let c = self.inner.pool.get().await?;
            let row = query_opt(
                &c,
                "SELECT count(*) FROM call_jobs WHERE not_before IS NOT NULL",
                &[],
            )
            .await?;
            Ok(row.map_or(0, |r| int(&r, 0)))
        })
        .map_or(0, |n| n.max(0) as usize)
    }

    fn outbox_with_prefix(&self, prefix: &str) -> Result<Vec<OutboxEntry>, StoreError> {
        // The key range [prefix, prefix + U+10FFFF): keys are compared
        // byte by byte (COLLATE "C"), so this reads the primary key's range.
        let end = format!("{prefix}\u{10FFFF}");
        self.outbox_where("key >= $1 AND key < $2", &[&prefix, &end])
            .map(|entries| {
                entries
                    .into_iter()
                    .filter(|e| e.key.starts_with(prefix))
                    .collect()
            })
    }

    fn outbox_tallies(&self) -> Result<Vec<(String, OutboxTally)>, StoreError> {
        // Counted from the entries by the `outbox_tally` index rather than
        // kept as counters: always in step with the entries, in every
        // transaction that writes one.
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT tally, state, count(*) FROM outbox WHERE tally IS NOT NULL \
                 GROUP BY tally, state ORDER BY tally",
                &[],
            )
            .await?;
            let mut out: Vec<(String, OutboxTally)> = Vec::new();
            for row in rows {
                let tally: String = row.get(0);
                let state: String = row.get(1);
                let n = int(&row, 2).max(0) as u64;
                if out.last().is_none_or(|(t, _)| *t != tally) {
                    out.push((tally, OutboxTally::default()));
                }
                if let Some((_, t)) = out.last_mut() {
                    tally_add(t, &state, n);
                }
            }
            Ok(out)
        })
    }

    fn results(&self, flow: &str, since: i64) -> Result<Vec<RunResult>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT started_at, to_number, from_number, position, record FROM results \
                 WHERE flow = $1 AND ended_at >= $2 \
                 ORDER BY ended_at, to_number, from_number, started_at, position",
                &[&flow, &since],
            )
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let started: i64 = row.get(0);
                let to: String = row.get(1);
                let from: String = row.get(2);
                let position: i16 = row.get(3);
                let bytes: Vec<u8> = row.get(4);
                let key = format!("{flow}/{started}/{to}/{from}/{position}");
                let then = "it is left out of exports";
                if let Some(r) = self.decoded(&c, ("results", &key), &bytes, then).await? {
                    out.push(r);
                }
            }
            Ok(out)
        })
    }

    fn contact_conversations(&self, number: &str) -> Result<Vec<ConvKey>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT to_number, from_number FROM conversations WHERE from_number = $1 \
                 ORDER BY to_number",
                &[&number],
            )
            .await?;
            Ok(rows
                .iter()
                .map(|r| ConvKey::new(r.get::<_, &str>(0), r.get::<_, &str>(1)))
                .collect())
        })
    }

    fn forget_contact(&self, number: &str, audit: &AuditRecord) -> Result<Forgotten, StoreError> {
        // On the session holding the locks of the contact's conversations
        // (`lock_contact`), when this instance holds them: an erasure whose
        // locks were lost cannot commit (`lock.rs`).
        let session = self.contact_session(number);
        let gone = self.run(async {
            let mut client = self.conn(session).await?;
            let erased = async {
                let tx = client.transaction().await?;
                let n = |v: u64| v as usize;
                let mut gone = Forgotten {
                    conversations: n(exec(
                        &tx,
                        "DELETE FROM conversations WHERE from_number = $1",
                        &[&number],
                    )
                    .await?),
                    results: n(exec(
                        &tx,
                        "DELETE FROM results WHERE from_number = $1",
                        &[&number],
                    )
                    .await?),
                    log_lines: n(exec(
                        &tx,
                        "DELETE FROM message_log WHERE from_number = $1 OR to_number = $1",
                        &[&number],
                    )
                    .await?),
                    ..Forgotten::default()
                };
                // The recipient is inside the records (as in sled, which
                // reads them all too): erasure is rare, never on the message
                // path.
                let then = "it is left as it is";
                for row in
                    query(&tx, "SELECT message_sid, record FROM delivery_status", &[]).await?
                {
                    let sid: String = row.get(0);
                    let bytes: Vec<u8> = row.get(1);
                    let status: Option<DeliveryStatus> = self
                        .decoded(&tx, ("delivery_status", &sid), &bytes, then)
                        .await?;
                    if status.is_some_and(|s| s.to.as_deref() == Some(number)) {
                        gone.status_events += n(exec(
                            &tx,
                            "DELETE FROM status_events WHERE message_sid = $1",
                            &[&sid],
                        )
                        .await?);
                        gone.statuses += n(exec(
                            &tx,
                            "DELETE FROM delivery_status WHERE message_sid = $1",
                            &[&sid],
                        )
                        .await?);
                    }
                }
                for row in query(&tx, "SELECT key, record FROM outbox", &[]).await? {
                    let key: String = row.get(0);
                    let bytes: Vec<u8> = row.get(1);
                    let entry: Option<OutboxEntry> =
                        self.decoded(&tx, ("outbox", &key), &bytes, then).await?;
                    if entry.is_some_and(|e| e.to == number) {
                        gone.outbox +=
                            n(exec(&tx, "DELETE FROM outbox WHERE key = $1", &[&key]).await?);
                    }
                }
                for row in query(&tx, "SELECT key, record FROM starts", &[]).await? {
                    let key: String = row.get(0);
                    let bytes: Vec<u8> = row.get(1);
                    let start: Option<StartRecord> =
                        self.decoded(&tx, ("starts", &key), &bytes, then).await?;
                    if start.is_some_and(|s| s.to == number) {
                        gone.starts +=
                            n(exec(&tx, "DELETE FROM starts WHERE key = $1", &[&key]).await?);
                    }
                }
                exec(
                    &tx,
                    "INSERT INTO consent_audit (at, record) VALUES ($1, $2)",
                    &[&audit.at, &encode(audit)],
                )
                .await?;
                tx.commit().await?;
                Ok(gone)
            }
            .await;
            client.fenced(erased)
        })?;
        self.wrote();
        Ok(gone)
    }

    fn all_conversations(&self) -> Result<Vec<(ConvKey, i64, StoredConversation)>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = query(
                &c,
                "SELECT to_number, from_number, at, conversation, due, recent \
                 FROM conversations ORDER BY to_number, from_number",
                &[],
            )
            .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        ConvKey::new(r.get::<_, &str>(0), r.get::<_, &str>(1)),
                        r.get(2),
                        StoredConversation {
                            conversation: r.get(3),
                            due: r.get(4),
                            recent: RecentAnswers(r.get(5)),
                        },
                    )
                })
                .collect())
        })
    }

    fn conversation_keys(
        &self,
        after: Option<&ConvKey>,
        limit: usize,
    ) -> Result<Vec<ConvKey>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async {
            let c = self.inner.pool.get().await?;
            let rows = match after {
                Some(k) => {
                    query(
                        &c,
                        "SELECT to_number, from_number FROM conversations \
                         WHERE (to_number, from_number) > ($1, $2) \
                         ORDER BY to_number, from_number LIMIT $3",
                        &[&k.to, &k.from, &limit],
                    )
                    .await?
                }
                None => {
                    query(
                        &c,
                        "SELECT to_number, from_number FROM conversations \
                         ORDER BY to_number, from_number LIMIT $1",
                        &[&limit],
                    )
                    .await?
                }
            };
            Ok(rows
                .iter()
                .map(|r| ConvKey::new(r.get::<_, &str>(0), r.get::<_, &str>(1)))
                .collect())
        })
    }
}

impl PgStore {
    /// Remove the call jobs delivered or failed before `cutoff` (pending
    /// ones stay, however old); how many. Their end time is inside the
    /// record: the finished ones are read (never the pending ones).
    async fn purge_call_jobs(
        &self,
        c: &impl GenericClient,
        cutoff: i64,
    ) -> Result<usize, StoreError> {
        let rows = query(
            c,
            "SELECT key, record FROM call_jobs WHERE not_before IS NULL",
            &[],
        )
        .await?;
        let mut removed = 0;
        for row in rows {
            let key: String = row.get(0);
            let bytes: Vec<u8> = row.get(1);
            let then = "it is left as it is";
            let job: Option<CallJob> = self.decoded(c, ("call_jobs", &key), &bytes, then).await?;
            if job.is_some_and(|j| super::call_jobs::finished_before(&j, cutoff)) {
                removed += exec(c, "DELETE FROM call_jobs WHERE key = $1", &[&key]).await? as usize;
            }
        }
        Ok(removed)
    }

    fn outbox_where(
        &self,
        condition: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.run(async {
            let c = self.inner.pool.get().await?;
            let sql = format!("SELECT key, record FROM outbox WHERE {condition} ORDER BY key");
            let rows = query(&c, &sql, params).await?;
            self.outbox_rows(&c, rows).await
        })
    }

    async fn outbox_rows(
        &self,
        c: &impl GenericClient,
        rows: Vec<Row>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let key: String = row.get(0);
            let bytes: Vec<u8> = row.get(1);
            let then = "the outbox entry is left unsent";
            if let Some(e) = self.decoded(c, ("outbox", &key), &bytes, then).await? {
                out.push(e);
            }
        }
        Ok(out)
    }
}

fn decode_start(key: &str, bytes: &[u8]) -> Result<StartRecord, StoreError> {
    decode(bytes).map_err(|reason| {
        StoreError::Backend(format!(
            "flow start record {key:?} does not decode: {reason}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_hidden_wherever_the_url_has_them() {
        assert_eq!(
            redact_url("postgres://u:p%40ss@db:5432/x?sslmode=require"),
            "postgres://u:***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact_url("postgresql://u@db/x?password=secret&application_name=a"),
            "postgresql://u@db/x?password=***&application_name=a"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
    }
}
