//! Contacts from outside: CSV import (`POST /contacts`, `smsflow contacts
//! import`), JSON import (`POST /contacts` with a JSON list) and export
//! (`GET /contacts`, `smsflow contacts export`).
//!
//! Contact fields belong to a conversation: one of our numbers and the
//! contact's number. An import names our number once (`from`); each row
//! names the contact (`phone`, E.164) and sets the other columns as
//! contact fields. An empty cell leaves that field as it is.
//!
//! A file (or JSON list) is checked whole before anything is written:
//! every bad row is reported with its line number (a JSON contact with
//! its index), and a file with any error imports nothing. Writing is [`crate::pipeline::Pipeline::import_contacts`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::starts::{check_field_name, normalize_phone, MAX_VALUE_CHARS};

/// The column that holds the contact's number.
pub const PHONE_COLUMN: &str = "phone";
/// Most rows one request may carry (the CLI sends bigger files in parts).
pub const MAX_ROWS: usize = 100_000;
/// Most field columns a file may have.
pub const MAX_COLUMNS: usize = 50;

/// A contact's number and its fields.
pub type Contact = (String, BTreeMap<String, String>);

/// One valid row: the contact and the fields to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRow {
    /// The line it starts on (1 is the header); in a JSON import, its
    /// index in the list.
    pub line: u64,
    /// The contact's number, E.164.
    pub phone: String,
    /// Fields to set (empty cells are left out: they change nothing).
    pub fields: BTreeMap<String, String>,
}

/// A problem with one line of a file (line 1 is the header; 0: the file
/// as a whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowError {
    /// The line the problem is on.
    pub line: u64,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Whether a spreadsheet could run `value` as a formula, once any
/// leading `'`s are gone.
fn formula_like(value: &str) -> bool {
    value
        .trim_start_matches('\'')
        .starts_with(['=', '+', '-', '@'])
}

/// Undo the export's spreadsheet neutralisation: one leading `'` of a
/// formula-like value is dropped.
fn unquote(value: &str) -> &str {
    match value.strip_prefix('\'') {
        Some(rest) if formula_like(rest) => rest,
        _ => value,
    }
}

/// Parse and check a whole CSV file: a header row of field names with a
/// `phone` column, then one contact per row. Every problem is reported,
/// each with its line; any problem means no rows.
pub fn parse_csv(bytes: &[u8]) -> Result<Vec<ContactRow>, Vec<RowError>> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut errors = Vec::new();
    let mut records = reader.records();
    let header = match records.next() {
        Some(Ok(h)) => h,
        Some(Err(e)) => {
            return Err(vec![RowError {
                line: e.position().map_or(1, |p| p.line()),
                message: csv_error(&e),
            }])
        }
        None => {
            return Err(vec![RowError {
                line: 0,
                message: "empty file: expected a header row with a `phone` column".into(),
            }])
        }
    };
    let names: Vec<String> = header.iter().map(|h| h.trim().to_owned()).collect();
    let mut seen = BTreeSet::new();
    for name in &names {
        if !seen.insert(name.as_str()) {
            errors.push(RowError {
                line: 1,
                message: format!("column {name:?} appears twice"),
            });
        } else if name != PHONE_COLUMN {
            if let Err(e) = check_field_name(name) {
                errors.push(RowError {
                    line: 1,
                    message: format!("column {e}"),
                });
            }
        }
    }
    let Some(phone_at) = names.iter().position(|n| n == PHONE_COLUMN) else {
        errors.push(RowError {
            line: 1,
            message: format!("no `{PHONE_COLUMN}` column (the contact's number, E.164)"),
        });
        return Err(errors);
    };
    if names.len() - 1 > MAX_COLUMNS {
        errors.push(RowError {
            line: 1,
            message: format!("more than {MAX_COLUMNS} field columns"),
        });
    }
    let mut rows = Vec::new();
    let mut first_line: BTreeMap<String, u64> = BTreeMap::new();
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                errors.push(RowError {
                    line: e.position().map_or(0, |p| p.line()),
                    message: csv_error(&e),
                });
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        if record.iter().all(|c| c.trim().is_empty()) {
            continue; // a blank line
        }
        if record.len() != names.len() {
            errors.push(RowError {
                line,
                message: format!("{} values for {} columns", record.len(), names.len()),
            });
            continue;
        }
        if rows.len() >= MAX_ROWS {
            errors.push(RowError {
                line,
                message: format!("more than {MAX_ROWS} rows: split the file"),
            });
            break;
        }
        let phone = match normalize_phone(unquote(record.get(phone_at).unwrap_or(""))) {
            Ok(p) => p,
            Err(e) => {
                errors.push(RowError {
                    line,
                    message: format!("phone: {e}"),
                });
                continue;
            }
        };
        if let Some(first) = first_line.get(&phone) {
            errors.push(RowError {
                line,
                message: format!("{phone} is already on line {first}"),
            });
            continue;
        }
        first_line.insert(phone.clone(), line);
        let mut fields = BTreeMap::new();
        let mut ok = true;
        for (name, value) in names.iter().zip(record.iter()) {
            if name == PHONE_COLUMN || value.is_empty() {
                continue;
            }
            let value = unquote(value);
            if let Err(message) = check_value(name, value) {
                errors.push(RowError { line, message });
                ok = false;
            }
            fields.insert(name.clone(), value.to_owned());
        }
        if ok {
            rows.push(ContactRow {
                line,
                phone,
                fields,
            });
        }
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(errors)
    }
}

