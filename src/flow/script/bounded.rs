//! Sizes checked before a value is built: the standard functions replaced
//! by bounded versions, and the measuring of map keys (`bound_builtins`,
//! called once from `Sandbox::new`).
//!
//! Rhai measures what a function built after the function returns, and it
//! does not count map keys at all. For most standard functions that is
//! enough: they cannot build much more than their inputs, which are within
//! the limits, so what they build is at most a small multiple of the limits
//! (`+` and interpolation double at most, case conversion triples, printing
//! escapes a byte into at most six, `split` and `to_chars` make one small
//! value per byte of a 16 KB string) and is refused right after. These are
//! the exceptions, replaced here by versions that refuse before building:
//!
//! - `replace`: the result is the string times the substitute (a 16 KB
//!   string with each byte replaced by the string itself is 256 MB);
//! - `pad` with a string: the same, and an empty padding never returned;
//! - array `map`, `zip` and `for_each`, map `map`: each call of the closure
//!   is measured, but the up to 1,000 results together only at the end;
//! - map keys: a map of 1,000 keys of 16 KB is 16 MB that no limit sees,
//!   and every copy of the map (`let b = a;`) copies all of it. The keys of
//!   every value a script reaches through a variable or `this` are measured
//!   first (each at most MAX_MAP_KEY_BYTES, all together at most the string
//!   size), so a map can outgrow that by at most the one key just added
//!   before the next use of it stops the script.

use rhai::{
    Array, Dynamic, Engine, EvalAltResult, FnPtr, FuncRegistration, ImmutableString, Map,
    NativeCallContext, Position, INT,
};

use super::limits::{Limits, MAX_MAP_KEY_BYTES};

/// What a value holds, counted as the limits count it: every array element,
/// map entry and string byte, nested ones included, and, which Rhai does
/// not count, the bytes of map keys.
#[derive(Clone, Copy, Default)]
struct Sizes {
    elements: usize,
    entries: usize,
    bytes: usize,
    key_bytes: usize,
    longest_key: usize,
}

impl Sizes {
    fn of(value: &Dynamic) -> Sizes {
        let mut sizes = Sizes::default();
        sizes.add(value);
        sizes
    }

    /// Adds `value` and everything inside it. A shared value the script
    /// holds locked right now (it is in the middle of changing `state`)
    /// cannot be read and counts as nothing; it is measured at its next use.
    fn add(&mut self, value: &Dynamic) {
        // The type tests are cheap; this runs at every use of a variable.
        if value.is_shared() {
            if let Some(inner) = value.read_lock::<Dynamic>() {
                self.add(&inner);
            }
        } else if value.is_string() {
            if let Ok(text) = value.as_immutable_string_ref() {
                self.bytes += text.len();
            }
        } else if value.is_array() {
            if let Ok(items) = value.as_array_ref() {
                self.elements += items.len();
                items.iter().for_each(|item| self.add(item));
            }
        } else if value.is_map() {
            if let Ok(map) = value.as_map_ref() {
                self.entries += map.len();
                for (key, item) in map.iter() {
                    self.key_bytes += key.len();
                    self.longest_key = self.longest_key.max(key.len());
                    self.add(item);
                }
            }
        } else if value.is_blob() {
            if let Ok(blob) = value.as_blob_ref() {
                self.elements += blob.len();
            }
        }
    }

    /// Adds `value` as one more element of an array being built.
    fn add_element(&mut self, value: &Dynamic) {
        self.elements += 1;
        self.add(value);
    }

    /// What a variable is checked for at each use: the number of elements
    /// and entries (which Rhai checks only after some changes), and the
    /// keys of all maps inside (which Rhai never checks). Not the strings:
    /// Rhai checks each string as it is built, and the message, its
    /// contact fields and a flow's variables never had to fit the string
    /// size as a whole.
    fn check_shape(&self, limits: &Limits) -> Result<(), Box<EvalAltResult>> {
        // Zero means "no limit", as it does for Rhai.
        let over = |count: usize, max: usize| max > 0 && count > max;
        if over(self.elements, limits.max_array_len) {
            Err(too_large("Size of array"))
        } else if over(self.entries, limits.max_map_len) {
            Err(too_large("Size of object map"))
        } else if self.longest_key > MAX_MAP_KEY_BYTES {
            Err(too_large("Length of map key"))
        } else if over(self.key_bytes, limits.max_string_len) {
            Err(too_large("Length of map keys"))
        } else {
            Ok(())
        }
    }

