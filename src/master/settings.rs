//! The master's configuration: what it was started with, and the settings a reload can
//! change (re-read from `--config`).

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use worker::WorkerConfig;

use crate::cli::Spawn;
use crate::config::{ConfigError, FileConfig};

/// What the master needs to run a process-mode pool.
#[derive(Debug)]
pub struct MasterConfig {
    /// fork or exec.
    pub spawn: Spawn,
    /// The path of this binary, exec'd by exec-mode spawning.
    pub exe: CString,
    /// Where to serve the control socket.
    pub control: PathBuf,
    /// Log a line of totals every stats interval.
    pub log_stats: bool,
    /// Re-read on every reload; its keys override `base`.
    pub config_file: Option<PathBuf>,
    /// Written with the master's pid at start, removed at exit.
    pub pid_file: Option<PathBuf>,
    /// The settings the command line gave.
    pub base: Settings,
    /// Set when this master was started by a binary upgrade: it takes over the control
    /// socket's path and writes `ready` here once it serves.
    pub predecessor: Option<OwnedFd>,
    /// With `--udp`: the UDP socket every worker shares, or one per slot (`--balance
    /// reuseport`), steered like the listeners.
    pub udp: Option<crate::balance::Listeners>,
    /// What the master this one replaced (binary upgrade) handed over: totals, uptime,
    /// generation and life-cycle counts, so the server's stats go on as one.
    pub carried: super::Carryover,
}

/// The settings a reload can change.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pool size.
    pub workers: u32,
    /// A worker silent for this long is killed and replaced (`None`: never).
    pub worker_timeout: Option<Duration>,
    /// Template for every worker (descriptors, id and generation are filled in per spawn).
    pub worker: WorkerConfig,
    /// `--upgrade-grace`: how long an old master keeps the sockets after its successor
    /// serves, to take the service back should the successor die (zero: retire at once).
    pub upgrade_grace: Duration,
}

impl Settings {
    /// These settings with a config file's keys applied.
    pub fn with_file(&self, file: &FileConfig) -> Settings {
        let mut s = self.clone();
        if let Some(n) = file.workers {
            s.workers = n;
        }
        if let Some(d) = file.drain_timeout {
            s.worker.drain_timeout = d;
        }
        if let Some(m) = file.max_unsent {
            s.worker.max_unsent = m as usize;
        }
        if let Some(i) = file.stats_interval {
            s.worker.stats_interval = i;
        }
        if let Some(g) = file.upgrade_grace {
            s.upgrade_grace = protocol::duration::secs(g);
        }
        if let Some(t) = file.worker_timeout {
            s.worker_timeout = (t > 0.0).then(|| protocol::duration::secs(t));
        }
        s
    }

    /// The settings in force: `base`, overridden by the config file if there is one.
    pub fn resolve(base: &Settings, file: Option<&PathBuf>) -> Result<Settings, ConfigError> {
        match file {
            Some(path) => Ok(base.with_file(&FileConfig::load(path)?)),
            None => Ok(base.clone()),
        }
    }

    pub(super) fn drain(&self) -> Duration {
        self.worker.drain()
    }
}

/// Descriptors the master keeps for itself besides one channel per worker.
pub const MASTER_FDS: u64 = 32;

/// Whether the descriptor limit can hold `workers` channels (and, during a reload, the old
/// generation's beside them is why the master raises its limit to the hard one at start).
pub fn descriptor_room(workers: u32) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit};
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let need = u64::from(workers) + MASTER_FDS;
    if need > limit {
        return Err(format!(
            "{workers} workers need about {need} descriptors but the limit (RLIMIT_NOFILE) is {limit}"
        ));
    }
    Ok(())
}
