//! The per-conversation lock across instances, and why a holder that lost
//! it can never commit.
//!
//! The lock is a PostgreSQL session advisory lock on a hash of the
//! conversation key, held by one connection of the lock pool from before
//! the conversation is read until after its change committed
//! ([`ConvLock`]). Within one instance the pipeline's in-process lock comes
//! first, so one instance holds at most one lock connection per
//! conversation.
//!
//! **The holder writes on the lock's own session.** While a [`ConvLock`]
//! lives, the store knows its connection by conversation key (a registry,
//! [`Registry`]); every conversation write made under the lock
//! (`commit`, `commit_state`, `commit_start`, `delete_conversation`,
//! `forget_contact`) runs its transaction on that connection rather than a
//! pooled one. PostgreSQL releases a session's advisory locks only when
//! they are unlocked or the session ends, so a transaction that commits on
//! the session has held the lock from the read to the commit. Should the
//! session die in between (its backend terminated, the network to it cut,
//! the database restarted), its lock is gone, and so is the only
//! connection the holder may commit on: the write fails (the webhook gets
//! 503, Twilio retries on whichever instance now holds the lock), and
//! nothing is acknowledged that was not committed. Another instance that
//! took the lock meanwhile read the state before the stale holder could
//! write, and nothing the stale holder does afterwards reaches the
//! conversation: no lost step, no reply given twice from one prior state.
//!
//! Why not the transaction of the commit itself: the pipeline reads,
//! runs the engine (possibly for seconds, with HTTP calls) and writes
//! through the store's ordinary methods; a session lock serialises them
//! without threading a transaction through the pipeline, and the registry
//! fences the write without the pipeline knowing. Reads stay on the pool:
//! whatever they read was committed before the lock was granted (every
//! holder commits before it unlocks, on the same session).
//!
//! Erasing a contact locks all its conversations on one session
//! ([`PgStore::lock_contact`]), so its one transaction is fenced by all of
//! them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Object;
use sha2::{Digest, Sha256};

use super::{PgStore, OP_TIMEOUT};
use crate::store::{ConvKey, StoreError};

/// The connection of a held lock; `None` once it is being unlocked.
pub(super) type Session = Arc<tokio::sync::Mutex<Option<Object>>>;

/// One held lock's session, as the registry knows it.
pub(super) struct Held {
    /// The connection holding the advisory lock(s).
    pub(super) session: Session,
    /// The contact whose conversations it holds, when taken to erase
    /// them ([`PgStore::lock_contact`]).
    pub(super) contact: Option<String>,
}

/// The sessions of the locks this instance holds, by conversation key (at
/// most one holder per key: the in-process lock comes first).
pub(super) type Registry = Mutex<HashMap<ConvKey, Arc<Held>>>;

