//! The upgrade window, a safety net under binary upgrades. Once a new master serves, the old
//! one drains its workers but keeps the listening sockets, the UDP sockets and the control
//! socket's descriptor for `--upgrade-grace`. Should the new master die within it (a bad
//! build, a crash on the first real request), the old master starts a fresh generation of
//! workers on the sockets it kept, takes its control socket path and pid file back, tells the
//! service manager it is the main process again, and serves on. At the end of the window, or
//! once the new master commits (`prefork-echo upgrade --commit`, or it is stopped or upgraded
//! in turn), the old master retires. A death after the window is the new master's own
//! business (its own upgrade, its own stop), never a reason to resurrect the old one.
//!
//! Both ends live here: the old master's window (reading `ready` and `commit` from the new
//! master's pipe), and the new master's end (keeping that pipe to commit on).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use nix::sys::signal::Signal;

use super::{Backoff, Carryover, Event, Master, Phase, System};
use crate::control::ControlServer;
use crate::signals::{self, Action};
use crate::stats::UpgradeWindow;

/// On a new master: the old master that started it, waiting out its window.
#[derive(Debug)]
pub(super) struct Predecessor {
    /// The write end of its readiness pipe: `commit` ends its window.
    pipe: std::fs::File,
    /// Its pid (this process's parent while it lives).
    pid: u32,
    /// When its window closes (it counts from the same `ready`, with the same setting).
    until: Instant,
    /// When to report this master's stats to it next (`stats JSON`), for a roll-back.
    next_report: Instant,
}

