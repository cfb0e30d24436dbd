//! Quiet hours: a daily window, in an IANA time zone, when a sending number
//! sends nothing on its own. A message due inside it is deferred to the
//! window's end, never dropped. Uses jiff (as campaigns do; its zone data
//! is bundled, so the machine's zoneinfo does not matter).

use serde::Deserialize;

/// One `[[quiet_hours]]` table of the config file, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuietHours {
    /// Our number (E.164), a Messaging Service SID (`MG…`), or `*` for
    /// every number without a rule of its own.
    pub number: String,
    /// Start of the quiet period, `HH:MM` local time.
    pub start: String,
    /// End of the quiet period, `HH:MM` local time (before `start`: the
    /// period spans midnight).
    pub end: String,
    /// IANA time zone, e.g. `America/New_York`.
    pub time_zone: String,
}

/// A validated quiet-hours rule.
#[derive(Debug, Clone)]
pub struct QuietHours {
    raw: RawQuietHours,
    start: (i8, i8),
    end: (i8, i8),
    zone: jiff::tz::TimeZone,
}

fn hh_mm(what: &str, s: &str) -> Result<(i8, i8), String> {
    let bad = || format!("{what} {s:?} is not a time like 21:00 (HH:MM, 24-hour)");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (i8, i8) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(0..24).contains(&h) || !(0..60).contains(&m) || s.trim().len() != 5 {
        return Err(bad());
    }
    Ok((h, m))
}

impl QuietHours {
    /// Check one rule: times, zone and number.
    pub fn parse(raw: RawQuietHours) -> Result<QuietHours, String> {
        let n = raw.number.trim();
        let number_ok = n == "*"
            || (n.starts_with('+') && n.len() > 2 && n[1..].bytes().all(|b| b.is_ascii_digit()))
            || (n.starts_with("MG") && n.len() == 34);
        if !number_ok {
            return Err(format!(
                "number {:?} must be our number in E.164 (+15551234567), a Messaging Service \
                 SID (MG…) or \"*\"",
                raw.number
            ));
        }
        let start = hh_mm("start", &raw.start)?;
        let end = hh_mm("end", &raw.end)?;
        if start == end {
            return Err(format!(
                "start and end are both {}: the quiet period would be empty or the whole day",
                raw.start
            ));
        }
        let zone = jiff::tz::TimeZone::get(raw.time_zone.trim()).map_err(|_| {
            format!(
                "time_zone {:?} is not an IANA time zone name (like America/New_York or Europe/Paris)",
                raw.time_zone
            )
        })?;
        Ok(QuietHours {
            raw,
            start,
            end,
            zone,
        })
    }

    /// The rule as written in the config file.
    pub fn raw(&self) -> &RawQuietHours {
        &self.raw
    }

    /// If `at` (unix seconds) falls inside the quiet period, the unix time
    /// it ends.
    pub fn ends_after(&self, at: i64) -> Option<i64> {
        let now = jiff::Timestamp::from_second(at)
            .ok()?
            .to_zoned(self.zone.clone());
        let minute = |(h, m): (i8, i8)| i32::from(h) * 60 + i32::from(m);
        let (s, e, m) = (
            minute(self.start),
            minute(self.end),
            minute((now.hour(), now.minute())),
        );
        let inside = if s < e {
            s <= m && m < e
        } else {
            m >= s || m < e
        };
        if !inside {
            return None;
        }
        let end_on = |date: jiff::civil::Date| {
            date.at(self.end.0, self.end.1, 0, 0)
                .to_zoned(self.zone.clone())
                .ok()
                .map(|z| z.timestamp().as_second())
        };
        let today = end_on(now.date())?;
        if today > at {
            Some(today)
        } else {
            end_on(now.date().tomorrow().ok()?)
        }
    }
}

/// The end of the quiet period `at` falls in for a message from our
/// number `from` (or Messaging Service `service`): the rule naming it, else
/// the `*` rule.
pub(crate) fn quiet_until(
    rules: &[QuietHours],
    from: &str,
    service: Option<&str>,
    at: i64,
) -> Option<i64> {
    let named = |n: &str| n == from || Some(n) == service;
    let rule = rules
        .iter()
        .find(|r| named(r.raw.number.trim()))
        .or_else(|| rules.iter().find(|r| r.raw.number.trim() == "*"))?;
    rule.ends_after(at)
}

