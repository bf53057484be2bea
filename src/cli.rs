//! The command line: serving options (the default command) and the hidden `worker` entry that
//! exec-mode spawning re-executes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use worker::WorkerConfig;

/// A multiprocess prefork TCP echo server (RFC 862) for learning and load-testing
/// concurrency models.
#[derive(Debug, Parser)]
#[command(name = "prefork-echo", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A command to run instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serving options (used when no command is given).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Commands other than serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a running server's per-worker stats, totals, rates and accept fairness.
    Stats(StatsArgs),
    /// Reload a running server; returns once the new generation serves, printing its number.
    Reload(CtlArgs),
    /// Stop a running server gracefully; returns once it has exited.
    Stop(CtlArgs),
    /// Resize a running server's worker pool.
    Scale {
        /// New number of workers.
        #[arg(value_parser = clap::value_parser!(u32).range(1..=4096))]
        workers: u32,
        /// Which server.
        #[command(flatten)]
        ctl: CtlArgs,
    },
    /// Internal: run one process-mode worker on inherited descriptors (used by --spawn exec).
    #[command(hide = true)]
    Worker(WorkerConfig),
}

/// How connections are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// A pool of worker processes sharing the listener, each an event loop over many connections.
    Process,
    /// One process, one OS thread per connection, blocking I/O.
    Thread,
    /// The textbook forking server: one child process per connection, blocking I/O.
    ForkPerConn,
}

/// How the master starts a process-mode worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Spawn {
    /// fork(): the worker is a copy of the master.
    Fork,
    /// fork() then exec() of the binary on disk, handing over the listener by descriptor.
    Exec,
}

/// Options of the server.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, IPv4 or IPv6 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7007")]
    pub listen: String,
    /// Worker processes (process mode) or acceptor threads (thread mode); default: CPU count.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: Option<u32>,
    /// Concurrency model.
    #[arg(long, value_enum, default_value_t = Mode::Process)]
    pub mode: Mode,
    /// How workers are started in process mode.
    #[arg(long, value_enum, default_value_t = Spawn::Fork)]
    pub spawn: Spawn,
    /// Listen backlog: connections the kernel queues before one is accepted.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub backlog: i32,
    /// Seconds open connections may take to finish after SIGTERM/SIGINT.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = seconds)]
    pub drain_timeout: f64,
    /// Bytes a connection may have read but not yet echoed before the server stops reading
    /// from it (back-pressure against clients that send but never read).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=(1 << 30)))]
    pub max_unsent: u64,
    /// Seconds between workers' stats reports to the master; 0 turns periodic reports off.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = seconds)]
    pub stats_interval: f64,
    /// Control socket (mode 0600) that `prefork-echo stats` reads; default:
    /// $XDG_RUNTIME_DIR/prefork-echo-PORT.sock, or /tmp/prefork-echo-PORT.sock.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Log one line of totals and rates every --stats-interval.
    #[arg(long)]
    pub log_stats: bool,
    /// Connections held at most: per worker in process mode, in total in the other modes.
    /// Beyond it a new connection is reset at once (the client sees ECONNRESET). 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_conns: u64,
    /// Seconds a connection may go without receiving anything before the server closes it;
    /// 0: never.
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = seconds)]
    pub idle_timeout: f64,
    /// Seconds without a report after which a worker is killed and replaced; 0: never.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = seconds)]
    pub worker_timeout: f64,
    /// Settings file re-read on every reload (workers, drain_timeout, max_unsent,
    /// stats_interval, worker_timeout); its keys override these flags.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also echo UDP datagrams (RFC 862 over UDP) on the same address and port.
    #[arg(long)]
    pub udp: bool,
    /// When started as root: serve as this user, after binding (the control socket and pid
    /// file are handed to it).
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// With --user: serve with this group instead of the user's own.
    #[arg(long, value_name = "NAME", requires = "user")]
    pub group: Option<String>,
    /// Write the master's pid here (removed at exit).
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
}

/// How a control command finds the server: its control socket (derived from --listen by
/// default), or its pid file (then only signals are sent).
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The server's control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "pid_file")]
    pub control: Option<PathBuf>,
    /// The server's pid file: act by signal (reload sends HUP and does not wait).
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// The server's listen address, used only to derive the default control socket path.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7007")]
    pub listen: String,
}

/// Options of `prefork-echo stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The server's control socket; default: derived from --listen's port as the server does.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The server's listen address, used only to derive the default control socket path.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7007")]
    pub listen: String,
    /// Print the snapshot as JSON (one object per line with --watch); schema in the README.
    #[arg(long)]
    pub json: bool,
    /// Print again every SECS seconds until interrupted, with rates over each interval.
    #[arg(long, value_name = "SECS", value_parser = positive_seconds)]
    pub watch: Option<f64>,
}

/// A non-negative, finite number of seconds.
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds (e.g. 0, 1.5, 30)"
        )),
    }
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match seconds(s)? {
        v if v > 0.0 => Ok(v),
        _ => Err("must be more than 0".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_errors() {
        let cli = Cli::try_parse_from(["prefork-echo"]).unwrap();
        assert_eq!(cli.serve.listen, "127.0.0.1:7007");
        assert_eq!(cli.serve.mode, Mode::Process);
        assert_eq!(cli.serve.backlog, 1024);
        for bad in [
            &["prefork-echo", "--workers", "0"][..],
            &["prefork-echo", "--mode", "fiber"],
            &["prefork-echo", "--drain-timeout", "-1"],
            &["prefork-echo", "--bogus"],
        ] {
            let err = Cli::try_parse_from(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }
}
