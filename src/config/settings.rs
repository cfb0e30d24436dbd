//! The one table of settings ([`SETTINGS`]) and what is generated from
//! it: the config file's known keys, `serve --help` (each key with its help
//! and built-in default) and `smsflow config` ([`describe`]).

use std::time::Duration;

use super::{resolve, Auth, Config, FileConfig, Overrides, DEFAULT_LISTEN};
use crate::store::Durability;

/// One setting of the config file: its key, the flag and environment
/// variable that also set it (if any), what it does, and how to read its
/// value back from a resolved [`Config`].
///
/// [`SETTINGS`] is the one list of them: the file parser accepts exactly
/// these keys, `serve --help` lists them with their help and built-in
/// defaults, and `smsflow config` prints them. To add a setting: a row
/// here, an `Option` field of the same name in [`FileConfig`] (a flag in
/// `cli::ServeArgs` and a field in [`Overrides`] if it has one), the typed
/// field in [`Config`] with its default and check in [`resolve`], and a
/// row in README.md's "Running it" table. Tests fail until each is there.
pub struct Setting {
    /// The key in the TOML file.
    pub key: &'static str,
    /// The `serve` flag that also sets it.
    pub flag: Option<&'static str>,
    /// The environment variable that also sets it.
    pub env: Option<&'static str>,
    /// One line for `serve --help`.
    pub help: &'static str,
    /// The default `serve --help` shows, when it is not simply the
    /// built-in value (which is read from [`resolve`] itself).
    pub default_note: Option<&'static str>,
    /// What it means when unset (for settings that may be unset).
    pub unset: &'static str,
    /// Its value in a resolved config, as the file would write it; `None`
    /// when unset.
    pub value: fn(&Config) -> Option<toml::Value>,
}

fn text(s: &str) -> Option<toml::Value> {
    Some(toml::Value::String(s.to_owned()))
}

fn int(n: u64) -> Option<toml::Value> {
    Some(toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX)))
}