/// Check every rule of the config file, naming the one at fault; one rule
/// per number.
pub(crate) fn parse_all(raw: Vec<RawQuietHours>) -> Result<Vec<QuietHours>, String> {
    let mut out: Vec<QuietHours> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let number = r.number.clone();
        let rule = QuietHours::parse(r)
            .map_err(|e| format!("quiet_hours rule {} (number {number:?}): {e}", i + 1))?;
        if out.iter().any(|o| o.raw.number.trim() == number.trim()) {
            return Err(format!(
                "quiet_hours rule {} repeats number {number:?}: one rule per number",
                i + 1
            ));
        }
        out.push(rule);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(number: &str, start: &str, end: &str, tz: &str) -> Result<QuietHours, String> {
        QuietHours::parse(RawQuietHours {
            number: number.into(),
            start: start.into(),
            end: end.into(),
            time_zone: tz.into(),
        })
    }

    /// Unix seconds of a New York wall-clock time.
    fn ny(s: &str) -> i64 {
        s.parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned(jiff::tz::TimeZone::get("America/New_York").unwrap())
            .unwrap()
            .timestamp()
            .as_second()
    }

    #[test]
    fn a_period_across_midnight_ends_the_next_morning() {
        let r = rule("*", "21:00", "08:00", "America/New_York").unwrap();
        assert_eq!(r.ends_after(ny("2026-03-02T20:59")), None);
        assert_eq!(
            r.ends_after(ny("2026-03-02T21:00")),
            Some(ny("2026-03-03T08:00"))
        );
        assert_eq!(
            r.ends_after(ny("2026-03-03T07:59")),
            Some(ny("2026-03-03T08:00"))
        );
        assert_eq!(r.ends_after(ny("2026-03-03T08:00")), None);
        // Across the spring-forward night the period is an hour shorter.
        assert_eq!(
            r.ends_after(ny("2026-03-07T23:00")),
            Some(ny("2026-03-08T08:00"))
        );
        assert_eq!(ny("2026-03-08T08:00") - ny("2026-03-07T23:00"), 8 * 3600);
    }

    #[test]
    fn a_period_within_a_day() {
        let r = rule("+15550001111", "12:00", "13:30", "Europe/Paris").unwrap();
        let paris = |s: &str| {
            s.parse::<jiff::civil::DateTime>()
                .unwrap()
                .to_zoned(jiff::tz::TimeZone::get("Europe/Paris").unwrap())
                .unwrap()
                .timestamp()
                .as_second()
        };
        assert_eq!(
            r.ends_after(paris("2026-06-01T12:10")),
            Some(paris("2026-06-01T13:30"))
        );
        assert_eq!(r.ends_after(paris("2026-06-01T13:30")), None);
        assert_eq!(r.ends_after(paris("2026-06-01T11:59")), None);
    }

    #[test]
    fn the_number_s_own_rule_wins_over_the_star() {
        let rules = parse_all(vec![
            RawQuietHours {
                number: "*".into(),
                start: "00:00".into(),
                end: "23:59".into(),
                time_zone: "UTC".into(),
            },
            RawQuietHours {
                number: "+15550001111".into(),
                start: "03:00".into(),
                end: "03:01".into(),
                time_zone: "UTC".into(),
            },
        ])
        .unwrap();
        let noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600;
        assert_eq!(quiet_until(&rules, "+15550001111", None, noon), None);
        assert!(quiet_until(&rules, "+15550002222", None, noon).is_some());
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        let err = rule("*", "9pm", "08:00", "UTC").unwrap_err();
        assert!(
            err.contains("start \"9pm\" is not a time like 21:00"),
            "{err}"
        );
        let err = rule("*", "21:00", "24:00", "UTC").unwrap_err();
        assert!(err.contains("end \"24:00\""), "{err}");
        let err = rule("*", "21:00", "08:00", "America/Neu_York").unwrap_err();
        assert!(err.contains("not an IANA time zone"), "{err}");
        let err = rule("5550001111", "21:00", "08:00", "UTC").unwrap_err();
        assert!(err.contains("E.164"), "{err}");
        let err = rule("*", "08:00", "08:00", "UTC").unwrap_err();
        assert!(err.contains("both 08:00"), "{err}");
        let twice = RawQuietHours {
            number: "*".into(),
            start: "21:00".into(),
            end: "08:00".into(),
            time_zone: "UTC".into(),
        };
        let err = parse_all(vec![twice.clone(), twice]).unwrap_err();
        assert!(err.contains("rule 2 repeats number \"*\""), "{err}");
    }
}
