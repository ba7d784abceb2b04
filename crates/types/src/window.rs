//! Event-time windows, pro-rata splitting of intervals across them, and billing periods.

use crate::Millis;
use chrono::{Datelike, TimeZone, Utc};

/// Tumbling windows of `size` ms aligned to the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tumbling {
    pub size: Millis,
}

impl Tumbling {
    pub fn new(size: Millis) -> Tumbling {
        assert!(size > 0, "window size must be positive");
        Tumbling { size }
    }
    pub fn start_of(&self, t: Millis) -> Millis {
        t.div_euclid(self.size) * self.size
    }
    /// The windows `[start, end)` overlaps, each with the milliseconds of overlap.
    /// An empty interval belongs to the window of its start with weight 0.
    pub fn pieces(&self, start: Millis, end: Millis) -> Vec<(Millis, i64)> {
        if end <= start {
            return vec![(self.start_of(start), 0)];
        }
        let mut out = Vec::new();
        let mut w = self.start_of(start);
        while w < end {
            let lo = w.max(start);
            let hi = (w + self.size).min(end);
            out.push((w, hi - lo));
            w += self.size;
        }
        out
    }
}

/// Billing period: a calendar month, week (from Monday) or day in the deployment's time
/// zone (UTC unless named: `month@Europe/Berlin`), or a fixed length aligned to the epoch
/// (`6h`, for demos and tests). A day in a zone with daylight saving time is 23 or 25
/// hours twice a year; the bounds follow the local calendar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub kind: PeriodKind,
    pub tz: chrono_tz::Tz,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeriodKind {
    Month,
    Week,
    Day,
    Fixed(Millis),
}

const DAY: Millis = 86_400_000;

impl Period {
    /// Calendar months in UTC.
    pub const MONTH: Period = Period {
        kind: PeriodKind::Month,
        tz: chrono_tz::UTC,
    };

    /// `month`, `week`, `day` or a duration, optionally `@<IANA time zone>`.
    pub fn parse(s: &str) -> Result<Period, String> {
        let (kind, zone) = match s.split_once('@') {
            Some((k, z)) => (k.trim(), Some(z.trim())),
            None => (s.trim(), None),
        };
        let kind = match kind {
            "month" => PeriodKind::Month,
            "week" => PeriodKind::Week,
            "day" => PeriodKind::Day,
            other => PeriodKind::Fixed(humantime_ms(other)?),
        };
        let tz = match zone {
            None => chrono_tz::UTC,
            Some(z) => z.parse::<chrono_tz::Tz>().map_err(|_| {
                format!("unknown time zone {z:?} (an IANA name such as Europe/Berlin)")
            })?,
        };
        if matches!(kind, PeriodKind::Fixed(_)) && tz != chrono_tz::UTC {
            return Err(format!(
                "{s:?}: a fixed-length period is aligned to the epoch; a time zone applies to month, week and day"
            ));
        }
        Ok(Period { kind, tz })
    }

    /// The instant a local calendar day starts (its first existing local time, when
    /// midnight falls in a daylight-saving gap).
    fn day_start(&self, d: chrono::NaiveDate) -> Millis {
        let mut t = d.and_time(chrono::NaiveTime::MIN);
        for _ in 0..24 {
            if let Some(x) = self.tz.from_local_datetime(&t).earliest() {
                return x.timestamp_millis();
            }
            t += chrono::Duration::hours(1);
        }
        t.and_utc().timestamp_millis()
    }

