//! Transcript tests: the `.chat` format. Parses a transcript (headers that
//! seed the conversation, `>` messages with their expected `<` replies, `@`
//! commands and `?` assertions), builds the seeded [`Conversation`], and
//! compares expected replies with actual ones as a line diff.
//!
//! Pure: no IO except [`Transcript::read`], no clock, no store. Running a
//! transcript is `author`'s job: it sends each message through the same
//! pipeline as the webhook (consent, loop guard, dedupe, engine, store),
//! so a transcript that passes behaves the same on a real number. Format:
//! see `flows/README.md`, "Transcript tests".

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::engine::{Conversation, Reply, Run, SCRIPT_STATE_VAR};
use super::load::parse_duration;
use super::model::{FlowSet, Next};
use super::script::{Limits, Sandbox, ENTRY_POINT};
use super::template::is_ident;

/// Virtual time at which every transcript starts (unix seconds).
pub const TRANSCRIPT_EPOCH: i64 = 1_700_000_000;

/// Why a transcript did not pass: where, and what differed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscriptFailure {
    /// The transcript file.
    pub file: PathBuf,
    /// The line of the failure (1-based, 0 for the whole file).
    pub line: usize,
    /// What differed or went wrong.
    pub message: String,
}

impl fmt::Display for TranscriptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

impl std::error::Error for TranscriptFailure {}

/// One `<` line: a reply, or silence with (when checked or known) its
/// reason.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyLine {
    /// A reply that was (or is expected to be) sent.
    Reply(Reply),
    /// `None` in an expectation accepts any reason.
    Silence(Option<String>),
}

impl ReplyLine {
    /// The line as a transcript writes it.
    pub fn render(&self) -> String {
        match self {
            ReplyLine::Silence(None) => "< (silence)".to_owned(),
            ReplyLine::Silence(Some(r)) => format!("< (silence: {r})"),
            ReplyLine::Reply(r) => {
                let mut s = String::from("<");
                if !r.body.is_empty() {
                    s.push(' ');
                    s.push_str(&escape(&r.body));
                }
                if !r.media.is_empty() {
                    s.push_str(&format!(" [media: {}]", r.media.join(", ")));
                }
                s
            }
        }
    }

    /// Does this expected line accept `actual`?
    fn accepts(&self, actual: &ReplyLine) -> bool {
        match (self, actual) {
            (ReplyLine::Silence(None), ReplyLine::Silence(_)) => true,
            _ => self == actual,
        }
    }
}

/// One step of a transcript after its headers.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// `> text`: the sender texts this; `expect` holds the `<` lines that
    /// follow it (never empty).
    Send {
        /// The text sent.
        body: String,
        /// Media URLs sent with it.
        media: Vec<String>,
        /// The replies expected, in order.
        expect: Vec<ReplyLine>,
    },
    /// `@ wait 3h`: advance the virtual clock by this many seconds,
    /// firing the timers that come due on the way; `expect` holds the `<`
    /// lines that follow it: what those timers send (`< (silence)`:
    /// nothing). With no `<` lines, the timers must send nothing.
    Wait {
        /// How far the clock moves, in seconds.
        secs: i64,
        /// The messages the timers are expected to send, in order.
        expect: Vec<ReplyLine>,
    },
    /// `@ start appointment field.appt="Tue 3pm"`: start a flow for the
    /// sender from outside (as `POST /flows/{name}/start` does), with
    /// contact fields and run variables; `expect` holds the `<` lines
    /// that follow it: what the start sends.
    Start {
        /// The flow started.
        flow: String,
        /// Contact fields set before its first step (`field.x=v`).
        fields: BTreeMap<String, String>,
        /// Run variables it begins with (`var.x=v`).
        vars: BTreeMap<String, String>,
        /// The messages the start is expected to send, in order.
        expect: Vec<ReplyLine>,
    },
    /// `@ load DIR`: switch to the flows in DIR (relative to the file).
    Load(PathBuf),
    /// `@ reset`: forget the conversation.
    Reset,
    /// `@ from NUMBER`: later messages come from this sender.
    From(String),
    /// `@ to NUMBER`: later messages go to this one of our numbers.
    To(String),
    /// `@ http POST https://shop.example/orders -> 201 {"id": 42}`: the
    /// answer for the next call to this method and URL (a URL ending in
    /// `*` matches any URL it starts); `-> error timeout` (a category of [`CallError`](super::calls::CallError)) makes the call fail.
    /// No real call is ever made by a transcript.
    Http(HttpMock),
    /// `? what = value`.
    Assert {
        /// What is checked: `contact.x`, `var.x` or `step`.
        what: String,
        /// The value it must have.
        value: String,
    },
}