/// A field value's limits, the same for CSV and JSON imports.
fn check_value(name: &str, value: &str) -> Result<(), String> {
    if value.chars().count() > MAX_VALUE_CHARS {
        Err(format!("{name}: longer than {MAX_VALUE_CHARS} characters"))
    } else if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        Err(format!("{name}: control characters"))
    } else {
        Ok(())
    }
}

/// One contact of a JSON import: its number and the fields to set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonContact {
    phone: String,
    #[serde(default)]
    fields: BTreeMap<String, String>,
}

/// A problem with one contact of a JSON import (`index` 0 is the first
/// of the list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemError {
    /// The contact's place in the list, from 0.
    pub index: usize,
    /// What is wrong.
    pub message: String,
}

/// Why a JSON import was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonImportError {
    /// The body is not a JSON list.
    Body(String),
    /// Every contact with a problem.
    Items(Vec<ItemError>),
}

/// Parse and check a whole JSON import: a list of
/// `{"phone": "+1…", "fields": {"name": "Ana"}}`, with the same rules as
/// a CSV file's rows ([`parse_csv`]): E.164 numbers, field names, value
/// limits, each contact once, an empty value changes nothing. Every
/// problem is reported with the contact's index; any problem means no
/// rows.
pub fn parse_json(bytes: &[u8]) -> Result<Vec<ContactRow>, JsonImportError> {
    let items: Vec<serde_json::Value> = serde_json::from_slice(bytes).map_err(|e| {
        JsonImportError::Body(format!(
            "expected a JSON list of contacts like [{{\"phone\": \"+15551230001\", \"fields\": {{\"name\": \"Ana\"}}}}]: {e}"
        ))
    })?;
    if items.len() > MAX_ROWS {
        return Err(JsonImportError::Body(format!(
            "more than {MAX_ROWS} contacts: split the list"
        )));
    }
    let mut errors = Vec::new();
    let mut rows = Vec::new();
    let mut first: BTreeMap<String, usize> = BTreeMap::new();
    for (index, item) in items.into_iter().enumerate() {
        let mut fail = |message: String| errors.push(ItemError { index, message });
        let contact: JsonContact = match serde_json::from_value(item) {
            Ok(c) => c,
            Err(e) => {
                fail(format!(
                    "expected {{\"phone\": …, \"fields\": {{…}}}} with text values: {e}"
                ));
                continue;
            }
        };
        let phone = match normalize_phone(&contact.phone) {
            Ok(p) => p,
            Err(e) => {
                fail(format!("phone: {e}"));
                continue;
            }
        };
        if let Some(at) = first.get(&phone) {
            fail(format!("{phone} is already at index {at}"));
            continue;
        }
        first.insert(phone.clone(), index);
        let mut ok = true;
        if contact.fields.len() > MAX_COLUMNS {
            fail(format!("more than {MAX_COLUMNS} fields"));
            ok = false;
        }
        let mut fields = BTreeMap::new();
        for (name, value) in contact.fields {
            let checked = if name == PHONE_COLUMN {
                Err(format!(
                    "fields: `{PHONE_COLUMN}` is the contact's number, not a field"
                ))
            } else {
                check_field_name(&name)
                    .map_err(|e| format!("fields: {e}"))
                    .and_then(|()| check_value(&name, &value))
            };
            match checked {
                Err(message) => {
                    fail(message);
                    ok = false;
                }
                Ok(()) if value.is_empty() => {}
                Ok(()) => {
                    fields.insert(name, value);
                }
            }
        }
        if ok {
            rows.push(ContactRow {
                line: index as u64,
                phone,
                fields,
            });
        }
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(JsonImportError::Items(errors))
    }
}

