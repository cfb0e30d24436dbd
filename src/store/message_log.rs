//! The inbound message log: an append-only JSON-lines file beside the
//! database (`messages.jsonl`), one line per processed message. See the
//! store's module doc for why it is not in sled.
//!
//! Removing lines (retention, erasing one contact) rewrites the file
//! under the writer's lock: the kept lines go to a new file that is
//! fsynced and renamed over the old one (`files::write_durably`), so a
//! crash leaves either the old file or the new one, and no append is
//! lost in between (appends wait for the lock).

use std::io;

use serde::{Deserialize, Serialize};

use super::records::decode;
use super::{files, Processed, StoreError};
use crate::versioned::encode_as;

/// One line of the inbound message log, owned as it is read back. The
/// store writes [`LogLineRef`], the same line borrowed from the message it
/// records: one definition, so both are serialized alike.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(serialize = "S: Serialize, R: Serialize + AsRef<[String]>"))]
pub(super) struct LogLine<S = String, R = Vec<String>> {
    pub(super) sid: S,
    pub(super) at: i64,
    pub(super) from: S,
    pub(super) to: S,
    pub(super) outcome: S,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) flow: Option<S>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) step: Option<S>,
    /// Version 2: the inbound text, when `store_message_text` is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) body: Option<S>,
    /// Version 2: the texts of our replies, when `store_message_text` is on.
    #[serde(default, skip_serializing_if = "no_replies")]
    pub(super) replies: R,
}

/// A [`LogLine`] borrowed from the message it records: what
/// [`MessageLog::append`] writes, so the fields are not copied once more
/// for every message.
pub(super) type LogLineRef<'a> = LogLine<&'a str, &'a [String]>;

/// Whether a line has no replies to write (owned or borrowed).
fn no_replies(replies: &impl AsRef<[String]>) -> bool {
    replies.as_ref().is_empty()
}

impl LogLineRef<'_> {
    /// The line as the file holds it: versioned JSON and a newline.
    pub(super) fn bytes(&self) -> Vec<u8> {
        use crate::versioned::Versioned;
        let mut bytes = encode_as(self, LogLine::VERSION);
        bytes.push(b'\n');
        bytes
    }
}

/// Version 2 added the message texts (`body`, `replies`), kept only when
/// the operator chose `store_message_text`.
impl crate::versioned::Versioned for LogLine {
    const KIND: &'static str = "message log line";
    const VERSION: u32 = 2;

    fn upgrade(from: u32, record: serde_json::Value) -> Result<serde_json::Value, String> {
        match from {
            // Before versions: the shape of version 1. Version 1 kept no
            // text: a line of it reads with none.
            0 | 1 => Ok(record),
            _ => Err(format!("no migration from version {from}")),
        }
    }
}

impl LogLine {
    pub(super) fn into_processed(self) -> (String, Processed) {
        (
            self.sid,
            Processed {
                twiml: String::new(),
                outcome: self.outcome,
                at: self.at,
                from: self.from,
                to: self.to,
                flow: self.flow,
                step: self.step,
                body: self.body,
                replies: self.replies,
            },
        )
    }
}

/// The append-only inbound message log file.
pub(super) struct MessageLog {
    path: std::path::PathBuf,
    writer: std::sync::Mutex<std::io::BufWriter<std::fs::File>>,
}

impl MessageLog {
    pub(super) fn open(path: std::path::PathBuf) -> io::Result<Self> {
        let file = files::open_append(&path)?;
        Ok(MessageLog {
            path,
            writer: std::sync::Mutex::new(std::io::BufWriter::with_capacity(64 * 1024, file)),
        })
    }

