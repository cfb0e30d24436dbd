//! Flow results: what each ended flow run collected, one record per run,
//! written with the commit of the step that ended it, just before the
//! conversation record (see [`super::Commit::results`]).
//!
//! Keys: `r\0` flow `\0` 8-byte big-endian start time, our number `\0`
//! the contact's number `\0` 2-byte position in its commit →
//! [`RunResult`] (versioned JSON). A run is named by its conversation
//! and start time, not by when it ended: the same step handled again (a
//! message Twilio retries after a crash, a timer firing again) ends the
//! run at another time but writes the same key, so nothing is doubled.
//! One flow's results are one key range; an export reads that range.
//! The rows are in a sled tree of their own, [`TREE`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::versioned::Versioned;

/// The result of one flow run: the flow, the conversation, when it
/// started and ended, how it ended, the steps it went through, and what
/// it collected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// The flow's name.
    pub flow: String,
    /// Our number (the conversation's `To`).
    pub to: String,
    /// The contact's number (the conversation's `From`).
    pub contact: String,
    /// Unix seconds when the run started.
    pub started_at: i64,
    /// Unix seconds when it ended.
    pub ended_at: i64,
    /// How it ended: `completed`, `expired`, `interrupted`, `opted_out`,
    /// `gave_up` or `stale` (see `flow::RunEnd`).
    pub ended: String,
    /// The steps it entered, in order.
    pub path: Vec<String>,
    /// Its run variables as it left them (what `save:` and `set:` put
    /// there).
    pub vars: BTreeMap<String, String>,
    /// The contact's fields as the run left them.
    pub fields: BTreeMap<String, String>,
}

impl Versioned for RunResult {
    const KIND: &'static str = "flow result";
    const VERSION: u32 = 1;
}

/// The results' key prefix.
pub(super) const PREFIX: &[u8] = b"r\0";

/// The sled tree the rows are written to. A tree of their own: the rows
/// come and go (the results thread empties them about once a second), and
/// in the default tree their leaves split and merged among the
/// conversation records' index nodes, so every conversation lookup went
/// down a deeper, busier tree. Apart, a durable multi-step message ran
/// 97.5k → 95.2k instructions (the result insert 14.5k → 11.0k, the
/// conversation's load 3.7k → 3.1k; callgrind, `docs/performance-history.md`).
/// One sled log holds every tree, so a result still reaches the log
/// before its conversation record.
pub(super) const TREE: &[u8] = b"results";

/// Where result rows are, in the order reads take them: the default tree
/// (releases before the tree of their own wrote there; the results thread
/// moves what is left) and then [`TREE`], the newer copy of a run winning.
pub(super) fn trees<'a>(db: &'a sled::Db, results: &'a sled::Tree) -> [&'a sled::Tree; 2] {
    [db, results]
}

/// The key prefix of one flow's results.
pub(super) fn flow_prefix(flow: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(PREFIX.len() + flow.len() + 1);
    k.extend_from_slice(PREFIX);
    k.extend_from_slice(flow.as_bytes());
    k.push(0);
    k
}

/// The key of `result`, the `n`th of its commit.
pub(super) fn db_key(result: &RunResult, n: usize) -> Vec<u8> {
    let mut k = flow_prefix(&result.flow);
    k.extend_from_slice(&(result.started_at.max(0) as u64).to_be_bytes());
    k.extend_from_slice(result.to.as_bytes());
    k.push(0);
    k.extend_from_slice(result.contact.as_bytes());
    k.push(0);
    k.extend_from_slice(&(n.min(u16::MAX as usize) as u16).to_be_bytes());
    k
}

/// The rows a commit writes for `results`: key and encoded record.
pub(super) fn rows(results: &[RunResult]) -> Vec<(Vec<u8>, Vec<u8>)> {
    results
        .iter()
        .enumerate()
        .map(|(n, r)| (db_key(r, n), super::records::encode(r)))
        .collect()
}

/// The flow and the position in its commit that a result's key names.
pub(super) fn parse_key(k: &[u8]) -> Option<(&str, u16)> {
    let rest = k.strip_prefix(PREFIX)?;
    let flow = std::str::from_utf8(&rest[..rest.iter().position(|b| *b == 0)?]).ok()?;
    let n = k.get(k.len().checked_sub(2)?..)?;
    Some((flow, u16::from_be_bytes([n[0], n[1]])))
}
