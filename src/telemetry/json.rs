//! `--log-format json`: one JSON object per line, for log shippers.
//!
//! Every line has `timestamp` (RFC 3339, UTC), `level`, `target` and
//! `message` first, then `span` (the innermost span's name, e.g. `sms` or
//! `status`) and the fields of every span in scope, outermost first, then
//! the event's own fields, all at the top level under their own names
//! (`message_sid`, `from`, `flow`, `step`, `outcome`, …). An event field
//! wins over a span field of the same name, so no key appears twice.
//! Numbers and booleans stay JSON numbers and booleans; anything else is a
//! string. serde_json escapes every control character, so one event is
//! one line whatever the text in it.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats a span's fields as a JSON object, kept with the span until an
/// event inside it is written.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct JsonFields;

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut map = Map::new();
        fields.record(&mut JsonVisitor(&mut map));
        writer.write_str(&Value::Object(map).to_string())
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut map = match serde_json::from_str(&current.fields) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        fields.record(&mut JsonVisitor(&mut map));
        current.fields = Value::Object(map).to_string();
        Ok(())
    }
}

/// Writes each event as one JSON object on one line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct JsonEvent;

impl<S, N> FormatEvent<S, N> for JsonEvent
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut event_fields = Map::new();
        event.record(&mut JsonVisitor(&mut event_fields));

        let message = event_fields.remove("message").unwrap_or(Value::Null);
        // A record bridged from the `log` crate (sled logs through it)
        // names its real target in a field; its metadata says `log`.
        let target = match event_fields.remove("log.target") {
            Some(Value::String(t)) => t,
            _ => meta.target().to_owned(),
        };
        let mut rest = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                rest.insert("span".into(), span.name().into());
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(m)) = serde_json::from_str(fields) {
                    rest.extend(m);
                }
            }
        }
        rest.extend(event_fields);
        // The four keys every line has come first, in this order (the map
        // would sort them); a field may not shadow them.
        let head = [
            ("timestamp", Value::from(timestamp)),
            ("level", meta.level().as_str().into()),
            ("target", target.into()),
            ("message", message),
        ];
        writer.write_char('{')?;
        for (i, (key, value)) in head.iter().enumerate() {
            rest.remove(*key);
            if i > 0 {
                writer.write_char(',')?;
            }
            write!(writer, "{}:{value}", Value::from(*key))?;
        }
        for (key, value) in &rest {
            write!(writer, ",{}:{value}", Value::from(key.as_str()))?;
        }
        writer.write_char('}')?;
        writer.write_char('\n')
    }
}

/// Records fields into a JSON map under their own names.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        // Metadata of records bridged from the `log` crate: its target is
        // kept for the line's `target`, the rest (module, file, line) is
        // left out, as the text format does.
        if name.starts_with("log.") && name != "log.target" {
            return;
        }
        self.0
            .insert(name.trim_start_matches("r#").to_owned(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%display` fields and the message arrive here already formatted
        // by their Display; `?debug` ones by their Debug.
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Captured;
    use super::*;

    #[test]
    fn one_object_per_line_with_span_fields_flattened() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(JsonFields)
            .event_format(JsonEvent)
            .with_writer({
                let out = out.clone();
                move || out.clone()
            })
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let forged = "hi\n{\"level\":\"INFO\"}\r\x1b[2K";
        tracing::subscriber::with_default(subscriber, || {
            let span =
                tracing::info_span!("sms", message_sid = "SM1", flow = tracing::field::Empty);
            let _in = span.enter();
            span.record("flow", "signup");
            tracing::info!(step = "ask", replies = 2_u64, ok = true, body = %forged, "{forged}");
            tracing::warn!(message_sid = "SM2", r#type = -1_i64, "override");
        });
        // Outside any span, as a record bridged from the `log` crate
        // carries its origin.
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .fmt_fields(JsonFields)
                .event_format(JsonEvent)
                .with_writer({
                    let out = out.clone();
                    move || out.clone()
                })
                .finish(),
            || tracing::warn!(log.target = "sled::pagecache", log.line = 7_u64, "bridged"),
        );
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let first: Value = serde_json::from_str(lines[0]).unwrap();
        assert!(lines[0].starts_with("{\"timestamp\":\"20"), "{}", lines[0]);
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["target"], module_path!());
        assert_eq!(first["message"], forged);
        assert_eq!(first["body"], forged);
        assert_eq!(first["span"], "sms");
        assert_eq!(first["message_sid"], "SM1");
        assert_eq!(first["flow"], "signup");
        assert_eq!(first["step"], "ask");
        assert_eq!(first["replies"], 2);
        assert_eq!(first["ok"], true);
        let second: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["message_sid"], "SM2");
        assert_eq!(second["type"], -1);
        assert_eq!(lines[1].matches("message_sid").count(), 1, "{}", lines[1]);
        let bridged: Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(bridged["target"], "sled::pagecache", "{bridged}");
        assert_eq!(bridged["message"], "bridged");
        assert!(bridged.get("span").is_none(), "{bridged}");
        assert!(!lines[2].contains("log."), "{}", lines[2]);
    }
}
