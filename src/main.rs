//! prefork-echo: the binary's edge. Parses the command line, binds the listening socket,
//! and hands over to the master (process mode) or the thread server. Errors end here as one
//! line and exit code 1; clap's usage errors exit 2.

mod cli;
mod control;
mod fork_per_conn;
mod listener;
mod master;
mod signals;
mod spawn;
mod stats;
mod thread_mode;

use std::ffi::CString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use cli::{Cli, Command, Mode, ServeArgs, StatsArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Worker(cfg)) => ExitCode::from(worker::run(cfg) as u8),
        Some(Command::Stats(args)) => match print_stats(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("prefork-echo: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        None => match serve(cli.serve) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("prefork-echo: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Descriptors the master keeps for itself besides one channel per worker.
const MASTER_FDS: u64 = 32;

fn serve(args: ServeArgs) -> Result<()> {
    let workers = match args.workers {
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    let addr = listener::resolve(&args.listen)?;
    let nofile = raise_nofile_limit();
    if u64::from(workers) + MASTER_FDS > nofile {
        bail!(
            "--workers {workers} needs about {} descriptors but the limit (RLIMIT_NOFILE) is {nofile}",
            u64::from(workers) + MASTER_FDS
        );
    }
    let socket = listener::bind(addr, args.backlog)?;
    let addr = listener::local_addr(&socket).context("reading the bound address")?;
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| control::default_path(addr.port()));
    let stats_every = worker::config::secs(args.stats_interval);
    let log_stats = (args.log_stats && !stats_every.is_zero()).then_some(stats_every);
    worker::log::set_role(match args.mode {
        Mode::Process => "master",
        Mode::Thread => "thread-mode",
        Mode::ForkPerConn => "fork-per-conn",
    });
    match args.mode {
        Mode::Process => {
            let exe = std::env::current_exe().context("finding this binary for exec spawning")?;
            let exe = CString::new(exe.as_os_str().as_bytes()).context("binary path")?;
            let cfg = master::MasterConfig {
                workers,
                spawn: args.spawn,
                exe,
                drain_timeout: worker::config::secs(args.drain_timeout),
                worker: worker::WorkerConfig {
                    listen_fd: -1,
                    ipc_fd: -1,
                    id: 0,
                    generation: 1,
                    max_unsent: args.max_unsent as usize,
                    drain_timeout: args.drain_timeout,
                    stats_interval: args.stats_interval,
                },
                control,
                log_stats: log_stats.is_some(),
            };
            master::run(cfg, socket, addr)
        }
        Mode::ForkPerConn => fork_per_conn::run(
            fork_per_conn::ForkConfig {
                drain_timeout: worker::config::secs(args.drain_timeout),
                control,
                log_stats,
            },
            socket,
            addr,
        ),
        Mode::Thread => thread_mode::run(
            thread_mode::ThreadConfig {
                acceptors: workers,
                drain_timeout: worker::config::secs(args.drain_timeout),
                control,
                log_stats,
            },
            socket,
            addr,
        ),
    }
}

/// `prefork-echo stats`: fetch the snapshot from the control socket and print it.
fn print_stats(args: StatsArgs) -> Result<()> {
    let path = match args.control {
        Some(p) => p,
        None => control::default_path(listener::resolve(&args.listen)?.port()),
    };
    let mut previous: Option<stats::Snapshot> = None;
    loop {
        let answer = control::request(&path, "stats")?;
        let snap: stats::Snapshot = serde_json::from_str(&answer)
            .with_context(|| format!("unexpected answer from {}: {answer}", path.display()))?;
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{answer}")?;
        } else {
            write!(out, "{}", snap.table(previous.as_ref()))?;
        }
        out.flush()?;
        let Some(every) = args.watch else {
            return Ok(());
        };
        if !args.json {
            writeln!(out)?;
        }
        drop(out);
        previous = Some(snap);
        std::thread::sleep(worker::config::secs(every));
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
