//! The helpers registered for scripts and expressions (see "Helpers" in
//! flows/README.md): `normalize`, `parse_number`, `matches`/`captures`
//! (bounded, cached regexes), `set_contact`, `wake_after`, `http` and
//! `url_encode` (in `http`), seeded `random_int` and
//! `random_choice`, `now()` and
//! the UTC calendar helpers. The engine's own `sleep` and clock are left
//! out or replaced here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use regex::{Regex, RegexBuilder};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Position, FLOAT, INT};
use sha2::{Digest, Sha256};

// The helper `normalize()` is the matcher's own normal form: a script and a
// keyword must never disagree on a message.
use crate::flow::matcher::normalize;

use super::limits::{
    MAX_PATTERN_LEN, MAX_WAKES, MAX_WAKE_NAME_BYTES, MAX_WAKE_SECS, REGEX_CACHE_CAPACITY,
    REGEX_SIZE_LIMIT, TIME_BUDGET_TOKEN,
};
use super::run::{run_over_budget, with_run};

/// Registers the helpers; returns the regex cache `matches` and
/// `captures` share, which the loader fills with the patterns written as
/// literals ([`RegexCache::get`]).
pub(super) fn register_helpers(engine: &mut Engine) -> Arc<RegexCache> {
    // The language core ships a blocking `sleep`, which the wall-clock check
    // cannot interrupt; shadow it (the engine's own functions win).
    engine.register_fn("sleep", |_: INT| -> Result<(), Box<EvalAltResult>> {
        Err(runtime("sleep is not available in flows"))
    });
    engine.register_fn("sleep", |_: FLOAT| -> Result<(), Box<EvalAltResult>> {
        Err(runtime("sleep is not available in flows"))
    });

    engine.register_fn(
        "set_contact",
        |key: &str, value: Dynamic| -> Result<(), Box<EvalAltResult>> { set_contact(key, value) },
    );

    engine.register_fn(
        "wake_after",
        |seconds: INT, name: &str| -> Result<(), Box<EvalAltResult>> { wake_after(seconds, name) },
    );

    engine.register_fn("http", super::http::http);
    engine.register_fn("url_encode", super::http::url_encode);

    engine.register_fn("normalize", |s: &str| normalize(s));

    let cache = Arc::new(RegexCache::default());
    let regexes = cache.clone();
    engine.register_fn(
        "matches",
        move |s: &str, pattern: &str| -> Result<bool, Box<EvalAltResult>> {
            Ok(regexes.get(pattern)?.is_match(s))
        },
    );
    let regexes = cache.clone();
    engine.register_fn(
        "captures",
        move |s: &str, pattern: &str| -> Result<Dynamic, Box<EvalAltResult>> {
            let re = regexes.get(pattern)?;
            Ok(match re.captures(s) {
                None => Dynamic::UNIT,
                Some(caps) => caps
                    .iter()
                    .map(|group| group.map_or(Dynamic::UNIT, |m| m.as_str().into()))
                    .collect::<Array>()
                    .into(),
            })
        },
    );

    engine.register_fn("parse_number", |s: &str| parse_number(s));

    engine.register_fn("now", || -> Result<INT, Box<EvalAltResult>> {
        with_run(|run| run.now)
            .ok_or_else(|| runtime("now() is only available while handling a message"))
    });
    engine.register_fn("date", |ts: INT| format_date(ts));
    engine.register_fn("time", |ts: INT| format_time(ts));
    engine.register_fn("weekday", |ts: INT| weekday(ts).to_string());

    engine.register_fn(
        "random_int",
        |low: INT, high: INT| -> Result<INT, Box<EvalAltResult>> {
            if low > high {
                return Err(runtime(&format!(
                    "random_int({low}, {high}): the first bound must not exceed the second"
                )));
            }
            let span = (i128::from(high) - i128::from(low) + 1) as u128;
            let x = next_random()?;
            // Multiply-shift maps 64 random bits onto the span without the
            // bias `%` has; span <= 2^64 so the product fits in u128.
            let offset = (u128::from(x) * span) >> 64;
            Ok((i128::from(low) + offset as i128) as INT)
        },
    );
    engine.register_fn(
        "random_choice",
        |items: &mut Array| -> Result<Dynamic, Box<EvalAltResult>> {
            if items.is_empty() {
                return Ok(Dynamic::UNIT);
            }
            let x = next_random()?;
            let index = ((u128::from(x) * items.len() as u128) >> 64) as usize;
            Ok(items[index].clone())
        },
    );
    cache
}

