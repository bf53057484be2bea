//! The control commands a person runs against a live server: `stats`, `reload`, `stop`,
//! `upgrade` and `scale`. They speak to the control socket; given only a pid file, they send the signal the
//! signal table names for the action instead.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cli::{CtlArgs, ReloadArgs, StatsArgs, StopArgs, UpgradeArgs};
use crate::control::{Request, Response};
use crate::signals;
use crate::{control, listener, stats};

/// How long `reload` waits for the new generation.
const RELOAD_WAIT: Duration = Duration::from_secs(120);
/// What `stop` adds to the server's drain timeout before it gives up waiting.
const STOP_SLACK: Duration = Duration::from_secs(15);

fn control_path(args: CtlArgs) -> Result<PathBuf> {
    Ok(match args.control {
        Some(p) => p,
        None => control::default_path(listener::resolve(&args.listen)?)?,
    })
}

/// Sends a request and returns the server's answer; an error answer becomes `Err`.
fn ask(path: &Path, req: &str, wait: Duration) -> Result<(String, Response)> {
    match control::request_within(path, req, wait)? {
        (_, Response::Error { error }) => bail!("{error}"),
        answer => Ok(answer),
    }
}

/// The answer did not fit the request (a server of another version?).
fn unexpected(path: &Path, answer: &str) -> anyhow::Error {
    anyhow!("unexpected answer from {}: {answer}", path.display())
}

fn read_pid(path: &Path) -> Result<Pid> {
    // The error's text already ends with its cause: not chained a second time.
    crate::runtime_files::verified_pid(path).map_err(|e| anyhow!("{e}"))
}

/// Asks by signal what `request` asks over the control socket (the verb table says which).
fn signal_request(pid: Pid, request: &Request) -> Result<Signal> {
    let verb = request.verb();
    let sig = verb
        .action
        .and_then(signals::signal_for)
        .and_then(|s| Signal::try_from(s).ok())
        .ok_or_else(|| anyhow!("`{}` cannot be asked by signal", verb.name))?;
    kill(pid, sig).with_context(|| format!("sending {sig} to {pid}"))?;
    Ok(sig)
}

/// Whether `pid` has exited (a zombie counts as exited: it serves nothing).
fn gone(pid: Pid) -> bool {
    procfs::process::Process::new(pid.as_raw())
        .and_then(|p| p.stat())
        .map_or(true, |s| s.state == 'Z')
}

fn wait_gone(pid: Pid, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while !gone(pid) {
        if Instant::now() >= deadline {
            bail!("server {pid} still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `prefork-echo stats`: fetch the snapshot from the control socket and print it.
pub fn stats(args: StatsArgs) -> Result<()> {
    let path = control_path(args.ctl)?;
    let mut previous: Option<stats::Snapshot> = None;
    // On a terminal, --watch redraws in place (clear screen, cursor home); piped, it appends.
    let redraw = args.watch.is_some() && !args.json && std::io::stdout().is_terminal();
    loop {
        let (answer, response) = ask(&path, &Request::Stats.line(), control::CLIENT_DEADLINE)?;
        let Response::Stats(snap) = response else {
            return Err(unexpected(&path, &answer));
        };
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{answer}")?;
        } else {
            if redraw {
                write!(out, "\x1b[H\x1b[2J")?;
            }
            write!(out, "{}", snap.table(previous.as_ref()))?;
        }
        out.flush()?;
        let Some(every) = args.watch else {
            return Ok(());
        };
        if !args.json && !redraw {
            writeln!(out)?;
        }
        drop(out);
        previous = Some(*snap);
        std::thread::sleep(protocol::duration::secs(every));
    }
}

/// `prefork-echo reload`: returns once the new generation serves.
pub fn reload(args: ReloadArgs) -> Result<()> {
    if let Some(pid_file) = args.pid_file {
        let pid = read_pid(&pid_file)?;
        let sig = signal_request(pid, &Request::Reload)?;
        println!("sent {sig} to {pid}; the server logs when the new generation serves");
        return Ok(());
    }
    let path = control_path(args.ctl)?;
    match ask(&path, &Request::Reload.line(), RELOAD_WAIT)? {
        (
            _,
            Response::Reloaded {
                generation,
                workers,
                ..
            },
        ) => {
            println!(
                "generation {generation} serving ({})",
                plural(u64::from(workers), "worker")
            );
            Ok(())
        }
        (answer, _) => Err(unexpected(&path, &answer)),
    }
}

/// `prefork-echo stop`: returns once the server has exited.
pub fn stop(args: StopArgs) -> Result<()> {
    let (pid, drain) = if let Some(pid_file) = args.pid_file {
        let pid = read_pid(&pid_file)?;
        signal_request(pid, &Request::Stop)?;
        (pid, Duration::from_secs(60))
    } else {
        let path = control_path(args.ctl)?;
        match ask(&path, &Request::Stop.line(), control::CLIENT_DEADLINE)? {
            (
                _,
                Response::Stopping {
                    pid,
                    drain_timeout_secs,
                    ..
                },
            ) => (
                Pid::from_raw(pid as i32),
                protocol::duration::secs(drain_timeout_secs),
            ),
            (answer, _) => return Err(unexpected(&path, &answer)),
        }
    };
    wait_gone(pid, drain + STOP_SLACK)?;
    println!("server {pid} stopped");
    Ok(())
}

/// `prefork-echo upgrade`: starts a new master from the binary on disk (returns at once; the
/// server logs when it serves). `--commit`: ends the upgrade window, the old master retires.
pub fn upgrade(args: UpgradeArgs) -> Result<()> {
    if let Some(pid_file) = args.pid_file {
        let pid = read_pid(&pid_file)?;
        let sig = signal_request(pid, &Request::Upgrade)?;
        println!("sent {sig} to {pid}; the server logs when the new master serves");
        return Ok(());
    }
    let path = control_path(args.ctl)?;
    let request = if args.commit {
        Request::UpgradeCommit
    } else {
        Request::Upgrade
    };
    match ask(&path, &request.line(), control::CLIENT_DEADLINE)? {
        (_, Response::Upgrading { new_master_pid, .. }) => {
            println!(
                "started a new master (pid {new_master_pid}); it takes over once it serves (`prefork-echo stats` shows the upgrade window)"
            );
            Ok(())
        }
        (_, Response::Committed { old_master_pid, .. }) => {
            println!("upgrade committed: the old master (pid {old_master_pid}) retires now");
            Ok(())
        }
        (answer, _) => Err(unexpected(&path, &answer)),
    }
}

/// `prefork-echo scale N`.
pub fn scale(workers: u32, args: CtlArgs) -> Result<()> {
    let path = control_path(args)?;
    match ask(
        &path,
        &Request::Scale(workers).line(),
        control::CLIENT_DEADLINE,
    )? {
        (_, Response::Scaled { workers, .. }) => {
            println!("scaling to {}", plural(u64::from(workers), "worker"));
            Ok(())
        }
        (answer, _) => Err(unexpected(&path, &answer)),
    }
}

/// `1 worker`, `3 workers`.
pub fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}
