//! Records that do not decode, kept aside before anything replaces them.
//!
//! A stored record that cannot be decoded (a damaged disk, a bug in an
//! older version) is never silently overwritten: its exact bytes are first
//! written to `quarantine/<hash>.json` in the data directory (fsynced),
//! and only then may the conversation start afresh. The file name is a
//! hash of key and value, so finding the same damaged record again does
//! not keep it twice. Operators read, restore or delete these files; the
//! count is reported on `/readyz` and `/metrics`. Knows nothing of the
//! record layout beyond raw keys and values.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::files;

pub(super) struct Quarantine {
    dir: PathBuf,
    /// Files in the directory: counted at open, then one per new record.
    count: AtomicU64,
}

impl Quarantine {
    pub(super) fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join("quarantine");
        let count = match fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count() as u64,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(Quarantine {
            dir,
            count: AtomicU64::new(count),
        })
    }

    /// Records kept aside (files in `quarantine/`).
    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Keep `value`, stored under `key`, aside durably. Returns the file
    /// and whether it is new (false: this exact record was kept before).
    pub(super) fn keep(
        &self,
        key: &[u8],
        value: &[u8],
        reason: &str,
    ) -> io::Result<(PathBuf, bool)> {
        let mut hash = Sha256::new();
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key);
        hash.update(value);
        let name: String = hash
            .finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect();
        let path = self.dir.join(format!("{name}.json"));
        if path.exists() {
            return Ok((path, false));
        }
        files::create_private_dir(&self.dir)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let kept_at = crate::clock::unix_now();
        let record = serde_json::json!({
            "key": String::from_utf8_lossy(key).replace('\0', "/"),
            "key_base64": b64.encode(key),
            "value_base64": b64.encode(value),
            "reason": reason,
            "kept_at": kept_at,
        });
        let mut text = serde_json::to_vec_pretty(&record).unwrap_or_default();
        text.push(b'\n');
        files::write_durably(&path, &text)?;
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok((path, true))
    }
}

/// A record key for logs: the kind, then its parts with every phone number
/// but its last four characters hidden (the quarantine file has the key).
pub(super) fn describe_key(key: &[u8]) -> String {
    let text = String::from_utf8_lossy(key);
    let mut parts = text.split('\0');
    let kind = match parts.next() {
        Some("c") => "conversation",
        Some("s") => "delivery status",
        Some("l") => "status event",
        Some("o") => "consent",
        Some("a") => "audit",
        _ => "record",
    };
    let shown: Vec<String> = parts
        .map(|p| {
            let chars: Vec<char> = p.chars().collect();
            if chars.len() > 6 && p.starts_with('+') {
                let tail: String = chars[chars.len() - 4..].iter().collect();
                format!("+…{tail}")
            } else {
                p.chars().filter(|c| !c.is_control()).collect()
            }
        })
        .collect();
    format!("{kind} {}", shown.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeping_is_durable_idempotent_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::open(dir.path()).unwrap();
        let (path, new) = q
            .keep(b"c\0+1\0+2", b"\xff\x00bad", "short header")
            .unwrap();
        assert!(new);
        let (again, new) = q
            .keep(b"c\0+1\0+2", b"\xff\x00bad", "short header")
            .unwrap();
        assert_eq!((again, new), (path.clone(), false));
        assert_eq!(q.count(), 1);
        let kept: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(kept["key"], "c/+1/+2");
        assert_eq!(kept["value_base64"], "/wBiYWQ=");
        assert_eq!(Quarantine::open(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn keys_in_logs_hide_phone_numbers() {
        assert_eq!(
            describe_key(b"c\0+15550001111\0+15557654321"),
            "conversation +…1111/+…4321"
        );
        assert_eq!(describe_key(b"s\0SM123"), "delivery status SM123");
    }
}
