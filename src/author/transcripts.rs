//! Running transcript tests (`smsflow test`, `--require-tests`, the test
//! suite): each `.chat` file through the same [`Pipeline`](crate::pipeline)
//! as the webhook, over a throwaway store and a virtual clock, exactly as
//! `chat` runs, so consent keywords, the help text, the loop guard and
//! interrupt keywords apply as on the number.
//!
//! Parsing and comparing live in [`flow::Transcript`]; this file only
//! drives the session and collects every mismatch of a file.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::mocks::Mocks;
use super::session::{reply_lines, timer_lines, Sent, Session};
use super::{dirs_under, files_with};
use crate::flow::{self, FlowSet, Line, ReplyLine, Transcript, TranscriptFailure};
use crate::pipeline::PipelineOptions;

/// What one message of a transcript got.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// The line of its `>`.
    pub line: usize,
    /// The MessageSid it was sent with (scripts seed `random` with it, so
    /// another run answers alike only with the same one).
    pub message_sid: String,
    /// The replies, or one silence with its reason.
    pub actual: Vec<ReplyLine>,
}

/// The result of running one transcript.
#[derive(Debug, Clone)]
pub struct TranscriptRun {
    /// The transcript file.
    pub file: PathBuf,
    /// Every message sent, in order, with what it got.
    pub exchanges: Vec<Exchange>,
    /// Every mismatch and failed assertion, in file order. A run continues
    /// after a mismatch (with the state the pipeline actually reached); a
    /// transcript that cannot be read, parsed, seeded or `@ load`ed stops
    /// at that failure.
    pub failures: Vec<TranscriptFailure>,
}

