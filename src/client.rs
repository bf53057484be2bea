//! The control commands a person runs against a live server: `stats`, `reload`, `stop` and
//! `scale`. They speak to the control socket; given only a pid file, they send the signal the
//! signal table names for the action instead.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::cli::{CtlArgs, ReloadArgs, StatsArgs, StopArgs};
use crate::signals::{self, Action};
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

/// Sends a request and parses the one-line JSON answer; `{"error": …}` becomes `Err`.
fn ask(path: &Path, req: &str, wait: Duration) -> Result<Value> {
    let answer = control::request_within(path, req, wait)?;
    let v: Value = serde_json::from_str(&answer)
        .with_context(|| format!("unexpected answer from {}: {answer}", path.display()))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("{e}");
    }
    Ok(v)
}

fn read_pid(path: &Path) -> Result<Pid> {
    Ok(crate::runtime_files::verified_pid(path)?)
}

fn signal_action(pid: Pid, action: Action) -> Result<()> {
    let sig = signals::signal_for(action)
        .and_then(|s| Signal::try_from(s).ok())
        .ok_or_else(|| anyhow!("no signal for {action:?}"))?;
    kill(pid, sig).with_context(|| format!("sending {sig} to {pid}"))
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
        let answer = control::request(&path, "stats")?;
        let snap: stats::Snapshot = serde_json::from_str(&answer)
            .with_context(|| format!("unexpected answer from {}: {answer}", path.display()))?;
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
        previous = Some(snap);
        std::thread::sleep(protocol::duration::secs(every));
    }
}

/// `prefork-echo reload`: returns once the new generation serves.
pub fn reload(args: ReloadArgs) -> Result<()> {
    if let Some(pid_file) = args.pid_file {
        let pid = read_pid(&pid_file)?;
        signal_action(pid, Action::Reload)?;
        println!("sent SIGHUP to {pid}; the server logs when the new generation serves");
        return Ok(());
    }
    let path = control_path(args.ctl)?;
    let v = ask(&path, "reload", RELOAD_WAIT)?;
    println!(
        "generation {} serving ({})",
        v["generation"],
        plural(v["workers"].as_u64().unwrap_or(0), "worker")
    );
    Ok(())
}

/// `prefork-echo stop`: returns once the server has exited.
pub fn stop(args: StopArgs) -> Result<()> {
    let (pid, drain) = if let Some(pid_file) = args.pid_file {
        let pid = read_pid(&pid_file)?;
        signal_action(pid, Action::GracefulStop)?;
        (pid, Duration::from_secs(60))
    } else {
        let path = control_path(args.ctl)?;
        let v = ask(&path, "stop", control::CLIENT_DEADLINE)?;
        let pid = v["pid"]
            .as_i64()
            .ok_or_else(|| anyhow!("the answer names no pid: {v}"))?;
        let drain = v["drain_timeout_secs"].as_f64().unwrap_or(60.0);
        (Pid::from_raw(pid as i32), protocol::duration::secs(drain))
    };
    wait_gone(pid, drain + STOP_SLACK)?;
    println!("server {pid} stopped");
    Ok(())
}

/// `prefork-echo scale N`.
pub fn scale(workers: u32, args: CtlArgs) -> Result<()> {
    let path = control_path(args)?;
    let v = ask(&path, &format!("scale {workers}"), control::CLIENT_DEADLINE)?;
    println!(
        "scaling to {}",
        plural(v["workers"].as_u64().unwrap_or(0), "worker")
    );
    Ok(())
}

/// `1 worker`, `3 workers`.
pub fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}
