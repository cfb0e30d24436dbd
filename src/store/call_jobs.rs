//! After-answer call jobs: a flow's `call:` with `after_answer: true`,
//! rendered by the engine and recorded here before the webhook answers,
//! then made by the call worker (`crate::call_jobs`) with retries.
//!
//! A job's key is deterministic (the inbound MessageSid, or the timer
//! firing, plus the flow, step and position), and recording a key that is
//! already there changes nothing, so a retried webhook does not record a
//! call twice.
//!
//! Keys: `h\0` + key → [`CallJob`] (versioned JSON); `i\0` + 8-byte
//! big-endian `not_before` + key → empty: the due index of pending jobs,
//! rewritten with the job in one sled transaction.

use serde::{Deserialize, Serialize};
use sled::transaction::TransactionError;

use super::records::{decode, encode};
use super::StoreError;
use crate::flow::calls::HeaderValue;
use crate::versioned::Versioned;

/// Where a job is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CallJobState {
    /// To be made, not before `not_before` (unix seconds). The worker
    /// pushes `not_before` past an attempt's end before it makes the
    /// request, so a crash during one leaves the job due again later.
    Pending {
        /// Earliest time to try (unix seconds).
        not_before: i64,
        /// Attempts started so far.
        attempts: u32,
    },
    /// The receiver answered 2xx.
    Delivered {
        /// The HTTP status.
        status: u16,
        /// Attempts made.
        attempts: u32,
        /// Unix seconds of the answer.
        at: i64,
    },
    /// Given up: a 4xx answer other than 408 and 429, or attempts ran out.
    Failed {
        /// What went wrong (never a secret).
        reason: String,
        /// Attempts made.
        attempts: u32,
        /// Unix seconds of the decision.
        at: i64,
    },
}

/// One after-answer call to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallJob {
    /// The deterministic key; also sent as the `Idempotency-Key` header.
    pub key: String,
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// The rendered URL (checked against `http_allow` at each attempt).
    pub url: String,
    /// Headers in the order written; a secret is only its name here.
    pub headers: Vec<(String, HeaderValue)>,
    /// The content type and body, if any.
    pub body: Option<(String, String)>,
    /// Each attempt's timeout, in milliseconds.
    pub timeout_ms: u64,
    /// The flow that made the call.
    pub flow: String,
    /// The step that made the call.
    pub step: String,
    /// Unix seconds when it was recorded.
    pub created_at: i64,
    /// Where it is in its life.
    #[serde(flatten)]
    pub state: CallJobState,
}

impl Versioned for CallJob {
    const KIND: &'static str = "call job";
    const VERSION: u32 = 1;
}

pub(super) const PREFIX: &[u8] = b"h\0";
/// The due index: `i\0` + 8-byte big-endian time + key.
pub(super) const DUE: &[u8] = b"i\0";

pub(super) fn db_key(key: &str) -> Vec<u8> {
    super::records::prefixed(PREFIX, key)
}