/// How often a new master reports its stats to the old one during the window.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl<S: System> Master<S> {
    /// The new master writes `ready` once it serves, `commit` when the upgrade is final, and
    /// `stats JSON` every second or so while the window is open. Lines may arrive in pieces.
    /// At end-of-file the pipe is no longer watched (a closed pipe is readable for ever);
    /// whether the new master died is the reap's to say.
    pub(super) fn read_successor(&mut self, out: &mut Vec<Event>) {
        let Some(s) = self.successor.as_mut() else {
            return;
        };
        let Some(pipe) = s.ready.as_mut() else {
            return;
        };
        let mut closed = false;
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => s.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock: all read
            }
        }
        while let Some(end) = s.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = s.partial.drain(..=end).collect();
            match &line[..end] {
                b"ready" => out.push(Event::SuccessorReady),
                b"commit" => out.push(Event::SuccessorCommitted),
                l if l.starts_with(b"stats ") => {
                    let text = String::from_utf8_lossy(&l[6..]);
                    out.push(Event::SuccessorStats(Box::new(Carryover::parse(&text))));
                }
                _ => {}
            }
        }
        // A line longer than any this protocol has is not one: drop it rather than grow.
        if s.partial.len() > 64 * 1024 {
            s.partial.clear();
        }
        if closed {
            self.unwatch_successor();
        }
    }

    /// Stops watching the successor's pipe (it stays tracked by pid).
    pub(super) fn unwatch_successor(&mut self) {
        if let Some(pipe) = self.successor.as_mut().and_then(|s| s.ready.take()) {
            self.lp.unwatch(pipe.as_raw_fd());
        }
    }

    /// The new master serves: drain this master's workers but keep every socket until the
    /// window closes.
    pub(super) fn enter_window(&mut self, successor: nix::unistd::Pid) {
        let grace = self.settings.upgrade_grace;
        let now = self.sys.now();
        self.phase = Phase::UpgradeWindow { until: now + grace };
        if let Some(r) = self.reload.take() {
            let answer = crate::control::Response::error("a binary upgrade took over");
            self.answer(r.waiters, &answer);
        }
        // The new master answers on the control socket and the metrics port now: stop
        // accepting on them (the descriptors stay ours, for a roll-back).
        if let Some(c) = self.control.as_mut() {
            c.release_name();
            self.lp.unwatch(c.raw_fd());
        }
        if let Some(m) = &self.metrics {
            self.lp.unwatch(m.raw_fd());
        }
        let mut draining = 0;
        for (_, w) in &mut self.workers {
            if w.start_draining(now) {
                draining += 1;
                let _ = self.sys.kill(w.pid, Signal::SIGTERM);
            }
        }
        protocol::log!(
            "upgrade: new master (pid {successor}) serving; draining {draining} worker(s); this master keeps the sockets for {grace:?} to take the service back should it die (`prefork-echo upgrade --commit` ends the wait)"
        );
    }

    /// The window is over (its time is up, or the new master committed, or this master was
    /// told to stop): retire as an upgrade always did, leaving the new master alone.
    pub(super) fn retire(&mut self, why: &str) {
        if !matches!(self.phase, Phase::UpgradeWindow { .. }) {
            return;
        }
        let Some(s) = self.forget_successor() else {
            return;
        };
        protocol::log!(
            "upgrade: {why}; this master (pid {}) retires, the new master (pid {}) serves on",
            std::process::id(),
            s.pid
        );
        // Not a stop of the service: no STOPPING=1.
        self.drain_all("binary upgrade done", false);
    }

    /// The new master died within the window: a fresh generation on the sockets kept, the
    /// control socket path, the pid file and the service manager's main pid back.
    pub(super) fn roll_back(&mut self, how: &str) {
        let Phase::UpgradeWindow { until } = self.phase else {
            return;
        };
        let Some(s) = self.forget_successor() else {
            return;
        };
        let into = self
            .settings
            .upgrade_grace
            .saturating_sub(until.saturating_duration_since(self.sys.now()));
        self.count_what_it_counted(&s);
        self.phase = Phase::Running;
        // Its workers go on draining as the old generation; the next turn fills the pool. The
        // dead master's generation was N+1: this one is N+2, so a number names one generation.
        self.generation += 2;
        self.slots = vec![Backoff::default(); self.settings.workers as usize];
        self.take_control_back();
        if let Some(m) = self.metrics.as_mut() {
            if let Err(e) = self.lp.rewatch_metrics(m) {
                protocol::warn!("cannot watch the metrics port again: {e:#}");
            }
        }
        self.reclaim_pid_file();
        self.sys
            .notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
        protocol::warn!(
            "upgrade rolled back: the new master (pid {}) exited ({how}) {into:.1?} into the {:?} upgrade window; this master (pid {}) serves again with generation {}",
            s.pid,
            self.settings.upgrade_grace,
            std::process::id(),
            self.generation
        );
    }

    /// A roll-back keeps what the dead new master counted as of its last report (every
    /// second or so): what it served after that report, and what its workers had not yet
    /// reported, is lost, like a SIGKILLed worker's last interval. No count goes back: the
    /// upgrade still counts (in `upgrades`, and in `upgrades_failed` and `rollbacks`).
    fn count_what_it_counted(&mut self, s: &super::Successor) {
        if let Some(reported) = &s.reported {
            let (totals, lifecycle) = reported.gained_since(&s.handed);
            self.retired.add(&totals);
            let l = &mut self.lifecycle;
            l.reloads += lifecycle.reloads;
            l.reloads_failed += lifecycle.reloads_failed;
            l.upgrades += lifecycle.upgrades;
            l.upgrades_failed += lifecycle.upgrades_failed;
            l.respawns += lifecycle.respawns;
            l.rollbacks += lifecycle.rollbacks;
        }
        // This upgrade took over (it said ready), whether or not it reported.
        self.lifecycle.upgrades = self.lifecycle.upgrades.max(s.handed.lifecycle.upgrades + 1);
        self.lifecycle.upgrades_failed += 1;
        self.lifecycle.rollbacks += 1;
    }

    /// Serves the control socket again, at its path: the same socket if the path still names
    /// it (the new master was killed), else a new one bound there (it removed the path).
    fn take_control_back(&mut self) {
        let Some(c) = self.control.as_mut() else {
            return;
        };
        if !c.serves_its_path() {
            match ControlServer::bind(&self.cfg.control, None) {
                Ok(fresh) => *c = fresh,
                Err(e) => protocol::warn!(
                    "cannot serve the control socket at {} again: {e} (signals and the pid file still work)",
                    self.cfg.control.display()
                ),
            }
        }
        c.claim_name();
        if let Err(e) = self.lp.watch_control(c) {
            protocol::warn!("{e:#}");
        }
    }

    /// Signals to an old master in its window: a stop retires it (the new master serves on;
    /// it is not stopped with it), the others have nothing to act on. `true` if handled.
    pub(super) fn window_signal(&mut self, sig: i32) -> bool {
        if !matches!(self.phase, Phase::UpgradeWindow { .. }) {
            return false;
        }
        let name = signals::name(sig);
        match signals::action(sig) {
            Some(Action::GracefulStop | Action::StopNow) => {
                self.retire(&format!("SIG{name}"));
                true
            }
            Some(Action::Reload | Action::AddWorker | Action::RemoveWorker | Action::Upgrade) => {
                protocol::log!(
                    "SIG{name}: ignored: the new master serves (this master waits out its upgrade window; signal the new one)"
                );
                true
            }
            _ => false,
        }
    }

    /// On a new master that now serves: tell the old one (`ready` on its pipe), and keep the
    /// pipe for the window to commit on.
    pub(super) fn took_over(&mut self, fd: OwnedFd) {
        // Before `ready`: once the old master reads it, it may retire at once (no window).
        crate::spawn::outlive_predecessor();
        let mut pipe = std::fs::File::from(fd);
        if let Err(e) = pipe.write_all(b"ready\n") {
            protocol::warn!("cannot tell the previous master this one serves: {e}");
            return;
        }
        if !self.settings.upgrade_grace.is_zero() {
            // Reports are best effort: an old master that does not read must not stall this one.
            if let Err(e) = nix::fcntl::fcntl(
                &pipe,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            ) {
                protocol::warn!("cannot make the upgrade pipe non-blocking: {e}");
                return;
            }
            let now = self.sys.now();
            self.predecessor = Some(Predecessor {
                pipe,
                pid: std::os::unix::process::parent_id(),
                until: now + self.settings.upgrade_grace,
                next_report: now,
            });
        }
    }

    /// Ends the old master's window now, if it is open; returns its pid if it was.
    pub(super) fn commit_predecessor(&mut self, why: &str) -> Option<u32> {
        let mut p = self.predecessor.take()?;
        if p.until <= self.sys.now() {
            return None;
        }
        // It may have retired already (a signal): then nobody reads, and that is fine.
        match p.pipe.write_all(b"commit\n") {
            Ok(()) => {
                protocol::log!(
                    "upgrade committed ({why}): the previous master (pid {}) retires now",
                    p.pid
                );
                Some(p.pid)
            }
            Err(_) => None,
        }
    }

    /// The window as `stats` shows it, on the new master while it is open.
    pub(super) fn upgrade_window(&self) -> Option<UpgradeWindow> {
        let p = self.predecessor.as_ref()?;
        let left = p.until.saturating_duration_since(self.sys.now());
        // Its parent no longer: the old master has exited (retired by a signal).
        let alive = std::os::unix::process::parent_id() == p.pid;
        (!left.is_zero() && alive).then(|| UpgradeWindow {
            old_master_pid: p.pid,
            new_master_pid: std::process::id(),
            closes_in_secs: left.as_secs_f64(),
        })
    }

    /// The window's deadlines: the old master retires when it closes; the new master lets go
    /// of its end of the pipe.
    pub(super) fn window_deadlines(&mut self) {
        let now = self.sys.now();
        if let Phase::UpgradeWindow { until } = self.phase {
            if now >= until {
                self.retire("the upgrade window closed");
            }
        }
        if self.predecessor.as_ref().is_some_and(|p| p.until <= now) {
            self.predecessor = None;
        }
        self.report_to_predecessor(now);
    }

    /// On a new master in the old one's window: tell it the stats so far, at most every
    /// [`REPORT_EVERY`] (the loop wakes at least that often). One line, well under PIPE_BUF,
    /// so it arrives whole; if the pipe is full the report waits for the next turn.
    fn report_to_predecessor(&mut self, now: Instant) {
        if self
            .predecessor
            .as_ref()
            .is_none_or(|p| now < p.next_report)
        {
            return;
        }
        let line = match serde_json::to_string(&self.carryover()) {
            Ok(json) => format!("stats {json}\n"),
            Err(_) => return,
        };
        if let Some(p) = self.predecessor.as_mut() {
            if p.pipe.write_all(line.as_bytes()).is_ok() {
                p.next_report = now + REPORT_EVERY;
            }
        }
    }

    /// When the old master's window closes, for the loop's wait.
    pub(super) fn window_timer(&self) -> Option<Instant> {
        match self.phase {
            Phase::UpgradeWindow { until } => Some(until),
            _ => None,
        }
    }
}