impl TranscriptRun {
    /// Whether the transcript ran without a failure.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Run the transcript at `path` against `set`, through the pipeline with
/// `options` (the server's: [`super::server_defaults`] or a config file's).
/// The transcript's own `interrupt:` header replaces the configured
/// interrupt keywords.
pub fn run_transcript(path: &Path, set: &FlowSet, options: &PipelineOptions) -> TranscriptRun {
    match Transcript::read(path) {
        Ok(transcript) => run_parsed(&transcript, path, set, options),
        Err(failure) => TranscriptRun {
            file: path.to_path_buf(),
            exchanges: Vec::new(),
            failures: vec![failure],
        },
    }
}

/// [`run_transcript`] for a transcript already parsed from `path` (which
/// names it in failures and anchors `@ load`), e.g. with its start time
/// changed.
pub fn run_parsed(
    transcript: &Transcript,
    path: &Path,
    set: &FlowSet,
    options: &PipelineOptions,
) -> TranscriptRun {
    let mut run = TranscriptRun {
        file: path.to_path_buf(),
        exchanges: Vec::new(),
        failures: Vec::new(),
    };
    if let Err(e) = block_on(drive(transcript, set, options, &mut run)) {
        run.failures.push(TranscriptFailure {
            file: path.to_path_buf(),
            line: 0,
            message: format!("{e:#}"),
        });
    }
    run
}

/// Send the transcript's messages and compare; failures are added to
/// `run`. An `Err` is a failure of the machinery (the store), not of the
/// transcript.
async fn drive(
    t: &Transcript,
    set: &FlowSet,
    options: &PipelineOptions,
    run: &mut TranscriptRun,
) -> anyhow::Result<()> {
    let file = run.file.clone();
    let fail = |line: usize, message: String| TranscriptFailure {
        file: file.clone(),
        line,
        message,
    };
    let mut options = options.clone();
    if let Some(words) = &t.interrupt {
        options.engine.interrupt_keywords.clone_from(words);
    }
    let mut session = Session::open(set.clone(), options, None, &t.from, &t.to, t.start, 0)?;
    // No network in `test`: every call is answered by an `@ http` line.
    let mocks = Mocks::default();
    session.pipeline.set_caller(Arc::new(mocks.clone()));
    let unexpected = |run: &mut TranscriptRun, lno: usize| {
        for call in mocks.take_unexpected() {
            run.failures.push(TranscriptFailure {
                file: run.file.clone(),
                line: lno,
                message: format!(
                    "unexpected call {call} (declare its answer with `@ http {call} -> 200 {{...}}` before the message)"
                ),
            });
        }
    };
    let seeded = match t.seed(set, t.start) {
        Ok(conv) => conv,
        Err((line, message)) => {
            run.failures.push(fail(line, message));
            return Ok(());
        }
    };
    if seeded != flow::Conversation::default() {
        session.seed(&seeded).await?;
    }
    let base = run.file.parent().unwrap_or(Path::new(".")).to_path_buf();
    for (lno, line) in &t.lines {
        let lno = *lno;
        match line {
            Line::Send {
                body,
                media,
                expect,
            } => {
                let shown = flow::escape(body);
                let (message_sid, sent) = session.send(body.clone(), media).await?;
                match sent {
                    Sent::Rejected(why) => run.failures.push(fail(
                        lno,
                        format!("`> {shown}` cannot be sent: Twilio would not deliver it: {why}"),
                    )),
                    Sent::Handled(detailed) if detailed.answer.duplicate => {
                        run.failures.push(fail(
                            lno,
                            format!("`> {shown}` was taken for a duplicate MessageSid"),
                        ))
                    }
                    Sent::Handled(detailed) => {
                        let actual = reply_lines(&detailed);
                        if let Err(diff) = flow::compare_replies(expect, &actual) {
                            run.failures
                                .push(fail(lno, format!("reply to `> {shown}` differs\n{diff}")));
                        }
                        run.exchanges.push(Exchange {
                            line: lno,
                            message_sid,
                            actual,
                        });
                    }
                }
                unexpected(run, lno);
            }
            Line::Http(mock) => mocks.declare(lno, mock.clone()),
            Line::Wait { secs, expect } => {
                let fired = session.wait(*secs).await?;
                let actual = timer_lines(&fired);
                let sent_nothing = matches!(actual.as_slice(), [ReplyLine::Silence(_)]);
                if expect.is_empty() {
                    if !sent_nothing {
                        let lines: Vec<String> = actual.iter().map(ReplyLine::render).collect();
                        run.failures.push(fail(
                            lno,
                            format!(
                                "timers sent messages during `@ wait`; expect them with `<` lines after it:\n{}",
                                lines.join("\n")
                            ),
                        ));
                    }
                } else if let Err(diff) = flow::compare_replies(expect, &actual) {
                    run.failures.push(fail(
                        lno,
                        format!("what the timers sent during `@ wait` differs\n{diff}"),
                    ));
                }
                unexpected(run, lno);
            }
            Line::Start {
                flow: name,
                fields,
                vars,
                expect,
            } => match session.start(name, fields, vars).await? {
                None => {
                    run.failures.push(fail(
                        lno,
                        format!("`@ start {name}`: there is no flow `{name}`"),
                    ));
                }
                Some(actual) => {
                    if let Err(diff) = flow::compare_replies(expect, &actual) {
                        run.failures.push(fail(
                            lno,
                            format!("what `@ start {name}` sent differs\n{diff}"),
                        ));
                    }
                    unexpected(run, lno);
                }
            },
            Line::Load(dir) => {
                let dir = base.join(dir);
                match flow::load_dir(&dir) {
                    Ok(loaded) => session.pipeline.flows().store(Arc::new(loaded.set)),
                    Err(diags) => {
                        let list: Vec<String> = diags.iter().map(ToString::to_string).collect();
                        run.failures.push(fail(
                            lno,
                            format!("cannot load {}:\n{}", dir.display(), list.join("\n")),
                        ));
                        return Ok(());
                    }
                }
            }
            Line::Reset => {
                session.forget().await?;
            }
            Line::From(number) => session.from.clone_from(number),
            Line::To(number) => session.to.clone_from(number),
            Line::Assert { what, value } if what == "call.count" => {
                let made = mocks.made().to_string();
                if made != *value {
                    run.failures.push(fail(
                        lno,
                        format!("`call.count` is `{made}`, expected `{value}`"),
                    ));
                }
            }
            Line::Assert { what, value } => {
                let conv = match session.conversation() {
                    Ok(conv) => conv.unwrap_or_default(),
                    Err(e) => {
                        run.failures.push(fail(lno, format!("{e:#}")));
                        continue;
                    }
                };
                match flow::assertion_value(&conv, what) {
                    None => run.failures.push(fail(
                        lno,
                        format!(
                            "unknown assertion `{what}` (use contact.x, var.x, step or call.count)"
                        ),
                    )),
                    Some(actual) if actual != *value => run.failures.push(fail(
                        lno,
                        format!("`{what}` is `{actual}`, expected `{value}`"),
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    for (line, mock) in mocks.unused() {
        run.failures.push(fail(
            line,
            format!(
                "the answer declared for {} {} was never used: no such call was made",
                mock.method, mock.url
            ),
        ));
    }
    Ok(())
}

/// Run `future` to completion on a single-threaded runtime of its own.
/// Inside a runtime (the server's startup, a reload on a blocking thread,
/// async tests) that runtime cannot be blocked on, so the work moves to a
/// scoped thread.
fn block_on<T: Send>(future: impl Future<Output = anyhow::Result<T>> + Send) -> anyhow::Result<T> {
    let run = move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .context("cannot start the async runtime")?
            .block_on(future)
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|s| {
        s.spawn(run)
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the transcript runner panicked")))
    })
}

/// What [`run_tests`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestSummary {
    /// Transcripts that passed.
    pub passed: usize,
    /// Transcripts that failed.
    pub failed: usize,
}

/// `smsflow test DIR`: run every `*.chat` transcript in `dir` and below.
/// Each runs against the flows of its own directory, so subdirectories can
/// hold their own flow sets (as `tests/flows/` does), through the pipeline
/// with `options`. Writes `PASS`/`FAIL` lines, every failure of each file
/// with its diff, and a summary to `out`.
///
/// Errors when `dir` cannot be read or holds no transcript at all: a test
/// command that ran nothing most likely pointed at the wrong directory.
pub fn run_tests(
    dir: &Path,
    options: &PipelineOptions,
    out: &mut impl Write,
) -> anyhow::Result<TestSummary> {
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let dirs: Vec<(PathBuf, Vec<PathBuf>)> = dirs_under(dir)
        .into_iter()
        .map(|d| {
            let chats = files_with(&d, &["chat"]);
            (d, chats)
        })
        .filter(|(_, chats)| !chats.is_empty())
        .collect();
    if dirs.is_empty() {
        anyhow::bail!(
            "no *.chat transcripts in {} or below (see flows/README.md, \"Transcript tests\")",
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
            let failures: Vec<String> = match &set {
                Ok(set) => run_transcript(&chat, set, options)
                    .failures
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                Err(e) => vec![e.clone()],
            };
            if failures.is_empty() {
                summary.passed += 1;
                writeln!(out, "PASS {}", chat.display())?;
            } else {
                summary.failed += 1;
                writeln!(out, "FAIL {}", chat.display())?;
                for l in failures.iter().flat_map(|f| f.lines()) {
                    writeln!(out, "  {l}")?;
                }
            }
        }
    }
    writeln!(out, "{} passed, {} failed", summary.passed, summary.failed)?;
    Ok(summary)
}

/// For a server that refuses flow sets whose transcripts fail
/// (`--require-tests`): run the `*.chat` files directly in `dir` (not in
/// subdirectories, which are not part of the set) against `set`, the
/// candidate set loaded from `dir`, with the served `options`. `Ok` when
/// every transcript passes, including when there are none; otherwise every
/// failure with its diff, one after another.
pub fn transcripts_pass(
    dir: &Path,
    set: &FlowSet,
    options: &PipelineOptions,
) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("cannot list transcripts in {}", dir.display()));
    }
    let chats = files_with(dir, &["chat"]);
    let failed: Vec<TranscriptRun> = chats
        .iter()
        .map(|chat| run_transcript(chat, set, options))
        .filter(|run| !run.passed())
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = failed
        .iter()
        .flat_map(|run| run.failures.iter().map(ToString::to_string))
        .collect();
    Err(format!(
        "{} of {} transcript(s) failed:\n{}",
        failed.len(),
        chats.len(),
        lines.join("\n")
    ))
}
