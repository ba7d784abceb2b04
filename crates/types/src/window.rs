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

/// Billing period: calendar month (UTC), or fixed-length periods aligned to the epoch
/// (day, week from Monday 1970-01-05, or any length for demos).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Month,
    Fixed(Millis),
}

const DAY: Millis = 86_400_000;
const MONDAY_1970_01_05: Millis = 4 * DAY;

impl Period {
    pub fn parse(s: &str) -> Result<Period, String> {
        match s {
            "month" => Ok(Period::Month),
            "day" => Ok(Period::Fixed(DAY)),
            "week" => Ok(Period::Fixed(7 * DAY)),
            other => humantime_ms(other).map(Period::Fixed),
        }
    }
    /// `[start, end)` of the period containing `t`.
    pub fn bounds(&self, t: Millis) -> (Millis, Millis) {
        match *self {
            Period::Month => {
                let dt = Utc.timestamp_millis_opt(t).single().unwrap_or_default();
                let (y, m) = (dt.year(), dt.month());
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let s = Utc
                    .with_ymd_and_hms(y, m, 1, 0, 0, 0)
                    .single()
                    .unwrap_or_default();
                let e = Utc
                    .with_ymd_and_hms(ny, nm, 1, 0, 0, 0)
                    .single()
                    .unwrap_or_default();
                (s.timestamp_millis(), e.timestamp_millis())
            }
            Period::Fixed(len) => {
                let origin = if len % (7 * DAY) == 0 {
                    MONDAY_1970_01_05
                } else {
                    0
                };
                let s = (t - origin).div_euclid(len) * len + origin;
                (s, s + len)
            }
        }
    }
    /// Directory-safe label: `2026-11` for months, `20261122T0000Z` otherwise.
    pub fn label(&self, start: Millis) -> String {
        let dt = Utc.timestamp_millis_opt(start).single().unwrap_or_default();
        match self {
            Period::Month => dt.format("%Y-%m").to_string(),
            Period::Fixed(_) => dt.format("%Y%m%dT%H%MZ").to_string(),
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
        let (s, e) = Period::Month.bounds(t);
        assert_eq!(crate::time::fmt_rfc3339(s), "2024-02-01T00:00:00.000Z");
        assert_eq!(crate::time::fmt_rfc3339(e), "2024-03-01T00:00:00.000Z");
        assert_eq!(Period::Month.label(s), "2024-02");
        let t = crate::time::parse_rfc3339("2024-12-31T23:59:59Z").expect("time");
        assert_eq!(
            crate::time::fmt_rfc3339(Period::Month.bounds(t).1),
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
    fn durations_parse_strictly() {
        assert_eq!(humantime_ms("90s"), Ok(90_000));
        assert_eq!(humantime_ms("1h"), Ok(3_600_000));
        assert!(humantime_ms("1 fortnight").is_err());
        assert!(humantime_ms("0s").is_err());
    }
}
