//! Command-line interface: subcommands, flags and their environment
//! fallbacks. Parsing only; the work is done by `app`, `flow` and friends.
//!
//! The doc comments on arguments are their `--help` text, written for a
//! terminal: example URLs stay bare.
#![allow(rustdoc::bare_urls)]

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, Overrides};
use crate::store::Durability;

#[derive(Debug, Parser)]
#[command(
    name = "smsflow",
    version,
    about = "SMS auto-responder behind a Twilio number"
)]
/// The `smsflow` command line.
pub struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the webhook server.
    Serve(ServeArgs),
    /// Validate a flows directory, and every directory below it holding
    /// flow files, each as its own flow set; prints every problem as
    /// file:line:column.
    Check {
        /// The flows directory [default: the config file's `flows`, else
        /// ./flows].
        dir: Option<PathBuf>,
        /// The server's config file, for its consent and interrupt keywords.
        #[command(flatten)]
        config: ToolConfig,
    },
    /// Compute the X-Twilio-Signature for a request and print a ready curl
    /// command, to test a deployment without Twilio.
    Sign(SignArgs),
    /// List recent messages with direction, status, error code and the
    /// conversation they belong to.
    Messages(MessagesArgs),
    /// Talk to your flows in the terminal: the server's pipeline and a real
    /// store, a virtual clock, no HTTP or Twilio. Type /help inside for
    /// commands.
    Chat(ChatArgs),
    /// Run the *.chat transcript tests in a directory (and below), each
    /// against the flows beside it, through the server's pipeline (consent
    /// keywords, loop guard, interrupt keywords); exits non-zero when any
    /// fails.
    Test {
        /// The directory holding flows and their transcripts [default: the
        /// config file's `flows`, else ./flows].
        dir: Option<PathBuf>,
        /// The server's config file, for its consent and interrupt keywords.
        #[command(flatten)]
        config: ToolConfig,
    },
    /// Print a diagram of one flow's steps and routes.
    Graph(GraphArgs),
    /// Start a flow for a contact through a running server's admin API
    /// (POST /flows/FLOW/start); needs SMSFLOW_ADMIN_TOKEN.
    Start(StartArgs),
    /// Import contact fields from CSV, or export them, through a running
    /// server's admin API; needs SMSFLOW_ADMIN_TOKEN.
    #[command(subcommand)]
    Contacts(ContactsCommand),
    /// List broadcasts with sent/skipped/failed/remaining, send one, or
    /// cancel one, through a running server; needs SMSFLOW_ADMIN_TOKEN.
    Broadcasts(BroadcastsArgs),
    /// Export what flows collected: one row per ended run (see README,
    /// "Flow results").
    #[command(subcommand)]
    Export(ExportCommand),
    /// Erase everything stored about one contact (conversations, contact
    /// fields, message log lines and texts, delivery records, pending
    /// timers and outbox messages, flow results); the consent record is
    /// kept. Idempotent; audited.
    Forget(ForgetArgs),
    /// Print the configuration `serve` would run with, flags, environment,
    /// config file and defaults merged: every config file key with its
    /// value, as TOML. Secrets are not shown.
    Config(ServeArgs),
    /// Apply the PostgreSQL schema's migrations that the database lacks
    /// (`serve --store` applies them too when it starts).
    Migrate(MigrateArgs),
    /// Move a store: `store copy --from DATA_DIR --to postgres://…`.
    #[command(subcommand)]
    Store(StoreCommand),
}

/// `smsflow store` subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy every record of a sled data directory into an empty
    /// PostgreSQL database (migrated first), in one transaction. Stop the
    /// server using the data directory first; the directory is left as
    /// it is.
    Copy {
        /// The sled data directory (`--data` of the server).
        #[arg(long)]
        from: PathBuf,
        /// The database: postgres://user:password@host:port/db.
        #[arg(long, env = "SMSFLOW_DATABASE_URL", hide_env_values = true)]
        to: String,
    },
}

/// Flags of `smsflow migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The database: postgres://user:password@host:port/db.
    #[arg(long, env = "SMSFLOW_DATABASE_URL", hide_env_values = true)]
    pub store: String,
}

