//! The `smsflow` binary: a shell around the library. Parses the command
//! line, runs the command, and maps errors to a message and an exit code.

use std::process::ExitCode;

use std::io::IsTerminal;

use anyhow::Context as _;
use clap::Parser;
use smsflow::cli::{Cli, Command, GraphFormat};
use smsflow::pipeline::PipelineOptions;
use smsflow::{app, author, config, flow, outbound, telemetry, twilio};

/// mimalloc instead of the system allocator: a webhook allocates many
/// small, short-lived values on threads that hand them to one another,
/// where glibc's malloc spent about a sixth of the server's CPU (README,
/// "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        // The log format may come from the config file: read it first
        // (its errors are reported when `run` reads it again).
        Command::Serve(args) | Command::Config(args) => {
            let file = args
                .config
                .as_deref()
                .and_then(|path| config::FileConfig::load(path).ok())
                .unwrap_or_default();
            let format = config::log_format(&args.overrides(), &file);
            telemetry::init_with("info", format);
        }
        // The author tools print what happened themselves; per-message
        // info logs would interleave with the conversation.
        Command::Chat(_) | Command::Graph(_) | Command::Check { .. } => {
            telemetry::init_with_default("warn")
        }
        // A transcript's report shows every silence and its reason (the
        // loop guard's too); only errors, such as a script's, add to it.
        Command::Test { .. } => telemetry::init_with_default("error"),
        _ => telemetry::init(),
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let file = match &args.config {
                Some(path) => config::FileConfig::load(path)?,
                None => config::FileConfig::default(),
            };
            // The environment, else systemd's credentials (LoadCredential=).
            let token = config::secret("TWILIO_AUTH_TOKEN")?;
            let admin = config::secret("SMSFLOW_ADMIN_TOKEN")?;
            let mut config = config::resolve(args.overrides(), file, token, admin)?;
            // Sending on our own: credentials from the environment only.
            config.outbound.credentials = outbound::Credentials::from_env_optional()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.workers)
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let app = app::App::build(config).await?;
                app.run().await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(args) => {
            let file = match &args.config {
                Some(path) => config::FileConfig::load(path)?,
                None => config::FileConfig::default(),
            };
            let token = config::secret("TWILIO_AUTH_TOKEN")?;
            let admin = config::secret("SMSFLOW_ADMIN_TOKEN")?;
            let mut overrides = args.overrides();
            // Without the token `serve` refuses to start; show the rest
            // anyway, and say so.
            let token_missing = token.is_none() && !overrides.insecure;
            overrides.insecure |= token_missing;
            let mut config = config::resolve(overrides, file, token, admin)?;
            config.outbound.credentials = outbound::Credentials::from_env_optional()?;
            print!("{}", config::describe(&config, token_missing));
            Ok(ExitCode::SUCCESS)
        }
        Command::Sign(args) => sign(args),
        Command::Store(smsflow::cli::StoreCommand::Copy { from, to }) => {
            if !smsflow::store::pg::is_database_url(&to) {
                anyhow::bail!(
                    "--to must be a PostgreSQL URL like postgres://user:password@host:5432/smsflow"
                );
            }
            let c = smsflow::store::pg::copy_from_sled(&from, &to).with_context(|| {
                format!(
                    "copying {} to {}",
                    from.display(),
                    smsflow::store::pg::redact_url(&to)
                )
            })?;
            println!(
                "copied {} conversations, {} messages, {} delivery statuses ({} events), \
                 {} consent states ({} audit records), {} outbox entries, {} call jobs, {} flow starts, {} flow results",
                c.conversations,
                c.messages,
                c.statuses,
                c.status_events,
                c.consent,
                c.audit,
                c.outbox,
                c.call_jobs,
                c.starts,
                c.results
            );
            if c.undecodable > 0 {
                eprintln!(
                    "warning: {} conversation records do not decode and were not copied \
                     (sled keeps them in {}/quarantine/ once a server opens it)",
                    c.undecodable,
                    from.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate(args) => {
            let url = &args.store;
            if !smsflow::store::pg::is_database_url(url) {
                anyhow::bail!("--store must be a PostgreSQL URL like postgres://user:password@host:5432/smsflow");
            }
            let applied = smsflow::store::pg::migrate(url)
                .with_context(|| format!("migrating {}", smsflow::store::pg::redact_url(url)))?;
            let newest = smsflow::store::pg::MIGRATIONS.last().map_or(0, |m| m.0);
            if applied.is_empty() {
                println!("schema at version {newest}: nothing to apply");
            } else {
                let names: Vec<String> = applied.iter().map(|v| format!("{v:04}")).collect();
                println!("applied {}; schema at version {newest}", names.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Messages(args) => messages(args),
        Command::Start(args) => start(args),
        Command::Contacts(command) => contacts(command),
        Command::Broadcasts(args) => broadcasts(args),
        Command::Export(command) => export(command),
        Command::Forget(args) => forget(args),
        Command::Chat(args) => {
            let stdin = std::io::stdin();
            let config = author::config_for_tools(args.config.path.as_deref())?;
            let mut options = PipelineOptions::from_config(&config);
            if !args.interrupt.is_empty() {
                options.engine.interrupt_keywords = args.interrupt;
            }
            let opts = author::ChatOptions {
                flows_dir: args.flows.unwrap_or(config.flows_dir),
                from: args.from,
                to: args.to,
                data_dir: args.data,
                now: args.now,
                options,
                // Piped input is echoed so the output reads as a transcript.
                echo: !stdin.is_terminal(),
                real_calls: args.real_calls.then(|| config.http_allow.clone()),
            };
            author::chat(&opts, stdin.lock(), std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Test { dir, config } => {
            let config = author::config_for_tools(config.path.as_deref())?;
            let options = PipelineOptions::from_config(&config);
            let dir = dir.unwrap_or(config.flows_dir);
            let summary = author::run_tests(&dir, &options, &mut std::io::stdout().lock())?;
            Ok(if summary.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Graph(args) => {
            let set = flow::load_flows(&args.flows)?.set;
            let text = match args.format {
                GraphFormat::Mermaid => author::mermaid(&set, &args.flow)?,
                GraphFormat::Dot => author::dot(&set, &args.flow)?,
            };
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { dir, config } => {
            let config = author::config_for_tools(config.path.as_deref())?;
            let reserved = flow::ReservedWords::new(&config.compliance, &config.interrupt_keywords);
            let summary = author::check(
                &dir.unwrap_or(config.flows_dir),
                &reserved,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            )?;
            Ok(if summary.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// `smsflow sign`: signature plus a curl command that reproduces the request,
/// printed so that `smsflow sign … | sh` sends it.
fn sign(args: smsflow::cli::SignArgs) -> anyhow::Result<ExitCode> {
    let token = std::env::var("TWILIO_AUTH_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!("TWILIO_AUTH_TOKEN is not set: export the token the server uses")
        })?;
    let params: twilio::Params = match &args.body {
        Some(body) => twilio::parse_form(body.as_bytes())
            .map_err(|e| anyhow::anyhow!("--body is not a valid form: {e}"))?,
        None => args
            .params
            .iter()
            .map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| anyhow::anyhow!("--param {p:?} must look like NAME=VALUE"))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let body = args
        .body
        .clone()
        .unwrap_or_else(|| twilio::encode_form(&params));
    let validator = twilio::RequestValidator::new(token);
    let (signed_url, signature) = if args.get {
        let sep = if args.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}{body}", args.url);
        let sig = validator.compute(&url, &[]);
        (url, sig)
    } else {
        let sig = validator.compute(&args.url, &params);
        (args.url.clone(), sig)
    };
    let target = match &args.send_to {
        Some(base) => replace_origin(&signed_url, base),
        None => signed_url.clone(),
    };
    // The signature line is a shell comment so the whole output can be
    // piped to `sh`; `-w '\n'` ends the answer with a newline.
    println!("# X-Twilio-Signature: {signature}");
    if args.get {
        println!(
            "curl -sS -w '\\n' -H 'X-Twilio-Signature: {signature}' '{}'",
            shell_quote(&target)
        );
    } else {
        println!(
            "curl -sS -w '\\n' -H 'X-Twilio-Signature: {signature}' --data-raw '{}' '{}'",
            shell_quote(&body),
            shell_quote(&target)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Swap scheme://host[:port] of `url` for `base`, keeping path and query.
fn replace_origin(url: &str, base: &str) -> String {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = url[after_scheme..]
        .find('/')
        .map(|i| i + after_scheme)
        .unwrap_or(url.len());
    format!("{}{}", base.trim_end_matches('/'), &url[path_start..])
}

/// Escape for use inside single quotes in a POSIX shell.
fn shell_quote(s: &str) -> String {
    s.replace('\'', "'\\''")
}

/// `smsflow messages`: from the store directly, or from a running server.
fn messages(args: smsflow::cli::MessagesArgs) -> anyhow::Result<ExitCode> {
    use smsflow::messages::{self, Filter, MessageView};
    let time = |flag: &str, value: &Option<String>| -> anyhow::Result<Option<i64>> {
        value
            .as_deref()
            .map(smsflow::results::parse_since)
            .transpose()
            .map_err(|e| anyhow::anyhow!("{flag} {e}"))
    };
    let filter = Filter {
        number: args.number.clone(),
        status: args.status.clone(),
        limit: args.limit,
        since: time("--since", &args.since)?,
        until: time("--until", &args.until)?,
        text: args.text.clone(),
    };
    let rows: Vec<MessageView> = match &args.server {
        Some(base) => {
            let token = std::env::var("SMSFLOW_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "SMSFLOW_ADMIN_TOKEN is not set: export the server's admin token"
                    )
                })?;
            let mut query = Vec::new();
            if let Some(n) = &filter.number {
                query.push(("number".to_string(), n.clone()));
            }
            if let Some(s) = &filter.status {
                query.push(("status".to_string(), s.clone()));
            }
            if let Some(l) = filter.limit {
                query.push(("limit".to_string(), l.to_string()));
            }
            if let Some(t) = filter.since {
                query.push(("since".to_string(), t.to_string()));
            }
            if let Some(t) = filter.until {
                query.push(("until".to_string(), t.to_string()));
            }
            if let Some(t) = &filter.text {
                query.push(("text".to_string(), t.clone()));
            }
            let path = format!("/messages?{}", twilio::encode_form(&query));
            let body = smsflow::admin_client::get(base, &path, &token)?;
            #[derive(serde::Deserialize)]
            struct Page {
                messages: Vec<MessageView>,
            }
            let page: Page = serde_json::from_str(&body)
                .map_err(|e| anyhow::anyhow!("unexpected answer from {base}: {e}"))?;
            page.messages
        }
        None => {
            let store = open_read_store(&args.data, args.store.as_deref())?;
            messages::list(&store, &filter)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", messages::render_table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// The server's admin token from the environment, for the remote commands.
fn admin_token() -> anyhow::Result<String> {
    std::env::var("SMSFLOW_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!("SMSFLOW_ADMIN_TOKEN is not set: export the server's admin token")
        })
}

/// `smsflow start`: POST /flows/FLOW/start on a running server; prints
/// the server's JSON answer. Exits 0 when the answer is 200 or 201
/// (started, skipped_busy, or a repeat of either), 1 otherwise.
fn start(args: smsflow::cli::StartArgs) -> anyhow::Result<ExitCode> {
    use smsflow::cli::IfBusyArg;
    use smsflow::starts::{IfBusy, StartRequest};
    let token = admin_token()?;
    let request = StartRequest {
        to: args.to,
        from: args.from,
        messaging_service_sid: args.messaging_service_sid,
        fields: args.fields.into_iter().collect(),
        vars: args.vars.into_iter().collect(),
        idempotency_key: args.key,
        if_busy: match args.if_busy {
            IfBusyArg::Interrupt => IfBusy::Interrupt,
            IfBusyArg::Skip => IfBusy::Skip,
            IfBusyArg::Queue => IfBusy::Queue,
        },
    };
    let path = format!("/flows/{}/start", percent_encode_segment(&args.flow));
    let body = serde_json::to_vec(&request)?;
    let (code, answer) =
        smsflow::admin_client::post(&args.server, &path, &token, "application/json", &body)?;
    match serde_json::from_str::<serde_json::Value>(&answer) {
        Ok(json) => println!("{}", serde_json::to_string_pretty(&json)?),
        Err(_) => eprintln!("{} answered {code}: {}", args.server, answer.trim()),
    }
    Ok(if matches!(code, 200..=202) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A path segment with everything but unreserved characters percent-encoded.
fn percent_encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `smsflow contacts import|export` against a running server.
fn contacts(command: smsflow::cli::ContactsCommand) -> anyhow::Result<ExitCode> {
    use smsflow::cli::ContactsCommand;
    use smsflow::contacts::{self, ImportSummary};
    let token = admin_token()?;
    match command {
        ContactsCommand::Import { file, from, server } => {
            let bytes = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            let rows = match contacts::parse_csv(&bytes) {
                Ok(rows) => rows,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{}:{}: {}", file.display(), e.line, e.message);
                    }
                    eprintln!("{} problem(s); nothing imported", errors.len());
                    return Ok(ExitCode::FAILURE);
                }
            };
            let from_q = twilio::encode_form(&[("from".to_string(), from.clone())]);
            let mut total = ImportSummary::default();
            // The server takes requests of at most 64 KiB by default.
            for part in contacts::chunks(&rows, 48 * 1024) {
                let (code, answer) = smsflow::admin_client::post(
                    &server,
                    &format!("/contacts?{from_q}"),
                    &token,
                    "text/csv; charset=utf-8",
                    part.as_bytes(),
                )?;
                if code != 200 {
                    anyhow::bail!(
                        "{server} answered {code} after {} of {} rows were imported (importing the file again is safe): {}",
                        total.rows,
                        rows.len(),
                        answer.trim()
                    );
                }
                let s: ImportSummary = serde_json::from_str(&answer)
                    .map_err(|e| anyhow::anyhow!("unexpected answer from {server}: {e}"))?;
                total.rows += s.rows;
                total.created += s.created;
                total.updated += s.updated;
                total.unchanged += s.unchanged;
            }
            println!(
                "imported {} rows: {} new, {} updated, {} unchanged",
                total.rows, total.created, total.updated, total.unchanged
            );
            Ok(ExitCode::SUCCESS)
        }
        ContactsCommand::Export { from, server } => {
            let from_q = twilio::encode_form(&[("from".to_string(), from)]);
            let csv = smsflow::admin_client::get(&server, &format!("/contacts?{from_q}"), &token)?;
            print!("{csv}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `smsflow broadcasts [send|cancel]` against a running server.
fn broadcasts(args: smsflow::cli::BroadcastsArgs) -> anyhow::Result<ExitCode> {
    use smsflow::broadcasts::{self, BroadcastRequest, Filter, Progress};
    use smsflow::cli::BroadcastsCommand;
    let token = admin_token()?;
    let server = args.server;
    let post = |path: &str, body: Vec<u8>| -> anyhow::Result<ExitCode> {
        let (code, answer) =
            smsflow::admin_client::post(&server, path, &token, "application/json", &body)?;
        match serde_json::from_str::<serde_json::Value>(&answer) {
            Ok(json) => println!("{}", serde_json::to_string_pretty(&json)?),
            Err(_) => eprintln!("{server} answered {code}: {}", answer.trim()),
        }
        Ok(if code == 200 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    };
    match args.command {
        None => {
            let body = smsflow::admin_client::get(&server, "/broadcasts", &token)?;
            #[derive(serde::Deserialize)]
            struct Page {
                broadcasts: Vec<Progress>,
            }
            let page: Page = serde_json::from_str(&body)
                .map_err(|e| anyhow::anyhow!("unexpected answer from {server}: {e}"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&page.broadcasts)?);
            } else {
                print!("{}", broadcasts::render_table(&page.broadcasts));
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(BroadcastsCommand::Send {
            id,
            from,
            message,
            flow,
            if_busy,
            where_equals,
            where_set,
            to,
            messaging_service_sid,
            field,
            var,
        }) => {
            let filter = match (where_equals, where_set) {
                (Some((field, value)), _) => Some(Filter {
                    field,
                    equals: Some(value),
                }),
                (None, Some(field)) => Some(Filter {
                    field,
                    equals: None,
                }),
                (None, None) => None,
            };
            let request = BroadcastRequest {
                id,
                from,
                messaging_service_sid,
                message,
                flow,
                if_busy: if_busy.map(|b| match b {
                    smsflow::cli::IfBusyArg::Interrupt => smsflow::starts::IfBusy::Interrupt,
                    smsflow::cli::IfBusyArg::Skip => smsflow::starts::IfBusy::Skip,
                    smsflow::cli::IfBusyArg::Queue => smsflow::starts::IfBusy::Queue,
                }),
                filter,
                to: (!to.is_empty()).then_some(to),
                fields: field.into_iter().collect(),
                vars: var.into_iter().collect(),
            };
            post("/broadcasts", serde_json::to_vec(&request)?)
        }
        Some(BroadcastsCommand::Cancel { id }) => post(
            &format!("/broadcasts/{}/cancel", percent_encode_segment(&id)),
            Vec::new(),
        ),
    }
}

/// Open the store of `--data` for a command that runs without a server.
fn open_store(data: &std::path::Path) -> anyhow::Result<smsflow::store::SledStore> {
    smsflow::store::SledStore::open(data, &Default::default()).map_err(|e| {
        anyhow::anyhow!(
            "opening the store in {}: {e} (if a server is running on it, use --server URL)",
            data.display()
        )
    })
}

/// The store a command reads without a server: PostgreSQL with `--store`
/// (or SMSFLOW_DATABASE_URL), where servers may be running; else sled in
/// `--data`, which no server may be using.
fn open_read_store(
    data: &std::path::Path,
    url: Option<&str>,
) -> anyhow::Result<smsflow::store::AnyStore> {
    use smsflow::store::AnyStore;
    match url {
        Some(url) => open_database(url).map(AnyStore::Pg),
        None => open_store(data).map(AnyStore::Sled),
    }
}

/// The PostgreSQL database at `url` for a command that runs without a
/// server (its schema must be this release's).
fn open_database(url: &str) -> anyhow::Result<smsflow::store::PgStore> {
    use smsflow::store::{pg, PgStore};
    if !pg::is_database_url(url) {
        anyhow::bail!(
            "--store {}: not a database URL (postgres://user:password@host:port/db)",
            pg::redact_url(url)
        );
    }
    PgStore::open_existing(url)
        .map_err(|e| anyhow::anyhow!("opening the database {}: {e}", pg::redact_url(url)))
}

/// `smsflow export results|contacts`: from a data directory, a database,
/// or a running server.
fn export(command: smsflow::cli::ExportCommand) -> anyhow::Result<ExitCode> {
    use smsflow::cli::ExportCommand;
    use smsflow::results::{self, Format};
    match command {
        ExportCommand::Results {
            flow,
            since,
            format,
            from,
        } => {
            let since = match since.as_deref().map(results::parse_since) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => anyhow::bail!("--since {e}"),
            };
            let body = match &from.server {
                Some(base) => {
                    let token = admin_token()?;
                    let mut query = vec![(
                        "format".to_string(),
                        match format {
                            Format::Csv => "csv",
                            Format::Jsonl => "jsonl",
                        }
                        .to_string(),
                    )];
                    if let Some(t) = since {
                        query.push(("since".to_string(), t.to_string()));
                    }
                    let path = format!(
                        "/flows/{}/results?{}",
                        percent_encode_segment(&flow),
                        twilio::encode_form(&query)
                    );
                    smsflow::admin_client::get(base, &path, &token)?
                }
                None => {
                    let store = open_read_store(&from.data, from.store.as_deref())?;
                    results::export(&store, &flow, since.unwrap_or(0), format)?
                }
            };
            print!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        ExportCommand::Contacts { format, from } => {
            let jsonl = format == Format::Jsonl;
            let body = match &from.server {
                Some(base) => {
                    let token = admin_token()?;
                    let path = if jsonl {
                        "/contacts?format=jsonl"
                    } else {
                        "/contacts?format=csv"
                    };
                    smsflow::admin_client::get(base, path, &token)?
                }
                None => {
                    let store = open_read_store(&from.data, from.store.as_deref())?;
                    let rows = smsflow::contacts::export_all(&store)?;
                    if jsonl {
                        smsflow::contacts::export_all_jsonl(&rows)
                    } else {
                        smsflow::contacts::export_all_csv(&rows)
                    }
                }
            };
            print!("{body}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `smsflow forget NUMBER`: through a running server (under its
/// conversation locks), on a database (under the same locks, which the
/// servers on it take too), or on a data directory no server uses.
fn forget(args: smsflow::cli::ForgetArgs) -> anyhow::Result<ExitCode> {
    use smsflow::store::{AuditRecord, Forgotten, Store};
    let number = smsflow::starts::normalize_phone(&args.number)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.number))?;
    let gone: Forgotten = match &args.from.server {
        Some(base) => {
            let token = admin_token()?;
            let path = format!("/contacts/{}", percent_encode_segment(&number));
            let (code, answer) = smsflow::admin_client::delete(base, &path, &token)?;
            if code != 200 {
                anyhow::bail!("{base} answered {code}: {}", answer.trim());
            }
            #[derive(serde::Deserialize)]
            struct Answer {
                forgotten: Forgotten,
            }
            let a: Answer = serde_json::from_str(&answer)
                .map_err(|e| anyhow::anyhow!("unexpected answer from {base}: {e}"))?;
            a.forgotten
        }
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let audit = AuditRecord {
                at: now,
                scope: "*".into(),
                number: number.clone(),
                action: "forget".into(),
                cause: "cli".into(),
                message_sid: String::new(),
            };
            match &args.from.store {
                Some(url) => forget_on_database(&open_database(url)?, &number, &audit)?,
                None => {
                    let store = open_store(&args.from.data)?;
                    let gone = store.forget_contact(&number, &audit)?;
                    store.flush_blocking()?;
                    gone
                }
            }
        }
    };
    println!(
        "forgot {number}: {} conversations, {} results, {} message log lines, {} delivery records, {} status events, {} outbox messages, {} flow starts (consent records kept)",
        gone.conversations,
        gone.results,
        gone.log_lines,
        gone.statuses,
        gone.status_events,
        gone.outbox,
        gone.starts
    );
    Ok(ExitCode::SUCCESS)
}

/// Erase `number` on a database servers may be using: its conversations
/// locked first as a server locks them (listed again under the locks
/// until none is new), so a message in flight on a server either commits
/// before the erasure or runs after it; the erasure commits on the locks'
/// session.
fn forget_on_database(
    store: &smsflow::store::PgStore,
    number: &str,
    audit: &smsflow::store::AuditRecord,
) -> anyhow::Result<smsflow::store::Forgotten> {
    use smsflow::store::Store;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut keys = store.contact_conversations(number)?;
        loop {
            keys.sort();
            keys.dedup();
            let lock = store.lock_contact(number, &keys).await?;
            let now_there = store.contact_conversations(number)?;
            if now_there.iter().all(|k| keys.contains(k)) {
                let gone = store.forget_contact(number, audit)?;
                drop(lock);
                return Ok(gone);
            }
            drop(lock);
            keys.extend(now_there);
        }
    })
}