/// A declared answer to an HTTP call (`@ http ...`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpMock {
    /// The method it answers (`GET`, `POST`, ...).
    pub method: String,
    /// The URL it answers, as the flow renders it (values
    /// percent-encoded); a trailing `*` matches any rest.
    pub url: String,
    /// What the call gets.
    pub answer: super::calls::CallResponse,
}

impl HttpMock {
    /// Does this mock answer `request`?
    pub fn answers(&self, request: &super::calls::CallRequest) -> bool {
        self.method == request.method
            && match self.url.strip_suffix('*') {
                Some(prefix) => request.url.starts_with(prefix),
                None => self.url == request.url,
            }
    }

    /// Parse what follows `@ http ` (or `/http ` in `chat`).
    pub fn parse(arg: &str) -> Result<HttpMock, String> {
        const FORM: &str =
            "write `@ http METHOD URL -> STATUS [JSON]` or `@ http METHOD URL -> error timeout` (or connection, refused, invalid, too_large, redirects)";
        let (req, answer) = arg.split_once("->").ok_or(FORM)?;
        let (method, url) = req.trim().split_once(' ').ok_or(FORM)?;
        let method = method.trim().to_ascii_uppercase();
        if !super::calls::METHODS.contains(&method.as_str()) {
            return Err(format!("unknown method `{method}`; {FORM}"));
        }
        let url = url.trim().to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("`{url}` is not an http(s) URL; {FORM}"));
        }
        let answer = answer.trim();
        let (head, rest) = answer.split_once(' ').unwrap_or((answer, ""));
        let answer = if head == "error" {
            let word = rest.split_whitespace().next().unwrap_or("timeout");
            let error = super::calls::CallError::parse(word).ok_or_else(|| {
                let words: Vec<&str> = super::calls::CallError::ALL
                    .iter()
                    .filter(|e| **e != super::calls::CallError::Status)
                    .map(|e| e.as_str())
                    .collect();
                format!(
                    "`{word}` is not a call error (one of {}); {FORM}",
                    words.join(", ")
                )
            })?;
            if error == super::calls::CallError::Status {
                return Err(format!(
                    "a status is an answer: write `-> 503` instead of `-> error status`; {FORM}"
                ));
            }
            super::calls::CallResponse::failed(error, "mocked")
        } else {
            let status: u16 = head
                .parse()
                .ok()
                .filter(|s| (100..=599).contains(s))
                .ok_or_else(|| format!("`{head}` is not a status; {FORM}"))?;
            let json = if rest.trim().is_empty() {
                None
            } else {
                Some(
                    serde_json::from_str(rest.trim())
                        .map_err(|e| format!("the answer is not JSON: {e}"))?,
                )
            };
            super::calls::CallResponse::Answered { status, json }
        };
        Ok(HttpMock {
            method,
            url,
            answer,
        })
    }
}

/// A parsed `.chat` file.
#[derive(Debug, Clone)]
pub struct Transcript {
    /// The sender's number (`from:` header, or a default).
    pub from: String,
    /// Our number (`to:` header, or a default).
    pub to: String,
    /// `interrupt:` header: replaces the configured interrupt keywords.
    pub interrupt: Option<Vec<String>>,
    /// `now:` header: virtual start time (unix seconds).
    pub start: i64,
    /// Seeded contact fields (`contact.name: Ann` headers).
    pub contact: BTreeMap<String, String>,
    /// Seeded run variables (`var.x: y`); only with `step`.
    vars: BTreeMap<String, String>,
    first_var: Option<usize>,
    /// `step: flow/step` header (with its line): the conversation starts
    /// parked there.
    step: Option<(usize, String, String)>,
    /// `state: {...}` header (with its line): a script flow's state.
    state: Option<(usize, String)>,
    /// Everything after the headers, each with its line number.
    pub lines: Vec<(usize, Line)>,
}

