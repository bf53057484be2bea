//! What the master does to the world outside its own state: start, signal and reap processes,
//! read the clock, tell the service manager, print the announce line. Behind one trait so the
//! master's policy runs unchanged against [`Os`] in production and against a recording fake
//! in its unit tests (pingora's injectable phases, gunicorn's arbiter verbs).

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use worker::WorkerConfig;

use crate::cli::Spawn;
use crate::spawn::{self, Exited, Handover, SpawnError, Spawned};
use crate::systemd;

/// The master's means of acting on processes and time.
pub trait System {
    /// The current time (the master never reads the clock itself).
    fn now(&self) -> Instant;
    /// Starts a worker serving `cfg` on `listener` (and `udp`); `shed` runs in a fork-mode
    /// child before it becomes a worker.
    fn spawn_worker(
        &mut self,
        how: Spawn,
        exe: &CString,
        listener: RawFd,
        udp: Option<RawFd>,
        cfg: WorkerConfig,
        shed: &mut dyn FnMut(),
    ) -> Result<Spawned, SpawnError>;
    /// Starts a new master (binary upgrade) with `handover`.
    fn spawn_successor(
        &mut self,
        exe: &CString,
        handover: &Handover,
        shed: &mut dyn FnMut(),
    ) -> io::Result<Pid>;
    /// Sends `sig` to `pid`.
    fn kill(&mut self, pid: Pid, sig: Signal) -> nix::Result<()>;
    /// Every child that has exited since the last call.
    fn reap(&mut self) -> Vec<Exited>;
    /// Tells the service manager (systemd) about a state change.
    fn notify(&mut self, state: &str);
    /// Prints the one line that says the server is serving.
    fn announce(&mut self, addr: SocketAddr, workers: u32);
}

/// The real thing: fork, exec, kill(2), waitpid(2), the monotonic clock.
#[derive(Debug, Default)]
pub struct Os;

impl System for Os {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn spawn_worker(
        &mut self,
        how: Spawn,
        exe: &CString,
        listener: RawFd,
        udp: Option<RawFd>,
        cfg: WorkerConfig,
        shed: &mut dyn FnMut(),
    ) -> Result<Spawned, SpawnError> {
        spawn::spawn_worker(how, exe, listener, udp, cfg, shed)
    }

    fn spawn_successor(
        &mut self,
        exe: &CString,
        handover: &Handover,
        shed: &mut dyn FnMut(),
    ) -> io::Result<Pid> {
        spawn::spawn_successor(exe, handover, shed)
    }

    fn kill(&mut self, pid: Pid, sig: Signal) -> nix::Result<()> {
        nix::sys::signal::kill(pid, sig)
    }

    fn reap(&mut self) -> Vec<Exited> {
        spawn::reap_exited()
    }

    fn notify(&mut self, state: &str) {
        systemd::notify(state);
    }

    fn announce(&mut self, addr: SocketAddr, workers: u32) {
        crate::announce(addr, "process", workers);
    }
}
