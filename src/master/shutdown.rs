//! Stopping: a graceful drain (SIGTERM/SIGINT, `stop`), an immediate stop (SIGQUIT, a second
//! TERM), giving up, and the deadlines that end each with SIGKILL.

use std::time::Instant;

use crate::control::Response;
use nix::sys::signal::Signal;

use super::{DRAIN_GRACE, MAX_WAIT, Master, Phase, STOP_GRACE, System};
use crate::control::ControlServer;

impl<S: System> Master<S> {
    pub(super) fn begin_drain(&mut self, why: &str) {
        self.drain_all(why, true);
    }

    /// Graceful stop (or retirement after an upgrade, `stopping` false: the service goes on
    /// in the new master).
    pub(super) fn drain_all(&mut self, why: &str, stopping: bool) {
        let kill_at = self.sys.now() + self.settings.drain() + DRAIN_GRACE;
        self.phase = Phase::Draining { kill_at };
        if stopping {
            self.sys.notify("STOPPING=1");
        }
        if let Some(r) = self.reload.take() {
            self.answer(r.waiters, &Response::error("the server is stopping"));
        }
        self.stop_successor(Signal::SIGTERM);
        // Close our copy of the listener; once the workers close theirs the kernel refuses
        // new connections instead of queueing them for nobody.
        self.listener = None;
        self.cfg.udp = None;
        protocol::log!(
            "{why}: graceful stop; draining {} worker(s) for up to {:?}",
            self.workers.len(),
            self.settings.drain()
        );
        // Only those not yet draining: to a worker, a second SIGTERM means "stop now", and a
        // worker of a reloaded generation may still be finishing its connections.
        let now = self.sys.now();
        for (_, w) in &mut self.workers {
            if w.start_draining(now) {
                let _ = self.sys.kill(w.pid, Signal::SIGTERM);
            }
        }
    }

    pub(super) fn stop_now(&mut self, why: &str) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        self.sys.notify("STOPPING=1");
        self.phase = Phase::Stopping {
            kill_at: self.sys.now() + STOP_GRACE,
        };
        if let Some(r) = self.reload.take() {
            self.answer(r.waiters, &Response::error("the server is stopping"));
        }
        self.stop_successor(Signal::SIGQUIT);
        self.listener = None;
        protocol::log!("{why}: stopping now");
        self.signal_all(Signal::SIGQUIT);
    }

    pub(super) fn give_up(&mut self, why: String) {
        protocol::warn!("{why}");
        self.failure.get_or_insert(why);
        self.stop_now("giving up");
    }

    pub(super) fn enforce_deadlines(&mut self) {
        if let Some(control) = self.control.as_mut() {
            control.expire(self.lp.registry());
        }
        if let Some(m) = self.metrics.as_mut() {
            m.expire(self.lp.registry(), self.sys.now());
        }
        self.log_stats_when_due();
        self.kill_hung_workers();
        self.kill_overdue_drains();
        self.window_deadlines();
        self.kill_overdue_successor();
        if let Phase::Draining { kill_at } | Phase::Stopping { kill_at } = self.phase {
            if self.sys.now() >= kill_at && !self.workers.is_empty() {
                protocol::warn!(
                    "{} worker(s) still running after the deadline; killing",
                    self.workers.len()
                );
                self.signal_all(Signal::SIGKILL);
                for (_, w) in &mut self.workers {
                    w.killed = true;
                }
                // Give them a moment to die; the next turns reap them.
                self.phase = Phase::Stopping {
                    kill_at: self.sys.now() + MAX_WAIT,
                };
            }
        }
    }

    pub(super) fn next_timer(&self) -> Option<Instant> {
        let kill_at = match self.phase {
            Phase::Draining { kill_at } | Phase::Stopping { kill_at } => Some(kill_at),
            Phase::Running | Phase::UpgradeWindow { .. } => None,
        };
        // Only timers someone acts on when they pass; each is cleared or moved when acted on
        // (a passed timer that stays would make every wait zero: a busy master).
        let kill_at = kill_at.filter(|_| !self.workers.is_empty());
        let respawn = self.next_respawn();
        let upgrade = self.successor_timer();
        let control = self.control.as_ref().and_then(ControlServer::next_deadline);
        let scrapers = self.metrics.as_ref().and_then(|m| m.next_deadline());
        [
            kill_at,
            respawn,
            control,
            scrapers,
            self.stats_log.next(),
            upgrade,
            self.window_timer(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
