//! Reading a reply's text: keyword normalisation, the route matchers, the
//! yes/no synonym lists and number extraction.
//!
//! Pure functions over strings and [`Matcher`] values. This module does not
//! know about steps, runs or flow files; the engine decides what a match
//! means.

use std::sync::OnceLock;

use regex::Regex;

use super::model::Matcher;

/// Punctuation we strip from the ends of every word.
///
/// ASCII punctuation and symbols (`!`, `$`, `+`, `~`, …) plus every
/// non-ASCII character of Unicode's punctuation categories: the marks phones
/// insert (curly quotes, `¿`, `…`, dashes), full-width and CJK forms (`，`,
/// `。`, `「」`), `‼`. Emoji and other symbols are deliberately *not*
/// punctuation: "👍" is a meaningful answer.
pub(crate) fn is_punct(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_punctuation();
    }
    static PUNCT: OnceLock<Option<Regex>> = OnceLock::new();
    let Some(punct) = PUNCT.get_or_init(|| Regex::new(r"\A\p{P}\z").ok()) else {
        return false;
    };
    let mut buf = [0u8; 4];
    punct.is_match(c.encode_utf8(&mut buf))
}

/// Control characters behave like whitespace: nobody types them on purpose,
/// and a stray NUL or zero-width mark must not stop "HOURS" from matching.
/// (The zero-width *joiner* is not one: it holds emoji sequences together.)
fn is_space(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '\u{200b}' | '\u{2060}' | '\u{feff}')
}

/// The one normal form smsflow compares text in: keywords, trigger
/// keywords, `any_of`/`exact` answers, consent and interrupt keywords, and
/// the Rhai helper `normalize()` all use this function, so a script and a
/// keyword never disagree on a message.
///
/// The text is split into words at whitespace (Unicode, NBSP included)
/// and control characters; punctuation is trimmed from both ends of every
/// word, words left empty are dropped, and the rest are lowercased
/// (Unicode, final sigma included) and joined with one space:
/// `"  Yes,  PLEASE!! "` -> `"yes please"`, `"Paris，"` -> `"paris"`.
/// Punctuation inside a word stays (`don't`, `1.5`, `e-mail`). There is no
/// Unicode normalisation: `é` and `e` + a combining accent stay different.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text
        .split(is_space)
        .map(|w| w.trim_matches(is_punct))
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.is_ascii() {
            // The common case, without a String per word: ASCII has no
            // lowercase that differs from `to_lowercase`'s.
            let start = out.len();
            out.push_str(word);
            out[start..].make_ascii_lowercase();
        } else {
            out.push_str(&word.to_lowercase());
        }
    }
    out
}

/// The words of an already normalised text, each with punctuation trimmed
/// from its ends ("skip, later" -> ["skip", "later"]).
pub(crate) fn words(normalized: &str) -> Vec<&str> {
    normalized
        .split(' ')
        .map(|w| w.trim_matches(is_punct))
        .filter(|w| !w.is_empty())
        .collect()
}

/// True when `phrase` (a list of normalised words) occurs as consecutive
/// whole words in `words`.
pub(crate) fn contains_phrase(words: &[&str], phrase: &[String]) -> bool {
    if phrase.is_empty() || phrase.len() > words.len() {
        return false;
    }
    words
        .windows(phrase.len())
        .any(|w| w.iter().zip(phrase).all(|(a, b)| *a == b.as_str()))
}

/// True when the message's first words are exactly `phrase`.
pub(crate) fn starts_with_phrase(words: &[&str], phrase: &[String]) -> bool {
    !phrase.is_empty()
        && phrase.len() <= words.len()
        && words.iter().zip(phrase).all(|(a, b)| *a == b.as_str())
}

/// Split a keyword or phrase into normalised words.
pub(crate) fn phrase_words(text: &str) -> Vec<String> {
    let n = normalize(text);
    words(&n).into_iter().map(str::to_owned).collect()
}

