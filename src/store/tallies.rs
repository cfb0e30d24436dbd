//! Outbox tallies: per broadcast, how many of its outbox entries are in
//! each state, kept up to date by every outbox write, so that listing
//! broadcasts reads one small record per broadcast instead of the whole
//! outbox.
//!
//! Which entries count, by key (the keys broadcasts write, see
//! [`crate::broadcasts`]): `broadcast:<id>:<number>` (a message
//! broadcast's entry) and `start:broadcast:<id>:<number>:0` (the first
//! message of a flow broadcast's start) count toward tally `<id>`
//! ([`tally_of`]).
//!
//! Keys: `g\0` + tally name → [`OutboxTally`] (versioned JSON). The
//! tally is written in the same sled transaction as the entry whose state
//! it counts (insert or transition), so the two cannot disagree after a
//! crash.
//!
//! A data directory written before tallies existed has none: at open, when
//! the meta key `m\0tallies` is missing, every tally is counted once from
//! the outbox and written with the key (a new directory: an empty scan).
//! A tally that does not decode is counted again from its broadcast's
//! entries when read, and left alone by writes (never reset).

use serde::{Deserialize, Serialize};
use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::outbox::{self, OutboxEntry, OutboxState};
use super::records::{decode, encode, prefixed};
use super::StoreError;
use crate::versioned::Versioned;

/// How many entries of one tally (a broadcast) are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxTally {
    /// Waiting to be sent.
    pub pending: u64,
    /// Being sent (a request may be in flight).
    pub sending: u64,
    /// Accepted by Twilio.
    pub sent: u64,
    /// Refused by Twilio, or retries ran out.
    pub failed: u64,
    /// Not sent on purpose (opted out, canceled, too late, …).
    pub skipped: u64,
    /// May have reached Twilio; not sent again.
    pub unknown: u64,
}

impl Versioned for OutboxTally {
    const KIND: &'static str = "outbox tally";
    const VERSION: u32 = 1;
}

impl OutboxTally {
    fn slot(&mut self, state: &OutboxState) -> &mut u64 {
        match state {
            OutboxState::Pending { .. } => &mut self.pending,
            OutboxState::Sending { .. } => &mut self.sending,
            OutboxState::Sent { .. } => &mut self.sent,
            OutboxState::Failed { .. } => &mut self.failed,
            OutboxState::Skipped { .. } => &mut self.skipped,
            OutboxState::Unknown { .. } => &mut self.unknown,
        }
    }

    /// Count one entry in `state`.
    pub fn add(&mut self, state: &OutboxState) {
        *self.slot(state) += 1;
    }

    /// Every entry counted.
    pub fn total(&self) -> u64 {
        self.pending + self.sending + self.sent + self.failed + self.skipped + self.unknown
    }
}

/// The tally an outbox key counts toward, if any: see the module doc.
pub fn tally_of(key: &str) -> Option<&str> {
    if let Some(rest) = key.strip_prefix("broadcast:") {
        let (id, number) = rest.split_once(':')?;
        return (!id.is_empty() && !number.is_empty()).then_some(id);
    }
    // start:broadcast:<id>:<number>:<part>; an id has no `:`.
    let rest = key.strip_prefix("start:broadcast:")?;
    let (id, rest) = rest.split_once(':')?;
    let (number, part) = rest.rsplit_once(':')?;
    (!id.is_empty() && !number.is_empty() && part == "0").then_some(id)
}

/// The outbox key prefixes holding tally `id`'s entries (with other
/// parts of a flow broadcast's messages, which do not count).
pub fn tally_prefixes(id: &str) -> [String; 2] {
    [format!("broadcast:{id}:"), format!("start:broadcast:{id}:")]
}

pub(super) const PREFIX: &[u8] = b"g\0";
/// Present once every tally has been counted (see the module doc).
pub(super) const COUNTED: &[u8] = b"m\0tallies";

pub(super) fn db_key(id: &str) -> Vec<u8> {
    prefixed(PREFIX, id)
}

