//! Server settings: flags, `SMSFLOW_…` environment variables and an optional
//! TOML file, merged into one validated [`Config`].
//!
//! Precedence: flag > environment > config file > built-in default. clap
//! merges flags and environment; this module fills what is still unset from
//! the file. The auth token is read once, here, from `TWILIO_AUTH_TOKEN`
//! only (never a flag: flags show up in `ps`), and its `Debug` is redacted.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::store::Durability;
pub use crate::telemetry::{LogFormat, PhoneNumbers};

mod settings;
pub(crate) use settings::{config_flag_help, config_flag_long_help, flag_help};
pub use settings::{describe, setting, Setting, SETTINGS};

/// The HMAC key, kept out of logs and `Debug` output.
#[derive(Clone)]
pub struct AuthToken(String);

impl AuthToken {
    /// Wraps the Twilio auth token (or an admin token).
    pub fn new(token: impl Into<String>) -> Self {
        AuthToken(token.into())
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

/// A PostgreSQL URL (`--store`); `Debug` hides its password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps a `postgres://` URL.
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }
    /// The URL, password included: for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        DatabaseUrl(url)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", crate::store::pg::redact_url(&self.0))
    }
}

/// How inbound requests are authenticated.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Verify `X-Twilio-Signature` with this token (production).
    Verify(AuthToken),
    /// Accept unsigned requests. Only with the explicit insecure flag.
    Insecure,
}

/// Everything `App::build` needs; fully validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// Scheme, host, optional port and optional path prefix Twilio was
    /// configured with, without a trailing slash. Signatures are computed
    /// over this joined with the raw request path and query.
    pub public_url: String,
    /// The directory the flow files are read from.
    pub flows_dir: PathBuf,
    /// The directory the store keeps its data in.
    pub data_dir: PathBuf,
    /// The PostgreSQL database URL, when the store is PostgreSQL rather
    /// than sled in `data_dir` (`--store`, `SMSFLOW_DATABASE_URL`).
    pub store: Option<DatabaseUrl>,
    /// How webhook requests are authenticated.
    pub auth: Auth,
    /// sled's page cache size, in bytes.
    pub cache_bytes: u64,
    /// When a write counts as done (see the store's durability modes).
    pub durability: Durability,
    /// The async worker threads that serve requests (tokio's runtime).
    pub workers: usize,
    /// Largest accepted webhook body; Twilio's own bodies are a few KiB.
    pub max_body_bytes: usize,
    /// Per-request time limit, well under Twilio's 15 s.
    pub request_timeout: Duration,
    /// Most connections held open at once. When all are taken, the one
    /// waiting or idle the longest is closed for a new one; only when every
    /// one is serving a request do new ones wait in the accept queue.
    pub max_connections: usize,
    /// How long a connection may take to send a complete request head,
    /// from accept (or from its first byte after a keep-alive pause).
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may sit idle between requests.
    pub idle_timeout: Duration,
    /// Whole-message keywords that end any running conversation.
    pub interrupt_keywords: Vec<String>,
    /// Watch the flows directory and reload on change.
    pub watch: bool,
    /// Refuse (at startup and on reload) a flow set whose `*.chat`
    /// transcripts fail.
    pub require_tests: bool,
    /// Consent keywords and help text.
    pub compliance: crate::compliance::ComplianceConfig,
    /// Loop guard: at most this many replies per conversation per window
    /// (0 disables it).
    pub loop_max_replies: usize,
    /// The window, in seconds, that `loop_max_replies` counts over.
    pub loop_window_secs: i64,
    /// Put `action`/`statusCallback` on replies so their delivery is tracked.
    pub track_delivery: bool,
    /// Bearer token for `GET /messages`; the endpoint is off without it.
    pub admin_token: Option<AuthToken>,
    /// Age after which dedupe records, delivery records, ended
    /// conversations, message texts and flow results are purged (0 keeps
    /// everything).
    pub retention_days: u64,
    /// Keep the text of inbound messages and of our replies in the
    /// message log (for `retention_days`); off: only who, when and the
    /// outcome are logged.
    pub store_message_text: bool,
    /// How often the purge of old records runs.
    pub purge_interval: Duration,
    /// Sending on our own: Twilio's API base, pace, quiet hours,
    /// `max_late`, and the credentials (which only the environment sets:
    /// `resolve` leaves them `None`; see
    /// [`crate::outbound::Credentials::from_env_optional`]).
    pub outbound: crate::outbound::OutboundConfig,
    /// A second address serving `/metrics`, `/status` and `/messages`;
    /// when set, the public listener serves only the webhooks and probes.
    pub admin_listen: Option<SocketAddr>,
    /// How log lines are written (text or one JSON object per line).
    pub log_format: LogFormat,
    /// Whether phone numbers in info-level log lines are shown or hashed.
    pub log_phone_numbers: PhoneNumbers,
    /// How long, after a stop signal, `/readyz` answers 503 while the
    /// listeners still accept, so a load balancer stops sending traffic
    /// before they close.
    pub shutdown_drain: Duration,
    /// Hosts and URL prefixes a flow's `call:` may reach (none: calls
    /// are refused); see [`crate::calls::Allow`].
    pub http_allow: Vec<String>,
    /// The time all of one message's calls share, well inside Twilio's
    /// 15 s; when it runs out the call fails and takes its `on_error`.
    pub call_budget: Duration,
}

pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// A drain longer than this would outlast systemd's default stop timeout
/// (90 s) and Kubernetes' grace period (30 s) by far.
pub(crate) const MAX_SHUTDOWN_DRAIN_MS: u64 = 60_000;
/// A shorter admin token is refused: it guards every message of every
/// sender, and a guessable one would give them away.
pub(crate) const MIN_ADMIN_TOKEN_CHARS: usize = 16;
pub(crate) const DEFAULT_MAX_BODY: usize = 64 * 1024;
/// Twilio sends its whole request at once; a few seconds is generous.
pub(crate) const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Longer than the 60 s idle timeout of common proxies and load balancers,
/// so that they close a pooled connection first and never send a request
/// on one we are closing.
pub(crate) const DEFAULT_IDLE_TIMEOUT_MS: u64 = 75_000;

/// The most async workers `workers` accepts.
pub(crate) const MAX_WORKERS: usize = 256;

/// Async workers when `workers` is not set: one fewer than the CPUs this
/// process may use, and at least one. The CPU left over runs the store's
/// thread (its grouped fsyncs), sled's and the results' threads, and the
/// kernel's work for them. On the 2-core machine of README "Performance"
/// one worker instead of two spent 13–15% less CPU per durable
/// multi-step message (no tasks stolen between workers, no memory freed
/// on the other worker's thread, no waking the other worker) and
/// answered more requests a second; relaxed, where one worker's CPU is
/// the bound, 7–25% fewer.
pub(crate) fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

impl Config {
    /// Settings for tests and examples: port 0, the given dirs, a token.
    pub fn for_test(flows_dir: &Path, data_dir: &Path, token: &str) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            public_url: "http://localhost".into(),
            flows_dir: flows_dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            store: None,
            auth: Auth::Verify(AuthToken::new(token)),
            cache_bytes: 16 * 1024 * 1024,
            durability: Durability::Flush,
            workers: default_workers(),
            max_body_bytes: DEFAULT_MAX_BODY,
            request_timeout: Duration::from_secs(10),
            max_connections: 1024,
            header_read_timeout: Duration::from_millis(DEFAULT_HEADER_READ_TIMEOUT_MS),
            idle_timeout: Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS),
            interrupt_keywords: Vec::new(),
            watch: false,
            require_tests: false,
            compliance: Default::default(),
            loop_max_replies: 0,
            loop_window_secs: 60,
            track_delivery: false,
            admin_token: None,
            retention_days: 0,
            store_message_text: false,
            purge_interval: Duration::from_secs(3600),
            outbound: crate::outbound::OutboundConfig::default(),
            admin_listen: None,
            log_format: LogFormat::Text,
            log_phone_numbers: PhoneNumbers::Hash,
            shutdown_drain: Duration::ZERO,
            http_allow: Vec::new(),
            call_budget: Duration::from_millis(crate::calls::DEFAULT_CALL_BUDGET_MS),
        }
    }
}

