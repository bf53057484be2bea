//! Logging to stderr through the `log` facade: one line per event, with a UTC timestamp, the
//! pid and the role (`master`, `worker 2/g1`, `thread-mode`), so interleaved lines from many
//! processes can still be told apart. Levels come from `PREFORK_ECHO_LOG` (or `RUST_LOG`):
//! `error`, `warn`, `info` (the default), `debug`, `trace`, `off`. A process that installs no
//! logger (a unit test) logs nothing.

use std::fmt;
use std::io::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use ::log::{Level, LevelFilter, Metadata, Record};

static ROLE: Mutex<String> = Mutex::new(String::new());
static LOGGER: Logger = Logger;

/// Sets the role named on every following line of this process (a forked worker renames itself).
pub fn set_role(role: impl Into<String>) {
    let mut guard = ROLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    *guard = role.into();
}

/// Installs the logger (once per process; a forked child inherits it) at the level the
/// environment asks for.
pub fn init() {
    let level = ["PREFORK_ECHO_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    if ::log::set_logger(&LOGGER).is_ok() {
        ::log::set_max_level(level);
    }
}

struct Logger;

impl ::log::Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= ::log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            write_line(record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

fn write_line(level: Level, args: &fmt::Arguments<'_>) {
    let role = ROLE
        .lock()
        .map(|r| r.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    let severity = match level {
        Level::Error => "error: ",
        Level::Warn => "warning: ",
        Level::Info => "",
        Level::Debug => "debug: ",
        Level::Trace => "trace: ",
    };
    let line = format!(
        "{} prefork-echo[{}] {}: {severity}{}\n",
        timestamp(SystemTime::now()),
        std::process::id(),
        if role.is_empty() { "main" } else { &role },
        args
    );
    // One write per line so lines from concurrent processes do not interleave mid-line. Not
    // `eprint!`: it panics when stderr is gone (a closed pipe), and a server must not.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs one line at level info, `format!`-style.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::facade::info!($($arg)*) };
}

/// Logs one line at level warn (something is wrong, the server goes on), `format!`-style.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::facade::warn!($($arg)*) };
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