/// `--config` for the author tools: the server's TOML file, so consent
/// keywords, help text, interrupt keywords and the loop guard apply as
/// they will when served.
#[derive(Debug, Clone, clap::Args)]
pub struct ToolConfig {
    /// The server's TOML config file (as `serve --config`); without it the
    /// server's defaults apply. TWILIO_AUTH_TOKEN is not needed.
    #[arg(long = "config", env = "SMSFLOW_CONFIG", value_name = "FILE")]
    pub path: Option<PathBuf>,
}

/// Flags of `smsflow messages`.
#[derive(Debug, clap::Args)]
pub struct MessagesArgs {
    /// Read the store in this data directory (only while no server uses it).
    #[arg(long, default_value = "data", conflicts_with = "server")]
    pub data: PathBuf,
    /// Ask a running server instead, e.g. http://127.0.0.1:8080; needs
    /// SMSFLOW_ADMIN_TOKEN (the server's admin token) in the environment.
    #[arg(long)]
    pub server: Option<String>,
    /// Read this PostgreSQL database instead of --data,
    /// postgres://user:password@host:port/db (servers may be running on
    /// it); --server, when given, is asked instead.
    #[arg(long, env = "SMSFLOW_DATABASE_URL", hide_env_values = true)]
    pub store: Option<String>,
    /// Only messages from or to this number.
    #[arg(long)]
    pub number: Option<String>,
    /// Only this status (delivered, failed, …) or inbound outcome (reply, silence).
    #[arg(long)]
    pub status: Option<String>,
    /// At most this many rows [default: 50].
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only messages at or after this time: unix seconds, 2026-11-30 or
    /// 2026-11-30T08:15:00Z (UTC).
    #[arg(long)]
    pub since: Option<String>,
    /// Only messages before this time (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Only messages whose kept text contains this (ignoring case; texts
    /// are kept only with store_message_text = true).
    #[arg(long)]
    pub text: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `smsflow chat`.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// Flows directory [default: the config file's `flows`, else ./flows].
    #[arg(long)]
    pub flows: Option<PathBuf>,
    /// The sender's number.
    #[arg(long, default_value = "+15551230001")]
    pub from: String,
    /// Our number the sender texts (matters for `to:`-scoped rules).
    #[arg(long, default_value = "+15550001111")]
    pub to: String,
    /// Keep conversations in this store directory (reused across chats)
    /// instead of a temporary one. Do not point it at a running server's.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Start the virtual clock at this time (unix seconds) [default: now].
    #[arg(long)]
    pub now: Option<i64>,
    /// An interrupt keyword that ends any active run (repeatable); replaces
    /// the config file's `interrupt_keywords`.
    #[arg(long = "interrupt", value_name = "WORD")]
    pub interrupt: Vec<String>,
    /// Make flows' HTTP calls for real (to the config file's `http_allow`);
    /// without it no call leaves the machine and `/http` declares answers.
    #[arg(long)]
    pub real_calls: bool,
    /// The server's config file, for its consent and interrupt keywords.
    #[command(flatten)]
    pub config: ToolConfig,
}

/// Output formats of `smsflow graph`.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum GraphFormat {
    /// Mermaid flowchart (renders in GitHub markdown)
    #[default]
    Mermaid,
    /// Graphviz DOT (`| dot -Tsvg > flow.svg`)
    Dot,
}

/// Flags of `smsflow graph`.
#[derive(Debug, clap::Args)]
pub struct GraphArgs {
    /// The flow's name (its file name without extension, or its `name:`).
    pub flow: String,
    /// Flows directory.
    #[arg(long, default_value = "flows")]
    pub flows: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = GraphFormat::Mermaid)]
    pub format: GraphFormat,
}

/// Flags of `smsflow sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The full URL Twilio would call, e.g. https://bot.example.com/twilio/sms
    #[arg(long)]
    pub url: String,
    /// A form parameter (repeatable), e.g. --param Body=HOURS
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// A whole form body instead of --param, e.g. 'From=%2B1555&Body=HI'
    #[arg(long, conflicts_with = "params")]
    pub body: Option<String>,
    /// Sign for a GET request: the parameters go into the URL's query.
    #[arg(long)]
    pub get: bool,
    /// Where to send the curl request, if not the --url host (e.g. a local
    /// server behind the public URL): http://127.0.0.1:8080
    #[arg(long)]
    pub send_to: Option<String>,
}