impl Transcript {
    /// Read and parse the transcript at `path`.
    pub fn read(path: &Path) -> Result<Transcript, TranscriptFailure> {
        let fail = |line: usize, message: String| TranscriptFailure {
            file: path.to_path_buf(),
            line,
            message,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(0, format!("cannot read: {e}")))?;
        Transcript::parse(&text).map_err(|(line, msg)| fail(line, msg))
    }

    /// Parse transcript text; an error names the line (1-based).
    pub fn parse(text: &str) -> Result<Transcript, (usize, String)> {
        parse(text)
    }

    /// Does the transcript start from a seeded conversation?
    pub fn is_seeded(&self) -> bool {
        !self.contact.is_empty() || self.step.is_some()
    }

    /// The conversation the transcript starts from at time `now`: seeded
    /// contact fields and, with a `step:` header, a run parked at that step
    /// as if its question had just been sent (for a script flow, at
    /// `on_message` with the `state:` given).
    pub fn seed(&self, set: &FlowSet, now: i64) -> Result<Conversation, (usize, String)> {
        let run = match &self.step {
            None => None,
            Some((lno, flow, step)) => {
                let lno = *lno;
                let f = set.inner.flows.get(flow).ok_or_else(|| {
                    let known: Vec<&str> = set.flow_names().collect();
                    (
                        lno,
                        format!(
                            "`step:` names unknown flow `{flow}` (flows: {})",
                            known.join(", ")
                        ),
                    )
                })?;
                let vars = if f.script.is_some() {
                    if step != ENTRY_POINT {
                        return Err((
                            lno,
                            format!("`{flow}` is a script flow: its run waits at `{flow}/{ENTRY_POINT}`"),
                        ));
                    }
                    if let Some(var_line) = self.first_var {
                        return Err((
                            var_line,
                            format!("`{flow}` is a script flow: seed its state with a `state:` header, not `var.`"),
                        ));
                    }
                    let (state_line, text) = self.state.as_ref().ok_or_else(|| {
                        (
                            lno,
                            format!("a run of the script flow `{flow}` needs its state: add a `state: {{...}}` header"),
                        )
                    })?;
                    let state = script_state(set, text).map_err(|e| (*state_line, e))?;
                    if state.is_empty() {
                        return Err((
                            *state_line,
                            "an empty state ends a script run: give it at least one field".into(),
                        ));
                    }
                    let json = serde_json::to_string(&state).unwrap_or_default();
                    BTreeMap::from([(SCRIPT_STATE_VAR.to_owned(), json)])
                } else {
                    if let Some((state_line, _)) = &self.state {
                        return Err((
                            *state_line,
                            format!("`state:` seeds a script flow; `{flow}` is a YAML flow (seed `var.` values)"),
                        ));
                    }
                    let s = f
                        .steps
                        .get(step)
                        .ok_or_else(|| (lno, format!("flow `{flow}` has no step `{step}`")))?;
                    if !matches!(s.next, Next::Wait { .. }) {
                        return Err((
                            lno,
                            format!("step `{flow}/{step}` does not wait for a reply, so no conversation can be parked there"),
                        ));
                    }
                    self.vars.clone()
                };
                Some(Run {
                    flow: flow.clone(),
                    step: step.clone(),
                    vars,
                    retries: 0,
                    started_at: now,
                    last_active: now,
                    waiting_since: now,
                    timeouts_fired: 0,
                    wakes: BTreeMap::new(),
                    path: vec![step.clone()],
                })
            }
        };
        Ok(Conversation {
            contact: self.contact.clone(),
            run,
            queued: Vec::new(),
        })
    }
}

/// A `state:` header's value: a JSON object, or a Rhai map literal
/// evaluated in the set's sandbox.
fn script_state(set: &FlowSet, text: &str) -> Result<BTreeMap<String, Value>, String> {
    let text = text.trim();
    if text.starts_with('{') {
        return serde_json::from_str(text)
            .map_err(|e| format!("`state:` is not a JSON object: {e}"));
    }
    if text.starts_with("#{") {
        let own;
        let sandbox = match &set.inner.sandbox {
            Some(s) => s.as_ref(),
            None => {
                own = Sandbox::new(Limits::default(), None);
                &own
            }
        };
        return sandbox
            .state_literal(text)
            .map_err(|e| format!("`state:` is not a Rhai map: {e}"));
    }
    Err("write `state:` as a JSON object (`{\"n\": 1}`) or a Rhai map (`#{n: 1}`)".into())
}