    /// `[start, end)` of the period containing `t`.
    pub fn bounds(&self, t: Millis) -> (Millis, Millis) {
        if let PeriodKind::Fixed(len) = self.kind {
            // weeks of fixed length start on Monday 1970-01-05
            let origin = if len % (7 * DAY) == 0 { 4 * DAY } else { 0 };
            let s = (t - origin).div_euclid(len) * len + origin;
            return (s, s + len);
        }
        let date = Utc
            .timestamp_millis_opt(t)
            .single()
            .unwrap_or_default()
            .with_timezone(&self.tz)
            .date_naive();
        let (from, to) = match self.kind {
            PeriodKind::Month => {
                let first = date.with_day(1).unwrap_or(date);
                let next = first
                    .checked_add_months(chrono::Months::new(1))
                    .unwrap_or(first);
                (first, next)
            }
            PeriodKind::Week => {
                let monday =
                    date - chrono::Days::new(u64::from(date.weekday().num_days_from_monday()));
                (monday, monday + chrono::Days::new(7))
            }
            _ => (date, date + chrono::Days::new(1)),
        };
        let (s, e) = (self.day_start(from), self.day_start(to));
        // a period always contains t (guards zones whose day starts are irregular)
        if t < s || t >= e {
            return (t - t.rem_euclid(DAY), t - t.rem_euclid(DAY) + DAY);
        }
        (s, e)
    }

    /// `bounds`, remembering the last period found (see `Bounds`).
    pub fn memo(&self) -> Bounds<'_> {
        Bounds {
            period: self,
            last: std::cell::Cell::new(None),
        }
    }

    /// Directory-safe label of the period starting at `start`: `2026-11` for months (in
    /// the period's zone), `20261122T0000Z` for other periods in UTC, and the local start
    /// with its offset (`20261122T0000+0100`) in other zones.
    pub fn label(&self, start: Millis) -> String {
        let utc = Utc.timestamp_millis_opt(start).single().unwrap_or_default();
        let local = utc.with_timezone(&self.tz);
        match self.kind {
            PeriodKind::Month => local.format("%Y-%m").to_string(),
            _ if self.tz == chrono_tz::UTC => utc.format("%Y%m%dT%H%MZ").to_string(),
            _ => local.format("%Y%m%dT%H%M%z").to_string(),
        }
    }
}