fn millis(d: Duration) -> Option<toml::Value> {
    int(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn flag(b: bool) -> Option<toml::Value> {
    Some(toml::Value::Boolean(b))
}

fn list(words: &[String]) -> Option<toml::Value> {
    Some(toml::Value::Array(
        words
            .iter()
            .map(|w| toml::Value::String(w.clone()))
            .collect(),
    ))
}

/// Every setting of the config file, in the order `smsflow config` prints
/// them (see [`Setting`] for how to add one).
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "listen",
        flag: Some("--listen"),
        env: Some("SMSFLOW_LISTEN"),
        help: "Address to listen on",
        default_note: None,
        unset: "",
        value: |c| text(&c.listen.to_string()),
    },
    Setting {
        key: "public_url",
        flag: Some("--public-url"),
        env: Some("SMSFLOW_PUBLIC_URL"),
        help: "The base URL Twilio calls, e.g. https://bot.example.com; signatures are \
               checked against it joined with the request path and query",
        default_note: Some("http://<listen>"),
        unset: "",
        value: |c| text(&c.public_url),
    },
    Setting {
        key: "flows",
        flag: Some("--flows"),
        env: Some("SMSFLOW_FLOWS"),
        help: "Flows directory",
        default_note: None,
        unset: "",
        value: |c| text(&c.flows_dir.to_string_lossy()),
    },
    Setting {
        key: "data",
        flag: Some("--data"),
        env: Some("SMSFLOW_DATA"),
        help: "Data directory for the embedded store",
        default_note: None,
        unset: "",
        value: |c| text(&c.data_dir.to_string_lossy()),
    },
    Setting {
        key: "store",
        flag: Some("--store"),
        env: Some("SMSFLOW_DATABASE_URL"),
        help: "PostgreSQL instead of the embedded store: postgres://user:password@host:port/db \
               (?sslmode=require for TLS); several instances can share one database",
        default_note: None,
        unset: "not set: the embedded sled store in `data`",
        value: |c| {
            c.store
                .as_ref()
                .and_then(|u| text(&crate::store::pg::redact_url(u.expose())))
        },
    },
    Setting {
        key: "cache_mb",
        flag: Some("--cache-mb"),
        env: Some("SMSFLOW_CACHE_MB"),
        help: "Store cache size in MiB",
        default_note: None,
        unset: "",
        value: |c| int(c.cache_bytes / (1024 * 1024)),
    },
    Setting {
        key: "durability",
        flag: Some("--durability"),
        env: Some("SMSFLOW_DURABILITY"),
        help: "When state becomes durable",
        default_note: None,
        unset: "",
        value: |c| {
            text(match c.durability {
                Durability::Flush => "flush",
                Durability::Relaxed => "relaxed",
            })
        },
    },
    Setting {
        key: "workers",
        flag: Some("--workers"),
        env: Some("SMSFLOW_WORKERS"),
        help: "Async worker threads serving requests (1 to 256)",
        default_note: Some("one fewer than the CPUs, at least 1"),
        unset: "",
        value: |c| int(c.workers as u64),
    },
    Setting {
        key: "watch",
        flag: Some("--no-watch"),
        env: Some("SMSFLOW_NO_WATCH"),
        help: "Watch the flows directory and reload on change (the flag turns it off)",
        default_note: None,
        unset: "",
        value: |c| flag(c.watch),
    },
    Setting {
        key: "require_tests",
        flag: Some("--require-tests"),
        env: Some("SMSFLOW_REQUIRE_TESTS"),
        help: "Refuse to start with, or reload to, flows whose *.chat transcripts fail",
        default_note: None,
        unset: "",
        value: |c| flag(c.require_tests),
    },
    Setting {
        key: "max_body_bytes",
        flag: None,
        env: None,
        help: "Largest accepted webhook body, in bytes",
        default_note: None,
        unset: "",
        value: |c| int(c.max_body_bytes as u64),
    },
    Setting {
        key: "request_timeout_ms",
        flag: None,
        env: None,
        help: "Time limit per request, in ms (100 to 14000: Twilio gives up at 15 s)",
        default_note: None,
        unset: "",
        value: |c| millis(c.request_timeout),
    },
    Setting {
        key: "header_read_timeout_ms",
        flag: None,
        env: None,
        help: "Time a connection has to send a complete request head, in ms",
        default_note: None,
        unset: "",
        value: |c| millis(c.header_read_timeout),
    },
    Setting {
        key: "idle_timeout_ms",
        flag: None,
        env: None,
        help: "Time a kept-alive connection may sit idle between requests, in ms",
        default_note: None,
        unset: "",
        value: |c| millis(c.idle_timeout),
    },
    Setting {
        key: "max_connections",
        flag: None,
        env: None,
        help: "Most connections open at once (the longest-idle one makes room)",
        default_note: None,
        unset: "",
        value: |c| int(c.max_connections as u64),
    },
    Setting {
        key: "http_allow",
        flag: None,
        env: None,
        help: "Hosts (shop.example) and URL prefixes (https://shop.example/api/) flows may call; \
               a host name must resolve to public addresses, a private or loopback address \
               must be written as the host itself",
        default_note: None,
        unset: "",
        value: |c| list(&c.http_allow),
    },
    Setting {
        key: "call_budget_ms",
        flag: None,
        env: None,
        help: "Time all HTTP calls of one message share; when spent a call takes its on_error",
        default_note: None,
        unset: "",
        value: |c| millis(c.call_budget),
    },
    Setting {
        key: "interrupt_keywords",
        flag: None,
        env: None,
        help: "Whole-message keywords that end any running conversation",
        default_note: None,
        unset: "",
        value: |c| list(&c.interrupt_keywords),
    },
    Setting {
        key: "stop_keywords",
        flag: None,
        env: None,
        help: "Words that opt a sender out",
        default_note: Some("Twilio's list"),
        unset: "",
        value: |c| list(&c.compliance.stop_keywords),
    },
    Setting {
        key: "start_keywords",
        flag: None,
        env: None,
        help: "Words that opt a sender back in",
        default_note: Some("Twilio's list"),
        unset: "",
        value: |c| list(&c.compliance.start_keywords),
    },
    Setting {
        key: "help_keywords",
        flag: None,
        env: None,
        help: "Words that ask for help",
        default_note: Some("Twilio's list"),
        unset: "",
        value: |c| list(&c.compliance.help_keywords),
    },
    Setting {
        key: "help_text",
        flag: None,
        env: None,
        help: "The reply to a help word",
        default_note: None,
        unset: "not set: HELP is answered with silence",
        value: |c| c.compliance.help_text.as_deref().and_then(text),
    },
    Setting {
        key: "loop_max_replies",
        flag: None,
        env: None,
        help: "Loop guard: most replies to one conversation per window (0 turns it off)",
        default_note: None,
        unset: "",
        value: |c| int(c.loop_max_replies as u64),
    },
    Setting {
        key: "loop_window_secs",
        flag: None,
        env: None,
        help: "Loop guard: the window, in seconds",
        default_note: None,
        unset: "",
        value: |c| Some(toml::Value::Integer(c.loop_window_secs)),
    },
    Setting {
        key: "track_delivery",
        flag: None,
        env: None,
        help: "Ask Twilio for a delivery callback on every reply",
        default_note: None,
        unset: "",
        value: |c| flag(c.track_delivery),
    },
    Setting {
        key: "admin_token",
        flag: None,
        env: Some("SMSFLOW_ADMIN_TOKEN"),
        help: "Bearer token for GET /messages and /status detail (at least 16 characters)",
        default_note: None,
        unset: "not set: GET /messages is off",
        // A secret: only whether it is set is ever shown.
        value: |c| c.admin_token.as_ref().and_then(|_| text("<redacted>")),
    },
    Setting {
        key: "retention_days",
        flag: None,
        env: None,
        help: "Purge dedupe and delivery records, ended conversations, message texts, \
               flow results and finished call jobs older than this many days (0 keeps \
               everything)",
        default_note: None,
        unset: "",
        value: |c| int(c.retention_days),
    },
    Setting {
        key: "store_message_text",
        flag: None,
        env: None,
        help: "Keep the text of inbound messages and replies in the message log \
               (for retention_days)",
        default_note: None,
        unset: "",
        value: |c| flag(c.store_message_text),
    },
    Setting {
        key: "purge_interval_secs",
        flag: None,
        env: None,
        help: "How often the purge runs, in seconds",
        default_note: None,
        unset: "",
        value: |c| int(c.purge_interval.as_secs()),
    },
    Setting {
        key: "twilio_api_base",
        flag: None,
        env: None,
        help:
            "Twilio's REST API for messages we send on our own (a regional edge, or a test server)",
        default_note: None,
        unset: "",
        value: |c| text(&c.outbound.api_base),
    },
    Setting {
        key: "send_interval_ms",
        flag: None,
        env: None,
        help: "Least time between two messages we send on our own from one number, in ms \
               (1000: Twilio's long-code pace)",
        default_note: None,
        unset: "",
        value: |c| millis(c.outbound.send_interval),
    },
    Setting {
        key: "send_timeout_ms",
        flag: None,
        env: None,
        help: "Time limit of one request to Twilio's REST API, in ms (past it the message's \
               fate is unknown and it is not sent again)",
        default_note: None,
        unset: "",
        value: |c| millis(c.outbound.send_timeout),
    },
    Setting {
        key: "max_late_secs",
        flag: None,
        env: None,
        help: "A message we send on our own that is this late (server down, store failing) is \
               skipped, not sent",
        default_note: None,
        unset: "",
        value: |c| int(c.outbound.max_late.as_secs()),
    },
    Setting {
        key: "quiet_hours",
        flag: None,
        env: None,
        help: "[[quiet_hours]] tables: number (or \"*\"), start, end (HH:MM) and time_zone \
               (IANA); messages we send on our own wait until the end",
        default_note: None,
        unset: "",
        value: |c| {
            Some(toml::Value::Array(
                c.outbound
                    .quiet_hours
                    .iter()
                    .map(|q| {
                        let r = q.raw();
                        let mut t = toml::Table::new();
                        for (k, v) in [
                            ("number", &r.number),
                            ("start", &r.start),
                            ("end", &r.end),
                            ("time_zone", &r.time_zone),
                        ] {
                            t.insert(k.into(), toml::Value::String(v.clone()));
                        }
                        toml::Value::Table(t)
                    })
                    .collect(),
            ))
        },
    },
    Setting {
        key: "admin_listen",
        flag: Some("--admin-listen"),
        env: Some("SMSFLOW_ADMIN_LISTEN"),
        help: "A second address, e.g. 127.0.0.1:9090, for /metrics, /status and /messages; \
               the public address then serves only the webhooks and the probes",
        default_note: None,
        unset: "not set: one address serves everything",
        value: |c| c.admin_listen.and_then(|a| text(&a.to_string())),
    },
    Setting {
        key: "log_format",
        flag: Some("--log-format"),
        env: Some("SMSFLOW_LOG_FORMAT"),
        help: "Log lines as text, or as one JSON object per line (json)",
        default_note: None,
        unset: "",
        value: |c| text(c.log_format.as_str()),
    },
    Setting {
        key: "log_phone_numbers",
        flag: Some("--log-phone-numbers"),
        env: Some("SMSFLOW_LOG_PHONE_NUMBERS"),
        help: "Phone numbers in info log lines: hash (keyed, stable per data directory) or show",
        default_note: None,
        unset: "",
        value: |c| text(c.log_phone_numbers.as_str()),
    },
    Setting {
        key: "shutdown_drain_ms",
        flag: Some("--shutdown-drain-ms"),
        env: Some("SMSFLOW_SHUTDOWN_DRAIN_MS"),
        help: "On SIGTERM, keep accepting this long with /readyz answering 503, so a \
               load balancer stops sending traffic before the listener closes",
        default_note: None,
        unset: "",
        value: |c| millis(c.shutdown_drain),
    },
];

