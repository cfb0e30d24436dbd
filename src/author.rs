//! Tools for flow authors, behind `smsflow check`, `chat`, `test` and
//! `graph`: validate flow sets, try a conversation in a terminal, run
//! transcript tests, draw a flow.
//!
//! Everything here works on readers, writers and values, so the test suite
//! drives it without a terminal; `main` only passes stdin and stdout. Chat
//! and transcripts go through the real [`Pipeline`] (consent keywords, loop
//! guard, dedupe, engine, commit, flush) over a throwaway [`SledStore`],
//! with the server's options ([`config_for_tools`]) and a virtual clock, so
//! what an author sees is what the webhook would do, minus HTTP and Twilio.
//! This module knows no HTTP and no terminal; it knows the flow model only
//! through [`FlowSet::outline`] and [`flow::Transcript`].

mod transcripts;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;

use crate::config::{self, Config, FileConfig, Overrides};
use crate::flow::{self, Conversation, EdgeTarget, Event, FlowSet, Outline};
use crate::metrics::Metrics;
use crate::pipeline::{Detailed, Pipeline, PipelineOptions};
use crate::store::{ConvKey, SledStore, Store, StoreConfig, StoreError};
use crate::twilio::{self, InboundMessage};

pub use transcripts::{
    run_parsed, run_tests, run_transcript, transcripts_pass, Exchange, TestSummary, TranscriptRun,
};

// ---------------------------------------------------------------------------
// configuration

/// The server's configuration for the author tools (`check`, `chat`,
/// `test`): the same TOML file as `serve --config`, resolved the same way
/// (defaults, validation), so consent keywords, the help text, interrupt
/// keywords and the loop guard behave as they will on the number. `None`
/// gives the server's defaults. These tools take no webhooks, so no
/// `TWILIO_AUTH_TOKEN` is needed.
pub fn config_for_tools(path: Option<&Path>) -> anyhow::Result<Config> {
    let file = match path {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let overrides = Overrides {
        // Nothing is verified: there are no requests to sign.
        insecure: true,
        // Only names the delivery callback URL; set so that resolving does
        // not warn about signatures no request will carry.
        public_url: Some(
            file.public_url
                .clone()
                .unwrap_or_else(|| "http://localhost".to_owned()),
        ),
        ..Overrides::default()
    };
    let config = config::resolve(overrides, file, None, None);
    match path {
        Some(p) => config.with_context(|| format!("in config file {}", p.display())),
        None => config,
    }
}

/// The pipeline options `serve` runs with when no config file is given.
pub fn server_defaults() -> PipelineOptions {
    let config = config_for_tools(None).expect("the built-in defaults are valid");
    PipelineOptions::from_config(&config)
}

// ---------------------------------------------------------------------------
// the simulated phone shared by chat and transcripts

/// One sender texting one of our numbers: the pipeline over its store, and
/// the virtual clock.
struct Session {
    pipeline: Pipeline<SledStore>,
    from: String,
    to: String,
    /// Virtual time (unix seconds): +1 per message, and `/wait` (`@ wait`)
    /// jumps.
    now: i64,
    /// Makes MessageSids unique across sessions sharing a `--data` store, so
    /// dedupe never replays an answer from an earlier session.
    sid_prefix: u64,
    sent: u64,
    /// The temporary store directory; declared after `pipeline` so the
    /// store is closed before its directory is removed.
    tmp: Option<tempfile::TempDir>,
}

/// What happened to one message.
enum Sent {
    /// Twilio would not deliver it (a bad number, too much media).
    Rejected(String),
    Handled(Box<Detailed>),
}

impl Session {
    /// A session over the store in `data_dir`, or a temporary one removed
    /// when the session ends.
    fn open(
        set: FlowSet,
        options: PipelineOptions,
        data_dir: Option<&Path>,
        from: &str,
        to: &str,
        now: i64,
        sid_prefix: u64,
    ) -> anyhow::Result<Session> {
        let (dir, tmp) = match data_dir {
            Some(dir) => (dir.to_path_buf(), None),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("smsflow-chat-")
                    .tempdir()
                    .context("cannot create a temporary store directory")?;
                (tmp.path().to_path_buf(), Some(tmp))
            }
        };
        let store = SledStore::open(&dir, &StoreConfig::default())
            .with_context(|| format!("cannot open the store in {}", dir.display()))?;
        let pipeline = Pipeline::new(
            Arc::new(store),
            Arc::new(ArcSwap::from_pointee(set)),
            options,
            Arc::new(Metrics::default()),
        );
        Ok(Session {
            pipeline,
            from: from.to_owned(),
            to: to.to_owned(),
            now,
            sid_prefix,
            sent: 0,
            tmp,
        })
    }

    fn key(&self) -> ConvKey {
        ConvKey::new(&self.to, &self.from)
    }

    /// Send one message through the pipeline, as Twilio would post it,
    /// with the next MessageSid (returned too: scripts seed their
    /// randomness with it).
    async fn send(&mut self, body: String, media: &[String]) -> Result<(String, Sent), StoreError> {
        self.now = self.now.saturating_add(1);
        self.sent += 1;
        let sid = format!("SM{:016x}{:016x}", self.sid_prefix, self.sent);
        let mut params = vec![
            ("MessageSid".to_owned(), sid.clone()),
            ("From".to_owned(), self.from.clone()),
            ("To".to_owned(), self.to.clone()),
            ("Body".to_owned(), body),
            ("NumMedia".to_owned(), media.len().to_string()),
        ];
        for (i, url) in media.iter().enumerate() {
            params.push((format!("MediaUrl{i}"), url.clone()));
        }
        let msg = match InboundMessage::from_params(params) {
            Ok(m) => m,
            Err(e) => return Ok((sid, Sent::Rejected(e.to_string()))),
        };
        let detailed = self
            .pipeline
            .handle_inbound_detailed(&msg, self.now)
            .await?;
        Ok((sid, Sent::Handled(Box::new(detailed))))
    }

    /// The stored conversation, as the pipeline would read it.
    fn conversation(&self) -> anyhow::Result<Option<Conversation>> {
        let Some(bytes) = self.pipeline.store().conversation(&self.key())? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .context("the stored conversation is unreadable")
    }

    /// Start this sender's conversation from `conversation`.
    async fn seed(&self, conversation: &Conversation) -> Result<(), StoreError> {
        self.pipeline
            .seed(&self.key(), conversation, self.now)
            .await
    }

    /// Forget this sender's conversation; whether there was one.
    async fn forget(&self) -> Result<bool, StoreError> {
        self.pipeline.forget(&self.key()).await
    }
}

