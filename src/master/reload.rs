//! Reload by generation: start generation N+1 beside N, promote it once every worker of it is
//! ready, then drain N; abandon it (N keeps serving) if it cannot start.

use std::time::Instant;

use crate::control::Response;
use nix::sys::signal::Signal;

use super::{Backoff, Master, Phase, RELOAD_TIMEOUT, Settings, System, descriptor_room};
use crate::control::ClientId;
use crate::systemd;

/// A reload under way: generation `generation` is starting beside the serving one.
#[derive(Debug)]
pub(super) struct Reload {
    pub(super) generation: u32,
    pub(super) settings: Settings,
    pub(super) started: Instant,
    /// Control clients waiting for the outcome.
    pub(super) waiters: Vec<ClientId>,
}

impl<S: System> Master<S> {
    /// Starts a reload; `Err` says why it cannot start (a config error, a stop under way).
    pub(super) fn start_reload(&mut self, waiter: Option<ClientId>) -> Result<(), String> {
        let via = if waiter.is_some() {
            "control request"
        } else {
            "SIGHUP"
        };
        self.try_start_reload(waiter)
            .inspect_err(|why| protocol::log!("{via}: {why}"))
    }

    pub(super) fn try_start_reload(&mut self, waiter: Option<ClientId>) -> Result<(), String> {
        if self.phase != Phase::Running {
            return Err("the server is stopping; no reload".into());
        }
        if let Some(r) = self.reload.as_mut() {
            protocol::log!("reload of generation {} already under way", r.generation);
            r.waiters.extend(waiter);
            return Ok(());
        }
        let settings = Settings::resolve(&self.cfg.base, self.cfg.config_file.as_ref())
            .and_then(|s| {
                descriptor_room(s.workers).map_err(|why| crate::config::ConfigError::Read {
                    path: "the new settings".into(),
                    reason: why,
                })?;
                Ok(s)
            })
            .map_err(|e| {
                format!(
                    "reload refused, config file: {e}; generation {} keeps serving",
                    self.generation
                )
            })?;
        self.sys.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            systemd::monotonic_usec()
        ));
        let generation = self.generation + 1;
        protocol::log!(
            "reload: starting generation {generation} ({} worker(s)) beside generation {}",
            settings.workers,
            self.generation
        );
        self.reload = Some(Reload {
            generation,
            settings,
            started: self.sys.now(),
            waiters: waiter.into_iter().collect(),
        });
        Ok(())
    }

    /// Promotes the new generation once every worker of it is ready; gives up on it if it
    /// takes too long.
    pub(super) fn check_reload(&mut self) {
        let Some(r) = &self.reload else { return };
        let ready = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == r.generation && w.ready)
            .count();
        if ready < r.settings.workers as usize {
            if self.sys.now().saturating_duration_since(r.started) > RELOAD_TIMEOUT {
                self.abort_reload(format!(
                    "generation {} was not ready within {RELOAD_TIMEOUT:?}",
                    r.generation
                ));
            }
            return;
        }
        let Some(r) = self.reload.take() else { return };
        let old = self.generation;
        self.lifecycle.reloads += 1;
        self.generation = r.generation;
        self.settings = r.settings;
        self.slots = vec![Backoff::default(); self.settings.workers as usize];
        // Slots the new generation does not fill leave the rotation before their old workers
        // stop accepting (--balance reuseport).
        self.update_balance();
        let mut retiring = 0;
        let now = self.sys.now();
        for (_, w) in self.workers.iter_mut() {
            if w.generation != self.generation && w.start_draining(now) {
                retiring += 1;
                let _ = self.sys.kill(w.pid, Signal::SIGTERM);
            }
        }
        protocol::log!(
            "reload: generation {} serving ({} worker(s)); draining {retiring} worker(s) of generation {old}",
            self.generation,
            self.settings.workers
        );
        let answer = Response::Reloaded {
            ok: true,
            generation: self.generation,
            workers: self.settings.workers,
        };
        self.answer(r.waiters, &answer);
        self.sys.notify("READY=1");
    }

    /// Gives up a reload: the new generation drains away, the old one goes on serving.
    pub(super) fn abort_reload(&mut self, why: String) {
        let Some(r) = self.reload.take() else { return };
        self.lifecycle.reloads_failed += 1;
        let now = self.sys.now();
        for (_, w) in self.workers.iter_mut() {
            if w.generation == r.generation && w.start_draining(now) {
                let _ = self.sys.kill(w.pid, Signal::SIGTERM);
            }
        }
        protocol::warn!(
            "reload failed: {why}; generation {} keeps serving",
            self.generation
        );
        self.answer(r.waiters, &Response::error(format!("reload failed: {why}")));
        self.sys.notify("READY=1");
    }
}