    /// Every limit, for a value being built.
    fn check(&self, limits: &Limits) -> Result<(), Box<EvalAltResult>> {
        self.check_shape(limits)?;
        if limits.max_string_len > 0 && self.bytes > limits.max_string_len {
            Err(too_large("Length of string"))
        } else {
            Ok(())
        }
    }
}

/// The error Rhai raises for a value over a size limit; [`limit_hit`](super::errors::limit_hit)
/// recognises it by `what`.
fn too_large(what: &str) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorDataTooLarge(
        what.into(),
        Position::NONE,
    ))
}

pub(super) fn bound_builtins(engine: &mut Engine, limits: &Limits) {
    // Every value reached through a variable (or `this`, in a method) is
    // measured, map keys included, before the script can use or copy it.
    let max = limits.clone();
    #[allow(deprecated)] // Rhai marks this API volatile, not deprecated
    engine.on_var(move |name, _index, context| {
        if let Some(value) = context.scope().get(name) {
            Sizes::of(value).check_shape(&max)?;
        }
        if let Some(this) = context.this_ptr() {
            Sizes::of(this).check_shape(&max)?;
        }
        Ok(None)
    });
    // `let copy = this;` uses no variable before it copies.
    let max = limits.clone();
    #[allow(deprecated)] // Rhai marks this API volatile, not deprecated
    engine.on_def_var(move |running, _info, context| {
        if let (true, Some(this)) = (running, context.this_ptr()) {
            Sizes::of(this).check_shape(&max)?;
        }
        Ok(true)
    });

    // These change the string in place, so they must not be "pure": Rhai
    // would otherwise hand them a constant to change.
    let max = limits.max_string_len;
    let changes = |name: &str| FuncRegistration::new(name).with_purity(false);
    changes("replace").register_into_engine(
        engine,
        move |s: &mut ImmutableString, find: &str, with: &str| replace_within(s, find, with, max),
    );
    changes("replace").register_into_engine(
        engine,
        move |s: &mut ImmutableString, find: &str, with: char| {
            replace_within(s, find, with.encode_utf8(&mut [0; 4]), max)
        },
    );
    changes("replace").register_into_engine(
        engine,
        move |s: &mut ImmutableString, find: char, with: &str| {
            replace_within(s, find.encode_utf8(&mut [0; 4]), with, max)
        },
    );
    changes("replace").register_into_engine(
        engine,
        move |s: &mut ImmutableString, find: char, with: char| {
            replace_within(
                s,
                find.encode_utf8(&mut [0; 4]),
                with.encode_utf8(&mut [0; 4]),
                max,
            )
        },
    );
    changes("pad").register_into_engine(
        engine,
        move |s: &mut ImmutableString, len: INT, padding: &str| pad_within(s, len, padding, max),
    );
    changes("pad").register_into_engine(
        engine,
        move |s: &mut ImmutableString, len: INT, padding: char| {
            pad_within(s, len, padding.encode_utf8(&mut [0; 4]), max)
        },
    );

    // Collections built by calling a closure per element: each result is
    // added to the running size before the next call.
    let max = limits.clone();
    engine.register_fn(
        "map",
        move |context: NativeCallContext, array: &mut Array, f: FnPtr| {
            map_within(&context, array, &f, &max)
        },
    );
    let max = limits.clone();
    engine.register_fn(
        "map",
        move |context: NativeCallContext, array: &mut Array, name: &str| {
            map_within(&context, array, &FnPtr::new(name)?, &max)
        },
    );
    let max = limits.clone();
    engine.register_fn(
        "zip",
        move |context: NativeCallContext, array: &mut Array, other: Array, f: FnPtr| {
            zip_within(&context, array, other, &f, &max)
        },
    );
    let max = limits.clone();
    changes("for_each").register_into_engine(
        engine,
        move |context: NativeCallContext, array: &mut Array, f: FnPtr| {
            for_each_within(&context, array, &f, &max)
        },
    );
    let max = limits.clone();
    engine.register_fn(
        "map",
        move |context: NativeCallContext, map: &mut Map, f: FnPtr| {
            map_entries_within(&context, map, &f, &max)
        },
    );
}