/// The optional TOML file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub(crate) listen: Option<String>,
    pub(crate) public_url: Option<String>,
    pub(crate) flows: Option<PathBuf>,
    pub(crate) data: Option<PathBuf>,
    pub(crate) store: Option<String>,
    pub(crate) cache_mb: Option<u64>,
    pub(crate) durability: Option<Durability>,
    pub(crate) workers: Option<usize>,
    pub(crate) max_body_bytes: Option<usize>,
    pub(crate) request_timeout_ms: Option<u64>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) header_read_timeout_ms: Option<u64>,
    pub(crate) idle_timeout_ms: Option<u64>,
    pub(crate) interrupt_keywords: Option<Vec<String>>,
    pub(crate) watch: Option<bool>,
    pub(crate) require_tests: Option<bool>,
    pub(crate) stop_keywords: Option<Vec<String>>,
    pub(crate) start_keywords: Option<Vec<String>>,
    pub(crate) help_keywords: Option<Vec<String>>,
    pub(crate) help_text: Option<String>,
    pub(crate) loop_max_replies: Option<usize>,
    pub(crate) loop_window_secs: Option<i64>,
    pub(crate) track_delivery: Option<bool>,
    pub(crate) admin_token: Option<String>,
    pub(crate) retention_days: Option<u64>,
    pub(crate) store_message_text: Option<bool>,
    pub(crate) purge_interval_secs: Option<u64>,
    pub(crate) twilio_api_base: Option<String>,
    pub(crate) send_interval_ms: Option<u64>,
    pub(crate) send_timeout_ms: Option<u64>,
    pub(crate) max_late_secs: Option<u64>,
    pub(crate) quiet_hours: Option<Vec<crate::outbound::RawQuietHours>>,
    pub(crate) admin_listen: Option<String>,
    pub(crate) log_format: Option<LogFormat>,
    pub(crate) log_phone_numbers: Option<PhoneNumbers>,
    pub(crate) shutdown_drain_ms: Option<u64>,
    pub(crate) http_allow: Option<Vec<String>>,
    pub(crate) call_budget_ms: Option<u64>,
}

impl FileConfig {
    /// Reads and parses the TOML config file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        FileConfig::parse(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    /// Parse a config file. Its keys are those of [`SETTINGS`]; any other
    /// is refused, with its line and every key there is.
    pub fn parse(text: &str) -> anyhow::Result<FileConfig> {
        let table: toml::Table = toml::from_str(text)?;
        if let Some(unknown) = table.keys().find(|k| setting(k).is_none()) {
            let line = text
                .lines()
                .position(|l| {
                    let l = l.trim_start().trim_start_matches('[');
                    l.strip_prefix(unknown.as_str())
                        .is_some_and(|rest| rest.trim_start().starts_with(['=', ']', '.']))
                })
                .map(|i| format!(" (line {})", i + 1))
                .unwrap_or_default();
            let known: Vec<String> = SETTINGS.iter().map(|s| format!("`{}`", s.key)).collect();
            bail!(
                "unknown key `{unknown}`{line}, expected one of {}",
                known.join(", ")
            );
        }
        Ok(toml::from_str(text)?)
    }
}

/// Values from flags and environment (already merged by clap).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub(crate) listen: Option<String>,
    pub(crate) public_url: Option<String>,
    pub(crate) flows: Option<PathBuf>,
    pub(crate) data: Option<PathBuf>,
    pub(crate) store: Option<String>,
    pub(crate) cache_mb: Option<u64>,
    pub(crate) durability: Option<Durability>,
    pub(crate) workers: Option<usize>,
    /// Accept unsigned webhooks (`--insecure-no-signature`).
    pub insecure: bool,
    pub(crate) no_watch: bool,
    pub(crate) require_tests: bool,
    pub(crate) admin_listen: Option<String>,
    pub(crate) log_format: Option<LogFormat>,
    pub(crate) log_phone_numbers: Option<PhoneNumbers>,
    pub(crate) shutdown_drain_ms: Option<u64>,
}