/// The value a `?` assertion reads from a conversation, as a transcript
/// writes it; `None` for an unknown assertion.
pub fn assertion_value(conv: &Conversation, what: &str) -> Option<String> {
    let unset = || "(unset)".to_owned();
    if let Some(field) = what.strip_prefix("contact.") {
        return Some(conv.contact.get(field).cloned().unwrap_or_else(unset));
    }
    if let Some(var) = what.strip_prefix("var.") {
        return Some(
            conv.run
                .as_ref()
                .and_then(|r| r.vars.get(var).cloned())
                .unwrap_or_else(unset),
        );
    }
    if what == "step" {
        return Some(match &conv.run {
            Some(r) => format!("{}/{}", r.flow, r.step),
            None => "(none)".to_owned(),
        });
    }
    None
}

/// Check `actual` against `expected`; on a difference, the diff.
pub fn compare_replies(expected: &[ReplyLine], actual: &[ReplyLine]) -> Result<(), String> {
    if expected.len() == actual.len() && expected.iter().zip(actual).all(|(e, a)| e.accepts(a)) {
        return Ok(());
    }
    Err(diff(expected, actual))
}

/// A line diff of expected against actual replies: `-` only expected, `+`
/// only actual, two spaces for lines both have. Replies are at most ten per
/// message, so a plain longest-common-subsequence table is cheap.
fn diff(expected: &[ReplyLine], actual: &[ReplyLine]) -> String {
    let (n, m) = (expected.len(), actual.len());
    // lcs[i][j]: common length of expected[i..] and actual[j..].
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i].accepts(&actual[j]) {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = vec!["  (- expected, + actual)".to_owned()];
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && expected[i].accepts(&actual[j]) {
            out.push(format!("    {}", actual[j].render()));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("  - {}", expected[i].render()));
            i += 1;
        } else {
            out.push(format!("  + {}", actual[j].render()));
            j += 1;
        }
    }
    out.join("\n")
}

/// Show control characters and newlines the way a transcript writes them.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some('u') => {
                let rest: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let hex = rest
                    .strip_prefix('{')
                    .ok_or_else(|| "write `\\u{hex}`".to_owned())?;
                let ch = u32::from_str_radix(hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| format!("bad escape `\\u{{{hex}}}`"))?;
                out.push(ch);
            }
            other => {
                return Err(format!(
                    "unknown escape `\\{}` (use \\n, \\t, \\\\ or \\u{{hex}})",
                    other.map(String::from).unwrap_or_default()
                ))
            }
        }
    }
    Ok(out)
}

/// Strip a trailing ` # comment` from header, `@` and `?` lines.
fn strip_comment(s: &str) -> &str {
    match s.find(" #").or_else(|| s.find("\t#")) {
        Some(i) => s[..i].trim_end(),
        None => s.trim_end(),
    }
}

/// Split `text [media: a, b]` into text and media URLs.
pub(crate) fn split_media(s: &str) -> (&str, Vec<String>) {
    if let Some(start) = s.rfind("[media:") {
        if s.ends_with(']') {
            let inner = &s[start + "[media:".len()..s.len() - 1];
            let media = inner
                .split([',', ' '])
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect();
            return (s[..start].trim_end(), media);
        }
    }
    (s, Vec::new())
}

/// A `state:` header's value with an optional trailing ` # comment` after
/// its closing brace (a Rhai map starts with `#{`, so the usual comment rule
/// would cut it).
fn state_header_text(value: &str) -> &str {
    let value = value.trim();
    match value.rfind('}') {
        Some(end)
            if value[end + 1..].trim_start().is_empty()
                || value[end + 1..].trim_start().starts_with('#') =>
        {
            &value[..=end]
        }
        _ => value,
    }
}

