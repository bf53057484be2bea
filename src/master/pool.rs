//! The pool: slots filled by workers of the serving generation, respawn with backoff, scaling,
//! reaping, and readiness.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use mio::net::UnixStream;
use mio::{Interest, Token};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use protocol::ipc::{FrameDecoder, Message};
use protocol::stats::Counters;
use worker::WorkerConfig;

use super::supervision::WorkerProc;
use super::{FIRST_WORKER, Master, Phase, System, descriptor_room};
use crate::balance::Balance;

/// Respawn policy for one pool slot: a worker that dies soon after it started is respawned
/// with exponential backoff, and after [`Backoff::LIMIT`] such deaths in a row the slot is
/// abandoned (no respawn loop); the other slots keep serving, and the master gives up only
/// when no slot is left serving.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    fast_failures: u32,
    /// When the slot may be filled again.
    pub not_before: Option<Instant>,
    /// The slot kept failing and is no longer respawned (until a reload or scale resets it).
    pub abandoned: bool,
}

impl Backoff {
    /// A death this soon after start (or before reporting ready) counts as a failed start.
    pub const FAST: Duration = Duration::from_secs(1);
    /// Delay after the first failed start; doubled each time.
    pub const FIRST_DELAY: Duration = Duration::from_millis(100);
    /// Failed starts in a row that make the master give up.
    pub const LIMIT: u32 = 6;

    /// Records a worker's death; returns the respawn delay, or `None` to give up.
    pub fn on_death(&mut self, lived: Duration, was_ready: bool) -> Option<Duration> {
        if was_ready && lived >= Self::FAST {
            self.fast_failures = 0;
            return Some(Duration::ZERO);
        }
        self.fast_failures += 1;
        (self.fast_failures < Self::LIMIT)
            .then(|| Self::FIRST_DELAY * 2u32.pow(self.fast_failures - 1))
    }

    /// Failed starts in a row so far.
    pub fn failures(&self) -> u32 {
        self.fast_failures
    }
}

/// Report intervals of silence after which a worker's slot leaves the rotation.
const STALE_REPORTS: u32 = 3;

impl<S: System> Master<S> {
    /// Collects every exited child (never leaving a zombie) and decides about its slot.
    pub(super) fn reap(&mut self) {
        for gone in self.sys.reap() {
            let (pid, how, code) = (gone.pid, gone.how, gone.code);
            let Some(key) = self.by_pid.remove(&pid) else {
                if self.successor.as_ref().is_some_and(|s| s.pid == pid) {
                    if self.phase == Phase::Running {
                        self.upgrade_failed(&format!("the new master exited ({how})"));
                    } else if matches!(self.phase, Phase::UpgradeWindow { .. }) {
                        self.roll_back(&how);
                    } else {
                        // Stopped with us (a stop during an upgrade): nothing to restore but
                        // the pid file it wrote over ours.
                        self.forget_successor();
                        protocol::log!("the new master (pid {pid}) stopped with this one ({how})");
                        self.reclaim_pid_file();
                    }
                }
                continue;
            };
            let mut w = self.workers.remove(key);
            if let Some(hub) = self.hub.as_mut() {
                hub.leave(self.lp.registry(), pid.as_raw() as u32);
            }
            if let Some(mut ch) = w.channel.take() {
                // Its final report may still sit in the socket: read it before letting go.
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = ch.read(&mut buf) {
                    w.decoder.push(&buf[..n]);
                }
                while let Ok(Some(msg)) = w.decoder.next_message() {
                    if let Message::Report(c) | Message::Final(c) = msg {
                        w.counters = c;
                    }
                }
                let _ = self.lp.registry().deregister(&mut ch);
            }
            let mut gone = w.counters;
            gone.active = 0;
            self.retired.add(&gone);
            protocol::log!(
                "worker {}/g{} (pid {pid}) exited: {how}",
                w.id,
                w.generation
            );
            self.after_death(&w, &how, code);
        }
    }

