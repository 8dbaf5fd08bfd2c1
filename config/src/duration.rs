//! Durations: strings with a unit ("250ms", "2s", "5m", "1h"), parsed by humantime.

use std::time::Duration;

/// The longest duration accepted anywhere. Nothing here needs more, and it keeps
/// `Instant + duration` far from overflowing (which would panic in the proxy).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses one duration as written in the config; the error is a message for the field's path.
///
/// A plain number is refused rather than guessed at: "1500" could mean ms or s.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "{trimmed} has no unit; durations need one, e.g. {trimmed}ms or {trimmed}s \
             (plain numbers are not taken as milliseconds)"
        ));
    }
    let d = humantime::parse_duration(trimmed)
        .map_err(|_| format!("{text:?} is not a duration (write e.g. 250ms, 2s, 5m)"))?;
    if d.is_zero() {
        return Err(format!("{text:?} is zero; it must be longer than 0"));
    }
    if d > MAX_DURATION {
        return Err(format!(
            "{text:?} is longer than the maximum of {}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(d)
}

/// Parses a duration given outside the config (a command-line flag), with
/// the config's rules; `0` (any unit, or none) is zero.
pub fn parse_flag(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(Duration::ZERO);
    }
    parse(trimmed)
}

/// Formats a duration the way the config writes it (`1s 500ms`), for messages and `describe`.
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_may_be_zero() {
        for zero in ["0", "0s", "0ms", " 0 "] {
            assert_eq!(parse_flag(zero), Ok(Duration::ZERO), "{zero}");
        }
        assert_eq!(parse_flag("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_flag("5").is_err());
        assert!(parse_flag("soon").is_err());
    }

    #[test]
    fn units_are_understood() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1s 500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn plain_numbers_need_a_unit() {
        let e = parse("1500").unwrap_err();
        assert!(e.contains("has no unit") && e.contains("1500ms"), "{e}");
        let e = parse("1.5").unwrap_err();
        assert!(e.contains("has no unit") && e.contains("1.5s"), "{e}");
    }

    #[test]
    fn nonsense_zero_and_huge_are_refused() {
        assert_eq!(
            parse("15OOms").unwrap_err(),
            "\"15OOms\" is not a duration (write e.g. 250ms, 2s, 5m)"
        );
        assert!(parse("-1s").unwrap_err().contains("is not a duration"));
        assert!(parse("").unwrap_err().contains("is not a duration"));
        assert!(parse("0s").unwrap_err().contains("zero"));
        assert!(parse("30d").unwrap_err().contains("maximum"));
        assert_eq!(parse("7d"), Ok(MAX_DURATION));
    }
}
