//! Event time is milliseconds since the Unix epoch, UTC, everywhere.

pub type Millis = i64;

/// "Complete forever": what a retired node or a drained partition reports.
pub const END_OF_TIME: Millis = i64::MAX / 4;

pub fn parse_rfc3339(s: &str) -> Result<Millis, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

pub fn fmt_rfc3339(t: Millis) -> String {
    match chrono::DateTime::from_timestamp_millis(t) {
        Some(dt) => dt.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => t.to_string(),
    }
}