/// What the phone receives for one message, as transcript lines: the
/// messages of the TwiML answer (after Twilio's limits: long bodies split,
/// empty messages left out, at most ten), or the silence and its reason.
fn reply_lines(detailed: &Detailed) -> Vec<flow::ReplyLine> {
    if let Some(reason) = &detailed.silence {
        return vec![flow::ReplyLine::Silence(Some(reason.clone()))];
    }
    let sent: Vec<flow::Reply> = match twilio::messages_in(&detailed.answer.twiml) {
        Ok(messages) => messages
            .into_iter()
            .map(|m| flow::Reply {
                body: m.body,
                media: m.media,
                origin: None,
            })
            .collect(),
        // Our own rendering always parses; the engine's replies are the
        // next best account (what the phone sees: no origin).
        Err(_) => detailed
            .replies
            .iter()
            .map(|r| flow::Reply {
                origin: None,
                ..r.clone()
            })
            .collect(),
    };
    if sent.is_empty() {
        // Replies with nothing in them: the phone gets nothing.
        return vec![flow::ReplyLine::Silence(Some(
            flow::SilenceReason::EmptyReply.as_str().to_owned(),
        ))];
    }
    sent.into_iter().map(flow::ReplyLine::Reply).collect()
}

// ---------------------------------------------------------------------------
// chat

