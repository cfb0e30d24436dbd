//! Transcript tests: `.chat` files that script a conversation and the
//! replies expected, run against a flow set with a virtual clock.
//!
//! Used by the test suite and `smsflow test`. Runs the
//! real [`handle`] step function; reads the transcript (and, for `@ load`,
//! another flows directory) from disk, but knows nothing of HTTP or the
//! store. Format: see `flows/README.md`, "Transcript tests".

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::engine::{handle, Conversation, EngineOptions, Inbound, Outcome, Reply, Run};
use super::load::{load_dir, parse_duration};
use super::model::{FlowSet, Next};
use super::template::is_ident;

/// Virtual time at which every transcript starts (unix seconds).
pub const TRANSCRIPT_EPOCH: i64 = 1_700_000_000;

/// Why a transcript did not pass: where, and what differed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscriptFailure {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for TranscriptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

impl std::error::Error for TranscriptFailure {}

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Reply(Reply),
    Silence(Option<String>),
}

#[derive(Debug)]
enum Line {
    Send { body: String, media: Vec<String> },
    Expect(Expect),
    Wait(i64),
    Load(PathBuf),
    Reset,
    Assert { what: String, value: String },
}

struct Script {
    from: String,
    to: String,
    interrupt: Option<Vec<String>>,
    start: i64,
    /// Seeded contact fields (`contact.name: Ann` headers).
    contact: BTreeMap<String, String>,
    /// Seeded run variables (`var.x: y`); only with `step`.
    vars: BTreeMap<String, String>,
    /// `step: flow/step` header: the conversation starts parked there.
    step: Option<(usize, String, String)>,
    lines: Vec<(usize, Line)>,
}

