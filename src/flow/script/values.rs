//! Values across the boundary: the message map a script sees, JSON state
//! in and out (bounded in depth, measured against the limits before it is
//! kept), and the reply shapes a script may return. Callers never see a
//! Rhai type.

use std::collections::BTreeMap;

use rhai::{Array, Dynamic, Map};
use serde_json::Value;

use super::limits::{Limits, MAX_MAP_KEY_BYTES, MAX_STATE_DEPTH};
use super::{ScriptInput, ScriptReply, ENTRY_POINT, MAX_MEDIA, MAX_REPLIES};

pub(super) fn message_map(input: &ScriptInput) -> Map {
    let media: Array = input.media.iter().map(|url| url.clone().into()).collect();
    let mut msg = Map::new();
    msg.insert("body".into(), input.body.clone().into());
    msg.insert("from".into(), input.from.clone().into());
    msg.insert("to".into(), input.to.clone().into());
    msg.insert("media".into(), media.into());
    msg.insert("sid".into(), input.message_sid.clone().into());
    msg.insert("received_at".into(), Dynamic::from_int(input.received_at));
    msg.insert("contact".into(), strings_to_map(&input.contact).into());
    msg
}

pub(super) fn strings_to_map(fields: &BTreeMap<String, String>) -> Map {
    fields
        .iter()
        .map(|(k, v)| (k.as_str().into(), v.clone().into()))
        .collect()
}

pub(super) fn json_object_to_map(object: &BTreeMap<String, Value>) -> Map {
    object
        .iter()
        .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v, 0)))
        .collect()
}

pub(super) fn json_to_dynamic(value: &Value, depth: usize) -> Dynamic {
    // Stored state was written by `dynamic_to_json`, which caps the depth;
    // the cap here only protects against a hand-edited store.
    if depth > MAX_STATE_DEPTH {
        return Dynamic::UNIT;
    }
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => s.clone().into(),
        Value::Array(items) => items
            .iter()
            .map(|v| json_to_dynamic(v, depth + 1))
            .collect::<Array>()
            .into(),
        Value::Object(fields) => fields
            .iter()
            .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v, depth + 1)))
            .collect::<Map>()
            .into(),
    }
}

pub(super) fn dynamic_to_json(value: Dynamic, path: &str, depth: usize) -> Result<Value, String> {
    if depth > MAX_STATE_DEPTH {
        return Err(format!("{path} nests deeper than {MAX_STATE_DEPTH} levels"));
    }
    let value = value.flatten();
    if value.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = value.as_int() {
        return Ok(Value::from(i));
    }
    if let Ok(f) = value.as_float() {
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("{path} is {f}, which JSON cannot hold"));
    }
    if let Ok(c) = value.as_char() {
        return Ok(Value::String(c.to_string()));
    }
    let type_name = value.type_name();
    if value.is_string() {
        return Ok(Value::String(value.into_string().unwrap_or_default()));
    }
    if value.is_array() {
        let items = value.into_array().unwrap_or_default();
        return items
            .into_iter()
            .enumerate()
            .map(|(i, item)| dynamic_to_json(item, &format!("{path}[{i}]"), depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array);
    }
    if let Some(map) = value.try_cast::<Map>() {
        return map
            .into_iter()
            .map(|(k, v)| {
                let child = dynamic_to_json(v, &format!("{path}.{k}"), depth + 1)?;
                Ok((k.to_string(), child))
            })
            .collect::<Result<serde_json::Map<_, _>, String>>()
            .map(Value::Object);
    }
    Err(format!(
        "{path} is a {type_name}; state holds only strings, numbers, bools, arrays and maps"
    ))
}

pub(super) fn state_from(value: Dynamic) -> Result<BTreeMap<String, Value>, String> {
    let type_name = value.type_name();
    let Some(map) = value.try_cast::<Map>() else {
        return Err(format!("state must stay a map, but it is a {type_name}"));
    };
    map.into_iter()
        .map(|(k, v)| {
            let json = dynamic_to_json(v, &format!("state.{k}"), 1)?;
            Ok((k.to_string(), json))
        })
        .collect()
}