/// Merge flags/env over the file over defaults, and validate.
/// `token` is the value of `TWILIO_AUTH_TOKEN`, if set; `admin_token` that
/// of `SMSFLOW_ADMIN_TOKEN`.
pub fn resolve(
    o: Overrides,
    file: FileConfig,
    token: Option<String>,
    admin_token: Option<String>,
) -> anyhow::Result<Config> {
    let outbound = resolve_outbound(&file)?;
    let log_format = log_format(&o, &file);
    let listen_s = o
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen: SocketAddr = listen_s
        .parse()
        .with_context(|| format!("--listen {listen_s:?} is not an address like 127.0.0.1:8080"))?;

    let public_url = match o.public_url.or(file.public_url) {
        Some(u) => normalise_public_url(&u)?,
        None => {
            let u = format!("http://{listen}");
            tracing::warn!(
                public_url = %u,
                "no --public-url set: signatures are checked against the local address, \
                 which only matches requests signed for it (set the URL Twilio calls)"
            );
            u
        }
    };

    let token = token.filter(|t| !t.is_empty());
    let auth = match (token, o.insecure) {
        (Some(t), _) => Auth::Verify(AuthToken::new(t)),
        (None, true) => Auth::Insecure,
        (None, false) => bail!(
            "TWILIO_AUTH_TOKEN is not set: smsflow verifies every webhook with your \
             Twilio auth token (Console > Account > API keys & tokens). \
             Export it, e.g. `export TWILIO_AUTH_TOKEN=...`, or for local experiments \
             only pass --insecure-no-signature"
        ),
    };

    let cache_mb = o.cache_mb.or(file.cache_mb).unwrap_or(8);
    if cache_mb == 0 {
        bail!("cache size must be at least 1 MiB");
    }
    let workers = o.workers.or(file.workers).unwrap_or_else(default_workers);
    if !(1..=MAX_WORKERS).contains(&workers) {
        bail!("workers must be between 1 and {MAX_WORKERS}");
    }
    let max_body_bytes = file.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
    if max_body_bytes < 1024 {
        bail!("max_body_bytes must be at least 1024");
    }
    let timeout_ms = file.request_timeout_ms.unwrap_or(10_000);
    if !(100..=14_000).contains(&timeout_ms) {
        bail!("request_timeout_ms must be between 100 and 14000 (Twilio gives up at 15 s)");
    }
    let header_read_ms = file
        .header_read_timeout_ms
        .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT_MS);
    if !(100..=60_000).contains(&header_read_ms) {
        bail!("header_read_timeout_ms must be between 100 and 60000");
    }
    let idle_ms = file.idle_timeout_ms.unwrap_or(DEFAULT_IDLE_TIMEOUT_MS);
    if !(100..=3_600_000).contains(&idle_ms) {
        bail!("idle_timeout_ms must be between 100 and 3600000 (one hour)");
    }

    let defaults = crate::compliance::ComplianceConfig::default();
    let compliance = crate::compliance::ComplianceConfig {
        stop_keywords: file.stop_keywords.unwrap_or(defaults.stop_keywords),
        start_keywords: file.start_keywords.unwrap_or(defaults.start_keywords),
        help_keywords: file.help_keywords.unwrap_or(defaults.help_keywords),
        help_text: file.help_text.filter(|t| !t.trim().is_empty()),
    };
    let admin_token = admin_token.or(file.admin_token).filter(|t| !t.is_empty());
    if let Some(t) = admin_token
        .as_ref()
        .filter(|t| t.chars().count() < MIN_ADMIN_TOKEN_CHARS)
    {
        bail!(
            "the admin token (SMSFLOW_ADMIN_TOKEN or admin_token) must be at least \
             {MIN_ADMIN_TOKEN_CHARS} characters; this one has {}",
            t.chars().count()
        );
    }
    let loop_window_secs = file.loop_window_secs.unwrap_or(60);
    if loop_window_secs < 1 {
        bail!("loop_window_secs must be at least 1");
    }
    let purge_secs = file.purge_interval_secs.unwrap_or(3600);
    if purge_secs < 1 {
        bail!("purge_interval_secs must be at least 1");
    }
    let admin_listen = match o.admin_listen.or(file.admin_listen) {
        None => None,
        Some(a) if a.is_empty() => None,
        Some(a) => Some(a.parse::<SocketAddr>().with_context(|| {
            format!("--admin-listen {a:?} is not an address like 127.0.0.1:9090")
        })?),
    };
    if admin_listen.is_some_and(|a| a == listen && a.port() != 0) {
        bail!("--admin-listen must differ from --listen ({listen})");
    }
    let drain_ms = o.shutdown_drain_ms.or(file.shutdown_drain_ms).unwrap_or(0);
    if drain_ms > MAX_SHUTDOWN_DRAIN_MS {
        bail!(
            "shutdown_drain_ms must be at most {MAX_SHUTDOWN_DRAIN_MS} \
             (systemd and Kubernetes stop waiting long before)"
        );
    }

    let store = o.store.or(file.store).filter(|s| !s.is_empty());
    if let Some(url) = store
        .as_deref()
        .filter(|u| !crate::store::pg::is_database_url(u))
    {
        bail!(
            "--store {:?} is not a PostgreSQL URL like postgres://user:password@host:5432/smsflow \
             (leave it unset for the embedded store in --data)",
            crate::store::pg::redact_url(url)
        );
    }

    Ok(Config {
        store: store.map(DatabaseUrl::new),
        outbound,
        admin_listen,
        log_format,
        log_phone_numbers: o
            .log_phone_numbers
            .or(file.log_phone_numbers)
            .unwrap_or_default(),
        shutdown_drain: Duration::from_millis(drain_ms),
        http_allow: {
            let allow = file.http_allow.clone().unwrap_or_default();
            crate::calls::Allow::parse(&allow).map_err(|e| anyhow::anyhow!("http_allow: {e}"))?;
            allow
        },
        call_budget: {
            let ms = file
                .call_budget_ms
                .unwrap_or(crate::calls::DEFAULT_CALL_BUDGET_MS);
            if !(100..=crate::calls::MAX_CALL_BUDGET_MS).contains(&ms) {
                bail!(
                    "call_budget_ms must be between 100 and {} (Twilio waits 15 s for the whole answer)",
                    crate::calls::MAX_CALL_BUDGET_MS
                );
            }
            Duration::from_millis(ms)
        },
        compliance,
        loop_max_replies: file.loop_max_replies.unwrap_or(20),
        loop_window_secs,
        track_delivery: file.track_delivery.unwrap_or(false),
        admin_token: admin_token.map(AuthToken::new),
        retention_days: file.retention_days.unwrap_or(30),
        store_message_text: file.store_message_text.unwrap_or(false),
        purge_interval: Duration::from_secs(purge_secs),
        listen,
        public_url,
        flows_dir: o
            .flows
            .or(file.flows)
            .unwrap_or_else(|| PathBuf::from("flows")),
        data_dir: o
            .data
            .or(file.data)
            .unwrap_or_else(|| PathBuf::from("data")),
        auth,
        cache_bytes: cache_mb * 1024 * 1024,
        durability: o.durability.or(file.durability).unwrap_or_default(),
        workers,
        max_body_bytes,
        request_timeout: Duration::from_millis(timeout_ms),
        max_connections: file.max_connections.unwrap_or(1024).max(1),
        header_read_timeout: Duration::from_millis(header_read_ms),
        idle_timeout: Duration::from_millis(idle_ms),
        interrupt_keywords: file.interrupt_keywords.unwrap_or_default(),
        watch: !o.no_watch && file.watch.unwrap_or(true),
        require_tests: o.require_tests || file.require_tests.unwrap_or(false),
    })
}

