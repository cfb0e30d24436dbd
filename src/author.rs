//! Tools for flow authors, behind `smsflow chat`, `smsflow test` and
//! `smsflow graph`: try a conversation in a terminal, run transcript tests,
//! draw a flow.
//!
//! Everything here works on readers, writers and values, so the test suite
//! drives it without a terminal; `main` only passes stdin and stdout. The
//! chat goes through the real [`Pipeline`] and a real [`SledStore`], so what
//! an author sees is what the webhook would do, minus HTTP and Twilio. This
//! module knows no HTTP and no terminal; it knows the flow model only
//! through [`FlowSet::outline`] and [`flow::run_transcript`].

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;

use crate::flow::{self, Conversation, EdgeTarget, EngineOptions, Event, FlowSet, Outline};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::store::{ConvKey, SledStore, Store, StoreConfig};
use crate::twilio::InboundMessage;

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
    pub interrupt_keywords: Vec<String>,
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

/// One chat session: the pipeline over its store, and the virtual clock.
struct Session {
    pipeline: Pipeline<SledStore>,
    flows_dir: PathBuf,
    from: String,
    to: String,
    /// Virtual time (unix seconds): +1 per message, like transcripts, and
    /// `/wait` jumps.
    now: i64,
    /// Makes MessageSids unique across sessions sharing a `--data` store, so
    /// dedupe never replays an answer from an earlier session.
    sid_prefix: u64,
    sent: u64,
    /// The temporary store directory; declared after `pipeline` so the
    /// store is closed before its directory is removed.
    _tmp: Option<tempfile::TempDir>,
}

