//! Values across the boundary: the message map a script sees, JSON state
//! in and out (bounded in depth, measured against the limits before it is
//! kept), and the reply shapes a script may return. Callers never see a
//! Rhai type.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use rhai::{Array, Dynamic, Map};
use serde_json::Value;

use super::limits::{Limits, MAX_MAP_KEY_BYTES, MAX_STATE_DEPTH};
use super::{ScriptInput, ScriptReply, ENTRY_POINT, MAX_MEDIA, MAX_REPLIES};

/// The keys of the message map, in the map's own (sorted) order.
const MESSAGE_KEYS: [&str; 7] = [
    "body",
    "contact",
    "from",
    "media",
    "received_at",
    "sid",
    "to",
];

pub(super) fn message_map(input: &ScriptInput) -> Map {
    // A copy of a map that already holds the keys costs one node; seven
    // inserts each searched the node, comparing keys (about half a
    // microsecond a message).
    static TEMPLATE: LazyLock<Map> =
        LazyLock::new(|| MESSAGE_KEYS.map(|k| (k.into(), Dynamic::UNIT)).into());
    let media: Array = input.media.iter().map(|url| url.as_str().into()).collect();
    let values: [Dynamic; 7] = [
        input.body.into(),
        strings_to_map(input.contact).into(),
        input.from.into(),
        media.into(),
        Dynamic::from_int(input.received_at),
        input.message_sid.into(),
        input.to.into(),
    ];
    let mut msg = TEMPLATE.clone();
    for (slot, value) in msg.values_mut().zip(values) {
        *slot = value;
    }
    msg
}

pub(super) fn strings_to_map(fields: &BTreeMap<String, String>) -> Map {
    fields
        .iter()
        .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
        .collect()
}

pub(super) fn json_object_to_map(object: &BTreeMap<String, Value>) -> Map {
    object
        .iter()
        .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v, 0)))
        .collect()
}

/// A conversation's stored state (the JSON text of a map) straight into
/// the map a run starts from: the same values `json_object_to_map` makes
/// of the parsed JSON, without the JSON values in between. `None` when the
/// text is not a JSON object.
pub(super) fn stored_state_map(json: &str) -> Option<Map> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_str(json);
    let map = de.deserialize_map(Fields { depth: 0 }).ok()?;
    de.end().ok()?;
    Some(map)
}

/// Reads a JSON object's fields, their values at `depth` (the state's own
/// fields are at 0, as in `json_object_to_map`).
struct Fields {
    depth: usize,
}

impl<'de> serde::de::Visitor<'de> for Fields {
    type Value = Map;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Map, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key_seed(Key)? {
            let value = map.next_value_seed(ToDynamic { depth: self.depth })?;
            // A repeated key keeps its last value, as a JSON object does.
            fields.insert(key, value);
        }
        Ok(fields)
    }
}

/// A map key, kept inline when short (no allocation).
struct Key;

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = rhai::Identifier;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for Key {
    type Value = rhai::Identifier;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(s.into())
    }
}

/// Builds a JSON value as the Rhai value `json_to_dynamic` makes of it at
/// `depth`: deeper than [`MAX_STATE_DEPTH`] it is `()`, but it is still
/// read through, so the parser's own nesting limit applies as it did.
#[derive(Clone, Copy)]
struct ToDynamic {
    depth: usize,
}

