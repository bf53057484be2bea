//! prefork-echo: the binary's edge. Parses the command line, binds the listening socket,
//! and hands over to the master (process mode) or the thread server. Errors end here as one
//! line and exit code 1; clap's usage errors exit 2.

mod cli;
mod listener;
mod master;
mod signals;
mod spawn;
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
    worker::log::set_role(match args.mode {
        Mode::Process => "master",
        Mode::Thread => "thread-mode",
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
            };
            master::run(cfg, socket, addr)
        }
        Mode::Thread => thread_mode::run(
            thread_mode::ThreadConfig {
                acceptors: workers,
                drain_timeout: worker::config::secs(args.drain_timeout),
            },
            socket,
            addr,
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