    pub(super) fn writer(&self) -> std::sync::MutexGuard<'_, std::io::BufWriter<std::fs::File>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn append(&self, line: &LogLineRef<'_>) -> Result<(), StoreError> {
        use std::io::Write;
        let bytes = line.bytes();
        self.writer()
            .write_all(&bytes)
            .map_err(|e| StoreError::Backend(format!("writing the message log: {e}")))
    }

    /// Hand buffered lines to the OS (not an fsync: the log is
    /// informational).
    pub(super) fn flush(&self) -> Result<(), StoreError> {
        use std::io::Write;
        self.writer()
            .flush()
            .map_err(|e| StoreError::Backend(format!("writing the message log: {e}")))
    }

    /// Every readable line, oldest first. A torn last line (a crash mid
    /// write) is skipped.
    pub(super) fn read(&self) -> Result<Vec<LogLine>, StoreError> {
        self.flush()?;
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(StoreError::Backend(format!("reading the message log: {e}"))),
        };
        Ok(text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| decode(l).ok())
            .collect())
    }

    /// Rewrite the file without lines older than `cutoff`; returns how many
    /// were dropped.
    pub(super) fn purge(&self, cutoff: i64) -> Result<usize, StoreError> {
        self.rewrite("purging", |l| l.at < cutoff)
    }

    /// Rewrite the file without the lines from or to `number`; returns
    /// how many were dropped.
    pub(super) fn forget(&self, number: &str) -> Result<usize, StoreError> {
        self.rewrite("erasing a contact from", |l| {
            l.from == number || l.to == number
        })
    }

    /// Rewrite the file without the lines `drop` picks (and lines that do
    /// not decode), under the writer's lock; returns how many were dropped.
    fn rewrite(&self, what: &str, drop: impl Fn(&LogLine) -> bool) -> Result<usize, StoreError> {
        use std::io::Write;
        let io = |e: std::io::Error| StoreError::Backend(format!("{what} the message log: {e}"));
        let mut writer = self.writer();
        writer.flush().map_err(io)?;
        let lines = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(e)),
        };
        let mut kept = Vec::with_capacity(lines.len());
        let mut dropped = 0;
        for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match decode::<LogLine>(line) {
                Ok(l) if drop(&l) => dropped += 1,
                Ok(_) => {
                    kept.extend_from_slice(line);
                    kept.push(b'\n');
                }
                Err(_) => dropped += 1,
            }
        }
        if dropped == 0 {
            return Ok(0);
        }
        files::write_durably(&self.path, &kept).map_err(io)?;
        let file = files::open_append(&self.path).map_err(io)?;
        *writer = std::io::BufWriter::with_capacity(64 * 1024, file);
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versioned::encode;

    /// The borrowed line the store writes is byte for byte the line a
    /// `LogLine` encodes to, with every field set and with the optional
    /// ones empty, and it reads back as the same line.
    #[test]
    fn a_borrowed_line_is_written_as_the_owned_line_is() {
        let replies = vec!["Hi \"Ana\"".to_string(), "2\n3".to_string()];
        let lines = [
            LogLineRef {
                sid: "SM1",
                at: 1_700_000_000,
                from: "+15551230001",
                to: "+15550009999",
                outcome: "reply",
                flow: Some("signup"),
                step: Some("ask_name"),
                body: Some("ana é"),
                replies: &replies,
            },
            LogLineRef {
                sid: "SM2",
                at: -1,
                from: "",
                to: "+15550009999",
                outcome: "silence:opt_out",
                flow: None,
                step: None,
                body: None,
                replies: &[],
            },
        ];
        for line in lines {
            let owned: LogLine = LogLine {
                sid: line.sid.into(),
                at: line.at,
                from: line.from.into(),
                to: line.to.into(),
                outcome: line.outcome.into(),
                flow: line.flow.map(Into::into),
                step: line.step.map(Into::into),
                body: line.body.map(Into::into),
                replies: line.replies.to_vec(),
            };
            let mut expected = encode(&owned);
            expected.push(b'\n');
            let written = line.bytes();
            assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&expected)
            );
            let back: LogLine = decode(&written[..written.len() - 1]).unwrap();
            assert_eq!(format!("{back:?}"), format!("{owned:?}"));
        }
    }
}
