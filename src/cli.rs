//! The command line: serving options (the default command) and the hidden `worker` entry that
//! exec-mode spawning re-executes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use worker::WorkerConfig;
use worker::service::ServiceKind;

/// Shown after the options in `--help`.
const AFTER_HELP: &str = "\
Signals to the master: TERM/INT graceful stop (a second one stops at once), QUIT stop now,
HUP reload (new generation, then the old drains), TTIN/TTOU one worker more/fewer,
USR2 binary upgrade (the old master keeps the sockets for --upgrade-grace and takes the
service back if the new one dies; TERM/INT/QUIT to it then, or `upgrade --commit`, retire it
at once); USR1 and ALRM are logged and ignored. Workers ignore INT.

Exit codes: 0 after a requested stop; 2 on a usage error; 1 on an error at start-up
(address in use, unsafe pid-file or control directory, ...) or when no worker can be kept
running. The README has the full signal table, the stats schema and the security model.";

/// A multiprocess prefork TCP echo server (RFC 862) for learning and load-testing
/// concurrency models.
#[derive(Debug, Parser)]
#[command(
    name = "prefork-echo",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PREFORK_ECHO_COMMIT"), ")"),
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true,
    after_help = AFTER_HELP
)]
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
    Reload(ReloadArgs),
    /// Stop a running server gracefully; returns once it has exited.
    Stop(StopArgs),
    /// Upgrade a running server to the binary on disk (a new master takes over); with
    /// --commit, end the upgrade window: the old master retires now.
    Upgrade(UpgradeArgs),
    /// Resize a running server's worker pool (through its control socket).
    Scale {
        /// New number of workers.
        #[arg(value_parser = clap::value_parser!(u32).range(1..=4096))]
        workers: u32,
        /// Which server.
        #[command(flatten)]
        ctl: CtlArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout: `prefork-echo man > prefork-echo.1`.
    Man,
    /// Print this message, or the help of the given command.
    Help {
        /// The command to explain.
        command: Option<String>,
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
    /// What the server speaks (every mode serves every service).
    #[arg(long, value_enum, default_value_t = ServiceKind::Echo)]
    pub service: ServiceKind,
    /// How workers are started in process mode.
    #[arg(long, value_enum, default_value_t = Spawn::Fork)]
    pub spawn: Spawn,
    /// How new connections reach the workers (process mode): one listening socket they all
    /// accept from, or one SO_REUSEPORT socket per worker slot with connections steered
    /// evenly by the client's port.
    #[arg(long, value_enum, default_value_t = crate::balance::Balance::Shared)]
    pub balance: crate::balance::Balance,
    /// How process-mode workers move bytes: epoll (readiness, a read and a write system call
    /// per round trip) or uring (io_uring completions, one system call per loop turn; echo
    /// only, Linux 6.1 or later).
    #[arg(long, value_enum, default_value_t = worker::config::IoDriver::Epoll)]
    pub io: worker::config::IoDriver,
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
    /// Control socket (mode 0600) that `prefork-echo stats` reads; default: ADDRESS-PORT.sock
    /// in $XDG_RUNTIME_DIR/prefork-echo, /run/prefork-echo (root) or /tmp/prefork-echo-UID.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Log one line of totals and rates every --stats-interval.
    #[arg(long)]
    pub log_stats: bool,
    /// Connections held at most, PER WORKER in process mode (--workers 2 --max-conns 100
    /// holds up to 200, but one busy worker may reset at 100 while another idles), in total in
    /// the other modes. Beyond it a new connection is reset at once (ECONNRESET). 0: no limit.
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
    /// stats_interval, worker_timeout, upgrade_grace); its keys override these flags.
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
    /// Expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy sends) before each
    /// connection's data; it is stripped, and the real client goes into the debug log.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// With --proxy-protocol: peers allowed to send a header, as CIDRs (comma-separated).
    /// Anyone else's connection is closed: a header would let a client lie about its address.
    #[arg(long, value_name = "CIDR[,CIDR…]", default_value = worker::config::DEFAULT_PROXY_FROM, requires = "proxy_protocol")]
    pub proxy_from: String,
    /// With --proxy-protocol: seconds a connection may take to send its header.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = seconds, requires = "proxy_protocol")]
    pub proxy_timeout: f64,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9100. Bind it
    /// to loopback or firewall it: it tells anyone who asks about the server.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Write the master's pid here (removed at exit).
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// After a binary upgrade's new master serves, the old one keeps the listening and
    /// control sockets (with no workers) this many seconds, and takes the service back if the
    /// new master dies meanwhile; 0: it retires at once. `upgrade --commit` ends the wait.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = seconds)]
    pub upgrade_grace: f64,
    /// With --service chat: the longest line a client may send, in bytes; a longer one is
    /// refused with a notice (and not sent to anyone).
    #[arg(long, value_name = "BYTES", default_value_t = worker::chat::DEFAULT_MAX_LINE as u64,
          value_parser = clap::value_parser!(u64).range(1..=(60 * 1024)))]
    pub max_line: u64,
    /// With --service chat: limits and terminal safety.
    #[command(flatten)]
    pub chat: worker::chat::ChatOptions,
    /// With --service tftp: the directory served. Every name a client sends resolves beneath
    /// it; `..`, absolute paths and symlinks leading out are refused (TFTP error 2).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// With --service tftp: accept write requests, creating new files only (never
    /// overwriting one), each at most --tftp-max-file bytes.
    #[arg(long)]
    pub tftp_write: bool,
    /// With --tftp-write: the largest file an upload may create, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = worker::tftp::DEFAULT_MAX_FILE)]
    pub tftp_max_file: u64,
    /// With --tftp-write: uploads are refused (TFTP error 3, disk full) when they would leave
    /// less than this many bytes free on the root's file system.
    #[arg(long, value_name = "BYTES", default_value_t = worker::tftp::DEFAULT_MIN_FREE)]
    pub tftp_min_free: u64,
}