/// Most contact fields one sender may have.
const MAX_CONTACT_FIELDS: usize = 100;

/// Longest contact field name, in bytes: all of a sender's field names
/// together stay well within the key limits of the `msg.contact` map.
const MAX_CONTACT_NAME_BYTES: usize = 64;

/// `wake_after(seconds, name)`: call this run's `on_timeout(name, state)`
/// `seconds` from now, unless a message comes first (a message handled by
/// `on_message` clears the pending wakes). The same name again replaces
/// the earlier wake; at most [`MAX_WAKES`] are pending.
fn wake_after(seconds: INT, name: &str) -> Result<(), Box<EvalAltResult>> {
    if !(1..=MAX_WAKE_SECS).contains(&seconds) {
        return Err(runtime(&format!(
            "wake_after: seconds must be from 1 to {MAX_WAKE_SECS} (365 days), got {seconds}"
        )));
    }
    if name.is_empty() || name.len() > MAX_WAKE_NAME_BYTES {
        return Err(runtime(&format!(
            "wake_after: the name must be 1 to {MAX_WAKE_NAME_BYTES} bytes"
        )));
    }
    with_run(|run| {
        let Some(wakes) = run.wakes.as_mut() else {
            return Err(runtime("wake_after is only available in script flows"));
        };
        if !wakes.contains_key(name) && wakes.len() >= MAX_WAKES {
            return Err(runtime(&format!(
                "wake_after: at most {MAX_WAKES} wakes may be pending"
            )));
        }
        wakes.insert(name.to_owned(), seconds);
        Ok(())
    })
    .unwrap_or_else(|| Err(runtime("wake_after is only available in script flows")))
}

fn set_contact(key: &str, value: Dynamic) -> Result<(), Box<EvalAltResult>> {
    if key.is_empty() {
        return Err(runtime("set_contact: the field name is empty"));
    }
    if key.len() > MAX_CONTACT_NAME_BYTES {
        return Err(runtime(&format!(
            "set_contact: a field name is at most {MAX_CONTACT_NAME_BYTES} bytes"
        )));
    }
    let value = value.flatten();
    let text = if value.is_unit() {
        None
    } else if value.is_string()
        || value.is_int()
        || value.is_float()
        || value.is_bool()
        || value.is_char()
    {
        Some(value.to_string())
    } else {
        return Err(runtime(&format!(
            "set_contact: contact fields hold text, not {}",
            value.type_name()
        )));
    };
    with_run(|run| {
        let Some(contact) = run.contact.as_mut() else {
            return Err(runtime("set_contact is only available in script flows"));
        };
        match text {
            None => {
                contact.remove(key);
            }
            Some(text) => {
                if contact.len() >= MAX_CONTACT_FIELDS && !contact.contains_key(key) {
                    return Err(runtime(&format!(
                        "set_contact: a contact holds at most {MAX_CONTACT_FIELDS} fields"
                    )));
                }
                contact.insert(key.to_string(), text);
            }
        }
        Ok(())
    })
    .unwrap_or_else(|| {
        Err(runtime(
            "set_contact is only available while handling a message",
        ))
    })
}

pub(super) fn runtime(message: &str) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(message.into(), Position::NONE))
}

