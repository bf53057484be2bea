//! Binary upgrade: a new master from the binary on disk inherits the sockets; once it serves,
//! this one waits out the upgrade window (`window.rs`), then retires. A stop during the
//! upgrade stops the new master too.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use mio::Interest;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{Master, Phase, SUCCESSOR, System, UPGRADE_TIMEOUT};
use crate::spawn::Handover;

/// A binary upgrade under way: a new master started from the binary on disk.
#[derive(Debug)]
pub(super) struct Successor {
    pub(super) pid: Pid,
    pub(super) started: Instant,
    /// Its readiness pipe, watched until it closes.
    pub(super) ready: Option<io::PipeReader>,
    /// It said it serves.
    pub(super) serving: bool,
    /// SIGKILL was sent (it outlived a stop): only waited for now.
    pub(super) killed: bool,
    /// Told to stop before it was ready: SIGKILL at this instant if it is still there.
    pub(super) kill_at: Option<Instant>,
    /// What this master handed it (totals, life cycle).
    pub(super) handed: super::Carryover,
    /// Its latest report of its own carried stats, sent over the pipe while in the window:
    /// what a roll-back adds to this master's own (it cannot read a dead process's memory).
    pub(super) reported: Option<super::Carryover>,
    /// A line of its pipe not yet complete.
    pub(super) partial: Vec<u8>,
}