impl ToDynamic {
    fn keep(self, value: Dynamic) -> Dynamic {
        if self.depth > MAX_STATE_DEPTH {
            Dynamic::UNIT
        } else {
            value
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for ToDynamic {
    type Value = Dynamic;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Dynamic, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ToDynamic {
    type Value = Dynamic;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Dynamic, E> {
        Ok(Dynamic::UNIT)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Dynamic, E> {
        Ok(self.keep(b.into()))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Dynamic, E> {
        Ok(self.keep(Dynamic::from_int(i)))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Dynamic, E> {
        // As `Value::as_i64`, then `as_f64`, read it.
        Ok(self.keep(match i64::try_from(u) {
            Ok(i) => Dynamic::from_int(i),
            Err(_) => Dynamic::from_float(u as f64),
        }))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Dynamic, E> {
        Ok(self.keep(Dynamic::from_float(f)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Dynamic, E> {
        Ok(self.keep(s.into()))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Dynamic, A::Error> {
        let inner = ToDynamic {
            depth: self.depth + 1,
        };
        let mut items = Array::new();
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(self.keep(items.into()))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Dynamic, A::Error> {
        let fields = Fields {
            depth: self.depth + 1,
        }
        .visit_map(map)?;
        Ok(self.keep(fields.into()))
    }
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

/// Where a value sits, for an error about it: `state.list[2].name`. Spelled
/// out only when there is an error; building it for every value cost a
/// string allocation per entry of every state a script returned.
#[derive(Clone, Copy)]
pub(super) enum At<'a> {
    /// The whole value, by its name (`json`).
    Root(&'a str),
    /// A map entry.
    Key(&'a At<'a>, &'a str),
    /// An array element.
    Index(&'a At<'a>, usize),
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Root(name) => f.write_str(name),
            At::Key(parent, key) => write!(f, "{parent}.{key}"),
            At::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

pub(super) fn dynamic_to_json(
    value: Dynamic,
    path: &At<'_>,
    depth: usize,
) -> Result<Value, String> {
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
            .map(|(i, item)| dynamic_to_json(item, &At::Index(path, i), depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array);
    }
    if let Some(map) = value.try_cast::<Map>() {
        return map
            .into_iter()
            .map(|(k, v)| {
                let child = dynamic_to_json(v, &At::Key(path, &k), depth + 1)?;
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
    let state = At::Root("state");
    map.into_iter()
        .map(|(k, v)| {
            let json = dynamic_to_json(v, &At::Key(&state, &k), 1)?;
            Ok((k.to_string(), json))
        })
        .collect()
}

/// Why the state a run left cannot be kept.
#[derive(Debug, PartialEq)]
pub(super) enum StateOutError {
    /// Not a map, a value JSON cannot hold, or nesting too deep: named by
    /// its path.
    Bad(String),
    /// Over this size limit (see [`state_over_limits`]).
    Over(&'static str),
}

/// The state a run left, straight to the JSON text a conversation keeps
/// (empty when the map is: the run ends). The same text, errors and limit
/// checks as [`state_from`], then [`state_over_limits`], then
/// `serde_json::to_string` (the property test below compares them), in one
/// walk and without the JSON values in between (about 0.2 µs of every
/// message to a script flow, measured with the flow engine alone).
pub(super) fn state_text(value: Dynamic, limits: &Limits) -> Result<String, StateOutError> {
    let type_name = value.type_name();
    let Some(map) = value.try_cast::<Map>() else {
        return Err(StateOutError::Bad(format!(
            "state must stay a map, but it is a {type_name}"
        )));
    };
    if map.is_empty() {
        return Ok(String::new());
    }
    let mut text = StateWriter {
        out: Vec::with_capacity(64),
        totals: Totals::default(),
    };
    text.map(&map, &At::Root("state"), 0)
        .map_err(StateOutError::Bad)?;
    if let Some(which) = text.totals.over(limits) {
        return Err(StateOutError::Over(which));
    }
    // serde_json writes only UTF-8, from our strings; this cannot fail.
    String::from_utf8(text.out)
        .map_err(|e| StateOutError::Bad(format!("the state's text is not UTF-8: {e}")))
}

/// Writes state as JSON text, measuring it as [`state_over_limits`] does.
/// Strings and numbers are written by serde_json, as `to_string` would.
struct StateWriter {
    out: Vec<u8>,
    totals: Totals,
}

impl StateWriter {
    /// A map `depth` levels down (the state itself: 0); its values sit
    /// one level further.
    fn map(&mut self, map: &Map, path: &At<'_>, depth: usize) -> Result<(), String> {
        self.out.push(b'{');
        for (i, (key, value)) in map.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.totals.entry(key);
            self.json(key.as_str());
            self.out.push(b':');
            self.value(value, &At::Key(path, key), depth + 1)?;
        }
        self.out.push(b'}');
        Ok(())
    }

    /// `dynamic_to_json`, writing instead of building.
    fn value(&mut self, value: &Dynamic, path: &At<'_>, depth: usize) -> Result<(), String> {
        if depth > MAX_STATE_DEPTH {
            return Err(format!("{path} nests deeper than {MAX_STATE_DEPTH} levels"));
        }
        if value.is_shared() {
            return self.value(&value.flatten_clone(), path, depth);
        }
        if value.is_unit() {
            self.json(());
        } else if let Ok(b) = value.as_bool() {
            self.json(b);
        } else if let Ok(i) = value.as_int() {
            self.json(i);
        } else if let Ok(f) = value.as_float() {
            if !f.is_finite() {
                return Err(format!("{path} is {f}, which JSON cannot hold"));
            }
            self.json(f);
        } else if let Ok(c) = value.as_char() {
            self.totals.bytes += c.len_utf8();
            self.json(c);
        } else if let Ok(s) = value.as_immutable_string_ref() {
            self.totals.bytes += s.len();
            self.json(s.as_str());
        } else if let Ok(items) = value.as_array_ref() {
            self.totals.elements += items.len();
            self.out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    self.out.push(b',');
                }
                self.value(item, &At::Index(path, i), depth + 1)?;
            }
            self.out.push(b']');
        } else if let Ok(map) = value.as_map_ref() {
            self.map(&map, path, depth)?;
        } else {
            return Err(format!(
                "{path} is a {}; state holds only strings, numbers, bools, arrays and maps",
                value.type_name()
            ));
        }
        Ok(())
    }

    /// One scalar, as serde_json writes it (into a `Vec`, which cannot
    /// fail).
    fn json(&mut self, scalar: impl serde::Serialize) {
        let _ = serde_json::to_writer(&mut self.out, &scalar);
    }
}

/// What the sandbox's size limits count in a state.
#[derive(Default)]
struct Totals {
    elements: usize,
    entries: usize,
    bytes: usize,
    key_bytes: usize,
    longest_key: usize,
}

impl Totals {
    fn entry(&mut self, key: &str) {
        self.entries += 1;
        self.key_bytes += key.len();
        self.longest_key = self.longest_key.max(key.len());
    }

    /// The first limit these totals break, if any.
    fn over(&self, limits: &Limits) -> Option<&'static str> {
        // Zero means "no limit", as it does for Rhai.
        let over = |count: usize, max: usize| max > 0 && count > max;
        if self.longest_key > MAX_MAP_KEY_BYTES || over(self.key_bytes, limits.max_string_len) {
            Some("map key size")
        } else if over(self.bytes, limits.max_string_len) {
            Some("string size")
        } else if over(self.elements, limits.max_array_len) {
            Some("array size")
        } else if over(self.entries, limits.max_map_len) {
            Some("map size")
        } else {
            None
        }
    }
}

/// Which size limit the state breaks, counting as the sandbox does: all
/// array elements, all map entries and all string bytes, nested ones
/// included, and map keys: each at most [`MAX_MAP_KEY_BYTES`], all of them
/// together at most the string size.
pub(super) fn state_over_limits(
    state: &BTreeMap<String, Value>,
    limits: &Limits,
) -> Option<&'static str> {
    fn entry(key: &str, value: &Value, totals: &mut Totals) {
        totals.entry(key);
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
    totals.over(limits)
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
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn the_message_map_holds_each_field_under_its_key() {
        // The map is a copy of a template filled in key order.
        assert!(MESSAGE_KEYS.is_sorted());
        let media = ["https://x/1".to_owned()];
        let contact = BTreeMap::from([("name".into(), "Ann".into())]);
        let input = ScriptInput {
            body: "hi",
            from: "+15550001111",
            to: "+15559990000",
            media: &media,
            message_sid: "SM1",
            received_at: 42,
            contact: &contact,
            ..ScriptInput::default()
        };
        let msg = message_map(&input);
        let text = |k: &str| msg[k].clone().into_string().unwrap();
        assert_eq!(msg.len(), MESSAGE_KEYS.len());
        assert_eq!(text("body"), "hi");
        assert_eq!(text("from"), "+15550001111");
        assert_eq!(text("to"), "+15559990000");
        assert_eq!(text("sid"), "SM1");
        assert_eq!(msg["received_at"].as_int(), Ok(42));
        let media = msg["media"].clone().into_array().unwrap();
        assert_eq!(media[0].clone().into_string().unwrap(), "https://x/1");
        let contact = msg["contact"].clone().cast::<Map>();
        assert_eq!(contact["name"].clone().into_string().unwrap(), "Ann");
    }

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
            serde_json::to_value(out.state_map()).unwrap(),
            json!({ "list": ["a", "b"], "n": 1.5, "flag": true,
                    "nested": { "inner": { "x": 1 } }, "none": null })
        );

        let out = run(&on_message(
            "state = #{ fresh: true, gone: 1 }; state.remove(\"gone\"); ()",
        ))
        .unwrap();
        assert_eq!(
            serde_json::to_value(out.state_map()).unwrap(),
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
        assert_eq!(out.state_map()["n"], json!(2));
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
    fn a_bad_state_value_is_named_by_its_path() {
        for (body, said) in [
            (
                "state.list = [1, #{ f: Fn(\"normalize\") }]; ()",
                "state.list[1].f is a Fn;",
            ),
            ("state.x = [1.0 / 0.0]; ()", "state.x[0] is inf,"),
        ] {
            let err = run(&on_message(body)).unwrap_err().to_string();
            assert!(err.contains(said), "{body}: {err}");
        }
        let err = run(&on_message(&format!(
            "let d = 1; for i in 0..{MAX_STATE_DEPTH} {{ d = [d]; }} state.d = d; ()"
        )))
        .unwrap_err()
        .to_string();
        let path = format!("state.d{}", "[0]".repeat(MAX_STATE_DEPTH));
        assert!(err.contains(&format!("{path} nests deeper than")), "{err}");
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

    /// Any JSON value, nested up to `depth` levels.
    fn json_value(depth: u32) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(depth, 64, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("\\PC{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A stored state's text: JSON as stored, and some that is not an
    /// object, is cut short, repeats a key or nests past the state's depth.
    fn stored_text() -> impl Strategy<Value = String> {
        prop_oneof![
            json_value(6).prop_map(|v| v.to_string()),
            (json_value(4), 0usize..40).prop_map(|(v, cut)| {
                let text = v.to_string();
                let cut = text.floor_char_boundary(cut.min(text.len()));
                text[..cut].to_owned()
            }),
            (json_value(3), json_value(3)).prop_map(|(a, b)| format!(r#"{{"k":{a},"k":{b}}}"#)),
            (0usize..140, json_value(2))
                .prop_map(|(n, v)| { format!(r#"{{"d":{}{v}{}}}"#, "[".repeat(n), "]".repeat(n)) }),
            "\\PC{0,20}",
        ]
    }

    #[test]
    fn a_character_in_state_counts_its_bytes() {
        // 'é' is one character and two bytes; a string limit counts bytes.
        let limits = Limits {
            max_string_len: 1,
            ..Limits::default()
        };
        let state = Dynamic::from_map(Map::from([("c".into(), Dynamic::from_char('é'))]));
        assert_eq!(
            state_text(state, &limits),
            Err(StateOutError::Over("string size"))
        );
        let state = Dynamic::from_map(Map::from([("c".into(), Dynamic::from_char('e'))]));
        assert_eq!(state_text(state, &limits), Ok(r#"{"c":"e"}"#.to_owned()));
    }

    /// Any value a script can leave in its state, nested up to `depth`
    /// levels, including those JSON cannot hold (a function pointer, a
    /// float that is not finite).
    fn rhai_value(depth: u32) -> impl Strategy<Value = Dynamic> {
        // Mostly ASCII, so that quotes, backslashes and every control
        // character turn up; then any character.
        let text = || {
            let char = prop_oneof![4 => (0u8..0x80).prop_map(char::from), 1 => any::<char>()];
            prop::collection::vec(char, 0..12).prop_map(String::from_iter)
        };
        let leaf = prop_oneof![
            4 => Just(Dynamic::UNIT),
            4 => any::<bool>().prop_map(Dynamic::from_bool),
            8 => any::<i64>().prop_map(Dynamic::from_int),
            8 => prop_oneof![any::<f64>(), Just(-0.0), Just(1.0), Just(1e300)].prop_map(Dynamic::from_float),
            8 => prop_oneof![(0u8..0x80).prop_map(char::from), any::<char>()].prop_map(Dynamic::from_char),
            16 => text().prop_map(Dynamic::from),
            // What JSON cannot hold.
            1 => prop_oneof![Just(f64::NAN), Just(f64::INFINITY)].prop_map(Dynamic::from_float),
            1 => Just(Dynamic::from(rhai::FnPtr::new("f").unwrap())),
        ];
        leaf.prop_recursive(depth, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Dynamic::from_array),
                prop::collection::btree_map(prop_oneof![text(), "k{0,300}"], inner, 0..6).prop_map(
                    |m| { Dynamic::from_map(m.into_iter().map(|(k, v)| (k.into(), v)).collect()) }
                ),
            ]
        })
    }

    /// A state: mostly a map of any values, sometimes one nested past
    /// the depth limit, or not a map at all.
    fn rhai_state() -> impl Strategy<Value = Dynamic> {
        prop_oneof![
            8 => prop::collection::btree_map("[a-z]{1,3}", rhai_value(4), 0..6)
                .prop_map(|m| Dynamic::from_map(m.into_iter().map(|(k, v)| (k.into(), v)).collect())),
            1 => (25usize..40, rhai_value(1)).prop_map(|(n, v)| {
                let deep = (0..n).fold(v, |v, _| Dynamic::from_array(vec![v]));
                Dynamic::from_map(Map::from([("d".into(), deep)]))
            }),
            1 => rhai_value(1),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn stored_state_is_read_as_parsing_then_converting_did(text in stored_text()) {
            // Before, the engine parsed the text into JSON values (an
            // unreadable text was an empty state) and converted those.
            let before = serde_json::from_str::<BTreeMap<String, Value>>(&text)
                .ok()
                .map(|state| json_object_to_map(&state));
            let now = stored_state_map(&text);
            prop_assert_eq!(format!("{now:?}"), format!("{before:?}"));
        }

        #[test]
        fn state_is_written_as_converting_then_serializing_did(
            state in rhai_state(),
            limits in (0usize..160, 0usize..16, 0usize..16),
        ) {
            // Limits that states often come close to, and break.
            let limits = Limits {
                max_string_len: limits.0,
                max_array_len: limits.1,
                max_map_len: limits.2,
                ..Limits::default()
            };
            // Before, the state became JSON values, was measured, and was
            // serialized.
            let before = state_from(state.clone())
                .map_err(StateOutError::Bad)
                .and_then(|map| match state_over_limits(&map, &limits) {
                    Some(which) => Err(StateOutError::Over(which)),
                    None if map.is_empty() => Ok(String::new()),
                    None => Ok(serde_json::to_string(&map).unwrap()),
                });
            prop_assert_eq!(state_text(state, &limits), before);
        }
    }
}
