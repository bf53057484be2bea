//! What a worker needs to know, in one struct that is both handed over in memory (fork) and
//! spelled as the hidden `worker` subcommand's flags (exec), so the two cannot drift apart.

use std::os::fd::RawFd;
use std::time::Duration;

use protocol::duration::secs;

use crate::service::ServiceKind;

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
    /// Inherited descriptor of this worker's end of the bus (`--service chat`); -1: none.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub bus_fd: RawFd,
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
    /// What the worker speaks.
    #[arg(long, value_enum, default_value_t = ServiceKind::Echo)]
    pub service: ServiceKind,
    /// How connections' bytes move: readiness (epoll) or completions (io_uring).
    #[arg(long, value_enum, default_value_t = IoDriver::Epoll)]
    pub io: IoDriver,
    /// Expect a PROXY protocol header (v1 or v2) before each connection's data.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub proxy_protocol: bool,
    /// Peers allowed to send a PROXY header (CIDRs, comma-separated).
    #[arg(long, default_value = DEFAULT_PROXY_FROM)]
    pub proxy_from: String,
    /// Seconds a connection may take to send its PROXY header.
    #[arg(long, default_value_t = 5.0)]
    pub proxy_timeout: f64,
    /// Longest chat line, in bytes (`--service chat`).
    #[arg(long, default_value_t = crate::chat::DEFAULT_MAX_LINE)]
    pub max_line: usize,
    /// The chat's limits and terminal safety (`--service chat`).
    #[command(flatten)]
    pub chat: crate::chat::ChatOptions,
    /// The directory TFTP serves (`--service tftp`).
    #[arg(long)]
    pub root: Option<std::path::PathBuf>,
    /// Inherited descriptor of the TFTP root, opened once by the master at start; -1: none.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub root_fd: RawFd,
    /// TFTP accepts write requests (new files only).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub tftp_write: bool,
    /// Largest file a TFTP upload may create, in bytes.
    #[arg(long, default_value_t = crate::tftp::DEFAULT_MAX_FILE)]
    pub tftp_max_file: u64,
    /// Bytes a TFTP upload must leave free on the root's file system.
    #[arg(long, default_value_t = crate::tftp::DEFAULT_MIN_FREE)]
    pub tftp_min_free: u64,
}

/// How a process-mode worker moves its connections' bytes (`--io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IoDriver {
    /// Edge-triggered epoll: a read and a write system call per round trip.
    #[default]
    Epoll,
    /// io_uring (Linux 6.1 or later, echo only): every receive and send an entry in a ring,
    /// one system call per loop turn for all of them.
    Uring,
}

impl IoDriver {
    /// Its `--io` name.
    pub fn name(self) -> &'static str {
        match self {
            IoDriver::Epoll => "epoll",
            IoDriver::Uring => "uring",
        }
    }
}

/// Who may send a PROXY header unless `--proxy-from` says otherwise: this host only.
pub const DEFAULT_PROXY_FROM: &str = "127.0.0.0/8,::1";

impl WorkerConfig {
    /// This config as `worker` subcommand arguments (after the subcommand name).
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--listen-fd", self.listen_fd.to_string()),
            ("--ipc-fd", self.ipc_fd.to_string()),
            ("--udp-fd", self.udp_fd.to_string()),
            ("--bus-fd", self.bus_fd.to_string()),
            ("--id", self.id.to_string()),
            ("--generation", self.generation.to_string()),
            ("--max-unsent", self.max_unsent.to_string()),
            ("--drain-timeout", self.drain_timeout.to_string()),
            ("--stats-interval", self.stats_interval.to_string()),
            ("--max-conns", self.max_conns.to_string()),
            ("--idle-timeout", self.idle_timeout.to_string()),
            ("--service", self.service.name().to_string()),
            ("--io", self.io.name().to_string()),
            ("--proxy-protocol", self.proxy_protocol.to_string()),
            ("--proxy-from", self.proxy_from.clone()),
            ("--proxy-timeout", self.proxy_timeout.to_string()),
            ("--max-line", self.max_line.to_string()),
            ("--root-fd", self.root_fd.to_string()),
            ("--tftp-write", self.tftp_write.to_string()),
            ("--tftp-max-file", self.tftp_max_file.to_string()),
            ("--tftp-min-free", self.tftp_min_free.to_string()),
        ]
        .into_iter()
        .chain(
            self.root
                .iter()
                .map(|r| ("--root", r.display().to_string())),
        )
        .flat_map(|(k, v)| [k.to_string(), v])
        .chain(self.chat.to_args())
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

    /// The PROXY protocol rule, when `--proxy-protocol` is on (`--proxy-from` was validated
    /// by the command line; an unparsable one here trusts nobody rather than everybody).
    pub fn proxy(&self) -> Option<crate::proxy::ProxyRule> {
        if !self.proxy_protocol {
            return None;
        }
        // Before any fork: connection children share the rate limit of its log lines.
        crate::proxy::share_log();
        Some(crate::proxy::ProxyRule {
            from: crate::proxy::Networks::parse(&self.proxy_from)
                .unwrap_or_else(|_| crate::proxy::Networks::nobody()),
            timeout: secs(self.proxy_timeout),
        })
    }

    /// The stats interval, or `None` when periodic reports are off.
    pub fn stats_every(&self) -> Option<Duration> {
        (self.stats_interval > 0.0).then(|| secs(self.stats_interval))
    }
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
    fn to_args_parses_back_to_the_same_config() {
        let cfg = WorkerConfig {
            listen_fd: 3,
            ipc_fd: 7,
            udp_fd: -1,
            bus_fd: 9,
            id: 2,
            generation: 5,
            max_unsent: 65536,
            drain_timeout: 1.5,
            stats_interval: 0.0,
            max_conns: 10,
            idle_timeout: 2.5,
            service: ServiceKind::Echo,
            io: IoDriver::Uring,
            proxy_protocol: true,
            proxy_from: "10.0.0.0/8".into(),
            proxy_timeout: 2.0,
            root: Some("/srv/tftp".into()),
            root_fd: 11,
            max_line: 77,
            chat: crate::chat::ChatOptions {
                chat_soft_limit: 5,
                chat_soft_secs: 1.5,
                chat_hard_limit: 6,
                chat_raw: true,
                chat_rate: 2.5,
                chat_burst: 7,
            },
            tftp_write: true,
            tftp_max_file: 99,
            tftp_min_free: 98,
        };
        let argv = std::iter::once("w".to_string()).chain(cfg.to_args());
        let back = Wrap::try_parse_from(argv).unwrap().cfg;
        assert_eq!(format!("{back:?}"), format!("{cfg:?}"));
        assert_eq!(back.stats_every(), None);
        assert_eq!(back.drain(), Duration::from_millis(1500));
    }
}