fn csv_error(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
        _ => format!("malformed CSV: {e}"),
    }
}

/// A cell as a spreadsheet will not run it: a value starting with `=`,
/// `+`, `-` or `@` (after any `'`s) gets a leading `'`, which the
/// import drops again, so every value round-trips.
pub fn neutralize(value: &str) -> String {
    if formula_like(value) {
        format!("'{value}")
    } else {
        value.to_owned()
    }
}

/// Contacts as CSV: `phone`, then every field name any of them has,
/// sorted; quoting as needed, each cell through [`neutralize`].
pub fn export_csv(contacts: &[Contact]) -> String {
    let names: BTreeSet<&str> = contacts
        .iter()
        .flat_map(|(_, f)| f.keys().map(String::as_str))
        .collect();
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    let header: Vec<&str> = std::iter::once(PHONE_COLUMN)
        .chain(names.iter().copied())
        .collect();
    // Writing to a Vec cannot fail.
    let _ = writer.write_record(&header);
    for (phone, fields) in contacts {
        let row: Vec<String> = std::iter::once(neutralize(phone))
            .chain(
                names
                    .iter()
                    .map(|n| neutralize(fields.get(*n).map_or("", String::as_str))),
            )
            .collect();
        let _ = writer.write_record(&row);
    }
    String::from_utf8(writer.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// `rows` as CSV files of at most about `max_bytes` each (a header,
/// then as many rows as fit; a single longer row gets a file of its
/// own), for sending a big import in parts.
pub fn chunks(rows: &[ContactRow], max_bytes: usize) -> Vec<String> {
    let names: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.fields.keys().map(String::as_str))
        .collect();
    let header = |w: &mut csv::Writer<Vec<u8>>| {
        let h: Vec<&str> = std::iter::once(PHONE_COLUMN)
            .chain(names.iter().copied())
            .collect();
        let _ = w.write_record(&h);
    };
    let mut out = Vec::new();
    let mut w = csv::Writer::from_writer(Vec::new());
    header(&mut w);
    let mut in_chunk = 0;
    for row in rows {
        let cells: Vec<String> = std::iter::once(row.phone.clone())
            .chain(
                names
                    .iter()
                    .map(|n| neutralize(row.fields.get(*n).map_or("", String::as_str))),
            )
            .collect();
        let _ = w.write_record(&cells);
        let _ = w.flush();
        in_chunk += 1;
        if w.get_ref().len() >= max_bytes && in_chunk > 0 {
            let full = std::mem::replace(&mut w, csv::Writer::from_writer(Vec::new()));
            out.push(String::from_utf8(full.into_inner().unwrap_or_default()).unwrap_or_default());
            header(&mut w);
            in_chunk = 0;
        }
    }
    if in_chunk > 0 {
        out.push(String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default());
    }
    out
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ImportSummary {
    /// Rows in the file.
    pub rows: usize,
    /// Contacts that had no stored conversation before.
    pub created: usize,
    /// Contacts whose fields changed.
    pub updated: usize,
    /// Contacts whose fields were already so.
    pub unchanged: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_row_is_reported_with_its_line_and_nothing_is_imported() {
        let csv = "phone,name,appt\n\
                   +1 (555) 123-0001,Ana,\"Tue 3pm\"\n\
                   5551230002,Ben,Wed\n\
                   +15551230001,Ana again,Thu\n\
                   +15551230003,Cy\n\
                   \n\
                   +15551230004,\"Dee, Jr.\",\"Fri\n10am\"\n\
                   +44abc,Eve,Sat\n";
        let errors = parse_csv(csv.as_bytes()).unwrap_err();
        let lines: Vec<(u64, &str)> = errors
            .iter()
            .map(|e| (e.line, e.message.as_str()))
            .collect();
        assert_eq!(lines.len(), 4, "{errors:?}");
        assert_eq!(lines[0].0, 3);
        assert!(lines[0].1.contains("country code"), "{errors:?}");
        assert_eq!(lines[1], (4, "+15551230001 is already on line 2"));
        assert_eq!(lines[2], (5, "2 values for 3 columns"));
        assert_eq!(lines[3].0, 9, "{errors:?}");
    }

    #[test]
    fn good_rows_are_normalised_and_empty_cells_change_nothing() {
        let csv = "\u{feff}phone,name,appt\r\n+1 555 123 0001,Ana,\r\n'+15551230002,'=1+1,\"Wed, 9am\"\r\n";
        let rows = parse_csv(csv.as_bytes()).unwrap();
        assert_eq!(rows[0].phone, "+15551230001");
        assert_eq!(
            rows[0].fields,
            BTreeMap::from([("name".into(), "Ana".into())])
        );
        assert_eq!(rows[1].phone, "+15551230002");
        assert_eq!(rows[1].fields["name"], "=1+1");
        assert_eq!(rows[1].fields["appt"], "Wed, 9am");
    }

    #[test]
    fn json_imports_follow_the_csv_rules_with_indexes() {
        let good = br#"[{"phone": "+1 (555) 123-0001", "fields": {"name": "Ana", "appt": ""}},
                        {"phone": "+15551230002"}]"#;
        let rows = parse_json(good).unwrap();
        assert_eq!(rows[0].phone, "+15551230001");
        assert_eq!(
            rows[0].fields,
            BTreeMap::from([("name".into(), "Ana".into())])
        );
        assert!(rows[1].fields.is_empty());
        let bad = br#"[{"phone": "+15551230001", "fields": {"name": "Ana"}},
                       {"phone": "5551230002"},
                       {"phone": "+15551230001"},
                       {"phone": "+15551230003", "fields": {"na me": "x", "phone": "y"}},
                       {"phone": "+15551230004", "fields": {"age": 3}},
                       {"fone": "+15551230005"},
                       {"phone": "+15551230006", "fields": {"n": "a\u0007"}}]"#;
        let JsonImportError::Items(errors) = parse_json(bad).unwrap_err() else {
            panic!("not per item")
        };
        let at: Vec<usize> = errors.iter().map(|e| e.index).collect();
        assert_eq!(at, [1, 2, 3, 3, 4, 5, 6], "{errors:?}");
        assert!(errors[0].message.contains("country code"), "{errors:?}");
        assert_eq!(errors[1].message, "+15551230001 is already at index 0");
        assert!(errors[2].message.contains("not a valid name"), "{errors:?}");
        assert!(errors[3].message.contains("contact's number"), "{errors:?}");
        assert!(
            errors[6].message.contains("control characters"),
            "{errors:?}"
        );
        for body in [&b"{}"[..], b"not json", b"[1"] {
            assert!(matches!(parse_json(body), Err(JsonImportError::Body(_))));
        }
    }

    #[test]
    fn headers_are_checked() {
        for (csv, want) in [
            ("name,appt\n+15551230001,x\n", "no `phone` column"),
            ("phone,na me\n", "not a valid name"),
            ("phone,a,a\n", "appears twice"),
            ("", "empty file"),
        ] {
            let errors = parse_csv(csv.as_bytes()).unwrap_err();
            assert!(errors[0].message.contains(want), "{csv:?}: {errors:?}");
        }
    }

    #[test]
    fn export_quotes_and_neutralises_and_round_trips() {
        let contacts = vec![
            (
                "+15551230001".to_owned(),
                BTreeMap::from([
                    ("name".to_owned(), "=HYPERLINK(\"x\")".to_owned()),
                    ("note".to_owned(), "a, b\nc".to_owned()),
                ]),
            ),
            (
                "+15551230002".to_owned(),
                BTreeMap::from([("name".to_owned(), "@Ben".to_owned())]),
            ),
        ];
        let csv = export_csv(&contacts);
        assert_eq!(
            csv,
            "phone,name,note\r\n'+15551230001,\"'=HYPERLINK(\"\"x\"\")\",\"a, b\nc\"\r\n'+15551230002,'@Ben,\r\n"
        );
        let rows = parse_csv(csv.as_bytes()).unwrap();
        assert_eq!(rows[0].phone, "+15551230001");
        assert_eq!(rows[0].fields, contacts[0].1);
        assert_eq!(rows[1].fields, contacts[1].1);
        // A value that already looks neutralised survives too.
        let tricky = vec![(
            "+15551230003".to_owned(),
            BTreeMap::from([("x".to_owned(), "'=1".to_owned())]),
        )];
        let rows = parse_csv(export_csv(&tricky).as_bytes()).unwrap();
        assert_eq!(rows[0].fields, tricky[0].1);
    }

    #[test]
    fn big_imports_are_split_into_parts_that_parse_back() {
        let rows: Vec<ContactRow> = (0..1000)
            .map(|i| ContactRow {
                line: i + 2,
                phone: format!("+1555{:07}", i),
                fields: BTreeMap::from([("n".to_owned(), format!("={i}, x"))]),
            })
            .collect();
        let parts = chunks(&rows, 4096);
        assert!(
            parts.len() > 5 && parts.iter().all(|p| p.len() < 4200),
            "{}",
            parts.len()
        );
        let back: Vec<ContactRow> = parts
            .iter()
            .flat_map(|p| parse_csv(p.as_bytes()).unwrap())
            .collect();
        assert_eq!(back.len(), 1000);
        assert!(back
            .iter()
            .zip(&rows)
            .all(|(a, b)| a.phone == b.phone && a.fields == b.fields));
    }
}

