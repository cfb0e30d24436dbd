//! `smsflow store copy`: move a sled data directory's records into an
//! empty PostgreSQL database, in one transaction (all of it or nothing),
//! the records' bytes unchanged (both backends store the same versioned
//! encodings). Read while no server uses the sled store.
//!
//! Copied: conversations with their recent answers and due times, the
//! message log, delivery statuses and events, consent and its audit, the
//! outbox, call jobs, flow starts and flow results (the message log with
//! its texts; broadcast tallies are counted from the copied outbox). A
//! conversation record that does not
//! decode is left behind (sled keeps it aside in `quarantine/`) and
//! counted. The sled directory is left as it is.

use std::path::Path;

use super::{call_job_due, exec, outbox_columns, query_opt, PgConfig, PgStore};
use crate::store::call_jobs::{self, CallJob};
use crate::store::outbox::OutboxEntry;
use crate::store::records::{conv_header, decode, decode_conv, encode, ENDED};
use crate::store::{starts, AuditRecord, RunResult, SledStore, Store, StoreConfig, StoreError};

/// How many records of each kind were copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// Conversation records (with or without state).
    pub conversations: usize,
    /// Conversation records that do not decode, not copied.
    pub undecodable: usize,
    /// Message log entries.
    pub messages: usize,
    /// Delivery statuses.
    pub statuses: usize,
    /// Status callback events.
    pub status_events: usize,
    /// Consent states.
    pub consent: usize,
    /// Consent audit records.
    pub audit: usize,
    /// Outbox entries.
    pub outbox: usize,
    /// Call jobs.
    pub call_jobs: usize,
    /// Flow start records.
    pub starts: usize,
    /// Flow results.
    pub results: usize,
}

/// A conversation row: to, from, last touched, ended, the conversation,
/// its due time, its recent answers.
type ConvRow = (
    String,
    String,
    i64,
    bool,
    Option<Vec<u8>>,
    Option<i64>,
    Vec<u8>,
);