/// `string.replace(find, with)`, refused before building a result longer
/// than `max` bytes.
fn replace_within(
    string: &mut ImmutableString,
    find: &str,
    with: &str,
    max: usize,
) -> Result<(), Box<EvalAltResult>> {
    // As Rhai does: an empty string stays empty, even for an empty pattern.
    if string.is_empty() {
        return Ok(());
    }
    // An empty pattern matches between every two characters and at both
    // ends, which `matches` counts the same way `replace` replaces.
    let hits = string.matches(find).count();
    let len = (string.len() - hits * find.len()).saturating_add(hits.saturating_mul(with.len()));
    if max > 0 && len > max {
        return Err(too_large("Length of string"));
    }
    *string = string.replace(find, with).into();
    Ok(())
}

/// `string.pad(len, padding)`: appends `padding` until the string is `len`
/// characters long (the last copy cut short), refused before building more
/// than `max` bytes. An empty padding adds nothing (Rhai's never returned).
fn pad_within(
    string: &mut ImmutableString,
    len: INT,
    padding: &str,
    max: usize,
) -> Result<(), Box<EvalAltResult>> {
    if len <= 0 {
        return Ok(());
    }
    let len = usize::try_from(len).map_err(|_| too_large("Length of string"))?;
    // Rhai's own first check, in characters.
    if max > 0 && len > max {
        return Err(too_large("Length of string"));
    }
    let have = string.chars().count();
    let per_copy = padding.chars().count();
    if len <= have || per_copy == 0 {
        return Ok(());
    }
    let (copies, part) = ((len - have) / per_copy, (len - have) % per_copy);
    let part: String = padding.chars().take(part).collect();
    let bytes = string.len() + copies * padding.len() + part.len();
    if max > 0 && bytes > max {
        return Err(too_large("Length of string"));
    }
    let mut padded = String::with_capacity(bytes);
    padded.push_str(string);
    (0..copies).for_each(|_| padded.push_str(padding));
    padded.push_str(&part);
    *string = padded.into();
    Ok(())
}

/// Rhai's test for "this closure does not take these arguments": the cue
/// to try the next way of calling it.
fn not_taken(result: &Result<Dynamic, Box<EvalAltResult>>, f: &FnPtr) -> bool {
    matches!(result, Err(err)
        if matches!(&**err, EvalAltResult::ErrorFunctionNotFound(sig, ..) if sig.starts_with(f.fn_name())))
}

/// Names the standard function a closure failed in, as Rhai does.
fn called_from(
    context: &NativeCallContext,
    caller: &str,
    err: Box<EvalAltResult>,
) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorInFunctionCall(
        caller.into(),
        context.call_source().unwrap_or("").into(),
        err,
        Position::NONE,
    ))
}

/// `array.map(f)`: `f` takes the element as `this`, or `(element)`, or
/// `(element, index)`, tried in that order as Rhai does.
fn map_within(
    context: &NativeCallContext,
    array: &mut Array,
    f: &FnPtr,
    limits: &Limits,
) -> Result<Array, Box<EvalAltResult>> {
    let mut out = Array::with_capacity(array.len());
    let mut sizes = Sizes::default();
    for (i, item) in array.iter_mut().enumerate() {
        let index = Dynamic::from_int(INT::try_from(i).unwrap_or(INT::MAX));
        let mut result = f.call_raw(context, Some(&mut *item), [] as [Dynamic; 0]);
        if not_taken(&result, f) {
            result = f.call_raw(context, None, [item.clone()]);
        }
        if not_taken(&result, f) {
            result = f.call_raw(context, None, [item.clone(), index]);
        }
        let value = result.map_err(|err| called_from(context, "map", err))?;
        sizes.add_element(&value);
        sizes.check(limits)?;
        out.push(value);
    }
    Ok(out)
}

