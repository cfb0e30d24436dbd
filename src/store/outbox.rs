//! The outbox: every message we send on our own (not as the answer to a
//! webhook: a timeout's reminder, later flow starts and broadcasts) is
//! recorded here before anything tries to send it.
//!
//! An entry's `key` is deterministic (for a timeout: the conversation, the
//! flow and step, which timeout, when the step started waiting, and the
//! part), and enqueueing a key that is already there changes nothing. That
//! makes the outbox the point where "send once" is decided: whoever
//! produces a message may crash and produce it again; only the first
//! enqueue of its key counts.
//!
//! Keys: `x\0` + key → [`OutboxEntry`] (versioned JSON).
//!
//! Two indexes make the sender's work independent of how many entries the
//! outbox holds (sent ones stay for the record):
//!
//! - `y\0` + 8-byte big-endian `not_before` + key → empty: one per
//!   `Pending` entry, so "what is due" is a range read from the start;
//! - `y\x01` + key → empty: one per `Sending` entry (a request may be in
//!   flight), so a restart finds them without a scan.
//!
//! Every change of an entry's state rewrites the entry, its index
//! entries and its broadcast's tally (`tallies.rs`) in one sled
//! transaction, so they cannot disagree after a crash.
//! An index entry that points at an entry in another state anyway (a
//! record kept aside, an older release's leftovers) is stale: readers skip
//! and remove it. The outbox depth (pending and sending entries) is the
//! number of index entries, counted once at open and kept up to date by
//! every insert and removal.

use serde::{Deserialize, Serialize};
use sled::transaction::TransactionError;

use super::records::{decode, encode};
use super::StoreError;
use crate::versioned::Versioned;

/// Where an outbound message is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum OutboxState {
    /// Waiting to be sent, not before `not_before` (unix seconds; the due
    /// time, pushed later by quiet hours, pacing and retries).
    Pending {
        /// Earliest time to try (unix seconds).
        not_before: i64,
        /// Attempts made so far.
        attempts: u32,
    },
    /// Claimed by the sender: a request to Twilio may be in flight. Found
    /// in this state after a restart, the message may or may not have
    /// reached Twilio.
    Sending {
        /// Unix seconds when the attempt started.
        since: i64,
        /// Attempts made so far, this one included.
        attempts: u32,
    },
    /// Twilio accepted it.
    Sent {
        /// Twilio's MessageSid (`SM…`).
        sid: String,
        /// Unix seconds when Twilio accepted it.
        at: i64,
    },
    /// Twilio refused it for good, or retries ran out.
    Failed {
        /// Twilio's error code, when it gave one.
        code: Option<u32>,
        /// What went wrong, for operators.
        reason: String,
        /// Unix seconds of the failure.
        at: i64,
    },
    /// Not sent on purpose (the recipient opted out, it would arrive
    /// later than `max_late`, …).
    Skipped {
        /// Why, as a short snake_case label.
        reason: String,
        /// Unix seconds of the decision.
        at: i64,
    },
    /// The request may have reached Twilio but no answer came back; it is
    /// not sent again (at most once).
    Unknown {
        /// What happened.
        reason: String,
        /// Unix seconds of the decision.
        at: i64,
    },
}

/// One message to send on our own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The deterministic key that makes enqueueing idempotent.
    pub key: String,
    /// The recipient (E.164).
    pub to: String,
    /// Our number it is sent from (the conversation's `To`).
    pub from: String,
    /// The Messaging Service to send through instead of `from`, if any.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// The message text (at most 1,600 characters).
    pub body: String,
    /// Media URLs to attach.
    #[serde(default)]
    pub media: Vec<String>,
    /// What produced it: `timeout`, later `start`, `broadcast`, ….
    pub cause: String,
    /// The flow and step that produced it, if a flow did.
    #[serde(default)]
    pub flow: Option<String>,
    /// The step within `flow`.
    #[serde(default)]
    pub step: Option<String>,
    /// Unix seconds when it was enqueued.
    pub created_at: i64,
    /// Unix seconds when it was meant to go (before any deferral).
    pub due_at: i64,
    /// Where it is in its life.
    #[serde(flatten)]
    pub state: OutboxState,
}