pub(super) fn registry_lock(
    r: &Registry,
) -> std::sync::MutexGuard<'_, HashMap<ConvKey, Arc<Held>>> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// A conversation's lock held across instances (or a contact's
/// conversations' locks); released when dropped.
pub struct ConvLock {
    held: Arc<Held>,
    keys: Vec<ConvKey>,
    ids: Vec<i64>,
    registry: Arc<Registry>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for ConvLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvLock").field("ids", &self.ids).finish()
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

/// The error of a write whose lock's session ended before it committed.
pub(super) fn lock_lost() -> StoreError {
    StoreError::Backend(
        "the conversation's lock was lost (its database session ended) before the change \
         committed: nothing was written; a retry runs under the lock again"
            .into(),
    )
}

impl PgStore {
    /// Take the lock of `key`'s conversation across every instance on
    /// this database, waiting for another holder. Until the lock is
    /// dropped, this store writes `key`'s conversation on the lock's own
    /// session (see the module doc). Fails (503 for a webhook) when the
    /// database is unreachable or the wait exceeds [`OP_TIMEOUT`].
    pub async fn lock_conversation(&self, key: &ConvKey) -> Result<ConvLock, StoreError> {
        self.lock_keys(vec![key.clone()], None).await
    }

    /// Take the locks of `keys`, the conversations of the contact
    /// `number`, on one session, to erase them: `forget_contact(number)`
    /// then runs on that session, fenced by every one of them.
    pub async fn lock_contact(
        &self,
        number: &str,
        keys: &[ConvKey],
    ) -> Result<ConvLock, StoreError> {
        self.lock_keys(keys.to_vec(), Some(number.to_owned())).await
    }

    async fn lock_keys(
        &self,
        keys: Vec<ConvKey>,
        contact: Option<String>,
    ) -> Result<ConvLock, StoreError> {
        // Sorted: two instances taking several never wait for each other
        // in a cycle.
        let mut ids: Vec<i64> = keys.iter().map(lock_id).collect();
        ids.sort_unstable();
        let pool = self.inner.locks.clone();
        let registry = self.inner.held.clone();
        let rt = self.bridge.rt().handle().clone();
        let handle = rt.clone();
        // The lock is made a `ConvLock` in the task that takes it: should
        // the caller stop waiting (its request timed out), dropping the
        // result anywhere still releases the lock.
        let taken = rt.spawn(async move {
            let client = pool.get().await?;
            let wait = async {
                let st = client.prepare_cached("SELECT pg_advisory_lock($1)").await?;
                for id in &ids {
                    client.execute(&st, &[id]).await?;
                }
                Ok::<_, StoreError>(())
            };
            let waited = tokio::time::timeout(OP_TIMEOUT, wait).await;
            match waited {
                Ok(Ok(())) => Ok(ConvLock::register(
                    client, keys, ids, contact, registry, handle,
                )),
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

    /// The session holding `key`'s lock, when this instance holds it.
    pub(super) fn held_session(&self, key: &ConvKey) -> Option<Session> {
        registry_lock(&self.inner.held)
            .get(key)
            .map(|h| h.session.clone())
    }

    /// The session holding the locks taken to erase `number`
    /// ([`PgStore::lock_contact`]), when this instance holds them.
    pub(super) fn contact_session(&self, number: &str) -> Option<Session> {
        registry_lock(&self.inner.held)
            .values()
            .find(|h| h.contact.as_deref() == Some(number))
            .map(|h| h.session.clone())
    }
}

impl ConvLock {
    fn register(
        client: Object,
        keys: Vec<ConvKey>,
        ids: Vec<i64>,
        contact: Option<String>,
        registry: Arc<Registry>,
        rt: tokio::runtime::Handle,
    ) -> ConvLock {
        let held = Arc::new(Held {
            session: Arc::new(tokio::sync::Mutex::new(Some(client))),
            contact,
        });
        {
            let mut map = registry_lock(&registry);
            for key in &keys {
                map.insert(key.clone(), held.clone());
            }
        }
        ConvLock {
            held,
            keys,
            ids,
            registry,
            rt,
        }
    }
}

impl Drop for ConvLock {
    fn drop(&mut self) {
        // Out of the registry first: nothing writes on the session once
        // the lock is being released.
        {
            let mut map = registry_lock(&self.registry);
            for key in &self.keys {
                if map.get(key).is_some_and(|h| Arc::ptr_eq(h, &self.held)) {
                    map.remove(key);
                }
            }
        }
        let session = self.held.session.clone();
        let ids = std::mem::take(&mut self.ids);
        // Unlocked on the store's runtime; until then the next holder
        // waits. A connection that cannot unlock is closed, not pooled.
        self.rt.spawn(async move {
            let Some(client) = session.lock().await.take() else {
                return;
            };
            let unlock = async {
                let st = client
                    .prepare_cached("SELECT pg_advisory_unlock($1)")
                    .await?;
                for id in &ids {
                    client.execute(&st, &[id]).await?;
                }
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

/// A connection to write on: the session of a lock this instance holds,
/// or a pooled one.
// One per write, on its future's stack: boxing the pooled connection would
// cost an allocation per write for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Conn {
    /// From the query pool (no lock of ours covers the write).
    Pooled(Object),
    /// The session holding the lock of the conversation written.
    Held(tokio::sync::OwnedMutexGuard<Option<Object>>),
}

impl std::ops::Deref for Conn {
    type Target = Object;
    fn deref(&self) -> &Object {
        match self {
            Conn::Pooled(o) => o,
            Conn::Held(g) => g.as_ref().expect("a held session is present while in use"),
        }
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Object {
        match self {
            Conn::Pooled(o) => o,
            Conn::Held(g) => g.as_mut().expect("a held session is present while in use"),
        }
    }
}

impl Conn {
    /// `r`, except that a failure on a lock's session that has ended is
    /// the lock being lost (not the database failing: the store stays
    /// ready; the probe judges the database).
    pub(super) fn fenced<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match (self, r) {
            (Conn::Held(g), Err(_)) if g.as_ref().is_none_or(|c| c.is_closed()) => Err(lock_lost()),
            (_, r) => r,
        }
    }
}

impl PgStore {
    /// The connection to write on: `session` (a held lock's, from
    /// [`PgStore::held_session`]) when given, failing when that session
    /// has ended; else a pooled one.
    pub(super) async fn conn(&self, session: Option<Session>) -> Result<Conn, StoreError> {
        let Some(session) = session else {
            return Ok(Conn::Pooled(self.inner.pool.get().await?));
        };
        let guard = session.lock_owned().await;
        match guard.as_ref() {
            Some(c) if !c.is_closed() => Ok(Conn::Held(guard)),
            _ => Err(lock_lost()),
        }
    }
}