/// The setting with config file key `key`.
pub fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

impl Setting {
    /// The built-in default, as `serve --help` shows it.
    pub fn default_text(&self) -> String {
        if let Some(note) = self.default_note {
            return note.to_owned();
        }
        match (self.value)(builtin()) {
            Some(toml::Value::String(s)) => s,
            Some(toml::Value::Array(a)) if a.is_empty() => "none".to_owned(),
            Some(toml::Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(", "),
            Some(v) => v.to_string(),
            None => self.unset.to_owned(),
        }
    }

    /// The help of its `serve` flag: the help line and the default.
    pub fn flag_help(&self) -> String {
        format!("{} [default: {}]", self.help, self.default_text())
    }
}

/// The help of the `serve` flag named `flag`, from [`SETTINGS`].
pub fn flag_help(flag: &str) -> String {
    SETTINGS
        .iter()
        .find(|s| s.flag == Some(flag))
        .map(Setting::flag_help)
        .unwrap_or_default()
}

/// The configuration with nothing set: the built-in defaults, read from
/// [`resolve`] itself so that no default is written twice.
fn builtin() -> &'static Config {
    static BUILTIN: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    BUILTIN.get_or_init(|| {
        let nothing = Overrides {
            // Neither is a default: they only keep resolving from
            // refusing (no token) or warning (no public URL).
            insecure: true,
            public_url: Some(format!("http://{DEFAULT_LISTEN}")),
            ..Overrides::default()
        };
        resolve(nothing, FileConfig::default(), None, None).expect("the defaults are valid")
    })
}