/// `array.zip(other, f)`: `f` takes `(element, other element)` or
/// `(element, other element, index)`.
fn zip_within(
    context: &NativeCallContext,
    array: &mut Array,
    other: Array,
    f: &FnPtr,
    limits: &Limits,
) -> Result<Array, Box<EvalAltResult>> {
    let mut out = Array::with_capacity(array.len().min(other.len()));
    let mut sizes = Sizes::default();
    for (i, (x, y)) in array.iter().zip(other).enumerate() {
        let index = Dynamic::from_int(INT::try_from(i).unwrap_or(INT::MAX));
        let mut result = f.call_raw(context, None, [x.clone(), y.clone()]);
        if not_taken(&result, f) {
            result = f.call_raw(context, None, [x.clone(), y, index]);
        }
        let value = result.map_err(|err| called_from(context, "zip", err))?;
        sizes.add_element(&value);
        sizes.check(limits)?;
        out.push(value);
    }
    Ok(out)
}

/// `array.for_each(f)`: `f` takes the element as `this` (which it may
/// change), with no arguments or `(index)`. The array's size is kept up to
/// date as elements change.
fn for_each_within(
    context: &NativeCallContext,
    array: &mut Array,
    f: &FnPtr,
    limits: &Limits,
) -> Result<(), Box<EvalAltResult>> {
    let mut sizes = Sizes::default();
    array.iter().for_each(|item| sizes.add_element(item));
    for (i, item) in array.iter_mut().enumerate() {
        let before = Sizes::of(item);
        let mut result = f.call_raw(context, Some(&mut *item), [] as [Dynamic; 0]);
        if not_taken(&result, f) {
            let index = Dynamic::from_int(INT::try_from(i).unwrap_or(INT::MAX));
            result = f.call_raw(context, Some(&mut *item), [index]);
        }
        let _ = result.map_err(|err| called_from(context, "for_each", err))?;
        let after = Sizes::of(item);
        sizes.elements = sizes.elements - before.elements + after.elements;
        sizes.entries = sizes.entries - before.entries + after.entries;
        sizes.bytes = sizes.bytes - before.bytes + after.bytes;
        sizes.key_bytes = sizes.key_bytes - before.key_bytes + after.key_bytes;
        sizes.longest_key = sizes.longest_key.max(after.longest_key);
        sizes.check(limits)?;
    }
    Ok(())
}