/// The first number in `text` ("I'm 42" -> 42, "1.5 kg" -> 1.5), or `()`.
fn parse_number(text: &str) -> Dynamic {
    static NUMBER: OnceLock<Option<Regex>> = OnceLock::new();
    let number = NUMBER.get_or_init(|| Regex::new(r"[-+]?[0-9]+(?:\.[0-9]+)?").ok());
    let Some(found) = number.as_ref().and_then(|re| re.find(text)) else {
        return Dynamic::UNIT;
    };
    let found = found.as_str();
    if !found.contains('.') {
        if let Ok(i) = found.parse::<INT>() {
            return Dynamic::from_int(i);
        }
    }
    found
        .parse::<FLOAT>()
        .map_or(Dynamic::UNIT, Dynamic::from_float)
}

/// Compiled patterns, bounded: when full it is simply emptied, which is
/// cheap and keeps a script that builds patterns from input from growing it.
#[derive(Default)]
pub(super) struct RegexCache {
    compiled: Mutex<HashMap<String, Arc<Regex>>>,
}

impl RegexCache {
    pub(super) fn get(&self, pattern: &str) -> Result<Arc<Regex>, Box<EvalAltResult>> {
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(runtime(&format!(
                "regex pattern is longer than {MAX_PATTERN_LEN} bytes"
            )));
        }
        let lock = || self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(re) = lock().get(pattern) {
            return Ok(re.clone());
        }
        let re = RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|err| runtime(&format!("bad regex {pattern:?}: {}", regex_reason(&err))))?;
        // Compiling a big pattern takes milliseconds without a Rhai
        // operation in between, so the budget is checked here too.
        if run_over_budget() {
            return Err(Box::new(EvalAltResult::ErrorTerminated(
                Dynamic::from(TIME_BUDGET_TOKEN),
                Position::NONE,
            )));
        }
        let re = Arc::new(re);
        let mut compiled = lock();
        if compiled.len() >= REGEX_CACHE_CAPACITY {
            compiled.clear();
        }
        compiled.insert(pattern.to_string(), re.clone());
        Ok(re)
    }
}

/// What is wrong with a pattern, on one line: the regex crate shows a
/// syntax error over several, the pattern with a caret under the place,
/// then `error: ` and the reason, which is what is kept.
fn regex_reason(err: &regex::Error) -> String {
    let text = err.to_string();
    match text.lines().last() {
        Some(last) if text.contains('\n') => last.trim_start_matches("error: ").to_string(),
        _ => text,
    }
}

/// The patterns that calls to `matches` and `captures` in `ast` (function
/// bodies included) write as literals, with where each call is:
/// `matches(body, "^\\d+$")` and `body.matches("^\\d+$")` alike.
pub(super) fn literal_patterns(ast: &rhai::AST) -> Vec<(rhai::ImmutableString, Position)> {
    use rhai::{ASTNode, Expr, Stmt};
    let mut found = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        let (call, pos, pattern_at) = match path.last() {
            // A call is a statement of its own, or part of an expression.
            Some(ASTNode::Stmt(Stmt::FnCall(call, pos)))
            | Some(ASTNode::Expr(Expr::FnCall(call, pos))) => (call, *pos, 1),
            Some(ASTNode::Expr(Expr::MethodCall(call, pos))) => (call, *pos, 0),
            _ => return true,
        };
        if call.name == "matches" || call.name == "captures" {
            if let Some(Expr::StringConstant(pattern, _)) = call.args.get(pattern_at) {
                if call.args.len() == pattern_at + 1 {
                    found.push((pattern.clone(), pos));
                }
            }
        }
        true
    });
    found
}

// Deterministic randomness: a run's stream is seeded from its MessageSid, so
// a retried webhook (same sid) gets the same answer and tests can pin it.

