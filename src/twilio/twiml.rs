//! Rendering of the TwiML document smsflow answers a webhook with.
//!
//! The output is compact (`<?xml …?>` immediately followed by `<Response>`,
//! no newlines), and always well-formed whatever the text: user-supplied
//! strings are escaped and characters XML 1.0 cannot carry are removed.
//! Twilio's limits ([`super::limits`]) are enforced here so that a flow
//! cannot produce a reply Twilio rejects: bodies over 1600 characters are
//! split, and there are at most 10 `<Message>` verbs and 10 `<Media>` per
//! message.
//!
//! The escaping is hand-written rather than quick-xml's `escape` because the
//! rules differ from it on purpose: a CR must become `&#xD;` (a parser would
//! otherwise normalise it to LF) and so must LF/TAB in attributes, while
//! quotes in text need no escaping. quick-xml parses the output back:
//! [`messages_in`] for the author tools, and the tests.
//!
//! This module does not decide what to say, nor the HTTP side of the reply
//! (status, `Content-Type: text/xml`).

use std::borrow::Cow;
use std::fmt::Write as _;

use super::limits::{MAX_BODY_CHARS, MAX_MEDIA, MAX_MESSAGES};

const DECLARATION: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// The reply that sends nothing back. Twilio wants a 200 with an empty
/// `<Response>`; an empty HTTP body is logged as error 11200.
pub const SILENCE: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>";

/// One reply message. `None` attributes are left out, so Twilio applies its
/// defaults (reply to the sender, from the number that received).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutMessage {
    /// The message text (escaped when rendered).
    pub body: String,
    /// Media URLs, sent as `<Media>` nouns.
    pub media: Vec<String>,
    /// The `to` attribute: the recipient, when not the sender.
    pub to: Option<String>,
    /// The `from` attribute: the sending number, when not ours that received.
    pub from: Option<String>,
    /// The `action` attribute: a URL Twilio calls after sending.
    pub action: Option<String>,
    /// The `method` attribute: the HTTP method for `action`.
    pub method: Option<String>,
    /// The `statusCallback` attribute: where Twilio posts delivery statuses.
    pub status_callback: Option<String>,
}

impl OutMessage {
    /// A plain text reply to the sender.
    pub fn text(body: impl Into<String>) -> Self {
        OutMessage {
            body: body.into(),
            ..OutMessage::default()
        }
    }
}

/// A TwiML messaging verb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    /// A `<Message>`: one reply.
    Message(OutMessage),
    /// Hands the conversation to another TwiML URL. Verbs after it are
    /// unreachable for Twilio, but are rendered as given.
    Redirect {
        /// The TwiML URL to hand over to.
        url: String,
        /// The HTTP method for it, if not Twilio's default.
        method: Option<String>,
    },
}

/// Renders reply messages; see [`render_verbs`] for the limits applied.
pub fn render(messages: &[OutMessage]) -> String {
    render_counted(messages).0
}

/// [`render`], and how many `<Message>` verbs the document holds (split
/// parts counted, dropped ones not).
pub fn render_counted(messages: &[OutMessage]) -> (String, usize) {
    render_refs(messages.iter().map(VerbRef::Message))
}

/// Renders a complete TwiML document.
///
/// Limits, applied silently because the flow author cannot do anything
/// useful at reply time and a partial reply beats a rejected one:
/// - characters illegal in XML 1.0 are removed from all text and attributes;
/// - a body longer than [`MAX_BODY_CHARS`] is split with [`split_body`] into
///   several `<Message>`s with the same attributes, media on the first only;
/// - a message with neither body nor media is omitted;
/// - media beyond [`MAX_MEDIA`] per message are dropped;
/// - `<Message>`s beyond [`MAX_MESSAGES`] in the whole document, split parts
///   included, are dropped (a `<Redirect>` is never dropped).
///
/// An empty result is exactly [`SILENCE`].
pub fn render_verbs(verbs: &[Verb]) -> String {
    render_refs(verbs.iter().map(|verb| match verb {
        Verb::Message(msg) => VerbRef::Message(msg),
        Verb::Redirect { url, method } => VerbRef::Redirect {
            url,
            method: method.as_deref(),
        },
    }))
    .0
}