/// Settings for [`chat`].
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub flows_dir: PathBuf,
    /// The sender's number.
    pub from: String,
    /// Our number (matters for `to:`-scoped rules).
    pub to: String,
    /// Keep the conversation in this store directory; `None` uses a
    /// temporary one that is removed when the chat ends.
    pub data_dir: Option<PathBuf>,
    /// Start of the virtual clock (unix seconds); `None` is the real time.
    pub now: Option<i64>,
    /// The server's pipeline settings (consent keywords, help text,
    /// interrupt keywords, loop guard): [`server_defaults`], or from a
    /// config file with [`PipelineOptions::from_config`].
    pub options: PipelineOptions,
    /// Write each message back as `> text`, so the output reads as a whole
    /// transcript when input is piped rather than typed. When false, a `> `
    /// prompt is written before each read instead.
    pub echo: bool,
}

const CHAT_HELP: &str = "\
# Type a message to send it. Replies show as `< text`, silence as
# `< (silence: reason)`. `hi [media: https://x/a.jpg]` attaches media;
# \\n, \\t, \\\\ and \\u{1F600} are escapes; `//text` sends `/text`.
#   /wait 2h      advance the virtual clock (s, m, h, d; combinable: 1h30m)
#   /state        show the stored conversation (contact fields, step, run vars)
#   /reset        forget this conversation (contact fields and run)
#   /from NUMBER  text as another sender; /to NUMBER  text another of our numbers
#   /reload       re-read the flows directory, keeping conversations
#   /help         this list; /quit ends (so does end of input)";

/// Run an interactive chat: read lines from `input`, write the conversation
/// to `out`, until `/quit` or end of input.
///
/// Builds its own single-threaded Tokio runtime, so call it from plain
/// (non-async) code.
pub fn chat(opts: &ChatOptions, input: impl BufRead, mut out: impl Write) -> anyhow::Result<()> {
    let loaded = flow::load_flows(&opts.flows_dir)?;
    for w in &loaded.warnings {
        writeln!(out, "# {w}")?;
    }
    let version = loaded.set.version().chars().take(12).collect::<String>();
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut session = Session::open(
        loaded.set,
        opts.options.clone(),
        opts.data_dir.as_deref(),
        &opts.from,
        &opts.to,
        opts.now.unwrap_or(wall.as_secs() as i64),
        (wall.as_nanos() as u64) ^ u64::from(std::process::id()),
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .context("cannot start the async runtime")?;

    writeln!(
        out,
        "# smsflow chat: flows {} (version {version}), store {}",
        opts.flows_dir.display(),
        match (&session.tmp, &opts.data_dir) {
            (None, Some(dir)) => dir.display().to_string(),
            _ => "temporary".to_owned(),
        }
    )?;
    writeln!(
        out,
        "# from {} to {}, clock {}; /help lists commands",
        session.from, session.to, session.now
    )?;

    let mut lines = input.lines();
    loop {
        if !opts.echo {
            write!(out, "> ")?;
        }
        out.flush()?;
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read input")?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/').filter(|c| !c.starts_with('/')) {
            let (verb, arg) = cmd.trim().split_once(' ').unwrap_or((cmd.trim(), ""));
            let arg = arg.trim();
            match verb {
                "quit" | "exit" | "q" => break,
                "help" | "?" => writeln!(out, "{CHAT_HELP}")?,
                "wait" => match flow::parse_duration(arg) {
                    Some(secs) => {
                        session.now = session.now.saturating_add(secs);
                        writeln!(out, "@ wait {arg}   # clock now {}", session.now)?;
                    }
                    None => writeln!(
                        out,
                        "# bad duration `{arg}`: write it like 90s, 15m, 2h, 1d or 1h30m"
                    )?,
                },
                "state" => show_state(&session, &mut out)?,
                "reset" => {
                    let existed = runtime.block_on(session.forget())?;
                    let note = if existed {
                        ""
                    } else {
                        "   # nothing was stored"
                    };
                    writeln!(out, "@ reset{note}")?;
                }
                "from" | "to" if arg.is_empty() => writeln!(out, "# usage: /{verb} +15551230001")?,
                // Written as transcript lines, so a saved session switches
                // sender or number where the chat did.
                "from" => {
                    session.from = arg.to_owned();
                    writeln!(out, "@ from {arg}")?;
                }
                "to" => {
                    session.to = arg.to_owned();
                    writeln!(out, "@ to {arg}")?;
                }
                "reload" => match flow::load_flows(&opts.flows_dir) {
                    Ok(loaded) => {
                        for w in &loaded.warnings {
                            writeln!(out, "# {w}")?;
                        }
                        let v: String = loaded.set.version().chars().take(12).collect();
                        session.pipeline.flows().store(Arc::new(loaded.set));
                        writeln!(out, "# flows reloaded (version {v})")?;
                    }
                    Err(e) => {
                        for l in format!("{e:#}").lines() {
                            writeln!(out, "# {l}")?;
                        }
                        writeln!(out, "# reload refused: still using the previous flows")?;
                    }
                },
                _ => writeln!(out, "# unknown command /{verb}; /help lists them")?,
            }
            continue;
        }
        // `//text` sends `/text`.
        let text = line.strip_prefix('/').unwrap_or(line);
        if opts.echo {
            writeln!(out, "> {text}")?;
        }
        let (body, media) = flow::split_media(text);
        let body = match flow::unescape(body) {
            Ok(b) => b,
            Err(e) => {
                writeln!(out, "# not sent: {e} (write \\\\ for a backslash)")?;
                continue;
            }
        };
        match runtime.block_on(session.send(body, &media))?.1 {
            Sent::Rejected(e) => writeln!(out, "# not sent: Twilio would not deliver this: {e}")?,
            Sent::Handled(detailed) => show_answer(&detailed, &mut out)?,
        }
    }
    Ok(())
}

