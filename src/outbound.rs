//! Sending on our own: messages that are not the answer to a webhook (a
//! timeout's reminder, later flow starts and broadcasts), sent through
//! Twilio's REST API from the outbox in the store.
//!
//! Whoever produces such a message records it in the outbox
//! ([`crate::store::OutboxEntry`], idempotent by key) and may wake the
//! sender ([`Wake`]). The sender (`outbound/sender.rs`) claims due entries
//! from the store's due index, applies consent and courtesy (opted-out
//! recipients are skipped, `max_late`, quiet hours, a per-number pace), marks
//! an entry `Sending` durably before the request, and records what Twilio
//! answered: `Sent` with the MessageSid (and a delivery record, so
//! `smsflow messages` lists it), `Failed` with the error code, `Pending`
//! again with backoff when the request was refused before Twilio
//! processed it, or `Unknown` when it may have reached Twilio (at most
//! once: never sent again).
//!
//! Files: this one holds the settings and credentials; `client.rs` the
//! Twilio REST client (the only user of reqwest); `quiet.rs` quiet hours
//! (with jiff); `sender.rs` the sending task. Knows the store
//! trait and the pipeline (consent scope, loop guard), not axum or sled.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

mod client;
mod quiet;
mod sender;

pub(crate) use sender::backoff_secs;

pub use quiet::{QuietHours, RawQuietHours};

/// Check the `[[quiet_hours]]` rules of the config file, naming the one
/// at fault.
pub fn quiet_rules(raw: Vec<RawQuietHours>) -> Result<Vec<QuietHours>, String> {
    quiet::parse_all(raw)
}
pub(crate) use sender::{spawn, SenderHandle};

/// Where Twilio's REST API is (regional edges and tests point elsewhere).
pub const DEFAULT_API_BASE: &str = "https://api.twilio.com";
/// Twilio's pace for a US long code: one message per second per number.
pub const DEFAULT_SEND_INTERVAL_MS: u64 = 1_000;
/// A message due more than this long ago is not sent at all.
pub const DEFAULT_MAX_LATE_SECS: u64 = 6 * 3600;
/// How long one request to Twilio may take, connection included.
pub const DEFAULT_SEND_TIMEOUT_MS: u64 = 10_000;

/// The sender's settings (the `[outbound]`-related keys of the config
/// file) and the credentials read from the environment.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Scheme and host of Twilio's REST API, without a trailing slash.
    pub api_base: String,
    /// Least time between two messages from one sending number (or
    /// Messaging Service).
    pub send_interval: Duration,
    /// A message whose scheduled time is older than this is skipped as
    /// `too_late` instead of sent.
    pub max_late: Duration,
    /// Time limit of one request to Twilio.
    pub send_timeout: Duration,
    /// Quiet hours per sending number (`*` for every number).
    pub quiet_hours: Vec<QuietHours>,
    /// The REST API credentials (from the environment only); without them
    /// nothing is sent.
    pub credentials: Option<Credentials>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            api_base: DEFAULT_API_BASE.to_owned(),
            send_interval: Duration::from_millis(DEFAULT_SEND_INTERVAL_MS),
            max_late: Duration::from_secs(DEFAULT_MAX_LATE_SECS),
            send_timeout: Duration::from_millis(DEFAULT_SEND_TIMEOUT_MS),
            quiet_hours: Vec::new(),
            credentials: None,
        }
    }
}

/// Check an API base URL: `http(s)://host[:port]`, no path, query or
/// trailing slash (the API path is appended).
pub fn normalise_api_base(u: &str) -> Result<String, String> {
    let trimmed = u.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .ok_or_else(|| format!("twilio_api_base {u:?} must start with https:// or http://"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#']) {
        return Err(format!(
            "twilio_api_base {u:?} must be a scheme and host only, like https://api.twilio.com"
        ));
    }
    Ok(trimmed.to_owned())
}

/// HTTP Basic credentials for Twilio's REST API: the Account SID (always
/// in the URL) and either the auth token or an API key and its secret.
/// Read from the environment only, never from flags or files; `Debug`
/// shows no secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    account_sid: String,
    /// The Basic user: the Account SID, or the API key SID (`SK…`).
    user: String,
    secret: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("account_sid", &self.account_sid)
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why the outbound credentials could not be read; the message names the
/// variable to set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// Nothing is set: sending on our own is off.
    #[error(
        "TWILIO_ACCOUNT_SID is not set: sending messages on our own needs Twilio REST API \
         credentials: export TWILIO_ACCOUNT_SID and either TWILIO_API_KEY_SID with \
         TWILIO_API_KEY_SECRET (recommended) or TWILIO_AUTH_TOKEN"
    )]
    NotConfigured,
    /// Something is set but `variable` is missing.
    #[error(
        "{variable} is not set: {because} (sending on our own needs TWILIO_ACCOUNT_SID and \
         either TWILIO_API_KEY_SID with TWILIO_API_KEY_SECRET or TWILIO_AUTH_TOKEN)"
    )]
    Missing {
        /// The environment variable to set.
        variable: &'static str,
        /// What made it necessary.
        because: &'static str,
    },
}

impl Credentials {
    /// Account SID and auth token (fine for testing; Twilio recommends an
    /// API key in production).
    pub fn with_auth_token(account_sid: &str, auth_token: &str) -> Credentials {
        Credentials {
            account_sid: account_sid.to_owned(),
            user: account_sid.to_owned(),
            secret: auth_token.to_owned(),
        }
    }

