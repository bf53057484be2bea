//! The optional `--config FILE`: settings re-read on every reload (SIGHUP), so a pool can be
//! resized or retuned without a restart.
//!
//! Format: one `key = value` per line; `#` starts a comment; blank lines are ignored.
//! Keys: `workers`, `drain_timeout`, `max_unsent`, `stats_interval`, `worker_timeout`,
//! `upgrade_grace`.
//! A key in the file overrides the command line's value; a key absent from the file keeps it.
//! A key given twice is refused: which of the two was meant cannot be guessed.
//!
//! The file is read from the master's loop on every reload, so it must never be able to stall
//! or swamp it: only a regular file is read (a FIFO would block, `/dev/zero` never ends), it
//! is opened without blocking, and at most [`MAX_SIZE`] bytes are accepted.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
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
    /// Seconds an old master keeps the sockets after a binary upgrade (`--upgrade-grace`).
    pub upgrade_grace: Option<f64>,
}

/// The largest config file accepted.
pub const MAX_SIZE: u64 = 64 * 1024;

/// Why a config file was refused.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// The file could not be read, is not a regular file, or is too large.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The OS's reason.
        reason: String,
    },
    /// The file was read but its contents are refused.
    #[error("{path}: {source}")]
    In {
        /// The file.
        path: String,
        /// What is wrong in it.
        source: Box<ConfigError>,
    },
    /// A key appears twice.
    #[error("line {line}: {key} is already set on line {first}")]
    Repeated {
        /// 1-based line number of the repeat.
        line: usize,
        /// The key.
        key: String,
        /// Where it was first set.
        first: usize,
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
    /// Reads and parses a config file: a regular file of at most [`MAX_SIZE`] bytes.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let shown = path.display().to_string();
        let refuse = |reason: String| ConfigError::Read {
            path: shown.clone(),
            reason,
        };
        // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| refuse(e.to_string()))?;
        let meta = file.metadata().map_err(|e| refuse(e.to_string()))?;
        if !meta.is_file() {
            return Err(refuse("not a regular file".into()));
        }
        if meta.len() > MAX_SIZE {
            return Err(refuse(format!(
                "{} bytes; a config file may hold at most {MAX_SIZE}",
                meta.len()
            )));
        }
        let mut bytes = Vec::new();
        // The size was checked, but the file may grow meanwhile: read one byte past the cap.
        file.take(MAX_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| refuse(e.to_string()))?;
        if bytes.len() as u64 > MAX_SIZE {
            return Err(refuse(format!("grew past {MAX_SIZE} bytes while read")));
        }
        let text = String::from_utf8(bytes).map_err(|_| refuse("not UTF-8 text".into()))?;
        FileConfig::parse(&text).map_err(|e| ConfigError::In {
            path: shown,
            source: Box::new(e),
        })
    }

    /// Parses config text; never panics, whatever the input.
    pub fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        let mut cfg = FileConfig::default();
        let mut seen: Vec<(&str, usize)> = Vec::new();
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
            if let Some(&(_, first)) = seen.iter().find(|(k, _)| *k == key) {
                return Err(ConfigError::Repeated {
                    line,
                    key: key.to_string(),
                    first,
                });
            }
            seen.push((key, line));
            let bad = |why| ConfigError::Value {
                line,
                key: key.to_string(),
                value: value.to_string(),
                why,
            };
            let secs = || {
                protocol::duration::parse_secs(value)
                    .map_err(|_| bad("a number of seconds from 0 to 31536000 (one year)"))
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
                "upgrade_grace" => cfg.upgrade_grace = Some(secs()?),
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
            "drain_timeout = 1e19",
            "worker_timeout = 1e20",
            "max_unsent = x",
        ] {
            assert!(
                matches!(FileConfig::parse(bad), Err(ConfigError::Value { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_repeated_key_is_refused_with_both_lines() {
        let e = FileConfig::parse("workers = 2\n# more\nworkers = 3\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3: workers is already set on line 1",
            "{e:?}"
        );
    }

    #[test]
    fn only_small_regular_files_are_read_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("prefork-echo-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // A FIFO with no writer: opening it without O_NONBLOCK would hang this test.
        let e = FileConfig::load(&fifo).unwrap_err().to_string();
        assert!(
            e.contains("not a regular file") && e.contains("fifo"),
            "{e}"
        );
        let e = FileConfig::load(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.join("big.conf");
        std::fs::write(&big, "#".repeat(MAX_SIZE as usize + 1)).unwrap();
        let e = FileConfig::load(&big).unwrap_err().to_string();
        assert!(e.contains("at most 65536"), "{e}");
        let bad = dir.join("bad.conf");
        std::fs::write(&bad, "workers = four\n").unwrap();
        let e = FileConfig::load(&bad).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: line 1", bad.display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
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