/// `--config`'s short help (`serve -h`): every key by name.
pub fn config_flag_help() -> String {
    let keys: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
    format!(
        "Optional TOML config file. Keys: {} (README.md, \"Running it\"). \
         `smsflow config` prints every one with the value in effect",
        keys.join(", ")
    )
}

/// `--config`'s long help (`serve --help`): every key with its help and
/// default.
pub fn config_flag_long_help() -> String {
    let width = SETTINGS.iter().map(|s| s.key.len()).max().unwrap_or(0);
    let mut out = String::from(
        "Optional TOML config file; flags and the environment win over it. \
         Its keys (README.md, \"Running it\"):\n",
    );
    for s in SETTINGS {
        out.push_str(&format!(
            "  {:width$}  {} [default: {}]\n",
            s.key,
            s.help,
            s.default_text()
        ));
    }
    out.push_str("`smsflow config` prints every one with the value in effect");
    out
}

/// The configuration in effect, as the TOML file would write it: every key
/// of [`FileConfig`] with its value after flags, environment, file and
/// defaults were merged (`smsflow config`). Secrets are never printed:
/// `admin_token` shows as `"<redacted>"`, and the Twilio auth token only
/// as a comment saying whether it is set. `auth_token_missing` says that
/// `TWILIO_AUTH_TOKEN` is unset while signatures are required (`serve`
/// would refuse to start); `config.auth` is then `Insecure` only so the
/// rest could be resolved.
pub fn describe(config: &Config, auth_token_missing: bool) -> String {
    let mut out = String::from(
        "# smsflow: the configuration in effect (flags > environment > config file > defaults)\n",
    );
    for s in SETTINGS {
        match (s.value)(config) {
            Some(v) => out.push_str(&format!("{} = {v}\n", s.key)),
            None => out.push_str(&format!("# {}: {}\n", s.key, s.unset)),
        }
    }
    out.push_str(match (&config.auth, auth_token_missing) {
        (_, true) => {
            "# TWILIO_AUTH_TOKEN: not set: serve refuses to start (export it, or pass --insecure-no-signature)\n"
        }
        (Auth::Verify(_), false) => "# TWILIO_AUTH_TOKEN: set (not shown)\n",
        (Auth::Insecure, false) => {
            "# signatures: NOT checked (--insecure-no-signature)\n"
        }
    });
    out.push_str(&match &config.outbound.credentials {
        Some(c) => format!(
            "# TWILIO_ACCOUNT_SID: set ({}): messages we send on our own go out\n",
            c.account_sid()
        ),
        None => "# TWILIO_ACCOUNT_SID: not set: nothing is sent on our own (README.md, \"Sending on our own\")\n".to_owned(),
    });
    out
}