/// What is read from sled before anything is written.
#[derive(Default)]
struct Export {
    conversations: Vec<ConvRow>,
    undecodable: usize,
    /// (sid, at, record)
    status_events: Vec<(String, i64, Vec<u8>)>,
    /// (scope, number, record)
    consent: Vec<(String, String, Vec<u8>)>,
    /// (at, record)
    audit: Vec<(i64, Vec<u8>)>,
    call_jobs: Vec<(String, Option<i64>, Vec<u8>)>,
    /// (key, record)
    starts: Vec<(String, Vec<u8>)>,
    /// Each result with its position in its commit (the key's last two
    /// bytes), so that a step handled again after the copy replaces it.
    results: Vec<(RunResult, i16, Vec<u8>)>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Split `a \0 b` (after a 2-byte prefix).
fn two(k: &[u8]) -> Option<(String, String)> {
    let rest = k.get(2..)?;
    let split = rest.iter().position(|b| *b == 0)?;
    Some((text(&rest[..split]), text(&rest[split + 1..])))
}

/// Copy the sled store in `from` into the (empty) database at `to`,
/// migrating it first. Refuses a database that already holds
/// conversations, messages or outbox entries.
pub fn copy_from_sled(from: &Path, to: &str) -> Result<Copied, StoreError> {
    let sled = SledStore::open(from, &StoreConfig::default())
        .map_err(|e| StoreError::Backend(format!("opening {}: {e}", from.display())))?;
    let mut export = sled.shared.with_db(|db| {
        let mut x = Export::default();
        for item in db.scan_prefix(b"c\0") {
            let (k, v) = item?;
            let (Some((to, from)), Some((at, flags)), Ok(stored)) =
                (two(&k), conv_header(&v), decode_conv(&v))
            else {
                x.undecodable += 1;
                continue;
            };
            x.conversations.push((
                to,
                from,
                at,
                flags & ENDED != 0,
                stored.conversation,
                stored.due,
                stored.recent.0,
            ));
        }
        for item in db.scan_prefix(b"l\0") {
            let (k, v) = item?;
            // `l\0` + sid + `\0` + 8-byte id.
            let Some(sid) = k.len().checked_sub(9).and_then(|end| k.get(2..end)) else {
                continue;
            };
            let at = decode::<crate::store::StatusEvent>(&v).map_or(0, |e| e.at);
            x.status_events.push((text(sid), at, v.to_vec()));
        }
        for item in db.scan_prefix(b"o\0") {
            let (k, v) = item?;
            if let Some((scope, number)) = two(&k) {
                x.consent.push((scope, number, v.to_vec()));
            }
        }
        for item in db.scan_prefix(b"a\0") {
            let (_, v) = item?;
            let at = decode::<AuditRecord>(&v).map_or(0, |a| a.at);
            x.audit.push((at, v.to_vec()));
        }
        for item in db.scan_prefix(call_jobs::PREFIX) {
            let (k, v) = item?;
            let due = decode::<CallJob>(&v).ok().and_then(|j| call_job_due(&j));
            x.call_jobs
                .push((text(&k[call_jobs::PREFIX.len()..]), due, v.to_vec()));
        }
        for item in db.scan_prefix(starts::PREFIX) {
            let (k, v) = item?;
            x.starts
                .push((text(&k[starts::PREFIX.len()..]), v.to_vec()));
        }
        Ok(x)
    })?;
    // Moved into files or still in sled: one copy of each run, and one
    // that does not decode stays behind (kept aside, or said at warn).
    export.results = sled
        .all_results()?
        .into_iter()
        .map(|(r, n)| {
            let bytes = encode(&r);
            (r, n as i16, bytes)
        })
        .collect();
    let mut messages = sled.inbound_log()?;
    messages.reverse(); // oldest first
    let statuses = sled.outbound_log()?;
    let outbox: Vec<OutboxEntry> = sled.outbox()?;
    drop(sled);

    let pg = PgStore::open(to, &PgConfig::default())?;
    let copied = pg.run(async {
        let mut client = pg.inner.pool.get().await?;
        let tx = client.transaction().await?;
        let taken = query_opt(
            &tx,
            "SELECT (SELECT count(*) FROM conversations) + (SELECT count(*) FROM message_log) \
             + (SELECT count(*) FROM outbox)",
            &[],
        )
        .await?
        .map_or(0, |r| r.get::<_, i64>(0));
        if taken > 0 {
            return Err(StoreError::Backend(
                "the database already holds conversations, messages or outbox entries: \
                 copy into an empty one"
                    .into(),
            ));
        }
        let mut c = Copied {
            undecodable: export.undecodable,
            ..Copied::default()
        };
        for (to, from, at, ended, conv, due, recent) in export.conversations.drain(..) {
            exec(
                &tx,
                super::UPSERT_CONVERSATION,
                &[&to, &from, &at, &ended, &conv, &due, &recent],
            )
            .await?;
            c.conversations += 1;
        }
        for (sid, p) in &messages {
            exec(
                &tx,
                super::INSERT_LOG,
                &[
                    sid, &p.at, &p.from, &p.to, &p.outcome, &p.flow, &p.step, &p.body, &p.replies,
                ],
            )
            .await?;
            c.messages += 1;
        }
        for (sid, s) in &statuses {
            exec(
                &tx,
                "INSERT INTO delivery_status (message_sid, rank, updated_at, record) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    sid,
                    &i16::from(s.rank),
                    &s.updated_at,
                    &crate::versioned::encode(s),
                ],
            )
            .await?;
            c.statuses += 1;
        }
        for (sid, at, record) in &export.status_events {
            exec(
                &tx,
                "INSERT INTO status_events (message_sid, at, record) VALUES ($1, $2, $3)",
                &[sid, at, record],
            )
            .await?;
            c.status_events += 1;
        }
        for (scope, number, record) in &export.consent {
            exec(
                &tx,
                "INSERT INTO consent (scope, number, record) VALUES ($1, $2, $3)",
                &[scope, number, record],
            )
            .await?;
            c.consent += 1;
        }
        for (at, record) in &export.audit {
            exec(
                &tx,
                "INSERT INTO consent_audit (at, record) VALUES ($1, $2)",
                &[at, record],
            )
            .await?;
            c.audit += 1;
        }
        for e in &outbox {
            let (state, due) = outbox_columns(&e.state);
            exec(
                &tx,
                super::INSERT_OUTBOX,
                &[
                    &e.key,
                    &state,
                    &due,
                    &crate::versioned::encode(e),
                    &crate::store::tally_of(&e.key),
                ],
            )
            .await?;
            c.outbox += 1;
        }
        for (key, due, record) in &export.call_jobs {
            exec(
                &tx,
                "INSERT INTO call_jobs (key, not_before, record) VALUES ($1, $2, $3)",
                &[key, due, record],
            )
            .await?;
            c.call_jobs += 1;
        }
        for (key, record) in &export.starts {
            exec(
                &tx,
                "INSERT INTO starts (key, record) VALUES ($1, $2)",
                &[key, record],
            )
            .await?;
            c.starts += 1;
        }
        for (r, position, record) in &export.results {
            exec(
                &tx,
                super::UPSERT_RESULT,
                &[
                    &r.flow,
                    &r.started_at.max(0),
                    &r.to,
                    &r.contact,
                    position,
                    &r.ended_at,
                    record,
                ],
            )
            .await?;
            c.results += 1;
        }
        tx.commit().await?;
        Ok(c)
    })?;
    pg.recount()?;
    Ok(copied)
}