/// Print what came back for one message: engine events as comments, then
/// the replies or the silence.
fn show_answer(detailed: &Detailed, out: &mut impl Write) -> anyhow::Result<()> {
    if detailed.answer.duplicate {
        writeln!(
            out,
            "# duplicate MessageSid: replayed {}",
            detailed.answer.outcome
        )?;
        return Ok(());
    }
    for event in &detailed.events {
        writeln!(out, "# {}", describe(event))?;
    }
    for line in reply_lines(detailed) {
        match (&line, &detailed.silence_note) {
            (flow::ReplyLine::Silence(_), Some(text)) => {
                writeln!(out, "{}   # {text}", line.render())?
            }
            _ => writeln!(out, "{}", line.render())?,
        }
    }
    Ok(())
}

/// `/state`: the stored conversation, as transcript assertions.
fn show_state(session: &Session, out: &mut impl Write) -> anyhow::Result<()> {
    let conv = match session.conversation() {
        Ok(Some(conv)) => conv,
        Ok(None) => {
            writeln!(out, "? step = (none)   # nothing stored for this sender")?;
            return Ok(());
        }
        Err(e) => {
            // The pipeline starts such a conversation afresh; say so.
            writeln!(out, "# {e:#}; the next message starts afresh")?;
            return Ok(());
        }
    };
    match &conv.run {
        Some(run) => {
            let idle = session.now.saturating_sub(run.last_active);
            // A reused `--data` store may hold a run from a session
            // whose clock ran ahead of this one's.
            let idle = if idle >= 0 {
                format!("idle {idle}s")
            } else {
                format!(
                    "last active {}s after this clock (use /wait)",
                    idle.unsigned_abs()
                )
            };
            writeln!(
                out,
                "? step = {}/{}   # {} retr{} here, {idle}",
                run.flow,
                run.step,
                run.retries,
                if run.retries == 1 { "y" } else { "ies" },
            )?
        }
        None => writeln!(out, "? step = (none)")?,
    }
    for (k, v) in &conv.contact {
        writeln!(out, "? contact.{k} = {}", flow::escape(v))?;
    }
    if let Some(run) = &conv.run {
        for (k, v) in &run.vars {
            writeln!(out, "? var.{k} = {}", flow::escape(v))?;
        }
    }
    Ok(())
}
/// An engine event in words, for the chat.
fn describe(event: &Event) -> String {
    match event {
        Event::Expired { flow } => {
            format!("the {flow} run expired (idle longer than its expire_after)")
        }
        Event::StaleStep { flow, step } => {
            format!("{flow}/{step} no longer exists (flows edited); the run ended")
        }
        Event::Interrupted { keyword } => format!("interrupt keyword {keyword} ended the run"),
        Event::Triggered { flow } => format!("flow {flow} started"),
        Event::StepLimit { flow } => {
            format!(
                "{flow}: more than {} steps for one message; the conversation ended",
                flow::MAX_TRANSITIONS
            )
        }
        Event::Keyword { keyword } => format!("keyword {keyword}"),
        Event::DefaultReply => "default reply".to_owned(),
        Event::Retried {
            flow,
            step,
            attempt,
        } => format!("no route matched at {flow}/{step}: retry {attempt}"),
        Event::GaveUp { flow, step } => format!("{flow}/{step} gave up after its retries"),
        Event::RepliesDropped { count } => format!(
            "{count} repl(ies) over the limit of {} dropped",
            flow::MAX_REPLIES
        ),
        Event::ScriptError {
            flow,
            file,
            line,
            column,
            message,
        } => format!(
            "script error in {flow} at {}:{line}:{column}: {message}; fallback sent, conversation unchanged",
            file.display()
        ),
    }
}

