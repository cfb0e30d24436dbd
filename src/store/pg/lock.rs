//! The per-conversation lock across instances: a PostgreSQL session
//! advisory lock on a hash of the conversation key, held by one pooled
//! connection from before the conversation is read until after its
//! change committed ([`ConvLock`]). Within one instance the pipeline's
//! in-process lock comes first, so one instance holds at most one
//! connection per conversation in flight.
//!
//! Why not the transaction of the commit itself: the pipeline reads,
//! runs the engine (possibly for seconds, with HTTP calls) and writes
//! through the store's ordinary methods; a session lock serialises them
//! without threading a transaction through the pipeline. A connection
//! that dies (an instance killed, the database restarted) releases its
//! locks, and its holder's commit then fails too.

use std::time::Duration;

use deadpool_postgres::Object;
use sha2::{Digest, Sha256};

use super::{PgStore, OP_TIMEOUT};
use crate::store::{ConvKey, StoreError};

/// A conversation's lock held across instances; released when dropped.
pub struct ConvLock {
    client: Option<Object>,
    id: i64,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for ConvLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvLock").field("id", &self.id).finish()
    }
}

/// The advisory lock id of a conversation: 64 bits of a SHA-256 of the
/// key (two keys sharing one only wait for each other).
pub(super) fn lock_id(key: &ConvKey) -> i64 {
    let mut h = Sha256::new();
    h.update(b"smsflow conversation\0");
    h.update(key.to.as_bytes());
    h.update([0]);
    h.update(key.from.as_bytes());
    let d = h.finalize();
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

impl PgStore {
    /// Take the lock of `key`'s conversation across every instance on
    /// this database, waiting for another holder. Fails (503 for a
    /// webhook) when the database is unreachable or the wait exceeds
    /// [`OP_TIMEOUT`].
    pub async fn lock_conversation(&self, key: &ConvKey) -> Result<ConvLock, StoreError> {
        let id = lock_id(key);
        let pool = self.inner.locks.clone();
        let rt = self.bridge.rt().handle().clone();
        let handle = rt.clone();
        // The lock is made a `ConvLock` in the task that takes it: should
        // the caller stop waiting (its request timed out), dropping the
        // result anywhere still releases the lock.
        let taken = rt.spawn(async move {
            let client = pool.get().await?;
            let wait = async {
                let st = client.prepare_cached("SELECT pg_advisory_lock($1)").await?;
                client.execute(&st, &[&id]).await?;
                Ok::<_, StoreError>(())
            };
            let waited = tokio::time::timeout(OP_TIMEOUT, wait).await;
            match waited {
                Ok(Ok(())) => Ok(ConvLock {
                    client: Some(client),
                    id,
                    rt: handle,
                }),
                // The lock is the session's: an abandoned wait may still
                // be granted, so the connection is closed, not pooled.
                Ok(Err(e)) => {
                    drop(Object::take(client));
                    Err(e)
                }
                // One conversation held too long (not the database
                // failing: the store stays ready for the others).
                Err(_) => {
                    drop(Object::take(client));
                    Err(StoreError::Backend(format!(
                        "a conversation stayed locked for {} s",
                        OP_TIMEOUT.as_secs()
                    )))
                }
            }
        });
        let lock = match taken.await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Backend(format!(
                "taking a conversation lock: {e}"
            ))),
        };
        if let Err(StoreError::Unavailable(msg)) = &lock {
            self.inner.fail(msg);
        }
        lock
    }
}

impl Drop for ConvLock {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let id = self.id;
        // Unlocked on the store's runtime; until then the next holder
        // waits. A connection that cannot unlock is closed, not pooled.
        self.rt.spawn(async move {
            let unlock = async {
                let st = client
                    .prepare_cached("SELECT pg_advisory_unlock($1)")
                    .await?;
                client.execute(&st, &[&id]).await?;
                Ok::<_, tokio_postgres::Error>(())
            };
            let unlocked = tokio::time::timeout(Duration::from_secs(5), unlock).await;
            match unlocked {
                Ok(Ok(())) => drop(client),
                _ => drop(Object::take(client)),
            }
        });
    }
}