/// What follows `@ start `: a flow name, then `field.name=value` and
/// `var.name=value` pairs; a value with spaces is written in double
/// quotes (`\"` and `\\` inside them).
pub(crate) fn parse_start(arg: &str) -> Result<Line, String> {
    const FORM: &str = "write `@ start FLOW field.name=value var.name=\"two words\"`";
    let mut rest = arg.trim();
    let (flow, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if flow.is_empty() {
        return Err(format!("`@ start` needs a flow; {FORM}"));
    }
    let (mut fields, mut vars) = (BTreeMap::new(), BTreeMap::new());
    rest = after.trim_start();
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("`{rest}`: expected name=value; {FORM}"))?;
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                let end = end.ok_or_else(|| format!("unclosed quote; {FORM}"))?;
                (value, &quoted[end..])
            }
            None => {
                let (v, after) = after.split_once(char::is_whitespace).unwrap_or((after, ""));
                (v.to_owned(), after)
            }
        };
        let (map, short) = if let Some(n) = name.strip_prefix("field.") {
            (&mut fields, n)
        } else if let Some(n) = name.strip_prefix("var.") {
            (&mut vars, n)
        } else {
            return Err(format!("`{name}`: name a `field.x` or a `var.x`; {FORM}"));
        };
        if !is_ident(short) {
            return Err(format!("`{name}`: `{short}` is not a valid name"));
        }
        map.insert(short.to_owned(), value);
        rest = after.trim_start();
    }
    Ok(Line::Start {
        flow: flow.to_owned(),
        fields,
        vars,
        expect: Vec::new(),
    })
}