/// Which size limit the state breaks, counting as the sandbox does: all
/// array elements, all map entries and all string bytes, nested ones
/// included, and map keys: each at most [`MAX_MAP_KEY_BYTES`], all of them
/// together at most the string size.
pub(super) fn state_over_limits(
    state: &BTreeMap<String, Value>,
    limits: &Limits,
) -> Option<&'static str> {
    #[derive(Default)]
    struct Totals {
        elements: usize,
        entries: usize,
        bytes: usize,
        key_bytes: usize,
        longest_key: usize,
    }
    fn entry(key: &str, value: &Value, totals: &mut Totals) {
        totals.entries += 1;
        totals.key_bytes += key.len();
        totals.longest_key = totals.longest_key.max(key.len());
        add(value, totals);
    }
    fn add(value: &Value, totals: &mut Totals) {
        match value {
            Value::String(s) => totals.bytes += s.len(),
            Value::Array(items) => {
                totals.elements += items.len();
                items.iter().for_each(|v| add(v, totals));
            }
            Value::Object(fields) => fields.iter().for_each(|(k, v)| entry(k, v, totals)),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    let mut totals = Totals::default();
    state.iter().for_each(|(k, v)| entry(k, v, &mut totals));
    // Zero means "no limit", as it does for Rhai.
    let over = |count: usize, max: usize| max > 0 && count > max;
    if totals.longest_key > MAX_MAP_KEY_BYTES || over(totals.key_bytes, limits.max_string_len) {
        Some("map key size")
    } else if over(totals.bytes, limits.max_string_len) {
        Some("string size")
    } else if over(totals.elements, limits.max_array_len) {
        Some("array size")
    } else if over(totals.entries, limits.max_map_len) {
        Some("map size")
    } else {
        None
    }
}

pub(super) fn replies_from(value: Dynamic) -> Result<Vec<ScriptReply>, String> {
    let value = value.flatten();
    if value.is_unit() {
        return Ok(Vec::new());
    }
    if value.is_string() {
        return Ok(vec![ScriptReply {
            body: value.into_string().unwrap_or_default(),
            media: Vec::new(),
        }]);
    }
    if value.is_map() {
        return Ok(vec![reply_from_map(value, "the reply")?]);
    }
    if value.is_array() {
        let items = value.into_array().unwrap_or_default();
        if items.len() > MAX_REPLIES {
            return Err(format!(
                "{ENTRY_POINT} returned {} replies; at most {MAX_REPLIES} are allowed",
                items.len()
            ));
        }
        return items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let item = item.flatten();
                if item.is_string() {
                    Ok(ScriptReply {
                        body: item.into_string().unwrap_or_default(),
                        media: Vec::new(),
                    })
                } else if item.is_map() {
                    reply_from_map(item, &format!("reply [{i}]"))
                } else {
                    Err(format!(
                        "reply [{i}] is a {}; expected a string or #{{ body, media }}",
                        item.type_name()
                    ))
                }
            })
            .collect();
    }
    Err(format!(
        "{ENTRY_POINT} returned a {}; expected a string, an array of replies, \
         #{{ body, media }} or () for silence",
        value.type_name()
    ))
}