/// A [`Verb`] borrowed, so that rendering replies copies none of them.
enum VerbRef<'a> {
    Message(&'a OutMessage),
    Redirect {
        url: &'a str,
        method: Option<&'a str>,
    },
}

fn render_refs<'a>(verbs: impl Iterator<Item = VerbRef<'a>>) -> (String, usize) {
    let mut out = String::with_capacity(256);
    out.push_str(DECLARATION);
    out.push_str("<Response>");
    let empty = out.len();
    let mut messages = 0;
    for verb in verbs {
        match verb {
            VerbRef::Message(msg) => {
                let body = clean(&msg.body);
                let media: Vec<Cow<'_, str>> = msg
                    .media
                    .iter()
                    .map(|url| clean(url))
                    .filter(|url| !url.is_empty())
                    .take(MAX_MEDIA)
                    .collect();
                let mut parts = split_parts(&body, MAX_BODY_CHARS);
                if parts.is_empty() {
                    if media.is_empty() {
                        continue;
                    }
                    // Media-only message: Body is optional with media.
                    parts.push("");
                }
                for (i, part) in parts.iter().enumerate() {
                    if messages == MAX_MESSAGES {
                        break;
                    }
                    messages += 1;
                    out.push_str("<Message");
                    let attrs = [
                        ("to", &msg.to),
                        ("from", &msg.from),
                        ("action", &msg.action),
                        ("method", &msg.method),
                        ("statusCallback", &msg.status_callback),
                    ];
                    for (name, value) in attrs {
                        if let Some(value) = value {
                            push_attr(&mut out, name, value);
                        }
                    }
                    out.push('>');
                    if !part.is_empty() {
                        out.push_str("<Body>");
                        push_text(&mut out, part);
                        out.push_str("</Body>");
                    }
                    if i == 0 {
                        for url in &media {
                            out.push_str("<Media>");
                            push_text(&mut out, url);
                            out.push_str("</Media>");
                        }
                    }
                    out.push_str("</Message>");
                }
            }
            VerbRef::Redirect { url, method } => {
                out.push_str("<Redirect");
                if let Some(method) = method {
                    push_attr(&mut out, "method", method);
                }
                out.push('>');
                push_text(&mut out, url);
                out.push_str("</Redirect>");
            }
        }
    }
    if out.len() == empty {
        return (SILENCE.to_owned(), 0);
    }
    out.push_str("</Response>");
    (out, messages)
}

/// Reads back the messages of a TwiML document that [`render_verbs`]
/// produced: the body and media of each `<Message>`, in order (attributes
/// are not read). For tools that show exactly what a phone would receive
/// (`smsflow chat` and `test`), after every limit above was applied.
pub fn messages_in(twiml: &str) -> Result<Vec<OutMessage>, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(twiml);
    let mut out: Vec<OutMessage> = Vec::new();
    // The element whose text is being read: `Body` or `Media`.
    let mut inside: Option<Vec<u8>> = None;
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            Event::Start(e) => match e.name().as_ref() {
                b"Message" => out.push(OutMessage::default()),
                b"Media" => {
                    if let Some(m) = out.last_mut() {
                        m.media.push(String::new());
                    }
                    inside = Some(b"Media".to_vec());
                }
                name => inside = Some(name.to_vec()),
            },
            Event::Empty(e) if e.name().as_ref() == b"Message" => out.push(OutMessage::default()),
            Event::End(_) => inside = None,
            Event::Text(t) => {
                let text = t.unescape().map_err(|e| e.to_string())?;
                match (inside.as_deref(), out.last_mut()) {
                    (Some(b"Body"), Some(m)) => m.body.push_str(&text),
                    (Some(b"Media"), Some(m)) => {
                        if let Some(url) = m.media.last_mut() {
                            url.push_str(&text);
                        }
                    }
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

/// Splits `text` into parts of at most `max_chars` characters (`char`s),
/// preferring word boundaries.
///
/// Each cut is made at the last whitespace character among the first
/// `max_chars + 1` characters (so a word that exactly fills a part stays
/// whole), and that one whitespace character is dropped. When there is none,
/// the cut is a hard split after exactly `max_chars` characters. So the
/// original is always `part₀ sep₀ part₁ sep₁ … partₙ [sepₙ]`, where each
/// separator is one whitespace character, or nothing after a hard split.
/// Parts are never empty; an empty text gives no parts. A `max_chars` of 0
/// is treated as 1.
pub fn split_body(text: &str, max_chars: usize) -> Vec<String> {
    split_parts(text, max_chars)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// [`split_body`], borrowing the parts.
fn split_parts(text: &str, max_chars: usize) -> Vec<&str> {
    let max = max_chars.max(1);
    let mut parts = Vec::new();
    let mut rest = text;
    // `limit` is the byte offset of the first character that does not fit.
    while let Some((limit, next)) = rest.char_indices().nth(max) {
        let window = &rest[..limit + next.len_utf8()];
        // Index 0 is excluded: cutting there would produce an empty part.
        let cut = window
            .char_indices()
            .rev()
            .find(|&(i, c)| i > 0 && c.is_whitespace());
        match cut {
            Some((i, space)) => {
                parts.push(&rest[..i]);
                rest = &rest[i + space.len_utf8()..];
            }
            None => {
                parts.push(&rest[..limit]);
                rest = &rest[limit..];
            }
        }
    }
    if !rest.is_empty() {
        parts.push(rest);
    }
    parts
}

/// Whether XML 1.0 can carry `c` at all (the `Char` production). Rust
/// strings have no surrogates, so only C0 controls and U+FFFE/U+FFFF fail.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

/// `s` without the characters XML cannot carry; borrowed when it has none.
fn clean(s: &str) -> Cow<'_, str> {
    if s.chars().all(is_xml_char) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.chars().filter(|&c| is_xml_char(c)).collect())
    }
}