/// Within a transaction: entry `key` moved from `from` (`None`: it is
/// new) to `to`. A tally that does not decode is left as it is (it is
/// counted again when read).
pub(super) fn count(
    tx: &TransactionalTree,
    key: &str,
    from: Option<&OutboxState>,
    to: &OutboxState,
) -> Result<(), UnabortableTransactionError> {
    let Some(id) = tally_of(key) else {
        return Ok(());
    };
    if from.is_some_and(|f| std::mem::discriminant(f) == std::mem::discriminant(to)) {
        return Ok(());
    }
    let k = db_key(id);
    let mut tally = match tx.get(&k)? {
        Some(v) => match decode::<OutboxTally>(&v) {
            Ok(t) => t,
            Err(_) => return Ok(()),
        },
        None => OutboxTally::default(),
    };
    if let Some(from) = from {
        let n = tally.slot(from);
        *n = n.saturating_sub(1);
    }
    tally.add(to);
    tx.insert(k, encode(&tally))?;
    Ok(())
}

/// Within a transaction: entry `key`, in state `state`, was removed.
pub(super) fn uncount(
    tx: &TransactionalTree,
    key: &str,
    state: &OutboxState,
) -> Result<(), UnabortableTransactionError> {
    let Some(id) = tally_of(key) else {
        return Ok(());
    };
    let k = db_key(id);
    let Some(v) = tx.get(&k)? else {
        return Ok(());
    };
    let Ok(mut tally) = decode::<OutboxTally>(&v) else {
        return Ok(());
    };
    let n = tally.slot(state);
    *n = n.saturating_sub(1);
    tx.insert(k, encode(&tally))?;
    Ok(())
}

/// New entries counted in memory within one transaction, then added to
/// their tallies with one write each ([`Counts::write`]).
#[derive(Default)]
pub(super) struct Counts(std::collections::BTreeMap<String, OutboxTally>);

impl Counts {
    /// Count a new entry `key` in `state` (if it counts toward a tally).
    pub(super) fn add(&mut self, key: &str, state: &OutboxState) {
        if let Some(id) = tally_of(key) {
            self.0.entry(id.to_owned()).or_default().add(state);
        }
    }

    /// Add the counts to the stored tallies. A tally that does not decode
    /// is left as it is (it is counted again when read).
    pub(super) fn write(&self, tx: &TransactionalTree) -> Result<(), UnabortableTransactionError> {
        for (id, more) in &self.0 {
            let k = db_key(id);
            let mut tally = match tx.get(&k)? {
                Some(v) => match decode::<OutboxTally>(&v) {
                    Ok(t) => t,
                    Err(_) => continue,
                },
                None => OutboxTally::default(),
            };
            tally.pending += more.pending;
            tally.sending += more.sending;
            tally.sent += more.sent;
            tally.failed += more.failed;
            tally.skipped += more.skipped;
            tally.unknown += more.unknown;
            tx.insert(k, encode(&tally))?;
        }
        Ok(())
    }
}

/// Count every tally from the outbox, if that was never done in this
/// database (see the module doc). Returns how many tallies were written.
pub(super) fn count_once(db: &sled::Db) -> Result<usize, StoreError> {
    if db.get(COUNTED)?.is_some() {
        return Ok(0);
    }
    let mut tallies = std::collections::BTreeMap::<String, OutboxTally>::new();
    for item in db.scan_prefix(outbox::PREFIX) {
        let (k, v) = item?;
        let Ok(key) = std::str::from_utf8(&k[outbox::PREFIX.len()..]) else {
            continue;
        };
        let (Some(id), Ok(entry)) = (tally_of(key), decode::<OutboxEntry>(&v)) else {
            continue;
        };
        tallies.entry(id.to_owned()).or_default().add(&entry.state);
    }
    let mut batch = sled::Batch::default();
    for (id, tally) in &tallies {
        batch.insert(db_key(id), encode(tally));
    }
    batch.insert(COUNTED, &[1u8] as &[u8]);
    db.apply_batch(batch)?;
    Ok(tallies.len())
}

/// Count tally `id` from its entries (one that did not decode).
pub(super) fn recount(db: &sled::Db, id: &str) -> Result<OutboxTally, StoreError> {
    let mut tally = OutboxTally::default();
    for prefix in tally_prefixes(id) {
        for item in db.scan_prefix(outbox::db_key(&prefix)) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k[outbox::PREFIX.len()..]);
            if tally_of(&key) != Some(id) {
                continue;
            }
            if let Ok(entry) = decode::<OutboxEntry>(&v) {
                tally.add(&entry.state);
            }
        }
    }
    Ok(tally)
}