const YES: &[&str] = &[
    "yes",
    "y",
    "yeah",
    "yea",
    "yep",
    "yup",
    "ya",
    "yes please",
    "sure",
    "ok",
    "okay",
    "k",
    "correct",
    "confirm",
    "confirmed",
    "affirmative",
    "absolutely",
    "definitely",
    "of course",
    "sounds good",
    "si",
    "sí",
    "oui",
    "ja",
    "👍",
    "✅",
    "✔",
];

const NO: &[&str] = &[
    "no",
    "n",
    "nope",
    "nah",
    "na",
    "negative",
    "not now",
    "no thanks",
    "no thank you",
    "not really",
    "never",
    "non",
    "nein",
    "👎",
    "❌",
];

/// Emoji skin-tone modifiers and the emoji variation selector: "👍🏽" and
/// "👍️" are still a thumbs-up.
fn strip_emoji_modifiers(word: &str) -> String {
    word.chars()
        .filter(|c| !matches!(c, '\u{1f3fb}'..='\u{1f3ff}' | '\u{fe0f}'))
        .collect()
}

fn synonym_match(text: &str, list: &[&str]) -> bool {
    let n = normalize(text);
    let ws: Vec<String> = words(&n).into_iter().map(strip_emoji_modifiers).collect();
    let ws: Vec<&str> = ws
        .iter()
        .map(String::as_str)
        .filter(|w| !w.is_empty())
        .collect();
    list.iter().any(|syn| {
        let syn_words: Vec<String> = syn.split(' ').map(str::to_owned).collect();
        starts_with_phrase(&ws, &syn_words)
    })
}

/// "yes", "Yep!", "sure thing", "👍": the message starts with a yes synonym.
pub fn is_yes(text: &str) -> bool {
    synonym_match(text, YES) && !synonym_match(text, NO)
}

/// "no", "Nope.", "not now": the message starts with a no synonym.
pub fn is_no(text: &str) -> bool {
    synonym_match(text, NO)
}

/// The first number written in `text` ("I'm 34" -> 34): an optional minus
/// directly before the digits, digits, and an optional `.` fraction.
/// Returns the value and its text as written (without a trailing dot).
pub fn first_number(text: &str) -> Option<(f64, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let negative =
                i > 0 && chars[i - 1] == '-' && (i == 1 || !chars[i - 2].is_alphanumeric());
            let mut s = String::new();
            if negative {
                s.push('-');
            }
            while i < chars.len() && chars[i].is_ascii_digit() {
                s.push(chars[i]);
                i += 1;
            }
            if i + 1 < chars.len() && chars[i] == '.' && chars[i + 1].is_ascii_digit() {
                s.push('.');
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    s.push(chars[i]);
                    i += 1;
                }
            }
            // Very long digit runs parse to inf or lose precision; they are
            // still "a number", and range checks below treat inf correctly.
            return s.parse::<f64>().ok().map(|v| (v, s));
        }
        i += 1;
    }
    None
}

/// What a route matcher found in a message.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct RouteMatch {
    /// The value `save:` and `contact:` store.
    pub value: String,
    /// Numbered regex captures (`{{match.0}}` is the whole match).
    pub captures: Vec<String>,
    /// Named regex captures, saved as run variables.
    pub named: Vec<(String, String)>,
}

