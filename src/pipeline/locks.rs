//! Per-conversation async locks: messages of one (To, From) conversation
//! run one at a time, and different conversations never share a lock
//! (short of a 64-bit hash collision, see [`KeyLocks`]).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use crate::store::ConvKey;

type Slots = Arc<Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>, BuildHasherDefault<SlotHasher>>>>;

/// The map's hasher: a slot already is a hash, keyed at random per
/// process, so it is used as it is rather than hashed again (three times
/// a message: lock, and the look-up and removal when the guard drops).
#[derive(Default)]
struct SlotHasher(u64);

impl Hasher for SlotHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the key is a `u64`); anything else
        // is folded in all the same.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Per-conversation async locks. An entry exists only while some request
/// holds or waits for it, so the map stays as small as the set of
/// conversations in flight.
///
/// Entries are keyed by the conversation key's 64-bit hash (keyed at
/// random per process), not by a copy of the key: the key's two strings
/// were copied twice and hashed twice for every message. Two
/// conversations in flight at once whose keys hashed alike would share a
/// lock: each still runs one message at a time and in order, they would
/// only wait for each other.
#[derive(Default)]
pub(super) struct KeyLocks {
    map: Slots,
    hasher: RandomState,
}

pub(super) struct KeyGuard {
    guard: Option<OwnedMutexGuard<()>>,
    slot: u64,
    map: Slots,
}

impl KeyLocks {
    /// `key`'s slot: its hash, keyed at random per process. The decode
    /// memo (`memo.rs`) finds conversations by it too.
    pub(super) fn slot(&self, key: &ConvKey) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(super) async fn lock(&self, key: &ConvKey) -> KeyGuard {
        self.lock_slot(self.slot(key)).await
    }

    /// Lock every one of `keys`, in the order of their slots and each slot
    /// once: two callers locking several keys never wait for each other
    /// in a circle, and keys that share a slot never wait for themselves.
    pub(super) async fn lock_all(&self, keys: &[ConvKey]) -> Vec<KeyGuard> {
        let mut slots: Vec<u64> = keys.iter().map(|k| self.slot(k)).collect();
        slots.sort_unstable();
        slots.dedup();
        let mut guards = Vec::with_capacity(slots.len());
        for slot in slots {
            guards.push(self.lock_slot(slot).await);
        }
        guards
    }

    async fn lock_slot(&self, slot: u64) -> KeyGuard {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(slot).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        KeyGuard {
            guard: Some(guard),
            slot,
            map: self.map.clone(),
        }
    }
}

impl KeyGuard {
    /// The slot it holds ([`KeyLocks::slot`] of its key).
    pub(super) fn slot(&self) -> u64 {
        self.slot
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        // Release the lock first, so the count below sees only the map's
        // reference and those of waiters.
        self.guard.take();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = map.get(&self.slot) {
            if Arc::strong_count(lock) == 1 {
                map.remove(&self.slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn key_locks_serialise_one_key_and_clean_up() {
        let locks = Arc::new(KeyLocks::default());
        let key = ConvKey::new("a", "b");
        let g1 = locks.lock(&key).await;
        let l2 = locks.clone();
        let k2 = key.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(&k2).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // A different key is not blocked.
        let _other = locks.lock(&ConvKey::new("a", "c")).await;
        drop(_other);
        drop(g1);
        waiter.await.unwrap();
        assert!(locks.map.lock().unwrap().is_empty());
    }

    /// Keys that share a slot are locked once: the same key twice stands
    /// in for two keys whose hashes collide, which would otherwise wait
    /// for their own lock forever.
    #[tokio::test]
    async fn lock_all_takes_each_slot_once_and_holds_them_all() {
        let locks = Arc::new(KeyLocks::default());
        let key = ConvKey::new("a", "b");
        let other = ConvKey::new("a", "c");
        let keys = [key.clone(), other.clone(), key.clone()];
        let guards = tokio::time::timeout(std::time::Duration::from_secs(5), locks.lock_all(&keys))
            .await
            .expect("lock_all waited for a slot it already held");
        assert_eq!(guards.len(), 2);
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(&other).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guards);
        waiter.await.unwrap();
        assert!(locks.map.lock().unwrap().is_empty());
    }
}
