//! Units as operators write them in settings: sizes (`512MiB`, `4GB`) and durations (`500ms`,
//! `5s`, `2m`, `1h`, `1d`), and lists of durations (a retry schedule).

use std::time::Duration;

/// Parses a size: a number with an optional unit `B`, `KB`, `MB`, `GB`, `TB` (powers of 1000)
/// or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024).
pub fn parse_size(raw: &str) -> Result<i64, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: i64 = number
        .parse()
        .map_err(|_| format!("`{raw}` is not a size such as 512MiB or 4GB"))?;
    let factor: i64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => return Err(format!("unknown unit `{other}` in `{raw}`")),
    };
    n.checked_mul(factor)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("`{raw}` must be above zero and below 8 EiB"))
}

/// Parses a duration such as `500ms`, `5s`, `2m`, `1h`, `1d`, or a bare number of seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{raw}` is not a duration such as 5s, 2m or 1h"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{raw}` (use ms, s, m, h or d)"
            ))
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("`{raw}` is too long"))
}

/// Parses a comma-separated list of durations (a retry schedule).
pub fn parse_duration_list(raw: &str) -> Result<Vec<Duration>, String> {
    let list = raw
        .split(',')
        .map(parse_duration)
        .collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() {
        return Err("the list is empty".into());
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("8h"), Ok(Duration::from_secs(8 * 3600)));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(
            parse_duration_list("5s, 30s,2m").unwrap(),
            vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120)
            ]
        );
    }
}
