//! The conversations this process wrote last, kept decoded: a memo of
//! [`Conversation::from_stored`] for the next message of the same
//! conversation.
//!
//! Every message reads its conversation's stored bytes and decodes them
//! (JSON, about a twentieth of the instructions of a multi-step message),
//! and its commit encodes the new conversation from the value it already
//! has. The commit leaves the value and its bytes here; the next load of
//! that conversation that finds exactly those bytes in the store takes the
//! value instead of decoding them. The memo maps bytes to what they
//! decode to, a pure function, so an entry can only be missing, never
//! wrong: bytes another instance (PostgreSQL) or a lost commit left in
//! the store differ and are decoded, and equal bytes decode to an equal
//! value whatever conversation they belong to.
//!
//! Bounded: [`SETS`] sets of two entries, found by the conversation's
//! lock slot (its key's hash, keyed at random per process, `locks.rs`:
//! the message already computed it to lock the conversation); a new entry
//! pushes out the older of its set. A few MiB at most, whatever the
//! number of conversations.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::flow::Conversation;

/// How many sets the memo has (two entries each).
pub(super) const SETS: usize = 2048;

struct Entry {
    hash: u64,
    bytes: Vec<u8>,
    conversation: Conversation,
}

pub(super) struct DecodeMemo {
    /// Each set's entries, the newer first.
    sets: Box<[Mutex<[Option<Entry>; 2]>]>,
}

impl Default for DecodeMemo {
    fn default() -> Self {
        DecodeMemo {
            sets: (0..SETS).map(|_| Mutex::new([None, None])).collect(),
        }
    }
}

impl DecodeMemo {
    fn set(&self, hash: u64) -> MutexGuard<'_, [Option<Entry>; 2]> {
        self.sets[(hash % SETS as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The conversation `bytes` decode to, if the last commit by this
    /// process of the conversation in lock slot `hash` wrote exactly them;
    /// taken out (the commit that follows leaves the new one).
    pub(super) fn take(&self, hash: u64, bytes: &[u8]) -> Option<Conversation> {
        let mut set = self.set(hash);
        let way = set.iter().position(|e| {
            e.as_ref()
                .is_some_and(|e| e.hash == hash && e.bytes == bytes)
        })?;
        set[way].take().map(|e| e.conversation)
    }

    /// Remember that `bytes`, just committed for the conversation in lock
    /// slot `hash`, decode to `conversation`.
    pub(super) fn put(&self, hash: u64, bytes: Vec<u8>, conversation: Conversation) {
        let entry = Entry {
            hash,
            bytes,
            conversation,
        };
        let mut set = self.set(hash);
        // The key's older entry goes, else the set's older one.
        if set[0].as_ref().is_none_or(|e| e.hash != hash) {
            set[1] = set[0].take();
        }
        set[0] = Some(entry);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn conversation(name: &str) -> Conversation {
        Conversation {
            contact: BTreeMap::from([("name".to_owned(), name.to_owned())]),
            ..Conversation::default()
        }
    }

    /// A conversation's lock slot (any `u64`: the memo takes it as given).
    fn key(n: usize) -> u64 {
        n as u64
    }

    /// An entry is found only by its key and its exact bytes, once.
    #[test]
    fn an_entry_is_taken_once_for_its_exact_bytes() {
        let memo = DecodeMemo::default();
        let ana = conversation("Ana");
        memo.put(key(1), ana.to_stored(), ana.clone());
        assert_eq!(memo.take(key(2), &ana.to_stored()), None);
        let mut other = ana.to_stored();
        other.push(b' ');
        assert_eq!(memo.take(key(1), &other), None);
        assert_eq!(memo.take(key(1), &ana.to_stored()), Some(ana.clone()));
        assert_eq!(memo.take(key(1), &ana.to_stored()), None);
    }

    /// A key's new entry replaces its old one; two keys of one set are
    /// both kept, and a third pushes out the older.
    #[test]
    fn each_set_keeps_the_two_newest_keys() {
        let memo = DecodeMemo::default();
        let ana = conversation("Ana");
        let bea = conversation("Bea");
        memo.put(key(1), ana.to_stored(), ana.clone());
        memo.put(key(1), bea.to_stored(), bea.clone());
        assert_eq!(memo.take(key(1), &ana.to_stored()), None);
        assert_eq!(memo.take(key(1), &bea.to_stored()), Some(bea.clone()));

        // Three keys that fall into one set.
        let first = key(0);
        let same = [key(SETS), key(2 * SETS)];
        memo.put(first, ana.to_stored(), ana.clone());
        memo.put(same[0], bea.to_stored(), bea.clone());
        memo.put(same[0], bea.to_stored(), bea.clone());
        assert_eq!(memo.take(first, &ana.to_stored()), Some(ana.clone()));
        memo.put(first, ana.to_stored(), ana.clone());
        memo.put(same[0], bea.to_stored(), bea.clone());
        memo.put(same[1], bea.to_stored(), bea.clone());
        assert_eq!(memo.take(first, &ana.to_stored()), None);
        assert_eq!(memo.take(same[0], &bea.to_stored()), Some(bea.clone()));
        assert_eq!(memo.take(same[1], &bea.to_stored()), Some(bea));
    }
}

/// The memo hands out the value that was encoded where a decode would
/// have made one from the bytes: the two must be equal for every
/// conversation, whatever text its strings hold.
#[cfg(test)]
mod round_trip {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use crate::flow::{Conversation, QueuedStart, Run};

    fn map() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map(".{0,8}", ".{0,12}", 0..4)
    }

    fn run() -> impl Strategy<Value = Run> {
        (
            (".{0,8}", ".{0,8}", map(), any::<u32>()),
            (any::<i64>(), any::<i64>(), any::<i64>(), any::<i64>()),
            proptest::collection::btree_map(".{0,8}", any::<i64>(), 0..3),
            proptest::collection::vec(".{0,8}", 0..4),
        )
            .prop_map(
                |(
                    (flow, step, vars, retries),
                    (started_at, last_active, waiting_since, timeouts_fired),
                    wakes,
                    path,
                )| Run {
                    flow,
                    step,
                    vars,
                    retries,
                    started_at,
                    last_active,
                    waiting_since,
                    timeouts_fired,
                    wakes,
                    path,
                },
            )
    }

    fn queued() -> impl Strategy<Value = QueuedStart> {
        (
            ".{0,8}",
            ".{0,8}",
            map(),
            map(),
            proptest::option::of(".{0,8}"),
            any::<i64>(),
        )
            .prop_map(
                |(flow, key, fields, vars, messaging_service_sid, at)| QueuedStart {
                    flow,
                    key,
                    fields,
                    vars,
                    messaging_service_sid,
                    at,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn a_conversation_decodes_from_its_bytes_to_itself(
            contact in map(),
            run in proptest::option::of(run()),
            queued in proptest::collection::vec(queued(), 0..2),
        ) {
            let conversation = Conversation { contact, run, queued };
            let bytes = conversation.to_stored();
            prop_assert_eq!(Conversation::from_stored(&bytes), Ok(conversation));
        }
    }
}