    /// Account SID with an API key SID (`SK…`) and its secret.
    pub fn with_api_key(account_sid: &str, key_sid: &str, key_secret: &str) -> Credentials {
        Credentials {
            account_sid: account_sid.to_owned(),
            user: key_sid.to_owned(),
            secret: key_secret.to_owned(),
        }
    }

    /// The Account SID the messages are sent under.
    pub fn account_sid(&self) -> &str {
        &self.account_sid
    }

    /// Read `TWILIO_ACCOUNT_SID`, `TWILIO_API_KEY_SID`,
    /// `TWILIO_API_KEY_SECRET` and `TWILIO_AUTH_TOKEN` from the
    /// environment; the API key wins over the auth token when both are
    /// set. [`CredentialsError::NotConfigured`] when none of the
    /// outbound-only variables is set.
    pub fn from_env() -> Result<Credentials, CredentialsError> {
        Credentials::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Credentials::from_env`], with "nothing set" as `None`: what
    /// `serve` runs with (a half-configured set is still an error).
    pub fn from_env_optional() -> Result<Option<Credentials>, CredentialsError> {
        match Credentials::from_env() {
            Ok(c) => Ok(Some(c)),
            Err(CredentialsError::NotConfigured) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`Credentials::from_env`] over any lookup of variables (empty
    /// values count as unset).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, CredentialsError> {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let account = get("TWILIO_ACCOUNT_SID");
        let key_sid = get("TWILIO_API_KEY_SID");
        let key_secret = get("TWILIO_API_KEY_SECRET");
        let token = get("TWILIO_AUTH_TOKEN");
        let Some(account) = account else {
            return match (&key_sid, &key_secret) {
                (None, None) => Err(CredentialsError::NotConfigured),
                _ => Err(CredentialsError::Missing {
                    variable: "TWILIO_ACCOUNT_SID",
                    because: "an API key is set, and the API needs the account it belongs to",
                }),
            };
        };
        match (key_sid, key_secret, token) {
            (Some(sid), Some(secret), _) => Ok(Credentials::with_api_key(&account, &sid, &secret)),
            (Some(_), None, _) => Err(CredentialsError::Missing {
                variable: "TWILIO_API_KEY_SECRET",
                because: "TWILIO_API_KEY_SID is set",
            }),
            (None, Some(_), _) => Err(CredentialsError::Missing {
                variable: "TWILIO_API_KEY_SID",
                because: "TWILIO_API_KEY_SECRET is set",
            }),
            (None, None, Some(token)) => Ok(Credentials::with_auth_token(&account, &token)),
            (None, None, None) => Err(CredentialsError::Missing {
                variable: "TWILIO_AUTH_TOKEN",
                because: "TWILIO_ACCOUNT_SID is set but neither an API key nor the auth token is",
            }),
        }
    }
}

/// Wakes the sender when something was enqueued, so a message due now goes
/// out at once rather than at the next poll (the sender polls every second
/// anyway). Cheap to clone and to call.
#[derive(Debug, Clone, Default)]
pub struct Wake(Arc<tokio::sync::Notify>);

impl From<Arc<tokio::sync::Notify>> for Wake {
    fn from(notify: Arc<tokio::sync::Notify>) -> Self {
        Wake(notify)
    }
}

impl Wake {
    /// Tell the sender to look at the outbox now.
    pub fn wake(&self) {
        self.0.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.0.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(set: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            set.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn credentials_name_what_is_missing() {
        assert_eq!(
            Credentials::from_vars(vars(&[("TWILIO_AUTH_TOKEN", "t")])),
            Err(CredentialsError::NotConfigured)
        );
        let c = Credentials::from_vars(vars(&[
            ("TWILIO_ACCOUNT_SID", "AC1"),
            ("TWILIO_AUTH_TOKEN", "t"),
        ]))
        .unwrap();
        assert_eq!(c, Credentials::with_auth_token("AC1", "t"));
        let c = Credentials::from_vars(vars(&[
            ("TWILIO_ACCOUNT_SID", "AC1"),
            ("TWILIO_AUTH_TOKEN", "t"),
            ("TWILIO_API_KEY_SID", "SK1"),
            ("TWILIO_API_KEY_SECRET", "s"),
        ]))
        .unwrap();
        assert_eq!(c, Credentials::with_api_key("AC1", "SK1", "s"));
        assert!(!format!("{c:?}").contains("\"s\""));
        let err = Credentials::from_vars(vars(&[
            ("TWILIO_ACCOUNT_SID", "AC1"),
            ("TWILIO_API_KEY_SID", "SK1"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("TWILIO_API_KEY_SECRET is not set"),
            "{err}"
        );
        let err = Credentials::from_vars(vars(&[("TWILIO_ACCOUNT_SID", "AC1")])).unwrap_err();
        assert!(
            err.to_string().starts_with("TWILIO_AUTH_TOKEN is not set"),
            "{err}"
        );
        let err = Credentials::from_vars(vars(&[("TWILIO_API_KEY_SID", "SK1")])).unwrap_err();
        assert!(
            err.to_string().starts_with("TWILIO_ACCOUNT_SID is not set"),
            "{err}"
        );
        assert!(CredentialsError::NotConfigured
            .to_string()
            .starts_with("TWILIO_ACCOUNT_SID is not set"));
    }

    #[test]
    fn api_base_is_a_scheme_and_host() {
        assert_eq!(
            normalise_api_base("https://api.twilio.com/").unwrap(),
            "https://api.twilio.com"
        );
        assert_eq!(
            normalise_api_base("http://127.0.0.1:4000").unwrap(),
            "http://127.0.0.1:4000"
        );
        assert!(normalise_api_base("api.twilio.com").is_err());
        assert!(normalise_api_base("https://api.twilio.com/2010-04-01").is_err());
    }
}
