//! What a worker needs to know, in one struct that is both handed over in memory (fork) and
//! spelled as the hidden `worker` subcommand's flags (exec), so the two cannot drift apart.

use std::os::fd::RawFd;
use std::time::Duration;

/// A worker's settings; parsed from the hidden `prefork-echo worker` command line in exec mode.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerConfig {
    /// Inherited descriptor of the shared listening socket.
    #[arg(long)]
    pub listen_fd: RawFd,
    /// Inherited descriptor of this worker's end of the IPC socket pair.
    #[arg(long)]
    pub ipc_fd: RawFd,
    /// Inherited descriptor of the shared UDP socket; -1: no UDP.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub udp_fd: RawFd,
    /// Slot number in the pool, 0-based.
    #[arg(long)]
    pub id: u32,
    /// Generation this worker belongs to (a reload starts a new one).
    #[arg(long, default_value_t = 1)]
    pub generation: u32,
    /// Per-connection bound on bytes read but not yet echoed.
    #[arg(long)]
    pub max_unsent: usize,
    /// Seconds open connections may take to finish after a graceful stop.
    #[arg(long)]
    pub drain_timeout: f64,
    /// Seconds between stats reports; 0 sends only the final one.
    #[arg(long)]
    pub stats_interval: f64,
    /// Connections this worker holds at most; 0: no limit.
    #[arg(long, default_value_t = 0)]
    pub max_conns: u64,
    /// Seconds a connection may stay idle before it is closed; 0: never.
    #[arg(long, default_value_t = 0.0)]
    pub idle_timeout: f64,
}

impl WorkerConfig {
    /// This config as `worker` subcommand arguments (after the subcommand name).
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--listen-fd", self.listen_fd.to_string()),
            ("--ipc-fd", self.ipc_fd.to_string()),
            ("--udp-fd", self.udp_fd.to_string()),
            ("--id", self.id.to_string()),
            ("--generation", self.generation.to_string()),
            ("--max-unsent", self.max_unsent.to_string()),
            ("--drain-timeout", self.drain_timeout.to_string()),
            ("--stats-interval", self.stats_interval.to_string()),
            ("--max-conns", self.max_conns.to_string()),
            ("--idle-timeout", self.idle_timeout.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }

    /// The drain timeout as a duration (negative or NaN counts as zero).
    pub fn drain(&self) -> Duration {
        secs(self.drain_timeout)
    }

    /// The idle timeout, or `None` when idle connections are kept.
    pub fn idle(&self) -> Option<Duration> {
        (self.idle_timeout > 0.0).then(|| secs(self.idle_timeout))
    }

    /// The stats interval, or `None` when periodic reports are off.
    pub fn stats_every(&self) -> Option<Duration> {
        (self.stats_interval > 0.0).then(|| secs(self.stats_interval))
    }
}

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
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        cfg: WorkerConfig,
    }

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

    #[test]
    fn to_args_parses_back_to_the_same_config() {
        let cfg = WorkerConfig {
            listen_fd: 3,
            ipc_fd: 7,
            udp_fd: -1,
            id: 2,
            generation: 5,
            max_unsent: 65536,
            drain_timeout: 1.5,
            stats_interval: 0.0,
            max_conns: 10,
            idle_timeout: 2.5,
        };
        let argv = std::iter::once("w".to_string()).chain(cfg.to_args());
        let back = Wrap::try_parse_from(argv).unwrap().cfg;
        assert_eq!(format!("{back:?}"), format!("{cfg:?}"));
        assert_eq!(back.stats_every(), None);
        assert_eq!(back.drain(), Duration::from_millis(1500));
    }
}