/// The sender's settings from the file (credentials come from the
/// environment, not from here).
fn resolve_outbound(file: &FileConfig) -> anyhow::Result<crate::outbound::OutboundConfig> {
    use crate::outbound::{self, normalise_api_base};
    let api_base = normalise_api_base(
        file.twilio_api_base
            .as_deref()
            .unwrap_or(outbound::DEFAULT_API_BASE),
    )
    .map_err(anyhow::Error::msg)?;
    let interval_ms = file
        .send_interval_ms
        .unwrap_or(outbound::DEFAULT_SEND_INTERVAL_MS);
    if !(1..=3_600_000).contains(&interval_ms) {
        bail!("send_interval_ms must be between 1 and 3600000 (one hour)");
    }
    let timeout_ms = file
        .send_timeout_ms
        .unwrap_or(outbound::DEFAULT_SEND_TIMEOUT_MS);
    if !(100..=120_000).contains(&timeout_ms) {
        bail!("send_timeout_ms must be between 100 and 120000");
    }
    let max_late = file
        .max_late_secs
        .unwrap_or(outbound::DEFAULT_MAX_LATE_SECS);
    if max_late < 60 {
        bail!("max_late_secs must be at least 60");
    }
    let quiet_hours = outbound::quiet_rules(file.quiet_hours.clone().unwrap_or_default())
        .map_err(anyhow::Error::msg)?;
    Ok(outbound::OutboundConfig {
        api_base,
        send_interval: Duration::from_millis(interval_ms),
        max_late: Duration::from_secs(max_late),
        send_timeout: Duration::from_millis(timeout_ms),
        quiet_hours,
        credentials: None,
    })
}