fn seed_from_sid(sid: &str) -> u64 {
    let digest = Sha256::digest(sid.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // xorshift has one fixed point, zero; step off it.
    match u64::from_le_bytes(bytes) {
        0 => 0x9E37_79B9_7F4A_7C15,
        seed => seed,
    }
}

/// xorshift64*: tiny, fast, and plenty for picking a greeting.
fn next_random() -> Result<u64, Box<EvalAltResult>> {
    with_run(|run| {
        let state = run.rng.get_or_insert_with(|| seed_from_sid(&run.sid));
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
    .ok_or_else(|| runtime("randomness is only available while handling a message"))
}

// Calendar helpers, all UTC. Civil-from-days is Howard Hinnant's algorithm
// (http://howardhinnant.github.io/date_algorithms.html), valid for every i64
// timestamp.

const SECONDS_PER_DAY: i64 = 86_400;

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// "YYYY-MM-DD" of a unix timestamp, UTC.
pub fn format_date(ts: i64) -> String {
    let (year, month, day) = civil_from_days(ts.div_euclid(SECONDS_PER_DAY));
    format!("{year:04}-{month:02}-{day:02}")
}

/// "HH:MM" of a unix timestamp, UTC.
pub fn format_time(ts: i64) -> String {
    let seconds = ts.rem_euclid(SECONDS_PER_DAY);
    format!("{:02}:{:02}", seconds / 3_600, seconds % 3_600 / 60)
}

/// English day name of a unix timestamp, UTC.
pub fn weekday(ts: i64) -> &'static str {
    const NAMES: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    // Day 0 (1970-01-01) was a Thursday.
    NAMES[ts.div_euclid(SECONDS_PER_DAY).rem_euclid(7) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::script::testing::*;
    use crate::flow::script::{Limits, Sandbox, ScriptError};
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn contact_fields_are_read_from_msg_and_written_with_set_contact() {
        let sandbox = sandbox();
        let script = compile(
            &sandbox,
            &on_message(
                r#"set_contact("visits", parse_number(msg.contact.visits) + 1);
                   set_contact("old", ());
                   msg.contact.city"#,
            ),
        );
        let contact = BTreeMap::from([
            ("visits".to_string(), "41".to_string()),
            ("old".to_string(), "x".to_string()),
            ("city".to_string(), "Lyon".to_string()),
        ]);
        let mut message = input("hi");
        message.contact = &contact;
        let out = sandbox
            .run_script(&script, &message, &BTreeMap::new())
            .unwrap();
        assert_eq!(bodies(&out), ["Lyon"]);
        assert_eq!(
            out.contact,
            BTreeMap::from([
                ("visits".to_string(), "42".to_string()),
                ("city".to_string(), "Lyon".to_string()),
            ])
        );

        let err = run(&on_message("set_contact(\"tags\", [1]); ()")).unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");
        let long = "n".repeat(MAX_CONTACT_NAME_BYTES + 1);
        let err = run(&on_message(&format!("set_contact(\"{long}\", 1); ()"))).unwrap_err();
        assert!(err.to_string().contains("at most 64 bytes"), "{err}");
    }

    #[test]
    fn compiling_a_regex_counts_against_the_time_budget() {
        // A big pattern takes milliseconds to compile, with no operation in
        // between for the clock check; with no time at all the first one
        // stops the script.
        let hasty = Sandbox::new(
            Limits {
                wall_clock: Duration::ZERO,
                ..Limits::default()
            },
            None,
        );
        // (A pattern written in the call is compiled at load instead.)
        let source = on_message(r#"let p = "\\w{20}"; matches(msg.body, p)"#);
        let out = run_with(&hasty, &source, "hi");
        assert_eq!(limit_of(out), "time budget");
    }

    #[test]
    fn helpers() {
        assert_eq!(normalize("  ¡Hola,   Mundo!! "), "hola mundo");
        assert_eq!(normalize("\t...STOP...\n"), "stop");
        assert_eq!(normalize(""), "");
        assert!(parse_number("no digits").is_unit());
        assert_eq!(parse_number("I have -3 cats").as_int(), Ok(-3));
        assert_eq!(parse_number("1.5 kg").as_float(), Ok(1.5));
        assert_eq!(
            parse_number("99999999999999999999").as_float(),
            Ok(99_999_999_999_999_999_999.0)
        );

        // A bad pattern written out is an error at load, at its call, on
        // one line; one computed while a message is handled is the run's
        // error, not a panic.
        let at_load = |body: &str| match sandbox()
            .compile_script(Path::new("flows/test.rhai"), &on_message(body))
        {
            Ok(_) => panic!("a bad pattern is refused at load: {body}"),
            Err(err) => err,
        };
        let err = at_load(r#"matches(msg.body, "(unclosed")"#);
        assert!(matches!(err, ScriptError::Compile { .. }), "{err}");
        assert!(
            err.to_string()
                .ends_with(r#"error: bad regex "(unclosed": unclosed group"#),
            "{err}"
        );
        let err = run(&on_message(r#"let p = "(un"; msg.body.captures(p)"#)).unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");
        assert!(err.to_string().contains("bad regex"), "{err}");
        let huge = "(?:a{1000}){1000}";
        let err = at_load(&format!(r#"if msg.body.matches("{huge}") {{ "a" }}"#));
        assert!(matches!(err, ScriptError::Compile { .. }), "{err}");
        let err = run(&on_message(&format!(
            r#"let p = "{huge}"; matches(msg.body, p)"#
        )))
        .unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");

        // print and debug go to tracing and do not disturb the run.
        let out = run(&on_message(r#"print("p"); debug(msg); "ok""#)).unwrap();
        assert_eq!(bodies(&out), ["ok"]);
    }

    #[test]
    fn calendar_helpers_on_known_timestamps() {
        assert_eq!(
            (format_date(0), format_time(0), weekday(0)),
            ("1970-01-01".to_string(), "00:00".to_string(), "Thursday")
        );
        let ts = 1_700_000_000;
        assert_eq!(
            (format_date(ts), format_time(ts), weekday(ts)),
            ("2023-11-14".to_string(), "22:13".to_string(), "Tuesday")
        );
        // Leap day, and before the epoch.
        assert_eq!(format_date(951_782_400), "2000-02-29");
        assert_eq!(weekday(951_782_400), "Tuesday");
        assert_eq!(
            (format_date(-1), format_time(-1)),
            ("1969-12-31".to_string(), "23:59".to_string())
        );
        assert_eq!(weekday(-1), "Wednesday");
        // Extremes do not overflow.
        let _ = (
            format_date(i64::MAX),
            format_date(i64::MIN),
            weekday(i64::MIN),
        );

        let out = run(&on_message(
            "`${date(now())} ${time(now())} ${weekday(now())}`",
        ))
        .unwrap();
        assert_eq!(bodies(&out), ["2023-11-14 22:13 Tuesday"]);
    }

    #[test]
    fn randomness_is_seeded_by_the_message_sid() {
        let sandbox = sandbox();
        let script = compile(
            &sandbox,
            &on_message(
                r#"let words = ["a", "b", "c", "d", "e", "f", "g", "h"];
                   `${random_choice(words)}${random_choice(words)}${random_int(1, 1000)}`"#,
            ),
        );
        let pick = |sid: &str| {
            let mut message = input("hi");
            message.message_sid = sid;
            let out = sandbox
                .run_script(&script, &message, &BTreeMap::new())
                .unwrap();
            out.replies[0].body.clone()
        };
        assert_eq!(pick("SMaaaa"), pick("SMaaaa"));
        let distinct: std::collections::BTreeSet<String> =
            (0..50).map(|i| pick(&format!("SM{i:032}"))).collect();
        assert!(
            distinct.len() > 40,
            "only {} distinct picks",
            distinct.len()
        );

        // Bounds are inclusive and respected; bad bounds are an error.
        let out = run(&on_message(
            "let seen = #{}; for i in 0..200 { let n = random_int(-2, 2); \
             if n < -2 || n > 2 { throw `out of range: ${n}`; } seen[`${n}`] = true; } \
             `${seen.len()} ${random_choice([])}`",
        ))
        .unwrap();
        assert_eq!(bodies(&out), ["5 "]);
        assert!(run(&on_message("random_int(3, 1)")).is_err());
        let out = run(&on_message(
            "`${random_int(-9223372036854775807 - 1, 9223372036854775807)}`",
        ));
        assert!(out.is_ok(), "{out:?}");
    }
}