/// One contact as `smsflow export contacts` writes it: a conversation of
/// one of our numbers, its consent state there and its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactExport {
    /// Our number.
    pub our_number: String,
    /// The contact's number.
    pub phone: String,
    /// `opted_out` or `opted_in` (after a STOP, then START), `None` when
    /// the contact never changed consent towards `our_number`.
    pub consent: Option<&'static str>,
    /// Unix seconds of the last consent change.
    pub consent_changed_at: Option<i64>,
    /// Unix seconds of the conversation's last activity.
    pub last_activity: i64,
    /// The contact's fields.
    pub fields: BTreeMap<String, String>,
}

/// Every contact of every number of ours in `store` (every conversation
/// record: one that texted us, or was imported or started, and is not
/// purged yet), in (our number, phone) order, with its consent state
/// towards that number (its Messaging Service's, if it opted out
/// through one, is not shown) and last activity. A conversation that
/// does not decode is left out.
pub fn export_all(
    store: &impl crate::store::Store,
) -> Result<Vec<ContactExport>, crate::store::StoreError> {
    let mut out = Vec::new();
    for (key, last_activity, stored) in store.all_conversations()? {
        let conversation = match stored.conversation {
            Some(bytes) => match crate::flow::Conversation::from_stored(&bytes) {
                Ok(c) => c,
                Err(_) => continue,
            },
            None => crate::flow::Conversation::default(),
        };
        let consent = store.opt_out(&key.to, &key.from)?;
        out.push(ContactExport {
            consent: consent
                .as_ref()
                .map(|c| if c.opted_out { "opted_out" } else { "opted_in" }),
            consent_changed_at: consent.map(|c| c.at),
            our_number: key.to,
            phone: key.from,
            last_activity,
            fields: conversation.contact,
        });
    }
    Ok(out)
}

