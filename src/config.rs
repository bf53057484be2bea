//! The optional `--config FILE`: settings re-read on every reload (SIGHUP), so a pool can be
//! resized or retuned without a restart.
//!
//! Format: one `key = value` per line; `#` starts a comment; blank lines are ignored.
//! Keys: `workers`, `drain_timeout`, `max_unsent`, `stats_interval`, `worker_timeout`.
//! A key in the file overrides the command line's value; a key absent from the file keeps it.

use std::path::Path;

use thiserror::Error;

/// Settings a config file may set; `None` where the file is silent.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileConfig {
    /// Worker processes.
    pub workers: Option<u32>,
    /// Seconds for open connections to finish after a graceful stop.
    pub drain_timeout: Option<f64>,
    /// Per-connection bound on unsent bytes.
    pub max_unsent: Option<u64>,
    /// Seconds between worker reports.
    pub stats_interval: Option<f64>,
    /// Seconds of silence after which a worker is considered hung.
    pub worker_timeout: Option<f64>,
}

/// Why a config file was refused.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The OS's reason.
        reason: String,
    },
    /// A line is not `key = value`.
    #[error("line {line}: expected `key = value`")]
    Syntax {
        /// 1-based line number.
        line: usize,
    },
    /// The key is not one of the known ones.
    #[error("line {line}: unknown key {key:?}")]
    UnknownKey {
        /// 1-based line number.
        line: usize,
        /// The key found.
        key: String,
    },
    /// The value does not fit the key.
    #[error("line {line}: {key} = {value:?}: {why}")]
    Value {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
        /// The value found.
        value: String,
        /// What the key accepts.
        why: &'static str,
    },
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        FileConfig::parse(&text)
    }

    /// Parses config text; never panics, whatever the input.
    pub fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        let mut cfg = FileConfig::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let Some((key, value)) = content.split_once('=') else {
                return Err(ConfigError::Syntax { line });
            };
            let (key, value) = (key.trim(), value.trim());
            let bad = |why| ConfigError::Value {
                line,
                key: key.to_string(),
                value: value.to_string(),
                why,
            };
            let secs = || match value.parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
                _ => Err(bad("a number of seconds, 0 or more")),
            };
            match key {
                "workers" => {
                    cfg.workers = Some(
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|n| (1..=4096).contains(n))
                            .ok_or_else(|| bad("a whole number from 1 to 4096"))?,
                    )
                }
                "max_unsent" => {
                    cfg.max_unsent = Some(
                        value
                            .parse::<u64>()
                            .ok()
                            .filter(|n| (1..=1 << 30).contains(n))
                            .ok_or_else(|| bad("a number of bytes from 1 to 1073741824"))?,
                    )
                }
                "drain_timeout" => cfg.drain_timeout = Some(secs()?),
                "stats_interval" => cfg.stats_interval = Some(secs()?),
                "worker_timeout" => cfg.worker_timeout = Some(secs()?),
                other => {
                    return Err(ConfigError::UnknownKey {
                        line,
                        key: other.to_string(),
                    });
                }
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_comments_and_blank_lines() {
        let cfg = FileConfig::parse(
            "# pool\nworkers = 3\n\n drain_timeout=2.5  # seconds\nmax_unsent = 4096\n",
        )
        .unwrap();
        assert_eq!(cfg.workers, Some(3));
        assert_eq!(cfg.drain_timeout, Some(2.5));
        assert_eq!(cfg.max_unsent, Some(4096));
        assert_eq!(cfg.stats_interval, None);
    }

    #[test]
    fn refuses_bad_lines_with_their_number() {
        let e = FileConfig::parse("workers = 2\nworkers 3").unwrap_err();
        assert_eq!(e, ConfigError::Syntax { line: 2 });
        assert!(matches!(
            FileConfig::parse("threads = 2"),
            Err(ConfigError::UnknownKey { line: 1, .. })
        ));
        for bad in [
            "workers = 0",
            "workers = -1",
            "drain_timeout = NaN",
            "max_unsent = x",
        ] {
            assert!(
                matches!(FileConfig::parse(bad), Err(ConfigError::Value { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: random printable and control bytes, many lengths.
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    [
                        b'=',
                        b'\n',
                        b'#',
                        b' ',
                        b'w',
                        b'1',
                        b'.',
                        b'-',
                        (x >> 8) as u8,
                    ][x as usize % 9]
                })
                .collect();
            let _ = FileConfig::parse(&String::from_utf8_lossy(&bytes));
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(5000))]

            #[test]
            fn config_parsing_never_panics(text in "(?s).{0,400}") {
                let _ = FileConfig::parse(&text);
            }

            #[test]
            fn config_parsing_never_panics_on_near_misses(
                key in "(workers|drain_timeout|max_unsent|stats_interval|worker_timeout|x)",
                value in "[-+0-9.eEinfINFaN ]{0,12}",
            ) {
                let _ = FileConfig::parse(&format!("{key} = {value}\n"));
            }
        }
    }
}
