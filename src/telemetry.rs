//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`, or `warn` for the author tools, whose output already
//! says what happened). Message bodies are logged only at `debug`; phone
//! numbers at `info` are shown or hashed as configured ([`PhoneLog`]).
//! Text by default; `--log-format json` writes one JSON object per line
//! (`telemetry/json.rs`).
//!
//! One event is one line, whatever the text in it. Anyone who can text the
//! number chooses a message's body, and scripts may echo it into their
//! errors, so every field value, the event's message included, is written
//! through `EscapedFields`: a newline, carriage return, ESC or any other
//! control character cannot start a forged log line or drive the terminal.
//! The rest of a line (time, level, target, span names) is our own text.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::EnvFilter;

mod json;
mod phones;

pub use phones::{PhoneLog, PhoneNumbers};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

impl LogFormat {
    /// Its name in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Install the global subscriber once; later calls are no-ops.
pub fn init() {
    init_with_default("info");
}

/// [`init`] with another default level when `RUST_LOG` is unset.
pub fn init_with_default(level: &str) {
    init_with(level, LogFormat::Text);
}

/// [`init_with_default`] in the given format.
pub fn init_with(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .fmt_fields(EscapedFields)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .fmt_fields(json::JsonFields)
            .event_format(json::JsonEvent)
            .try_init(),
    };
}

/// Formats an event's or a span's fields as tracing's default does (the
/// message bare, then `name=value` separated by spaces), with every value
/// escaped by [`escape_into`]. Used for all fields, `%Display` ones too, so
/// no call site has to remember which of its values came from a user.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_> {
    fn field(&mut self, field: &Field, value: &dyn fmt::Debug) -> fmt::Result {
        let name = field.name();
        // Metadata of records bridged from the `log` crate, shown elsewhere
        // on the line, as tracing's default formatter does.
        if name.starts_with("log.") {
            return Ok(());
        }
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        if name != "message" {
            write!(self.writer, "{}=", name.trim_start_matches("r#"))?;
        }
        write!(Escaping(&mut self.writer), "{value:?}")
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // The message as written; other strings quoted, as by default.
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = self.field(field, value);
        }
    }
}

/// A `fmt::Write` that passes text through [`escape_into`].
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s)
    }
}

/// Writes `s` with every character that could break a line or command a
/// terminal escaped: `\n`, `\r` and `\t` as such, the other controls (C0,
/// DEL, C1, ESC among them), the Unicode line and paragraph separators and
/// the bidirectional overrides as `\u{…}`. Everything else is copied.
pub(crate) fn escape_into(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    // Nearly every field (a MessageSid, a hashed number, a flow's name) is
    // printable ASCII: one pass over the bytes, no decoding.
    if s.bytes().all(|b| matches!(b, b' '..=b'~')) {
        return out.write_str(s);
    }
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        if !needs_escape(c) {
            continue;
        }
        out.write_str(&s[plain..i])?;
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c => write!(out, "\\u{{{:x}}}", c as u32)?,
        }
        plain = i + c.len_utf8();
    }
    out.write_str(&s[plain..])
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    /// A log writer that keeps what it is given (also for `json.rs`).
    #[derive(Clone, Default)]
    pub(super) struct Captured(pub(super) Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        escape_into(&mut out, s).unwrap();
        out
    }

    #[test]
    fn controls_are_escaped_and_the_rest_is_kept() {
        assert_eq!(escaped("plain é 日本 ✓"), "plain é 日本 ✓");
        assert_eq!(escaped("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(
            escaped("\x1b[31mred\x07\x7f"),
            "\\u{1b}[31mred\\u{7}\\u{7f}"
        );
        assert_eq!(escaped("\u{85}\u{9b}"), "\\u{85}\\u{9b}");
        assert_eq!(escaped("x\u{2028}y\u{202e}z"), "x\\u{2028}y\\u{202e}z");
    }

    proptest::proptest! {
        /// The printable-ASCII shortcut changes nothing: every string
        /// comes out as escaping it character by character does.
        #[test]
        fn escaping_is_per_character(s in "(?s).{0,40}|[ -~]{0,40}") {
            let mut expected = String::new();
            for c in s.chars() {
                match c {
                    '\n' => expected.push_str("\\n"),
                    '\r' => expected.push_str("\\r"),
                    '\t' => expected.push_str("\\t"),
                    c if needs_escape(c) => expected.push_str(&format!("\\u{{{:x}}}", c as u32)),
                    c => expected.push(c),
                }
            }
            proptest::prop_assert_eq!(escaped(&s), expected);
        }
    }

    #[test]
    fn no_field_can_start_a_line_of_its_own() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapedFields)
            .with_writer({
                let out = out.clone();
                move || out.clone()
            })
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let forged = "hi\n2030-01-01T00:00:00.000000Z  INFO smsflow: forged\r\x1b[2K";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("sms", message_sid = %forged);
            let _in = span.enter();
            tracing::info!("{forged}");
            tracing::warn!(body = %forged, "display field");
            tracing::error!(body = ?forged, "debug field");
            tracing::debug!(body = forged, "str field");
            tracing::info!(r#type = 1, ok = true, "plain fields");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        for line in &lines {
            assert!(line.starts_with("20"), "{line}");
            assert!(!line.contains(['\r', '\x1b']), "{line:?}");
            assert!(!line.contains("forged\r"), "{line:?}");
        }
        assert!(
            lines[0]
                .ends_with("hi\\n2030-01-01T00:00:00.000000Z  INFO smsflow: forged\\r\\u{1b}[2K"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("sms{message_sid=hi\\n2030"),
            "{}",
            lines[0]
        );
        assert!(lines[1].ends_with("display field body=hi\\n2030-01-01T00:00:00.000000Z  INFO smsflow: forged\\r\\u{1b}[2K"), "{}", lines[1]);
        assert!(lines[2].contains("body=\"hi\\n2030"), "{}", lines[2]);
        assert!(lines[3].contains("body=\"hi\\n2030"), "{}", lines[3]);
        assert!(
            lines[4].ends_with("plain fields type=1 ok=true"),
            "{}",
            lines[4]
        );
    }
}