fn reply_from_map(value: Dynamic, what: &str) -> Result<ScriptReply, String> {
    let map = value.try_cast::<Map>().unwrap_or_default();
    let mut reply = ScriptReply::default();
    for (key, field) in map {
        let field = field.flatten();
        match key.as_str() {
            "body" if field.is_string() => reply.body = field.into_string().unwrap_or_default(),
            "body" if field.is_unit() => {}
            "media" if field.is_string() => {
                reply.media = vec![field.into_string().unwrap_or_default()]
            }
            "media" if field.is_unit() => {}
            "media" if field.is_array() => {
                for url in field.into_array().unwrap_or_default() {
                    let url = url.flatten();
                    let type_name = url.type_name();
                    match url.into_string() {
                        Ok(url) => reply.media.push(url),
                        Err(_) => {
                            return Err(format!(
                                "{what}: media entries must be URL strings, not {type_name}"
                            ))
                        }
                    }
                }
            }
            "body" | "media" => {
                return Err(format!(
                    "{what}: {key} must be a string{}, not {}",
                    if key == "media" {
                        " or an array of strings"
                    } else {
                        ""
                    },
                    field.type_name()
                ))
            }
            other => {
                return Err(format!(
                    "{what}: unknown field `{other}` (a reply has `body` and `media`)"
                ))
            }
        }
    }
    if reply.media.len() > MAX_MEDIA {
        return Err(format!(
            "{what} has {} media URLs; at most {MAX_MEDIA} are allowed",
            reply.media.len()
        ));
    }
    if let Some(url) = reply
        .media
        .iter()
        .find(|url| !(url.starts_with("https://") || url.starts_with("http://")))
    {
        return Err(format!("{what}: media URL {url:?} is not an http(s) URL"));
    }
    if reply.body.is_empty() && reply.media.is_empty() {
        return Err(format!("{what} has neither a body nor media"));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::script::testing::*;
    use crate::flow::script::ScriptError;
    use serde_json::json;

    #[test]
    fn state_round_trips_json_values_and_can_be_replaced() {
        let sandbox = sandbox();
        let script = compile(
            &sandbox,
            &on_message(
                "state.list.push(msg.body); state.n += 0.5; state.flag = !state.flag; \
                 state.nested.inner.x = 1; ()",
            ),
        );
        let state: BTreeMap<String, Value> = serde_json::from_value(json!({
            "list": ["a"], "n": 1, "flag": false, "nested": { "inner": {} }, "none": null
        }))
        .unwrap();
        let out = sandbox.run_script(&script, &input("b"), &state).unwrap();
        assert_eq!(
            serde_json::to_value(&out.state).unwrap(),
            json!({ "list": ["a", "b"], "n": 1.5, "flag": true,
                    "nested": { "inner": { "x": 1 } }, "none": null })
        );

        let out = run(&on_message(
            "state = #{ fresh: true, gone: 1 }; state.remove(\"gone\"); ()",
        ))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&out.state).unwrap(),
            json!({ "fresh": true })
        );

        // A copy is a copy: only mutations of `state` itself are kept.
        let out = run(&on_message("let copy = state; copy.x = 1; ()")).unwrap();
        assert!(out.state.is_empty());
        // Helpers called method-style get `state` by reference.
        let out = run(&format!(
            "fn bump() {{ this.n = (this.n ?? 0) + 1; }}\n{}",
            on_message("state.bump(); state.bump(); ()")
        ))
        .unwrap();
        assert_eq!(out.state["n"], json!(2));
    }

    #[test]
    fn every_return_shape() {
        let out = run(&on_message(r#""hello""#)).unwrap();
        assert_eq!(bodies(&out), ["hello"]);
        assert!(!out.silence);

        let out = run(&on_message(
            r#"["one", #{ body: "two", media: ["https://example.com/a.png"] }]"#,
        ))
        .unwrap();
        assert_eq!(bodies(&out), ["one", "two"]);
        assert_eq!(out.replies[1].media, ["https://example.com/a.png"]);

        let out = run(&on_message(
            r#"#{ body: "pic", media: ["https://example.com/1.jpg", "https://example.com/2.jpg"] }"#,
        ))
        .unwrap();
        assert_eq!(
            out.replies,
            [ScriptReply {
                body: "pic".to_string(),
                media: vec![
                    "https://example.com/1.jpg".to_string(),
                    "https://example.com/2.jpg".to_string()
                ],
            }]
        );

        let out = run(&on_message(r#"#{ media: "https://example.com/only.jpg" }"#)).unwrap();
        assert_eq!(out.replies[0].body, "");
        assert_eq!(out.replies[0].media.len(), 1);

        for silent in ["()", "[]", "if false { \"never\" }"] {
            let out = run(&on_message(silent)).unwrap();
            assert!(out.silence && out.replies.is_empty(), "{silent}");
        }

        let out = run(&on_message(r#"exit("early"); "late""#)).unwrap();
        assert_eq!(bodies(&out), ["early"]);
    }

    #[test]
    fn unusable_results_are_bad_returns() {
        for body in [
            "42",
            "true",
            "[1]",
            "|| 1",
            "let a = []; for i in 0..11 { a.push(`${i}`); } a",
            r#"#{ bdy: "typo" }"#,
            r#"#{ body: 5 }"#,
            r#"#{ body: "x", media: "ftp://example.com/a" }"#,
            "#{}",
            "state.f = Fn(\"normalize\"); ()",
            "state.x = 1.0 / 0.0; ()",
            "state = 5; ()",
        ] {
            match run(&on_message(body)) {
                Err(err @ ScriptError::BadReturn { .. }) => {
                    assert!(
                        err.to_string().starts_with("flows/test.rhai: error: "),
                        "{err}"
                    );
                    assert_eq!(err.line_column(), None);
                }
                other => panic!("{body}: expected BadReturn, got {other:?}"),
            }
        }
    }

    #[test]
    fn saved_state_counts_its_keys() {
        let sandbox = sandbox();
        let script = compile(&sandbox, &on_message("()"));
        // The state is measured with its keys before it is kept, also when
        // the script never touched it again after growing it.
        let state: BTreeMap<String, Value> = (0..100)
            .map(|i| (format!("{}{i}", "k".repeat(200)), json!(1)))
            .collect();
        let out = sandbox.run_script(&script, &input("hi"), &state);
        assert_eq!(limit_of(out), "map key size");
        let state = BTreeMap::from([("k".repeat(MAX_MAP_KEY_BYTES + 1), json!(1))]);
        let out = sandbox.run_script(&script, &input("hi"), &state);
        assert_eq!(limit_of(out), "map key size");
        let state = BTreeMap::from([("k".repeat(MAX_MAP_KEY_BYTES), json!("v"))]);
        assert!(sandbox.run_script(&script, &input("hi"), &state).is_ok());
    }
}