/// `s` as XML text: `&`, `<`, `>` and `\r` escaped, the characters XML
/// cannot carry left out, and the runs between copied whole.
fn push_text(out: &mut String, s: &str) {
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        let instead = match c {
            '&' => "&amp;",
            '<' => "&lt;",
            '>' => "&gt;",
            '\r' => "&#xD;",
            c if is_xml_char(c) => continue,
            _ => "",
        };
        out.push_str(&s[plain..i]);
        out.push_str(instead);
        plain = i + c.len_utf8();
    }
    out.push_str(&s[plain..]);
}

fn push_attr(out: &mut String, name: &str, value: &str) {
    // `write!` to a String cannot fail; the result is ignored on purpose.
    let _ = write!(out, " {name}=\"");
    for c in value.chars().filter(|&c| is_xml_char(c)) {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\r' => out.push_str("&#xD;"),
            // Attribute-value normalisation would turn these into spaces.
            '\n' => out.push_str("&#xA;"),
            '\t' => out.push_str("&#x9;"),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::events::Event;
    use quick_xml::Reader;

    const DECL: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

    /// What a parser sees: per `<Message>`, its attributes, body and media.
    #[derive(Debug, Default, PartialEq)]
    struct Parsed {
        attrs: Vec<(String, String)>,
        body: String,
        media: Vec<String>,
    }

    fn parse(xml: &str) -> Vec<Parsed> {
        assert!(xml.starts_with(DECL), "{xml}");
        let mut reader = Reader::from_str(xml);
        let mut out: Vec<Parsed> = Vec::new();
        let mut stack: Vec<String> = Vec::new();
        loop {
            match reader.read_event().expect("well-formed") {
                Event::Start(e) => {
                    let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                    if name == "Message" {
                        let attrs = e
                            .attributes()
                            .map(|a| {
                                let a = a.unwrap();
                                (
                                    String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                                    a.unescape_value().unwrap().into_owned(),
                                )
                            })
                            .collect();
                        out.push(Parsed {
                            attrs,
                            ..Parsed::default()
                        });
                    }
                    if name == "Media" {
                        out.last_mut().unwrap().media.push(String::new());
                    }
                    stack.push(name);
                }
                Event::End(_) => {
                    stack.pop();
                }
                Event::Text(t) => {
                    let text = t.unescape().unwrap();
                    let msg = out.last_mut();
                    match (stack.last().map(String::as_str), msg) {
                        (Some("Body"), Some(msg)) => msg.body.push_str(&text),
                        (Some("Media"), Some(msg)) => msg.media.last_mut().unwrap().push_str(&text),
                        (ctx, _) => panic!("unexpected text {text:?} in {ctx:?}"),
                    }
                }
                Event::Eof => break,
                Event::Decl(_) | Event::Empty(_) => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
        out
    }

    #[test]
    fn silence() {
        assert_eq!(
            SILENCE,
            r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#
        );
        assert_eq!(render(&[]), SILENCE);
        assert_eq!(render_verbs(&[]), SILENCE);
        // Nothing to say is silence too.
        assert_eq!(render(&[OutMessage::text("")]), SILENCE);
        assert_eq!(render(&[OutMessage::text("\u{0}\u{1b}")]), SILENCE);
    }

    #[test]
    fn one_message() {
        assert_eq!(
            render(&[OutMessage::text("Welcome!")]),
            format!("{DECL}<Response><Message><Body>Welcome!</Body></Message></Response>")
        );
    }

    #[test]
    fn message_with_media() {
        let msg = OutMessage {
            body: "Here".into(),
            media: vec![
                "https://example.com/a.jpg".into(),
                "https://e.com/b?x=1&y=2".into(),
            ],
            ..OutMessage::default()
        };
        assert_eq!(
            render(&[msg]),
            format!(
                "{DECL}<Response><Message><Body>Here</Body>\
                 <Media>https://example.com/a.jpg</Media>\
                 <Media>https://e.com/b?x=1&amp;y=2</Media></Message></Response>"
            )
        );
    }

    #[test]
    fn media_only_message_has_no_body() {
        let msg = OutMessage {
            media: vec!["https://twilio.com".into()],
            ..OutMessage::default()
        };
        assert_eq!(
            render(&[msg]),
            format!(
                "{DECL}<Response><Message><Media>https://twilio.com</Media></Message></Response>"
            )
        );
    }

    #[test]
    fn attributes_in_fixed_order_and_escaped() {
        let msg = OutMessage {
            body: "hi".into(),
            to: Some("+15551230000".into()),
            from: Some("Acme".into()),
            action: Some(r#"https://x.com/a?b=1&c="2""#.into()),
            method: Some("POST".into()),
            status_callback: Some("https://x.com/s\n\t\r<>".into()),
            media: vec![],
        };
        let xml = render(&[msg]);
        assert_eq!(
            xml,
            format!(
                "{DECL}<Response><Message to=\"+15551230000\" from=\"Acme\" \
                 action=\"https://x.com/a?b=1&amp;c=&quot;2&quot;\" method=\"POST\" \
                 statusCallback=\"https://x.com/s&#xA;&#x9;&#xD;&lt;&gt;\">\
                 <Body>hi</Body></Message></Response>"
            )
        );
        let parsed = parse(&xml);
        assert_eq!(parsed[0].attrs[2].1, r#"https://x.com/a?b=1&c="2""#);
        assert_eq!(parsed[0].attrs[4].1, "https://x.com/s\n\t\r<>");
    }

    #[test]
    fn markup_in_user_text_is_escaped() {
        let xml = render(&[OutMessage::text(
            r#"</Body></Message><Message>pwned</Message> & "q" 'a'"#,
        )]);
        assert_eq!(
            xml,
            format!(
                "{DECL}<Response><Message><Body>&lt;/Body&gt;&lt;/Message&gt;&lt;Message&gt;pwned\
                 &lt;/Message&gt; &amp; \"q\" 'a'</Body></Message></Response>"
            )
        );
        assert_eq!(parse(&xml).len(), 1);
    }

    #[test]
    fn control_characters_removed_whitespace_kept() {
        let xml = render(&[OutMessage::text(
            "a\u{0}b\u{8}c\u{1f}d\u{fffe}\u{ffff}e\tf\ng\rh\u{7f}é😀",
        )]);
        assert_eq!(
            xml,
            format!(
                "{DECL}<Response><Message><Body>abcde\tf\ng&#xD;h\u{7f}é😀</Body></Message></Response>"
            )
        );
        assert_eq!(parse(&xml)[0].body, "abcde\tf\ng\rh\u{7f}é😀");
    }

    #[test]
    fn redirect() {
        let xml = render_verbs(&[
            Verb::Message(OutMessage::text("bye")),
            Verb::Redirect {
                url: "https://example.com/next?a=1&b=2".into(),
                method: Some("GET".into()),
            },
            Verb::Redirect {
                url: "/relative".into(),
                method: None,
            },
        ]);
        assert_eq!(
            xml,
            format!(
                "{DECL}<Response><Message><Body>bye</Body></Message>\
                 <Redirect method=\"GET\">https://example.com/next?a=1&amp;b=2</Redirect>\
                 <Redirect>/relative</Redirect></Response>"
            )
        );
    }

    #[test]
    fn long_body_splits_into_messages_with_same_attributes() {
        // 1601 characters of words: "word " * 320 = 1600, plus "x".
        let text = format!("{}x", "word ".repeat(320));
        assert_eq!(text.chars().count(), 1601);
        let msg = OutMessage {
            body: text.clone(),
            to: Some("+1555".into()),
            media: vec!["https://m/1".into()],
            ..OutMessage::default()
        };
        let parsed = parse(&render(&[msg]));
        assert_eq!(parsed.len(), 2);
        for p in &parsed {
            assert!(p.body.chars().count() <= MAX_BODY_CHARS);
            assert_eq!(p.attrs, vec![("to".to_owned(), "+1555".to_owned())]);
        }
        assert_eq!(parsed[0].media, vec!["https://m/1".to_owned()]);
        assert!(parsed[1].media.is_empty());
        // Words survive: the cut is at a space, which is dropped.
        assert_eq!(parsed[0].body, format!("{}word", "word ".repeat(319)));
        assert_eq!(parsed[1].body, "x");
        let words: Vec<&str> = text.split_whitespace().collect();
        let rejoined: Vec<String> = parsed.iter().map(|p| p.body.clone()).collect();
        assert_eq!(
            rejoined.join(" ").split_whitespace().collect::<Vec<_>>(),
            words
        );
    }

    #[test]
    fn exactly_the_limit_is_one_message() {
        let text = "a".repeat(MAX_BODY_CHARS);
        assert_eq!(parse(&render(&[OutMessage::text(text)])).len(), 1);
        // Counted in chars, not bytes.
        let text = "é".repeat(MAX_BODY_CHARS);
        assert_eq!(parse(&render(&[OutMessage::text(text)])).len(), 1);
    }

    #[test]
    fn at_most_ten_messages() {
        let msgs: Vec<OutMessage> = (0..11).map(|i| OutMessage::text(format!("m{i}"))).collect();
        let parsed = parse(&render(&msgs));
        assert_eq!(parsed.len(), 10);
        assert_eq!(parsed[9].body, "m9");
        // Split parts count too.
        let huge = OutMessage::text("a".repeat(MAX_BODY_CHARS * 12));
        assert_eq!(parse(&render(&[huge])).len(), 10);
    }

    #[test]
    fn at_most_ten_media() {
        let msg = OutMessage {
            body: "pics".into(),
            media: (0..12).map(|i| format!("https://m/{i}")).collect(),
            ..OutMessage::default()
        };
        let parsed = parse(&render(&[msg]));
        assert_eq!(parsed[0].media.len(), 10);
        assert_eq!(parsed[0].media[9], "https://m/9");
    }

    #[test]
    fn split_body_cases() {
        assert_eq!(split_body("", 5), Vec::<String>::new());
        assert_eq!(split_body("hello", 5), vec!["hello"]);
        assert_eq!(split_body("hello world", 5), vec!["hello", "world"]);
        assert_eq!(split_body("hi there you", 8), vec!["hi there", "you"]);
        assert_eq!(split_body("hi there you", 7), vec!["hi", "there", "you"]);
        assert_eq!(split_body("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        assert_eq!(split_body("ab abcdefgh", 4), vec!["ab", "abcd", "efgh"]);
        assert_eq!(split_body("  abcdef", 4), vec![" ", "abcd", "ef"]);
        assert_eq!(split_body("aaaa ", 4), vec!["aaaa"]);
        assert_eq!(split_body("ééé éé", 3), vec!["ééé", "éé"]);
        assert_eq!(split_body("abc", 0), vec!["a", "b", "c"]);
    }

    /// Checks the documented shape: parts in order, each separated by one
    /// whitespace character or by nothing after a full-length hard split that
    /// had no whitespace to cut at.
    fn assert_split_invariant(original: &str, parts: &[String], max: usize) {
        let mut rest = original;
        for part in parts {
            assert!(!part.is_empty());
            assert!(part.chars().count() <= max, "{part:?} longer than {max}");
            rest = rest
                .strip_prefix(part.as_str())
                .unwrap_or_else(|| panic!("{part:?} is not next in {rest:?}"));
            match rest.chars().next() {
                Some(c) if c.is_whitespace() => rest = &rest[c.len_utf8()..],
                Some(_) => {
                    assert_eq!(part.chars().count(), max, "short hard split {part:?}");
                    assert!(
                        !part.chars().skip(1).any(char::is_whitespace),
                        "hard split {part:?} had a word boundary"
                    );
                }
                None => {}
            }
        }
        assert!(rest.is_empty(), "left over {rest:?}");
    }

    fn expected_clean(s: &str) -> String {
        // Independent of `is_xml_char`: the XML 1.0 Char production spelled out.
        s.chars()
            .filter(|&c| {
                let n = u32::from(c);
                n == 0x9
                    || n == 0xA
                    || n == 0xD
                    || (0x20..=0xD7FF).contains(&n)
                    || (0xE000..=0xFFFD).contains(&n)
                    || (0x10000..=0x10FFFF).contains(&n)
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn split_body_invariant(text in "(\\PC|[ \t\n]){0,60}", max in 0usize..12) {
            let parts = split_body(&text, max);
            assert_split_invariant(&text, &parts, max.max(1));
        }

        #[test]
        fn short_text_round_trips(s in "\\PC*|.*|[\u{0}-\u{7f}]*") {
            let xml = render(&[OutMessage::text(s.clone())]);
            let want = expected_clean(&s);
            let parsed = parse(&xml);
            if want.is_empty() {
                proptest::prop_assert_eq!(xml, SILENCE);
            } else {
                proptest::prop_assert_eq!(parsed.len(), 1);
                proptest::prop_assert_eq!(&parsed[0].body, &want);
            }
        }

        #[test]
        fn attributes_round_trip(s in ".*") {
            let msg = OutMessage { body: "x".into(), to: Some(s.clone()), ..OutMessage::default() };
            let parsed = parse(&render(&[msg]));
            proptest::prop_assert_eq!(&parsed[0].attrs, &vec![("to".to_owned(), expected_clean(&s))]);
        }
    }

    proptest::proptest! {
        // Long documents are slow to generate and parse in a debug build;
        // a few dozen cases still cross the 1600 and 10-message limits.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        #[test]
        fn long_text_round_trips(
            words in proptest::collection::vec("[a-z]{1,40}|[ \n]|[\u{0}-\u{1f}]|\\PC{1,5}", 0..2500)
        ) {
            let s: String = words.concat();
            let want = expected_clean(&s);
            let (xml, count) = render_counted(&[OutMessage::text(s.clone()), OutMessage::text(s)]);
            let parsed = parse(&xml);
            // The count is what the document holds, split parts included.
            proptest::prop_assert_eq!(count, parsed.len());
            let bodies: Vec<String> = parsed.into_iter().map(|p| p.body).collect();
            // The second message follows the first's parts, up to the limit.
            let bodies: Vec<String> = bodies
                .into_iter()
                .take(split_body(&want, MAX_BODY_CHARS).len().min(MAX_MESSAGES))
                .collect();
            let mut expected = split_body(&want, MAX_BODY_CHARS);
            expected.truncate(MAX_MESSAGES);
            proptest::prop_assert_eq!(&bodies, &expected);
            if bodies.len() < MAX_MESSAGES {
                assert_split_invariant(&want, &bodies, MAX_BODY_CHARS);
            }
        }
    }

    #[test]
    fn messages_read_back_what_was_rendered() {
        let long = format!("{} {}", "a".repeat(MAX_BODY_CHARS), "tail & <end>");
        let twiml = render(&[
            OutMessage {
                media: vec!["https://x/a.jpg?a=1&b=2".into()],
                action: Some("https://cb/?x=1&y=2".into()),
                ..OutMessage::text("Fish & \"chips\" \r\n<3")
            },
            OutMessage::text(""),
            OutMessage::text(long.clone()),
        ]);
        let back = messages_in(&twiml).unwrap();
        let got: Vec<(&str, &[String])> = back
            .iter()
            .map(|m| (m.body.as_str(), m.media.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "Fish & \"chips\" \r\n<3",
                    &["https://x/a.jpg?a=1&b=2".to_owned()][..]
                ),
                (&long[..MAX_BODY_CHARS], &[][..]),
                ("tail & <end>", &[][..]),
            ]
        );
        assert!(messages_in(SILENCE).unwrap().is_empty());
    }
}
