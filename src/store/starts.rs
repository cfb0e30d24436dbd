//! Flow starts from outside (`POST /flows/{name}/start`): the result of
//! each start, kept under the caller's idempotency key so that a repeated
//! request starts nothing new and gets the same answer.
//!
//! Keys: `f\0` + idempotency key → [`StartRecord`] (versioned JSON).
//!
//! A start that changes a conversation is one sled transaction: its outbox
//! entries (with their due-index entries; a key already there is left as
//! it is), the conversation record and the start record. Either all of it
//! is there after a crash or none of it, so a retried request either finds
//! the record or runs the start afresh on the unchanged conversation.

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::outbox::{self, OutboxEntry};
use super::records::{decode, encode};
use super::StoreError;
use crate::versioned::Versioned;

/// What one flow start did, as recorded under its idempotency key (and
/// answered to the caller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRecord {
    /// The caller's idempotency key.
    #[serde(rename = "idempotency_key")]
    pub key: String,
    /// `started`, `skipped_busy` (the contact was in a conversation and
    /// the request said `skip`) or `opted_out` (nothing sent).
    pub result: String,
    /// The flow asked for.
    pub flow: String,
    /// The contact (E.164).
    pub to: String,
    /// Our number.
    pub from: String,
    /// The Messaging Service, when the request named one.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// The flow whose run the start ended (`interrupt`), or that made it
    /// skip (`skip`).
    #[serde(default)]
    pub busy_with: Option<String>,
    /// The outbox keys of the messages the start sent, in order.
    #[serde(default)]
    pub outbox: Vec<String>,
    /// Unix seconds of the start.
    pub at: i64,
}

impl Versioned for StartRecord {
    const KIND: &'static str = "flow start";
    const VERSION: u32 = 1;
}

pub(super) const PREFIX: &[u8] = b"f\0";

pub(super) fn db_key(key: &str) -> Vec<u8> {
    super::records::prefixed(PREFIX, key)
}

/// The record under `key`, if any.
pub(super) fn get(db: &sled::Db, key: &str) -> Result<Option<StartRecord>, StoreError> {
    match db.get(db_key(key))? {
        Some(v) => decode(&v).map(Some).map_err(|reason| {
            StoreError::Backend(format!(
                "flow start record {key:?} does not decode: {reason}"
            ))
        }),
        None => Ok(None),
    }
}

/// What [`commit`] did.
pub(super) struct Committed {
    /// The record already under the key (nothing was written), if any.
    pub taken: Option<StartRecord>,
    /// The conversation record replaced.
    pub old: Option<sled::IVec>,
    /// The change of the outbox depth.
    pub depth: i64,
}

/// Write `entries` (new keys only), the conversation record `conv` under
/// `conv_key` (when given) and `record`, in one transaction, unless
/// `record.key` is taken.
pub(super) fn commit(
    db: &sled::Db,
    results: &sled::Tree,
    entries: &[OutboxEntry],
    conv: Option<(&[u8], &[u8])>,
    extra: &[(Vec<u8>, Vec<u8>)],
    record: &StartRecord,
) -> Result<Committed, StoreError> {
    let k = db_key(&record.key);
    let v = encode(record);
    let rows: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.key.as_str(),
                &e.state,
                outbox::db_key(&e.key),
                encode(e),
                outbox::index_key(&e.state, &e.key),
            )
        })
        .collect();
    let result = (&**db, results).transaction(|(tx, results)| {
        if let Some(existing) = tx.get(&k)? {
            return Ok((Some(existing), None, 0));
        }
        let mut depth = 0;
        for (key, state, ek, ev, ix) in &rows {
            if tx.get(ek)?.is_some() {
                continue;
            }
            tx.insert(ek.as_slice(), ev.as_slice())?;
            super::tallies::count(tx, key, None, state)?;
            if let Some(ix) = ix {
                depth += i64::from(tx.insert(ix.as_slice(), &[] as &[u8])?.is_none());
            }
        }
        let old = match conv {
            Some((ck, cv)) => tx.insert(ck, cv)?,
            None => None,
        };
        // The results of runs the start ended (it interrupted one).
        for (ek, ev) in extra {
            results.insert(ek.as_slice(), ev.as_slice())?;
        }
        tx.insert(k.as_slice(), v.as_slice())?;
        Ok::<_, ConflictableTransactionError<()>>((None, old, depth))
    });
    let (existing, old, depth) = result.map_err(|e| match e {
        TransactionError::Storage(e) => StoreError::from(e),
        TransactionError::Abort(()) => StoreError::Backend("transaction aborted".into()),
    })?;
    let taken = match existing {
        Some(bytes) => Some(decode(&bytes).map_err(|reason| {
            StoreError::Backend(format!(
                "flow start record {:?} does not decode: {reason}",
                record.key
            ))
        })?),
        None => None,
    };
    Ok(Committed { taken, old, depth })
}