// ---------------------------------------------------------------------------
// check

/// What [`check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSummary {
    /// Flow sets (directories) checked.
    pub sets: usize,
    pub errors: usize,
    pub warnings: usize,
}

/// `smsflow check DIR`: validate every flow set in `dir` and below, the
/// way the server loads one. A flow set is a directory holding `*.yaml`
/// (or `*.yml`) files, so subdirectories can hold their own sets, the same
/// rule by which `test` runs each directory's transcripts against its own
/// flows (`*.rhai` modules in a subdirectory belong to the set above).
/// `reserved` are the words the configured server takes before any flow
/// sees them. Every diagnostic goes to `err`, with a summary line per set
/// with errors; sets without errors get an `ok` line on `out`.
///
/// Errors when `dir` is not a directory or holds no flow file at all: a
/// check that checked nothing most likely pointed at the wrong directory.
pub fn check(
    dir: &Path,
    reserved: &flow::ReservedWords,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<CheckSummary> {
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let sets: Vec<PathBuf> = dirs_under(dir)
        .into_iter()
        .filter(|d| !files_with(d, &["yaml", "yml"]).is_empty())
        .collect();
    if sets.is_empty() {
        anyhow::bail!(
            "no flow files (*.yaml) in {} or below (see flows/README.md)",
            dir.display()
        );
    }
    let mut summary = CheckSummary {
        sets: sets.len(),
        errors: 0,
        warnings: 0,
    };
    for set in &sets {
        let diags = flow::check_dir_with(set, reserved);
        let errors = diags
            .iter()
            .filter(|d| d.severity == flow::Severity::Error)
            .count();
        let warnings = diags.len() - errors;
        for d in &diags {
            writeln!(err, "{d}")?;
        }
        if errors > 0 {
            writeln!(
                err,
                "{}: {errors} error(s), {warnings} warning(s)",
                set.display()
            )?;
        } else {
            writeln!(out, "{}: ok ({warnings} warning(s))", set.display())?;
        }
        summary.errors += errors;
        summary.warnings += warnings;
    }
    Ok(summary)
}

/// The files directly in `dir` with one of `extensions`, sorted; dot-files
/// are skipped.
fn files_with(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let hidden = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            let wanted = p
                .extension()
                .is_some_and(|e| extensions.iter().any(|x| e == *x));
            !hidden && wanted && p.is_file()
        })
        .collect();
    files.sort();
    files
}

/// Deepest directory level `check` and `test` search.
const MAX_DEPTH: usize = 16;

