//! Phone numbers in info-level log lines: shown, or replaced by a keyed
//! hash (`log_phone_numbers`).
//!
//! A plain hash of a phone number is no protection: there are only about
//! 10^10 numbers per country code, and hashing all of them is an
//! afternoon's work. So the hash is HMAC-SHA-256 keyed with 32 random bytes
//! kept in the data directory (`log-hash.key`, private like the store):
//! stable across restarts of one installation, so one sender's lines can
//! be followed, and not reversible from the logs alone. Whoever can read
//! the key can still test guesses; the key is as sensitive as the store,
//! which holds the numbers anyway.

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::twilio::signature::hex_lower;

/// How phone numbers appear in info-level log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PhoneNumbers {
    /// As `h:` and 16 hex digits of a keyed hash, the same for one number
    /// in every line of one installation.
    #[default]
    Hash,
    /// As received.
    Show,
}

impl PhoneNumbers {
    /// Its name in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            PhoneNumbers::Hash => "hash",
            PhoneNumbers::Show => "show",
        }
    }
}

/// The name of the key file in the data directory.
pub const KEY_FILE: &str = "log-hash.key";

/// Renders phone numbers for the log as configured.
#[derive(Clone)]
pub struct PhoneLog {
    mode: PhoneNumbers,
    /// HMAC-SHA-256 with the installation's key already taken in: each
    /// number clones it instead of hashing the key again (two of the four
    /// SHA-256 blocks of a number's hash).
    keyed: Hmac<Sha256>,
}

impl fmt::Debug for PhoneLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhoneLog")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl PhoneLog {
    /// The policy `mode`; hashing is keyed with the installation's key in
    /// `data_dir` (created on first use, readable by this user only). A
    /// key file that does not hold a key is an error: replacing it would
    /// silently change every hash. Showing numbers needs no key, and
    /// neither reads nor creates one.
    pub fn open(mode: PhoneNumbers, data_dir: &Path) -> anyhow::Result<PhoneLog> {
        if mode == PhoneNumbers::Show {
            return Ok(PhoneLog::with_key(mode, [0; 32]));
        }
        let path = data_dir.join(KEY_FILE);
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => parse_key(text.trim())
                .with_context(|| format!("{} does not hold a key", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key)
                    .map_err(|e| anyhow::anyhow!("no random bytes for the log key: {e}"))?;
                write_key(&path, &key).with_context(|| format!("writing {}", path.display()))?;
                key
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(PhoneLog::with_key(mode, key))
    }

    /// A policy with a fixed key, for tests.
    pub fn with_key(mode: PhoneNumbers, key: [u8; 32]) -> PhoneLog {
        PhoneLog {
            mode,
            keyed: Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes a key of any size"),
        }
    }

    /// `number` as the log shows it; computed only when written, so a
    /// filtered-out line costs nothing. An empty number shows as `-`.
    pub fn show<'a>(&'a self, number: &'a str) -> impl fmt::Display + 'a {
        Shown { log: self, number }
    }
}

struct Shown<'a> {
    log: &'a PhoneLog,
    number: &'a str,
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.number.is_empty() {
            return f.write_str("-");
        }
        match self.log.mode {
            PhoneNumbers::Show => f.write_str(self.number),
            PhoneNumbers::Hash => {
                let mut mac = self.log.keyed.clone();
                mac.update(self.number.as_bytes());
                let digest = mac.finalize().into_bytes();
                f.write_str("h:")?;
                f.write_str(&hex_lower(&digest[..8]))
            }
        }
    }
}

fn parse_key(hex: &str) -> anyhow::Result<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        bail!("expected 64 hex digits");
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| anyhow::anyhow!("expected 64 hex digits"))?;
    }
    Ok(key)
}

/// Written whole under a temporary name, then renamed: a crash never
/// leaves half a key.
fn write_key(path: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    let tmp = path.with_extension("key.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    writeln!(file, "{}", hex_lower(key))?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_keyed_stable_and_short() {
        let a = PhoneLog::with_key(PhoneNumbers::Hash, [1; 32]);
        let b = PhoneLog::with_key(PhoneNumbers::Hash, [2; 32]);
        let shown = a.show("+15550001234").to_string();
        assert!(shown.starts_with("h:") && shown.len() == 18, "{shown}");
        assert_eq!(shown, a.show("+15550001234").to_string());
        assert_ne!(shown, a.show("+15550001235").to_string());
        assert_ne!(shown, b.show("+15550001234").to_string());
        assert_eq!(a.show("").to_string(), "-");
        // The first 8 bytes of HMAC-SHA-256, as Python's `hmac` computes
        // them: a number's hash must not change across releases.
        assert_eq!(shown, "h:e13b77c365e39562");
        let show = PhoneLog::with_key(PhoneNumbers::Show, [1; 32]);
        assert_eq!(show.show("+15550001234").to_string(), "+15550001234");
    }

    #[test]
    fn the_key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = PhoneLog::open(PhoneNumbers::Hash, dir.path()).unwrap();
        let again = PhoneLog::open(PhoneNumbers::Hash, dir.path()).unwrap();
        assert_eq!(
            first.show("+1555").to_string(),
            again.show("+1555").to_string()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join(KEY_FILE), "not a key\n").unwrap();
        let err = PhoneLog::open(PhoneNumbers::Hash, dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains("does not hold a key"),
            "{err:#}"
        );
        let other = tempfile::tempdir().unwrap();
        PhoneLog::open(PhoneNumbers::Show, other.path()).unwrap();
        assert!(!other.path().join(KEY_FILE).exists());
    }
}