    pub(super) fn after_death(&mut self, w: &WorkerProc, how: &str, code: Option<i32>) {
        if w.draining || self.phase != Phase::Running {
            return; // it was asked to go
        }
        if self
            .reload
            .as_ref()
            .is_some_and(|r| r.generation == w.generation)
        {
            self.abort_reload(format!(
                "worker {} of generation {} exited while starting ({how})",
                w.id, w.generation
            ));
            return;
        }
        if w.generation != self.generation || w.id >= self.settings.workers {
            return; // an old generation or a slot scaled away
        }
        if code == Some(worker::EXIT_BOOT_FAILURE) && !self.announced {
            // At start-up a worker that cannot boot will not boot on a retry either: say so
            // at once (gunicorn's "worker failed to boot") rather than after the backoff.
            self.give_up(format!(
                "worker {} could not boot ({how}): see its \"cannot start\" line above, or the binary could not be executed",
                w.id
            ));
            return;
        }
        let lived = self.sys.now().saturating_duration_since(w.started);
        self.lifecycle.respawns += 1;
        self.slot_failed(w.id, lived, w.ready, how);
    }

    /// Applies the backoff policy to slot `id` after a death (or a failed spawn); abandons
    /// the slot when it keeps failing, and gives up only if no slot is left serving.
    pub(super) fn slot_failed(&mut self, id: u32, lived: Duration, was_ready: bool, how: &str) {
        let Some(slot) = self.slots.get_mut(id as usize) else {
            return;
        };
        match slot.on_death(lived, was_ready) {
            Some(delay) => {
                // A timer only when there is something to wait for: a deadline set to "now"
                // and never cleared would keep the loop's wait at zero for ever (a busy
                // master). `manage_workers` clears it when it fills the slot.
                slot.not_before = (!delay.is_zero()).then(|| self.sys.now() + delay);
                if !delay.is_zero() {
                    protocol::log!(
                        "worker {id} failed {} time(s) right after starting ({how}); respawning in {delay:?}",
                        slot.failures()
                    );
                }
            }
            None => {
                slot.abandoned = true;
                slot.not_before = None;
                let n = slot.failures();
                let serving = self.serving_slots();
                if serving == 0 {
                    self.give_up(format!(
                        "worker {id} failed {n} times in a row within {:?} of starting (last: {how}), and no other worker is serving; giving up",
                        Backoff::FAST
                    ));
                } else {
                    protocol::log!(
                        "worker {id} failed {n} times in a row within {:?} of starting (last: {how}); \
                         no longer respawning slot {id}: DEGRADED, serving with {serving} worker(s) \
                         (a reload or `prefork-echo scale` tries the slot again)",
                        Backoff::FAST
                    );
                }
            }
        }
    }

    /// When the earliest slot waiting out its backoff may be filled: only while the pool is
    /// kept full, and only for a slot still empty and not abandoned (a timer nobody will act
    /// on would hold the loop's wait at zero).
    pub(super) fn next_respawn(&self) -> Option<Instant> {
        if self.phase != Phase::Running {
            return None;
        }
        (0..self.settings.workers)
            .filter_map(|id| {
                let slot = self.slots.get(id as usize)?;
                let waiting = !slot.abandoned && !self.slot_filled(self.generation, id);
                slot.not_before.filter(|_| waiting)
            })
            .min()
    }

    /// Slots of the serving generation with a live, non-draining worker.
    pub(super) fn serving_slots(&self) -> usize {
        (0..self.settings.workers)
            .filter(|&id| self.slot_filled(self.generation, id))
            .count()
    }

    /// Whether a live, serving worker of `generation` holds slot `id`.
    pub(super) fn slot_filled(&self, generation: u32, id: u32) -> bool {
        self.workers
            .iter()
            .any(|(_, w)| w.id == id && w.generation == generation && !w.draining)
    }