/// How a control command finds the server: its control socket.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The server's control socket; default: derived from --listen as the server does.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The server's listen address, used only to derive the default control socket path.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7007")]
    pub listen: String,
}

/// Options of `prefork-echo reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Which server, through its control socket.
    #[command(flatten)]
    pub ctl: CtlArgs,
    /// Act by signal instead: send SIGHUP to the master this pid file names (verified by the
    /// start time it records) and return at once; the server logs the outcome.
    #[arg(long, value_name = "PATH", conflicts_with = "control")]
    pub pid_file: Option<PathBuf>,
}

/// Options of `prefork-echo upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Which server, through its control socket.
    #[command(flatten)]
    pub ctl: CtlArgs,
    /// End the window after an upgrade: the old master retires now instead of waiting out
    /// --upgrade-grace to take the service back should the new one die.
    #[arg(long)]
    pub commit: bool,
    /// Act by signal instead: send SIGUSR2 to the master this pid file names (verified by the
    /// start time it records) and return at once; the server logs the outcome.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["control", "commit"])]
    pub pid_file: Option<PathBuf>,
}

/// Options of `prefork-echo stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Which server, through its control socket.
    #[command(flatten)]
    pub ctl: CtlArgs,
    /// Act by signal instead: send SIGTERM to the master this pid file names (verified by the
    /// start time it records) and wait until it has exited.
    #[arg(long, value_name = "PATH", conflicts_with = "control")]
    pub pid_file: Option<PathBuf>,
}

/// Options of `prefork-echo stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Which server.
    #[command(flatten)]
    pub ctl: CtlArgs,
    /// Print the snapshot as JSON (one object per line with --watch); schema in the README.
    #[arg(long)]
    pub json: bool,
    /// Print again every SECS seconds until interrupted, with rates over each interval.
    #[arg(long, value_name = "SECS", value_parser = positive_seconds)]
    pub watch: Option<f64>,
}

