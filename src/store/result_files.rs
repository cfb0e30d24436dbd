//! Flow results out of sled: one append-only JSON-lines file per flow in
//! `results/` beside the database.
//!
//! Why: sled keeps a record in memory for every page it ever wrote, paged
//! out or not, and a leaf holds about a dozen results. A flow that stores
//! two million results grew the server by about 33 MiB (five-minute soak,
//! README "Performance"). So a result is still committed into sled with
//! the step that ended it (same flush, same crash guarantees), and about
//! once a second the store's results thread moves what sled holds into
//! these files: append, `fdatasync`, and only then remove each moved row
//! from sled, if it still holds the bytes that were moved. sled frees the
//! emptied leaves and reuses their pages, so its size stays that of one
//! second of results.
//!
//! A crash between the append and the removal leaves a result in both
//! places, and a step handled again (a retried message) writes its run's
//! key again: a run is named by its key (start time, our number, contact,
//! position in its commit), and reads keep the last copy of each key, the
//! file's before sled's. A line cut short by a crash or a full disk is
//! always a copy of rows still in sled: it is cut off before the next
//! append. A line that does not decode is kept (said once per read, at
//! warn), never dropped by a rewrite.
//!
//! Each line is the result's stored record with its position in its
//! commit, `{"v":1,"n":0,"flow":…}`: the moved bytes are spliced, not
//! decoded and encoded again.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use super::files;
use super::results::RunResult;
use crate::versioned::{decode, Versioned};

/// A run's name within its flow: start time, our number, the contact,
/// position in its commit.
pub(super) type RunKey = (i64, String, String, u16);

/// The key of `result`, `n`th of its commit.
pub(super) fn run_key(result: &RunResult, n: u16) -> RunKey {
    (
        result.started_at.max(0),
        result.to.clone(),
        result.contact.clone(),
        n,
    )
}

/// One line of a results file: a stored result and its position.
#[derive(Serialize, Deserialize)]
struct ResultLine {
    #[serde(default)]
    n: u16,
    #[serde(flatten)]
    result: RunResult,
}

/// A line is a result record with one more field: same kind, same
/// versions, same migrations.
impl Versioned for ResultLine {
    const KIND: &'static str = RunResult::KIND;
    const VERSION: u32 = RunResult::VERSION;

    fn upgrade(from: u32, record: serde_json::Value) -> Result<serde_json::Value, String> {
        RunResult::upgrade(from, record)
    }
}

/// The line for a stored result record `value`, `n`th of its commit:
/// `"n":N,` spliced after its version. `None` for a record that does
/// not start as this release writes them (it stays in sled, where a
/// read keeps it aside).
pub(super) fn line(value: &[u8], n: u16) -> Option<Vec<u8>> {
    let rest = value.strip_prefix(b"{\"v\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || rest.get(digits) != Some(&b',') || value.contains(&b'\n') {
        return None;
    }
    let head = 5 + digits + 1;
    let n = format!("\"n\":{n},");
    let mut out = Vec::with_capacity(value.len() + n.len() + 1);
    out.extend_from_slice(&value[..head]);
    out.extend_from_slice(n.as_bytes());
    out.extend_from_slice(&value[head..]);
    out.push(b'\n');
    Some(out)
}

/// The `results/` directory and the lock that orders its users: the
/// move, reads, and rewrites (retention, erasing a contact) each hold it
/// for their whole work, files and sled rows together.
pub(super) struct ResultFiles {
    dir: PathBuf,
    lock: Mutex<()>,
}

/// Proof of holding the lock.
pub(super) struct Held<'a>(#[allow(dead_code)] MutexGuard<'a, ()>);

impl ResultFiles {
    /// Open (create, private) the directory.
    pub(super) fn open(dir: PathBuf) -> io::Result<Self> {
        files::create_private_dir(&dir)?;
        Ok(ResultFiles {
            dir,
            lock: Mutex::new(()),
        })
    }