    /// Fills every empty slot whose backoff has passed, for the serving generation and for a
    /// generation being started by a reload.
    pub(super) fn manage_workers(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        let now = self.sys.now();
        for id in 0..self.settings.workers {
            let slot = &self.slots[id as usize];
            if slot.abandoned
                || self.slot_filled(self.generation, id)
                || slot.not_before.is_some_and(|t| now < t)
            {
                continue;
            }
            // The backoff has passed: its timer is spent (a failure sets a new one).
            self.slots[id as usize].not_before = None;
            let template = self.settings.worker.clone();
            if let Err(e) = self.spawn(id, self.generation, template) {
                protocol::warn!("cannot start worker {id}: {e:#}");
                self.slot_failed(id, Duration::ZERO, false, &format!("{e:#}"));
                if self.phase != Phase::Running {
                    return;
                }
            }
        }
        let Some(reload) = &self.reload else { return };
        let (generation, count, template) = (
            reload.generation,
            reload.settings.workers,
            reload.settings.worker.clone(),
        );
        for id in 0..count {
            let started = self
                .workers
                .iter()
                .any(|(_, w)| w.id == id && w.generation == generation);
            if !started {
                if let Err(e) = self.spawn(id, generation, template.clone()) {
                    self.abort_reload(format!("cannot start worker {id}: {e:#}"));
                    return;
                }
            }
        }
    }

    pub(super) fn spawn(&mut self, id: u32, generation: u32, mut cfg: WorkerConfig) -> Result<()> {
        let listener = self
            .listener
            .as_mut()
            .ok_or_else(|| anyhow!("the listener is closed"))?
            .for_slot(id)?;
        cfg.id = id;
        cfg.generation = generation;
        let lp = &mut self.lp;
        let udp = match self.cfg.udp.as_mut() {
            Some(u) => Some(u.for_slot(id)?),
            None => None,
        };
        let drain = cfg.drain();
        // In the child: drop the master's signal delivery, which unregisters its actions so
        // they cannot write into a descriptor number the worker reuses.
        let spawned = self.sys.spawn_worker(
            self.cfg.spawn,
            &self.cfg.exe,
            listener,
            udp,
            cfg,
            &mut || lp.drop_signals(),
        )?;
        spawned.channel.set_nonblocking(true)?;
        let mut channel = UnixStream::from_std(spawned.channel);
        let entry = self.workers.vacant_entry();
        let key = entry.key();
        self.lp
            .registry()
            .register(&mut channel, Token(key + FIRST_WORKER), Interest::READABLE)?;
        entry.insert(WorkerProc {
            pid: spawned.pid,
            id,
            generation,
            started: self.sys.now(),
            ready: false,
            channel: Some(channel),
            decoder: FrameDecoder::default(),
            counters: Counters::default(),
            last_report: None,
            draining: false,
            drain_since: None,
            drain,
            killed: false,
            heard: self.clock.now(),
        });
        self.by_pid.insert(spawned.pid, key);
        if let (Some(hub), Some(bus)) = (self.hub.as_mut(), spawned.bus) {
            // Tracked already: a worker left off the bus sees its end close, exits, and is
            // replaced like any other that dies.
            if let Err(e) = hub.join(self.lp.registry(), spawned.pid.as_raw() as u32, bus) {
                protocol::log!("cannot link worker {id} to the bus: {e}");
            }
        }
        protocol::log!("spawned worker {id}/g{generation} (pid {})", spawned.pid);
        Ok(())
    }

    pub(super) fn announce_when_ready(&mut self) {
        if self.announced || self.phase != Phase::Running {
            return;
        }
        let ready = self
            .workers
            .iter()
            .filter(|(_, w)| w.ready && w.generation == self.generation && !w.draining)
            .count();
        if ready >= self.settings.workers as usize {
            self.announced = true;
            self.sys.announce(self.addr, self.settings.workers);
            self.sys
                .notify(&format!("READY=1\nMAINPID={}", std::process::id()));
            if let Some(fd) = self.cfg.predecessor.take() {
                // The control socket's path is ours from now on (removed at our exit).
                if let Some(c) = self.control.as_mut() {
                    c.claim_name();
                }
                // Tell the master that started us that we serve: it drains its workers and
                // waits out its upgrade window.
                self.took_over(fd);
            }
        }
    }

