//! Logging to stderr: one line per event, with a UTC timestamp, the pid and the role
//! (`master`, `worker 2/g1`, `thread-mode`), so interleaved lines from many processes
//! can still be told apart.

use std::fmt;
use std::io::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

static ROLE: Mutex<String> = Mutex::new(String::new());

/// Sets the role named on every following line of this process (a forked worker renames itself).
pub fn set_role(role: impl Into<String>) {
    let mut guard = ROLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    *guard = role.into();
}

/// Writes one log line; use the [`log!`](crate::log!) macro rather than calling this.
pub fn write_line(args: fmt::Arguments<'_>) {
    let role = ROLE
        .lock()
        .map(|r| r.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    let line = format!(
        "{} prefork-echo[{}] {}: {}\n",
        timestamp(SystemTime::now()),
        std::process::id(),
        if role.is_empty() { "main" } else { &role },
        args
    );
    // One write per line so lines from concurrent processes do not interleave mid-line.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs one line to stderr, `format!`-style.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::log::write_line(format_args!($($arg)*)) };
}

/// RFC 3339 UTC time with milliseconds, computed without a calendar crate.
fn timestamp(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_known_instants() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 is a leap day; 951782400 is its midnight.
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_000 + 3_723_456);
        assert_eq!(timestamp(t), "2000-02-29T01:02:03.456Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_305_600);
        assert_eq!(timestamp(t), "2026-11-22T00:00:00.000Z");
    }
}
