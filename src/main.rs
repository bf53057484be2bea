//! prefork-echo: the binary's edge. Parses the command line, binds the listening socket,
//! and hands over to the master (process mode) or the thread server. Errors end here as one
//! line and exit code 1; clap's usage errors exit 2.

mod blocking;
mod cli;
mod client;
mod config;
mod control;
mod fork_per_conn;
mod listener;
mod master;
mod privileges;
mod signals;
mod spawn;
mod stats;
mod systemd;
mod thread_mode;

use std::ffi::CString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use cli::{Cli, Command, Mode, ServeArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Worker(cfg)) => ExitCode::from(worker::run(cfg) as u8),
        Some(Command::Stats(args)) => edge(client::stats(args)),
        Some(Command::Reload(args)) => edge(client::reload(args)),
        Some(Command::Stop(args)) => edge(client::stop(args)),
        Some(Command::Scale { workers, ctl }) => edge(client::scale(workers, ctl)),
        None => edge(serve(cli.serve)),
    }
}

/// Every command's errors end here: one line, exit code 1.
fn edge(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prefork-echo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Descriptors the master keeps for itself besides one channel per worker.
const MASTER_FDS: u64 = 32;

fn serve(args: ServeArgs) -> Result<()> {
    let base = master::Settings {
        workers: match args.workers {
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        },
        worker_timeout: (args.worker_timeout > 0.0)
            .then(|| worker::config::secs(args.worker_timeout)),
        worker: worker::WorkerConfig {
            listen_fd: -1,
            ipc_fd: -1,
            udp_fd: -1,
            id: 0,
            generation: 1,
            max_unsent: args.max_unsent as usize,
            drain_timeout: args.drain_timeout,
            stats_interval: args.stats_interval,
            max_conns: args.max_conns,
            idle_timeout: args.idle_timeout,
        },
    };
    let settings = master::Settings::resolve(&base, args.config.as_ref()).context("config file")?;
    let workers = settings.workers;
    let nofile = raise_nofile_limit();
    if u64::from(workers) + MASTER_FDS > nofile {
        bail!(
            "--workers {workers} needs about {} descriptors but the limit (RLIMIT_NOFILE) is {nofile}",
            u64::from(workers) + MASTER_FDS
        );
    }
    // A master started by a binary upgrade inherits its predecessor's signal mask (all
    // blocked across fork/exec); open it before anything else.
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .context("unblocking signals")?;
    let spawn::Inherited {
        listener: inherited,
        ready: predecessor,
        udp: inherited_udp,
    } = spawn::from_predecessor();
    if args.udp && args.mode == Mode::ForkPerConn {
        bail!("--udp is served in process and thread modes, not fork-per-conn");
    }
    let socket = match (inherited, systemd::listen_fd()) {
        (Some(fd), _) => {
            listener::adopt(fd).context("the listener handed over by the old master")?
        }
        (None, Some(fd)) => listener::adopt(fd).context("the socket systemd passed")?,
        (None, None) => listener::bind(listener::resolve(&args.listen)?, args.backlog)?,
    };
    let addr = listener::local_addr(&socket).context("reading the bound address")?;
    let udp = match (args.udp, inherited_udp) {
        (true, Some(fd)) => Some(listener::adopt_udp(fd).context("the UDP socket handed over")?),
        (true, None) => Some(listener::bind_udp(addr)?),
        (false, _) => None,
    };
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| control::default_path(addr.port()));
    let control_server = control::ControlServer::bind(&control, predecessor.is_some())?;
    let pid_file = args.pid_file.clone();
    if let Some(path) = &pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing the pid file {}", path.display()))?;
    }
    // Everything that needs root is done: sockets bound, files created.
    match &args.user {
        Some(user) => {
            let owned: Vec<&std::path::Path> = std::iter::once(control.as_path())
                .chain(pid_file.as_deref())
                .collect();
            let (uid, gid) = privileges::drop_to(user, args.group.as_deref(), &owned)
                .context("dropping privileges")?;
            worker::log!("serving as {user} (uid {uid}, gid {gid})");
        }
        None if nix::unistd::Uid::effective().is_root() => {
            worker::log!("serving as root: pass --user NAME to drop privileges after binding");
        }
        None => {}
    }
    let result = run_mode(
        args,
        settings,
        base,
        (socket, udp),
        addr,
        control,
        control_server,
        predecessor,
    );
    if let Some(path) = &pid_file {
        // Only our own: after an upgrade the file names the new master.
        if std::fs::read_to_string(path).is_ok_and(|s| s.trim() == std::process::id().to_string()) {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

/// Hands the bound socket and control socket to the chosen serving mode.
#[allow(clippy::too_many_arguments)]
fn run_mode(
    args: ServeArgs,
    settings: master::Settings,
    base: master::Settings,
    (socket, udp): (socket2::Socket, Option<std::net::UdpSocket>),
    addr: std::net::SocketAddr,
    control: std::path::PathBuf,
    control_server: control::ControlServer,
    predecessor: Option<std::os::fd::OwnedFd>,
) -> Result<()> {
    let workers = settings.workers;
    let stats_every = settings.worker.stats_every().unwrap_or_default();
    let log_stats = (args.log_stats && !stats_every.is_zero()).then_some(stats_every);
    worker::log::set_role(match args.mode {
        Mode::Process => "master",
        Mode::Thread => "thread-mode",
        Mode::ForkPerConn => "fork-per-conn",
    });
    let drain_timeout = settings.worker.drain();
    let limits = blocking::Limits::of(&settings.worker);
    let single_process = || blocking::SingleProcessConfig {
        drain_timeout,
        control: control.clone(),
        log_stats,
        limits,
    };
    match args.mode {
        Mode::Process => {
            let exe = std::env::current_exe().context("finding this binary for exec spawning")?;
            let exe = CString::new(exe.as_os_str().as_bytes()).context("binary path")?;
            let cfg = master::MasterConfig {
                spawn: args.spawn,
                exe,
                control,
                log_stats: log_stats.is_some(),
                config_file: args.config,
                pid_file: args.pid_file,
                base,
                predecessor,
                udp,
            };
            master::run(cfg, settings, socket, addr, control_server)
        }
        Mode::ForkPerConn => fork_per_conn::run(single_process(), socket, addr, control_server),
        Mode::Thread => thread_mode::run(
            thread_mode::ThreadConfig {
                acceptors: workers,
                udp,
                base: single_process(),
            },
            socket,
            addr,
            control_server,
        ),
    }
}

/// Raises the soft descriptor limit to the hard one (a worker holds one descriptor per
/// connection; the usual soft limit of 1024 would cap it far below what it can serve) and
/// returns the limit in force.
fn raise_nofile_limit() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// Prints the one line scripts and tests wait for, once every worker is accepting.
pub(crate) fn announce(addr: SocketAddr, mode: &str, workers: u32) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "listening on {addr} (mode={mode}, workers={workers}, pid={})",
        std::process::id()
    );
    let _ = out.flush();
}
