//! The schema's migrations: SQL files in `migrations/`, numbered, applied
//! in order, each in its own transaction with its row in
//! `schema_migrations`, under a session advisory lock so that instances
//! starting together apply each one once.

use deadpool_postgres::GenericClient;

use crate::store::StoreError;

/// Every migration this release has: (version, name, SQL), in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("migrations/0001_init.sql")),
    (
        2,
        "results_texts_tallies",
        include_str!("migrations/0002_results_texts_tallies.sql"),
    ),
    (
        3,
        "compact_recent_answers",
        include_str!("migrations/0003_compact_recent_answers.sql"),
    ),
];

/// The advisory lock id held while migrating ("smsflow\0" in ASCII).
const MIGRATION_LOCK: i64 = 0x736d_7366_6c6f_7700;

/// Connect to `url` and apply the migrations the database lacks; the
/// versions applied now, oldest first. What `smsflow migrate` runs (the
/// server does the same when it opens the store).
pub fn migrate(url: &str) -> Result<Vec<i32>, StoreError> {
    let store = super::PgStore::open_unmigrated(url)?;
    store.run(async {
        let c = store.inner.pool.get().await?;
        apply(&c).await
    })
}

/// Apply what is missing, under the migration lock.
pub(super) async fn apply(c: &impl GenericClient) -> Result<Vec<i32>, StoreError> {
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let applied = apply_locked(c).await;
    let unlocked = c
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let applied = applied?;
    unlocked?;
    Ok(applied)
}

async fn apply_locked(c: &impl GenericClient) -> Result<Vec<i32>, StoreError> {
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (\
         version integer PRIMARY KEY, name text NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let current = current(c).await?;
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > newest {
        return Err(StoreError::Backend(format!(
            "the database's schema is at version {current}, newer than this release \
             knows ({newest}): run the release that migrated it, or a newer one"
        )));
    }
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        // One transaction per migration: a failed one leaves nothing
        // half applied, and the next start tries it again.
        c.batch_execute("BEGIN").await?;
        let result = async {
            c.batch_execute(sql).await?;
            c.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await?;
            c.batch_execute("COMMIT").await?;
            Ok::<_, tokio_postgres::Error>(())
        }
        .await;
        if let Err(e) = result {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(StoreError::Backend(format!(
                "applying migration {version:04}_{name}: {e}"
            )));
        }
        tracing::info!(version, name, "database schema migrated");
        done.push(*version);
    }
    Ok(done)
}

/// The newest migration applied (0: none).
pub(super) async fn current(c: &impl GenericClient) -> Result<i32, StoreError> {
    let row = c
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
