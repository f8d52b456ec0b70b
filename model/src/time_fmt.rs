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

/// A time as every API parameter and field takes it: RFC 3339 (`2026-11-22T10:00:00Z`), held as
/// Unix milliseconds. The one time type of the admin API: a query parameter that is not one is a
/// 400, a body field a 422, both naming the parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rfc3339Time(pub i64);

impl Rfc3339Time {
    /// What the refusal of a bad value says.
    pub const EXPECTED: &'static str = "an RFC 3339 time such as 2026-11-22T10:00:00Z";

    pub fn unix_ms(self) -> i64 {
        self.0
    }

    /// As a `time` value (NATS takes start times so).
    pub fn to_offset(self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

impl std::str::FromStr for Rfc3339Time {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        rfc3339_to_unix_ms(s)
            .map(Rfc3339Time)
            .ok_or_else(|| format!("`{s}` is not {}", Self::EXPECTED))
    }
}

impl std::fmt::Display for Rfc3339Time {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&unix_ms_to_rfc3339(self.0))
    }
}

impl serde::Serialize for Rfc3339Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rfc3339Time {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
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

    #[test]
    fn api_times_parse_or_say_what_they_expect() {
        let t: Rfc3339Time = serde_json::from_str("\"1970-01-01T00:00:01.5Z\"").unwrap();
        assert_eq!(t.unix_ms(), 1_500);
        let err = serde_json::from_str::<Rfc3339Time>("\"yesterday\"").unwrap_err();
        assert!(
            err.to_string()
                .contains("`yesterday` is not an RFC 3339 time"),
            "{err}"
        );
        assert!("2026-13-01T00:00:00Z".parse::<Rfc3339Time>().is_err());
    }
}