    /// Resizes the pool: new slots fill on the next turn, surplus workers drain. The size is
    /// kept across reloads (unless the config file sets `workers`). Refused when the
    /// descriptor limit cannot hold one channel per worker.
    pub(super) fn scale(&mut self, workers: u32) -> Result<(), String> {
        if self.phase != Phase::Running {
            return Err("the server is stopping".into());
        }
        descriptor_room(workers)?;
        if let (Some(l), Some(top)) = (self.listener.as_mut(), workers.checked_sub(1)) {
            // --balance reuseport: the new slots' sockets, or a clear refusal now.
            l.for_slot(top).map_err(|e| {
                format!(
                    "no socket for slot {top}: {:#} (a reuseport group takes new sockets only \
                     from the user that bound it: with --user, start with as many workers as \
                     you will need)",
                    anyhow::Error::from(e)
                )
            })?;
        }
        if workers == self.settings.workers {
            // Also a way to retry abandoned slots.
            self.slots.iter_mut().for_each(|s| *s = Backoff::default());
            return Ok(());
        }
        protocol::log!(
            "scaling from {} to {}",
            self.settings.workers,
            crate::client::plural(u64::from(workers), "worker")
        );
        self.settings.workers = workers;
        self.cfg.base.workers = workers;
        self.slots = vec![Backoff::default(); workers as usize];
        if let Some(r) = self.reload.as_mut() {
            r.settings.workers = workers;
        }
        // Out of the rotation before their workers stop accepting (--balance reuseport).
        self.update_balance();
        let now = self.sys.now();
        for (_, w) in self.workers.iter_mut() {
            if w.id >= workers && w.start_draining(now) {
                let _ = self.sys.kill(w.pid, Signal::SIGTERM);
            }
        }
        Ok(())
    }

    /// With `--balance reuseport`: steers new connections to the pool's slots (those not
    /// abandoned), and closes the sockets of slots beyond the pool that no worker holds any
    /// more, highest first. A no-op for a shared listener.
    pub(super) fn update_balance(&mut self) {
        if self.listener.as_ref().map(|l| l.balance()) != Some(Balance::Reuseport) {
            return;
        }
        if matches!(self.phase, Phase::UpgradeWindow { .. }) {
            return; // the new master steers the group now
        }
        // A worker silent for three report intervals is likely stuck: new connections go to
        // its siblings until it is heard again (or replaced at --worker-timeout), so only what
        // already waits in its socket waits for it.
        let awake = self.clock.now();
        let stale = self
            .settings
            .worker
            .stats_every()
            .map(|every| every * STALE_REPORTS);
        let silent = |id: u32| {
            self.workers.iter().any(|(_, w)| {
                w.id == id
                    && w.generation == self.generation
                    && w.ready
                    && !w.draining
                    && stale.is_some_and(|s| awake.saturating_sub(w.heard) >= s)
            })
        };
        let mut slots: Vec<u32> = (0..self.settings.workers)
            .filter(|&id| !self.slots.get(id as usize).is_some_and(|s| s.abandoned))
            .filter(|&id| !silent(id))
            .collect();
        if slots.is_empty() {
            slots = (0..self.settings.workers.max(1)).collect();
        }
        let held = self.workers.iter().map(|(_, w)| w.id as usize + 1).max();
        let reloading = self.reload.as_ref().map(|r| r.settings.workers as usize);
        let keep = [held, reloading, Some(self.settings.workers as usize)]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(1);
        // The UDP sockets (--udp) are steered and retired with the listeners, slot by slot.
        for group in [self.listener.as_mut(), self.cfg.udp.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = group.steer(&slots) {
                protocol::warn!("cannot steer new connections to slots {slots:?}: {e}");
            }
            group.close_from(keep);
        }
    }

    pub(super) fn signal_all(&mut self, sig: Signal) {
        for (_, w) in &self.workers {
            match self.sys.kill(w.pid, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    protocol::log!("cannot send {sig} to worker {} (pid {}): {e}", w.id, w.pid)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_gives_up_and_resets_after_a_healthy_run() {
        let mut b = Backoff::default();
        let mut delays = Vec::new();
        while let Some(d) = b.on_death(Duration::from_millis(10), false) {
            delays.push(d.as_millis());
        }
        assert_eq!(delays, [100, 200, 400, 800, 1600]);
        assert_eq!(b.failures(), Backoff::LIMIT);

        let mut b = Backoff::default();
        assert_eq!(b.on_death(Duration::ZERO, true), Some(Backoff::FIRST_DELAY));
        // A worker that served for a while and then crashed is replaced at once, and the
        // count of failed starts begins again.
        assert_eq!(
            b.on_death(Duration::from_secs(5), true),
            Some(Duration::ZERO)
        );
        assert_eq!(b.failures(), 0);
    }
}