/// Values of `--durability`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DurabilityArg {
    /// fsync (grouped) before every reply
    Flush,
    /// background flush every 200 ms; a crash may lose the last steps
    Relaxed,
}

/// `serve` (and `config`). Each setting's help and default come from
/// [`config::SETTINGS`], the one table of
/// settings; a test keeps these flags and environment variables in step
/// with it.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(
        long,
        env = "SMSFLOW_CONFIG",
        help = config::config_flag_help(),
        long_help = config::config_flag_long_help()
    )]
    /// The TOML config file.
    pub config: Option<PathBuf>,
    /// The address to listen on.
    #[arg(long, env = "SMSFLOW_LISTEN", help = config::flag_help("--listen"))]
    pub listen: Option<String>,
    /// The URL Twilio is configured with.
    #[arg(long, env = "SMSFLOW_PUBLIC_URL", help = config::flag_help("--public-url"))]
    pub public_url: Option<String>,
    /// The flows directory.
    #[arg(long, env = "SMSFLOW_FLOWS", help = config::flag_help("--flows"))]
    pub flows: Option<PathBuf>,
    /// The data directory.
    #[arg(long, env = "SMSFLOW_DATA", help = config::flag_help("--data"))]
    pub data: Option<PathBuf>,
    /// The PostgreSQL database, instead of sled in --data.
    #[arg(
        long,
        env = "SMSFLOW_DATABASE_URL",
        hide_env_values = true,
        help = config::flag_help("--store")
    )]
    pub store: Option<String>,
    /// sled's page cache, in MiB.
    #[arg(long, env = "SMSFLOW_CACHE_MB", help = config::flag_help("--cache-mb"))]
    pub cache_mb: Option<u64>,
    /// The async worker threads.
    #[arg(long, env = "SMSFLOW_WORKERS", help = config::flag_help("--workers"))]
    pub workers: Option<usize>,
    #[arg(
        long,
        env = "SMSFLOW_DURABILITY",
        value_enum,
        help = config::flag_help("--durability")
    )]
    /// When a write counts as done.
    pub durability: Option<DurabilityArg>,
    /// Accept webhooks without checking X-Twilio-Signature (local experiments
    /// only; logs a loud warning). Needed when TWILIO_AUTH_TOKEN is unset.
    #[arg(long, env = "SMSFLOW_INSECURE_NO_SIGNATURE")]
    pub insecure_no_signature: bool,
    /// Do not watch the flows directory for changes (config file key
    /// `watch`).
    #[arg(long, env = "SMSFLOW_NO_WATCH")]
    pub no_watch: bool,
    /// Refuse flow sets whose transcripts fail.
    #[arg(long, env = "SMSFLOW_REQUIRE_TESTS", help = config::flag_help("--require-tests"))]
    pub require_tests: bool,
    /// The admin address (metrics, status, messages).
    #[arg(long, env = "SMSFLOW_ADMIN_LISTEN", help = config::flag_help("--admin-listen"))]
    pub admin_listen: Option<String>,
    /// How log lines are written.
    #[arg(
        long,
        env = "SMSFLOW_LOG_FORMAT",
        value_enum,
        help = config::flag_help("--log-format")
    )]
    pub log_format: Option<config::LogFormat>,
    /// Phone numbers in info log lines.
    #[arg(
        long,
        env = "SMSFLOW_LOG_PHONE_NUMBERS",
        value_enum,
        help = config::flag_help("--log-phone-numbers")
    )]
    pub log_phone_numbers: Option<config::PhoneNumbers>,
    /// The drain delay at shutdown, in ms.
    #[arg(long, env = "SMSFLOW_SHUTDOWN_DRAIN_MS", help = config::flag_help("--shutdown-drain-ms"))]
    pub shutdown_drain_ms: Option<u64>,
}

