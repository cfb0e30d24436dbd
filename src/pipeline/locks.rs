//! Per-conversation async locks: messages of one (To, From) conversation
//! run one at a time, and different conversations never share a lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use crate::store::ConvKey;

/// Per-conversation async locks. An entry exists only while some request
/// holds or waits for it, so the map stays as small as the set of
/// conversations in flight.
#[derive(Default)]
pub(super) struct KeyLocks {
    map: Arc<Mutex<HashMap<ConvKey, Arc<tokio::sync::Mutex<()>>>>>,
}

pub(super) struct KeyGuard {
    guard: Option<OwnedMutexGuard<()>>,
    key: ConvKey,
    map: Arc<Mutex<HashMap<ConvKey, Arc<tokio::sync::Mutex<()>>>>>,
}

impl KeyLocks {
    pub(super) async fn lock(&self, key: &ConvKey) -> KeyGuard {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        KeyGuard {
            guard: Some(guard),
            key: key.clone(),
            map: self.map.clone(),
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        // Release the lock first, so the count below sees only the map's
        // reference and those of waiters.
        self.guard.take();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = map.get(&self.key) {
            if Arc::strong_count(lock) == 1 {
                map.remove(&self.key);
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
}