impl Versioned for OutboxEntry {
    const KIND: &'static str = "outbox entry";
    const VERSION: u32 = 1;
}

pub(super) const PREFIX: &[u8] = b"x\0";

pub(super) fn db_key(key: &str) -> Vec<u8> {
    super::records::prefixed(PREFIX, key)
}

/// The due index: `y\0` + 8-byte big-endian time + key.
pub(super) const DUE: &[u8] = b"y\0";
/// The in-flight index: `y\x01` + key.
pub(super) const IN_FLIGHT: &[u8] = b"y\x01";
/// Both indexes (what the depth counts).
pub(super) const INDEXES: &[u8] = b"y";

/// The due-index key of a pending entry. Times before 1970 sort as 0.
pub(super) fn due_key(not_before: i64, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(DUE.len() + 8 + key.len());
    k.extend_from_slice(DUE);
    k.extend_from_slice(&(not_before.max(0) as u64).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

/// The time and outbox key a due-index key names.
pub(super) fn parse_due_key(k: &[u8]) -> Option<(i64, String)> {
    let rest = k.strip_prefix(DUE)?;
    let (time, key) = (rest.get(..8)?, rest.get(8..)?);
    let time = u64::from_be_bytes(time.try_into().ok()?);
    Some((time as i64, String::from_utf8(key.to_vec()).ok()?))
}

/// The index entry an entry in `state` has, if any.
pub(super) fn index_key(state: &OutboxState, key: &str) -> Option<Vec<u8>> {
    match state {
        OutboxState::Pending { not_before, .. } => Some(due_key(*not_before, key)),
        OutboxState::Sending { .. } => Some(super::records::prefixed(IN_FLIGHT, key)),
        _ => None,
    }
}

/// The number of index entries (the outbox depth), counted at open.
pub(super) fn count_indexed(db: &sled::Db) -> Result<i64, StoreError> {
    let mut n = 0;
    for item in db.scan_prefix(INDEXES) {
        item?;
        n += 1;
    }
    Ok(n)
}

/// Store each of `entries` under its key unless the key is taken, with
/// its index entry and its tally, in one transaction (a broadcast's
/// thousands of entries cost one commit, and one write of its tally, per
/// call). Returns how many were new and the change of the depth.
pub(super) fn insert_new(
    db: &sled::Db,
    entries: &[OutboxEntry],
) -> Result<(usize, i64), StoreError> {
    let rows: Vec<_> = entries
        .iter()
        .map(|e| (db_key(&e.key), encode(e), index_key(&e.state, &e.key)))
        .collect();
    db.transaction(|tx| {
        let (mut new, mut depth) = (0, 0);
        let mut counts = super::tallies::Counts::default();
        for (entry, (k, v, index)) in entries.iter().zip(&rows) {
            if tx.get(k)?.is_some() {
                continue;
            }
            tx.insert(k.as_slice(), v.as_slice())?;
            counts.add(&entry.key, &entry.state);
            new += 1;
            if let Some(ix) = index {
                depth += i64::from(tx.insert(ix.as_slice(), &[] as &[u8])?.is_none());
            }
        }
        counts.write(tx)?;
        Ok((new, depth))
    })
    .map_err(storage_error)
}

/// What [`transition`] found.
pub(super) enum Transition {
    /// Moved; the depth changed by `depth`.
    Done {
        /// The entry as now stored.
        entry: Box<OutboxEntry>,
        /// Index entries added minus removed.
        depth: i64,
    },
    /// Not in the expected state (or not there): nothing changed.
    Refused,
    /// The stored entry does not decode: the caller keeps it aside.
    Undecodable {
        /// The stored bytes.
        raw: Vec<u8>,
        /// Why they do not decode.
        reason: String,
    },
}

/// Move the entry `key` from state `from` to `to`, with its index
/// entries, atomically (compare and swap on the state).
pub(super) fn transition(
    db: &sled::Db,
    key: &str,
    from: &OutboxState,
    to: &OutboxState,
) -> Result<Transition, StoreError> {
    let k = db_key(key);
    db.transaction(|tx| {
        let Some(raw) = tx.get(&k)? else {
            return Ok(Transition::Refused);
        };
        let mut entry = match decode::<OutboxEntry>(&raw) {
            Ok(entry) => entry,
            Err(reason) => {
                return Ok(Transition::Undecodable {
                    raw: raw.to_vec(),
                    reason,
                })
            }
        };
        if entry.state != *from {
            return Ok(Transition::Refused);
        }
        let mut depth = 0;
        if let Some(old) = index_key(&entry.state, key) {
            depth -= i64::from(tx.remove(old)?.is_some());
        }
        super::tallies::count(tx, key, Some(&entry.state), to)?;
        entry.state = to.clone();
        if let Some(new) = index_key(&entry.state, key) {
            depth += i64::from(tx.insert(new, &[] as &[u8])?.is_none());
        }
        tx.insert(k.as_slice(), encode(&entry))?;
        Ok(Transition::Done {
            entry: Box::new(entry),
            depth,
        })
    })
    .map_err(storage_error)
}

/// Remove the entry `key` with its index entry and its count in its
/// broadcast's tally, in one transaction (an erasure). Returns whether
/// it was there, and the change in outbox depth. An entry that does not
/// decode is removed without touching a tally (its tally, if any, is
/// recounted when it does not add up: see `tallies`).
pub(super) fn remove(db: &sled::Db, key: &str) -> Result<(bool, i64), StoreError> {
    let k = db_key(key);
    db.transaction(|tx| {
        let Some(raw) = tx.remove(k.as_slice())? else {
            return Ok((false, 0));
        };
        let mut depth = 0;
        if let Ok(entry) = decode::<OutboxEntry>(&raw) {
            if let Some(ix) = index_key(&entry.state, key) {
                depth -= i64::from(tx.remove(ix)?.is_some());
            }
            super::tallies::uncount(tx, key, &entry.state)?;
        }
        Ok((true, depth))
    })
    .map_err(storage_error)
}

/// Whether an index entry still describes the entry it points at.
pub(super) fn indexed_by(entry: &OutboxEntry, index: &[u8]) -> bool {
    index_key(&entry.state, &entry.key).as_deref() == Some(index)
}

fn storage_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => e.into(),
        TransactionError::Abort(()) => StoreError::Backend("transaction aborted".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SledStore, Store, StoreConfig};

    fn entry(key: &str, not_before: i64) -> OutboxEntry {
        OutboxEntry {
            key: key.into(),
            to: "+15551230001".into(),
            from: "+15550001111".into(),
            messaging_service_sid: None,
            body: format!("reminder {key}"),
            media: Vec::new(),
            cause: "timeout".into(),
            flow: Some("appointment".into()),
            step: Some("confirm".into()),
            created_at: 1,
            due_at: not_before,
            state: OutboxState::Pending {
                not_before,
                attempts: 0,
            },
        }
    }

    fn keys(entries: &[OutboxEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn due_entries_come_from_the_index_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut sent = entry("done", 10);
        sent.state = OutboxState::Sent {
            sid: "SM1".into(),
            at: 10,
        };
        let batch = [entry("c", 300), entry("a", 100), entry("b", 200), sent];
        assert_eq!(store.enqueue_outbound(&batch).unwrap(), 4);
        // Enqueueing again adds neither an entry nor an index entry.
        assert_eq!(store.enqueue_outbound(&batch).unwrap(), 0);
        assert_eq!(store.outbox_depth(), 3);
        assert_eq!(keys(&store.due_outbound(99, 10).unwrap()), [""; 0]);
        assert_eq!(keys(&store.due_outbound(150, 10).unwrap()), ["a"]);
        assert_eq!(
            keys(&store.due_outbound(1000, 10).unwrap()),
            ["a", "b", "c"]
        );
        assert_eq!(keys(&store.due_outbound(1000, 2).unwrap()), ["a", "b"]);
    }

    #[test]
    fn transitions_move_the_index_with_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        store
            .enqueue_outbound(&[entry("a", 100), entry("b", 100)])
            .unwrap();
        let pending = entry("a", 100).state;
        let sending = OutboxState::Sending {
            since: 101,
            attempts: 1,
        };
        // Compare and swap: the wrong expected state changes nothing.
        assert_eq!(
            store
                .update_outbound("a", &sending, pending.clone())
                .unwrap(),
            None
        );
        let moved = store
            .update_outbound("a", &pending, sending.clone())
            .unwrap()
            .unwrap();
        assert_eq!(moved.state, sending);
        assert_eq!(keys(&store.due_outbound(1000, 10).unwrap()), ["b"]);
        assert_eq!(keys(&store.sending_outbound().unwrap()), ["a"]);
        assert_eq!(store.outbox_depth(), 2);
        // Deferred: the old due-index entry goes, the new one is found later.
        let later = OutboxState::Pending {
            not_before: 500,
            attempts: 0,
        };
        store.update_outbound("b", &pending, later.clone()).unwrap();
        assert_eq!(keys(&store.due_outbound(499, 10).unwrap()), [""; 0]);
        assert_eq!(keys(&store.due_outbound(500, 10).unwrap()), ["b"]);
        let sent = OutboxState::Sent {
            sid: "SM1".into(),
            at: 102,
        };
        store.update_outbound("a", &sending, sent.clone()).unwrap();
        assert_eq!(store.outbox_depth(), 1);
        assert!(store.sending_outbound().unwrap().is_empty());
        store.flush_blocking().unwrap();
        drop(store);
        // The depth is counted again at open, from the indexes only.
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(store.outbox_depth(), 1);
        assert_eq!(store.outbound("a").unwrap().unwrap().state, sent);
        assert_eq!(store.outbound("b").unwrap().unwrap().state, later);
    }

    #[test]
    fn stale_index_entries_are_skipped_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        store.enqueue_outbound(&[entry("a", 100)]).unwrap();
        store
            .shared
            .with_db(|db| {
                // An index entry for nothing, and one with the wrong time.
                db.insert(due_key(50, "ghost"), &[] as &[u8])?;
                db.insert(due_key(60, "a"), &[] as &[u8])?;
                db.insert(
                    super::super::records::prefixed(IN_FLIGHT, "a"),
                    &[] as &[u8],
                )?;
                Ok(())
            })
            .unwrap();
        drop(store);
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(store.outbox_depth(), 4);
        assert_eq!(keys(&store.due_outbound(1000, 10).unwrap()), ["a"]);
        assert!(store.sending_outbound().unwrap().is_empty());
        assert_eq!(store.outbox_depth(), 1);
        assert_eq!(keys(&store.due_outbound(1000, 10).unwrap()), ["a"]);
    }

    /// Marking an entry `Sending` must reach the disk before its request
    /// leaves, whatever the durability mode.
    #[tokio::test]
    async fn flush_durable_syncs_even_when_relaxed() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            durability: crate::store::Durability::Relaxed,
            ..StoreConfig::default()
        };
        let store = SledStore::open(dir.path(), &config).unwrap();
        store.enqueue_outbound(&[entry("a", 100)]).unwrap();
        let before = store.health().fsyncs;
        store.flush_durable(store.epoch()).await.unwrap();
        assert!(store.health().fsyncs > before);
    }

    #[test]
    fn index_keys_sort_by_time() {
        assert!(due_key(255, "z") < due_key(256, "a"));
        assert_eq!(
            parse_due_key(&due_key(1_700_000_000, "k/1")),
            Some((1_700_000_000, "k/1".into()))
        );
        assert_eq!(due_key(-5, "k"), due_key(0, "k"));
    }
}
