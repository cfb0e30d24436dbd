//! `smsflow chat`: talk to the flows in a terminal. Lines typed (or piped)
//! are sent through the [`Session`]; replies, silences and the engine's
//! events are written back as transcript lines and comments, so a saved
//! chat reads as a transcript test. Works on a reader and a writer; `main`
//! passes stdin and stdout.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use super::session::{reply_lines, timer_lines, Sent, Session};
use crate::flow::{self, Event};
use crate::pipeline::{Detailed, PipelineOptions};

/// Settings for [`chat`].
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// The flows directory to chat with.
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
    /// interrupt keywords, loop guard): [`server_defaults`](super::server_defaults), or from a
    /// config file with [`PipelineOptions::from_config`].
    pub options: PipelineOptions,
    /// Write each message back as `> text`, so the output reads as a whole
    /// transcript when input is piped rather than typed. When false, a `> `
    /// prompt is written before each read instead.
    pub echo: bool,
    /// `--real-calls`: flows' HTTP calls are made for real, limited to
    /// these `http_allow` entries (the config file's). `None`: no call
    /// leaves the machine; `/http` lines declare their answers.
    pub real_calls: Option<Vec<String>>,
}

const CHAT_HELP: &str = "\
# Type a message to send it. Replies show as `< text`, silence as
# `< (silence: reason)`. `hi [media: https://x/a.jpg]` attaches media;
# \\n, \\t, \\\\ and \\u{1F600} are escapes; `//text` sends `/text`.
#   /wait 2h      advance the virtual clock (s, m, h, d; combinable: 1h30m),
#                 firing the timeouts due meanwhile and showing what they send
#   /state        show the stored conversation (contact fields, step, run vars)
#   /reset        forget this conversation (contact fields and run)
#   /from NUMBER  text as another sender; /to NUMBER  text another of our numbers
#   /reload       re-read the flows directory, keeping conversations
#   /start FLOW field.appt=\"Tue 3pm\" var.ref=A-17
#                 start a flow for this sender from outside (as the API
#                 does) and show what it sends
#   /http POST https://shop.example/orders -> 201 {\"id\": 42}
#                 the answer to the flow's next such call (-> error timeout: it
#                 fails); without --real-calls no call leaves the machine
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
    let mocks = super::mocks::Mocks::default();
    match &opts.real_calls {
        Some(allow) => {
            let allow = crate::calls::Allow::parse(allow).map_err(anyhow::Error::msg)?;
            session
                .pipeline
                .set_caller(Arc::new(crate::calls::HttpCaller::new(allow)?));
        }
        None => session.pipeline.set_caller(Arc::new(mocks.clone())),
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
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
                        let fired = runtime.block_on(session.wait(secs))?;
                        writeln!(out, "@ wait {arg}   # clock now {}", session.now)?;
                        // Each firing's events, then what it sent; nothing
                        // sent: no `<` line, so a saved chat reads as a
                        // transcript (`@ wait` without `<` expects that).
                        for f in &fired {
                            for event in &f.events {
                                writeln!(out, "# {}", describe(event))?;
                            }
                            if !f.enqueued.is_empty() {
                                for line in timer_lines(std::slice::from_ref(f)) {
                                    writeln!(out, "{}", line.render())?;
                                }
                            }
                        }
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
                "start" => match flow::parse_start(arg) {
                    Ok(flow::Line::Start {
                        flow: name,
                        fields,
                        vars,
                        ..
                    }) => match runtime.block_on(session.start(&name, &fields, &vars))? {
                        None => writeln!(out, "# no flow `{name}` in this set")?,
                        Some(sent) => {
                            // A transcript line: a saved chat replays it.
                            writeln!(out, "@ start {arg}")?;
                            for line in sent {
                                writeln!(out, "{}", line.render())?;
                            }
                        }
                    },
                    Ok(_) => {}
                    Err(e) => writeln!(out, "# {e}")?,
                },
                "http" if opts.real_calls.is_some() => {
                    writeln!(out, "# --real-calls: calls are made for real, /http is off")?
                }
                "http" => match flow::HttpMock::parse(arg) {
                    Ok(mock) => {
                        mocks.declare(0, mock);
                        // A transcript line: a saved chat replays it.
                        writeln!(out, "@ http {arg}")?;
                    }
                    Err(e) => writeln!(out, "# {e}")?,
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
        for call in mocks.take_unexpected() {
            writeln!(
                out,
                "# no answer declared for {call}: it failed (declare one with /http {call} -> 200 {{...}}, or chat --real-calls)"
            )?;
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
        match (&line, detailed.silence.as_ref().and_then(|s| s.note())) {
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
        Event::TimedOut {
            flow,
            step,
            timeout,
            ..
        } => match timeout.parse::<i64>() {
            Ok(secs) => format!("{flow}/{step}: no reply after {}", flow::show_secs(secs)),
            Err(_) => format!("{flow}: wake {timeout} came due (on_timeout)"),
        },
        Event::Call {
            flow,
            step,
            method,
            host,
            status,
            error,
        } => match (status, error) {
            (Some(status), _) => format!("{flow}/{step}: {method} {host} answered {status}"),
            (None, error) => format!(
                "{flow}/{step}: {method} {host} failed: {}",
                error.as_deref().unwrap_or("-")
            ),
        },
        Event::StaleTimer { flow, step } => {
            format!("a timer of {flow}/{step} no longer exists (flows edited); dropped")
        }
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
