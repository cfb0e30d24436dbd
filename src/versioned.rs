//! Versioned JSON records: the one encoding of every record smsflow keeps
//! as JSON (conversations, delivery statuses and events, consent states and
//! their audit trail, the message log).
//!
//! A record is written with its format version first, `{"v":1,…}`, and
//! read by version: the current version decodes directly, an older one is
//! brought up to date one version at a time by [`Versioned::upgrade`]
//! before it decodes (migrate on read; the record is written back in the
//! current version the next time it is written), and a newer one, or one
//! that does not decode, is an error the caller must not paper over (the
//! store keeps such a record aside before anything replaces it). Records
//! written before versions existed have no `v`: they are version 0, the
//! shape of version 1 without the field. Knows nothing of what the records
//! mean or where they are kept.

use std::io::Write as _;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A kind of record kept as versioned JSON.
///
/// The type must not deny unknown fields: the `v` field is read separately.
pub trait Versioned: Serialize + DeserializeOwned {
    /// What the record is, for error messages.
    const KIND: &'static str;
    /// The version this release writes.
    const VERSION: u32;

    /// Bring a record of version `from` (older than [`Self::VERSION`]) up
    /// to version `from + 1`, as JSON. A kind that changes its format bumps
    /// `VERSION` and adds the step from the previous version here.
    fn upgrade(from: u32, record: serde_json::Value) -> Result<serde_json::Value, String> {
        match from {
            // Records from before versions: the shape of version 1.
            0 => Ok(record),
            _ => Err(format!("no migration from version {from}")),
        }
    }
}

/// `record` as JSON, its version first.
pub fn encode<T: Versioned>(record: &T) -> Vec<u8> {
    encode_as(record, T::VERSION)
}

/// `record` as JSON under an older `version` whose shape it has (a kind
/// whose new version only adds a field that is often empty writes the
/// older version when it is: a release that reads only that one still
/// reads most records, and a record it cannot read says so), or a
/// borrowed twin of a record kind under that kind's version (the message
/// log's `LogLineRef`).
///
/// The record is written as it serialises, `{…}`, and `"v":N` is spliced
/// in after its opening brace: the same bytes a wrapper with a flattened
/// field gives, without serde's flattening, which goes field by field
/// through a map serialiser (a conversation is encoded on every message).
pub fn encode_as<T: Serialize>(record: &T, version: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    // Writing to a vector cannot fail.
    let _ = write!(out, "{{\"v\":{version}");
    let brace = out.len();
    // Serialising these plain structs to JSON cannot fail; every kind is
    // a struct, so its JSON is an object: its `{` becomes the `,` after
    // the version, or, when it has no fields, `{}` the closing brace.
    if serde_json::to_writer(&mut out, record).is_err() || out.get(brace) != Some(&b'{') {
        return Vec::new();
    }
    if out.len() == brace + 2 {
        out.truncate(brace);
        out.push(b'}');
    } else {
        out[brace] = b',';
    }
    out
}

/// Decode a record of any version up to [`Versioned::VERSION`], or say why
/// it does not decode.
pub fn decode<T: Versioned>(bytes: &[u8]) -> Result<T, String> {
    let version = version_of(bytes)?;
    if version == T::VERSION {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    }
    if version > T::VERSION {
        return Err(format!(
            "{} record version {version} is newer than this release reads ({})",
            T::KIND,
            T::VERSION
        ));
    }
    let mut record: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    for from in version..T::VERSION {
        record = T::upgrade(from, record)
            .map_err(|e| format!("{} record version {from} cannot be migrated: {e}", T::KIND))?;
    }
    serde_json::from_value(record).map_err(|e| e.to_string())
}

