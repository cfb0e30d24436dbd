//! Campaigns: events at a time relative to a contact's date field
//! (`1 day before appt at 10:00`) that start a flow for that contact.
//!
//! This file holds the validated model (read by `load/campaigns.rs` from a
//! file with a top-level `campaigns:`), the `when:` grammar, and the pure
//! computation of a contact's events from its fields: which date a field
//! holds, in which time zone, and the unix time each event is due. The
//! pipeline turns the earliest event into the conversation's next due time
//! (the timer index), and fires due events as flow starts keyed by
//! [`CampaignDue::key`], so each is sent at most once per contact and
//! date. Pure: no clock, no store. Uses jiff for calendars and time zones
//! (its zone data is bundled: no file is read).

use std::collections::BTreeMap;
use std::path::PathBuf;

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::Timestamp;

use super::model::{FlowSet, Pos, Target};

/// The contact field a campaign reads the contact's time zone from when
/// the campaign does not name one.
pub const DEFAULT_ZONE_FIELD: &str = "tz";

/// One campaign: events relative to one date field.
#[derive(Clone, Debug)]
pub(crate) struct Campaign {
    pub name: String,
    /// The contact field holding the date (or date and time).
    pub field: String,
    pub field_pos: Pos,
    /// The contact field holding an IANA zone name, if the contact has one.
    pub zone_field: String,
    pub events: Vec<CampaignEvent>,
    pub file: PathBuf,
}

/// One event of a campaign.
#[derive(Clone, Debug)]
pub(crate) struct CampaignEvent {
    pub name: String,
    pub when: When,
    /// The flow it starts.
    pub flow: Target,
    /// End a run in progress (`if_busy: interrupt`, the default), or start
    /// nothing while the contact is in one (`skip`).
    pub interrupt: bool,
}

/// A parsed `when:`: an offset from the field's date, and the time of day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct When {
    pub offset: Offset,
    /// `at HH:MM`: the local time of day (with a day or week offset, or
    /// none).
    pub at: Option<(i8, i8)>,
}

/// How far from the field's date (negative: before).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offset {
    /// Calendar days (weeks are 7 days): the local date moves, the local
    /// time stays (or becomes `at`).
    Days(i32),
    /// Seconds (minutes and hours): elapsed time.
    Secs(i64),
}

/// Longest offset a `when:` may say: ten years of days.
const MAX_DAYS: i64 = 3660;

/// Parse a `when:` value: `[N unit before|after] [at HH:MM]`, units
/// `minute(s)`, `hour(s)`, `day(s)`, `week(s)`; at least one part; `at`
/// only with days, weeks or no offset. The error says what is wrong.
pub(crate) fn parse_when(s: &str) -> Result<When, String> {
    const FORM: &str = "write `when:` like `1 day before at 10:00`, `2 hours before`, \
                        `3 days after` or `at 09:00` (the day itself)";
    let words: Vec<&str> = s.split_whitespace().collect();
    let (offset_words, at_words) = match words.iter().position(|w| *w == "at") {
        Some(i) => (&words[..i], Some(&words[i + 1..])),
        None => (&words[..], None),
    };
    let offset = match offset_words {
        [] => None,
        [n, unit, dir] => {
            let n: i64 = n
                .parse()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("`{n}` is not a whole number; {FORM}"))?;
            let sign = match *dir {
                "before" => -1,
                "after" => 1,
                other => {
                    return Err(format!(
                        "expected `before` or `after`, got `{other}`; {FORM}"
                    ))
                }
            };
            let unit = unit.to_ascii_lowercase();
            let (days, secs) = match unit.trim_end_matches('s') {
                "minute" | "min" => (None, Some(60)),
                "hour" | "h" => (None, Some(3600)),
                "day" | "d" => (Some(1), None),
                "week" | "w" => (Some(7), None),
                _ => {
                    return Err(format!(
                        "unknown unit `{unit}` (minutes, hours, days, weeks); {FORM}"
                    ))
                }
            };
            Some(match (days, secs) {
                (Some(d), _) => {
                    let total = n * d;
                    if total > MAX_DAYS {
                        return Err(format!("an offset of more than {MAX_DAYS} days"));
                    }
                    Offset::Days((sign * total) as i32)
                }
                (None, Some(s)) => {
                    let total = n.saturating_mul(s);
                    if total > MAX_DAYS * 86_400 {
                        return Err(format!("an offset of more than {MAX_DAYS} days"));
                    }
                    Offset::Secs(sign * total)
                }
                (None, None) => unreachable!("every unit is days or seconds"),
            })
        }
        _ => return Err(FORM.to_owned()),
    };
    let at = match at_words {
        None => None,
        Some([t]) => Some(
            hh_mm(t).ok_or_else(|| format!("`{t}` is not a time like 10:00 (HH:MM, 24-hour)"))?,
        ),
        Some(_) => return Err(FORM.to_owned()),
    };
    if offset.is_none() && at.is_none() {
        return Err(FORM.to_owned());
    }
    if matches!(offset, Some(Offset::Secs(_))) && at.is_some() {
        return Err("`at HH:MM` goes with days or weeks; with minutes or hours the time follows the field's".into());
    }
    Ok(When {
        offset: offset.unwrap_or(Offset::Days(0)),
        at,
    })
}

