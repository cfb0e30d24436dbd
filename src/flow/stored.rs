//! The stored form of a [`Conversation`]: versioned JSON (see
//! [`crate::versioned`]), the bytes the store keeps for each sender. The
//! pipeline writes and reads conversations only through
//! [`Conversation::to_stored`] and [`Conversation::from_stored`], so a
//! change to the conversation's shape is a new version here with its
//! migration, never a conversation that silently starts afresh.

use super::Conversation;
use crate::versioned::{self, Versioned};

/// Version 2 added the run's timer fields (`waiting_since`,
/// `timeouts_fired`, `wakes`); version 3 the run's `path` (the steps it
/// entered, for its result) and the queued starts (`queued`, `if_busy:
/// queue`; left out when there are none).
impl Versioned for Conversation {
    const KIND: &'static str = "conversation";
    const VERSION: u32 = 3;

    fn upgrade(from: u32, mut record: serde_json::Value) -> Result<serde_json::Value, String> {
        match from {
            // Records from before versions: the shape of version 1.
            0 => Ok(record),
            // A run of version 1 has no timers: it has waited since it was
            // last active, no timeout has fired, and a script asked for no
            // wake.
            1 => {
                if let Some(run) = record.get_mut("run").and_then(|r| r.as_object_mut()) {
                    let since = run
                        .get("last_active")
                        .and_then(serde_json::Value::as_i64)
                        .ok_or("a version 1 run without last_active")?;
                    run.insert("waiting_since".into(), since.into());
                    run.insert("timeouts_fired".into(), 0.into());
                    run.insert("wakes".into(), serde_json::json!({}));
                }
                Ok(record)
            }
            // A run of version 2 kept no path: it is known to have
            // entered the step it waits at. Nothing was queued before
            // version 3.
            2 => {
                if let Some(run) = record.get_mut("run").and_then(|r| r.as_object_mut()) {
                    let path = match run.get("step") {
                        Some(serde_json::Value::String(step)) if !step.is_empty() => {
                            serde_json::json!([step])
                        }
                        _ => serde_json::json!([]),
                    };
                    run.insert("path".into(), path);
                }
                Ok(record)
            }
            _ => Err(format!("no migration from version {from}")),
        }
    }
}

impl Conversation {
    /// The bytes to store, in the current version.
    pub fn to_stored(&self) -> Vec<u8> {
        versioned::encode(self)
    }

    /// A stored conversation of any version this release reads, migrated
    /// to the current shape; or why it does not decode (the caller keeps
    /// the record aside before anything replaces it).
    pub fn from_stored(bytes: &[u8]) -> Result<Conversation, String> {
        versioned::decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::flow::{QueuedStart, Run};

    fn queued() -> Conversation {
        Conversation {
            contact: BTreeMap::from([("name".to_owned(), "Ana".to_owned())]),
            run: Some(Run {
                flow: "survey".into(),
                step: "ask".into(),
                vars: BTreeMap::new(),
                retries: 0,
                started_at: 1_700_000_000,
                last_active: 1_700_000_000,
                waiting_since: 1_700_000_000,
                timeouts_fired: 0,
                wakes: BTreeMap::new(),
                path: vec!["ask".into()],
            }),
            queued: vec![QueuedStart {
                flow: "appointment".into(),
                key: "appt-2026-12-01-ana".into(),
                fields: BTreeMap::from([("appt".to_owned(), "Tue 3pm".to_owned())]),
                vars: BTreeMap::from([("ref".to_owned(), "A-17".to_owned())]),
                messaging_service_sid: None,
                at: 1_700_000_100,
            }],
        }
    }

    /// A version 3 conversation with a queued start decodes and is written
    /// byte for byte (`SMSFLOW_WRITE_GOLDEN=1` writes the file when
    /// missing); without one, no `queued` key is written.
    #[test]
    fn queued_starts_are_kept_in_version_3() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/store/golden/v3/conversation_queued.json");
        let conv = queued();
        if std::env::var_os("SMSFLOW_WRITE_GOLDEN").is_some() && !path.exists() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, conv.to_stored()).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"{\"v\":3,"));
        assert_eq!(Conversation::from_stored(&bytes), Ok(conv.clone()));
        assert_eq!(
            bytes,
            conv.to_stored(),
            "v3/conversation_queued.json changed"
        );
        let plain = Conversation {
            queued: Vec::new(),
            ..conv
        };
        let stored = plain.to_stored();
        assert!(!String::from_utf8_lossy(&stored).contains("queued"));
        assert_eq!(Conversation::from_stored(&stored), Ok(plain));
    }
}