/// Run the transcript at `path` against `set`.
pub fn run_transcript(
    set: &FlowSet,
    opts: &EngineOptions,
    path: &Path,
) -> Result<(), TranscriptFailure> {
    let fail = |line: usize, message: String| TranscriptFailure {
        file: path.to_path_buf(),
        line,
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(0, format!("cannot read: {e}")))?;
    let script = parse(&text).map_err(|(line, msg)| fail(line, msg))?;
    let mut opts = opts.clone();
    if let Some(words) = &script.interrupt {
        opts.interrupt_keywords.clone_from(words);
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut set = set.clone();
    let mut now = script.start;
    let mut conv = seed(&set, &script, now).map_err(|(line, msg)| fail(line, msg))?;
    let mut sent = 0u64;

    let mut i = 0;
    let lines = &script.lines;
    while i < lines.len() {
        let (lno, line) = &lines[i];
        i += 1;
        match line {
            Line::Send { body, media } => {
                now += 1;
                sent += 1;
                let sid = format!("SM{sent:032}");
                let msg = Inbound {
                    from: &script.from,
                    to: &script.to,
                    body,
                    media,
                    message_sid: &sid,
                };
                let handled = handle(&set, &opts, conv, &msg, now);
                conv = handled.conversation;
                let mut expected = Vec::new();
                while let Some((_, Line::Expect(e))) = lines.get(i) {
                    expected.push(e.clone());
                    i += 1;
                }
                compare(&expected, &handled.outcome).map_err(|diff| {
                    fail(
                        *lno,
                        format!("reply to `> {}` differs\n{diff}", escape(body)),
                    )
                })?;
            }
            Line::Expect(_) => {
                return Err(fail(
                    *lno,
                    "`<` line without a `>` message before it".into(),
                ))
            }
            Line::Wait(secs) => now += secs,
            Line::Load(dir) => {
                let dir = base.join(dir);
                set = load_dir(&dir)
                    .map_err(|diags| {
                        let list: Vec<String> = diags.iter().map(ToString::to_string).collect();
                        fail(
                            *lno,
                            format!("cannot load {}:\n{}", dir.display(), list.join("\n")),
                        )
                    })?
                    .set;
            }
            Line::Reset => conv = Conversation::default(),
            Line::Assert { what, value } => {
                let actual = state_value(&conv, what).ok_or_else(|| {
                    fail(
                        *lno,
                        format!("unknown assertion `{what}` (use contact.x, var.x or step)"),
                    )
                })?;
                if actual != *value {
                    return Err(fail(
                        *lno,
                        format!("`{what}` is `{actual}`, expected `{value}`"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The conversation a transcript starts from: seeded contact fields and,
/// with a `step:` header, a run parked at that step as if its question had
/// just been sent.
fn seed(set: &FlowSet, script: &Script, now: i64) -> Result<Conversation, (usize, String)> {
    let run = match &script.step {
        None => None,
        Some((lno, flow, step)) => {
            let f = set.inner.flows.get(flow).ok_or_else(|| {
                let known: Vec<&str> = set.flow_names().collect();
                (
                    *lno,
                    format!(
                        "`step:` names unknown flow `{flow}` (flows: {})",
                        known.join(", ")
                    ),
                )
            })?;
            let s = f
                .steps
                .get(step)
                .ok_or_else(|| (*lno, format!("flow `{flow}` has no step `{step}`")))?;
            if !matches!(s.next, Next::Wait { .. }) {
                return Err((
                    *lno,
                    format!("step `{flow}/{step}` does not wait for a reply, so no conversation can be parked there"),
                ));
            }
            Some(Run {
                flow: flow.clone(),
                step: step.clone(),
                vars: script.vars.clone(),
                retries: 0,
                started_at: now,
                last_active: now,
            })
        }
    };
    Ok(Conversation {
        contact: script.contact.clone(),
        run,
    })
}

fn state_value(conv: &Conversation, what: &str) -> Option<String> {
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

fn compare(expected: &[Expect], actual: &Outcome) -> Result<(), String> {
    let actual_lines: Vec<Expect> = match actual {
        Outcome::Reply(replies) => replies.iter().cloned().map(Expect::Reply).collect(),
        Outcome::Silence(reason) => vec![Expect::Silence(Some(reason.as_str().to_owned()))],
    };
    let same = |e: &Expect, a: &Expect| match (e, a) {
        (Expect::Silence(None), Expect::Silence(_)) => true,
        _ => e == a,
    };
    if expected.len() == actual_lines.len()
        && expected.iter().zip(&actual_lines).all(|(e, a)| same(e, a))
    {
        return Ok(());
    }
    Err(diff(expected, &actual_lines, same))
}

/// A line diff of expected against actual replies: `-` only expected, `+`
/// only actual, two spaces for lines both have. Replies are at most ten per
/// message, so a plain longest-common-subsequence table is cheap.
fn diff(expected: &[Expect], actual: &[Expect], same: impl Fn(&Expect, &Expect) -> bool) -> String {
    let (n, m) = (expected.len(), actual.len());
    // lcs[i][j]: common length of expected[i..] and actual[j..].
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if same(&expected[i], &actual[j]) {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = vec!["  (- expected, + actual)".to_owned()];
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && same(&expected[i], &actual[j]) {
            out.push(format!("    {}", render(&actual[j])));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("  - {}", render(&expected[i])));
            i += 1;
        } else {
            out.push(format!("  + {}", render(&actual[j])));
            j += 1;
        }
    }
    out.join("\n")
}

fn render(e: &Expect) -> String {
    match e {
        Expect::Silence(None) => "< (silence)".to_owned(),
        Expect::Silence(Some(r)) => format!("< (silence: {r})"),
        Expect::Reply(r) => {
            let mut s = format!("< {}", escape(&r.body));
            if !r.media.is_empty() {
                s.push_str(&format!(" [media: {}]", r.media.join(", ")));
            }
            s
        }
    }
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

fn parse(text: &str) -> Result<Script, (usize, String)> {
    let mut script = Script {
        from: "+15551230001".into(),
        to: "+15550001111".into(),
        interrupt: None,
        start: TRANSCRIPT_EPOCH,
        contact: BTreeMap::new(),
        vars: BTreeMap::new(),
        step: None,
        lines: Vec::new(),
    };
    let mut first_var = None;
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
                script.lines.push((lno, Line::Send { body, media }));
            }
            "<" => {
                in_headers = false;
                let e = match strip_comment(rest_text) {
                    "(silence)" => Expect::Silence(None),
                    s if s.starts_with("(silence:") && s.ends_with(')') => {
                        Expect::Silence(Some(s["(silence:".len()..s.len() - 1].trim().to_owned()))
                    }
                    _ => {
                        let (body, media) = split_media(rest_text);
                        Expect::Reply(Reply {
                            body: unescape(body).map_err(|e| (lno, e))?,
                            media,
                        })
                    }
                };
                script.lines.push((lno, Line::Expect(e)));
            }
            "@" => {
                in_headers = false;
                let cmd = strip_comment(rest_text).trim();
                let (verb, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
                let l = match verb {
                    "wait" => Line::Wait(
                        parse_duration(arg.trim())
                            .ok_or((lno, format!("bad duration `{arg}` (like 90s, 3h, 2d)")))?,
                    ),
                    "load" if !arg.trim().is_empty() => Line::Load(PathBuf::from(arg.trim())),
                    "reset" => Line::Reset,
                    _ => {
                        return Err((
                            lno,
                            format!(
                                "unknown `@ {cmd}` (use `@ wait 3h`, `@ load DIR` or `@ reset`)"
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
                            first_var.get_or_insert(lno);
                            (&mut script.vars, name)
                        } else {
                            return Err((
                                lno,
                                format!(
                                    "unknown header `{other}` (from, to, interrupt, now, step, contact.x, var.x)"
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
    if let (Some(lno), None) = (first_var, &script.step) {
        return Err((
            lno,
            "run variables live in a run: add a `step: flow/step` header to seed `var.` values"
                .into(),
        ));
    }
    // Every message needs its expected replies spelled out, even silence.
    let lines = &script.lines;
    for (i, (lno, l)) in lines.iter().enumerate() {
        if matches!(l, Line::Send { .. }) && !matches!(lines.get(i + 1), Some((_, Line::Expect(_))))
        {
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

    #[test]
    fn parses_every_line_kind() {
        let s = parse(
            "# c\nfrom: +1 # me\ninterrupt: MENU, RESTART\n> hi [media: https://x/a.jpg]\n< Hello\\nthere [media: https://x/b.jpg, https://x/c.jpg]\n< (silence)   # none\n@ wait 3h\n? step = (none)\n",
        )
        .unwrap();
        assert_eq!(s.from, "+1");
        assert_eq!(
            s.interrupt,
            Some(vec!["MENU".to_owned(), "RESTART".to_owned()])
        );
        assert_eq!(s.lines.len(), 5);
        match &s.lines[1].1 {
            Line::Expect(Expect::Reply(r)) => {
                assert_eq!(r.body, "Hello\nthere");
                assert_eq!(r.media.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.lines[3].1, Line::Wait(10800)));
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
    }

    #[test]
    fn diff_marks_only_the_differing_lines() {
        let r = |b: &str| {
            Expect::Reply(Reply {
                body: b.into(),
                media: vec![],
            })
        };
        let out = diff(&[r("a"), r("b")], &[r("a"), r("c")], |x, y| x == y);
        assert_eq!(out, "  (- expected, + actual)\n    < a\n  - < b\n  + < c");
    }

    #[test]
    fn rejects_unanswered_message() {
        assert!(parse("> hi\n> again\n< x\n").is_err());
        assert!(parse("> hi\n").is_err());
        assert!(parse("nonsense\n> hi\n< x").is_err());
    }

    #[test]
    fn escapes_round_trip() {
        let s = "a\nb\t\\ \u{7}";
        assert_eq!(unescape(&escape(s)).unwrap(), s);
        assert!(unescape("\\q").is_err());
    }
}