/// Run an interactive chat: read lines from `input`, write the conversation
/// to `out`, until `/quit` or end of input.
///
/// Builds its own single-threaded Tokio runtime, so call it from plain
/// (non-async) code.
pub fn chat(opts: &ChatOptions, input: impl BufRead, mut out: impl Write) -> anyhow::Result<()> {
    let loaded = crate::app::load_flows(&opts.flows_dir)?;
    for w in &loaded.warnings {
        writeln!(out, "# {w}")?;
    }
    let (dir, tmp) = match &opts.data_dir {
        Some(dir) => (dir.clone(), None),
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
    let version = loaded.set.version().chars().take(12).collect::<String>();
    let pipeline = Pipeline::new(
        Arc::new(store),
        Arc::new(ArcSwap::from_pointee(loaded.set)),
        // The server's consent handling (STOP, START, HELP) applies here
        // too, so a chat behaves like the real number.
        PipelineOptions {
            engine: EngineOptions {
                interrupt_keywords: opts.interrupt_keywords.clone(),
            },
            ..PipelineOptions::default()
        },
        Arc::new(Metrics::default()),
    );
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut session = Session {
        pipeline,
        flows_dir: opts.flows_dir.clone(),
        from: opts.from.clone(),
        to: opts.to.clone(),
        now: opts.now.unwrap_or(wall.as_secs() as i64),
        sid_prefix: (wall.as_nanos() as u64) ^ u64::from(std::process::id()),
        sent: 0,
        _tmp: tmp,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .context("cannot start the async runtime")?;

    writeln!(
        out,
        "# smsflow chat: flows {} (version {version}), store {}",
        opts.flows_dir.display(),
        match &session._tmp {
            Some(_) => "temporary".to_owned(),
            None => dir.display().to_string(),
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
                "state" => session.state(&mut out)?,
                "reset" => {
                    let existed = runtime.block_on(session.pipeline.forget(&session.key()))?;
                    let note = if existed {
                        ""
                    } else {
                        "   # nothing was stored"
                    };
                    writeln!(out, "@ reset{note}")?;
                }
                "from" | "to" if arg.is_empty() => writeln!(out, "# usage: /{verb} +15551230001")?,
                "from" => {
                    session.from = arg.to_owned();
                    writeln!(out, "# now texting from {arg}")?;
                }
                "to" => {
                    session.to = arg.to_owned();
                    writeln!(out, "# now texting to {arg}")?;
                }
                "reload" => match crate::app::load_flows(&session.flows_dir) {
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
        runtime.block_on(session.send(text, &mut out))?;
    }
    Ok(())
}

impl Session {
    fn key(&self) -> ConvKey {
        ConvKey::new(&self.to, &self.from)
    }

    /// Send one message through the pipeline and print what came back.
    async fn send(&mut self, text: &str, out: &mut impl Write) -> anyhow::Result<()> {
        let (body, media) = flow::split_media(text);
        let body = match flow::unescape(body) {
            Ok(b) => b,
            Err(e) => {
                writeln!(out, "# not sent: {e} (write \\\\ for a backslash)")?;
                return Ok(());
            }
        };
        self.now = self.now.saturating_add(1);
        self.sent += 1;
        let sid = format!("SM{:016x}{:016x}", self.sid_prefix, self.sent);
        let mut params = vec![
            ("MessageSid".to_owned(), sid),
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
            Err(e) => {
                writeln!(out, "# not sent: Twilio would not deliver this: {e}")?;
                return Ok(());
            }
        };
        let detailed = self
            .pipeline
            .handle_inbound_detailed(&msg, self.now)
            .await?;
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
        match &detailed.silence {
            None => {
                for r in &detailed.replies {
                    let mut line = String::from("<");
                    if !r.body.is_empty() {
                        line.push(' ');
                        line.push_str(&flow::escape(&r.body));
                    }
                    if !r.media.is_empty() {
                        line.push_str(&format!(" [media: {}]", r.media.join(", ")));
                    }
                    writeln!(out, "{line}")?;
                }
            }
            Some(reason) => {
                let why = match &detailed.silence_note {
                    Some(text) => format!("   # {text}"),
                    None => String::new(),
                };
                writeln!(out, "< (silence: {reason}){why}")?;
            }
        }
        Ok(())
    }

    /// `/state`: the stored conversation, as transcript assertions.
    fn state(&self, out: &mut impl Write) -> anyhow::Result<()> {
        let key = self.key();
        let Some(bytes) = self.pipeline.store().conversation(&key)? else {
            writeln!(out, "? step = (none)   # nothing stored for this sender")?;
            return Ok(());
        };
        let conv: Conversation = match serde_json::from_slice(&bytes) {
            Ok(c) => c,
            Err(e) => {
                // The pipeline starts such a conversation afresh; say so.
                writeln!(
                    out,
                    "# the stored conversation is unreadable ({e}); the next message starts afresh"
                )?;
                return Ok(());
            }
        };
        match &conv.run {
            Some(run) => {
                let idle = self.now.saturating_sub(run.last_active);
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
// test

/// What [`run_tests`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestSummary {
    pub passed: usize,
    pub failed: usize,
}

/// `smsflow test DIR`: run every `*.chat` transcript under `dir`. Each runs
/// against the flows of its own directory, so subdirectories can hold their
/// own flow sets (as `tests/flows/` does). Writes `PASS`/`FAIL` lines, the
/// failures' diffs and a summary to `out`.
///
/// Errors when `dir` cannot be read or holds no transcript at all: a test
/// command that ran nothing most likely pointed at the wrong directory.
pub fn run_tests(dir: &Path, out: &mut impl Write) -> anyhow::Result<TestSummary> {
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let mut dirs = Vec::new();
    transcript_dirs(dir, 0, &mut dirs);
    if dirs.is_empty() {
        anyhow::bail!(
            "no *.chat transcripts in {} (see flows/README.md, \"Transcript tests\")",
            dir.display()
        );
    }
    let mut summary = TestSummary {
        passed: 0,
        failed: 0,
    };
    for (flows_dir, chats) in dirs {
        let set = flow::load_dir(&flows_dir).map(|l| l.set).map_err(|diags| {
            let list: Vec<String> = diags.iter().map(ToString::to_string).collect();
            format!(
                "the flows in {} do not load:\n{}",
                flows_dir.display(),
                list.join("\n")
            )
        });
        for chat in chats {
            let result = match &set {
                Ok(set) => flow::run_transcript(set, &EngineOptions::default(), &chat)
                    .map_err(|f| f.to_string()),
                Err(e) => Err(e.clone()),
            };
            match result {
                Ok(()) => {
                    summary.passed += 1;
                    writeln!(out, "PASS {}", chat.display())?;
                }
                Err(why) => {
                    summary.failed += 1;
                    writeln!(out, "FAIL {}", chat.display())?;
                    for l in why.lines() {
                        writeln!(out, "  {l}")?;
                    }
                }
            }
        }
    }
    writeln!(out, "{} passed, {} failed", summary.passed, summary.failed)?;
    Ok(summary)
}

/// For a reloader that refuses flow sets whose transcripts fail: run the
/// `*.chat` files directly in `dir` (not in subdirectories, which are not
/// part of the set) against `set`, the candidate set loaded from `dir`.
/// Transcripts run with default engine options plus their own `interrupt:`
/// header. `Ok` when every transcript passes, including when there are
/// none; otherwise every failure with its diff, one after another.
pub fn transcripts_pass(dir: &Path, set: &FlowSet) -> Result<(), String> {
    let chats = chat_files(dir)
        .map_err(|e| format!("cannot list transcripts in {}: {e}", dir.display()))?;
    let failures: Vec<String> = chats
        .iter()
        .filter_map(|chat| {
            flow::run_transcript(set, &EngineOptions::default(), chat)
                .err()
                .map(|f| f.to_string())
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} transcript(s) failed:\n{}",
            failures.len(),
            chats.len(),
            failures.join("\n")
        ))
    }
}

/// The `*.chat` files directly in `dir`, sorted.
fn chat_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut chats: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "chat"))
        .collect();
    chats.sort();
    Ok(chats)
}

/// Deepest directory level searched for transcripts.
const MAX_DEPTH: usize = 16;

/// Every directory under `root` (itself included) holding `*.chat` files,
/// with those files. Skips dot-directories and does not follow symlinked
/// directories, so a link loop cannot recurse forever.
fn transcript_dirs(root: &Path, depth: usize, out: &mut Vec<(PathBuf, Vec<PathBuf>)>) {
    if let Ok(chats) = chat_files(root) {
        if !chats.is_empty() {
            out.push((root.to_path_buf(), chats));
        }
    }
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
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
        transcript_dirs(&d, depth + 1, out);
    }
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