/// Checks what the parser alone cannot: the listen address resolves, and the options fit the
/// mode. A failure is a usage error (exit 2), like any other bad flag.
pub fn validate(args: &ServeArgs) -> Result<(), clap::Error> {
    use clap::CommandFactory;
    use clap::error::ErrorKind;
    if let Err(e) = crate::listener::resolve(&args.listen) {
        return Err(Cli::command().error(ErrorKind::ValueValidation, format!("--listen: {e}")));
    }
    if let Err(e) = worker::proxy::Networks::parse(&args.proxy_from) {
        return Err(Cli::command().error(ErrorKind::ValueValidation, format!("--proxy-from: {e}")));
    }
    if let Some(Err(e)) = args.metrics.as_deref().map(crate::listener::resolve) {
        return Err(Cli::command().error(ErrorKind::ValueValidation, format!("--metrics: {e}")));
    }
    let tftp = args.service == ServiceKind::Tftp;
    let conflict = |msg: &str| Err(Cli::command().error(ErrorKind::ArgumentConflict, msg));
    match (&args.root, tftp) {
        (None, true) => {
            return conflict("--service tftp needs --root DIR: the directory it serves");
        }
        (Some(_), false) => return conflict("--root is for --service tftp"),
        (Some(root), true) if !root.is_dir() => {
            return Err(Cli::command().error(
                ErrorKind::ValueValidation,
                format!("--root {}: not a directory", root.display()),
            ));
        }
        (Some(root), true) if root.to_str().is_none() => {
            return conflict("--root must be a UTF-8 path (it is passed to exec'd workers)");
        }
        _ => {}
    }
    if !tftp && args.tftp_write {
        return conflict("--tftp-write is for --service tftp");
    }
    if tftp && (args.udp || args.proxy_protocol) {
        return conflict("--service tftp is UDP only: --udp and --proxy-protocol are for echo");
    }
    if args.service == ServiceKind::Chat && args.udp {
        return conflict("--udp is for --service echo: chat is lines over TCP");
    }
    if args.io == worker::config::IoDriver::Uring {
        if args.mode != Mode::Process {
            return conflict("--io uring is for --mode process (the workers' event loops)");
        }
        if !args.service.echoes_verbatim() {
            return conflict("--io uring serves --service echo only");
        }
    }
    if args.balance == crate::balance::Balance::Reuseport && args.mode != Mode::Process {
        return conflict("--balance reuseport is for --mode process (one socket per worker slot)");
    }
    if args.udp && args.mode == Mode::ForkPerConn {
        return Err(Cli::command().error(
            ErrorKind::ArgumentConflict,
            "--udp is served in process and thread modes, not fork-per-conn",
        ));
    }
    Ok(())
}

/// A number of seconds from 0 to one year (see [`protocol::duration::MAX_SECS`]).
fn seconds(s: &str) -> Result<f64, String> {
    protocol::duration::parse_secs(s)
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
    fn usage_errors_beyond_the_parser_exit_2() {
        for bad in [
            &["prefork-echo", "--listen", "nonsense"][..],
            &["prefork-echo", "--listen", "127.0.0.1"],
            &["prefork-echo", "--mode", "fork-per-conn", "--udp"],
            &["prefork-echo", "--mode", "thread", "--io", "uring"],
            &["prefork-echo", "--service", "chat", "--io", "uring"],
        ] {
            let cli = Cli::try_parse_from(bad).unwrap();
            let err = validate(&cli.serve).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
        let ok = Cli::try_parse_from(["prefork-echo", "--listen", "[::1]:0", "--udp"]).unwrap();
        assert!(validate(&ok.serve).is_ok());
        // scale acts through the control socket only: a pid file is a usage error.
        let e = Cli::try_parse_from(["prefork-echo", "scale", "4", "--pid-file", "x"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
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
            &["prefork-echo", "--drain-timeout", "1e19"],
            &["prefork-echo", "--drain-timeout", "1e20"],
            &["prefork-echo", "--idle-timeout", "1e19"],
            &["prefork-echo", "--worker-timeout", "1e300"],
            &["prefork-echo", "--stats-interval", "1e19"],
            &["prefork-echo", "--bogus"],
        ] {
            let err = Cli::try_parse_from(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }
}
