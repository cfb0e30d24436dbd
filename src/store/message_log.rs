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
    /// The line as the file holds it: versioned JSON and a newline, the
    /// bytes `encode_as(self, LogLine::VERSION)` gives (a test holds the
    /// two to each other over arbitrary text). Written by hand because
    /// one is written for every message: serde_json looks up every byte
    /// of every string in its escape table, and these strings (a
    /// MessageSid, numbers, names) almost never need escaping.
    pub(super) fn bytes(&self) -> Vec<u8> {
        use crate::versioned::Versioned;
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"v\":");
        push_int(&mut out, i64::from(LogLine::VERSION));
        out.extend_from_slice(b",\"sid\":");
        push_str(&mut out, self.sid);
        out.extend_from_slice(b",\"at\":");
        push_int(&mut out, self.at);
        out.extend_from_slice(b",\"from\":");
        push_str(&mut out, self.from);
        out.extend_from_slice(b",\"to\":");
        push_str(&mut out, self.to);
        out.extend_from_slice(b",\"outcome\":");
        push_str(&mut out, self.outcome);
        for (name, value) in [
            (&b",\"flow\":"[..], self.flow),
            (b",\"step\":", self.step),
            (b",\"body\":", self.body),
        ] {
            if let Some(value) = value {
                out.extend_from_slice(name);
                push_str(&mut out, value);
            }
        }
        if let Some((first, rest)) = self.replies.split_first() {
            out.extend_from_slice(b",\"replies\":[");
            push_str(&mut out, first);
            for reply in rest {
                out.push(b',');
                push_str(&mut out, reply);
            }
            out.push(b']');
        }
        out.extend_from_slice(b"}\n");
        out
    }
}

/// `s` as a JSON string, as serde_json writes it: quoted as it is when
/// nothing in it needs escaping (no control character, quote or
/// backslash: one pass the compiler vectorises), else by serde_json.
fn push_str(out: &mut Vec<u8>, s: &str) {
    let escape = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if escape {
        // Writing to a vector cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// `n` as serde_json writes an integer (by serde_json: no escaping to
/// skip there).
fn push_int(out: &mut Vec<u8>, n: i64) {
    // Writing to a vector cannot fail.
    let _ = serde_json::to_writer(&mut *out, &n);
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
    use crate::versioned::{encode, encode_as, Versioned};
    use proptest::prelude::*;

    /// Text of any kind, and text dense in what JSON escapes.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["(?s).{0,24}", "[a-z\"\\\\\n\t\u{1}\u{1f}\u{7f}é€]{0,12}"]
    }

    proptest! {
        /// The line written by hand is byte for byte the line serde_json
        /// writes, whatever the text and the numbers.
        #[test]
        fn a_line_written_by_hand_is_the_line_serde_json_writes(
            sid in text(),
            at in any::<i64>(),
            from in text(),
            to in text(),
            outcome in text(),
            flow in proptest::option::of(text()),
            step in proptest::option::of(text()),
            body in proptest::option::of(text()),
            replies in proptest::collection::vec(text(), 0..3),
        ) {
            let line = LogLineRef {
                sid: &sid,
                at,
                from: &from,
                to: &to,
                outcome: &outcome,
                flow: flow.as_deref(),
                step: step.as_deref(),
                body: body.as_deref(),
                replies: &replies,
            };
            let mut expected = encode_as(&line, LogLine::VERSION);
            expected.push(b'\n');
            let written = line.bytes();
            prop_assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&expected)
            );
        }
    }

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