fn hh_mm(s: &str) -> Option<(i8, i8)> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i8, i8) = (h.parse().ok()?, m.parse().ok()?);
    ((0..24).contains(&h) && (0..60).contains(&m)).then_some((h, m))
}

/// Our numbers' time zones (from the config's `[[quiet_hours]]` rules: a
/// rule's `time_zone` is its number's, `*` for every other number), for
/// contacts without a valid zone field of their own. Without either,
/// times are UTC.
#[derive(Clone, Debug, Default)]
pub struct NumberZones {
    zones: Vec<(String, TimeZone)>,
}

impl NumberZones {
    /// Zones by our number (E.164, a Messaging Service SID, or `*`) and
    /// IANA name; a name jiff does not know is left out (the config has
    /// already refused it).
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> NumberZones {
        NumberZones {
            zones: pairs
                .into_iter()
                .filter_map(|(n, z)| Some((n.trim().to_owned(), TimeZone::get(z.trim()).ok()?)))
                .collect(),
        }
    }

    fn of(&self, number: &str) -> Option<&TimeZone> {
        let find = |n: &str| self.zones.iter().find(|(k, _)| k == n).map(|(_, z)| z);
        find(number).or_else(|| find("*"))
    }
}

/// A contact's campaign event, computed from its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CampaignDue {
    /// The campaign's name.
    pub campaign: String,
    /// The event's name.
    pub event: String,
    /// The field's value it was computed from (trimmed).
    pub date: String,
    /// Unix seconds it is due.
    pub due: i64,
    /// The flow it starts.
    pub flow: String,
    /// Whether it ends a run in progress (else it skips a busy contact).
    pub interrupt: bool,
}

impl CampaignDue {
    /// The event's idempotency key for contact `contact` of our number
    /// `our`: one start per campaign, event, conversation and date, across
    /// restarts and repeats.
    pub fn key(&self, our: &str, contact: &str) -> String {
        format!(
            "campaign:{}:{}:{our}:{contact}:{}",
            self.campaign, self.event, self.date
        )
    }
}

/// Read a date field: `2026-12-01` (midnight), `2026-12-01 15:00` or
/// `2026-12-01T15:00[:SS]` (local time), or an instant with an offset
/// (`2026-12-01T15:00:00Z`, `…+01:00`), which becomes local time in `zone`.
pub(crate) fn parse_date(value: &str, zone: &TimeZone) -> Option<DateTime> {
    let v = value.trim();
    if v.is_empty() || v.len() > 40 {
        return None;
    }
    if let Ok(ts) = v.parse::<Timestamp>() {
        return Some(ts.to_zoned(zone.clone()).datetime());
    }
    if let Ok(dt) = v.parse::<DateTime>() {
        return Some(dt);
    }
    v.parse::<Date>()
        .ok()
        .map(|d| d.to_datetime(Time::midnight()))
}