/// The log format chosen by flag or environment, else the file, else
/// text. `main` needs it before the rest is resolved (resolving logs).
pub fn log_format(o: &Overrides, file: &FileConfig) -> LogFormat {
    o.log_format.or(file.log_format).unwrap_or_default()
}

/// A secret named `name`: the environment variable of that name, else the
/// systemd credential of that name (`$CREDENTIALS_DIRECTORY/<name>`, as
/// `LoadCredential=` provides it; one trailing newline is dropped). An
/// empty value counts as unset. A credential that exists but cannot be
/// read is an error, not a silent fallback.
pub fn secret(name: &str) -> anyhow::Result<Option<String>> {
    if let Some(v) = std::env::var(name).ok().filter(|v| !v.is_empty()) {
        return Ok(Some(v));
    }
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    let path = Path::new(&dir).join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let text = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text);
            Ok(Some(text.to_owned()).filter(|t| !t.is_empty()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the credential {}", path.display())),
    }
}

/// Accept `https://host[:port][/prefix]`; drop one trailing slash because
/// the request path we append starts with `/`.
fn normalise_public_url(u: &str) -> anyhow::Result<String> {
    let trimmed = u.trim();
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"));
    let Some(rest) = rest else {
        bail!("--public-url {u:?} must start with https:// or http://");
    };
    if rest.is_empty() || rest.starts_with('/') {
        bail!("--public-url {u:?} has no host");
    }
    if trimmed.contains('?') || trimmed.contains('#') {
        bail!(
            "--public-url {u:?} must not contain a query or fragment: \
             give the base; the request's own path and query are appended"
        );
    }
    Ok(trimmed.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file() {
        let file = FileConfig {
            listen: Some("127.0.0.1:9000".into()),
            flows: Some("fileflows".into()),
            ..Default::default()
        };
        let o = Overrides {
            listen: Some("127.0.0.1:7000".into()),
            ..Default::default()
        };
        let c = resolve(o, file, Some("t".into()), None).unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.flows_dir, PathBuf::from("fileflows"));
    }

    #[test]
    fn missing_token_refuses_with_a_fix() {
        let err = resolve(Overrides::default(), FileConfig::default(), None, None).unwrap_err();
        assert!(err.to_string().contains("TWILIO_AUTH_TOKEN"));
        let c = resolve(
            Overrides {
                insecure: true,
                ..Default::default()
            },
            FileConfig::default(),
            None,
            None,
        )
        .unwrap();
        assert!(matches!(c.auth, Auth::Insecure));
    }

    #[test]
    fn public_url_is_validated_and_trimmed() {
        assert_eq!(
            normalise_public_url("https://bot.example.com/").unwrap(),
            "https://bot.example.com"
        );
        assert_eq!(
            normalise_public_url("https://example.com/prefix").unwrap(),
            "https://example.com/prefix"
        );
        assert!(normalise_public_url("bot.example.com").is_err());
        assert!(normalise_public_url("https://x.com/?a=1").is_err());
    }

    #[test]
    fn workers_default_to_one_fewer_than_the_cpus_and_are_bounded() {
        let token = || Some("t".to_string());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let c = resolve(Overrides::default(), FileConfig::default(), token(), None).unwrap();
        assert_eq!(c.workers, cpus.saturating_sub(1).max(1));
        assert_eq!(c.workers, default_workers());
        let file = || FileConfig::parse("workers = 3\n").unwrap();
        assert_eq!(
            resolve(Overrides::default(), file(), token(), None)
                .unwrap()
                .workers,
            3
        );
        let flag = Overrides {
            workers: Some(5),
            ..Default::default()
        };
        assert_eq!(resolve(flag, file(), token(), None).unwrap().workers, 5);
        for bad in [0, MAX_WORKERS + 1] {
            let o = Overrides {
                workers: Some(bad),
                ..Default::default()
            };
            let err = resolve(o, FileConfig::default(), token(), None).unwrap_err();
            assert_eq!(
                err.to_string(),
                "workers must be between 1 and 256",
                "{bad}"
            );
        }
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = AuthToken::new("secret123");
        assert!(!format!("{t:?}").contains("secret123"));
    }

    #[test]
    fn connection_timeouts_have_defaults_and_bounds() {
        let token = || Some("t".to_string());
        let c = resolve(Overrides::default(), FileConfig::default(), token(), None).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Duration::from_secs(75));
        let f: FileConfig =
            toml::from_str("header_read_timeout_ms = 2000\nidle_timeout_ms = 30000").unwrap();
        let c = resolve(Overrides::default(), f, token(), None).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        let f: FileConfig = toml::from_str("header_read_timeout_ms = 0").unwrap();
        let err = resolve(Overrides::default(), f, token(), None).unwrap_err();
        assert!(err.to_string().contains("header_read_timeout_ms"), "{err}");
    }

    /// The keys serde accepts in the file, from its own error message for
    /// an unknown key ("expected one of `listen`, `public_url`, …").
    fn file_keys() -> Vec<String> {
        let err = toml::from_str::<FileConfig>("no_such_key = 1")
            .unwrap_err()
            .to_string();
        let list = &err[err.find("expected one of").expect("serde lists the keys")..];
        let keys: Vec<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        assert!(keys.len() > 20, "{err}");
        keys
    }

    #[test]
    fn every_file_key_is_in_the_help_and_in_describe() {
        let token = Some("twilio-secret-token".to_string());
        let admin = Some("admin-secret-token-0123".to_string());
        let c = resolve(Overrides::default(), FileConfig::default(), token, admin).unwrap();
        let described = describe(&c, false);
        let help = config_flag_help();
        let mut help_keys: Vec<&str> = help["Optional TOML config file. Keys: ".len()..]
            .split(" (")
            .next()
            .unwrap()
            .split(", ")
            .collect();
        help_keys.sort_unstable();
        let mut keys = file_keys();
        keys.sort();
        assert_eq!(
            help_keys, keys,
            "serve --help lists exactly the file's keys"
        );
        for key in &keys {
            assert!(
                described
                    .lines()
                    .any(|l| l.starts_with(&format!("{key} = "))
                        || l.starts_with(&format!("# {key}: "))),
                "describe lacks `{key}`:\n{described}"
            );
        }
        assert!(!described.contains("secret"), "{described}");
        assert!(
            described.contains("admin_token = \"<redacted>\""),
            "{described}"
        );
        // What it prints is a config file that gives the same settings.
        let back: FileConfig = toml::from_str(&described).unwrap();
        assert_eq!(back.durability, Some(Durability::Flush));
        assert_eq!(back.stop_keywords, Some(c.compliance.stop_keywords.clone()));
        assert_eq!(back.idle_timeout_ms, Some(DEFAULT_IDLE_TIMEOUT_MS));
    }

    /// README.md's settings table has a row for every setting, naming its
    /// key, flag and environment variable.
    #[test]
    fn the_readme_documents_every_setting() {
        let readme = include_str!("../README.md");
        let section = &readme[readme.find("## Running it").expect("section")..];
        let rows: Vec<&str> = section
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("## "))
            .filter(|l| l.starts_with('|'))
            .collect();
        for s in SETTINGS {
            let mut names = vec![s.key];
            names.extend(s.flag);
            names.extend(s.env);
            assert!(
                rows.iter()
                    .any(|row| names.iter().all(|n| row.contains(&format!("`{n}`")))),
                "README.md's \"Running it\" table has no row naming {names:?}"
            );
        }
    }

    #[test]
    fn the_database_password_is_never_shown() {
        let o = Overrides {
            store: Some("postgres://smsflow:s3cret@db:5432/smsflow".into()),
            ..Overrides::default()
        };
        let c = resolve(o, FileConfig::default(), Some("t".into()), None).unwrap();
        assert_eq!(
            c.store.as_ref().map(DatabaseUrl::expose),
            Some("postgres://smsflow:s3cret@db:5432/smsflow")
        );
        let shown = format!("{c:?}\n{}", describe(&c, false));
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("store = \"postgres://smsflow:***@db:5432/smsflow\""));
        let o = Overrides {
            store: Some("/var/lib/smsflow".into()),
            ..Overrides::default()
        };
        let err = resolve(o, FileConfig::default(), Some("t".into()), None).unwrap_err();
        assert!(err.to_string().contains("is not a PostgreSQL URL"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = FileConfig::parse("listen = \"127.0.0.1:1\"\n\n  lisen = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("unknown key `lisen` (line 3), expected one of `listen`, "),
            "{err}"
        );
        let err = FileConfig::parse("[tls]\ncert = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("unknown key `tls` (line 1)"), "{err}");
        let f = FileConfig::parse("cache_mb = 4\n").unwrap();
        assert_eq!(f.cache_mb, Some(4));
    }

    #[test]
    fn flag_help_shows_the_built_in_default() {
        assert_eq!(
            flag_help("--listen"),
            format!("Address to listen on [default: {DEFAULT_LISTEN}]")
        );
        assert_eq!(
            setting("max_body_bytes").unwrap().default_text(),
            DEFAULT_MAX_BODY.to_string()
        );
        assert_eq!(
            setting("interrupt_keywords").unwrap().default_text(),
            "none"
        );
    }

    #[test]
    fn a_short_admin_token_is_refused() {
        let token = || Some("t".to_string());
        let with = |admin: &str| {
            resolve(
                Overrides::default(),
                FileConfig::default(),
                token(),
                Some(admin.to_string()),
            )
        };
        let err = with("fifteen-chars-x").unwrap_err().to_string();
        assert!(
            err.contains("at least 16 characters; this one has 15"),
            "{err}"
        );
        assert!(with("sixteen-chars-xx").unwrap().admin_token.is_some());
    }

    #[test]
    fn quiet_hours_are_checked_when_the_file_loads() {
        let token = || Some("t".to_string());
        let f = FileConfig::parse(
            "[[quiet_hours]]\nnumber = \"*\"\nstart = \"21:00\"\nend = \"08:00\"\ntime_zone = \"America/New_York\"\n",
        )
        .unwrap();
        let c = resolve(Overrides::default(), f, token(), None).unwrap();
        assert_eq!(c.outbound.quiet_hours.len(), 1);
        assert_eq!(c.outbound.quiet_hours[0].raw().end, "08:00");
        let f = FileConfig::parse(
            "[[quiet_hours]]\nnumber = \"*\"\nstart = \"21:00\"\nend = \"08:00\"\ntime_zone = \"Mars/Olympus\"\n",
        )
        .unwrap();
        let err = resolve(Overrides::default(), f, token(), None).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "quiet_hours rule 1 (number \"*\"): time_zone \"Mars/Olympus\" is not an IANA time zone"
            ),
            "{err}"
        );
        let err =
            FileConfig::parse("[[quiet_hours]]\nnumber = \"*\"\nbegin = \"21:00\"\n").unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `begin`"),
            "{err:#}"
        );
        let c = resolve(Overrides::default(), FileConfig::default(), token(), None).unwrap();
        assert_eq!(c.outbound.api_base, "https://api.twilio.com");
        assert_eq!(c.outbound.send_interval, Duration::from_secs(1));
        assert_eq!(c.outbound.max_late, Duration::from_secs(6 * 3600));
    }

    #[test]
    fn service_settings_are_checked() {
        let token = || Some("t".to_string());
        let file = |text: &str| toml::from_str::<FileConfig>(text).unwrap();
        let c = resolve(Overrides::default(), FileConfig::default(), token(), None).unwrap();
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_phone_numbers, PhoneNumbers::Hash);
        assert_eq!(c.shutdown_drain, Duration::ZERO);
        let c = resolve(
            Overrides {
                log_format: Some(LogFormat::Text),
                ..Default::default()
            },
            file(
                "admin_listen = \"127.0.0.1:9090\"\nlog_format = \"json\"\n\
                 log_phone_numbers = \"show\"\nshutdown_drain_ms = 5000",
            ),
            token(),
            None,
        )
        .unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Text, "the flag wins over the file");
        assert_eq!(c.log_phone_numbers, PhoneNumbers::Show);
        assert_eq!(c.shutdown_drain, Duration::from_secs(5));
        for (text, expected) in [
            (
                "admin_listen = \"localhost\"",
                "--admin-listen \"localhost\"",
            ),
            (
                "admin_listen = \"127.0.0.1:8080\"",
                "must differ from --listen",
            ),
            (
                "shutdown_drain_ms = 60001",
                "shutdown_drain_ms must be at most 60000",
            ),
        ] {
            let err = resolve(Overrides::default(), file(text), token(), None).unwrap_err();
            assert!(err.to_string().contains(expected), "{text}: {err}");
        }
        assert!(toml::from_str::<FileConfig>("log_format = \"xml\"").is_err());
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
        let f: FileConfig = toml::from_str("durability = \"relaxed\"\ncache_mb = 8").unwrap();
        assert_eq!(f.durability, Some(Durability::Relaxed));
    }
}