impl ServeArgs {
    /// These flags as overrides of the config file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            public_url: self.public_url.clone(),
            flows: self.flows.clone(),
            data: self.data.clone(),
            store: self.store.clone(),
            cache_mb: self.cache_mb,
            workers: self.workers,
            durability: self.durability.map(|d| match d {
                DurabilityArg::Flush => Durability::Flush,
                DurabilityArg::Relaxed => Durability::Relaxed,
            }),
            insecure: self.insecure_no_signature,
            no_watch: self.no_watch,
            require_tests: self.require_tests,
            admin_listen: self.admin_listen.clone(),
            log_format: self.log_format,
            log_phone_numbers: self.log_phone_numbers,
            shutdown_drain_ms: self.shutdown_drain_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every setting's flag and environment variable are `serve`'s, and
    /// every `serve` flag that sets something is a setting's.
    #[test]
    fn serve_flags_match_the_settings_table() {
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").expect("serve");
        let args: Vec<(String, Option<String>)> = serve
            .get_arguments()
            .filter_map(|a| {
                let long = format!("--{}", a.get_long()?);
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
                Some((long, env))
            })
            .collect();
        for s in config::SETTINGS {
            if let Some(flag) = s.flag {
                let found = args.iter().find(|(long, _)| long == flag);
                assert_eq!(
                    found.and_then(|(_, env)| env.as_deref()),
                    s.env,
                    "`{}`: serve's {flag} and its environment variable",
                    s.key
                );
            }
        }
        for (long, env) in &args {
            let own = ["--config", "--insecure-no-signature", "--help"];
            if own.contains(&long.as_str()) {
                continue;
            }
            assert!(
                config::SETTINGS
                    .iter()
                    .any(|s| s.flag == Some(long) && s.env == env.as_deref()),
                "serve {long} ({env:?}) is in no row of config::SETTINGS"
            );
        }
    }
}

/// Flags of `smsflow start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The flow to start.
    pub flow: String,
    /// The contact to text (E.164, e.g. +15551230001).
    #[arg(long)]
    pub to: String,
    /// Our number the conversation is with (E.164).
    #[arg(long)]
    pub from: String,
    /// Send through this Messaging Service (MG...) instead of --from.
    #[arg(long, value_name = "SID")]
    pub messaging_service_sid: Option<String>,
    /// A contact field to set first, NAME=VALUE (repeatable).
    #[arg(long = "field", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub fields: Vec<(String, String)>,
    /// A run variable the run begins with, NAME=VALUE (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub vars: Vec<(String, String)>,
    /// The idempotency key: running the command again with the same key
    /// starts nothing new and prints the first result.
    #[arg(long, value_name = "KEY")]
    pub key: String,
    /// When the contact is already in a flow run: end it and start
    /// (interrupt), start nothing (skip), or start when it ends (queue).
    #[arg(long, value_enum, default_value = "interrupt")]
    pub if_busy: IfBusyArg,
    /// The running server's admin address.
    #[arg(long, env = "SMSFLOW_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
}

/// `--if-busy` of `smsflow start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IfBusyArg {
    /// End the current run and start.
    Interrupt,
    /// Start nothing.
    Skip,
    /// Wait until the run ends, then start.
    Queue,
}

/// `NAME=VALUE` of `--field` and `--var`.
fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// `smsflow contacts import|export`.
#[derive(Debug, Subcommand)]
pub enum ContactsCommand {
    /// Set contact fields from a CSV file: a header row of field names
    /// with a `phone` column (E.164), one contact per row; an empty cell
    /// leaves that field as it is. The whole file is checked first: any
    /// bad row (all are listed, with line numbers) means nothing is
    /// imported.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// Our number whose conversations get the fields (E.164).
        #[arg(long)]
        from: String,
        /// The running server's admin address.
        #[arg(long, env = "SMSFLOW_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
    },
    /// Print the contacts of one of our numbers as CSV (`phone`, then
    /// every field), safe to open in a spreadsheet.
    Export {
        /// Our number (E.164).
        #[arg(long)]
        from: String,
        /// The running server's admin address.
        #[arg(long, env = "SMSFLOW_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
    },
}

/// `smsflow broadcasts [send|cancel]`.
#[derive(Debug, clap::Args)]
pub struct BroadcastsArgs {
    /// What to do; without one, list the broadcasts and their progress.
    #[command(subcommand)]
    pub command: Option<BroadcastsCommand>,
    /// Print JSON instead of a table (listing).
    #[arg(long)]
    pub json: bool,
    /// The running server's admin address.
    #[arg(
        long,
        env = "SMSFLOW_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
}