/// When `when` falls for a field holding `base` (local time in `zone`).
fn due_time(base: DateTime, when: When, zone: &TimeZone) -> Option<i64> {
    let local = |dt: DateTime| -> Option<i64> {
        Some(dt.to_zoned(zone.clone()).ok()?.timestamp().as_second())
    };
    match when.offset {
        Offset::Days(d) => {
            let date = base.date().checked_add(jiff::Span::new().days(d)).ok()?;
            let time = match when.at {
                Some((h, m)) => Time::new(h, m, 0, 0).ok()?,
                None => base.time(),
            };
            local(date.to_datetime(time))
        }
        Offset::Secs(s) => local(base)?.checked_add(s),
    }
}

/// The events of every campaign in `set` for one contact of our number
/// `our` with fields `contact`, in campaign and event order. A campaign
/// whose field is missing or not a date gives nothing.
pub fn campaign_events(
    set: &FlowSet,
    zones: &NumberZones,
    our: &str,
    contact: &BTreeMap<String, String>,
) -> Vec<CampaignDue> {
    let mut out = Vec::new();
    for c in &set.inner.campaigns {
        let Some(value) = contact.get(&c.field) else {
            continue;
        };
        let zone = contact
            .get(&c.zone_field)
            .and_then(|z| TimeZone::get(z.trim()).ok())
            .or_else(|| zones.of(our).cloned())
            .unwrap_or(TimeZone::UTC);
        let Some(base) = parse_date(value, &zone) else {
            continue;
        };
        for e in &c.events {
            if let Some(due) = due_time(base, e.when, &zone) {
                out.push(CampaignDue {
                    campaign: c.name.clone(),
                    event: e.name.clone(),
                    date: value.trim().to_owned(),
                    due,
                    flow: e.flow.name.clone(),
                    interrupt: e.interrupt,
                });
            }
        }
    }
    out
}

/// The earliest campaign event of this contact due strictly after `after`.
pub fn next_campaign_due(
    set: &FlowSet,
    zones: &NumberZones,
    our: &str,
    contact: &BTreeMap<String, String>,
    after: i64,
) -> Option<i64> {
    if set.inner.campaigns.is_empty() || contact.is_empty() {
        return None;
    }
    campaign_events(set, zones, our, contact)
        .into_iter()
        .map(|e| e.due)
        .filter(|d| *d > after)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_reads_offsets_and_times() {
        assert_eq!(
            parse_when("1 day before at 10:00").unwrap(),
            When {
                offset: Offset::Days(-1),
                at: Some((10, 0))
            }
        );
        assert_eq!(
            parse_when("2 hours before").unwrap().offset,
            Offset::Secs(-7200)
        );
        assert_eq!(
            parse_when("3 weeks after").unwrap().offset,
            Offset::Days(21)
        );
        assert_eq!(
            parse_when("at 9:30").unwrap(),
            When {
                offset: Offset::Days(0),
                at: Some((9, 30))
            }
        );
        for bad in [
            "",
            "tomorrow",
            "1 day",
            "1 fortnight before",
            "-1 day before",
            "2 hours before at 10:00",
            "1 day before at 25:00",
            "1 day before at 10",
            "99999 days after",
        ] {
            assert!(parse_when(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn due_times_follow_the_zone_and_daylight_saving() {
        let ny = TimeZone::get("America/New_York").unwrap();
        let base = parse_date("2026-11-02 15:00", &ny).unwrap();
        // The day before at 10:00 is Nov 1, the day DST ends: 10:00 EST.
        let due = due_time(base, parse_when("1 day before at 10:00").unwrap(), &ny).unwrap();
        assert_eq!(
            Timestamp::from_second(due).unwrap().to_string(),
            "2026-11-01T15:00:00Z"
        );
        let due = due_time(base, parse_when("2 hours before").unwrap(), &ny).unwrap();
        assert_eq!(
            Timestamp::from_second(due).unwrap().to_string(),
            "2026-11-02T18:00:00Z"
        );
        // A date alone is midnight; an instant with an offset is read as one.
        assert_eq!(
            parse_date("2026-11-02", &ny).unwrap().to_string(),
            "2026-11-02T00:00:00"
        );
        assert_eq!(
            parse_date("2026-11-02T20:00:00Z", &ny).unwrap().to_string(),
            "2026-11-02T15:00:00"
        );
        assert!(parse_date("Tue 3pm", &ny).is_none());
    }
}