    pub(super) fn lock(&self) -> Held<'_> {
        Held(self.lock.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The file of `flow`. Flow names are letters, digits, `_` and `-`;
    /// anything else (none is loaded) is written `%XX`.
    fn path(&self, flow: &str) -> PathBuf {
        let mut name = String::with_capacity(flow.len() + 6);
        for b in flow.bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                name.push(char::from(b));
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        name.push_str(".jsonl");
        self.dir.join(name)
    }

    /// Append `lines` (whole lines) to `flow`'s file and make them
    /// durable. On failure the file is cut back to where it was.
    pub(super) fn append(&self, _held: &Held<'_>, flow: &str, lines: &[u8]) -> io::Result<()> {
        let path = self.path(flow);
        let created = !path.exists();
        let mut file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(files::FILE_MODE)
            .open(&path)?;
        let len = cut_torn_tail(&file, &path)?;
        let written = file.write_all(lines).and_then(|()| file.sync_data());
        if let Err(e) = written {
            let _ = file.set_len(len);
            return Err(e);
        }
        if created {
            files::sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// `flow`'s results in its file, the last line of each run kept.
    pub(super) fn read(
        &self,
        _held: &Held<'_>,
        flow: &str,
    ) -> io::Result<BTreeMap<RunKey, RunResult>> {
        let path = self.path(flow);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut out = BTreeMap::new();
        let mut undecodable = 0;
        for l in whole_lines(&bytes) {
            match decode::<ResultLine>(l) {
                Ok(line) => {
                    out.insert(run_key(&line.result, line.n), line.result);
                }
                Err(_) => undecodable += 1,
            }
        }
        if undecodable > 0 {
            tracing::warn!(
                file = %path.display(),
                lines = undecodable,
                "flow result lines that do not decode are left out (and kept in the file)"
            );
        }
        Ok(out)
    }

    /// Every flow that has a file.
    pub(super) fn flows(&self, _held: &Held<'_>) -> io::Result<Vec<String>> {
        Ok(self.files()?.iter().filter_map(|p| flow_of(p)).collect())
    }

    /// The results files.
    fn files(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "jsonl") {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Rewrite every file without the results `drop` picks (lines that
    /// do not decode are kept); returns how many lines went.
    pub(super) fn remove(
        &self,
        _held: &Held<'_>,
        drop: impl Fn(&RunResult) -> bool,
    ) -> io::Result<usize> {
        let mut gone = 0;
        for path in self.files()? {
            let bytes = fs::read(&path)?;
            let mut kept = Vec::with_capacity(bytes.len());
            let mut dropped = 0;
            for l in whole_lines(&bytes) {
                match decode::<ResultLine>(l) {
                    Ok(line) if drop(&line.result) => dropped += 1,
                    _ => {
                        kept.extend_from_slice(l);
                        kept.push(b'\n');
                    }
                }
            }
            if dropped == 0 {
                continue;
            }
            if kept.is_empty() {
                fs::remove_file(&path)?;
                files::sync_dir(&self.dir)?;
            } else {
                files::write_durably(&path, &kept)?;
            }
            gone += dropped;
        }
        Ok(gone)
    }
}

/// The flow whose file `path` is (see [`ResultFiles::path`]).
fn flow_of(path: &std::path::Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?.as_bytes();
    let mut out = Vec::with_capacity(stem.len());
    let mut i = 0;
    while i < stem.len() {
        if stem[i] == b'%' {
            let hex = std::str::from_utf8(stem.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(stem[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The lines of `bytes` that end in a newline (a last line without one
/// was cut short).
fn whole_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    bytes[..end]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
}

/// Cut a last line without its newline (an append a crash or a full disk
/// cut short: its rows are still in sled) off `file`; returns the length.
fn cut_torn_tail(file: &File, path: &std::path::Path) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut block = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let chunk = &mut block[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        tracing::warn!(
            file = %path.display(),
            bytes = len - end,
            "cut off a flow result line an interrupted write left (its results are still in the database)"
        );
        file.set_len(end)?;
    }
    Ok(end)
}
