//! A fresh PostgreSQL schema per test, in the database named by
//! `SMSFLOW_TEST_DATABASE_URL` (`.ci/with-postgres` starts a throwaway
//! cluster and sets it): each test's store sees only its own tables, so
//! the tests run in parallel on one database.
//!
//! Without the variable the PostgreSQL tests skip loudly, except under
//! `SMSFLOW_TEST_NO_SKIP=1` (CI), where a missing database fails them.

use std::sync::atomic::{AtomicU64, Ordering};

static SCHEMA_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A schema of its own in the test database; dropped with it.
pub struct TestDb {
    /// The database URL with this schema first on the search path.
    pub url: String,
    base: String,
    schema: String,
}

/// A fresh schema, or `None` (after saying so) when no test database is
/// configured and skipping is allowed.
pub fn test_db() -> Option<TestDb> {
    let Some(base) = std::env::var("SMSFLOW_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        let reason = "SMSFLOW_TEST_DATABASE_URL is not set (run the tests under \
                      .ci/with-postgres to include PostgreSQL)";
        if std::env::var_os("SMSFLOW_TEST_NO_SKIP").is_some() {
            panic!("cannot skip under SMSFLOW_TEST_NO_SKIP: {reason}");
        }
        eprintln!("skipped: {reason}");
        return None;
    };
    let schema = format!(
        "t{}_{}",
        std::process::id(),
        SCHEMA_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    sql(&base, &format!("CREATE SCHEMA {schema}"));
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    Some(TestDb { url, base, schema })
}

impl Drop for TestDb {
    fn drop(&mut self) {
        sql(
            &self.base,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema),
        );
    }
}

/// Run `statements` on `url`, from a thread of its own (callers may be
/// inside a runtime).
pub fn sql(url: &str, statements: &str) {
    let (url, statements) = (url.to_string(), statements.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connecting to the test database: {e}"));
            tokio::spawn(conn);
            client
                .batch_execute(&statements)
                .await
                .unwrap_or_else(|e| panic!("{statements}: {e}"));
        });
    })
    .join()
    .unwrap();
}

/// The first column of the first row of `query` on `url`, as a number.
pub fn query_i64(url: &str, query: &str) -> i64 {
    let (url, query) = (url.to_string(), query.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connecting to the test database: {e}"));
            tokio::spawn(conn);
            let row = client
                .query_one(&query, &[])
                .await
                .unwrap_or_else(|e| panic!("{query}: {e}"));
            row.get::<_, i64>(0)
        })
    })
    .join()
    .unwrap()
}
