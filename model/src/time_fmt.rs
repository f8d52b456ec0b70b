//! Time helpers: RFC 3339 UTC strings and Unix milliseconds, the two forms the pipeline uses.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Now, in milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Seconds since the epoch → `2026-11-22T10:15:00Z`. `None` when out of range.
pub fn unix_secs_to_rfc3339(secs: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

/// Milliseconds since the epoch → RFC 3339 with milliseconds.
pub fn unix_ms_to_rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Parses an RFC 3339 timestamp into Unix milliseconds.
pub fn rfc3339_to_unix_ms(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_seconds_as_utc() {
        assert_eq!(
            unix_secs_to_rfc3339(1_234_567).as_deref(),
            Some("1970-01-15T06:56:07Z")
        );
        assert_eq!(unix_ms_to_rfc3339(1_500), "1970-01-01T00:00:01.5Z");
        assert_eq!(rfc3339_to_unix_ms("1970-01-01T00:00:01.5Z"), Some(1_500));
    }
}