/// The fixed columns of [`export_all_csv`], before one `contact.NAME`
/// column per field (sorted by name).
pub const EXPORT_COLUMNS: [&str; 5] = [
    "our_number",
    "phone",
    "consent",
    "consent_changed_at",
    "last_activity",
];

/// `rows` as CSV: [`EXPORT_COLUMNS`] (times in UTC), then a
/// `contact.NAME` column per field any contact has, sorted; every cell
/// through [`neutralize`].
pub fn export_all_csv(rows: &[ContactExport]) -> String {
    let names: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.fields.keys().map(String::as_str))
        .collect();
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    let header: Vec<String> = EXPORT_COLUMNS
        .iter()
        .map(|c| (*c).to_owned())
        .chain(names.iter().map(|n| neutralize(&format!("contact.{n}"))))
        .collect();
    // Writing to a Vec cannot fail.
    let _ = writer.write_record(&header);
    for r in rows {
        let fixed = [
            r.our_number.clone(),
            r.phone.clone(),
            r.consent.unwrap_or("").to_owned(),
            r.consent_changed_at
                .map(crate::results::iso_utc)
                .unwrap_or_default(),
            crate::results::iso_utc(r.last_activity),
        ];
        let row: Vec<String> = fixed
            .iter()
            .map(|c| neutralize(c))
            .chain(
                names
                    .iter()
                    .map(|n| neutralize(r.fields.get(*n).map_or("", String::as_str))),
            )
            .collect();
        let _ = writer.write_record(&row);
    }
    String::from_utf8(writer.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// `rows` as JSON lines, one contact per line.
pub fn export_all_jsonl(rows: &[ContactExport]) -> String {
    let mut out = String::new();
    for r in rows {
        // Serialising a plain struct cannot fail.
        out.push_str(&serde_json::to_string(r).unwrap_or_default());
        out.push('\n');
    }
    out
}