/// `map.map(f)`: `f` takes the value as `this` and `(key)`, or
/// `(key, value)`.
fn map_entries_within(
    context: &NativeCallContext,
    map: &mut Map,
    f: &FnPtr,
    limits: &Limits,
) -> Result<Map, Box<EvalAltResult>> {
    let mut out = Map::new();
    let mut sizes = Sizes::default();
    for (key, item) in map.iter_mut() {
        let name = Dynamic::from(ImmutableString::from(key.as_str()));
        let mut result = f.call_raw(context, Some(&mut *item), [name.clone()]);
        if not_taken(&result, f) {
            result = f.call_raw(context, None, [name, item.clone()]);
        }
        let value = result.map_err(|err| called_from(context, "map", err))?;
        sizes.entries += 1;
        sizes.key_bytes += key.len();
        sizes.longest_key = sizes.longest_key.max(key.len());
        sizes.add(&value);
        sizes.check(limits)?;
        out.insert(key.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::script::testing::*;
    use crate::flow::script::ScriptError;
    use serde_json::json;
    use serde_json::Value;
    use std::collections::BTreeMap;
    use std::time::Duration;
    use std::time::Instant;

    #[test]
    fn replace_is_refused_before_it_builds_an_oversized_string() {
        let patient = sized(50_000_000);
        let long = "x".repeat(16_000);
        // Each of 16,000 bytes replaced by the whole string was a
        // 256 MB string built (in about 0.4 s) before Rhai measured it.
        for replace in [
            r#"s.replace("x", s)"#,
            "s.replace('x', s)",
            r#"s.replace("", s)"#,
        ] {
            let body = format!("let s = msg.body; {replace}; s");
            let started = Instant::now();
            let out = run_with(&patient, &on_message(&body), &long);
            assert_eq!(limit_of(out), "string size", "{replace}");
            // Refused after counting, not after building; the bound only
            // guards against building (hundreds of milliseconds).
            assert!(started.elapsed() < Duration::from_secs(5), "{replace}");
        }
        // Exactly at the limit is fine, one byte more is not.
        let grow = "let s = msg.body; s.replace('y', \"zz\"); `${s.len()}`";
        let text = format!("y{}", "x".repeat(16_382));
        let out = run_with(&patient, &on_message(grow), &text).unwrap();
        assert_eq!(bodies(&out), ["16384"]);
        let text = format!("yy{}", "x".repeat(16_382));
        assert_eq!(
            limit_of(run_with(&patient, &on_message(grow), &text)),
            "string size"
        );

        // Every variant still means what it meant.
        let out = run(&on_message(
            r#"let a = "hello"; a.replace("l", "LL"); let b = "hello"; b.replace('l', "_");
               let c = "hello"; c.replace("ll", 'L'); let d = "hello"; d.replace('o', '0');
               let e = "ab"; e.replace("", "-"); let f = ""; f.replace("", "-");
               [a, b, c, d, e, `[${f}]`]"#,
        ))
        .unwrap();
        assert_eq!(
            bodies(&out),
            ["heLLLLo", "he__o", "heLo", "hell0", "-a-b-", "[]"]
        );
        // It changes the string in place, so a constant cannot be changed.
        assert!(run(&on_message(r#"const C = "abc"; C.replace("a", "b"); C"#)).is_err());
    }

    #[test]
    fn pad_ends_with_an_empty_padding_and_stops_at_the_limit() {
        // An empty padding used to loop forever inside Rhai, where neither
        // the operation count nor the clock could stop it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let out = run(&on_message(r#"let s = "ab"; s.pad(10, ""); s"#));
            let _ = tx.send(out);
        });
        let out = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("pad with an empty padding returned");
        assert_eq!(bodies(&out.unwrap()), ["ab"]);

        let out = run(&on_message(
            r#"let a = "ab"; a.pad(7, "xyz"); let b = "é"; b.pad(3, "ü"); let c = "z"; c.pad(3, '!');
               let d = "long"; d.pad(2, "x"); [a, b, c, d]"#,
        ))
        .unwrap();
        assert_eq!(bodies(&out), ["abxyzxy", "éüü", "z!!", "long"]);
        // 16,000 four-byte characters are 64,000 bytes: refused before they
        // are appended, though the count of characters is within the limit.
        let patient = sized(50_000_000);
        for pad in [r#"s.pad(16000, "😀")"#, "s.pad(16000, '😀')"] {
            let out = run_with(
                &patient,
                &on_message(&format!("let s = \"x\"; {pad}; s")),
                "hi",
            );
            assert_eq!(limit_of(out), "string size", "{pad}");
        }
    }

    #[test]
    fn collections_built_by_closures_stop_at_the_limit_not_after_it() {
        // Each result is a new 16 KB string, within the limit; 1,000 of them
        // are 16 MB. Rhai measured the collection only once every closure
        // had run: with 200 operations, not enough for 1,000 calls, that
        // run hit the operations limit. Now the second result is refused.
        let few = sized(200);
        let long = "x".repeat(16_000);
        for build in [
            "a.map(|v| s + v)",
            "a.map(|v, i| s + i)",
            "a.map(|| s + this)",
            "a.zip(a, |x, y| s + x)",
            "a.zip(a, |x, y, i| s + i)",
            "a.for_each(|| this = s + this)",
            "a.for_each(|i| this = s + i)",
        ] {
            let body = format!("let s = msg.body; let a = []; a.pad(1000, 0); {build}; ()");
            let out = run_with(&few, &on_message(&body), &long);
            assert_eq!(limit_of(out), "string size", "{build}");
        }
        // A map's `map`, over a state of 100 entries.
        let script = compile(
            &few,
            &on_message("let s = msg.body; state.map(|k, v| s + v); ()"),
        );
        let state: BTreeMap<String, Value> =
            (0..100).map(|i| (format!("k{i}"), json!(i))).collect();
        let out = few.run_script(&script, &input(&long), &state);
        assert_eq!(limit_of(out), "string size");
    }

    #[test]
    fn closures_keep_their_meaning() {
        let out = run(&format!(
            "fn twice(v) {{ v * 2 }}\n{}",
            on_message(
                r#"let a = [1, 2, 3];
                   let m = `${a.map(|v| v * 2)} ${a.map(|v, i| v * i)} ${a.map(|| this + 1)}`;
                   let z = `${a.zip([10, 20], |x, y| x + y)} ${a.zip([10, 20], |x, y, i| i)}`;
                   let b = [1, 2, 3]; b.for_each(|| this *= 10);
                   let c = [1, 2, 3]; c.for_each(|i| this = i);
                   let named = `${a.map("twice")} ${a.map(Fn("twice"))}`;
                   let n = #{ a: 1, b: 2 };
                   let nm = `${n.map(|k| k + this)} ${n.map(|k, v| v * 10)}`;
                   [m, z, `${b} ${c}`, named, nm]"#,
            )
        ))
        .unwrap();
        assert_eq!(
            bodies(&out),
            [
                "[2, 4, 6] [0, 2, 6] [2, 3, 4]",
                "[11, 22] [0, 1]",
                "[10, 20, 30] [0, 1, 2]",
                "[2, 4, 6] [2, 4, 6]",
                r#"#{"a": "a1", "b": "b2"} #{"a": 10, "b": 20}"#,
            ]
        );
        // An error inside the closure is the script's error, located.
        let err = run(&on_message("[1].map(|v| v / 0)")).unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");
    }

    #[test]
    fn map_keys_are_bounded_and_counted() {
        let patient = sized(50_000_000);
        let limit = |body: &str, msg: &str| limit_of(run_with(&patient, &on_message(body), msg));
        let long = "k".repeat(MAX_MAP_KEY_BYTES + 1);
        // Rhai counts neither the length nor the bytes of keys: 1,000 keys
        // of 16 KB were 16 MB that no limit saw, copied whole by every
        // `let b = a;`.
        assert_eq!(
            limit("let m = #{}; m[msg.body] = 1; m.len()", &long),
            "map key size"
        );
        assert_eq!(limit("state[msg.body] = 1; ()", &long), "map key size");
        assert_eq!(
            limit("let m = #{}; m.set(msg.body, 1); let c = m; ()", &long),
            "map key size"
        );
        // Also when reached only through `this`, in a method.
        let out = run_with(
            &patient,
            &format!(
                "fn grow(k) {{ this[k] = 1; let copy = this; }}\n{}",
                on_message("state.grow(msg.body); ()")
            ),
            &long,
        );
        assert_eq!(limit_of(out), "map key size");
        // All keys of one map together are held to the string size: 100
        // keys of 200 bytes are 20 KB.
        let many = r#"let m = #{}; for i in 0..100 { m[msg.body + i] = 1; } m.len()"#;
        assert_eq!(limit(many, &"k".repeat(197)), "map key size");
        let many = r#"for i in 0..100 { state[msg.body + i] = 1; } ()"#;
        assert_eq!(limit(many, &"k".repeat(197)), "map key size");
        // Copies of a map are measured before they are made.
        let copies = "let m = #{}; m[msg.body] = 1; let a = [m, m]; ()";
        assert_eq!(limit(copies, &long), "map key size");
        // Messages and variables are not held to a string size they never
        // had to meet as a whole: a 16 KB body is fine.
        let out = run_with(
            &patient,
            &on_message("`${msg.body.len()}`"),
            &"x".repeat(16_000),
        );
        assert_eq!(bodies(&out.unwrap()), ["16000"]);
        // A key up to the limit is fine.
        let ok = "k".repeat(MAX_MAP_KEY_BYTES);
        let out = run_with(
            &patient,
            &on_message("state[msg.body] = 1; `${state.len()}`"),
            &ok,
        )
        .unwrap();
        assert_eq!(bodies(&out), ["1"]);
        assert!(out.state_map().contains_key(&ok));
    }
}