/// `root` and every directory below it, in depth-first name order. Skips
/// dot-directories and does not follow symlinked directories, so a link
/// loop cannot recurse forever.
fn dirs_under(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        out.push(dir.to_path_buf());
        if depth >= MAX_DEPTH {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect();
        subdirs.sort();
        for d in subdirs {
            walk(&d, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(root, 0, &mut out);
    out
}

// ---------------------------------------------------------------------------
// graph

/// `graph` was asked for a flow the set does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no flow named `{name}` (flows: {available})")]
pub struct UnknownFlow {
    pub name: String,
    pub available: String,
}

/// Longest step text shown in a diagram node, in characters.
const SAY_CHARS: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Entry,
    /// A step that waits for a reply.
    Waiting,
    /// A step that passes straight on.
    Step,
    Flow,
    End,
    Silence,
    AsNew,
}

/// A diagram independent of its output syntax: built once from an
/// [`Outline`], rendered as Mermaid or DOT.
struct Graph {
    title: String,
    nodes: Vec<(String, Shape, Vec<String>)>,
    edges: Vec<(String, String, String, bool)>,
}

fn graph(set: &FlowSet, name: &str) -> Result<Graph, UnknownFlow> {
    let outline = set.outline(name).ok_or_else(|| UnknownFlow {
        name: name.to_owned(),
        available: set.flow_names().collect::<Vec<_>>().join(", "),
    })?;
    Ok(build_graph(&outline))
}

fn build_graph(o: &Outline) -> Graph {
    let mut ids = Ids::default();
    let mut g = Graph {
        title: o.flow.clone(),
        nodes: Vec::new(),
        edges: Vec::new(),
    };
    let entry = if o.entries.is_empty() {
        vec!["no trigger".to_owned()]
    } else {
        o.entries.clone()
    };
    g.nodes.push(("entry".to_owned(), Shape::Entry, entry));
    g.edges.push((
        "entry".to_owned(),
        ids.get("step", &o.start),
        String::new(),
        false,
    ));
    for s in &o.steps {
        let mut label = vec![s.name.clone()];
        if let Some(say) = &s.say {
            label.push(truncate(say.lines().next().unwrap_or(""), SAY_CHARS));
        }
        let shape = if s.waits { Shape::Waiting } else { Shape::Step };
        g.nodes.push((ids.get("step", &s.name), shape, label));
    }
    // Targets outside the flow's steps get one node each, in first-use order.
    let mut extra = Vec::new();
    for s in &o.steps {
        let from = ids.get("step", &s.name);
        for e in &s.edges {
            let (to, shape, label) = match &e.to {
                EdgeTarget::Step(t) => (ids.get("step", t), None, String::new()),
                EdgeTarget::Flow(f) => {
                    (ids.get("flow", f), Some(Shape::Flow), format!("flow: {f}"))
                }
                EdgeTarget::End => ("finish".to_owned(), Some(Shape::End), "End".to_owned()),
                EdgeTarget::Silence(r) => (
                    ids.get("silence", r),
                    Some(Shape::Silence),
                    format!("silence: {r}"),
                ),
                EdgeTarget::AsNew => (
                    "as_new".to_owned(),
                    Some(Shape::AsNew),
                    "handled as a new message".to_owned(),
                ),
            };
            if let Some(shape) = shape {
                if !extra.iter().any(|(id, _, _)| *id == to) {
                    extra.push((to.clone(), shape, vec![label]));
                }
            }
            g.edges.push((from.clone(), to, e.label.clone(), e.retry));
        }
    }
    g.nodes.extend(extra);
    g
}

/// Node ids that are safe in Mermaid and DOT (`[A-Za-z0-9_]`, never the
/// Mermaid keyword `end`) and stay distinct when two names sanitise alike.
#[derive(Default)]
struct Ids {
    by_name: HashMap<(String, String), String>,
    taken: std::collections::HashSet<String>,
}

impl Ids {
    fn get(&mut self, kind: &str, name: &str) -> String {
        let key = (kind.to_owned(), name.to_owned());
        if let Some(id) = self.by_name.get(&key) {
            return id.clone();
        }
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let mut id = format!("{kind}_{clean}");
        let mut n = 2;
        while self.taken.contains(&id) {
            id = format!("{kind}_{clean}_{n}");
            n += 1;
        }
        self.taken.insert(id.clone());
        self.by_name.insert(key, id.clone());
        id
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// The Mermaid flowchart of flow `flow`: steps as nodes (name and the first
/// line of what they say; rounded when they wait for a reply), routes as
/// edges labelled by matcher, retries dashed, other flows as subroutine
/// boxes, and an entry node listing what starts the flow.
pub fn mermaid(set: &FlowSet, flow: &str) -> Result<String, UnknownFlow> {
    let g = graph(set, flow)?;
    let mut out = format!("---\ntitle: {}\n---\nflowchart TD\n", g.title);
    for (id, shape, label) in &g.nodes {
        let text = label
            .iter()
            .map(|l| mermaid_escape(l))
            .collect::<Vec<_>>()
            .join("<br/>");
        let (open, close) = match shape {
            Shape::Entry => ("([", "])"),
            Shape::Waiting => ("(", ")"),
            Shape::Step => ("[", "]"),
            Shape::Flow => ("[[", "]]"),
            Shape::End => ("((", "))"),
            Shape::Silence => (">", "]"),
            Shape::AsNew => ("[/", "/]"),
        };
        out.push_str(&format!("    {id}{open}\"{text}\"{close}\n"));
    }
    for (from, to, label, dashed) in &g.edges {
        let arrow = if *dashed { "-.->" } else { "-->" };
        if label.is_empty() {
            out.push_str(&format!("    {from} {arrow} {to}\n"));
        } else {
            out.push_str(&format!(
                "    {from} {arrow}|\"{}\"| {to}\n",
                mermaid_escape(label)
            ));
        }
    }
    Ok(out)
}

/// Mermaid's quoted text ends at `"` and reads `#name;` as an entity, and
/// labels are HTML (or Markdown): entity-encode what would break out.
fn mermaid_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '#' => out.push_str("#35;"),
            '"' => out.push_str("#quot;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '&' => out.push_str("#amp;"),
            // Ends an edge label even inside quotes in some Mermaid versions.
            '|' => out.push_str("#124;"),
            // GitHub renders node text as Markdown: keep `*` and backticks
            // literal (a regex like `\s*me\s*` would turn italic).
            '*' => out.push_str("#42;"),
            '`' => out.push_str("#96;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The same diagram as [`mermaid`], in Graphviz DOT.
pub fn dot(set: &FlowSet, flow: &str) -> Result<String, UnknownFlow> {
    let g = graph(set, flow)?;
    let mut out = format!(
        "digraph \"{}\" {{\n    node [shape=box, fontname=\"Helvetica\"];\n    edge [fontname=\"Helvetica\", fontsize=10];\n",
        dot_escape(&g.title)
    );
    for (id, shape, label) in &g.nodes {
        let text = label
            .iter()
            .map(|l| dot_escape(l))
            .collect::<Vec<_>>()
            .join("\\n");
        let attrs = match shape {
            Shape::Entry => "shape=oval, ",
            Shape::Waiting => "style=rounded, ",
            Shape::Step => "",
            Shape::Flow => "shape=component, ",
            Shape::End => "shape=doublecircle, ",
            Shape::Silence => "shape=cds, ",
            Shape::AsNew => "shape=parallelogram, ",
        };
        out.push_str(&format!("    {id} [{attrs}label=\"{text}\"];\n"));
    }
    for (from, to, label, dashed) in &g.edges {
        let mut attrs = Vec::new();
        if !label.is_empty() {
            attrs.push(format!("label=\"{}\"", dot_escape(label)));
        }
        if *dashed {
            attrs.push("style=dashed".to_owned());
        }
        if attrs.is_empty() {
            out.push_str(&format!("    {from} -> {to};\n"));
        } else {
            out.push_str(&format!("    {from} -> {to} [{}];\n", attrs.join(", ")));
        }
    }
    out.push_str("}\n");
    Ok(out)
}

fn dot_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_never_end() {
        let mut ids = Ids::default();
        assert_eq!(ids.get("step", "end"), "step_end");
        assert_eq!(ids.get("step", "a-b"), "step_a_b");
        assert_eq!(ids.get("step", "a_b"), "step_a_b_2");
        assert_eq!(ids.get("step", "a-b"), "step_a_b");
    }

    #[test]
    fn labels_cannot_break_out_of_quotes() {
        assert_eq!(
            mermaid_escape("say \"hi\" <b>#1|2*`"),
            "say #quot;hi#quot; #lt;b#gt;#35;1#124;2#42;#96;"
        );
        assert_eq!(dot_escape("a\"b\\c\nd"), "a\\\"b\\\\c d");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