/// Does `matcher` accept this message? `has_media` lets `anything` accept a
/// picture with no text.
pub(crate) fn route_match(matcher: &Matcher, body: &str, has_media: bool) -> Option<RouteMatch> {
    let trimmed = body.trim();
    let plain = |ok: bool| {
        ok.then(|| RouteMatch {
            value: trimmed.to_owned(),
            ..RouteMatch::default()
        })
    };
    match matcher {
        Matcher::AnyOf(phrases) => {
            let n = normalize(body);
            let ws = words(&n);
            plain(phrases.iter().any(|p| contains_phrase(&ws, p)))
        }
        Matcher::Exact(list) => {
            let n = normalize(body);
            plain(list.contains(&n))
        }
        Matcher::Contains(needle) => plain(body.to_lowercase().contains(needle.as_str())),
        Matcher::StartsWith(prefix) => plain(
            body.trim_start()
                .to_lowercase()
                .starts_with(prefix.as_str()),
        ),
        Matcher::Regex(re) => {
            let caps = re.captures(body)?;
            let captures: Vec<String> = caps
                .iter()
                .map(|m| m.map(|m| m.as_str().to_owned()).unwrap_or_default())
                .collect();
            let named = re
                .capture_names()
                .flatten()
                .filter_map(|name| {
                    caps.name(name)
                        .map(|m| (name.to_owned(), m.as_str().to_owned()))
                })
                .collect();
            Some(RouteMatch {
                value: captures.first().cloned().unwrap_or_default(),
                captures,
                named,
            })
        }
        Matcher::Number { min, max, integer } => {
            let (v, text) = first_number(body)?;
            let ok = min.is_none_or(|m| v >= m)
                && max.is_none_or(|m| v <= m)
                && (!integer || v.fract() == 0.0);
            ok.then(|| RouteMatch {
                value: text,
                ..RouteMatch::default()
            })
        }
        Matcher::Yes => is_yes(body).then(|| RouteMatch {
            value: "yes".to_owned(),
            ..RouteMatch::default()
        }),
        Matcher::No => is_no(body).then(|| RouteMatch {
            value: "no".to_owned(),
            ..RouteMatch::default()
        }),
        Matcher::Anything => plain(!normalize(body).is_empty() || has_media),
        Matcher::Else => plain(true),
        // Rhai conditions need the sandbox; the engine evaluates them.
        Matcher::When(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The ASCII path lowercases exactly as `to_lowercase` does, and
        /// mixed text (final sigma included) is unchanged by it.
        #[test]
        fn normalize_lowercases_every_word_as_to_lowercase_does(
            text in "([A-Za-z0-9 ,.!?'\\-]|[ÀÉÎÕÜßΣσςİ👍\u{00a0}\u{200b}])*"
        ) {
            let want = text
                .split(is_space)
                .map(|w| w.trim_matches(is_punct))
                .filter(|w| !w.is_empty())
                .map(str::to_lowercase)
                .collect::<Vec<_>>()
                .join(" ");
            proptest::prop_assert_eq!(normalize(&text), want);
        }
    }

    #[test]
    fn normalize_trims_and_collapses() {
        assert_eq!(normalize("  Hours?! "), "hours");
        assert_eq!(normalize("OPENING \t  hours"), "opening hours");
        assert_eq!(normalize("¿Qué?"), "qué");
        assert_eq!(normalize("\u{0}HOURS\u{7}"), "hours");
        assert_eq!(normalize("!!!"), "");
        assert_eq!(normalize("👍"), "👍");
    }

    #[test]
    fn yes_and_no() {
        for y in [
            "yes",
            "Y",
            "Yep!",
            "sure thing",
            "ok",
            "👍🏽",
            "Sí",
            "of course!",
        ] {
            assert!(is_yes(y), "{y}");
            assert!(!is_no(y), "{y}");
        }
        for n in ["no", "Nope.", "not now", "nah thanks", "👎"] {
            assert!(is_no(n), "{n}");
            assert!(!is_yes(n), "{n}");
        }
        assert!(!is_yes("yesterday"));
        assert!(!is_no("nothing"));
        assert!(!is_yes(""));
    }

    #[test]
    fn numbers() {
        assert_eq!(first_number("I'm 34"), Some((34.0, "34".into())));
        assert_eq!(first_number("-3 degrees"), Some((-3.0, "-3".into())));
        assert_eq!(first_number("x-3"), Some((3.0, "3".into())));
        assert_eq!(first_number("1.5."), Some((1.5, "1.5".into())));
        assert_eq!(first_number("12."), Some((12.0, "12".into())));
        assert_eq!(first_number("none"), None);
        assert!(first_number(&"9".repeat(500)).is_some());
    }

    #[test]
    fn phrases() {
        let n = normalize("Skip, later please");
        let ws = words(&n);
        assert!(contains_phrase(&ws, &phrase_words("later")));
        assert!(contains_phrase(&ws, &phrase_words("LATER PLEASE")));
        assert!(!contains_phrase(&ws, &phrase_words("late")));
        assert!(starts_with_phrase(&ws, &phrase_words("skip")));
    }
}
