//! Durations from the command line and the config file: seconds as floats, bounded so that
//! no setting can make `Instant + Duration` overflow.

use std::time::Duration;

/// The longest duration any setting accepts: one year. A bound, not a taste: `Instant +
/// Duration` panics when the sum leaves the clock's range (`--drain-timeout 1e19` once took
/// the master down on SIGTERM), and no drain, idle or report interval is meaningfully longer.
pub const MAX_SECS: f64 = 365.0 * 86_400.0;

/// Parses a number of seconds for a flag or config key: finite, 0 to [`MAX_SECS`].
pub fn parse_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=MAX_SECS).contains(&v) => Ok(v),
        Ok(v) if v.is_finite() && v > MAX_SECS => Err(format!(
            "{s:?} seconds is more than the limit of {MAX_SECS} (one year)"
        )),
        _ => Err(format!(
            "{s:?} is not a number of seconds (e.g. 0, 1.5, 30)"
        )),
    }
}

/// Seconds as a duration, clamped to 0..=[`MAX_SECS`] (NaN counts as zero), so adding it to
/// an `Instant` can never overflow whatever reached this point.
pub fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.clamp(0.0, MAX_SECS)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_bounded_and_huge_values_clamp_instead_of_overflowing() {
        assert_eq!(parse_secs("1.5"), Ok(1.5));
        assert_eq!(parse_secs("0"), Ok(0.0));
        assert_eq!(parse_secs("31536000"), Ok(MAX_SECS));
        for bad in ["1e19", "1e20", "31536001", "-1", "NaN", "inf", "x", ""] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        // Whatever slips through (the hidden worker command), adding it to now cannot panic.
        let far = std::time::Instant::now() + secs(1e19);
        assert!(far > std::time::Instant::now());
        assert_eq!(secs(1e20), secs(MAX_SECS));
        assert_eq!(secs(f64::NAN), Duration::ZERO);
    }
}