/// The record's version: read from the `{"v":N,` this module writes without
/// a second parse, else from wherever `v` is (0 when there is none).
fn version_of(bytes: &[u8]) -> Result<u32, String> {
    if let Some(rest) = bytes.strip_prefix(b"{\"v\":") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if rest.get(digits) == Some(&b',') {
            if let Some(v) = std::str::from_utf8(&rest[..digits])
                .ok()
                .and_then(|d| d.parse().ok())
            {
                return Ok(v);
            }
        }
    }
    #[derive(Deserialize)]
    struct Version {
        #[serde(default)]
        v: u32,
    }
    serde_json::from_slice::<Version>(bytes)
        .map(|r| r.v)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Old {
        name: String,
    }

    impl Versioned for Old {
        const KIND: &'static str = "test";
        const VERSION: u32 = 1;
    }

    /// Version 2 renamed `name` to `full_name`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct New {
        full_name: String,
    }

    impl Versioned for New {
        const KIND: &'static str = "test";
        const VERSION: u32 = 2;
        fn upgrade(from: u32, mut r: serde_json::Value) -> Result<serde_json::Value, String> {
            match from {
                0 => Ok(r),
                1 => {
                    let map = r.as_object_mut().ok_or("not an object")?;
                    let name = map.remove("name").ok_or("no name")?;
                    map.insert("full_name".into(), name);
                    Ok(r)
                }
                _ => Err(format!("no migration from version {from}")),
            }
        }
    }

    #[test]
    fn records_carry_their_version_first() {
        let bytes = encode(&Old { name: "Ana".into() });
        assert_eq!(bytes, br#"{"v":1,"name":"Ana"}"#);
        assert_eq!(decode::<Old>(&bytes).unwrap(), Old { name: "Ana".into() });
    }

    /// The spliced version gives the bytes the earlier encoder (a wrapper
    /// with the record flattened into it) wrote, for records with fields,
    /// with none written, and with none at all.
    #[test]
    fn splicing_the_version_writes_what_flattening_wrote() {
        #[derive(Serialize)]
        struct Flattened<'a, T> {
            v: u32,
            #[serde(flatten)]
            record: &'a T,
        }
        fn flattened<T: Serialize>(record: &T, v: u32) -> Vec<u8> {
            serde_json::to_vec(&Flattened { v, record }).unwrap()
        }
        #[derive(Serialize)]
        struct Skipping {
            #[serde(skip_serializing_if = "Vec::is_empty")]
            list: Vec<u8>,
            #[serde(skip_serializing_if = "Option::is_none")]
            text: Option<String>,
        }
        #[derive(Serialize)]
        struct Empty {}
        let full = Skipping {
            list: vec![1, 2],
            text: Some("a \"quoted\"\n{}".into()),
        };
        let bare = Skipping {
            list: vec![],
            text: None,
        };
        assert_eq!(encode_as(&full, 3), flattened(&full, 3));
        assert_eq!(encode_as(&bare, 12), flattened(&bare, 12));
        assert_eq!(encode_as(&bare, 12), br#"{"v":12}"#);
        assert_eq!(encode_as(&Empty {}, 0), flattened(&Empty {}, 0));
        let old = Old { name: "Ana".into() };
        assert_eq!(encode(&old), flattened(&old, 1));
    }

    #[test]
    fn older_versions_are_migrated_on_read() {
        let want = New {
            full_name: "Ana".into(),
        };
        // Written before versions, by version 1, and by version 2.
        assert_eq!(decode::<New>(br#"{"name":"Ana"}"#).unwrap(), want);
        assert_eq!(
            decode::<New>(&encode(&Old { name: "Ana".into() })).unwrap(),
            want
        );
        assert_eq!(decode::<New>(&encode(&want)).unwrap(), want);
        // `v` not first is still found.
        assert_eq!(decode::<New>(br#"{"name":"Ana","v":1}"#).unwrap(), want);
    }

    #[test]
    fn newer_and_broken_records_are_errors_never_defaults() {
        let newer = encode(&New {
            full_name: "Ana".into(),
        });
        let err = decode::<Old>(&newer).unwrap_err();
        assert_eq!(
            err,
            "test record version 2 is newer than this release reads (1)"
        );
        assert!(decode::<Old>(br#"{"v":1,"nom":"Ana"}"#).is_err());
        assert!(decode::<Old>(br#"{"v":"one","name":"Ana"}"#).is_err());
        assert!(decode::<New>(br#"{"v":1,"nom":"Ana"}"#)
            .unwrap_err()
            .contains("cannot be migrated"));
    }
}