/// The subcommands of `smsflow broadcasts`.
// Parsed once per run of the command: the size of `Send` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum BroadcastsCommand {
    /// Send one message (--message), or start one flow (--flow), for the
    /// contacts of --from matching --where or --where-set, or for the --to
    /// numbers. The same --id again adds only recipients not yet in it.
    Send {
        /// The broadcast's id (letters, digits, _, -, .).
        #[arg(long)]
        id: String,
        /// Our number it is sent from (E.164).
        #[arg(long)]
        from: String,
        /// The message text.
        #[arg(long, required_unless_present = "flow", conflicts_with = "flow")]
        message: Option<String>,
        /// Or the flow to start for each recipient.
        #[arg(long, value_name = "NAME")]
        flow: Option<String>,
        /// With --flow: when a contact is already in a flow run, start
        /// nothing (skip, the default), end it and start (interrupt), or
        /// start when it ends (queue).
        #[arg(long, value_enum, requires = "flow")]
        if_busy: Option<IfBusyArg>,
        /// Contacts whose field equals a value, FIELD=VALUE.
        #[arg(long = "where", value_name = "FIELD=VALUE", value_parser = parse_pair, conflicts_with_all = ["where_set", "to"])]
        where_equals: Option<(String, String)>,
        /// Contacts that have this field set.
        #[arg(long, value_name = "FIELD", conflicts_with = "to")]
        where_set: Option<String>,
        /// These numbers (repeatable).
        #[arg(long)]
        to: Vec<String>,
        /// Send through this Messaging Service (MG...) instead of --from.
        #[arg(long, value_name = "SID")]
        messaging_service_sid: Option<String>,
        /// With --flow: a contact field set for every recipient,
        /// NAME=VALUE (repeatable).
        #[arg(long, value_name = "NAME=VALUE", value_parser = parse_pair, requires = "flow")]
        field: Vec<(String, String)>,
        /// With --flow: a run variable every run begins with, NAME=VALUE
        /// (repeatable).
        #[arg(long, value_name = "NAME=VALUE", value_parser = parse_pair, requires = "flow")]
        var: Vec<(String, String)>,
    },
    /// Cancel a broadcast: what is still pending is not sent.
    Cancel {
        /// The broadcast's id.
        id: String,
    },
}

/// Where a data command reads: a data directory no server uses, a
/// PostgreSQL database, or a running server's admin API.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreOrServer {
    /// Read the store in this data directory (only while no server uses it).
    #[arg(long, default_value = "data", conflicts_with = "server")]
    pub data: PathBuf,
    /// Ask a running server instead, e.g. http://127.0.0.1:8080; needs
    /// SMSFLOW_ADMIN_TOKEN (the server's admin token) in the environment.
    #[arg(long)]
    pub server: Option<String>,
    /// Use this PostgreSQL database instead of --data,
    /// postgres://user:password@host:port/db (servers may be running on
    /// it: an erasure takes their conversation locks); --server, when
    /// given, is asked instead.
    #[arg(long, env = "SMSFLOW_DATABASE_URL", hide_env_values = true)]
    pub store: Option<String>,
}

/// `smsflow export …`.
#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Print one flow's results: one row per ended run (flow, numbers,
    /// start and end time, how it ended, its steps), then a column per
    /// variable it saved and per contact field.
    Results {
        /// The flow's name.
        flow: String,
        /// Only runs that ended at or after this time: unix seconds,
        /// 2026-11-30 or 2026-11-30T08:15:00Z (UTC).
        #[arg(long)]
        since: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = crate::results::Format::Csv)]
        format: crate::results::Format,
        /// The store or server to read.
        #[command(flatten)]
        from: StoreOrServer,
    },
    /// Print every contact of every number of ours: our number, the
    /// contact's, its consent state and last activity, then a column per
    /// contact field.
    Contacts {
        /// Output format.
        #[arg(long, value_enum, default_value_t = crate::results::Format::Csv)]
        format: crate::results::Format,
        /// The store or server to read.
        #[command(flatten)]
        from: StoreOrServer,
    },
}

/// Flags of `smsflow forget`.
#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    /// The contact's number (E.164).
    pub number: String,
    /// The store or server to erase it from.
    #[command(flatten)]
    pub from: StoreOrServer,
}