/// Parse `90s`, `5m`, `1h`, `2d`, `250ms`, or a bare number of milliseconds.
pub fn humantime_ms(s: &str) -> Result<Millis, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: i64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let mult = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => DAY,
        "w" => 7 * DAY,
        u => {
            return Err(format!(
                "unknown duration unit {u:?} in {s:?} (ms, s, m, h, d, w)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("duration out of range: {s:?}"))
}

/// A period's `bounds`, remembering the last period found: a stage asks for the period of
/// each of its events, consecutive events nearly always fall in the same one, and a
/// calendar period costs a time-zone conversion and date arithmetic each time (~2.6 % of
/// the monthly settler's CPU, BENCHMARKS.md session 34). A period is remembered only if
/// its own first and last instants map back to it, so the answer is always `bounds`'s.
pub struct Bounds<'a> {
    period: &'a Period,
    last: std::cell::Cell<Option<(Millis, Millis)>>,
}

impl Bounds<'_> {
    /// `[start, end)` of the period containing `t`: `Period::bounds(t)`.
    pub fn of(&self, t: Millis) -> (Millis, Millis) {
        if let Some((s, e)) = self.last.get() {
            if s <= t && t < e {
                return (s, e);
            }
        }
        let b = self.period.bounds(t);
        let regular = b.0 < b.1 && self.period.bounds(b.0) == b && self.period.bounds(b.1 - 1) == b;
        self.last.set(regular.then_some(b));
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_crossing_boundaries_splits_by_overlap() {
        let w = Tumbling::new(3_600_000);
        assert_eq!(w.pieces(3_000_000, 3_600_000), vec![(0, 600_000)]);
        assert_eq!(
            w.pieces(3_000_000, 7_300_000),
            vec![(0, 600_000), (3_600_000, 3_600_000), (7_200_000, 100_000)]
        );
        assert_eq!(w.pieces(5, 5), vec![(0, 0)]);
        assert_eq!(w.start_of(-1), -3_600_000);
    }

    #[test]
    fn periods_follow_the_calendar() {
        let t = crate::time::parse_rfc3339("2024-02-29T13:00:00Z").expect("time");
        let (s, e) = Period::MONTH.bounds(t);
        assert_eq!(crate::time::fmt_rfc3339(s), "2024-02-01T00:00:00.000Z");
        assert_eq!(crate::time::fmt_rfc3339(e), "2024-03-01T00:00:00.000Z");
        assert_eq!(Period::MONTH.label(s), "2024-02");
        let t = crate::time::parse_rfc3339("2024-12-31T23:59:59Z").expect("time");
        assert_eq!(
            crate::time::fmt_rfc3339(Period::MONTH.bounds(t).1),
            "2025-01-01T00:00:00.000Z"
        );
        let (s, _) = Period::parse("week").expect("week").bounds(t);
        assert_eq!(crate::time::fmt_rfc3339(s), "2024-12-30T00:00:00.000Z");
        assert_eq!(
            Period::parse("day").expect("day").label(s),
            "20241230T0000Z"
        );
    }

    #[test]
    fn periods_follow_the_local_calendar_of_their_time_zone() {
        let t = |s: &str| crate::time::parse_rfc3339(s).expect("time");
        let f = crate::time::fmt_rfc3339;
        let berlin = Period::parse("month@Europe/Berlin").expect("zone");
        // 2026-03-31T23:30Z is already April in Berlin (CEST, +2)
        let (s, e) = berlin.bounds(t("2026-03-31T23:30:00Z"));
        assert_eq!(f(s), "2026-03-31T22:00:00.000Z");
        assert_eq!(f(e), "2026-04-30T22:00:00.000Z");
        assert_eq!(berlin.label(s), "2026-04");
        // March in Berlin: from CET (+1) to CEST (+2), one hour short
        let (s, e) = berlin.bounds(t("2026-03-15T12:00:00Z"));
        assert_eq!(
            (f(s), f(e)),
            (
                "2026-02-28T23:00:00.000Z".into(),
                "2026-03-31T22:00:00.000Z".into()
            )
        );
        // the day the clocks go forward has 23 hours
        let day = Period::parse("day@Europe/Berlin").expect("zone");
        let (s, e) = day.bounds(t("2026-03-29T12:00:00Z"));
        assert_eq!(e - s, 23 * 3_600_000);
        assert_eq!(day.label(s), "20260329T0000+0100");
        let week = Period::parse("week@America/New_York").expect("zone");
        let (s, e) = week.bounds(t("2026-11-22T03:00:00Z")); // Saturday evening in New York
        assert_eq!(f(s), "2026-11-16T05:00:00.000Z");
        assert_eq!(f(e), "2026-11-23T05:00:00.000Z");
        assert!(Period::parse("month@Mars/Olympus").is_err());
        assert!(Period::parse("6h@Europe/Berlin").is_err());
        // UTC periods are unchanged by the calendar path
        for p in ["day", "week", "month"] {
            let p = Period::parse(p).expect("period");
            let (s, e) = p.bounds(t("2024-12-31T23:59:59Z"));
            assert!(s <= t("2024-12-31T23:59:59Z") && e > s);
        }
        assert_eq!(Period::parse("month").expect("m"), Period::MONTH);
    }

    #[test]
    fn remembered_bounds_are_the_bounds_of_every_instant() {
        let t0 = crate::time::parse_rfc3339("2025-12-20T00:00:00Z").expect("time");
        for spec in [
            "month",
            "week",
            "day",
            "1h",
            "month@Europe/Berlin",
            "day@America/Sao_Paulo",
            "day@Pacific/Apia",
        ] {
            let p = Period::parse(spec).expect("period");
            let memo = p.memo();
            // forward through a year in uneven steps (crossing DST changes and months),
            // then jumping back and forth
            let mut t = t0;
            for i in 0..4_000i64 {
                t += 7_919_000 + (i % 13) * 60_000;
                assert_eq!(memo.of(t), p.bounds(t), "{spec} at {t}");
                let back = t - (i % 7) * 86_400_000;
                assert_eq!(memo.of(back), p.bounds(back), "{spec} at {back}");
            }
        }
    }

    #[test]
    fn durations_parse_strictly() {
        assert_eq!(humantime_ms("90s"), Ok(90_000));
        assert_eq!(humantime_ms("1h"), Ok(3_600_000));
        assert!(humantime_ms("1 fortnight").is_err());
        assert!(humantime_ms("0s").is_err());
    }
}