/// How long a new master told to stop before it was ready may take to exit before SIGKILL. It
/// serves nobody the operator counts on yet; a hung one must not hold up the stop (or the
/// port) for the whole readiness deadline.
pub(super) const PENDING_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl<S: System> Master<S> {
    /// Binary upgrade: start a new master from the binary on disk and hand it the listener,
    /// the UDP socket and the control socket by descriptor, with the totals so far.
    pub(super) fn start_upgrade(&mut self) -> Result<()> {
        if self.phase != Phase::Running {
            anyhow::bail!("the server is stopping");
        }
        if self.successor.is_some() {
            anyhow::bail!("an upgrade is already under way");
        }
        // The master before us keeps its window until our own new master serves: should this
        // upgrade fail and this master then die, that one is still the way back.
        let listeners = self
            .listener
            .as_ref()
            .ok_or_else(|| anyhow!("the listener is closed"))?
            .fds();
        let control = self
            .control
            .as_ref()
            .ok_or_else(|| anyhow!("the control socket is closed"))?
            .raw_fd();
        let handed = self.carryover();
        let (ready, ready_tx) = io::pipe().context("creating the readiness pipe")?;
        nix::fcntl::fcntl(
            &ready,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let handover = Handover {
            listener: listeners[0],
            slots: listeners[1..].to_vec(),
            udp: self.cfg.udp.as_ref().map(|u| u.fds()).unwrap_or_default(),
            control,
            metrics: self.metrics.as_ref().map(|m| m.raw_fd()),
            ready: ready_tx.as_raw_fd(),
            root: (self.settings.worker.root_fd >= 0).then_some(self.settings.worker.root_fd),
            carried: serde_json::to_string(&handed)?,
        };
        let lp = &mut self.lp;
        let pid = self
            .sys
            .spawn_successor(&self.cfg.exe, &handover, &mut || lp.drop_signals())
            .context("starting the new master")?;
        drop(ready_tx);
        self.lp.registry().register(
            &mut mio::unix::SourceFd(&ready.as_raw_fd()),
            SUCCESSOR,
            Interest::READABLE,
        )?;
        protocol::log!(
            "upgrade: started a new master (pid {pid}) from {:?}",
            self.cfg.exe
        );
        self.successor = Some(Successor {
            pid,
            started: self.sys.now(),
            ready: Some(ready),
            serving: false,
            killed: false,
            kill_at: None,
            handed,
            reported: None,
            partial: Vec::new(),
        });
        Ok(())
    }

    /// The new master serves: this one waits out the upgrade window, or with
    /// `--upgrade-grace 0` retires at once (unless a stop raced the upgrade, in which case the
    /// successor was told to stop too).
    pub(super) fn on_successor_ready(&mut self) {
        let Some(s) = self.successor.as_mut() else {
            return;
        };
        s.serving = true;
        let pid = s.pid;
        // Our own window is over now: the master before us must not come back once the
        // service is handed on again.
        self.commit_predecessor("a newer master serves");
        if self.phase == Phase::Running && !self.settings.upgrade_grace.is_zero() {
            self.enter_window(pid);
            return;
        }
        let Some(s) = self.forget_successor() else {
            return;
        };
        if self.phase != Phase::Running {
            return;
        }
        protocol::log!(
            "upgrade: new master (pid {}) serving; this master retires",
            s.pid
        );
        if let Some(c) = self.control.as_mut() {
            c.release_name();
        }
        // Not a stop of the service: the new master has told the service manager it is the
        // main process now, so no STOPPING=1 from here.
        self.drain_all("binary upgrade", false);
    }

    /// Stops watching the successor's readiness pipe; it is no longer ours to wait for.
    pub(super) fn forget_successor(&mut self) -> Option<Successor> {
        self.unwatch_successor();
        self.successor.take()
    }

    pub(super) fn upgrade_failed(&mut self, why: &str) {
        let Some(s) = self.forget_successor() else {
            return;
        };
        let _ = self.sys.kill(s.pid, Signal::SIGKILL);
        self.lifecycle.upgrades_failed += 1;
        protocol::warn!(
            "upgrade failed: {why}; this master (pid {}) keeps serving",
            std::process::id()
        );
        self.reclaim_pid_file();
    }

    /// A successor writes its pid over ours when it starts; one that failed or was stopped
    /// leaves this master to put its own back.
    pub(super) fn reclaim_pid_file(&self) {
        if let Some(path) = &self.cfg.pid_file {
            if let Err(e) = crate::runtime_files::write_pid_file(path, None) {
                protocol::warn!("cannot rewrite the pid file: {e}");
            }
        }
    }

    /// A stop during an upgrade stops the new master too (it holds the listener and may
    /// already serve): the server stops as a whole, and this master waits for it.
    /// One that is not ready yet gets SIGTERM and [`PENDING_STOP_GRACE`] to exit, or SIGKILL
    /// at once for an immediate stop (SIGQUIT): it may hang before ready (a broken build), and
    /// meanwhile it holds the listening socket.
    pub(super) fn stop_successor(&mut self, sig: Signal) {
        let now = self.sys.now();
        let Some(s) = self.successor.as_mut().filter(|s| !s.killed) else {
            return;
        };
        let sig = if s.serving || sig == Signal::SIGTERM {
            if !s.serving {
                s.kill_at.get_or_insert(now + PENDING_STOP_GRACE);
            }
            sig
        } else {
            s.killed = true;
            Signal::SIGKILL
        };
        protocol::log!("stopping the new master (pid {}) too: {sig}", s.pid);
        match self.sys.kill(s.pid, sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => protocol::warn!("cannot send {sig} to the new master: {e}"),
        }
    }

    /// A new master told to stop before it was ready has had its time: SIGKILL.
    pub(super) fn kill_overdue_successor(&mut self) {
        let now = self.sys.now();
        let timed_out = |s: &Successor| now.saturating_duration_since(s.started) >= UPGRADE_TIMEOUT;
        let Some(s) = self.successor.as_ref().filter(|s| !s.serving && !s.killed) else {
            return;
        };
        if self.phase == Phase::Running {
            if timed_out(s) {
                self.upgrade_failed(&format!(
                    "the new master was not ready within {UPGRADE_TIMEOUT:?}"
                ));
            }
            return;
        }
        if timed_out(s) || s.kill_at.is_some_and(|t| now >= t) {
            protocol::warn!(
                "the new master (pid {}) did not stop in time; killing it",
                s.pid
            );
            let pid = s.pid;
            // Once: the reap forgets it.
            if let Some(s) = self.successor.as_mut() {
                s.killed = true;
            }
            let _ = self.sys.kill(pid, Signal::SIGKILL);
        }
    }

    /// When a pending new master must be ready, or killed, for the loop's wait.
    pub(super) fn successor_timer(&self) -> Option<Instant> {
        let s = self
            .successor
            .as_ref()
            .filter(|s| !s.killed && !s.serving)?;
        let ready_by = s.started + UPGRADE_TIMEOUT;
        Some(s.kill_at.map_or(ready_by, |t| t.min(ready_by)))
    }
}