fn parse(text: &str) -> Result<Transcript, (usize, String)> {
    let mut script = Transcript {
        from: "+15551230001".into(),
        to: "+15550001111".into(),
        interrupt: None,
        start: TRANSCRIPT_EPOCH,
        contact: BTreeMap::new(),
        vars: BTreeMap::new(),
        first_var: None,
        step: None,
        state: None,
        lines: Vec::new(),
    };
    let mut in_headers = true;
    for (idx, raw) in text.lines().enumerate() {
        let lno = idx + 1;
        let line = raw.trim_end();
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (sigil, rest) = match line.char_indices().nth(1) {
            Some((i, _)) => (&line[..i], &line[i..]),
            None => (line, ""),
        };
        // "> text": one space after the sigil is part of the syntax.
        let rest_text = rest.strip_prefix(' ').unwrap_or(rest);
        match sigil {
            ">" => {
                in_headers = false;
                let (body, media) = split_media(rest_text);
                let body = unescape(body).map_err(|e| (lno, e))?;
                script.lines.push((
                    lno,
                    Line::Send {
                        body,
                        media,
                        expect: Vec::new(),
                    },
                ));
            }
            "<" => {
                in_headers = false;
                let e = match strip_comment(rest_text) {
                    "(silence)" => ReplyLine::Silence(None),
                    s if s.starts_with("(silence:") && s.ends_with(')') => ReplyLine::Silence(
                        Some(s["(silence:".len()..s.len() - 1].trim().to_owned()),
                    ),
                    _ => {
                        let (body, media) = split_media(rest_text);
                        ReplyLine::Reply(Reply {
                            body: unescape(body).map_err(|e| (lno, e))?,
                            media,
                            origin: None,
                        })
                    }
                };
                match script.lines.last_mut() {
                    Some((
                        _,
                        Line::Send { expect, .. }
                        | Line::Wait { expect, .. }
                        | Line::Start { expect, .. },
                    )) => expect.push(e),
                    _ => {
                        return Err((
                            lno,
                            "`<` line without a `>` message, `@ wait` or `@ start` before it"
                                .into(),
                        ))
                    }
                }
            }
            "@" => {
                in_headers = false;
                let cmd = strip_comment(rest_text).trim();
                let (verb, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
                let arg = arg.trim();
                let l = match verb {
                    // The whole line: a JSON answer may hold ` #`.
                    "http" => Line::Http(
                        HttpMock::parse(rest_text.trim().trim_start_matches("http").trim())
                            .map_err(|e| (lno, e))?,
                    ),
                    "wait" => Line::Wait {
                        secs: parse_duration(arg)
                            .ok_or((lno, format!("bad duration `{arg}` (like 90s, 3h, 2d)")))?,
                        expect: Vec::new(),
                    },
                    "start" => parse_start(arg).map_err(|e| (lno, e))?,
                    "load" if !arg.is_empty() => Line::Load(PathBuf::from(arg)),
                    "reset" => Line::Reset,
                    "from" if !arg.is_empty() => Line::From(arg.to_owned()),
                    "to" if !arg.is_empty() => Line::To(arg.to_owned()),
                    _ => {
                        return Err((
                            lno,
                            format!(
                                "unknown `@ {cmd}` (use `@ wait 3h`, `@ start FLOW field.x=v`, `@ load DIR`, `@ reset`, `@ from +1555…`, `@ to +1555…` or `@ http POST URL -> 201 {{…}}`)"
                            ),
                        ))
                    }
                };
                script.lines.push((lno, l));
            }
            "?" => {
                in_headers = false;
                let a = strip_comment(rest_text);
                let (what, value) = a
                    .split_once('=')
                    .ok_or((lno, "write assertions as `? contact.name = Ann`".to_owned()))?;
                script.lines.push((
                    lno,
                    Line::Assert {
                        what: what.trim().to_owned(),
                        value: value.trim().to_owned(),
                    },
                ));
            }
            _ if in_headers => {
                if let Some(value) = trimmed.strip_prefix("state:") {
                    script.state = Some((lno, state_header_text(value).to_owned()));
                    continue;
                }
                let h = strip_comment(line);
                let (key, value) = h.split_once(':').ok_or((
                    lno,
                    format!("expected a header like `from: +1555...`, got `{h}`"),
                ))?;
                let value = value.trim();
                match key.trim() {
                    "from" => script.from = value.to_owned(),
                    "to" => script.to = value.to_owned(),
                    "interrupt" => {
                        script.interrupt = Some(
                            value
                                .split(',')
                                .map(str::trim)
                                .filter(|s| !s.is_empty())
                                .map(str::to_owned)
                                .collect(),
                        )
                    }
                    "now" => {
                        script.start = value.parse().map_err(|_| {
                            (lno, format!("`now` must be unix seconds, got `{value}`"))
                        })?
                    }
                    "step" => {
                        let (flow, step) = value.split_once('/').ok_or((
                            lno,
                            format!("write the starting step as `step: flow/step`, got `{value}`"),
                        ))?;
                        script.step = Some((lno, flow.trim().to_owned(), step.trim().to_owned()));
                    }
                    other => {
                        let (map, name) = if let Some(name) = other.strip_prefix("contact.") {
                            (&mut script.contact, name)
                        } else if let Some(name) = other.strip_prefix("var.") {
                            script.first_var.get_or_insert(lno);
                            (&mut script.vars, name)
                        } else {
                            return Err((
                                lno,
                                format!(
                                    "unknown header `{other}` (from, to, interrupt, now, step, state, contact.x, var.x)"
                                ),
                            ));
                        };
                        if !is_ident(name) {
                            return Err((lno, format!("`{other}`: `{name}` is not a valid name")));
                        }
                        map.insert(name.to_owned(), unescape(value).map_err(|e| (lno, e))?);
                    }
                }
            }
            _ => {
                return Err((
                    lno,
                    format!("expected `>`, `<`, `@`, `?` or `#` at the start of `{line}`"),
                ))
            }
        }
    }
    if let (Some(lno), None) = (script.first_var, &script.step) {
        return Err((
            lno,
            "run variables live in a run: add a `step: flow/step` header to seed `var.` values"
                .into(),
        ));
    }
    if let (Some((lno, _)), None) = (&script.state, &script.step) {
        return Err((
            *lno,
            "a script's state lives in a run: add a `step: flow/on_message` header to seed `state:`"
                .into(),
        ));
    }
    // Every message needs its expected replies spelled out, even silence.
    for (lno, l) in &script.lines {
        if matches!(l, Line::Send { expect, .. } if expect.is_empty()) {
            return Err((
                *lno,
                "a `>` message needs `<` lines after it (or `< (silence)`)".into(),
            ));
        }
    }
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(b: &str) -> ReplyLine {
        ReplyLine::Reply(Reply {
            body: b.into(),
            ..Reply::default()
        })
    }

    #[test]
    fn parses_every_line_kind() {
        let s = parse(
            "# c\nfrom: +1 # me\ninterrupt: MENU, RESTART\n> hi [media: https://x/a.jpg]\n< Hello\\nthere [media: https://x/b.jpg, https://x/c.jpg]\n< (silence)   # none\n@ wait 3h\n@ from +15550000002 # another sender\n@ to +15550000003\n? step = (none)\n",
        )
        .unwrap();
        assert_eq!(s.from, "+1");
        assert_eq!(
            s.interrupt,
            Some(vec!["MENU".to_owned(), "RESTART".to_owned()])
        );
        assert_eq!(s.lines.len(), 5);
        match &s.lines[0].1 {
            Line::Send {
                body,
                media,
                expect,
            } => {
                assert_eq!(body, "hi");
                assert_eq!(media, &["https://x/a.jpg"]);
                match &expect[..] {
                    [ReplyLine::Reply(r), ReplyLine::Silence(None)] => {
                        assert_eq!(r.body, "Hello\nthere");
                        assert_eq!(r.media.len(), 2);
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.lines[1].1, Line::Wait { secs: 10800, .. }));
        assert_eq!(s.lines[2], (8, Line::From("+15550000002".into())));
        assert_eq!(s.lines[3], (9, Line::To("+15550000003".into())));
        assert!(parse("@ from\n").is_err(), "a number is needed");
    }

    #[test]
    fn parses_starts_with_quoted_values() {
        let s = parse(
            "@ start appointment field.appt=\"Tue 3pm\" var.n=2 field.q=\"a \\\"b\\\"\"\n< Hi\n",
        )
        .unwrap();
        let Line::Start {
            flow,
            fields,
            vars,
            expect,
        } = &s.lines[0].1
        else {
            panic!("not a start: {:?}", s.lines[0]);
        };
        assert_eq!(flow, "appointment");
        assert_eq!(fields["appt"], "Tue 3pm");
        assert_eq!(fields["q"], "a \"b\"");
        assert_eq!(vars["n"], "2");
        assert_eq!(expect, &vec![reply("Hi")]);
        for bad in [
            "@ start",
            "@ start f field.x=\"open",
            "@ start f other.x=1",
            "@ start f field.x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_seed_headers() {
        let s = parse(
            "contact.name: Ann Lee # seeded\nvar.name: Ann\nstep: signup/ask_age\n> 34\n< ok\n",
        )
        .unwrap();
        assert_eq!(s.contact.get("name").map(String::as_str), Some("Ann Lee"));
        assert_eq!(s.vars.get("name").map(String::as_str), Some("Ann"));
        assert_eq!(s.step, Some((3, "signup".to_owned(), "ask_age".to_owned())));
        assert!(parse("var.x: 1\n> hi\n< x\n").is_err(), "var without step");
        assert!(
            parse("step: signup\n> hi\n< x\n").is_err(),
            "step without flow/"
        );
        assert!(parse("contact.a b: 1\n> hi\n< x\n").is_err(), "bad name");
        assert!(
            parse("state: {\"n\": 1}\n> hi\n< x\n").is_err(),
            "state without step"
        );
    }

    #[test]
    fn state_headers_keep_rhai_maps_and_drop_trailing_comments() {
        let s = parse("step: quiz/on_message\nstate: #{question: 1} # second question\n> a\n< b\n")
            .unwrap();
        assert_eq!(s.state, Some((2, "#{question: 1}".to_owned())));
        let s = parse("step: quiz/on_message\nstate: {\"q\": \"a # b\"}\n> a\n< b\n").unwrap();
        assert_eq!(s.state, Some((2, "{\"q\": \"a # b\"}".to_owned())));
    }

    #[test]
    fn diff_marks_only_the_differing_lines() {
        let out = diff(&[reply("a"), reply("b")], &[reply("a"), reply("c")]);
        assert_eq!(out, "  (- expected, + actual)\n    < a\n  - < b\n  + < c");
        // An unqualified silence accepts any reason.
        assert!(compare_replies(
            &[ReplyLine::Silence(None)],
            &[ReplyLine::Silence(Some("opt_out".into()))]
        )
        .is_ok());
        assert!(compare_replies(
            &[ReplyLine::Silence(Some("no_match".into()))],
            &[ReplyLine::Silence(Some("opt_out".into()))]
        )
        .is_err());
    }

    #[test]
    fn rejects_unanswered_message() {
        assert!(parse("> hi\n> again\n< x\n").is_err());
        assert!(parse("> hi\n").is_err());
        assert!(parse("nonsense\n> hi\n< x").is_err());
        assert_eq!(
            parse("< x\n").unwrap_err().1,
            "`<` line without a `>` message, `@ wait` or `@ start` before it"
        );
        assert!(parse("> hi\n< x\n@ reset\n< y\n").is_err());
    }

    #[test]
    fn escapes_round_trip() {
        let s = "a\nb\t\\ \u{7}";
        assert_eq!(unescape(&escape(s)).unwrap(), s);
        assert!(unescape("\\q").is_err());
    }
}
