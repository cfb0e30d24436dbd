//! Flow results from outside: `smsflow export results FLOW` and
//! `GET /flows/{name}/results`, one row per ended run, as CSV or JSON
//! lines.
//!
//! The records are the store's [`RunResult`]s, written by the pipeline in
//! the same commit as the step that ended each run. This module only
//! reads and renders them; CSV cells go through the contacts export's
//! spreadsheet neutralising ([`crate::contacts::neutralize`]).
//!
//! CSV columns, in this order: `flow`, `our_number`, `contact`,
//! `started_at`, `ended_at` (UTC, `2026-11-30T08:15:00Z`), `ended`
//! (`completed`, `expired`, `interrupted`, `opted_out`, `gave_up`,
//! `stale`), `path` (the steps entered, joined by ` > `), then one
//! `var.NAME` column per run variable any exported run saved, sorted by
//! name, then one `contact.NAME` column per contact field, sorted by
//! name. Rows are in end-time order. A cell a run has no value for is
//! empty.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::contacts::neutralize;
use crate::store::{RunResult, Store, StoreError};

/// How results are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One row per run, a column per variable (spreadsheet-safe).
    #[default]
    Csv,
    /// One JSON object per run and line (the stored record, without its
    /// version).
    Jsonl,
}

impl Format {
    /// The media type of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Jsonl => "application/x-ndjson",
        }
    }
}

/// The fixed columns of the CSV, before the variables and contact fields.
pub const FIXED_COLUMNS: [&str; 7] = [
    "flow",
    "our_number",
    "contact",
    "started_at",
    "ended_at",
    "ended",
    "path",
];

/// The results of `flow`'s runs that ended at or after `since`, rendered
/// in `format`.
pub fn export(
    store: &impl Store,
    flow: &str,
    since: i64,
    format: Format,
) -> Result<String, StoreError> {
    let results = store.results(flow, since)?;
    Ok(render(&results, format))
}

/// `results` in `format`.
pub fn render(results: &[RunResult], format: Format) -> String {
    match format {
        Format::Csv => to_csv(results),
        Format::Jsonl => to_jsonl(results),
    }
}

/// `results` as CSV (see the module doc for the columns).
pub fn to_csv(results: &[RunResult]) -> String {
    let vars: BTreeSet<&str> = results
        .iter()
        .flat_map(|r| r.vars.keys().map(String::as_str))
        .collect();
    let fields: BTreeSet<&str> = results
        .iter()
        .flat_map(|r| r.fields.keys().map(String::as_str))
        .collect();
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    let header: Vec<String> = FIXED_COLUMNS
        .iter()
        .map(|c| (*c).to_owned())
        .chain(vars.iter().map(|v| format!("var.{v}")))
        .chain(fields.iter().map(|f| format!("contact.{f}")))
        .collect();
    // Writing to a Vec cannot fail.
    let _ = writer.write_record(header.iter().map(|h| neutralize(h)));
    for r in results {
        let fixed = [
            r.flow.clone(),
            r.to.clone(),
            r.contact.clone(),
            iso_utc(r.started_at),
            iso_utc(r.ended_at),
            r.ended.clone(),
            r.path.join(" > "),
        ];
        let row: Vec<String> = fixed
            .iter()
            .map(|c| neutralize(c))
            .chain(
                vars.iter()
                    .map(|v| neutralize(r.vars.get(*v).map_or("", String::as_str))),
            )
            .chain(
                fields
                    .iter()
                    .map(|f| neutralize(r.fields.get(*f).map_or("", String::as_str))),
            )
            .collect();
        let _ = writer.write_record(&row);
    }
    String::from_utf8(writer.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// `results` as JSON lines: one object per run.
pub fn to_jsonl(results: &[RunResult]) -> String {
    let mut out = String::new();
    for r in results {
        // Serialising a plain struct cannot fail.
        out.push_str(&serde_json::to_string(r).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Unix seconds as UTC, `2026-11-30T08:15:00Z`.
pub fn iso_utc(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date of a
/// day count from 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The day count from 1970-01-01 of a proleptic Gregorian date (the
/// inverse of `civil_from_days`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A `--since`/`since=` value: unix seconds, a UTC date (`2026-11-30`),
/// or a UTC time (`2026-11-30T08:15:00Z`).
pub fn parse_since(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = || format!("{s:?}: expected unix seconds, 2026-11-30 or 2026-11-30T08:15:00Z");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let y: i64 = y.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    let d: u32 = d.parse().map_err(|_| bad())?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y.to_string().len() != 4 {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(time) = time {
        let hms: Vec<&str> = time.split(':').collect();
        let [h, mi, se] = hms[..] else {
            return Err(bad());
        };
        let (h, mi, se): (i64, i64, i64) = (
            h.parse().map_err(|_| bad())?,
            mi.parse().map_err(|_| bad())?,
            se.parse().map_err(|_| bad())?,
        );
        if h > 23 || mi > 59 || se > 60 {
            return Err(bad());
        }
        secs += h * 3600 + mi * 60 + se;
    }
    Ok(secs)
}

#[cfg(test)]
mod tests;