/// Every tally, by name.
pub(super) fn all(db: &sled::Db) -> Result<Vec<(String, OutboxTally)>, StoreError> {
    let mut out = Vec::new();
    for item in db.scan_prefix(PREFIX) {
        let (k, v) = item?;
        let id = String::from_utf8_lossy(&k[PREFIX.len()..]).into_owned();
        let tally = match decode::<OutboxTally>(&v) {
            Ok(t) => t,
            Err(reason) => {
                tracing::warn!(tally = %id, reason, "outbox tally does not decode: counted from its entries");
                recount(db, &id)?
            }
        };
        out.push((id, tally));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::store::{SledStore, Store, StoreConfig};

    fn entry(key: &str) -> OutboxEntry {
        OutboxEntry {
            key: key.into(),
            to: "+15551230001".into(),
            from: "+15550001111".into(),
            messaging_service_sid: None,
            body: "hi".into(),
            media: Vec::new(),
            cause: "broadcast".into(),
            flow: None,
            step: None,
            created_at: 1,
            due_at: 1,
            state: OutboxState::Pending {
                not_before: 1,
                attempts: 0,
            },
        }
    }

    #[test]
    fn keys_name_their_tally() {
        assert_eq!(tally_of("broadcast:fri:+15551230001"), Some("fri"));
        assert_eq!(tally_of("start:broadcast:fri:+15551230001:0"), Some("fri"));
        assert_eq!(tally_of("start:broadcast:fri:+15551230001:1"), None);
        assert_eq!(tally_of("start:appt-1:0"), None);
        assert_eq!(tally_of("timeout:x"), None);
        assert_eq!(tally_of("broadcast::+1"), None);
        assert_eq!(
            db_key("fri"),
            b"g\0fri",
            "tally keys are part of the format"
        );
    }

    fn recounted(store: &SledStore, id: &str) -> OutboxTally {
        store.shared.with_db(|db| recount(db, id)).unwrap()
    }

    #[test]
    fn tallies_follow_every_write_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let keys: Vec<String> = (0..20)
            .map(|i| format!("broadcast:b:+1555000{i:04}"))
            .collect();
        let mut batch: Vec<OutboxEntry> = keys.iter().map(|k| entry(k)).collect();
        batch.push(entry("timeout:other"));
        batch.push(entry("broadcast:c:+15550009999"));
        assert_eq!(store.enqueue_outbound(&batch).unwrap(), 22);
        assert_eq!(store.enqueue_outbound(&batch).unwrap(), 0);
        let pending = entry("x").state;
        let sending = OutboxState::Sending {
            since: 2,
            attempts: 1,
        };
        for k in &keys[..10] {
            store.update_outbound(k, &pending, sending.clone()).unwrap();
        }
        for k in &keys[..7] {
            let sent = OutboxState::Sent {
                sid: "SM1".into(),
                at: 3,
            };
            store.update_outbound(k, &sending, sent).unwrap();
        }
        // Refused (wrong state): nothing counted.
        assert!(store
            .update_outbound(&keys[0], &pending, sending.clone())
            .unwrap()
            .is_none());
        // A move within a state (deferred) changes no count.
        let later = OutboxState::Pending {
            not_before: 50,
            attempts: 0,
        };
        store.update_outbound(&keys[15], &pending, later).unwrap();
        let want = OutboxTally {
            pending: 10,
            sending: 3,
            sent: 7,
            ..OutboxTally::default()
        };
        let tallies = store.outbox_tallies().unwrap();
        assert_eq!(
            tallies,
            [
                ("b".to_owned(), want),
                (
                    "c".to_owned(),
                    OutboxTally {
                        pending: 1,
                        ..OutboxTally::default()
                    }
                )
            ]
        );
        assert_eq!(recounted(&store, "b"), want);
        store.flush_blocking().unwrap();
        drop(store);
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(store.outbox_tallies().unwrap()[0], ("b".to_owned(), want));
        assert_eq!(
            store.outbox_with_prefix("broadcast:b:").unwrap().len(),
            20,
            "a broadcast's entries are one key range"
        );
    }

    #[test]
    fn a_store_from_before_tallies_is_counted_once_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let batch: Vec<OutboxEntry> = (0..5)
            .map(|i| entry(&format!("broadcast:old:+1555000{i:04}")))
            .collect();
        store.enqueue_outbound(&batch).unwrap();
        // As an earlier release left it: entries, no tallies.
        store
            .shared
            .with_db(|db| {
                db.remove(COUNTED)?;
                db.remove(db_key("old"))?;
                Ok(())
            })
            .unwrap();
        assert!(store.outbox_tallies().unwrap().is_empty());
        store.flush_blocking().unwrap();
        drop(store);
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let want = OutboxTally {
            pending: 5,
            ..OutboxTally::default()
        };
        assert_eq!(store.outbox_tallies().unwrap(), [("old".to_owned(), want)]);
    }

    #[test]
    fn a_tally_that_does_not_decode_is_counted_from_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        store
            .enqueue_outbound(&[entry("broadcast:z:+15550000001")])
            .unwrap();
        store
            .shared
            .with_db(|db| {
                db.insert(db_key("z"), &b"{\"v\":99}"[..])?;
                Ok(())
            })
            .unwrap();
        let want = OutboxTally {
            pending: 1,
            ..OutboxTally::default()
        };
        assert_eq!(store.outbox_tallies().unwrap(), [("z".to_owned(), want)]);
        // Writes leave it alone rather than reset it.
        store
            .enqueue_outbound(&[entry("broadcast:z:+15550000002")])
            .unwrap();
        let raw = store
            .shared
            .with_db(|db| Ok(db.get(db_key("z"))?.unwrap()))
            .unwrap();
        assert_eq!(&raw[..], b"{\"v\":99}");
    }

    /// Listing cost with a big outbox: the whole-outbox read that listing
    /// did before, against the tallies. A measurement printed, and a
    /// check that both count the same.
    #[test]
    fn listing_reads_tallies_not_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            durability: crate::store::Durability::Relaxed,
            ..StoreConfig::default()
        };
        let store = SledStore::open(dir.path(), &config).unwrap();
        let n = 100_000;
        let batch: Vec<OutboxEntry> = (0..n)
            .map(|i| match i % 4 {
                0 => entry(&format!("timeout:{i}")),
                _ => entry(&format!("broadcast:b{}:+1555{i:07}", i % 10)),
            })
            .collect();
        for chunk in batch.chunks(5000) {
            store.enqueue_outbound(chunk).unwrap();
        }
        let t = std::time::Instant::now();
        let mut scanned = std::collections::BTreeMap::<String, OutboxTally>::new();
        for e in store.outbox().unwrap() {
            if let Some(id) = tally_of(&e.key) {
                scanned.entry(id.to_owned()).or_default().add(&e.state);
            }
        }
        let scan = t.elapsed();
        // The best of three: the first read after a bulk load pays for
        // what sled still has to settle.
        let mut read = std::time::Duration::MAX;
        let mut tallies = Vec::new();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            tallies = store.outbox_tallies().unwrap();
            read = read.min(t.elapsed());
        }
        eprintln!(
            "{n} outbox entries, {} broadcasts: whole-outbox scan {scan:?}, tallies {read:?}",
            tallies.len()
        );
        assert_eq!(tallies, scanned.into_iter().collect::<Vec<_>>());
    }

    /// Version 1 of a tally decodes, and this release writes it byte for
    /// byte (`SMSFLOW_WRITE_GOLDEN=1` writes it when missing).
    #[test]
    fn tallies_of_version_1_decode_and_are_written_exactly() {
        let tally = OutboxTally {
            pending: 1,
            sending: 2,
            sent: 3,
            failed: 4,
            skipped: 5,
            unknown: 6,
        };
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/golden/v1/outbox_tally.json");
        if std::env::var_os("SMSFLOW_WRITE_GOLDEN").is_some() && !path.exists() {
            std::fs::write(&path, encode(&tally)).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(decode::<OutboxTally>(&bytes), Ok(tally));
        assert_eq!(bytes, encode(&tally), "v1/outbox_tally.json changed");
    }
}