/// The due-index key of a pending job. Times before 1970 sort as 0.
pub(super) fn due_key(not_before: i64, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(DUE.len() + 8 + key.len());
    k.extend_from_slice(DUE);
    k.extend_from_slice(&(not_before.max(0) as u64).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

/// The job key a due-index key names.
pub(super) fn parse_due_key(k: &[u8]) -> Option<String> {
    let rest = k.strip_prefix(DUE)?;
    String::from_utf8(rest.get(8..)?.to_vec()).ok()
}

fn index_key(job: &CallJob) -> Option<Vec<u8>> {
    match job.state {
        CallJobState::Pending { not_before, .. } => Some(due_key(not_before, &job.key)),
        _ => None,
    }
}

/// Whether the index entry `ix` still describes `job`.
pub(super) fn indexed_by(job: &CallJob, ix: &[u8]) -> bool {
    index_key(job).as_deref() == Some(ix)
}

/// How many jobs are pending (their due-index entries).
pub(super) fn count_pending(db: &sled::Db) -> Result<i64, StoreError> {
    let mut n = 0;
    for item in db.scan_prefix(DUE) {
        item?;
        n += 1;
    }
    Ok(n)
}

/// Whether a finished job (delivered or failed) was finished before
/// `cutoff`: the store's purge removes it.
pub(super) fn finished_before(job: &CallJob, cutoff: i64) -> bool {
    match job.state {
        CallJobState::Delivered { at, .. } | CallJobState::Failed { at, .. } => at < cutoff,
        CallJobState::Pending { .. } => false,
    }
}

/// Store `job` unless its key is taken, with its index entry, atomically.
/// Whether it was stored.
pub(super) fn insert_new(db: &sled::Db, job: &CallJob) -> Result<bool, StoreError> {
    let k = db_key(&job.key);
    let v = encode(job);
    let index = index_key(job);
    db.transaction(|tx| {
        if tx.get(&k)?.is_some() {
            return Ok(false);
        }
        tx.insert(k.as_slice(), v.as_slice())?;
        if let Some(ix) = &index {
            tx.insert(ix.as_slice(), &[] as &[u8])?;
        }
        Ok(true)
    })
    .map_err(storage_error)
}

/// Replace the stored job `job.key` (in any state) by `job`, moving its
/// index entry, atomically. Returns how the number of pending jobs (index
/// entries) changed.
pub(super) fn replace(db: &sled::Db, job: &CallJob) -> Result<i64, StoreError> {
    replace_if(db, job, None).map(|changed| changed.unwrap_or(0))
}

/// [`replace`], only when the stored job is in state `from` (when given):
/// compare and swap. `None` when it was not replaced, else how the number
/// of pending jobs (index entries) changed.
pub(super) fn replace_if(
    db: &sled::Db,
    job: &CallJob,
    from: Option<&CallJobState>,
) -> Result<Option<i64>, StoreError> {
    let k = db_key(&job.key);
    let v = encode(job);
    let index = index_key(job);
    db.transaction(|tx| {
        let old = tx.get(&k)?.and_then(|old| decode::<CallJob>(&old).ok());
        if from.is_some_and(|from| old.as_ref().map(|o| &o.state) != Some(from)) {
            return Ok(None);
        }
        let mut change = 0;
        if let Some(ix) = old.as_ref().and_then(index_key) {
            if tx.remove(ix)?.is_some() {
                change -= 1;
            }
        }
        tx.insert(k.as_slice(), v.as_slice())?;
        if let Some(ix) = &index {
            if tx.insert(ix.as_slice(), &[] as &[u8])?.is_none() {
                change += 1;
            }
        }
        Ok(Some(change))
    })
    .map_err(storage_error)
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

    pub(crate) fn job(key: &str, not_before: i64) -> CallJob {
        CallJob {
            key: key.into(),
            method: "POST".into(),
            url: "https://shop.example/orders".into(),
            headers: vec![(
                "Authorization".into(),
                HeaderValue::Secret("SHOP_TOKEN".into()),
            )],
            body: Some(("application/json".into(), r#"{"item":"pizza"}"#.into())),
            timeout_ms: 5000,
            flow: "pizza".into(),
            step: "send".into(),
            created_at: 1,
            state: CallJobState::Pending {
                not_before,
                attempts: 0,
            },
        }
    }

    #[test]
    fn jobs_are_recorded_once_and_due_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let batch = [job("b", 200), job("a", 100)];
        assert_eq!(store.enqueue_call_jobs(&batch).unwrap(), 2);
        assert_eq!(store.enqueue_call_jobs(&batch).unwrap(), 0);
        let keys = |now| -> Vec<String> {
            store
                .due_call_jobs(now, 10)
                .unwrap()
                .into_iter()
                .map(|j| j.key)
                .collect()
        };
        assert!(keys(99).is_empty());
        assert_eq!(keys(150), ["a"]);
        assert_eq!(keys(1000), ["a", "b"]);
        let mut a = job("a", 500);
        store.update_call_job(&a).unwrap();
        assert_eq!(keys(300), ["b"]);
        a.state = CallJobState::Delivered {
            status: 201,
            attempts: 1,
            at: 3,
        };
        store.update_call_job(&a).unwrap();
        assert_eq!(keys(1000), ["b"]);
        assert_eq!(store.call_job("a").unwrap(), Some(a));
    }

    /// The pending count follows every write and survives a reopen; the
    /// purge removes jobs finished before the cutoff and nothing pending.
    #[test]
    fn pending_jobs_are_counted_and_old_finished_ones_purged() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let batch = [job("a", 100), job("b", 100), job("c", 100), job("d", 100)];
        store.enqueue_call_jobs(&batch).unwrap();
        store.enqueue_call_jobs(&batch).unwrap();
        assert_eq!(store.call_jobs_pending(), 4);
        let finish = |key: &str, at: i64, delivered: bool| {
            let mut j = job(key, 0);
            j.state = if delivered {
                CallJobState::Delivered {
                    status: 200,
                    attempts: 1,
                    at,
                }
            } else {
                CallJobState::Failed {
                    reason: "refused: x is not in http_allow".into(),
                    attempts: 1,
                    at,
                }
            };
            store.update_call_job(&j).unwrap();
        };
        finish("a", 100, true);
        finish("b", 900, true);
        finish("c", 100, false);
        // Moved, still pending: counted once.
        store.update_call_job(&job("d", 700)).unwrap();
        assert_eq!(store.call_jobs_pending(), 1);
        let purged = store.purge(500).unwrap();
        assert_eq!(purged.call_jobs, 2);
        assert!(store.call_job("a").unwrap().is_none());
        assert!(store.call_job("c").unwrap().is_none());
        assert!(store.call_job("b").unwrap().is_some());
        assert!(store.call_job("d").unwrap().is_some());
        drop(store);
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(store.call_jobs_pending(), 1);
        // What the trait's default reads (the due index) agrees.
        assert_eq!(
            store.due_call_jobs(i64::MAX, usize::MAX).unwrap().len(),
            store.call_jobs_pending()
        );
    }
}
